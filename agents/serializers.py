"""Staff API shapes for providers, models and agents; they refer to each other by name or slug."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, TypedDict

from rest_framework import serializers

from agents.llm import cache
from agents.models import Agent, LLMModel, Provider
from agents.selectors import prefetched_price


def decimal_string(value: Decimal | None) -> str | None:
    """Exact decimal without trailing zeros: Decimal("2.5000000000") → "2.5", Decimal("1E+2") → "100"."""
    if value is None:
        return None
    return format(value.normalize(), "f")


class ProviderSerializer(serializers.ModelSerializer):
    # Write-only: the key is never rendered back, not even masked.
    api_key = serializers.CharField(write_only=True, required=False, allow_blank=True, allow_null=True,
                                    max_length=500, trim_whitespace=True, style={"input_type": "password"})

    class Meta:
        model = Provider
        fields = ["name", "kind", "base_url", "api_key", "weight", "enabled", "rpm", "tpm", "max_concurrency",
                  "timeout", "max_retries"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        kind = attrs.get("kind", getattr(self.instance, "kind", Provider.Kind.OPENAI))
        base_url = attrs.get("base_url", getattr(self.instance, "base_url", ""))
        if kind == Provider.Kind.OPENAI and not base_url:
            raise serializers.ValidationError({"base_url": "An OpenAI-compatible provider needs a base_url."})
        return attrs


class DeploymentSerializer(serializers.Serializer):
    provider = serializers.SlugRelatedField(slug_field="name", queryset=Provider.objects.all())
    upstream_model = serializers.CharField(max_length=200)
    weight = serializers.IntegerField(min_value=0, default=1)


class _Price(TypedDict):
    max_digits: int
    decimal_places: int
    min_value: Decimal


_PRICE: _Price = {"max_digits": 24, "decimal_places": 10, "min_value": Decimal("0")}


class ModelSerializer(serializers.ModelSerializer):
    input_price_per_million = serializers.DecimalField(**_PRICE, required=False)
    cached_input_price_per_million = serializers.DecimalField(**_PRICE, required=False, allow_null=True)
    output_price_per_million = serializers.DecimalField(**_PRICE, required=False)
    deployments = DeploymentSerializer(many=True, required=False)

    class Meta:
        model = LLMModel
        fields = ["name", "input_price_per_million", "cached_input_price_per_million", "output_price_per_million",
                  "context_window", "strategy", "enabled", "deployments"]

    def validate_deployments(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = [(d["provider"].pk, d["upstream_model"]) for d in value]
        if len(keys) != len(set(keys)):
            raise serializers.ValidationError("Each provider + upstream_model pair may appear once.")
        return value

    def to_representation(self, instance: LLMModel) -> dict[str, Any]:
        price = prefetched_price(instance)
        return {
            "name": instance.name,
            "input_price_per_million": decimal_string(price.input_per_million) if price else "0",
            "cached_input_price_per_million": decimal_string(price.cached_input_per_million) if price else None,
            "output_price_per_million": decimal_string(price.output_per_million) if price else "0",
            "context_window": instance.context_window,
            "strategy": instance.strategy,
            "enabled": instance.enabled,
            "deployments": [{"provider": d.provider.name, "upstream_model": d.upstream_model, "weight": d.weight}
                            for d in instance.deployments.all()],
        }


class AgentSerializer(serializers.ModelSerializer):
    model = serializers.SlugRelatedField(slug_field="name", queryset=LLMModel.objects.all())
    fallback_model = serializers.SlugRelatedField(slug_field="name", queryset=LLMModel.objects.all(),
                                                  allow_null=True, required=False)
    temperature = serializers.DecimalField(max_digits=3, decimal_places=2, min_value=Decimal("0"),
                                           max_value=Decimal("2"), coerce_to_string=False, required=False)

    class Meta:
        model = Agent
        fields = ["slug", "name", "system_prompt", "model", "fallback_model", "timeout_seconds", "temperature",
                  "max_tokens", "enabled"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        model = attrs.get("model", getattr(self.instance, "model", None))
        fallback = attrs.get("fallback_model", getattr(self.instance, "fallback_model", None))
        if model is not None and fallback is not None and model.pk == fallback.pk:
            raise serializers.ValidationError({"fallback_model": "The fallback must be another model."})
        return attrs


class CacheClearSerializer(serializers.Serializer):
    pattern = serializers.CharField(required=False, allow_blank=True, max_length=300)
    tier = serializers.ChoiceField(choices=[cache.MEMORY, cache.REDIS, cache.ALL], default=cache.ALL)


class MetricsQuerySerializer(serializers.Serializer):
    start = serializers.DateTimeField(required=False)
    end = serializers.DateTimeField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("start") and attrs.get("end") and attrs["start"] > attrs["end"]:
            raise serializers.ValidationError({"start": "start must be before end."})
        return attrs
