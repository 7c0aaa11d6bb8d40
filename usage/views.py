"""Usage API: thin views over usage.selectors (reads) and usage.billing (writes); users see their own."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import renderers, serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from agents.models import Agent
from aiwriter.errors import NotFound
from aiwriter.money import money_str, to_cents
from usage import csv_export, debug, selectors
from usage.billing import consumption, keys, ledger
from usage.models import ApiKey
from usage.periods import local_day
from usage.permissions import SessionOnly
from usage.serializers import (
    STATS_SCHEMA,
    AdminDebugLogSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    BalanceSerializer,
    ConsumeSerializer,
    CreditsSerializer,
    DebugRunSerializer,
    LedgerEntrySerializer,
    QuotaQuerySerializer,
    QuotaStatusSerializer,
    UsageQuerySerializer,
    UsageRecordSerializer,
)


class MeView(APIView):
    """Who the request is authenticated as."""

    @extend_schema(responses=inline_serializer("Me", {
        "id": serializers.IntegerField(), "username": serializers.CharField(), "is_staff": serializers.BooleanField(),
    }))
    def get(self, request):
        user = request.user
        return Response({"id": user.pk, "username": user.get_username(), "is_staff": user.is_staff})


# --- Helpers: whose usage, and the filter --------------------------------------------------------------------------

def _subject(request, username: str | None) -> Any:
    """The user whose data is asked for: oneself, or (staff only) `user=<username>`."""
    if not username or username == request.user.get_username():
        return request.user
    if not request.user.is_staff:
        raise PermissionDenied("Only staff can see another user's usage.")
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise NotFound(f"No user '{username}'.")
    return user


def _user_by_name(username: str) -> Any:
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise serializers.ValidationError({"user": f"No user '{username}'."})
    return user


def _filter(request) -> tuple[selectors.UsageFilter, dict]:
    params = UsageQuerySerializer(data=request.query_params)
    params.is_valid(raise_exception=True)
    data = params.validated_data
    subject = _subject(request, data.get("user"))
    agent_id = None
    if data.get("agent"):
        agent = data["agent"]
        agent_id = (Agent.objects.filter(slug=agent).values_list("id", flat=True).first()
                    or (int(agent) if agent.isdigit() else -1))
    end = data.get("end") or local_day()
    start = data.get("start") or end.replace(day=1)  # default: the month so far
    if start > end:
        raise serializers.ValidationError({"start": "start is after end."})
    flt = selectors.UsageFilter(
        user_id=subject.pk, start=start, end=end,
        project=data.get("project"), agent_id=agent_id, model=data.get("model"), provider=data.get("provider"))
    return flt, data


# --- Stats, records, quota, cache hit rate --------------------------------------------------------------------------

class UsageStatsView(APIView):
    """Totals and groups (by_provider, by_model, by_day, …) over local days; answered from the daily rollups."""

    @extend_schema(parameters=[UsageQuerySerializer], responses=STATS_SCHEMA)
    def get(self, request):
        flt, data = _filter(request)
        stats = selectors.usage_stats(flt, group_by=data["group_by"])
        return Response({"start": flt.start.isoformat(), "end": flt.end.isoformat(), **stats})


class UsageRecordsView(APIView):
    pagination_class = LimitOffsetPagination  # for the schema: the list is paginated below

    @extend_schema(parameters=[UsageQuerySerializer], responses=UsageRecordSerializer(many=True))
    def get(self, request):
        flt, _ = _filter(request)
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(selectors.usage_records(flt), request, view=self)
        return paginator.get_paginated_response(UsageRecordSerializer(page, many=True).data)


class CSVRenderer(renderers.BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        # Only errors reach here (the export itself streams): render them as JSON text.
        return renderers.JSONRenderer().render(data)


CSV_COLUMNS = ["id", "created_at", "entry_point", "project", "agent_id", "provider", "model", "prompt_tokens",
               "cached_prompt_tokens", "completion_tokens", "total_tokens", "token_source", "cost", "cost_cents",
               "charged", "cached", "fallback", "status", "error_code", "latency_ms", "workflow_type"]


class UsageRecordsExportView(APIView):
    """The filtered records as CSV, streamed (a year of records never sits in memory)."""

    renderer_classes = [renderers.JSONRenderer, CSVRenderer]

    def handle_exception(self, exc):
        # Errors are JSON (the documented error shape) even when CSV was asked for.
        self.request.accepted_renderer = renderers.JSONRenderer()
        self.request.accepted_media_type = "application/json"
        return super().handle_exception(exc)

    @extend_schema(parameters=[UsageQuerySerializer], responses={(200, "text/csv"): str})
    def get(self, request):
        flt, _ = _filter(request)
        rows = ([r.pk, r.created_at.isoformat(), r.entry_point, r.project, r.agent_id or "", r.provider, r.model,
                 r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens, r.total_tokens, r.token_source,
                 money_str(r.cost), to_cents(r.cost), r.charged, r.cached, r.fallback, r.status, r.error_code,
                 r.latency_ms if r.latency_ms is not None else "", r.workflow_type]
                for r in selectors.usage_records(flt).iterator(chunk_size=2000))
        return csv_export.response(CSV_COLUMNS, rows, f"usage-{flt.start}-{flt.end}.csv")


class QuotaView(APIView):
    @extend_schema(parameters=[QuotaQuerySerializer], responses=QuotaStatusSerializer)
    def get(self, request):
        params = QuotaQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        subject = _subject(request, params.validated_data.get("user"))
        return Response(selectors.quota_status(user=subject, project=params.validated_data["project"]))


class CacheHitRateView(APIView):
    @extend_schema(parameters=[UsageQuerySerializer], responses=STATS_SCHEMA)
    def get(self, request):
        flt, _ = _filter(request)
        return Response({"start": flt.start.isoformat(), "end": flt.end.isoformat(), **selectors.cache_hit_rate(flt)})


# --- Balance, ledger, credits ---------------------------------------------------------------------------------------

class BalanceView(APIView):
    @extend_schema(responses=BalanceSerializer)
    def get(self, request):
        subject = _subject(request, request.query_params.get("user"))
        ledger.ensure_account(subject)  # a new account starts with NEW_USER_CREDIT
        return Response(selectors.balance(user=subject))


class LedgerView(APIView):
    pagination_class = LimitOffsetPagination  # for the schema: the list is paginated below

    @extend_schema(responses=LedgerEntrySerializer(many=True))
    def get(self, request):
        subject = _subject(request, request.query_params.get("user"))
        ledger.ensure_account(subject)
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(selectors.ledger_entries(user=subject), request, view=self)
        return paginator.get_paginated_response(LedgerEntrySerializer(page, many=True).data)


class CreditsView(APIView):
    """Staff: top up (or adjust) a user's credit; written to the ledger with who did it and why."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=CreditsSerializer, responses={201: LedgerEntrySerializer})
    def post(self, request):
        params = CreditsSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        entry = ledger.grant_credits(user=_user_by_name(data["user"]), amount=data["amount"],
                                       reason=data["reason"], created_by=request.user, kind=data["kind"])
        return Response(LedgerEntrySerializer(entry).data, status=status.HTTP_201_CREATED)


class ConsumeView(APIView):
    """Staff key: record tokens another service consumed for a user, once per idempotency key."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=ConsumeSerializer, responses={201: STATS_SCHEMA, 200: STATS_SCHEMA})
    def post(self, request):
        params = ConsumeSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        if data["model"] and not selectors.model_exists(data["model"]):
            raise serializers.ValidationError({"model": f"Unknown model '{data['model']}'."})
        response, created = consumption.record_consumption(
            caller=request.user, user=_user_by_name(data["user"]), workflow_type=data["workflow_type"],
            tokens_used=data["tokens_used"], model=data["model"], metadata=data["metadata"],
            idempotency_key=data["idempotency_key"], project=data["project"])
        return Response({**response, "replayed": not created},
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


# --- Staff debug runs -----------------------------------------------------------------------------------------------

class _DebugView(APIView):
    permission_classes = [IsAdminUser]
    action: str = ""

    @extend_schema(request=DebugRunSerializer, responses=AdminDebugLogSerializer)
    def post(self, request, slug: str):
        agent = Agent.objects.select_related("model", "fallback_model").filter(slug=slug).first()
        if agent is None:
            raise NotFound(f"No agent '{slug}'.")
        params = DebugRunSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        messages = params.validated_data.get("messages")
        if self.action == "route":
            log = debug.route_test(agent=agent, staff_user=request.user)
        elif self.action == "preview":
            log = debug.prompt_preview(agent=agent, staff_user=request.user, messages=messages)
        else:
            log = debug.execution_test(agent=agent, staff_user=request.user, messages=messages)
        return Response(AdminDebugLogSerializer(log).data)


class DebugRouteView(_DebugView):
    action = "route"


class DebugPreviewView(_DebugView):
    action = "preview"


class DebugRunView(_DebugView):
    action = "run"


# --- The user's own API keys ----------------------------------------------------------------------------------------
# Managed from a session only: a request made with an API key gets 403 key_management_requires_session.

class ApiKeyListView(APIView):
    permission_classes = [SessionOnly]

    @extend_schema(responses=ApiKeySerializer(many=True))
    def get(self, request):
        keys = ApiKey.objects.filter(user=request.user).order_by("-created_at", "-id")
        return Response(ApiKeySerializer(keys, many=True).data)

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeySerializer})
    def post(self, request):
        params = ApiKeyCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        api_key, raw = keys.create_api_key(user=request.user, **params.validated_data)
        # The raw key is shown this once; only its hash is stored.
        return Response({**ApiKeySerializer(api_key).data, "key": raw}, status=status.HTTP_201_CREATED)


class ApiKeyDetailView(APIView):
    permission_classes = [SessionOnly]

    @extend_schema(responses={204: None})
    def delete(self, request, key_id: int):
        api_key = ApiKey.objects.filter(user=request.user, pk=key_id).first()
        if api_key is None:  # another user's key looks exactly like a missing one
            raise NotFound("No such API key.")
        keys.revoke_api_key(api_key=api_key)
        return Response(status=status.HTTP_204_NO_CONTENT)
