"""Writer endpoints: any authenticated user (bearer key or session). Thin: parse, call one service, render.

DRF views are sync; each runs its one async service call with async_to_sync (under ASGI, on the
server's event loop). A bearer key's allowed models and rate limits apply here as on /v1.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from usage.models import ApiKey
from writer import serializers, services


def _caller(request: Request) -> dict:
    api_key = request.auth if isinstance(request.auth, ApiKey) else None
    return {"user": request.user, "api_key": api_key}


class GenerateTextView(APIView):
    """Writes text for a prompt."""
    calls_models = True  # documents 402/502/504 (aiwriter/openapi.py)

    @extend_schema(request=serializers.GenerateTextInput, responses=serializers.TextOutput)
    def post(self, request: Request) -> Response:
        data = serializers.GenerateTextInput(data=request.data)
        data.is_valid(raise_exception=True)
        args = data.validated_data
        result = async_to_sync(services.generate_text)(
            **_caller(request), target=services.target_name(agent=args.get("agent"), model=args.get("model")),
            prompt=args["prompt"], max_tokens=args.get("max_tokens"))
        return Response(result.as_dict(text=result.text))


class TopicsView(APIView):
    """A list of topic ideas for a subject."""
    calls_models = True  # documents 402/502/504 (aiwriter/openapi.py)

    @extend_schema(request=serializers.TopicsInput, responses=serializers.TopicsOutput)
    def post(self, request: Request) -> Response:
        data = serializers.TopicsInput(data=request.data)
        data.is_valid(raise_exception=True)
        args = data.validated_data
        topics, result = async_to_sync(services.suggest_topics)(
            **_caller(request), target=services.target_name(agent=args.get("agent"), model=args.get("model")),
            subject=args["subject"], count=args["count"])
        return Response(result.as_dict(topics=topics))


class OptimizeView(APIView):
    """Rewrites content for a stated goal."""
    calls_models = True  # documents 402/502/504 (aiwriter/openapi.py)

    @extend_schema(request=serializers.OptimizeInput, responses=serializers.TextOutput)
    def post(self, request: Request) -> Response:
        data = serializers.OptimizeInput(data=request.data)
        data.is_valid(raise_exception=True)
        args = data.validated_data
        result = async_to_sync(services.optimize_content)(
            **_caller(request), target=services.target_name(agent=args.get("agent"), model=args.get("model")),
            content=args["content"], goal=args["goal"])
        return Response(result.as_dict(text=result.text))
