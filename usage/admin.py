"""Operators' admin for keys, balances and ledger, quotas, alerts, usage records, debug logs and billing sync."""

from __future__ import annotations

import io
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.management import call_command, get_commands
from django.db.models import DecimalField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from aiwriter.admin_display import (
    DECIMAL_WIDGETS,
    MoneyFieldsMixin,
    debug_result,
    key_value_table,
    messages_list,
    money,
    money_column,
)
from aiwriter.errors import ApiError
from aiwriter.money import money_str
from usage import csv_export, periods
from usage.billing.keys import revoke_api_key
from usage.billing.ledger import grant_credits
from usage.models import (
    AdminDebugLog,
    ApiKey,
    ApiKeyCounter,
    BillingSyncState,
    CreditAccount,
    LedgerEntry,
    ModelPrice,
    Quota,
    QuotaAlert,
    UsageRecord,
)

MONEY_FIELD = DecimalField(max_digits=24, decimal_places=10)
# Management commands that push usage to the billing system, in the order we look for them.
BILLING_SYNC_COMMANDS = ("sync_usage", "sync_billing")


class ReadOnlyAdmin(MoneyFieldsMixin, admin.ModelAdmin):
    """Records written by the system: operators look, they don't edit (a view-only page: no Save buttons)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- API keys -------------------------------------------------------------------


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix_display", "user", "project", "month_spend", "monthly_budget_display",
                    "created_at", "last_used_at", "state"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "created_at"]
    list_select_related = ["user"]
    search_fields = ["name", "prefix", "user__username", "project"]
    # key_hash is never shown; keys are created through the API or `create_api_key`, where the key is shown once.
    fields = ["user", "name", "prefix", "project", "allowed_models", "monthly_budget", "rpm", "tpm", "expires_at",
              "created_at", "last_used_at", "revoked_at", "month_spend"]
    readonly_fields = ["user", "prefix", "created_at", "last_used_at", "revoked_at", "month_spend"]
    filter_horizontal = ["allowed_models"]
    formfield_overrides = DECIMAL_WIDGETS
    actions = ["revoke_keys"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # The counter the key's monthly budget is checked against (usage.billing.holds._check_limits): what was charged
        # this quota month. Uncharged calls (failures before any text, debug runs) add nothing, as for the budget.
        spend = ApiKeyCounter.objects.filter(api_key=OuterRef("pk"), period=periods.month_start()).values("cost")[:1]
        return super().get_queryset(request).annotate(
            _month_spend=Coalesce(Subquery(spend, output_field=MONEY_FIELD), Value(Decimal("0")),
                                  output_field=MONEY_FIELD))

    @admin.display(description="prefix")
    def prefix_display(self, obj: ApiKey) -> str:
        return f"{obj.prefix}…"

    @admin.display(description="spend this month", ordering="_month_spend")
    def month_spend(self, obj: ApiKey) -> str:
        return f"{money(getattr(obj, '_month_spend', Decimal('0')))} {settings.CURRENCY}"

    monthly_budget_display = money_column("monthly_budget", "monthly budget")

    @admin.display(description="state")
    def state(self, obj: ApiKey) -> str:
        if obj.revoked_at:
            return "revoked"
        if obj.expires_at and obj.expires_at <= timezone.now():
            return "expired"
        return "active"

    @admin.action(description="Revoke selected keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            revoke_api_key(api_key=api_key)
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)


# --- Prices ---------------------------------------------------------------------


@admin.register(ModelPrice)
class ModelPriceAdmin(ReadOnlyAdmin):
    """History view; prices are changed on the model's page (a change adds a row)."""

    list_display = ["model", "input_per_million_display", "cached_input_per_million_display",
                    "output_per_million_display", "effective_from", "created_at"]
    list_filter = ["model"]
    list_select_related = ["model"]
    date_hierarchy = "effective_from"
    money_fields = ("input_per_million", "cached_input_per_million", "output_per_million")
    input_per_million_display = money_column("input_per_million", "input per M")
    cached_input_per_million_display = money_column("cached_input_per_million", "cached input per M")
    output_per_million_display = money_column("output_per_million", "output per M")


# --- Balances -------------------------------------------------------------------


class TopUpForm(forms.Form):
    KINDS = [(LedgerEntry.Kind.TOPUP, "Top-up"), (LedgerEntry.Kind.ADJUSTMENT, "Adjustment")]

    user = forms.ModelChoiceField(queryset=get_user_model().objects.order_by("username"))
    amount = forms.DecimalField(max_digits=24, decimal_places=10, help_text=f"In {settings.CURRENCY}.")
    kind = forms.ChoiceField(choices=KINDS, initial=LedgerEntry.Kind.TOPUP)
    reason = forms.CharField(max_length=255, initial="Top-up by an operator")

    def clean_amount(self) -> Decimal:
        amount = self.cleaned_data["amount"]
        if amount == 0:
            raise forms.ValidationError("The amount can't be zero.")
        if amount < 0 and self.cleaned_data.get("kind", self.data.get("kind")) == LedgerEntry.Kind.TOPUP:
            raise forms.ValidationError("A top-up is positive; use an adjustment to take credit away.")
        return amount


@admin.register(CreditAccount)
class CreditAccountAdmin(admin.ModelAdmin):
    list_display = ["user", "balance_display", "reserved_display", "available", "updated_at", "topup_link"]
    list_select_related = ["user"]
    search_fields = ["user__username", "user__email"]
    fields = ["user", "balance_display", "reserved_display", "available", "updated_at", "ledger"]
    readonly_fields = fields
    actions = ["top_up"]
    balance_display = money_column("balance", "balance")
    reserved_display = money_column("reserved", "reserved")

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict | None = None) -> HttpResponse:
        # Every field is read-only (balances move through top-ups and the ledger): no Save buttons.
        extra = {"show_save": False, "show_save_and_continue": False, "show_save_and_add_another": False,
                 "show_delete": False}
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), **extra})

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # accounts open with the first grant; use "Top up a user"

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="available")
    def available(self, obj: CreditAccount) -> str:
        return money(obj.balance - obj.reserved)

    @admin.display(description="")
    def topup_link(self, obj: CreditAccount) -> str:
        url = reverse("admin:usage_creditaccount_topup") + f"?user={obj.user_id}"
        return format_html('<a href="{}">top up</a>', url)

    @admin.display(description="ledger (latest 50)")
    def ledger(self, obj: CreditAccount) -> str:
        entries = obj.entries.select_related("created_by").order_by("-created_at", "-id")[:50]
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((e.created_at.strftime("%Y-%m-%d %H:%M:%S"), e.kind, money(e.amount), money(e.balance_after), e.reason,
              e.created_by or "") for e in entries),
        )
        return format_html(
            '<table class="aiw-ledger"><thead><tr><th>when</th><th>kind</th><th>amount</th><th>balance after</th>'
            "<th>reason</th><th>by</th></tr></thead><tbody>{}</tbody></table>", rows or "")

    def get_urls(self):
        custom = [path("topup/", self.admin_site.admin_view(self.topup_view), name="usage_creditaccount_topup")]
        return custom + super().get_urls()

    @admin.action(description="Top up the selected users")
    def top_up(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        account = queryset.first()
        if queryset.count() != 1 or account is None:
            self.message_user(request, "Select one account to top up.", messages.WARNING)
            return None
        return HttpResponseRedirect(reverse("admin:usage_creditaccount_topup") + f"?user={account.user_id}")

    def topup_view(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm("usage.change_creditaccount"):
            raise PermissionDenied
        form = TopUpForm(request.POST or None, initial={"user": request.GET.get("user")})
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                grant_credits(user=data["user"], amount=data["amount"], reason=data["reason"],
                              created_by=request.user, kind=data["kind"])
            except ApiError as exc:  # e.g. an adjustment below what is held for calls in flight
                form.add_error(None, exc.message)
            else:
                self.message_user(request, f"Added {money(data['amount'])} {settings.CURRENCY} to {data['user']}.",
                                  messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:usage_creditaccount_changelist"))
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "title": "Top up a user",
                   "form": form}
        return TemplateResponse(request, "admin/usage/creditaccount/topup.html", context)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "user", "kind", "amount_display", "balance_after_display", "reason", "created_by"]
    list_filter = ["kind", "created_at"]
    money_fields = ("amount", "balance_after")
    amount_display = money_column("amount", "amount")
    balance_after_display = money_column("balance_after", "balance after")
    list_select_related = ["account__user", "created_by"]
    search_fields = ["account__user__username", "reason"]
    date_hierarchy = "created_at"
    show_full_result_count = False

    @admin.display(description="user", ordering="account__user__username")
    def user(self, obj: LedgerEntry) -> Any:
        return obj.account.user


# --- Quotas and alerts ------------------------------------------------------------


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "project_display", "monthly_token_limit", "monthly_cost_limit_display"]
    monthly_cost_limit_display = money_column("monthly_cost_limit", "monthly cost limit")
    list_select_related = ["user"]
    search_fields = ["user__username", "project"]
    autocomplete_fields = ["user"]
    formfield_overrides = DECIMAL_WIDGETS

    @admin.display(description="project", ordering="project")
    def project_display(self, obj: Quota) -> str:
        return obj.project or "(all projects)"

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        # Said where the number is typed (kept out of the model, so no migration for a help text).
        for name, unit in (("monthly_token_limit", "tokens"), ("monthly_cost_limit", settings.CURRENCY)):
            if name in form.base_fields:
                form.base_fields[name].help_text = f"Per calendar month, in {unit}. 0 means unlimited."
        return form


@admin.register(QuotaAlert)
class QuotaAlertAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "user", "project", "period", "level", "delivered", "message"]
    list_filter = ["level", "delivered", "period"]
    list_select_related = ["user"]
    search_fields = ["user__username", "project", "message"]


# --- Usage records ------------------------------------------------------------------


USAGE_CSV_COLUMNS = ["id", "created_at", "user", "project", "agent", "api_key", "entry_point", "provider", "model",
                     "upstream_model", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "total_tokens",
                     "token_source", "cost", "status", "error_code", "cached", "fallback", "debug", "charged",
                     "latency_ms", "ttft_ms"]


def usage_csv_rows(queryset: QuerySet) -> Iterator[list[Any]]:
    """The admin's rows (without the header); `usage.csv_export` escapes and streams them."""
    for r in queryset.select_related("user", "agent", "api_key").order_by("id").iterator(chunk_size=2000):
        yield [
            r.pk, r.created_at.isoformat(), r.user.get_username(), r.project, r.agent.slug if r.agent else "",
            r.api_key.prefix if r.api_key else "", r.entry_point, r.provider, r.model, r.upstream_model,
            r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens, r.total_tokens, r.token_source,
            money_str(r.cost), r.status, r.error_code, r.cached, r.fallback, r.debug, r.charged, r.latency_ms,
            r.ttft_ms,
        ]


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    # Fits 1280 px: provider, entry point and the flags are filters and on the detail page.
    list_display = ["created_at", "user", "project", "model", "status", "total_tokens", "cost_display", "latency_ms"]
    money_fields = ("cost",)
    cost_display = money_column("cost", "cost")
    list_filter = [
        ("user", admin.RelatedOnlyFieldListFilter), "project", "model", "provider", "status", "entry_point",
        "created_at", "cached", "debug",
    ]
    list_select_related = ["user"]
    search_fields = ["user__username", "project", "model", "provider", "error_code"]
    date_hierarchy = "created_at"
    show_full_result_count = False
    actions = ["export_csv"]

    def get_actions(self, request: HttpRequest) -> dict:
        # Read-only admin removes the delete action; the CSV export stays.
        return {name: value for name, value in super().get_actions(request).items() if name != "delete_selected"}

    @admin.action(description="Export selected to CSV")
    def export_csv(self, request: HttpRequest, queryset: QuerySet) -> StreamingHttpResponse:
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        return csv_export.response(USAGE_CSV_COLUMNS, usage_csv_rows(queryset), f"usage-{stamp}.csv")


# --- Debug logs and billing sync ------------------------------------------------------


@admin.register(AdminDebugLog)
class AdminDebugLogAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "agent", "staff_user", "model", "prompt_tokens", "completion_tokens",
                    "cost_display", "latency_ms"]
    list_filter = ["action", "agent", "model"]
    list_select_related = ["agent", "staff_user"]
    search_fields = ["agent__slug", "model", "provider"]
    date_hierarchy = "created_at"
    # Readable, not one JSON blob: the reply as text, the input messages, then the rest of the result.
    fields = ["created_at", "action", "agent", "staff_user", "provider", "model", "prompt_tokens", "completion_tokens",
              "cost_display", "latency_ms", "reply", "error_display", "input_display", "result_display"]
    readonly_fields = fields
    money_fields = ("cost",)
    cost_display = money_column("cost", "cost")

    @admin.display(description="reply")
    def reply(self, obj: AdminDebugLog) -> str:
        content = (obj.result or {}).get("content") if isinstance(obj.result, dict) else None
        if not content:
            return "—"
        return format_html('<div class="aiw-reply">{}</div>', content)

    @admin.display(description="error")
    def error_display(self, obj: AdminDebugLog) -> str:
        error = (obj.result or {}).get("error") if isinstance(obj.result, dict) else None
        if not isinstance(error, dict):
            return "—"
        return format_html('<span class="aiw-error">{}: {}</span>', error.get("code", ""), error.get("message", ""))

    @admin.display(description="input")
    def input_display(self, obj: AdminDebugLog) -> str:
        data = obj.input if isinstance(obj.input, dict) else {"input": obj.input}
        if set(data) == {"messages"}:
            return messages_list(data["messages"])
        return key_value_table(data)

    @admin.display(description="result")
    def result_display(self, obj: AdminDebugLog) -> str:
        return debug_result(obj.result)


def billing_sync_command() -> str | None:
    commands = get_commands()
    return next((name for name in BILLING_SYNC_COMMANDS if name in commands), None)


@admin.register(BillingSyncState)
class BillingSyncStateAdmin(ReadOnlyAdmin):
    list_display = ["user", "status", "last_synced_record_id", "tokens_synced", "updated_at", "error"]
    list_filter = ["status"]
    list_select_related = ["user"]
    search_fields = ["user__username"]
    change_list_template = "admin/usage/billingsyncstate/change_list.html"

    def get_urls(self):
        custom = [path("run/", self.admin_site.admin_view(self.run_view), name="usage_billingsyncstate_run")]
        return custom + super().get_urls()

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        extra = {"sync_command": billing_sync_command(), "billing_sync_url": bool(settings.BILLING_SYNC_URL),
                 "unsynced": UsageRecord.objects.filter(synced_at__isnull=True, debug=False).count()}
        return super().changelist_view(request, {**(extra_context or {}), **extra})

    def run_view(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or not request.user.is_superuser:
            raise PermissionDenied
        command = billing_sync_command()
        if command is None:
            self.message_user(request, "No billing sync command is installed.", messages.ERROR)
        else:
            try:
                out = io.StringIO()
                call_command(command, stdout=out, stderr=out)
                last = (out.getvalue().strip().splitlines() or [""])[-1]
                self.message_user(request, f"Billing sync ran. {last}".strip(), messages.SUCCESS)
            except Exception as exc:  # noqa: BLE001 - show the failure on the page; the state row records it too
                self.message_user(request, f"Billing sync failed: {exc}", messages.ERROR)
        return HttpResponseRedirect(reverse("admin:usage_billingsyncstate_changelist"))

