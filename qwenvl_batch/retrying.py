"""The retry adapter: policy.py decides what a failure means, this module turns that into tenacity's terms.

One retry layer only (the SDK's own retries are off): attempts are bounded by ``max_attempts`` (or the
decision's own, smaller bound) *and* by ``max_retry_time_s``; waits are exponential backoff with jitter or the
server's Retry-After, whichever is longer, and never longer than what remains of ``max_retry_time_s`` (a server
asking for ``Retry-After: 999999`` or a ``retry_initial_s`` of 1e9 cannot park a row past its budget); a stopping
run ends the retries at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from .config import LimitsConfig
from .errors import JobError
from .policy import Action, Decision, backoff_s, classify

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """The run is stopping: leave this row pending instead of recording it."""


def decision_of(state: RetryCallState) -> Decision:
    """The policy's verdict on the attempt that just failed."""
    outcome = state.outcome
    exc = outcome.exception() if outcome is not None else None
    if exc is None:  # tenacity only asks about failed attempts
        raise RuntimeError("retry decision asked for an attempt that did not fail")
    return classify(exc)


def is_retryable(exc: BaseException) -> bool:
    """Only what the policy calls transient is retried (classify judges any exception and never raises)."""
    if isinstance(exc, (Abandoned, JobError)):  # JobError: the spend cap, or the job's health said stop
        return False
    return classify(exc).action is Action.RETRY


class RetryAdapter:
    """tenacity hooks bound to one run: its limits, whether it is stopping, and what to do before each wait."""

    def __init__(self, limits: LimitsConfig, *, stopping: Callable[[], bool],
                 sleep: Callable[[float], Awaitable[None]],
                 on_retry: Callable[[Decision, int], None]) -> None:
        self.limits = limits
        self.stopping = stopping
        self.sleep = sleep
        self.on_retry = on_retry

    def attempts(self) -> AsyncRetrying:
        """A fresh retry loop for one row."""
        return AsyncRetrying(retry=retry_if_exception(is_retryable), stop=self._should_stop, wait=self._wait_s,
                             before_sleep=self._before_sleep, sleep=self.sleep, reraise=True)

    def _should_stop(self, state: RetryCallState) -> bool:
        decision = decision_of(state)
        limit = min(self.limits.max_attempts, decision.max_attempts or self.limits.max_attempts)
        elapsed = state.seconds_since_start or 0.0
        return self.stopping() or state.attempt_number >= limit or elapsed >= self.limits.max_retry_time_s

    def _wait_s(self, state: RetryCallState) -> float:
        decision = decision_of(state)
        wait = backoff_s(state.attempt_number, initial_s=self.limits.retry_initial_s, max_s=self.limits.retry_max_s)
        return bounded_wait(max(wait, decision.retry_after_s or 0.0), self.limits.max_retry_time_s,
                            state.seconds_since_start or 0.0)

    def _before_sleep(self, state: RetryCallState) -> None:
        decision = decision_of(state)
        self.on_retry(decision, state.attempt_number)
        log.debug("retry %d (%s): %s", state.attempt_number, decision.reason, decision.message[:200])


def bounded_wait(wait_s: float, budget_s: float, elapsed_s: float) -> float:
    """A wait cut to what remains of the row's retry budget (never negative, never NaN): after it the retry loop
    stops on ``max_retry_time_s`` and the row records its last failure instead of sleeping on."""
    remaining = max(budget_s - elapsed_s, 0.0)
    if wait_s != wait_s:  # NaN from a hostile header or a config value that slipped through
        return remaining
    return min(max(wait_s, 0.0), remaining)


async def interruptible_sleep(seconds: float, stop: Callable[[], Awaitable[object]]) -> None:
    """Sleep, waking early when ``stop()`` completes (the run is stopping; the row is then left pending)."""

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop(), timeout=seconds)
