"""Hand-written inline SVG charts for the HTML report: bars over time (stacked), lines over time (with a dashed
projection), a histogram with marked percentiles, and horizontal bars.

Why no charting library: the report must open with no network, on a phone and a laptop, and print readably in
greyscale. Inline SVG does all three with no JavaScript at all, scales with the page (``viewBox``), and a few
hundred lines of Python are easier to keep than a vendored JS bundle (Plotly's is 3.5 MB, Vega's ~800 KB) and
its upgrade path. Colours are paired with hatch patterns (bars) and dash styles (lines) and differ in lightness,
so series stay apart when printed in black and white.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Values = Sequence[float] | np.ndarray[Any, Any]  # what a chart takes: a list, or a column of numbers

__all__ = ["Series", "empty_chart", "format_number", "hbar_chart", "histogram_chart", "time_bar_chart",
           "time_line_chart"]

WIDTH, HEIGHT = 480, 280  # small viewBox, big text: the text stays ~10 px on a phone, ~16 px on a laptop
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 16, 14, 46
_FONT = 14
_CHAR_W = 7.6  # average glyph width at 14 px in a system sans font, for layout
_DIGIT_W = 9.0  # digits and colons are wider than average (DejaVu Sans: ~8.9 px at 14 px)

# Colour, pattern and dash per series: colours alternate dark/light so neighbours differ in greyscale too.
_COLOURS = ("#1f4e79", "#e69f00", "#009e73", "#d55e00", "#7fb8e0", "#555555", "#cc79a7")
_PATTERNS = (None, "hatch", "dots", "cross", "hlines", "vlines", "back")
_DASHES = (None, "6 3", "2 3", "8 3 2 3", "1 2", "10 4", "4 4")
_MARK_DASHES = ("4 3", "8 3", "2 2")


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_number(value: float, decimals: int | None = None) -> str:
    """Compact axis numbers: 1.2k, 3.4M; small values with 3 significant digits (costs are often 0.0004)."""
    if decimals is not None:
        return f"{value:,.{decimals}f}"
    magnitude = abs(value)
    if magnitude >= 1e9:
        return f"{value / 1e9:.3g}G"
    if magnitude >= 1e6:
        return f"{value / 1e6:.3g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.3g}k"
    if magnitude == 0 or magnitude >= 1:
        return f"{value:,.4g}"
    return f"{value:.3g}"


def _nice_ticks(hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """0 and round steps (1, 2, 2.5, 5 × 10^k) up to at least ``hi``; whole steps only for counts."""
    if not math.isfinite(hi) or hi <= 0:
        return [0.0, 1.0]
    raw = hi / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, math.ceil(step))
    n = math.ceil(hi / step - 1e-9)
    return [i * step for i in range(n + 1)]


_TIME_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
                 2 * 86400, 7 * 86400)


def _time_ticks(lo: float, hi: float, count: int = 5) -> tuple[list[float], str, str]:
    """Round clock times between lo and hi (epoch s), their strftime format, and the axis title's date part."""
    span = max(hi - lo, 1.0)
    multi_day = span > 86400
    count = 3 if multi_day else count  # "12-01 06:00" labels are twice as wide
    step = next((s for s in _TIME_STEPS_S if span / s <= count), _TIME_STEPS_S[-1])
    first = math.ceil(lo / step) * step
    ticks = [float(t) for t in range(int(first), int(hi) + 1, step) if t <= hi] or [lo]  # a sub-second run: its start
    if step >= 86400:
        fmt = "%m-%d"
    elif multi_day:  # hours alone would be ambiguous over several days
        fmt = "%m-%d %H:%M"
    else:
        fmt = "%H:%M:%S" if step < 60 else "%H:%M"
    day_lo, day_hi = time.strftime("%Y-%m-%d", time.gmtime(lo)), time.strftime("%Y-%m-%d", time.gmtime(hi))
    return ticks, fmt, day_lo if day_lo == day_hi else f"{day_lo} to {day_hi}"


@dataclass(frozen=True)
class Series:
    """One named series: bars (``ys`` per bucket) or a line (``xs``/``ys`` points), with an optional dashed
    projection from the last point to ``projection`` (x, y)."""

    name: str
    xs: Values
    ys: Values
    projection: tuple[float, float] | None = None


@dataclass
class _Canvas:
    """One SVG: scales from data to pixels, the plot's elements, axes, legend."""

    chart_id: str
    title: str
    x_lo: float
    x_hi: float
    y_hi: float
    x_title: str
    y_title: str
    legend: list[str] = field(default_factory=list)
    legend_kind: str = "bar"
    y_decimals: int | None = None
    y_integer: bool = False  # counts: no 0.5 tick
    parts: list[str] = field(default_factory=list)
    top: float = _TOP
    left: float = _LEFT

    def __post_init__(self) -> None:
        widest = max(len(format_number(v, self.y_decimals)) for v in self.y_ticks())
        self.left = max(_LEFT, 30 + widest * _CHAR_W)  # room for the rotated axis title and the widest tick label
        self.top = _TOP + self._legend_rows() * 20

    def y_ticks(self) -> list[float]:
        return _nice_ticks(self.y_hi, integer=self.y_integer) if self.y_hi else [0.0]

    def _legend_rows(self) -> int:
        if len(self.legend) < 2:
            return 0
        rows, x = 1, self.left
        for name in self.legend:
            width = 26 + len(name) * _CHAR_W + 14
            if x + width > WIDTH - _RIGHT and x > self.left:
                rows, x = rows + 1, self.left
            x += width
        return rows

    def x(self, value: float) -> float:
        span = (self.x_hi - self.x_lo) or 1.0
        return self.left + (value - self.x_lo) / span * (WIDTH - self.left - _RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - _BOTTOM - value / (self.y_hi or 1.0) * (HEIGHT - _BOTTOM - self.top)

    def rect(self, x0: float, x1: float, y0: float, y1: float, style: int, tip: str) -> None:
        left, right, top, bottom = self.x(x0), self.x(x1), self.y(y1), self.y(y0)
        width = max(right - left - 1.0, 0.8)  # a 1 px gap between neighbouring bars
        attrs = f'x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{max(bottom - top, 0):.1f}"'
        colour = _COLOURS[style % len(_COLOURS)]
        self.parts.append(f'<rect {attrs} fill="{colour}"><title>{_esc(tip)}</title></rect>')
        if _PATTERNS[style % len(_PATTERNS)]:
            self.parts.append(f'<rect {attrs} fill="url(#{self.chart_id}-p{style % len(_PATTERNS)})"/>')

    def line(self, xs: Values, ys: Values, style: int, *, dashed: bool = False) -> None:
        points = " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in zip(xs, ys))
        dash = "5 4" if dashed else _DASHES[style % len(_DASHES)]
        self.parts.append(f'<polyline points="{points}" fill="none" stroke="{_COLOURS[style % len(_COLOURS)]}" '
                          f'stroke-width="{1.6 if dashed else 2.4}"' + (f' stroke-dasharray="{dash}"' if dash else "")
                          + ' stroke-linejoin="round"/>')

    def marker(self, x: float, label: str, index: int) -> None:
        px, y_top = self.x(x), self.top + 4 + index * (_FONT + 3)
        self.parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{self.top:.1f}" y2="{HEIGHT - _BOTTOM}" '
                          f'stroke="#000" stroke-width="1.3" stroke-dasharray="{_MARK_DASHES[index % 3]}"/>')
        anchor = "end" if px > WIDTH * 0.7 else "start"
        dx = -4 if anchor == "end" else 4
        self.parts.append(f'<text x="{px + dx:.1f}" y="{y_top + _FONT:.1f}" text-anchor="{anchor}" '
                          f'class="mark" paint-order="stroke" stroke="#fff" stroke-width="4">{_esc(label)}</text>')

    def _defs(self) -> str:
        cid = self.chart_id
        strokes = {
            "hatch": '<path d="M-1,1 l2,-2 M0,6 l6,-6 M5,7 l2,-2" stroke="#000" stroke-width="1.2" opacity=".55"/>',
            "dots": '<circle cx="3" cy="3" r="1.3" fill="#000" opacity=".6"/>',
            "cross": '<path d="M0,0 l6,6 M6,0 l-6,6" stroke="#000" stroke-width="1" opacity=".5"/>',
            "hlines": '<path d="M0,3 h6" stroke="#000" stroke-width="1.2" opacity=".55"/>',
            "vlines": '<path d="M3,0 v6" stroke="#fff" stroke-width="1.5" opacity=".8"/>',
            "back": '<path d="M-1,5 l2,2 M0,0 l6,6 M5,-1 l2,2" stroke="#fff" stroke-width="1.4" opacity=".8"/>',
        }
        patterns = [f'<pattern id="{cid}-p{i}" width="6" height="6" '
                    f'patternUnits="userSpaceOnUse">{strokes[p]}</pattern>'
                    for i, p in enumerate(_PATTERNS) if p]
        return "<defs>" + "".join(patterns) + "</defs>"

    def _axes(self, x_ticks: list[tuple[float, str]], y_format: int | None) -> list[str]:
        out = []
        bottom = HEIGHT - _BOTTOM
        for value in self.y_ticks():
            py = self.y(value)
            out.append(f'<line x1="{self.left}" x2="{WIDTH - _RIGHT}" y1="{py:.1f}" y2="{py:.1f}" class="grid"/>')
            out.append(f'<text x="{self.left - 6}" y="{py + 4:.1f}" text-anchor="end">'
                       f'{_esc(format_number(value, y_format))}</text>')
        right_of_last = -math.inf
        for value, label in x_ticks:
            px = self.x(value)
            out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{bottom}" y2="{bottom + 5}" stroke="#333"/>')
            half = len(label) * _DIGIT_W / 2
            if px - half < right_of_last + 8 or px + half > WIDTH or px - half < 0:
                continue  # a label that would overlap its neighbour or leave the picture is left out (tick kept)
            right_of_last = px + half
            out.append(f'<text x="{px:.1f}" y="{bottom + 18}" text-anchor="middle">{_esc(label)}</text>')
        out.append(f'<line x1="{self.left}" x2="{WIDTH - _RIGHT}" y1="{bottom}" y2="{bottom}" stroke="#333"/>')
        out.append(f'<text x="{(self.left + WIDTH - _RIGHT) / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle" '
                   f'class="axis">{_esc(self.x_title)}</text>')
        mid = (self.top + bottom) / 2
        out.append(f'<text transform="translate(14 {mid:.0f}) rotate(-90)" text-anchor="middle" '
                   f'class="axis">{_esc(self.y_title)}</text>')
        return out

    def _legend(self) -> list[str]:
        if len(self.legend) < 2:
            return []
        out, x, y = [], float(self.left), _TOP + 2.0
        for i, name in enumerate(self.legend):
            width = 26 + len(name) * _CHAR_W + 14
            if x + width > WIDTH - _RIGHT and x > self.left:
                x, y = float(self.left), y + 20
            colour = _COLOURS[i % len(_COLOURS)]
            if self.legend_kind == "bar":
                out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="20" height="12" fill="{colour}"/>')
                if _PATTERNS[i % len(_PATTERNS)]:
                    out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="20" height="12" '
                               f'fill="url(#{self.chart_id}-p{i % len(_PATTERNS)})"/>')
            else:
                dash = _DASHES[i % len(_DASHES)]
                out.append(f'<line x1="{x:.1f}" x2="{x + 20:.1f}" y1="{y + 6:.1f}" y2="{y + 6:.1f}" '
                           f'stroke="{colour}" stroke-width="2.4"' + (f' stroke-dasharray="{dash}"' if dash else "")
                           + "/>")
            out.append(f'<text x="{x + 26:.1f}" y="{y + 11:.1f}">{_esc(name)}</text>')
            x += width
        return out

    def svg(self, x_ticks: list[tuple[float, str]]) -> str:
        body = [self._defs(), *self._axes(x_ticks, self.y_decimals), *self.parts, *self._legend()]
        return _svg(self.chart_id, self.title, "".join(body))


def _svg(chart_id: str, title: str, body: str, height: int = HEIGHT) -> str:
    return (f'<svg id="{_esc(chart_id)}" class="chart-svg" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-labelledby="{_esc(chart_id)}-t" xmlns="http://www.w3.org/2000/svg" font-size="{_FONT}">'
            f'<title id="{_esc(chart_id)}-t">{_esc(title)}</title>{body}</svg>')


def empty_chart(chart_id: str, title: str, message: str) -> str:
    """A chart-sized box that says why there is nothing to draw (e.g. no rows finished yet)."""
    body = (f'<rect x="1" y="1" width="{WIDTH - 2}" height="{HEIGHT // 2 - 2}" fill="none" stroke="#999" '
            f'stroke-dasharray="4 4"/><text x="{WIDTH / 2}" y="{HEIGHT / 4 + 5}" text-anchor="middle">'
            f"{_esc(message)}</text>")
    return _svg(chart_id, title, body, HEIGHT // 2)


def _time_axis(lo: float, hi: float) -> tuple[list[tuple[float, str]], str]:
    ticks, fmt, day = _time_ticks(lo, hi)
    return [(t, time.strftime(fmt, time.gmtime(t))) for t in ticks], f"time (UTC, {day})"


def time_bar_chart(chart_id: str, title: str, *, start: float, width_s: float, series: Sequence[Series],
                   y_title: str, tip_unit: str, integer: bool = False) -> str:
    """Bars per time bucket, stacked when there are several series (their ``ys`` share the buckets)."""
    count = max((len(s.ys) for s in series), default=0)
    totals = [sum(float(s.ys[i]) for s in series if i < len(s.ys)) for i in range(count)]
    y_hi = _nice_ticks(max(totals, default=0.0), integer=integer)[-1]
    canvas = _Canvas(chart_id, title, start, start + width_s * max(count, 1), y_hi, "", y_title,
                     legend=[s.name for s in series], y_integer=integer)
    for i in range(count):
        base = 0.0
        x0 = start + i * width_s
        for k, s in enumerate(series):
            value = float(s.ys[i]) if i < len(s.ys) else 0.0
            if value > 0:
                when = time.strftime("%H:%M:%S", time.gmtime(x0))
                canvas.rect(x0, x0 + width_s, base, base + value, k, f"{s.name}: {format_number(value)} {tip_unit} "
                                                                     f"from {when} UTC")
                base += value
    x_ticks, canvas.x_title = _time_axis(start, start + width_s * max(count, 1))
    return canvas.svg(x_ticks)


def time_line_chart(chart_id: str, title: str, *, series: Sequence[Series], y_title: str,
                    y_decimals: int | None = None) -> str:
    """Lines over time; a series' projection is drawn dashed from its last point, and noted in the legend."""
    xs = [x for s in series for x in s.xs] + [s.projection[0] for s in series if s.projection]
    ys = [y for s in series for y in s.ys] + [s.projection[1] for s in series if s.projection]
    lo, hi = min(xs), max(xs)
    if hi <= lo:
        hi = lo + 1
    names = [s.name + (" (dashed: projected)" if s.projection else "") for s in series]
    headroom = 1.08 if any(s.projection for s in series) else 1.0  # room for the projected value's label
    canvas = _Canvas(chart_id, title, lo, hi, _nice_ticks(max(ys, default=0.0) * headroom)[-1], "", y_title,
                     legend=names,
                     legend_kind="line", y_decimals=y_decimals)
    for k, s in enumerate(series):
        canvas.line(s.xs, s.ys, k)
        if s.projection:
            canvas.line([s.xs[-1], s.projection[0]], [s.ys[-1], s.projection[1]], k, dashed=True)
            px, py = canvas.x(s.projection[0]), canvas.y(s.projection[1])
            canvas.parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="#fff" stroke="#000"/>'
                                f'<text x="{px - 6:.1f}" y="{py - 7:.1f}" text-anchor="end" class="mark">'
                                f"{_esc(format_number(s.projection[1], y_decimals))}</text>")
    x_ticks, canvas.x_title = _time_axis(lo, hi)
    return canvas.svg(x_ticks)


def histogram_chart(chart_id: str, title: str, *, edges: Values, counts: Values, x_title: str,
                    y_title: str, markers: dict[str, float], overflow_note: str = "", unit: str = "") -> str:
    """Bars over a numeric axis (the bins) and a labelled vertical line per marker (p50, p95, p99)."""
    y_hi = _nice_ticks(max(counts, default=0), integer=True)[-1]
    canvas = _Canvas(chart_id, title, edges[0], edges[-1], y_hi, x_title, y_title, y_integer=True)
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        if count:
            canvas.rect(lo, hi, 0, count, 0, f"{format_number(lo)}–{format_number(hi)}: {count:,} rows")
    for i, (name, value) in enumerate(markers.items()):
        canvas.marker(min(value, edges[-1]), f"{name} {value:,.2f}{unit}", i)
    if overflow_note:
        canvas.parts.append(f'<text x="{WIDTH - _RIGHT}" y="{HEIGHT - _BOTTOM - 6}" text-anchor="end" '
                            f'class="mark">{_esc(overflow_note)}</text>')
    ticks = _nice_ticks(edges[-1])
    x_ticks = [(t, format_number(t)) for t in ticks if t <= edges[-1] + 1e-9]
    return canvas.svg(x_ticks)


def hbar_chart(chart_id: str, title: str, *, items: Sequence[tuple[str, float]], x_title: str,
               decimals: int | None = None) -> str:
    """One horizontal bar per label (long model names stay readable on a phone), value written at its end."""
    label_w = min(max((len(label) for label, _ in items), default=4) * _CHAR_W + 12, WIDTH * 0.42)
    row_h = 26
    height = 24 + row_h * len(items) + 40
    hi = _nice_ticks(max((v for _, v in items), default=0.0))[-1]
    plot_w = WIDTH - label_w - _RIGHT - 60
    parts: list[str] = []
    for i, (label, value) in enumerate(items):
        y = 16 + i * row_h
        width = max(value / hi * plot_w, 0.8) if hi else 0.8
        shown = label if len(label) * _CHAR_W + 12 <= label_w else label[: int((label_w - 12) / _CHAR_W) - 1] + "…"
        parts.append(f'<text x="{label_w - 6:.1f}" y="{y + 15}" text-anchor="end">{_esc(shown)}'
                     f"<title>{_esc(label)}</title></text>")
        parts.append(f'<rect x="{label_w:.1f}" y="{y + 3}" width="{width:.1f}" height="{row_h - 8}" '
                     f'fill="{_COLOURS[0]}"><title>{_esc(label)}: '
                     f'{_esc(format_number(value, decimals))}</title></rect>')
        parts.append(f'<text x="{label_w + width + 5:.1f}" y="{y + 15}">{_esc(format_number(value, decimals))}</text>')
    base = 16 + row_h * len(items) + 4
    parts.append(f'<line x1="{label_w:.1f}" x2="{label_w + plot_w:.1f}" y1="{base}" y2="{base}" stroke="#333"/>')
    parts.append(f'<text x="{label_w + plot_w / 2:.1f}" y="{base + 26}" text-anchor="middle" class="axis">'
                 f"{_esc(x_title)}</text>")
    return _svg(chart_id, title, "".join(parts), height)
