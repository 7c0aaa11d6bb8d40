"""Small server-side SVG charts with axes and labels (no JavaScript, no CDN).

Values may be int or Decimal; they become floats only as pixel coordinates. Every label is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Union

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from aiwriter.money import money_str

Number = Union[int, float, Decimal]  # noqa: UP007 - readable alias
Formatter = Callable[[Number], str]

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2"]


def plain(value: Number) -> str:
    if isinstance(value, Decimal):
        value = value.normalize()
        return f"{value:,f}" if value == value.to_integral() else f"{value:,.4f}".rstrip("0").rstrip(".")
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:,}"


def compact(value: Number) -> str:
    """Short tick labels: 1.2k, 3.4M; small values keep their decimals."""
    v = float(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= size:
            return f"{v / size:.1f}".rstrip("0").rstrip(".") + suffix
    if v == 0 or abs(v) >= 10:
        return f"{v:.0f}"
    if abs(v) >= 0.01:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    # Two significant digits in fixed notation: money never shows as 3e-05.
    return f"{v:.{-math.floor(math.log10(abs(v))) + 1}f}".rstrip("0").rstrip(".")


def money(value: Number) -> str:
    """The one money format (aiwriter.money) for a chart's numbers."""
    return money_str(Decimal(str(value)))


def percent(value: Number) -> str:
    return f"{float(value) * 100:.0f}%" if float(value) >= 0.1 or float(value) == 0 else f"{float(value) * 100:.1f}%"


def nice_ticks(max_value: float, count: int = 4) -> list[float]:
    """Round tick values from 0 to at least max_value (1, 2, 2.5, 5 × 10^n steps)."""
    if max_value <= 0:
        return [0.0, 1.0]
    raw = max_value / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks, value = [], 0.0
    while value < max_value + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < max_value:
        ticks.append(round(value, 12))
    return ticks


def tick_labels(ticks: Sequence[float], fmt: Formatter) -> list[str]:
    """The formatter's labels, or, when it would print two ticks alike (0.0125 and 0.015 both "0.01"), fixed
    decimals just fine enough to tell every tick apart."""
    labels = [fmt(t) for t in ticks]
    if len(set(labels)) == len(labels):
        return labels
    for places in range(1, 12):
        labels = [f"{t:,.{places}f}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _svg(width: int, height: int, title: str, body: list[str], css_class: str) -> SafeString:
    return mark_safe(  # noqa: S308 - every dynamic piece below went through escape()
        # Natural pixel size (text at 12px), shrinking only when the column is narrower.
        f'<svg class="chart {css_class}" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" style="max-width:100%;height:auto" preserveAspectRatio="xMidYMid meet" '
        f'xmlns="http://www.w3.org/2000/svg" font-family="system-ui, sans-serif" font-size="12">'
        f"<title>{escape(title)}</title>"
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>'
        + "".join(body) + "</svg>"
    )


def line_chart(labels: Sequence[str], series: dict[str, Sequence[Number]], *, title: str, y_label: str = "",
               fmt: Formatter = compact, tip: Formatter = plain, width: int = 560, height: int = 260) -> SafeString:
    """One or more series over the same x labels (e.g. days), with a y axis, ticks, x labels and a legend."""
    left, right, top, bottom = 58, 14, 34, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    all_values = [float(v) for values in series.values() for v in values]
    ticks = nice_ticks(max(all_values, default=0.0))
    y_max = ticks[-1] or 1.0
    n = len(labels)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n if n else 0)

    def y(v: float) -> float:
        return top + plot_h - plot_h * (v / y_max)

    body = [f'<g class="axis" stroke="#cbd5e1">'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>'
            f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/></g>']
    for t, label in zip(ticks, tick_labels(ticks, fmt), strict=True):
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eef2f7"/>'
                    f'<text class="tick" x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end" fill="#475569">'
                    f"{escape(label)}</text>")
    step = max(1, math.ceil(n / 8))  # at most ~8 x labels so they never overlap
    for i, label in enumerate(labels):
        if i % step == 0 or i == n - 1:
            body.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle" fill="#475569">'
                        f"{escape(label)}</text>")
    if y_label:
        body.append(f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle" '
                    f'fill="#475569">{escape(y_label)}</text>')
    if not n:
        body.append(f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
                    f'fill="#94a3b8">no data yet</text>')
    for index, (name, values) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        points = " ".join(f"{x(i):.1f},{y(float(v)):.1f}" for i, v in enumerate(values))
        body.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        for i, v in enumerate(values):
            body.append(f'<circle cx="{x(i):.1f}" cy="{y(float(v)):.1f}" r="2.5" fill="{color}">'
                        f"<title>{escape(labels[i])}: {escape(name)} {escape(tip(v))}</title></circle>")
        lx = left + 8 + index * 130
        body.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{color}"/>'
                    f'<text x="{lx + 14}" y="{height - 5}" fill="#334155">{escape(name)}</text>')
    # Hover targets: one transparent column per x label whose <title> (a native tooltip, no script, CSP-safe)
    # gives every series' value there; easier to hit than the small dots.
    col_w = plot_w / n if n else 0
    for i, label in enumerate(labels):
        column = "; ".join(f"{name} {tip(vals[i])}" for name, vals in series.items() if i < len(vals))
        body.append(f'<rect class="hover" x="{left + col_w * i:.1f}" y="{top}" width="{col_w:.1f}" '
                    f'height="{plot_h}" fill="transparent"><title>{escape(label)}: {escape(column)}</title></rect>')
    return _svg(width, height, title, body, "line-chart")


def bar_chart(items: Sequence[tuple[str, Number]], *, title: str, fmt: Formatter = plain, width: int = 560,
              bar_height: int = 20) -> SafeString:
    """Horizontal bars, largest first as given, the value written at the end of each bar."""
    left, right, top = 140, 90, 32
    height = top + max(len(items), 3) * (bar_height + 6) + 10
    plot_w = width - left - right
    peak = max((float(v) for _, v in items), default=0.0) or 1.0
    body: list[str] = []
    if not items:
        body.append(f'<text x="{width / 2:.0f}" y="{top + 14}" text-anchor="middle" fill="#94a3b8">no data yet</text>')
    for i, (label, value) in enumerate(items):
        y = top + i * (bar_height + 6)
        w = max(1.0, plot_w * float(value) / peak)
        short = label if len(label) <= 22 else label[:21] + "…"
        body.append(
            f'<text x="{left - 6}" y="{y + bar_height * 0.7:.1f}" text-anchor="end" fill="#334155">{escape(short)}'
            f"<title>{escape(label)}</title></text>"
            f'<rect class="bar" x="{left}" y="{y}" width="{w:.1f}" height="{bar_height}" fill="{PALETTE[0]}" rx="2">'
            f"<title>{escape(label)}: {escape(fmt(value))}</title></rect>"
            f'<text x="{left + w + 6:.1f}" y="{y + bar_height * 0.7:.1f}" fill="#334155">{escape(fmt(value))}</text>'
        )
    body.append(f'<line x1="{left}" y1="{top - 4}" x2="{left}" y2="{height - 8}" stroke="#cbd5e1"/>')
    return _svg(width, height, title, body, "bar-chart")
