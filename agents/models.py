from __future__ import annotations

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from encrypted_fields.fields import EncryptedCharField


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible"
        DEMO = "demo", "Built-in demo"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.OPENAI)
    base_url = models.URLField(max_length=500, blank=True)
    # Encrypted at rest; never rendered back (admin and API show ••••last4 at most).
    api_key = EncryptedCharField(max_length=500, blank=True, null=True)
    weight = models.PositiveIntegerField(default=1)
    enabled = models.BooleanField(default=True)
    rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty = unlimited.")
    tpm = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute; empty = unlimited.")
    max_concurrency = models.PositiveIntegerField(null=True, blank=True)
    timeout = models.FloatField(default=60.0, validators=[MinValueValidator(0.1)])
    max_retries = models.PositiveSmallIntegerField(default=2, validators=[MaxValueValidator(10)])
    # Circuit breaker per deployment of this provider: open after N consecutive failures, retry after the pause.
    breaker_failure_threshold = models.PositiveSmallIntegerField(default=5, validators=[MinValueValidator(1)])
    breaker_recovery_seconds = models.FloatField(default=30.0, validators=[MinValueValidator(0.1)])
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def masked_api_key(self) -> str:
        return f"••••{self.api_key[-4:]}" if self.api_key else ""


class LLMModel(models.Model):
    """A public model name that clients ask for, served by one or more deployments."""

    class Strategy(models.TextChoices):
        ROUND_ROBIN = "round_robin", "Round robin"
        WEIGHTED = "weighted", "Smooth weighted round robin"
        LEAST_CONNECTIONS = "least_connections", "Least connections"
        RANDOM = "random", "Random"

    name = models.CharField(max_length=100, unique=True)
    strategy = models.CharField(max_length=20, choices=Strategy.choices, default=Strategy.WEIGHTED)
    context_window = models.PositiveIntegerField(default=8192)
    max_output_tokens = models.PositiveIntegerField(default=4096)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"

    def __str__(self) -> str:
        return self.name


class HealthStatus(models.TextChoices):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class Deployment(models.Model):
    model = models.ForeignKey(LLMModel, on_delete=models.CASCADE, related_name="deployments")
    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="deployments")
    upstream_model = models.CharField(max_length=200)
    weight = models.PositiveIntegerField(default=1)
    enabled = models.BooleanField(default=True)
    # Written by the periodic probe (manage.py probe_deployments); live traffic health is kept in process.
    health_status = models.CharField(max_length=10, choices=HealthStatus.choices, default=HealthStatus.UNKNOWN)
    last_check_at = models.DateTimeField(null=True, blank=True)
    last_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "provider", "upstream_model"], name="uniq_deployment"),
        ]

    def __str__(self) -> str:
        return f"{self.model.name} → {self.provider.name}/{self.upstream_model}"


class Agent(models.Model):
    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True, help_text="Placeholders: {user}, {project}, {date}.")
    model = models.ForeignKey(LLMModel, on_delete=models.PROTECT, related_name="agents")
    fallback_model = models.ForeignKey(
        LLMModel, on_delete=models.SET_NULL, null=True, blank=True, related_name="fallback_for"
    )
    timeout_seconds = models.PositiveIntegerField(default=120, validators=[MinValueValidator(1)])
    temperature = models.DecimalField(
        max_digits=3, decimal_places=2, default=Decimal("0.70"),
        validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("2"))],
    )
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        # Calls cap max_tokens at the model's max_output_tokens anyway; storing more would only mislead.
        if self.max_tokens is None:
            return
        if self.max_tokens < 1:
            raise ValidationError({"max_tokens": "At least 1 (leave it empty for the model's maximum)."})
        model = self.model if self.model_id else None
        if model is not None and self.max_tokens > model.max_output_tokens:
            raise ValidationError({"max_tokens": f"At most the model's max_output_tokens ({model.max_output_tokens})."})
