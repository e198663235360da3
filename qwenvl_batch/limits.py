"""Requests-per-minute and tokens-per-minute meters, and the adaptive slow-down on 429s.

"How many at once" is the worker pool (runner.py); "how many per minute" lives here, as separate meters that
are acquired *before* a request starts. Model Studio enforces its limits per second as well as per minute and
punishes fast ramp-ups (``limit_burst_rate``), so the meters space requests evenly instead of letting a full
minute's budget out at once: each one is GCRA-style virtual scheduling (a "theoretical arrival time" that
advances by ``amount / rate`` per acquisition, with at most ``burst_s`` seconds of credit), see
https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm. Waiters queue on a lock; the first one sleeps
until its slot; nothing polls.

On a 429 the whole runner slows (every worker shares the meters), and recovers gradually once 429s stop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Clock = Callable[[], float]


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


@dataclass
class AdaptiveState:
    """What the adaptive controller knows; exposed for progress display and tests."""

    ceiling_rpm: float | None
    current_rpm: float | None
    throttled: int = 0
    last_throttle_at: float = float("-inf")
    learned: bool = False  # no limit configured, and a full minute of accepted requests has measured it


class Limiter:
    """The runner's admission control: RPM and TPM meters plus slow start and back-off on 429s.

    With a configured request limit (the ceiling):

    * slow start: the rate begins at ``start_fraction`` of the ceiling and grows to it over ``ramp_s``;
    * on a 429 (at most once per ``cooldown_s``) the rate drops to ``decrease`` x itself, and a ``Retry-After``
      pauses every worker, not only the one that got it;
    * each ``recover_s`` without a 429 it grows back by ``increase`` x the ceiling, up to the ceiling.

    With no request limit configured, nothing is metered until the first 429. From then on the rate is set from
    what the server actually accepted over the last minute (``learn_margin`` below it) — a measurement of the
    limit, not a guess — and probes upwards by ``learn_increase`` x itself per ``recover_s``. The first 429
    (before a minute has passed) sets half the rate that was sent and not refused, since providers allow short
    bursts of about twice their per-second rate.
    """

    def __init__(
        self,
        *,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        clock: Clock = time.monotonic,
        start_fraction: float = 0.25,
        ramp_s: float = 20.0,
        decrease: float = 0.8,
        increase: float = 0.02,
        cooldown_s: float = 5.0,
        recover_s: float = 2.0,
        learn_margin: float = 0.95,
        learn_increase: float = 0.005,
    ) -> None:
        self._clock = clock
        self.requests = RateMeter(None, burst_s=1.0, clock=clock)
        self.tokens = RateMeter(tokens_per_minute / 60.0 if tokens_per_minute else None, burst_s=1.0, clock=clock)
        self.state = AdaptiveState(ceiling_rpm=requests_per_minute, current_rpm=None)
        self._start = clock()
        self._start_fraction = start_fraction
        self._ramp_s = ramp_s
        self._decrease = decrease
        self._increase = increase
        self._cooldown_s = cooldown_s
        self._recover_s = recover_s
        self._learn_margin = learn_margin
        self._learn_increase = learn_increase
        self._last_increase = self._start
        self._accepted: collections.deque[float] = collections.deque()  # successes, last 60 s
        self._starts: collections.deque[float] = collections.deque()  # requests started, last 5 s
        self._rejected: collections.deque[float] = collections.deque()  # 429s, last 5 s
        if requests_per_minute:
            self._set_rpm(requests_per_minute * start_fraction)

    def _set_rpm(self, rpm: float | None) -> None:
        self.state.current_rpm = rpm
        self.requests.set_rate(rpm / 60.0 if rpm else None)

    async def acquire(self, estimated_tokens: int) -> float:
        """Wait until one request of about ``estimated_tokens`` may start; returns the seconds waited."""
        self._grow()
        waited = await self.requests.acquire(1.0)
        waited += await self.tokens.acquire(float(estimated_tokens))
        _trim(self._starts, self._clock(), 5.0).append(self._clock())
        return waited

    def settle(self, estimated_tokens: int, actual_tokens: int | None) -> None:
        """A request succeeded: count it as accepted, and correct the token meter with the real usage."""
        now = self._clock()
        _trim(self._accepted, now, 60.0).append(now)
        if actual_tokens is not None:
            self.tokens.adjust(float(actual_tokens - estimated_tokens))

    def on_throttle(self, retry_after_s: float | None) -> None:
        """A 429 came back: slow everyone down (once per cooldown), and honour Retry-After for everyone."""
        now = self._clock()
        _trim(self._rejected, now, 5.0).append(now)
        if retry_after_s:
            self.requests.pause_until(now + retry_after_s)
            self.tokens.pause_until(now + retry_after_s)
        if now - self.state.last_throttle_at < self._cooldown_s:
            return
        self.state.last_throttle_at = now
        self.state.throttled += 1
        current = self.state.current_rpm
        if self.state.ceiling_rpm:
            new_rpm = (current or self.state.ceiling_rpm) * self._decrease
        else:
            new_rpm = self._learned_rpm(now, current)
        new_rpm = max(1.0, new_rpm)
        log.debug("rate limited: request rate %.0f → %.0f /min", current or 0, new_rpm)
        self._set_rpm(new_rpm)
        self._last_increase = now

    def _learned_rpm(self, now: float, current: float | None) -> float:
        """No limit configured: what the server accepted tells us its limit.

        Once a full minute has passed, the requests accepted in the last 60 s *are* the per-minute limit (the
        window was full, or we would not be throttled), so the rate goes just below that. Before that, only
        the burst is known: the first 429 starts at half the rate accepted so far (providers allow short bursts
        of about twice the per-second rate), later ones cut multiplicatively.
        """
        elapsed = now - self._start
        accepted = len(self._accepted)
        if elapsed >= 60.0 and accepted >= 5:
            self.state.learned = True
            return accepted * self._learn_margin
        if current is None:  # answers lag by the latency: count what was sent and not (yet) refused
            not_refused = max(len(self._starts) - len(self._rejected), 1)
            return not_refused / max(min(elapsed, 5.0), 1.0) * 60.0 * 0.5
        return current * self._decrease

    def _grow(self) -> None:
        """Slow start towards the ceiling, then additive increase after quiet periods."""
        now = self._clock()
        ceiling, current = self.state.ceiling_rpm, self.state.current_rpm
        if current is None:
            return
        if self.state.throttled == 0 and ceiling:
            progress = min(1.0, (now - self._start) / self._ramp_s) if self._ramp_s else 1.0
            self._set_rpm(ceiling * (self._start_fraction + (1 - self._start_fraction) * progress))
            return
        if not ceiling and not self.state.learned and now - self._start >= 60.0 and len(self._accepted) >= 5:
            # A 429 came within the last minute, so that minute's window was full: what it accepted is the limit.
            self.state.learned = True
            self._set_rpm(max(current, len(self._accepted) * self._learn_margin))
            return
        if now - self._last_increase < self._recover_s or now - self.state.last_throttle_at < self._recover_s:
            return
        self._last_increase = now
        if ceiling:
            self._set_rpm(min(ceiling, current + ceiling * self._increase))
        else:  # probe gently: a per-minute window overshot early is paid for with a minute of 429s
            self._set_rpm(current * (1 + self._learn_increase))


def _trim(events: collections.deque[float], now: float, span_s: float) -> collections.deque[float]:
    """Drop timestamps older than ``span_s``; returns the deque for chaining."""
    while events and events[0] < now - span_s:
        events.popleft()
    return events


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
