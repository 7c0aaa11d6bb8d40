from __future__ import annotations

import hashlib
import secrets
from decimal import Decimal
from typing import TypedDict

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from aiwriter.money import money_str


class _Digits(TypedDict):
    max_digits: int
    decimal_places: int


MONEY: _Digits = {"max_digits": 24, "decimal_places": 10}


def _places(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) else 0  # "n"/"N"/"F": NaN and infinity have no places


class ApiKey(models.Model):
    """A bearer key. Only its SHA-256 is stored; the key itself is shown once at creation."""

    PREFIX = "aiw_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, default="default")
    prefix = models.CharField(max_length=16, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True)
    project = models.CharField(max_length=100, blank=True, default="")
    allowed_models = models.ManyToManyField("agents.LLMModel", blank=True, related_name="api_keys")
    monthly_budget = models.DecimalField(**MONEY, null=True, blank=True)
    rpm = models.PositiveIntegerField(null=True, blank=True)
    tpm = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def hash_key(raw_key: str) -> str:
        return hashlib.sha256(raw_key.encode()).hexdigest()

    @classmethod
    def generate(cls) -> tuple[str, str, str]:
        """Returns (raw key, prefix, hash)."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        return raw, raw[:12], cls.hash_key(raw)


class ModelPrice(models.Model):
    """Price history per model: the row in force at call time prices the call."""

    model = models.ForeignKey("agents.LLMModel", on_delete=models.CASCADE, related_name="prices")
    input_per_million = models.DecimalField(**MONEY)
    cached_input_per_million = models.DecimalField(**MONEY, null=True, blank=True)
    output_per_million = models.DecimalField(**MONEY)
    effective_from = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.CheckConstraint(
                condition=Q(input_per_million__gte=0) & Q(output_per_million__gte=0)
                & (Q(cached_input_per_million__isnull=True) | Q(cached_input_per_million__gte=0)),
                name="price_non_negative",
            ),
        ]

    # Above this a typo (a price per token entered per million) would lock every user out.
    MAX_PER_MILLION = Decimal("10000")
    # Prices per million with at most 4 places make every per-token price exact at 10 places, so the sum of
    # per-record costs equals the cost of the summed tokens.
    MAX_PLACES = 4

    def __str__(self) -> str:
        when = f" from {self.effective_from:%Y-%m-%d %H:%M}" if self.effective_from else ""
        return f"{self.model} price{when}"

    def save(self, *args, **kwargs) -> None:
        # Every write path (admin, staff API, seed, shell) gets the same rules: a bad price never prices a call.
        self.clean()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        errors = {}
        for name in ("input_per_million", "cached_input_per_million", "output_per_million"):
            value = getattr(self, name)
            if value is None:
                continue
            value = value if isinstance(value, Decimal) else Decimal(str(value))
            if value < 0:
                errors[name] = "A price cannot be negative."
            elif value > self.MAX_PER_MILLION:
                errors[name] = f"A price above {self.MAX_PER_MILLION} per million tokens is surely a typo."
            elif _places(value) > self.MAX_PLACES and value != value.quantize(Decimal("0.0001")):
                errors[name] = f"Use at most {self.MAX_PLACES} decimal places per million tokens."
        if errors:
            raise ValidationError(errors)


class CreditAccount(models.Model):
    """A user's credit balance; `balance` always equals the sum of the ledger."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="credit")
    balance = models.DecimalField(**MONEY, default=0)
    reserved = models.DecimalField(**MONEY, default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(balance__gte=0), name="balance_non_negative"),
            models.CheckConstraint(condition=Q(reserved__gte=0), name="reserved_non_negative"),
            models.CheckConstraint(condition=Q(reserved__lte=F("balance")), name="reserved_within_balance"),
        ]

    def __str__(self) -> str:
        return f"Credit of {self.user} ({money_str(self.balance)})"


class LedgerEntry(models.Model):
    class Kind(models.TextChoices):
        TOPUP = "topup"
        CHARGE = "charge"
        REFUND = "refund"
        ADJUSTMENT = "adjustment"

    account = models.ForeignKey(CreditAccount, on_delete=models.PROTECT, related_name="entries")
    amount = models.DecimalField(**MONEY)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    reason = models.CharField(max_length=255, blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    usage_record = models.ForeignKey("UsageRecord", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    balance_after = models.DecimalField(**MONEY)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "ledger entries"

    def __str__(self) -> str:
        when = f" ({self.created_at:%Y-%m-%d %H:%M})" if self.created_at else ""
        return f"{self.kind} {money_str(self.amount)}{when}"

    def save(self, *args, **kwargs) -> None:
        # Append-only (PostgreSQL enforces it with a trigger too): a correction is a new adjustment entry.
        if not self._state.adding:
            raise ValueError("Ledger entries are append-only; record an adjustment instead.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("Ledger entries are append-only; record an adjustment instead.")


class Reservation(models.Model):
    """Credit held for a call in flight: settled to the actual cost, or released."""

    class Status(models.TextChoices):
        HELD = "held"
        SETTLED = "settled"
        RELEASED = "released"

    account = models.ForeignKey(CreditAccount, on_delete=models.CASCADE, related_name="reservations")
    amount = models.DecimalField(**MONEY)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.HELD)
    # What the call was (written with the hold) and, if recording failed after the upstream answered, its
    # outcome: `reconcile_reservations` turns a stale hold into the record and charge it stands for.
    context = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True)
    usage_record = models.ForeignKey("UsageRecord", on_delete=models.SET_NULL, null=True, blank=True,
                                     related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "created_at"], name="reservation_status_idx")]

    def __str__(self) -> str:
        return f"Hold of {money_str(self.amount)} #{self.pk}"


class UsageRecord(models.Model):
    """One row per model call, written in the same transaction as its charge."""

    class EntryPoint(models.TextChoices):
        CHAT = "chat"
        WS = "ws"
        OPENAI = "openai"
        WRITER = "writer"
        EXTERNAL = "external"
        DEBUG = "debug"

    class Status(models.TextChoices):
        SUCCESS = "success"
        ERROR = "error"
        CANCELLED = "cancelled"

    class TokenSource(models.TextChoices):
        MEASURED = "measured"
        ESTIMATED = "estimated"
        PARTIAL = "partial"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records")
    project = models.CharField(max_length=100, blank=True, default="")
    agent = models.ForeignKey("agents.Agent", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    conversation = models.ForeignKey(
        "conversations.Conversation", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    message = models.ForeignKey("conversations.Message", on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="+")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage")
    provider = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=100, blank=True, default="")
    upstream_model = models.CharField(max_length=200, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    token_source = models.CharField(max_length=10, choices=TokenSource.choices, default=TokenSource.MEASURED)
    cost = models.DecimalField(**MONEY, default=0)
    cached = models.BooleanField(default=False)
    debug = models.BooleanField(default=False)
    fallback = models.BooleanField(default=False)
    charged = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.SUCCESS)
    error_code = models.CharField(max_length=50, blank=True, default="")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    entry_point = models.CharField(max_length=10, choices=EntryPoint.choices)
    workflow_type = models.CharField(max_length=100, blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    synced_at = models.DateTimeField(null=True, blank=True)
    # The call's start time (not auto_now_add): it picks the price, the quota month and the rollup day.
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["user", "created_at"], name="usage_user_time_idx"),
            models.Index(fields=["project", "created_at"], name="usage_project_time_idx"),
            models.Index(fields=["provider", "model", "created_at"], name="usage_provider_model_idx"),
            models.Index(fields=["api_key", "created_at"], name="usage_key_time_idx"),
            models.Index(fields=["synced_at", "id"], name="usage_sync_idx"),
            # sync_usage: a user's unsynced records in id order, small however large the history grows.
            models.Index(fields=["user", "id"], condition=Q(synced_at__isnull=True), name="usage_unsynced_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.model or 'call'} by {self.user} #{self.pk} ({money_str(self.cost)})"

    @property
    def estimated(self) -> bool:
        return self.token_source != self.TokenSource.MEASURED


class Quota(models.Model):
    """Monthly limits for a user (project empty) or for one of their projects. 0 = unlimited."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quotas")
    project = models.CharField(max_length=100, blank=True, default="")
    monthly_token_limit = models.PositiveBigIntegerField(default=0)
    monthly_cost_limit = models.DecimalField(**MONEY, default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "project"], name="uniq_quota")]

    def __str__(self) -> str:
        return f"Quota of {self.user}" + (f" for {self.project}" if self.project else "")


class UsageCounter(models.Model):
    """Running per-month totals, kept in the charge transaction so quota checks are O(1)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    project = models.CharField(max_length=100, blank=True, default="")
    period = models.DateField(help_text="First day of the month, in QUOTA_TIME_ZONE.")
    tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "project", "period"], name="uniq_usage_counter")]

    def __str__(self) -> str:
        return f"Usage of {self.user} in {self.period:%Y-%m}"


class ApiKeyCounter(models.Model):
    """Running per-month spend of one API key, for its monthly budget (O(1) like UsageCounter)."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")
    period = models.DateField(help_text="First day of the month, in QUOTA_TIME_ZONE.")
    tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["api_key", "period"], name="uniq_api_key_counter")]

    def __str__(self) -> str:
        return f"Usage of key {self.api_key_id} in {self.period:%Y-%m}"


class QuotaAlert(models.Model):
    class Level(models.TextChoices):
        WARNING = "warning"
        CRITICAL = "critical"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota_alerts")
    project = models.CharField(max_length=100, blank=True, default="")
    period = models.DateField()
    level = models.CharField(max_length=10, choices=Level.choices)
    message = models.TextField()
    delivered = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["user", "project", "period", "level"], name="uniq_quota_alert"),
        ]

    def __str__(self) -> str:
        return f"Quota alert for {self.user} #{self.pk}"


class DailyRollup(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    project = models.CharField(max_length=100, blank=True, default="")
    # 0 = no agent (not NULL, so one plain unique constraint works on PostgreSQL and SQLite alike).
    agent_id = models.BigIntegerField(default=0)
    provider = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=100, blank=True, default="")
    day = models.DateField()
    calls = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0)
    cache_hits = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "project", "agent_id", "provider", "model", "day"],
                name="uniq_daily_rollup",
            ),
        ]
        indexes = [models.Index(fields=["user", "day"], name="rollup_user_day_idx"),
                   models.Index(fields=["day"], name="rollup_day_idx")]

    def __str__(self) -> str:
        return f"{self.day} {self.model or '-'} of {self.user_id}"


class IdempotencyKey(models.Model):
    """A request seen before: the same key with another body is refused (409)."""

    scope = models.CharField(max_length=50)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=200)
    request_hash = models.CharField(max_length=64)
    response = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "user", "key"], name="uniq_idempotency_key")]


class AdminDebugLog(models.Model):
    class Action(models.TextChoices):
        ROUTE = "route", "Route test"
        PREVIEW = "preview", "Prompt preview"
        RUN = "run", "Execution test"

    staff_user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    agent = models.ForeignKey("agents.Agent", on_delete=models.SET_NULL, null=True, related_name="debug_logs")
    action = models.CharField(max_length=10, choices=Action.choices)
    input = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    provider = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=100, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Debug run #{self.pk}"

class BillingSyncState(models.Model):
    class Status(models.TextChoices):
        IDLE = "idle"
        RUNNING = "running"
        OK = "ok"
        FAILED = "failed"

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing_sync")
    last_synced_record_id = models.BigIntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.IDLE)
    tokens_synced = models.PositiveBigIntegerField(default=0)
    records_synced = models.PositiveBigIntegerField(default=0)
    error = models.TextField(blank=True, default="")
    # The batch being sent ({"key", "ids"}), written before the POST: a run killed mid-send resends exactly this
    # batch under the same idempotency key, so the billing backend never counts a record twice.
    pending_batch = models.JSONField(null=True, blank=True)
    last_synced_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"Billing sync state #{self.pk}"
