"""Requests-per-minute and tokens-per-minute meters, and the runner's admission control around them.

"How many at once" is the worker pool (runner.py); "how many per minute" lives here, as separate meters that
are acquired *before* a request starts. Model Studio enforces its limits per second as well as per minute and
punishes fast ramp-ups (``limit_burst_rate``), so the meters space requests evenly instead of letting a full
minute's budget out at once: each one is GCRA-style virtual scheduling (a "theoretical arrival time" that
advances by ``amount / rate`` per acquisition, with at most ``burst_s`` seconds of credit), see
https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm. Waiters queue on a lock; the first one sleeps
until its slot; nothing polls.

*Which* rates the meters admit is decided by ``rate_control.RateController`` (a pure component: events in,
rates out; its docstring has the algorithm). ``Limiter`` is the thin async adapter: it feeds the controller
what happened to each request and hands the controller's rates to the meters.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping

from .policy import Decision
from .rate_control import Admission, ControlSettings, RateController, refusal_kind

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# When (and at what estimated token cost) the current task's request started: read when its 429 comes back,
# so a refusal is attributed to the right congestion event. Each worker is its own task, so this is per request.
_STARTED: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("qwenvl_started", default=None)

def mark_started(now: float, estimated_tokens: float) -> None:
    """Record when (and at what estimated token cost) the current task's request started."""
    _STARTED.set((now, float(estimated_tokens)))


def started_request(now: float) -> tuple[float, float]:
    """(when the current task's request started, its estimated tokens); (now, 0) if none was recorded."""
    started = _STARTED.get()
    return started if started is not None else (now, 0.0)


class RateMeter:
    """Admits ``rate_per_s`` units per second on average, evenly spaced, with ``burst_s`` seconds of credit."""

    def __init__(self, rate_per_s: float | None, *, burst_s: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst_s = burst_s
        self._clock = clock
        self._tat = clock()  # theoretical arrival time: when all capacity booked so far is used up
        self._not_before = float("-inf")  # a server-imposed pause (Retry-After)
        self._lock = asyncio.Lock()

    def reserve(self, amount: float) -> float:
        """Book ``amount`` units; returns how long the caller must wait before using them (0: now)."""
        if not self.rate_per_s:
            return max(0.0, self._not_before - self._clock())
        now = self._clock()
        self._tat = max(self._tat, now) + amount / self.rate_per_s
        return max(0.0, self._tat - self.burst_s - now, self._not_before - now)

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait for capacity; returns the seconds waited.

        Waiters queue on a FIFO lock and only the head of the queue books a slot and sleeps until it. Booking
        every waiter's slot at once would fix hundreds of future start times at today's rate, so a rate change
        (slow-start ramp, a 429) would only take effect minutes later.
        """
        async with self._lock:
            delay = self.reserve(amount)
            if delay > 0:
                await asyncio.sleep(delay)
        return delay

    def adjust(self, amount: float) -> None:
        """Correct an earlier reservation (estimate vs real usage): positive charges more, negative refunds."""
        if self.rate_per_s:
            self._tat += amount / self.rate_per_s

    def pause_until(self, when: float) -> None:
        """Nobody starts before ``when`` (a server's Retry-After applies to the whole account)."""
        self._not_before = max(self._not_before, when)

    def set_rate(self, rate_per_s: float | None) -> None:
        self.rate_per_s = rate_per_s


class Limiter:
    """The runner's admission control: RPM and TPM meters whose rates come from a ``RateController``.

    With a configured limit the meters start there, evenly spaced (no initial burst), and never exceed it; with
    none they start slowly and double until the server refuses. See rate_control.py for what a 429 does.
    """

    def __init__(self, *, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Clock = time.monotonic, settings: ControlSettings | None = None) -> None:
        self._clock = clock
        self.controller = RateController(requests_per_minute=requests_per_minute,
                                         tokens_per_minute=tokens_per_minute, now=clock(), settings=settings)
        first = self.controller.admission(clock())
        self.requests = RateMeter(first.requests_per_s, burst_s=1.0, clock=clock)
        self.tokens = RateMeter(first.tokens_per_s, burst_s=1.0, clock=clock)
        for meter in (self.requests, self.tokens):  # no credit at the start: the first second is spaced too
            if meter.rate_per_s:
                meter.adjust(meter.rate_per_s * meter.burst_s)
        self._lock = asyncio.Lock()
        self.throttled = 0

    @property
    def admission(self) -> Admission:
        """The controller's rates right now (for progress display)."""
        return self.controller.admission(self._clock())

    def book(self, estimated_tokens: float) -> float:
        """Book one request of about ``estimated_tokens`` at the controller's current rates; returns the wait."""
        now = self._clock()
        admission = self.controller.admission(now)
        for meter, rate in ((self.requests, admission.requests_per_s), (self.tokens, admission.tokens_per_s)):
            meter.set_rate(rate)
            meter.pause_until(admission.paused_until)
        return max(self.requests.reserve(1.0), self.tokens.reserve(float(estimated_tokens)))

    def sent(self, estimated_tokens: float) -> None:
        """The request is about to go out: the controller counts it (goodput is starts minus refusals)."""
        now = self._clock()
        self.controller.started(now, float(estimated_tokens))
        mark_started(now, estimated_tokens)

    async def acquire(self, estimated_tokens: int) -> float:
        """Wait until one request of about ``estimated_tokens`` may start; returns the seconds waited.

        Only the head of the queue books a slot (under the lock) and sleeps until it, so a rate change (a 429,
        slow start) applies to the very next request rather than to slots booked minutes ahead.
        """
        async with self._lock:
            delay = self.book(estimated_tokens)
            if delay > 0:
                await asyncio.sleep(delay)
        self.sent(estimated_tokens)
        return delay

    def settle(self, estimated_tokens: int, actual_tokens: int | None,
               headers: Mapping[str, str] | None = None) -> None:
        """A request succeeded: correct the token meter with the real usage; its rate-limit headers state limits."""
        self.controller.accepted(self._clock(), headers=headers)
        if actual_tokens is not None:
            self.tokens.adjust(float(actual_tokens - estimated_tokens))

    def on_failure(self, decision: Decision) -> None:
        """A failed attempt that will be retried: a 429 steers the rates, a connection failure only counts."""
        if decision.error_type == "rate_limit":
            self.on_throttle(decision.retry_after_s, code=decision.code)
        elif decision.error_type in ("connection", "timeout"):
            now = self._clock()
            self.controller.failed(now, tokens=started_request(now)[1])

    def on_throttle(self, retry_after_s: float | None, *, code: str | None = None, tokens: float | None = None,
                    started_at: float | None = None) -> None:
        """A 429 came back: the controller cuts (or counts it), and a Retry-After holds every worker."""
        now = self._clock()
        started = started_request(now)
        started_at = started[0] if started_at is None else started_at
        tokens = started[1] if tokens is None else tokens
        before = self.controller.admission(now)
        self.controller.refused(now, started_at=started_at, tokens=tokens, kind=refusal_kind(code),
                                retry_after_s=retry_after_s)
        after = self.controller.admission(now)
        self.throttled += 1
        if after != before:
            log.debug("rate limited (%s): %s/min, %s tokens/min", code or "429", _per_min(after.requests_per_s),
                      _per_min(after.tokens_per_s))


def _per_min(rate_per_s: float | None) -> str:
    return "unmetered" if rate_per_s is None else f"{rate_per_s * 60:.0f}"


class ByteBudget:
    """Bounds the image bytes held in memory by requests in flight (read, base64-encoded, awaiting retries).

    Concurrency alone does not bound memory: 512 requests of 5 MB scans are 2.5 GB of base64. A request larger
    than the whole budget is still admitted when nothing else is in flight, so it cannot wait forever.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self._changed = asyncio.Condition()

    async def acquire(self, amount: int) -> None:
        if amount <= 0:
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + amount <= self.max_bytes)
            self.used += amount
            self.peak = max(self.peak, self.used)

    def release(self, amount: int) -> None:
        if amount <= 0:
            return
        self.used -= amount
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class SpendMeter:
    """The spend cap: a request may start only if committed spend plus the worst case of everything in flight
    (this request included) stays within ``cap``. Worst case = the request's estimated prompt and its maximum
    completion at the price of its tier, so the cap holds even if every request in flight answers at full length.
    """

    def __init__(self, cap: float | None, committed: float = 0.0) -> None:
        self.cap = cap
        self.committed = committed  # spend already in the output (earlier runs) plus this run's answers
        self.in_flight = 0.0

    async def ready(self, worst_case: float) -> None:
        """Called before ``reserve``: a meter shared by a cluster (qwenvl_batch.ray) fetches its share of the cap
        here; a local meter has the whole cap already."""

    def reserve(self, worst_case: float) -> bool:
        """Book ``worst_case`` for one attempt; False if that could break the cap (nothing is booked then)."""
        if self.cap is not None and self.committed + self.in_flight + worst_case > self.cap + 1e-12:
            return False
        self.in_flight += worst_case
        return True

    def release(self, worst_case: float, actual: float) -> None:
        """The attempt is over: drop its booking and add what it really cost."""
        self.in_flight = max(0.0, self.in_flight - worst_case)
        self.committed += actual
