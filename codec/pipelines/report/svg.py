"""The report's drawing: inline SVG line plots, bar charts and heatmaps, and the number formats they use.

Every plot is drawn here from the numbers, with no scripts, fonts or images, so a page or a standalone
.svg file (`assignment_svg`) shows exactly what the JSON holds.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codec.errors import ShapeError
from codec.io import write_bytes_atomic

COLORS = {
    "baseline": "#1f77b4",
    "code": "#d62728",
    "torchensemble": "#2ca02c",
    "treenet": "#9467bd",
    "csn": "#ff7f0e",
    "grey": "#7f7f7f",
}
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)


# --------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def pct(value, digits: int = 1) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.{digits}f} %"
    )


def num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------------------
# Inline SVG plots
# --------------------------------------------------------------------------------------------------------


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0) * 0.1
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _tick_label(value: float, fmt) -> str:
    if fmt is not None:
        return fmt(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2g}"
    return f"{value:g}"


@dataclass
class Series:
    """One line of a line plot."""

    name: str
    points: list[tuple[float, float]]
    color: str = "#1f77b4"
    dashed: bool = False
    width: float = 2.0
    opacity: float = 1.0
    legend: bool = True
    labels: list[str] = field(default_factory=list)  # optional text at each point


def _legend_margin(labels: Sequence[str]) -> int:
    """Room right of the plot for a legend of these labels (11 px text is about 6.3 px per character)."""
    return int(max(60, 50 + 6.3 * max((len(label) for label in labels), default=0)))


def _frame(width: int, height: int, title: str) -> list[str]:
    return [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 '
            f'{width} {height}" '
            f'role="img" aria-label="{esc(title)}">'
        ),
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="14" '
        f'font-weight="600">{esc(title)}</text>',
    ]


def line_plot(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 540,
    height: int = 360,
    x_fmt=None,
    y_fmt=None,
    hlines: Sequence[tuple[float, str, str]] = (),
) -> str:
    """Lines with markers; `hlines` are (y, label, color) reference lines."""
    pts = [p for s in series for p in s.points]
    ys = [p[1] for p in pts] + [h[0] for h in hlines]
    if not pts:
        return ""
    left, top, bottom = 70, 32, 50
    right = _legend_margin([s.name for s in series if s.legend])
    pw, ph = width - left - right, height - top - bottom
    xt = nice_ticks(min(0.0, min(p[0] for p in pts)), max(p[0] for p in pts))
    y_low, y_high = min(ys), max(ys)
    pad = (y_high - y_low) * 0.08 or abs(y_high) * 0.01 or 0.01
    yt = nice_ticks(y_low - pad, y_high + pad)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = _frame(width, height, title)
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + ph}" stroke="#eee"/>')
        out.append(
            f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" '
            f'font-size="11">{esc(_tick_label(t, x_fmt))}</text>'
        )
    for t in yt:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" '
            f'font-size="11">{esc(_tick_label(t, y_fmt))}</text>'
        )
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle" '
        f'font-size="12">{esc(x_label)}</text>'
    )
    out.append(
        f'<text x="16" y="{top + ph / 2:.1f}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 16 {top + ph / 2:.1f})">{esc(y_label)}</text>'
    )
    for y, label, color in hlines:
        out.append(
            f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + pw}" y2="{sy(y):.1f}" stroke="{color}" '
            'stroke-dasharray="2 3"/>'
        )
        out.append(
            f'<text x="{left + pw - 4}" y="{sy(y) - 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="{color}">{esc(label)}</text>'
        )
    for s in series:
        if not s.points:
            continue
        if len(s.points) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
            dash = ' stroke-dasharray="6 4"' if s.dashed else ""
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="{s.width}" '
                f'opacity="{s.opacity}"{dash}/>'
            )
        radius = 3 if len(s.points) > 1 else 5  # a lone point (one ensemble) is drawn larger
        for i, (x, y) in enumerate(s.points):
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="{s.color}" '
                f'opacity="{s.opacity}"/>'
            )
            if i < len(s.labels) and s.labels[i]:
                out.append(
                    f'<text x="{sx(x) + 4:.1f}" y="{sy(y) - 5:.1f}" font-size="9" '
                    f'fill="{s.color}">{esc(s.labels[i])}</text>'
                )
    legend = [s for s in series if s.legend]
    for i, s in enumerate(legend):
        y = top + 10 + 18 * i
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(
            f'<line x1="{left + pw + 12}" y1="{y}" x2="{left + pw + 36}" y2="{y}" stroke="{s.color}" '
            f'stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{left + pw + 40}" y="{y + 4}" font-size="11">{esc(s.name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(
    categories: Sequence[str],
    groups: Sequence[tuple[str, Sequence[float], str]],
    *,
    title: str,
    y_label: str,
    stacked: bool = False,
    width: int = 540,
    height: int = 340,
    y_fmt=None,
    log: bool = False,
) -> str:
    """Grouped (or stacked) vertical bars: one cluster per category, one bar (or segment) per group."""
    if not categories or not groups:
        return ""
    left, top, bottom = 75, 32, 70
    right = _legend_margin([g[0] for g in groups])
    pw, ph = width - left - right, height - top - bottom
    values = [[float(v or 0.0) for v in g[1]] for g in groups]
    if stacked:
        high = max(sum(v[i] for v in values) for i in range(len(categories)))
    else:
        high = max(max(v) for v in values)
    if log:
        positive = [x for v in values for x in v if x > 0]
        lo_exp = math.floor(math.log10(min(positive))) if positive else 0
        hi_exp = math.ceil(math.log10(high)) if high > 0 else 1
        yt = [10.0**e for e in range(lo_exp, max(hi_exp, lo_exp + 1) + 1)]
    else:
        yt = nice_ticks(0.0, high or 1.0)

    def sy(y):
        if log:
            y = max(y, yt[0])
            return (
                top + ph - (math.log10(y) - math.log10(yt[0])) / (math.log10(yt[-1]) - math.log10(yt[0])) * ph
            )
        return top + ph - y / yt[-1] * ph

    out = _frame(width, height, title)
    for t in yt:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" '
            f'font-size="11">{esc(_tick_label(t, y_fmt))}</text>'
        )
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(
        f'<text x="16" y="{top + ph / 2:.1f}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 16 {top + ph / 2:.1f})">{esc(y_label)}</text>'
    )
    slot = pw / len(categories)
    bars = 1 if stacked else len(groups)
    bw = slot * 0.75 / bars
    for i, category in enumerate(categories):
        base = sy(yt[0]) if log else sy(0)
        for g, (name, _, color) in enumerate(groups):
            v = values[g][i]
            x = left + slot * i + slot * 0.125 + (0 if stacked else g * bw)
            if stacked:
                top_y = sy(sum(values[h][i] for h in range(g + 1)))
                out.append(
                    f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{bw:.1f}" '
                    f'height="{max(base - top_y, 0):.1f}" fill="{color}">'
                    f"<title>{esc(name)}: {esc(num(v))}</title></rect>"
                )
                base = top_y
            else:
                y = sy(v)
                out.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{max(base - y, 0):.1f}" '
                    f'fill="{color}">'
                    f"<title>{esc(name)}: {esc(num(v))}</title></rect>"
                )
        label_x = left + slot * i + slot / 2
        out.append(
            f'<text x="{label_x:.1f}" y="{top + ph + 14}" text-anchor="end" font-size="10" '
            f'transform="rotate(-30 {label_x:.1f} {top + ph + 14})">{esc(category)}</text>'
        )
    for g, (name, _, color) in enumerate(groups):
        y = top + 10 + 18 * g
        out.append(f'<rect x="{left + pw + 12}" y="{y - 8}" width="14" height="10" fill="{color}"/>')
        out.append(f'<text x="{left + pw + 30}" y="{y + 1}" font-size="11">{esc(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    cell: int = 36,
) -> str:
    """A table of counts as coloured cells (white to dark blue, each cell's count written in it)."""
    rows, cols = len(values), len(values[0]) if values else 0
    if not rows or not cols:
        return ""
    left, top = 90, 60
    width, height = left + cols * cell + 20, top + rows * cell + 30
    high = max(max(float(v) for v in row) for row in values) or 1.0
    out = _frame(width, height, title)
    for j, label in enumerate(col_labels):
        x = left + j * cell + cell / 2
        out.append(
            f'<text x="{x:.1f}" y="{top - 8}" text-anchor="start" font-size="10" transform="rotate(-40 '
            f'{x:.1f} {top - 8})">{esc(label)}</text>'
        )
    for i, label in enumerate(row_labels):
        out.append(
            f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4:.1f}" text-anchor="end" '
            f'font-size="11">{esc(label)}</text>'
        )
        for j in range(cols):
            v = float(values[i][j])
            share = v / high
            r, g, b = (int(255 - share * (255 - c)) for c in (8, 48, 107))
            text_color = "white" if share > 0.55 else "#222"
            x, y = left + j * cell, top + i * cell
            out.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({r},{g},{b})" '
                'stroke="white">'
                f"<title>{esc(row_labels[i])} / {esc(col_labels[j])}: {esc(num(v))}</title></rect>"
            )
            label = f"{int(v)}" if v == int(v) else f"{v:.2g}"
            out.append(
                f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" font-size="10" '
                f'fill="{text_color}">{esc(label)}</text>'
            )
    out.append("</svg>")
    return "\n".join(out)


def assignment_svg(
    table,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    member_names: Sequence[str] | None = None,
    title: str = "test examples won per class",
) -> Path:
    """Write a members x classes assignment table as a standalone SVG heatmap (the report's `heatmap`).

    Raises:
        ShapeError: a table that is not (members, classes), or labels that do not match it.
    """
    counts = np.asarray(table, dtype=np.float64)
    if counts.ndim != 2 or 0 in counts.shape:
        raise ShapeError(f"an assignment table is (members, classes), got shape {counts.shape}")
    members, classes = counts.shape
    class_names = [str(c) for c in (class_names if class_names is not None else range(classes))]
    member_names = [
        str(m)
        for m in (member_names if member_names is not None else (f"member {i}" for i in range(members)))
    ]
    if len(class_names) != classes or len(member_names) != members:
        raise ShapeError(
            f"{len(member_names)} member and {len(class_names)} class labels for a {members} x "
            f"{classes} table"
        )
    svg = heatmap(counts.tolist(), member_names, class_names, title=title)
    path = Path(path)
    write_bytes_atomic(path, (svg + "\n").encode())
    return path


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>" if svg else ""
