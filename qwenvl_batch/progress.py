"""Progress display: a tqdm bar on a terminal, a plain line every few seconds elsewhere (logs, CI, nohup).

It counts only the rows this run has to do (rows skipped by resume are not progress), and shows ok / error /
retry counts and tokens so far, because on a job that runs for days those are what tell you it is healthy.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm


@dataclass
class Counters:
    """Live totals of one run; the runner updates them, the display reads them."""

    ok: int = 0
    errors: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    prior_cost: float = 0.0  # spend already in the output from earlier runs
    to_do: int = 0
    currency: str = ""  # of the cost figures (a run has one model and region, so one currency)
    retry_reasons: dict[str, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.ok + self.errors

    def add(self, result: Mapping[str, Any]) -> None:
        """Count one recorded output row (realtime and batch runs count the same way)."""
        self.cost += result.get("cost") or 0.0
        if result["status"] == "ok":
            self.ok += 1
            self.prompt_tokens += result.get("prompt_tokens") or 0
            self.completion_tokens += result.get("completion_tokens") or 0
        else:
            self.errors += 1
            kind = result.get("error_type") or "unknown"
            self.error_types[kind] = self.error_types.get(kind, 0) + 1

    def spend(self) -> tuple[float, float]:
        """(spent so far, projected at the end): the output's spend, this run's included, and the run's average
        cost per row carried to the rows still to do."""
        spent = self.prior_cost + self.cost
        return spent, self.prior_cost + self.cost / max(self.done, 1) * max(self.to_do, self.done)

    def postfix(self, *, short: bool = False) -> str:
        """The live figures; ``short`` keeps spend and projected cost but drops the rest (80-column terminals)."""
        currency = f" {self.currency}" if self.currency else ""
        spent, projected = self.spend()
        if short:
            text = f"ok={self.ok:,} err={self.errors:,}"
            return text + (f" {spent:.2f}→{projected:.2f}{currency}" if self.cost else "")
        tokens = self.prompt_tokens + self.completion_tokens
        text = f"ok={self.ok:,} err={self.errors:,} retries={self.retries:,} tokens={tokens:,}"
        if self.cost:
            text += f" spent={spent:.4f} projected={projected:.4f}{currency}"
        return text


class Progress:
    """Renders ``Counters``; ``mode`` is auto (bar on a TTY, lines otherwise), bar, lines or off."""

    def __init__(self, total: int, counters: Counters, *, mode: str = "auto", stream: TextIO | None = None,
                 every_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.counters = counters
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._clock = clock
        self._start = clock()
        self._last_line = self._start
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        width = terminal_columns(self.stream)
        self._short = width < WIDE_COLUMNS
        # A terminal that reports 0 columns (some CI consoles, emacs shells) still gets an 80-column bar.
        self._bar = tqdm(total=total, unit="row", file=self.stream, dynamic_ncols=width > 0,
                         ncols=None if width > 0 else 80, smoothing=0.05) if mode == "bar" else None

    def update(self, rows: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(self.counters.postfix(short=self._short), refresh=False)
        elif self.mode == "lines" and self._clock() - self._last_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        now = self._clock()
        self._last_line = now
        done, elapsed = self.counters.done, max(now - self._start, 1e-9)
        rate = done / elapsed * 60
        percent = 100.0 * done / self.total if self.total else 100.0
        left = max(self.total - done, 0)
        eta = duration(left / rate * 60) if rate > 0 else "?"
        print(f"[qwenvl-batch] {done:,}/{self.total:,} rows ({percent:.1f}%) {rate:,.0f} rows/min "
              f"elapsed {duration(elapsed)} ETA {eta if left else '0s'} {self.counters.postfix()}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.counters.postfix(short=self._short), refresh=True)
            self._bar.close()
        elif self.mode == "lines" and self.counters.done:
            self._line()


WIDE_COLUMNS = 120  # below this, the bar's postfix is the short one (tqdm's own part takes ~55 columns)


def terminal_columns(stream: TextIO) -> int:
    """The stream's terminal width (0 when the terminal reports none); 80 when it is not a terminal."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size((80, 24)).columns


def duration(seconds: float) -> str:
    """1h04m, 2m03s, 45s: how long, to the precision a person reads at a glance."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 24:
        return f"{hours // 24}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
