"""Tiny inline-SVG chart helpers for the bench report: line/scatter, step CDF and bar charts.

Every function returns an `<svg>` string meant to sit inside an HTML page (no xmlns, no external
fonts, no scripts), so a report opens offline. All text passes through `esc`. Charts take plain
numbers; units belong in the axis labels the caller passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

# Okabe-Ito: distinguishable for the common forms of colour blindness.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
WIDTH, HEIGHT = 760, 360
# Plot-area margins in px: left holds y tick labels, right holds the legend.
LEFT, RIGHT, TOP, BOTTOM = 64, 170, 34, 48


def esc(text: object) -> str:
    return escape(str(text), quote=True)


def fmt_num(v: float) -> str:
    """Short human tick/value text: 12,000 / 3.5 / 0.0042."""
    if v == 0:
        return "0"
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}"


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    labels: list[str] = field(default_factory=list)  # per-point annotations (optional)
    markers: bool = True
    step: bool = False  # draw as a right-continuous step function (CDFs)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] with a 1/2/5 × 10^k step."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _domain(values: Sequence[float], zero: bool) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if zero and lo >= 0:
        lo = 0.0
    if hi <= lo:  # one value: give it some room either side
        pad = abs(hi) * 0.5 or 1.0
        lo, hi = lo - (0 if zero and lo == 0 else pad), hi + pad
    ticks = nice_ticks(lo, hi)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else (hi - lo)
    # Snap the ends outward to whole steps so the extreme points sit on the grid, not the frame.
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step


class _Frame:
    """Maps data coordinates to pixels for one plot area."""

    def __init__(self, xd: tuple[float, float], yd: tuple[float, float], width: int, height: int):
        self.xd, self.yd = xd, yd
        self.x0, self.x1 = LEFT, width - RIGHT
        self.y0, self.y1 = height - BOTTOM, TOP

    def px(self, x: float) -> float:
        lo, hi = self.xd
        return self.x0 + (x - lo) / ((hi - lo) or 1) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        lo, hi = self.yd
        return self.y0 - (y - lo) / ((hi - lo) or 1) * (self.y0 - self.y1)


def _open(title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(title)}" font-family="sans-serif" font-size="11">',
        f"<title>{esc(title)}</title>",
        f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="13" font-weight="600">{esc(title)}</text>',
    ]


def _axes(
    f: _Frame, x_label: str, y_label: str, x_ticks: Sequence[tuple[float, str]] | None, y_fmt=fmt_num
) -> list[str]:
    out = []
    for v in nice_ticks(*f.yd):
        y = f.py(v)
        out.append(f'<line x1="{f.x0}" y1="{y:.1f}" x2="{f.x1}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{f.x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(y_fmt(v))}</text>')
    ticks = x_ticks if x_ticks is not None else [(v, fmt_num(v)) for v in nice_ticks(*f.xd)]
    for v, text in ticks:
        x = f.px(v)
        out.append(f'<line x1="{x:.1f}" y1="{f.y0}" x2="{x:.1f}" y2="{f.y0 + 4}" stroke="#555"/>')
        out.append(f'<text x="{x:.1f}" y="{f.y0 + 16}" text-anchor="middle">{esc(text)}</text>')
    out.append(f'<line x1="{f.x0}" y1="{f.y0}" x2="{f.x1}" y2="{f.y0}" stroke="#555"/>')
    out.append(f'<line x1="{f.x0}" y1="{f.y0}" x2="{f.x0}" y2="{f.y1}" stroke="#555"/>')
    mid_x, mid_y = (f.x0 + f.x1) / 2, (f.y0 + f.y1) / 2
    out.append(f'<text x="{mid_x:.0f}" y="{f.y0 + 36}" text-anchor="middle">{esc(x_label)}</text>')
    out.append(
        f'<text x="14" y="{mid_y:.0f}" text-anchor="middle" transform="rotate(-90 14 {mid_y:.0f})">'
        f"{esc(y_label)}</text>"
    )
    return out


def _legend(names: Sequence[str], width: int, height: int) -> list[str]:
    out = []
    x, room = width - RIGHT + 14, max(1, (height - TOP - 8) // 18)
    for i, name in enumerate(names):
        y = TOP + 8 + i * 18
        if i == room - 1 and len(names) > room:
            out.append(f'<text x="{x}" y="{y + 1}">… {len(names) - i} more</text>')
            break
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<rect x="{x}" y="{y - 8}" width="12" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 18}" y="{y + 1}">{esc(name[:24])}</text>')
    return out


def _path(f: _Frame, pts: Sequence[tuple[float, float]], step: bool) -> str:
    # A CDF rises from zero at its first value; without this the step would start mid-air.
    coords: list[tuple[float, float]] = [(pts[0][0], f.yd[0])] if step else []
    for i, (x, y) in enumerate(pts):
        if step and i:  # horizontal run at the previous level, then the jump
            coords.append((x, pts[i - 1][1]))
        coords.append((x, y))
    d = " ".join(f"{'M' if i == 0 else 'L'}{f.px(x):.1f},{f.py(y):.1f}" for i, (x, y) in enumerate(coords))
    return d


def line_chart(
    series: Sequence[Series],
    title: str,
    x_label: str,
    y_label: str,
    *,
    x_ticks: Sequence[tuple[float, str]] | None = None,
    y_domain: tuple[float, float] | None = None,
    zero: bool = True,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Lines (or steps) through each series' points, with markers, axes, ticks and a legend.

    `x_ticks` replaces numeric x ticks with (position, text) pairs for categorical axes.
    """
    clean = [
        Series(
            s.name,
            [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)],
            s.labels if len(s.labels) == len(s.points) else [],
            s.markers,
            s.step,
        )
        for s in series
    ]
    xs = [x for s in clean for x, _ in s.points]
    ys = [y for s in clean for _, y in s.points]
    if x_ticks:
        positions = [p for p, _ in x_ticks]
        xd = (min(positions) - 0.5, max(positions) + 0.5)
    else:
        xd = _domain(xs, zero)
    f = _Frame(xd, y_domain or _domain(ys, zero), width, height)
    out = _open(title, width, height) + _axes(f, x_label, y_label, x_ticks)
    for i, s in enumerate(clean):
        if not s.points:
            continue
        colour = PALETTE[i % len(PALETTE)]
        if len(s.points) > 1:
            out.append(f'<path d="{_path(f, s.points, s.step)}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        for j, (x, y) in enumerate(s.points):
            if s.markers or len(s.points) == 1:
                out.append(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3.2" fill="{colour}"/>')
            if s.labels and s.labels[j]:
                out.append(
                    f'<text x="{f.px(x) + 5:.1f}" y="{f.py(y) - 6:.1f}" font-size="10" fill="{colour}">'
                    f"{esc(s.labels[j])}</text>"
                )
    out += _legend([s.name for s in clean], width, height)
    out.append("</svg>")
    return "\n".join(out)


def cdf_points(values: Sequence[float], max_points: int | None = None) -> list[tuple[float, float]]:
    """Empirical CDF (x, fraction ≤ x) of the finite values; with `max_points`, an evenly spaced subset
    of ranks that always keeps the first and last (fraction 1.0) points."""
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    n = len(xs)
    pts = [(x, (i + 1) / n) for i, x in enumerate(xs)]
    if max_points is not None and n > max_points >= 2:
        idx = sorted({round(k * (n - 1) / (max_points - 1)) for k in range(max_points)})
        pts = [pts[i] for i in idx]
    return pts


def cdf_chart(series: Sequence[Series], title: str, x_label: str, *, width: int = WIDTH, height: int = HEIGHT) -> str:
    """Step CDFs; series points are (value, fraction) as `cdf_points` returns (or percentile points)."""
    return line_chart(
        series, title, x_label, "fraction of requests ≤ x", y_domain=(0.0, 1.0), width=width, height=height
    )


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float | None],
    title: str,
    y_label: str,
    *,
    y_max: float | None = None,
    value_fmt=fmt_num,
    width: int = 560,
    height: int = 300,
) -> str:
    """Vertical bars, one per label, value printed above each; None values draw no bar."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else _domain(finite + [0.0], True)[1]
    n = max(len(labels), 1)
    f = _Frame((-0.5, n - 0.5), (0.0, top or 1.0), width, height)
    f.x1 = width - 20  # bars need no legend column
    ticks = [(i, str(lab)) for i, lab in enumerate(labels)]
    out = _open(title, width, height) + _axes(f, "", y_label, ticks, value_fmt)
    slot = (f.x1 - f.x0) / n
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        x, y = f.px(i) - slot * 0.35, f.py(max(0.0, min(v, f.yd[1])))
        out.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{f.y0 - y:.1f}" fill="{PALETTE[0]}"/>'
        )
        out.append(f'<text x="{f.px(i):.1f}" y="{y - 4:.1f}" text-anchor="middle">{esc(value_fmt(v))}</text>')
    out.append("</svg>")
    return "\n".join(out)
