from __future__ import annotations

from django.conf import settings
from django.db import models


class Conversation(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    agent = models.ForeignKey("agents.Agent", on_delete=models.PROTECT, related_name="conversations")
    project = models.CharField(max_length=100, blank=True, default="")
    title = models.CharField(max_length=200, blank=True, default="")
    message_count = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    has_success = models.BooleanField(default=False, help_text="Has at least one successful assistant reply.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [
            models.Index(fields=["owner", "agent", "project", "created_at"], name="conv_dedupe_idx"),
            models.Index(fields=["owner", "has_success", "-updated_at"], name="conv_list_idx"),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        PENDING = "pending"
        PROCESSING = "processing"
        SUCCESS = "success"
        ERROR = "error"
        INSUFFICIENT_BALANCE = "insufficient_balance"
        CONTENT_VIOLATION = "content_violation"
        LLM_ERROR = "llm_error"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    status = models.CharField(max_length=30, choices=Status.choices, default=Status.PENDING)
    error_message = models.TextField(blank=True, default="")
    # The machine code the client was told (e.g. upstream_timeout, quota_exceeded), so a replay tells the same.
    error_code = models.CharField(max_length=50, blank=True, default="")
    sequence = models.PositiveBigIntegerField()
    reply_to = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="replies")
    model_name = models.CharField(max_length=100, blank=True, default="")
    provider_name = models.CharField(max_length=100, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    usage_estimated = models.BooleanField(default=False)
    fallback = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    cost = models.DecimalField(max_digits=24, decimal_places=10, default=0)
    client_id = models.CharField(max_length=64, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["conversation", "sequence"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "sequence"], name="uniq_message_sequence"),
            models.UniqueConstraint(fields=["conversation", "client_id"], name="uniq_message_client_id"),
        ]
        indexes = [
            models.Index(fields=["status"], name="msg_status_idx"),
            models.Index(fields=["role", "status"], name="msg_role_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.role}#{self.sequence}"


class GenerationLease(models.Model):
    """A generation in flight, when Redis is absent or down: the database holds the lock and the per-user limit."""

    conversation = models.OneToOneField(Conversation, on_delete=models.CASCADE, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    token = models.CharField(max_length=64)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["owner", "expires_at"], name="lease_owner_idx")]
