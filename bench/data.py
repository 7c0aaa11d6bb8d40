"""Bulk usage history for the scale benchmarks: INSERT ... SELECT FROM generate_series, in PostgreSQL.

The column list is built from UsageRecord's fields, so a field added later gets its default (or NULL)
without a change here. Rows spread evenly over the last `days` days.
"""

from __future__ import annotations

import json
import time
from typing import Any

# Expressions for the fields whose values should vary; `g` is the generate_series value.
_EXPRESSIONS = {
    "model": "(ARRAY['bench-fast','bench-stream','bench-cache'])[1 + g %% 3]",
    "provider": "'bench-upstream'",
    "upstream_model": "(ARRAY['bench-fast','bench-stream','bench-cache'])[1 + g %% 3]",
    "prompt_tokens": "10 + g %% 50",
    "completion_tokens": "20 + g %% 100",
    "total_tokens": "30 + g %% 50 + g %% 100",
    "cached_prompt_tokens": "0",
    "cost": "((30 + g %% 150) * 0.000002)::numeric",
    "status": "CASE WHEN g %% 50 = 0 THEN 'error' ELSE 'success' END",
    "entry_point": "(ARRAY['openai','chat','ws'])[1 + g %% 3]",
    "token_source": "'measured'",
    "latency_ms": "50 + g %% 400",
    "ttft_ms": "20 + g %% 100",
    "cached": "(g %% 10 = 0)",
    "charged": "true",
    "metadata": "'{}'::jsonb",
    "idempotency_key": "NULL",
    "synced_at": "NULL",
}


def _literal(field: Any) -> tuple[str, list[Any]]:
    default = field.get_default()
    if default is None:
        return "NULL", []
    if isinstance(default, dict | list):
        return "%s::jsonb", [json.dumps(default)]
    return "%s", [default]


def insert_usage(*, user_id: int, rows: int, days: int = 365, batch: int = 500_000) -> float:
    """Adds `rows` usage records for one user, spread over the last `days` days; returns seconds taken."""
    from django.db import connection, transaction

    from usage.models import UsageRecord

    columns, expressions, params = [], [], []
    for field in UsageRecord._meta.concrete_fields:
        if field.primary_key:
            continue
        name = field.column
        if name == "user_id":
            expr, extra = "%s", [user_id]
        elif name == "created_at":
            # newest first in g order: row g sits g * span / rows seconds before now
            expr, extra = "now() - make_interval(secs => (g::float8 * %s) / %s)", [days * 86400, max(rows, 1)]
        elif field.name in _EXPRESSIONS:
            expr, extra = _EXPRESSIONS[field.name], []
        elif field.null:
            expr, extra = "NULL", []
        else:
            expr, extra = _literal(field)
        columns.append(f'"{name}"')
        expressions.append(expr)
        params.extend(extra)
    table = UsageRecord._meta.db_table
    sql = (f'INSERT INTO "{table}" ({", ".join(columns)}) SELECT {", ".join(expressions)} '
           f"FROM generate_series(%s, %s) AS g")
    started = time.monotonic()
    done = 0
    while done < rows:
        count = min(batch, rows - done)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, [*params, done + 1, done + count])
        done += count
    with connection.cursor() as cursor:
        cursor.execute(f'ANALYZE "{table}"')
    return time.monotonic() - started


def count_usage(user_id: int) -> int:
    from usage.models import UsageRecord

    return UsageRecord.objects.filter(user_id=user_id).count()


def rebuild_rollups(*, user_id: int) -> float:
    """Recomputes the user's DailyRollup rows from their usage records, as the charge path keeps them."""
    from django.conf import settings
    from django.db import connection, transaction

    from usage.models import DailyRollup, UsageRecord

    started = time.monotonic()
    rollup, records = DailyRollup._meta.db_table, UsageRecord._meta.db_table
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f'DELETE FROM "{rollup}" WHERE user_id = %s', [user_id])
        cursor.execute(
            f'INSERT INTO "{rollup}" (user_id, project, agent_id, provider, model, day, calls, errors, cache_hits, '
            f"prompt_tokens, completion_tokens, total_tokens, cost) "
            f"SELECT user_id, project, COALESCE(agent_id, 0), provider, model, "
            f"(created_at AT TIME ZONE %s)::date AS day, count(*), count(*) FILTER (WHERE status <> 'success'), "
            f"count(*) FILTER (WHERE cached), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), "
            f"COALESCE(sum(cost) FILTER (WHERE charged), 0) "
            f'FROM "{records}" WHERE user_id = %s GROUP BY 1, 2, 3, 4, 5, 6',
            [settings.QUOTA_TIME_ZONE, user_id])
        cursor.execute(f'ANALYZE "{rollup}"')
    return time.monotonic() - started
