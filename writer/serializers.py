from __future__ import annotations

from django.conf import settings
from rest_framework import serializers


class _TargetInput(serializers.Serializer):
    """Exactly one of `agent` (a slug) or `model` (a public model name)."""

    agent = serializers.SlugField(required=False, max_length=100)
    model = serializers.CharField(required=False, max_length=100)

    def validate(self, attrs: dict) -> dict:
        if bool(attrs.get("agent")) == bool(attrs.get("model")):
            raise serializers.ValidationError({"agent": "Give exactly one of 'agent' or 'model'."})
        return attrs


class GenerateTextInput(_TargetInput):
    prompt = serializers.CharField(max_length=settings.MAX_MESSAGE_CHARS)
    max_tokens = serializers.IntegerField(required=False, min_value=1)


class TopicsInput(_TargetInput):
    subject = serializers.CharField(max_length=2000)
    count = serializers.IntegerField(required=False, default=5, min_value=1, max_value=20)


class OptimizeInput(_TargetInput):
    content = serializers.CharField(max_length=settings.MAX_MESSAGE_CHARS)
    goal = serializers.CharField(max_length=500)


class UsageOutput(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    estimated = serializers.BooleanField()


class _CallOutput(serializers.Serializer):
    model = serializers.CharField(help_text="The public model that served the call (the fallback's, if used).")
    usage = UsageOutput()
    cost = serializers.CharField(help_text="What the call was charged, a decimal string in currency units.")


class TextOutput(_CallOutput):
    text = serializers.CharField()


class TopicsOutput(_CallOutput):
    topics = serializers.ListField(child=serializers.CharField())
