"""Progress display: a tqdm bar on a terminal, a plain line every few seconds elsewhere (logs, CI, nohup).

It counts only the rows this run has to do (rows skipped by resume are not progress), and shows ok / error /
retry counts and tokens so far, because on a job that runs for days those are what tell you it is healthy.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

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
    retry_reasons: dict[str, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.ok + self.errors

    def postfix(self) -> str:
        tokens = self.prompt_tokens + self.completion_tokens
        text = f"ok={self.ok:,} err={self.errors:,} retries={self.retries:,} tokens={tokens:,}"
        if self.cost:
            spent = self.prior_cost + self.cost
            projected = self.prior_cost + self.cost / max(self.done, 1) * max(self.to_do, self.done)
            text += f" spent={spent:.4f} projected={projected:.4f}"
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
        self._bar = tqdm(total=total, unit="row", file=self.stream, dynamic_ncols=True,
                         smoothing=0.05) if mode == "bar" else None

    def update(self, rows: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(self.counters.postfix(), refresh=False)
        elif self.mode == "lines" and self._clock() - self._last_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        now = self._clock()
        self._last_line = now
        done, elapsed = self.counters.done, max(now - self._start, 1e-9)
        rate = done / elapsed * 60
        percent = 100.0 * done / self.total if self.total else 100.0
        print(f"[qwenvl-batch] {done:,}/{self.total:,} rows ({percent:.1f}%) {rate:,.0f} rows/min "
              f"{self.counters.postfix()}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.counters.postfix(), refresh=True)
            self._bar.close()
        elif self.mode == "lines" and self.counters.done:
            self._line()
