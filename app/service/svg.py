"""Small inline-SVG charts for the service's HTML pages: no plotting library in the serving
image, nothing fetched by the browser (the SVG is part of the page)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

__all__ = ["COLORS", "grouped_bars", "loglog_scatter"]

COLORS = ("#555555", "#1f77b4", "#d62728", "#2ca02c")


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 0.01:
        return f"{value:.2f}"
    return f"{value:.0e}"


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    out = []
    for i, name in enumerate(names):
        out.append(f'<rect x="{x}" y="{y + 16 * i}" width="10" height="10" '
                   f'fill="{COLORS[i % len(COLORS)]}"/>'
                   f'<text x="{x + 14}" y="{y + 9 + 16 * i}" font-size="11">'
                   f"{html.escape(name)}</text>")
    return out


def grouped_bars(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]],
                 *, width: int = 760, y_label: str = "share") -> str:
    """Vertical bars, one group per label and one bar per series (first series grey: the
    reference). Values are shares or counts, drawn on a linear axis from 0."""
    names = list(series)
    top = max([v for vals in series.values() for v in vals] + [1e-12])
    height, left, bottom, head = 300, 56, 80, 28
    plot_w = width - left - 150
    plot_h = height - bottom - head
    group = plot_w / max(len(labels), 1)
    bar = group * 0.8 / max(len(names), 1)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'),
           f"<title>{html.escape(title)}</title>",
           (f'<text x="{left}" y="16" font-size="13" font-weight="bold">'
           f"{html.escape(title)}</text>"),
           (f'<line x1="{left}" y1="{head + plot_h}" x2="{left + plot_w}" '
           f'y2="{head + plot_h}" stroke="#333"/>'),
           f'<line x1="{left}" y1="{head}" x2="{left}" y2="{head + plot_h}" stroke="#333"/>',
           (f'<text x="{left - 6}" y="{head + 4}" font-size="10" text-anchor="end">'
           f"{_fmt(top)}</text>"),
           f'<text x="{left - 6}" y="{head + plot_h}" font-size="10" text-anchor="end">0</text>',
           (f'<text x="12" y="{head + plot_h / 2}" font-size="10" '
           f'transform="rotate(-90 12 {head + plot_h / 2})">{html.escape(y_label)}</text>')]
    for g, label in enumerate(labels):
        x0 = left + g * group + group * 0.1
        for s, name in enumerate(names):
            value = float(series[name][g])
            h = plot_h * value / top if top > 0 else 0.0
            out.append(f'<rect class="bar" x="{x0 + s * bar:.1f}" y="{head + plot_h - h:.1f}" '
                       f'width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
                       f'fill="{COLORS[s % len(COLORS)]}"><title>{html.escape(name)} '
                       f"{html.escape(label)}: {_fmt(value)}</title></rect>")
        cx = left + g * group + group / 2
        out.append(f'<text x="{cx:.1f}" y="{head + plot_h + 12}" font-size="10" '
                   f'text-anchor="end" transform="rotate(-40 {cx:.1f} {head + plot_h + 12})">'
                   f"{html.escape(label)}</text>")
    out += _legend(names, left + plot_w + 12, head)
    out.append("</svg>")
    return "".join(out)


def loglog_scatter(title: str, x: Sequence[float], y: Sequence[float], *, x_label: str,
                   y_label: str, size: int = 380) -> str:
    """Points (x, y) on log-log axes with the y = x line; zeros drawn on the axis floor."""
    positive = [v for v in list(x) + list(y) if v > 0]
    low = min(positive) / 2 if positive else 1e-4
    high = max(positive) * 1.5 if positive else 1.0
    lo, hi = math.log10(low), math.log10(high)
    pad, head = 50, 24
    span = size - pad - 12

    def pos(v: float) -> float:
        return (math.log10(max(v, low)) - lo) / (hi - lo if hi > lo else 1.0) * span

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
           f'width="{size}" height="{size + head}" viewBox="0 0 {size} {size + head}">'),
           f"<title>{html.escape(title)}</title>",
           (f'<text x="{pad}" y="16" font-size="13" font-weight="bold">'
           f"{html.escape(title)}</text>"),
           (f'<rect x="{pad}" y="{head}" width="{span}" height="{span}" fill="none" '
           f'stroke="#333"/>'),
           (f'<line x1="{pad}" y1="{head + span}" x2="{pad + span}" y2="{head}" '
           f'stroke="#999" stroke-dasharray="4 3"/>'),
           (f'<text x="{pad + span / 2}" y="{head + span + 30}" font-size="10" '
           f'text-anchor="middle">{html.escape(x_label)} (log)</text>'),
           (f'<text x="14" y="{head + span / 2}" font-size="10" text-anchor="middle" '
           f'transform="rotate(-90 14 {head + span / 2})">{html.escape(y_label)} (log)</text>'),
           f'<text x="{pad}" y="{head + span + 14}" font-size="9">{_fmt(low)}</text>',
           (f'<text x="{pad + span}" y="{head + span + 14}" font-size="9" text-anchor="end">'
           f"{_fmt(high)}</text>")]
    for a, b in zip(x, y):
        color = COLORS[1] if a > 0 and b > 0 else "#999999"
        out.append(f'<circle class="point" cx="{pad + pos(a):.1f}" '
                   f'cy="{head + span - pos(b):.1f}" r="2" fill="{color}" fill-opacity="0.6"/>')
    out.append("</svg>")
    return "".join(out)
