"""Input and output serializers for the usage API. Money out is a decimal string; nothing here writes money."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from aiwriter.money import money_str, to_cents
from usage.models import AdminDebugLog, ApiKey, LedgerEntry, UsageRecord
from usage.selectors import GROUPS

MAX_RANGE = timedelta(days=3660)


@extend_schema_field({"type": "string", "format": "decimal", "example": "0.000159"})
class MoneyField(serializers.Field):
    """Read-only money: "0.000159", never a float."""

    def __init__(self, **kwargs):
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: Decimal) -> str:
        return money_str(value)


# --- Inputs -------------------------------------------------------------------------------------------------------

class UsageQuerySerializer(serializers.Serializer):
    start = serializers.DateField(required=False, help_text="First local day (QUOTA_TIME_ZONE), inclusive.")
    end = serializers.DateField(required=False, help_text="Last local day, inclusive.")
    user = serializers.CharField(required=False, help_text="Username (staff only).")
    project = serializers.CharField(required=False, allow_blank=True)
    agent = serializers.CharField(required=False, help_text="Agent slug or id.")
    model = serializers.CharField(required=False)
    provider = serializers.CharField(required=False)
    group_by = serializers.CharField(required=False, default="provider,model,day")

    def validate_group_by(self, value: str) -> list[str]:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = sorted(set(names) - set(GROUPS))
        if unknown:
            raise serializers.ValidationError(f"Unknown group(s) {unknown}; use {sorted(GROUPS)}.")
        return names

    def validate(self, attrs: dict) -> dict:
        start, end = attrs.get("start"), attrs.get("end")
        if start and end:
            if start > end:
                raise serializers.ValidationError({"start": "start is after end."})
            if end - start > MAX_RANGE:
                raise serializers.ValidationError({"start": "The range is limited to ten years."})
        return attrs


class QuotaQuerySerializer(serializers.Serializer):
    user = serializers.CharField(required=False)
    project = serializers.CharField(required=False, allow_blank=True, default="")


class CreditsSerializer(serializers.Serializer):
    user = serializers.CharField(help_text="Username.")
    amount = serializers.DecimalField(max_digits=24, decimal_places=10, coerce_to_string=True)
    reason = serializers.CharField(max_length=255)
    kind = serializers.ChoiceField(choices=[LedgerEntry.Kind.TOPUP, LedgerEntry.Kind.ADJUSTMENT],
                                   default=LedgerEntry.Kind.TOPUP)


class ConsumeSerializer(serializers.Serializer):
    user = serializers.CharField(help_text="Username of the user who consumed.")
    workflow_type = serializers.CharField(max_length=100)
    tokens_used = serializers.IntegerField(min_value=0, max_value=2_000_000_000)
    model = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)
    project = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)
    metadata = serializers.DictField(required=False, default=dict)
    idempotency_key = serializers.CharField(max_length=150)


class DebugRunSerializer(serializers.Serializer):
    messages = serializers.ListField(child=serializers.DictField(), required=False, max_length=200)

    def validate_messages(self, value: list[dict]) -> list[dict]:
        for message in value:
            if message.get("role") not in ("system", "user", "assistant") or not isinstance(
                    message.get("content"), str):
                raise serializers.ValidationError("Each message needs a role (system/user/assistant) and content.")
        return [{"role": m["role"], "content": m["content"]} for m in value]


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, default="default")
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    project = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")


# --- Outputs ----------------------------------------------------------------------------------------------------------

def _money(**kw):
    return serializers.CharField(help_text="Decimal string in currency units.", **kw)


class BalanceSerializer(serializers.Serializer):
    balance = _money()
    reserved = _money()
    available = _money()
    currency = serializers.CharField()


class QuotaStatusSerializer(serializers.Serializer):
    period = serializers.DictField()
    project = serializers.CharField()
    exceeded = serializers.BooleanField()
    usage = serializers.DictField(help_text="{tokens: int, cost: decimal string}")
    limits = serializers.DictField(help_text="{tokens: int|null, cost: decimal string|null}; null = unlimited")
    percentage = serializers.DictField(help_text="{tokens: number|null, cost: number|null}")
    alert = serializers.DictField(allow_null=True, help_text="{level, message} or null")


STATS_SCHEMA = OpenApiTypes.OBJECT


class UsageRecordSerializer(serializers.ModelSerializer):
    cost = MoneyField()
    cost_cents = serializers.SerializerMethodField()
    estimated = serializers.BooleanField(read_only=True)

    class Meta:
        model = UsageRecord
        fields = ["id", "created_at", "entry_point", "project", "agent", "conversation", "message", "api_key",
                  "provider", "model", "upstream_model", "prompt_tokens", "cached_prompt_tokens",
                  "completion_tokens", "total_tokens", "token_source", "estimated", "cost", "cost_cents", "charged",
                  "cached", "fallback", "status", "error_code", "latency_ms", "ttft_ms", "workflow_type"]
        read_only_fields = fields

    def get_cost_cents(self, obj: UsageRecord) -> int:
        return to_cents(obj.cost)


class LedgerEntrySerializer(serializers.ModelSerializer):
    amount = MoneyField()
    balance_after = MoneyField()

    class Meta:
        model = LedgerEntry
        fields = ["id", "amount", "kind", "reason", "balance_after", "usage_record", "created_at"]
        read_only_fields = fields


class ApiKeySerializer(serializers.ModelSerializer):
    monthly_budget = MoneyField(allow_null=True)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "project", "monthly_budget", "rpm", "tpm", "created_at", "last_used_at",
                  "expires_at", "revoked_at"]
        read_only_fields = fields


class AdminDebugLogSerializer(serializers.ModelSerializer):
    cost = MoneyField()
    agent = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = AdminDebugLog
        fields = ["id", "action", "agent", "input", "result", "provider", "model", "prompt_tokens",
                  "completion_tokens", "cost", "latency_ms", "created_at"]
        read_only_fields = fields
