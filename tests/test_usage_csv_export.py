"""The usage CSV export of the API and the admin's action are one exporter (usage/csv_export.py): a cell
that a spreadsheet would run as a formula (= + - @, or a tab or CR first) is quoted in both (issue 12, item 9)."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest

from tests.factories import make_user
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db

DANGEROUS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1:A2)", "\t=1+1", "\r=1+1"]


def _records(user) -> list[UsageRecord]:
    return [UsageRecord.objects.create(user=user, project=value, model=value, error_code=value, provider="p",
                                       entry_point="chat", total_tokens=10, cost=Decimal("0.1"))
            for value in DANGEROUS]


def _rows(response) -> list[dict[str, str]]:
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode(), newline="")))


def _assert_escaped(rows: list[dict[str, str]]) -> None:
    assert len(rows) == len(DANGEROUS)
    for row, value in zip(rows, DANGEROUS, strict=True):
        for column in ("project", "model", "error_code"):
            assert row[column] == "'" + value, (column, row[column])
    assert all(row["cost"] == "0.1" for row in rows)  # numbers stay numbers, in the one money format


def test_the_api_export_escapes_formulas(api_client):
    alice = make_user("alice")
    _records(alice)
    api_client.force_authenticate(alice)
    rows = _rows(api_client.get("/api/usage/records/export.csv"))
    _assert_escaped(sorted(rows, key=lambda r: int(r["id"])))


def test_the_admin_export_escapes_formulas(operator_client):
    records = _records(make_user("alice"))
    response = operator_client.post("/admin/usage/usagerecord/", {
        "action": "export_csv", "_selected_action": [r.pk for r in records]})
    _assert_escaped(_rows(response))


def test_both_exports_use_the_one_exporter():
    from usage import admin, csv_export, views

    assert admin.csv_export is csv_export and views.csv_export is csv_export
    assert csv_export.cell("-1.5") == "-1.5" and csv_export.cell(-3) == -3
    assert csv_export.cell("-1+cmd") == "'-1+cmd"
