"""Operators' admin for providers, models (deployments, price history) and agents (with a debug page)."""

from __future__ import annotations

import inspect
from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from agents.models import Agent, Deployment, LLMModel, Provider
from aiwriter.admin_display import DECIMAL_WIDGETS, debug_result, money, show_money_read_only
from usage import debug, pricing
from usage.models import AdminDebugLog, ModelPrice

PROBE_TIMEOUT = 15.0  # seconds for the provider page's "Test connection" (as probe_deployments' default)


class ProviderForm(forms.ModelForm):
    """The stored key is never rendered back: a write-only field that keeps the old key when left empty."""

    new_api_key = forms.CharField(
        label="New API key", required=False, strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave empty to keep the stored key.",
    )
    clear_api_key = forms.BooleanField(label="Remove the stored key", required=False)
    base_url = forms.URLField(max_length=500, required=False, assume_scheme="https",
                              widget=forms.URLInput(attrs={"size": 60}),
                              help_text="OpenAI-compatible base URL, e.g. https://api.example.com/v1")

    class Meta:
        model = Provider
        fields = ["name", "kind", "base_url", "enabled", "weight", "rpm", "tpm", "max_concurrency", "timeout",
                  "max_retries", "breaker_failure_threshold", "breaker_recovery_seconds"]  # never api_key itself
        # Not a login form: the browser must neither offer the operator's own username here nor warn about it.
        widgets = {"name": forms.TextInput(attrs={"autocomplete": "off"})}

    def save(self, commit: bool = True) -> Provider:
        provider = super().save(commit=False)
        if self.cleaned_data.get("new_api_key"):
            provider.api_key = self.cleaned_data["new_api_key"]
        elif self.cleaned_data.get("clear_api_key"):
            provider.api_key = ""
        if commit:
            provider.save()
        return provider


def _health_badge(status: str) -> str:
    return format_html('<span class="aiw-health aiw-health-{}">{}</span>', status, status)


def test_connection(provider: Provider) -> tuple[int, str]:
    """One probe (the probe_deployments request) against the provider's first deployment; the verdict is stored
    on that deployment like a periodic probe's. Returns (message level, text)."""
    from agents.llm import registry
    from agents.management.commands.probe_deployments import probe

    deployment = (provider.deployments.select_related("provider", "model").order_by("-enabled", "id").first())
    if deployment is None:
        return messages.WARNING, f"{provider.name} has no deployment to probe: add one on a model's page first."
    info = registry.deployment_info(deployment)
    status, latency, error = async_to_sync(probe)(info, PROBE_TIMEOUT)
    Deployment.objects.filter(pk=deployment.pk).update(health_status=status, last_check_at=timezone.now(),
                                                       last_latency_ms=latency, last_error=error)
    target = f"{provider.name} ({deployment.upstream_model})"
    if error:
        return messages.ERROR, f"Test connection to {target} failed after {latency} ms: {error}."
    return messages.SUCCESS, f"Test connection to {target}: {status}, {latency} ms."


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = ["name", "kind", "base_url", "api_key_display", "weight", "enabled", "rpm", "tpm", "timeout"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "base_url"]
    readonly_fields = ["api_key_display", "health", "created_at", "updated_at"]
    change_form_template = "admin/agents/provider/change_form.html"
    fieldsets = [
        (None, {"fields": ["name", "kind", "base_url", "enabled", "weight"]}),
        ("Credentials", {"fields": ["api_key_display", "new_api_key", "clear_api_key"]}),
        ("Health", {"fields": ["health"]}),
        ("Limits", {"fields": ["rpm", "tpm", "max_concurrency", "timeout", "max_retries"]}),
        ("Circuit breaker", {"fields": ["breaker_failure_threshold", "breaker_recovery_seconds"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    @admin.display(description="stored key")
    def api_key_display(self, obj: Provider) -> str:
        return obj.masked_api_key or "—"

    @admin.display(description="deployments")
    def health(self, obj: Provider) -> str:
        from agents.llm import breaker
        from agents.selectors import deployment_health

        if obj.pk is None:
            return "—"
        breaker.refresh()  # the breakers of every process, as they are now (not up to a second old)
        rows = deployment_health(provider_id=obj.pk)
        if not rows:
            return "No deployments yet."
        return format_html(
            '<table class="aiw-provider-health"><thead><tr><th>model</th><th>upstream model</th><th>status</th>'
            "<th>circuit</th><th>latency</th><th>last check</th><th>last error</th></tr></thead><tbody>{}</tbody>"
            "</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                             "</tr>", (
                (r.model, r.upstream_model, _health_badge(r.status),
                 format_html('<span class="aiw-breaker aiw-breaker-{}">{}</span>', r.breaker_state,
                             r.breaker_state.replace("_", "-")),
                 f"{r.response_time_ms} ms" if r.response_time_ms is not None else "—",
                 timezone.localtime(r.last_check).strftime("%Y-%m-%d %H:%M:%S") if r.last_check else "—",
                 r.last_error or "—") for r in rows)))

    def get_urls(self):
        custom = [path("<int:pk>/test-connection/", self.admin_site.admin_view(self.test_connection_view),
                       name="agents_provider_test_connection")]
        return custom + super().get_urls()

    def test_connection_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        provider = get_object_or_404(Provider, pk=pk)
        if request.method != "POST" or not self.has_change_permission(request, provider):
            raise PermissionDenied
        level, text = test_connection(provider)
        self.message_user(request, text, level)
        return HttpResponseRedirect(reverse("admin:agents_provider_change", args=[pk]))


class DeploymentInline(admin.TabularInline):
    model = Deployment
    extra = 0
    # Fits 1280 px: the probe's verdict in one column, the error cut short (full text on hover).
    fields = ["provider", "upstream_model", "weight", "enabled", "health", "last_error_short"]
    readonly_fields = ["health", "last_error_short"]
    autocomplete_fields = ["provider"]

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).select_related("model", "provider")

    @admin.display(description="health (last check)")
    def health(self, obj: Deployment) -> str:
        if obj.pk is None:
            return "—"
        latency = f" {obj.last_latency_ms} ms" if obj.last_latency_ms is not None else ""
        when = timezone.localtime(obj.last_check_at).strftime("%m-%d %H:%M") if obj.last_check_at else "never"
        return format_html("{}{} <small>{}</small>", _health_badge(obj.health_status), latency, when)

    @admin.display(description="last error")
    def last_error_short(self, obj: Deployment) -> str:
        text = obj.last_error or ""
        if len(text) <= 40:
            return text or "—"
        return format_html('<span title="{}">{}…</span>', text, text[:39])


class ModelPriceForm(forms.ModelForm):
    class Meta:
        model = ModelPrice
        fields = ["input_per_million", "cached_input_per_million", "output_per_million", "effective_from"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # "From now" unless told otherwise; the hidden initial keeps an untouched blank row from counting as a change.
        self.fields["effective_from"].initial = timezone.now
        self.fields["effective_from"].show_hidden_initial = True
        if self.instance.pk is not None:  # a past row, shown read-only
            show_money_read_only(self, ("input_per_million", "cached_input_per_million", "output_per_million"))


class ModelPriceInline(admin.TabularInline):
    """Price history: past rows are read-only; a price change is a new row from its effective time on."""

    model = ModelPrice
    form = ModelPriceForm
    formfield_overrides = DECIMAL_WIDGETS
    extra = 1
    can_delete = False
    verbose_name = "price (per million tokens)"
    verbose_name_plural = "prices (per million tokens); to change a price add a row"
    fields = ["input_per_million", "cached_input_per_million", "output_per_million", "effective_from", "created_at"]
    readonly_fields = ["created_at"]
    ordering = ["-effective_from"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a past price priced past calls: it stays

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_staff


@admin.register(LLMModel)
class LLMModelAdmin(admin.ModelAdmin):
    list_display = ["name", "strategy", "deployment_count", "current_price", "context_window", "enabled"]
    list_filter = ["enabled", "strategy"]
    search_fields = ["name"]
    inlines = [DeploymentInline, ModelPriceInline]

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        """Price rows are usage's: a new one goes through usage.pricing, the one price write path."""
        if formset.model is not ModelPrice:
            super().save_formset(request, form, formset, change)
            return
        for row in formset.save(commit=False):  # only additions: rows can be neither changed nor deleted
            pricing.save_price(row)

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).prefetch_related("deployments", "prices")

    @admin.display(description="deployments")
    def deployment_count(self, obj: LLMModel) -> int:
        return len(obj.deployments.all())

    @admin.display(description="price in / out per M")
    def current_price(self, obj: LLMModel) -> str:
        now = timezone.now()
        current = next((p for p in obj.prices.all() if p.effective_from <= now), None)  # ordered newest first
        if current is None:
            return "—"
        return f"{money(current.input_per_million)} / {money(current.output_per_million)}"


class DebugForm(forms.Form):
    ACTIONS = [("route", "Route test"), ("preview", "Prompt preview"), ("run", "Execution test")]

    action = forms.ChoiceField(choices=ACTIONS, widget=forms.RadioSelect, initial="run")
    message = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 80}), required=False,
        initial="Say hello in one short sentence.",
        help_text="The user message for prompt preview and execution test. Execution tests are logged with their "
                  "cost and never charged to anyone.",
    )


def _run_debug(action: str, *, agent: Agent, staff_user: Any, content: str) -> AdminDebugLog:
    """Calls usage.debug (owned by the usage app); each returns the AdminDebugLog it wrote."""
    fn = {"route": debug.route_test, "preview": debug.prompt_preview, "run": debug.execution_test}[action]
    kwargs: dict[str, Any] = {"agent": agent, "staff_user": staff_user}
    if action != "route":
        kwargs["messages"] = [{"role": "user", "content": content}]
    if inspect.iscoroutinefunction(fn):
        return async_to_sync(fn)(**kwargs)
    return fn(**kwargs)


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    # Fits 1280 px: temperature and timeout are on the change page.
    list_display = ["slug", "name", "model", "fallback_model", "enabled", "debug_link"]
    list_filter = ["enabled", "model"]
    list_select_related = ["model", "fallback_model"]
    search_fields = ["slug", "name"]
    prepopulated_fields = {"slug": ["name"]}
    formfield_overrides = DECIMAL_WIDGETS
    autocomplete_fields = ["model", "fallback_model"]

    @admin.display(description="debug")
    def debug_link(self, obj: Agent) -> str:
        return format_html('<a href="{}">debug</a>', reverse("admin:agents_agent_debug", args=[obj.pk]))

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict | None = None) -> HttpResponse:
        extra = {"debug_url": reverse("admin:agents_agent_debug", args=[object_id])} if object_id else {}
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), **extra})

    def get_urls(self):
        custom = [path("<int:pk>/debug/", self.admin_site.admin_view(self.debug_view), name="agents_agent_debug")]
        return custom + super().get_urls()

    def debug_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        agent = get_object_or_404(Agent.objects.select_related("model", "fallback_model"), pk=pk)
        if not self.has_change_permission(request, agent):
            raise PermissionDenied
        log = None
        form = DebugForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                log = _run_debug(form.cleaned_data["action"], agent=agent, staff_user=request.user,
                                 content=form.cleaned_data["message"])
            except ImportError:
                messages.error(request, "The debug tools (usage.debug) are not installed.")
            except Exception as exc:  # noqa: BLE001 - an operator's test run shows any failure instead of a 500
                messages.error(request, f"The test failed: {exc}")
        recent = (AdminDebugLog.objects.filter(agent=agent).select_related("staff_user")
                  .order_by("-created_at")[:10])
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Debug {agent.name}",
            "agent": agent,
            "form": form,
            "log": log,
            "log_result": debug_result(log.result) if log else "",
            "log_cost": money(log.cost) if log else "",
            "recent": [(entry, money(entry.cost)) for entry in recent],
        }
        return TemplateResponse(request, "admin/agents/agent/debug.html", context)
