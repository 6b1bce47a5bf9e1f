"""Small inline SVG bar charts (no scripts, no external assets) on a log scale, because the
numbers that matter here span from exactly zero to 1e-15 to 1."""

from __future__ import annotations

import math
from html import escape

FLOOR = 1e-18  # the bottom of the log axis; exact zeros are drawn as a marker on it
COLORS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")


def bars(
    title: str,
    categories: list[str],
    series: dict[str, list[float | None]],
    threshold: float | None = None,
    width: int = 640,
    height: int = 220,
) -> str:
    """Grouped bars: one group per category, one bar per series."""
    left, right, top, bottom = 56, 12, 28, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs if v]
    top_exp = max(0, math.ceil(math.log10(max(values)))) if values else 0
    bottom_exp = math.floor(math.log10(FLOOR))

    def y(v: float) -> float:
        e = math.log10(max(v, FLOOR))
        return top + plot_h * (top_exp - e) / (top_exp - bottom_exp)

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>',
    ]
    for e in range(bottom_exp, top_exp + 1, 3):
        yy = y(10.0**e)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{yy + 3:.1f}" class="tick" text-anchor="end">1e{e}</text>')
    if threshold:
        yy = y(threshold)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" class="threshold"/>')
        parts.append(
            f'<text x="{width - right}" y="{yy - 3:.1f}" class="tick" text-anchor="end">threshold {threshold:g}</text>'
        )
    n_series = max(1, len(series))
    group_w = plot_w / max(1, len(categories))
    bar_w = max(2.0, min(18.0, group_w * 0.8 / n_series))
    for ci, category in enumerate(categories):
        x0 = left + ci * group_w + (group_w - bar_w * n_series) / 2
        for si, (name, vs) in enumerate(series.items()):
            v = vs[ci] if ci < len(vs) else None
            if v is None:
                continue
            x = x0 + si * bar_w
            color = COLORS[si % len(COLORS)]
            label = escape(f"{name} {category}: {v:.3g}")
            if v <= 0:
                parts.append(
                    f'<rect x="{x:.1f}" y="{top + plot_h - 3:.1f}" width="{bar_w - 1:.1f}" height="3" '
                    f'fill="none" stroke="{color}" class="zero"><title>{label} (exactly 0)</title></rect>'
                )
            else:
                yy = y(v)
                parts.append(
                    f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bar_w - 1:.1f}" '
                    f'height="{top + plot_h - yy:.1f}" fill="{color}" class="bar"><title>{label}</title></rect>'
                )
        if len(categories) <= 24:
            cx = left + ci * group_w + group_w / 2
            parts.append(
                f'<text x="{cx:.1f}" y="{top + plot_h + 14}" class="tick" text-anchor="middle">'
                f"{escape(category)}</text>"
            )
    lx = left
    for si, name in enumerate(series):
        parts.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{COLORS[si % len(COLORS)]}"/>')
        parts.append(f'<text x="{lx + 14}" y="{height - 5}" class="tick">{escape(name)}</text>')
        lx += 24 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)
