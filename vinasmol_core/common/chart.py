"""A plain SVG line chart: enough for loss curves, with no plotting library to import (matplotlib
took about 1.6 s to import on two cores, in every training stage and every pipeline run)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    dashed: bool = False  # dashed with a dot at each point: sparse measurements such as evaluations
    markers: bool = False  # a dot at each point of a solid line
    line: bool = True  # False: dots only (a scatter plot)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart_svg(
    series: Sequence[Series], *, title: str, x_label: str, y_label: str, width: int = 720, height: int = 360,
    x_names: Sequence[str] | None = None,
) -> str:
    """An SVG document: each series a polyline in data coordinates mapped to the plot area, grid
    lines at round values, axis labels and a legend. Non-finite points are left out.

    `x_names`: categories at x = 0, 1, ... (e.g. checkpoints in pipeline order), named on the x axis."""
    clean = [(s, [(float(x), float(y)) for x, y in s.points if math.isfinite(x) and math.isfinite(y)])
             for s in series]
    xs = [x for _, pts in clean for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, pts in clean for _, y in pts] or [0.0, 1.0]
    if x_names:
        xs += [0.0, float(len(x_names) - 1)]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad
    left, right, top, bottom = 64, 16, 32, 44
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
    ]
    x_ticks = [(float(i), name) for i, name in enumerate(x_names)] if x_names else [
        (t, _fmt(t)) for t in nice_ticks(x_lo, x_hi)
    ]
    for t, text in x_ticks:
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + ph}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{escape(text)}</text>')
    for t in nice_ticks(y_lo, y_hi):
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(
        f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2:.1f})">{escape(y_label)}</text>'
    )
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(clean))]
    for (s, pts), color in zip(clean, colors, strict=True):
        if not pts:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5,3"' if s.dashed else ""
        if s.line:
            out.append(f'<polyline data-label="{escape(s.label)}" points="{coords}" fill="none" '
                       f'stroke="{color}" stroke-width="1.5"{dash}/>')
        if s.dashed or s.markers or not s.line:
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts)
    # The legend, top right, over a light backdrop so that lines under it stay readable.
    lx = left + pw - 150
    out.append(f'<rect x="{lx - 6}" y="{top + 4}" width="150" height="{14 * len(clean) + 6}" '
               'fill="white" fill-opacity="0.85"/>')
    for i, ((s, _), color) in enumerate(zip(clean, colors, strict=True)):
        y = top + 14 + 14 * i
        out.append(f'<line x1="{lx}" y1="{y - 4}" x2="{lx + 18}" y2="{y - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 24}" y="{y}">{escape(s.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
