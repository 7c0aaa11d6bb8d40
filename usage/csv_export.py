"""The one CSV exporter of usage records, for the API (`/api/usage/records/export.csv`) and the admin action.

Every cell goes through `cell`: spreadsheet apps run a cell that starts with = + - @ (or a tab or CR
before one) as a formula, so user-given text (project, model, error codes...) is prefixed with a quote.
Plain numbers stay numbers. Rows stream: a year of records never sits in memory.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import Any

from django.http import StreamingHttpResponse

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


class _Echo:
    def write(self, value: str) -> str:
        return value


def response(header: list[str], rows: Iterable[Iterable[Any]], filename: str) -> StreamingHttpResponse:
    """A streamed CSV download: the header, then each row with every cell escaped."""
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(header)
        for row in rows:
            yield writer.writerow([cell(value) for value in row])

    streamed = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    streamed["Content-Disposition"] = f'attachment; filename="{filename}"'
    return streamed
