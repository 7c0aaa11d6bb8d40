"""Staff-only REST API for the AI service layer: providers, models, agents, health, metrics, cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import transaction
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status, viewsets
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from agents import selectors, services
from agents.serializers import (
    AgentSerializer,
    CacheClearSerializer,
    MetricsQuerySerializer,
    ModelSerializer,
    ProviderSerializer,
)
from usage import pricing

# Names may hold dots and colons ("gpt-4o", "qwen2.5:7b"), never slashes.
NAME_IN_URL = r"[^/]+"


class _StaffViewSet(viewsets.ModelViewSet):
    """CRUD whose writes go through agents.services; subclasses name the service functions."""

    permission_classes = [IsAdminUser]
    http_method_names = ["get", "post", "put", "patch", "delete", "head", "options"]
    # The writes, in agents/services.py; each subclass names its own.
    create_service: Callable[..., Any] | None = None
    update_service: Callable[..., Any] | None = None
    delete_service: Callable[..., Any] | None = None

    def perform_create(self, serializer):
        serializer.instance = type(self).create_service(**serializer.validated_data)

    def perform_update(self, serializer):
        serializer.instance = type(self).update_service(serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance):
        type(self).delete_service(instance)


class ProviderViewSet(_StaffViewSet):
    serializer_class = ProviderSerializer
    lookup_field = "name"
    lookup_value_regex = NAME_IN_URL
    create_service = staticmethod(services.create_provider)
    update_service = staticmethod(services.update_provider)
    delete_service = staticmethod(services.delete_provider)

    def get_queryset(self):
        return selectors.provider_list()


class LLMModelViewSet(_StaffViewSet):
    serializer_class = ModelSerializer
    lookup_field = "name"
    lookup_value_regex = NAME_IN_URL
    create_service = staticmethod(services.create_model)
    update_service = staticmethod(services.update_model)
    delete_service = staticmethod(services.delete_model)

    def get_queryset(self):
        return selectors.model_list()

    # The model through agents.services, its price through usage.pricing (the one price write path), in one
    # transaction: a refused price leaves the model unchanged.
    def perform_create(self, serializer):
        fields = dict(serializer.validated_data)
        prices = pricing.take_price_fields(fields, None) or pricing.NO_PRICE
        with transaction.atomic():
            model = services.create_model(**fields)
            pricing.set_model_price(model, **prices)
        serializer.instance = self.get_queryset().get(pk=model.pk)  # fresh prefetch of deployments and price

    def perform_update(self, serializer):
        fields = dict(serializer.validated_data)
        with transaction.atomic():
            prices = pricing.take_price_fields(fields, serializer.instance)
            model = services.update_model(serializer.instance, **fields)
            if prices is not None:
                pricing.set_model_price(model, **prices)
        serializer.instance = self.get_queryset().get(pk=model.pk)


class AgentViewSet(_StaffViewSet):
    serializer_class = AgentSerializer
    lookup_field = "slug"
    lookup_value_regex = NAME_IN_URL
    create_service = staticmethod(services.create_agent)
    update_service = staticmethod(services.update_agent)
    delete_service = staticmethod(services.delete_agent)

    def get_queryset(self):
        return selectors.agent_list()


_ANY = inline_serializer("AiServicesReport", {"status": serializers.CharField(required=False)})


class HealthView(APIView):
    """Overall and per-deployment health: status, response time, error rate, breaker state, last check."""

    permission_classes = [IsAdminUser]

    @extend_schema(responses=_ANY)
    def get(self, request):
        return Response(selectors.service_health())


class MetricsView(APIView):
    """Per-deployment and per-model metrics over ?start=&end= (ISO 8601; default the last hour), with a summary."""

    permission_classes = [IsAdminUser]

    @extend_schema(parameters=[MetricsQuerySerializer], responses=_ANY)
    def get(self, request):
        query = MetricsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(selectors.service_metrics(**query.validated_data))


class CacheClearView(APIView):
    """Clears the response cache by glob pattern ("gpt-4o:*") and tier (memory, redis, all)."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=CacheClearSerializer, responses=inline_serializer(
        "CacheCleared", {"cleared": serializers.DictField(child=serializers.IntegerField())}))
    def post(self, request):
        body = CacheClearSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        cleared = services.clear_response_cache(pattern=body.validated_data.get("pattern") or None,
                                                tier=body.validated_data["tier"])
        return Response({"cleared": cleared}, status=status.HTTP_200_OK)
