"""Input and output shapes of the conversations API."""

from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from conversations import selectors
from conversations.models import Conversation, Message
from usage.serializers import MoneyField


class StrictCharField(serializers.CharField):
    """A JSON string only: 5 is not the text "5" (the websocket and REST refuse the same inputs)."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false only: "yes" is not true."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class ConversationCreateInput(serializers.Serializer):
    agent = StrictCharField(max_length=100)
    project = StrictCharField(max_length=100, required=False, allow_blank=True)
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    new = StrictBooleanField(required=False, default=False,
                             help_text="Always start a new conversation (no 5-minute dedupe).")


class ConversationListQuery(serializers.Serializer):
    include_failed = serializers.BooleanField(
        required=False, default=False,
        help_text="Also list conversations without a successful reply (failed, stopped, interrupted).")
    q = serializers.CharField(required=False, default="", allow_blank=True, max_length=200,
                              help_text="Search: matches the title or any message's text, case-insensitive.")


class ConversationUpdateInput(serializers.Serializer):
    title = serializers.CharField(max_length=200, allow_blank=True)


class MessageCreateInput(serializers.Serializer):
    content = StrictCharField(trim_whitespace=False)
    client_id = StrictCharField(max_length=64, required=False, allow_null=True, allow_blank=True)

    def validate_content(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("This field may not be blank.")
        if len(value) > settings.MAX_MESSAGE_CHARS:
            # The words the chat page shows as they are: the real reason, with the limit as the page counts it.
            raise serializers.ValidationError(
                f"This message is too long: at most {settings.MAX_MESSAGE_CHARS:,} characters.")
        return value


class MessageFrameInput(MessageCreateInput):
    """A websocket `message` frame: REST's message create, plus what REST has in the URL (`conversation`) or in
    the conversation create (`agent`, `project`, `new`), with the same fields as there, so both refuse the same
    inputs with the same messages."""

    conversation = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    agent = StrictCharField(max_length=100, required=False)
    project = StrictCharField(max_length=100, required=False, allow_blank=True, allow_null=True)
    new = StrictBooleanField(required=False, default=False)

    def validate(self, attrs):
        if attrs.get("conversation") is None and not attrs.get("agent"):
            raise serializers.ValidationError({"agent": ["A slug is required to start a conversation."]})
        return attrs


class ConversationSerializer(serializers.ModelSerializer):
    agent = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "agent", "project", "title", "message_count", "total_tokens", "has_success",
                  "created_at", "updated_at"]
        read_only_fields = fields


class ConversationCreatedSerializer(ConversationSerializer):
    """The answer to a create: `deduplicated` is true when an existing conversation came back (200) instead of a
    new one (201); its title is then the existing one's, the request's `title` is not applied."""

    deduplicated = serializers.BooleanField(read_only=True)

    class Meta(ConversationSerializer.Meta):
        fields = [*ConversationSerializer.Meta.fields, "deduplicated"]
        read_only_fields = fields


class MessageSerializer(serializers.ModelSerializer):
    error_display = serializers.SerializerMethodField()
    cost = MoneyField()  # the one money format (aiwriter.money.money_str): "0.0005725", never "0E-10"
    total_tokens = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = ["id", "conversation", "role", "content", "status", "error_code", "error_message", "error_display",
                  "sequence", "reply_to", "model_name", "provider_name", "prompt_tokens", "completion_tokens",
                  "total_tokens", "usage_estimated", "fallback", "latency_ms", "cost", "client_id", "created_at",
                  "updated_at"]
        read_only_fields = fields

    def get_error_display(self, message: Message) -> str | None:
        return selectors.error_display(message)

    def get_total_tokens(self, message: Message) -> int:
        return message.prompt_tokens + message.completion_tokens


class MemoryHitSerializer(serializers.Serializer):
    message = serializers.IntegerField(source="message_id")
    conversation = serializers.IntegerField(source="conversation_id")
    role = serializers.CharField()
    content = serializers.CharField()
    created_at = serializers.DateTimeField()
    rank = serializers.FloatField()
