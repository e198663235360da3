"""The SVG charts: axes, ticks and labels people read, and bars/lines where the data says."""

from __future__ import annotations

import re
import time

import pytest

from qwenvl_batch import charts
from qwenvl_batch.charts import Series, _nice_ticks, _time_ticks, format_number
from qwenvl_batch.report_html import _top_items

DAY0 = 1_764_547_200.0  # 2025-12-01 00:00:00 UTC


@pytest.mark.parametrize(("hi", "ticks"), [
    (8, [0, 2, 4, 6, 8]), (9_000, [0, 2_000, 4_000, 6_000, 8_000, 10_000]), (0.00043, [0, 0.0001, 0.0002, 0.0003,
                                                                                   0.0004, 0.0005]),
    (0, [0.0, 1.0]),
])  # fmt: skip
def test_value_ticks_are_round_and_reach_the_maximum(hi: float, ticks: list[float]) -> None:
    """Axis ticks start at 0, step by 1/2/2.5/5 × 10^k and end at or above the largest value."""
    assert _nice_ticks(hi) == pytest.approx(ticks)


def test_count_axes_have_whole_steps() -> None:
    """An axis of counts (errors, rows) never shows a 0.5 tick."""
    assert _nice_ticks(2, integer=True) == [0, 1, 2] and _nice_ticks(2) == [0, 0.5, 1, 1.5, 2]


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (8, "8"), (1_500, "1,500"), (12_000, "12k"), (9_120_000, "9.12M"), (0.000433, "0.000433"), (2.5, "2.5"),
])  # fmt: skip
def test_numbers_are_compact(value: float, text: str) -> None:
    """Axis labels: thousands as k, millions as M, small costs with 3 significant digits."""
    assert format_number(value) == text


def test_time_ticks_of_a_short_run_show_seconds() -> None:
    """A run of two minutes gets ticks on round 30-second times labelled HH:MM:SS, and the date in the title."""
    ticks, fmt, day = _time_ticks(DAY0 + 10, DAY0 + 130)
    assert ticks == [DAY0 + 30, DAY0 + 60, DAY0 + 90, DAY0 + 120] and fmt == "%H:%M:%S" and day == "2025-12-01"


def test_time_ticks_of_a_multi_day_run_name_the_day() -> None:
    """Over several days an hour alone would be ambiguous: labels carry month-day too, and fewer of them fit."""
    ticks, fmt, day = _time_ticks(DAY0 + 3_600, DAY0 + 1.4 * 86_400)
    assert fmt == "%m-%d %H:%M" and day == "2025-12-01 to 2025-12-02"
    assert [time.strftime(fmt, time.gmtime(t)) for t in ticks] == ["12-01 12:00", "12-02 00:00"]
    ticks, fmt, _ = _time_ticks(DAY0 + 3_600, DAY0 + 2.5 * 86_400)  # longer: one tick a day
    assert [time.strftime(fmt, time.gmtime(t)) for t in ticks] == ["12-02", "12-03"]


def test_stacked_bars_and_legend() -> None:
    """Stacked bars are drawn per non-zero cell, each with a tooltip, and a legend names every series."""
    svg = charts.time_bar_chart("e", "Errors", start=DAY0, width_s=60, y_title="errors per 1-minute bucket",
                                tip_unit="errors", series=[Series("server/503", [], [2, 0, 1]),
                                                           Series("input/x", [], [1, 1, 0])])
    assert len(re.findall(r"<rect [^>]*fill=\"#[0-9a-f]{6}\"><title>", svg)) == 4
    assert ">server/503</text>" in svg and ">input/x</text>" in svg
    assert "errors per 1-minute bucket" in svg and "time (UTC, 2025-12-01)" in svg


def test_line_with_projection_is_dashed_and_labelled() -> None:
    """A projection is a dashed segment from the last point, its end value written beside it."""
    svg = charts.time_line_chart("r", "Rows", series=[Series("rows", [DAY0, DAY0 + 600], [0, 600],
                                                             (DAY0 + 1_200, 1_200.0))], y_title="rows")
    assert svg.count("<polyline") == 2 and 'stroke-dasharray="5 4"' in svg and ">1,200</text>" in svg


def test_histogram_marks_percentiles() -> None:
    """Each percentile gets a vertical line and a label with its value and unit."""
    svg = charts.histogram_chart("l", "Latency", edges=[0, 1, 2, 3], counts=[5, 3, 1], x_title="latency (s)",
                                 y_title="rows", markers={"p50": 0.8, "p95": 2.2, "p99": 2.9}, unit=" s")
    for label in ("p50 0.80 s", "p95 2.20 s", "p99 2.90 s"):
        assert label in svg
    assert svg.count('stroke="#000" stroke-width="1.3"') == 3


def test_long_labels_are_cut_with_the_full_text_in_a_tooltip() -> None:
    """A long model or group name is shortened on the bar's label and kept whole in its tooltip."""
    name = "qwen3-vl-plus-2025-09-23-with-a-very-long-deployment-suffix"
    svg = charts.hbar_chart("c", "Cost", items=[(name, 1.0), ("short", 0.5)], x_title="cost (USD)")
    assert f"<title>{name}</title>" in svg and "…" in svg


def test_many_groups_are_summed_past_the_top_fifteen() -> None:
    """Cost by a column with many values shows the 15 largest and one bar for the rest."""
    items = [(f"g{i}", float(i)) for i in range(100)]
    top = _top_items(items)
    assert len(top) == 16 and top[0] == ("g99", 99.0)
    assert top[-1] == ("other (85 groups)", float(sum(range(85))))
    assert _top_items(items[:16]) == items[:16]
