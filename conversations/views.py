"""REST for conversations, messages and memory. Thin: parse, call a service or selector, render."""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view, inline_serializer
from rest_framework import status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from aiwriter.errors import ApiError
from conversations import memory, selectors, services
from conversations.generation import outcome_error, run_exchange
from conversations.serializers import (
    ConversationCreatedSerializer,
    ConversationCreateInput,
    ConversationListQuery,
    ConversationSerializer,
    ConversationUpdateInput,
    MemoryHitSerializer,
    MessageCreateInput,
    MessageSerializer,
)

logger = logging.getLogger(__name__)

# A frame to the group must never hold a REST reply back for long (Redis slow or down): best effort.
GROUP_SEND_TIMEOUT_SECONDS = 1.0


def _group_emit(conversation_id: int):
    """Frames of a REST-run reply to the conversation's websocket group, best effort: an open chat page
    (which asked for a retry over REST) streams it like any reply. The REST response stays the answer."""
    from conversations.consumers import group_name

    layer = get_channel_layer()
    if layer is None:
        return None
    group = group_name(conversation_id)

    async def emit(frame: dict) -> None:
        try:
            await asyncio.wait_for(layer.group_send(group, {"type": "chat.frame", "frame": frame, "origin": ""}),
                                   GROUP_SEND_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - a lost frame only costs the live view; the reply is stored
            logger.warning("retry frame to %s not sent", group)

    return emit


def _reply_response(request, exchange: services.Exchange, *, live: bool = False) -> Response:
    """Runs the exchange (unless it is a replay) and renders the reply, or its failure in the error shape.

    `live`: its frames also go to the conversation's websocket group (the chat page's Retry streams).
    """
    reply = exchange.reply
    if not exchange.finished:
        emit = _group_emit(exchange.conversation.pk) if live else None
        reply = async_to_sync(run_exchange)(exchange, user=request.user, entry_point="chat", api_key=request.auth,
                                            emit=emit)
    error = exchange.extra.get("error") or outcome_error(reply)
    if error is not None:
        raise error
    return Response(MessageSerializer(reply).data, status=status.HTTP_200_OK if exchange.replay else 201)


class ConversationListView(GenericAPIView):
    serializer_class = ConversationSerializer

    def get_queryset(self):
        params = ConversationListQuery(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return selectors.conversation_list(user=self.request.user,
                                           include_failed=params.validated_data["include_failed"],
                                           query=params.validated_data["q"].strip())

    @extend_schema(parameters=[ConversationListQuery], responses=ConversationSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(ConversationSerializer(page, many=True).data)

    @extend_schema(request=ConversationCreateInput,
                   responses={200: ConversationCreatedSerializer, 201: ConversationCreatedSerializer})
    def post(self, request):
        data = ConversationCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        project = data.validated_data.get("project")
        if project is None:
            project = getattr(request.auth, "project", "") or ""
        conversation, created = services.create_conversation(
            user=request.user, agent=services.resolve_agent(data.validated_data["agent"]), project=project,
            title=data.validated_data["title"], api_key=request.auth, new=data.validated_data["new"])
        # A deduplicated create says so (body and header): the caller's title was not applied to it.
        conversation.deduplicated = not created
        return Response(ConversationCreatedSerializer(conversation).data, status=201 if created else 200,
                        headers={"X-Conversation-Deduplicated": "false" if created else "true"})


@extend_schema_view(
    get=extend_schema(operation_id="conversations_detail", responses=ConversationSerializer),
    patch=extend_schema(request=ConversationUpdateInput, responses=ConversationSerializer),
    delete=extend_schema(responses={204: None}),
)
class ConversationDetailView(APIView):
    def get(self, request, conversation_id: int):
        conversation = selectors.conversation_for(user=request.user, conversation_id=conversation_id)
        return Response(ConversationSerializer(conversation).data)

    def patch(self, request, conversation_id: int):
        conversation = selectors.conversation_for(user=request.user, conversation_id=conversation_id)
        data = ConversationUpdateInput(data=request.data)
        data.is_valid(raise_exception=True)
        conversation = services.update_conversation(conversation=conversation, title=data.validated_data["title"])
        return Response(ConversationSerializer(conversation).data)

    def delete(self, request, conversation_id: int):
        conversation = selectors.conversation_for(user=request.user, conversation_id=conversation_id)
        services.delete_conversation(conversation=conversation)
        return Response(status=204)


class MessageListView(GenericAPIView):
    serializer_class = MessageSerializer
    calls_models = True  # the POST runs the model: documents 402/502/504 (aiwriter/openapi.py)

    def get_queryset(self):
        conversation = selectors.conversation_for(user=self.request.user,
                                                  conversation_id=self.kwargs["conversation_id"])
        return selectors.message_list(conversation=conversation)

    @extend_schema(responses=MessageSerializer(many=True))
    def get(self, request, conversation_id: int):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(MessageSerializer(page, many=True).data)

    @extend_schema(request=MessageCreateInput, responses={200: MessageSerializer, 201: MessageSerializer})
    def post(self, request, conversation_id: int):
        conversation = selectors.conversation_for(user=request.user, conversation_id=conversation_id)
        data = MessageCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        exchange = services.begin_exchange(user=request.user, conversation=conversation,
                                           content=data.validated_data["content"],
                                           client_id=data.validated_data.get("client_id"), api_key=request.auth)
        return _reply_response(request, exchange)


class MessageRetryView(APIView):
    calls_models = True
    @extend_schema(request=None, responses={200: MessageSerializer, 201: MessageSerializer})
    def post(self, request, conversation_id: int, message_id: int):
        conversation = selectors.conversation_for(user=request.user, conversation_id=conversation_id)
        message = selectors.message_for(conversation=conversation, message_id=message_id)
        exchange = services.begin_retry(user=request.user, conversation=conversation, message=message,
                                        api_key=request.auth)
        return _reply_response(request, exchange, live=True)


class MemoryView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("q", OpenApiTypes.STR, required=True),
                    OpenApiParameter("k", OpenApiTypes.INT)],
        responses=inline_serializer("MemorySearchResult", {"results": MemoryHitSerializer(many=True)}),
    )
    def get(self, request):
        query = request.query_params.get("q", "").strip()
        if not query:
            raise ApiError("Query parameter `q` is required.", code="bad_request")
        try:
            k = int(request.query_params.get("k", settings.MEMORY_TOP_K))
        except ValueError as exc:
            raise ApiError("`k` must be an integer.", code="bad_request") from exc
        hits = memory.search_memory(user=request.user, query=query[:2000], k=k)
        return Response({"results": MemoryHitSerializer(hits, many=True).data})
