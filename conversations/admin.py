"""Operators' read-mostly view of conversations and messages."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from aiwriter.admin_display import MoneyFieldsMixin, money_column
from conversations.models import Conversation, Message


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ["sequence", "role", "status", "short_content", "model_name", "prompt_tokens", "completion_tokens",
              "cost_display", "created_at"]
    readonly_fields = fields
    ordering = ["sequence"]
    cost_display = money_column("cost", "cost")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        text = obj.content or obj.error_message
        return text if len(text) <= 200 else text[:200] + "…"


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner", "agent", "project", "message_count", "total_tokens", "has_success",
                    "updated_at", "deleted_at"]
    list_filter = ["has_success", "agent", ("deleted_at", admin.EmptyFieldListFilter), "created_at"]
    list_select_related = ["owner", "agent"]
    search_fields = ["title", "owner__username", "project"]
    date_hierarchy = "created_at"
    readonly_fields = ["owner", "agent", "message_count", "total_tokens", "has_success", "created_at", "updated_at"]
    fields = ["title", "owner", "agent", "project", "message_count", "total_tokens", "has_success", "created_at",
              "updated_at", "deleted_at"]
    inlines = [MessageInline]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(MoneyFieldsMixin, admin.ModelAdmin):
    list_display = ["id", "conversation", "role", "status", "model_name", "provider_name", "prompt_tokens",
                    "completion_tokens", "cost_display", "fallback", "created_at"]
    money_fields = ("cost",)
    cost_display = money_column("cost", "cost")
    list_filter = ["status", "role", "fallback", "model_name", "created_at"]
    list_select_related = ["conversation"]
    search_fields = ["content", "conversation__owner__username"]
    raw_id_fields = ["conversation", "reply_to"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
