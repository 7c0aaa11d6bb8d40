"""Display helpers shared by the admin modules: money with sensible precision, JSON as readable fields."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db import models
from django.utils.html import escape, format_html, format_html_join
from django.utils.safestring import SafeString

from aiwriter.money import money_str


def money(amount: Decimal | None) -> str:
    """The one money format (aiwriter.money.money_str): `2.5`, not `2.5000000000`."""
    return money_str(amount)


def money_column(field: str, description: str | None = None) -> Callable[[Any, Any], str]:
    """A list/detail column showing a money field in the one format, still sortable by the field."""

    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def show(self: Any, obj: Any) -> str:
        value = getattr(obj, field)
        return "—" if value is None else money(value)

    return show


class MoneyInput(forms.NumberInput):
    """An editable money field shows its value as typed (`7.5`), not with its ten stored places."""

    def format_value(self, value: Any) -> str | None:
        if isinstance(value, Decimal):
            return money(value)
        return super().format_value(value)


class MoneyText(forms.Widget):
    """A money value as text where the admin shows a form field read-only.

    Django's AdminReadonlyField renders a read-only field through its widget when the widget says `read_only`
    (the hook contrib.auth's password hash uses) instead of `display_for_field`, which keeps all ten places.
    """

    read_only = True

    def render(self, name: str, value: Any, attrs: dict[str, Any] | None = None, renderer: Any = None) -> SafeString:
        return escape("—" if value in (None, "") else money(value) if isinstance(value, Decimal) else value)


# Every Decimal field of an admin form edits through MoneyInput (for temperature too: `0.7`, not `0.70`).
DECIMAL_WIDGETS: dict[type[models.Field], dict[str, Any]] = {models.DecimalField: {"widget": MoneyInput}}


def show_money_read_only(form: forms.BaseForm, names: tuple[str, ...]) -> None:
    """A past row of an inline (shown read-only) renders these money fields in the one format."""
    for name in names:
        if name in form.fields:
            form.fields[name].widget = MoneyText()


class MoneyFieldsMixin:
    """Read-only detail pages show each money field through its `<field>_display` column.

    `money_fields` names the model's money fields; each needs a `money_column` attribute `<field>_display`.
    """

    money_fields: tuple[str, ...] = ()

    def get_fields(self, request: Any, obj: Any = None) -> list[Any]:
        fields = super().get_fields(request, obj)  # type: ignore[misc]
        if self.has_change_permission(request, obj):  # type: ignore[attr-defined]
            return fields  # an editable money field stays an input
        return [f"{f}_display" if f in self.money_fields else f for f in fields]


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def json_pre(value: Any) -> str:
    return format_html('<pre class="aiw-json">{}</pre>', pretty_json(value))


def key_value_table(data: dict[str, Any], *, skip: tuple[str, ...] = ()) -> str:
    """One row per key; scalars as text, nested values as indented JSON."""
    rows = [(key, value) for key, value in data.items() if key not in skip]
    if not rows:
        return "—"
    return format_html(
        '<table class="aiw-kv"><tbody>{}</tbody></table>',
        format_html_join("", "<tr><th>{}</th><td>{}</td></tr>",
                         ((key, json_pre(value) if isinstance(value, (dict, list)) else
                           ("—" if value is None else value)) for key, value in rows)),
    )


def messages_list(messages: Any) -> str:
    """Chat messages as role + text blocks."""
    if not isinstance(messages, list) or not messages:
        return "—"
    return format_html(
        '<div class="aiw-messages">{}</div>',
        format_html_join("", '<div class="aiw-message"><strong>{}</strong><div class="aiw-text">{}</div></div>',
                         ((m.get("role", "?") if isinstance(m, dict) else "?",
                           m.get("content", "") if isinstance(m, dict) else m) for m in messages)),
    )


def debug_result(result: Any) -> str:
    """A debug run's result as fields: a prompt preview's filled prompt as messages, the rest as a table (the reply
    and the error are shown on their own)."""
    data = result if isinstance(result, dict) else {"result": result}
    if isinstance(data.get("messages"), list):
        return format_html("{}{}", messages_list(data["messages"]), key_value_table(data, skip=("messages",)))
    return key_value_table(data, skip=("content", "error"))
