"""The progress display: bar postfix by terminal width, a bar with no width, and lines with elapsed and ETA."""

from __future__ import annotations

import io

import pytest

from qwenvl_batch import progress as progress_module
from qwenvl_batch.progress import Counters, Progress, duration


def _counters() -> Counters:
    return Counters(ok=40, errors=2, retries=3, prompt_tokens=1000, completion_tokens=200, cost=0.42, prior_cost=1.0,
                    to_do=420, currency="USD")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_short_postfix_keeps_spend_and_projection_within_80_columns() -> None:
    """At 80 columns the postfix still shows spent and projected cost, short enough to fit beside tqdm's bar."""
    text = _counters().postfix(short=True)
    assert "1.42" in text and "USD" in text and len(text) <= 30
    assert "→5.20" in text  # 1.0 before + 0.42 / 42 rows * 420 rows


def test_bar_at_80_columns_shows_spend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar on an 80-column terminal renders a line of at most 80 characters that includes the spend."""
    monkeypatch.setattr(progress_module, "terminal_columns", lambda stream: 80)
    stream = io.StringIO()
    bar = Progress(420, _counters(), mode="bar", stream=stream)
    bar._bar.ncols = 80  # a StringIO has no terminal: fix the width tqdm would have measured
    bar.update(42)
    bar.close()
    last = stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "1.42→" in last and len(last) <= 80


def test_terminal_reporting_width_zero_still_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """Width 0 (some consoles) falls back to an 80-column bar rather than nothing."""
    monkeypatch.setattr(progress_module, "terminal_columns", lambda stream: 0)
    stream = io.StringIO()
    bar = Progress(10, Counters(to_do=10), mode="bar", stream=stream)
    bar.counters.ok = 5
    bar.update(5)
    bar.close()
    assert "5/10" in stream.getvalue()


def test_lines_show_elapsed_and_eta() -> None:
    """Lines mode prints rows, rate, elapsed time and the ETA at the current rate."""
    clock = _Clock()
    stream = io.StringIO()
    counters = Counters(to_do=400)
    lines = Progress(400, counters, mode="lines", stream=stream, every_s=5, clock=clock)
    counters.ok = 100
    clock.now = 60.0
    lines.update()
    text = stream.getvalue()
    assert "100/400 rows" in text and "100 rows/min" in text and "elapsed 1m00s" in text and "ETA 3m00s" in text


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (125, "2m05s"), (3840, "1h04m"), (90000, "1d01h")])
def test_duration_reads_at_a_glance(seconds: float, text: str) -> None:
    """Durations are shown in the two largest units."""
    assert duration(seconds) == text
