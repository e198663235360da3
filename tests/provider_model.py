"""A model of a provider's rate limiter and of the runner's workers, in simulated time.

Drives ``RateController`` (through ``limits.Limiter``'s booking logic: the same ``RateMeter``s on a fake clock)
over minutes of traffic in milliseconds of real time, so the tests can assert the achieved share of the limit
and the share of 429s for each scenario of issue 9.

The provider (reference §3.1): a per-second token bucket refilling at RPM/60 (and TPM/60) with ``burst_s``
seconds of capacity, plus a sliding 60 s window of RPM (and TPM); refused requests consume nothing and come
back after ``refusal_rtt_s``; accepted ones answer after a lognormal latency.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qwenvl_batch.limits import Limiter
from qwenvl_batch.policy import backoff_s
from qwenvl_batch.rate_control import ControlSettings, Kind


@dataclass
class _Bucket:
    rate: float
    burst_s: float
    level: float
    at: float = 0.0

    def refill(self, now: float) -> None:
        self.level = min(self.rate * self.burst_s, self.level + (now - self.at) * self.rate)
        self.at = now


class ProviderModel:
    """Per-second buckets with burst plus per-minute windows, weighted by requests and by tokens."""

    def __init__(self, rpm: float | None, tpm: float | None = None, *, burst_s: float = 1.0,
                 minute_window: bool = True, changes: tuple[tuple[float, float], ...] = (),
                 transient_at: tuple[int, ...] = ()) -> None:
        self.rpm, self.tpm, self.burst_s, self.minute_window = rpm, tpm, burst_s, minute_window
        self.changes = sorted(changes)  # (time, new rpm)
        self.transient_at = set(transient_at)  # refuse the n-th request (0-based) whatever the limits
        self.requests = _Bucket(rpm / 60.0, burst_s, rpm / 60.0 * burst_s) if rpm else None
        self.tokens = _Bucket(tpm / 60.0, burst_s, tpm / 60.0 * burst_s) if tpm else None
        self.minute: deque[tuple[float, float]] = deque()
        self.minute_tokens = 0.0
        self.seen = 0

    def limit_at(self, now: float) -> float | None:
        """The request limit (per minute) in force at ``now``."""
        rpm = self.rpm
        for at, value in self.changes:
            if at <= now:
                rpm = value
        return rpm

    def admit(self, now: float, tokens: float) -> Kind | None:
        """Admit the request (None) or say which limit refuses it."""
        self.seen += 1
        if self.seen - 1 in self.transient_at:
            return "requests"
        rpm = self.limit_at(now)
        if self.requests is not None and rpm is not None and rpm / 60.0 != self.requests.rate:
            self.requests.refill(now)
            self.requests.rate = rpm / 60.0
            self.requests.level = min(self.requests.level, self.requests.rate * self.burst_s)
        while self.minute and self.minute[0][0] <= now - 60.0:
            self.minute_tokens -= self.minute.popleft()[1]
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
        if self.requests is not None and self.requests.level < 1.0:
            return "requests"
        if self.minute_window and rpm is not None and len(self.minute) + 1 > rpm:
            return "requests"
        if self.tokens is not None and self.tokens.level < min(tokens, self.tokens.rate * self.burst_s):
            return "tokens"
        if self.minute_window and self.tpm is not None and self.minute_tokens + tokens > self.tpm:
            return "tokens"
        if self.requests is not None:
            self.requests.level -= 1.0
        if self.tokens is not None:
            self.tokens.level -= tokens
        self.minute.append((now, tokens))
        self.minute_tokens += tokens
        return None


@dataclass
class RunResult:
    """What one simulated run did: every send with its outcome, and the run's duration."""

    sends: list[tuple[float, bool, float]] = field(default_factory=list)  # (time, accepted, tokens)
    duration_s: float = 0.0
    rows: int = 0

    @property
    def refused_share(self) -> float:
        return sum(1 for _, ok, _ in self.sends if not ok) / max(len(self.sends), 1)

    def accepted_per_minute(self, start: float = 0.0, end: float | None = None) -> float:
        """Accepted requests per minute between ``start`` and ``end`` (default: the last accepted send)."""
        times = [t for t, ok, _ in self.sends if ok]
        end = times[-1] if end is None else end
        count = sum(1 for t in times if start <= t <= end)
        return count / max(end - start, 1e-9) * 60.0

    def tokens_per_minute(self, start: float = 0.0) -> float:
        times = [(t, n) for t, ok, n in self.sends if ok]
        end = times[-1][0]
        return sum(n for t, n in times if t >= start) / max(end - start, 1e-9) * 60.0

    def refused_between(self, start: float, end: float) -> float:
        window = [ok for t, ok, _ in self.sends if start <= t <= end]
        return sum(1 for ok in window if not ok) / max(len(window), 1)


def simulate(provider: ProviderModel, *, rows: int, concurrency: int = 64, job_rpm: float | None = None,
             job_tpm: float | None = None, tokens: Callable[[int], float] = lambda i: 200.0,
             latency_s: float = 0.8, sigma: float = 1.0, jitter_s: float = 0.02, latency_max_s: float = 8.0, refusal_rtt_s: float = 0.005,
             retry_after_s: float | None = None, seed: int = 1, max_s: float = 3600.0,
             settings: ControlSettings | None = None) -> RunResult:
    """Run ``rows`` requests through a ``Limiter`` on a fake clock against ``provider``; returns every send."""
    clock = _Clock()
    limiter = Limiter(requests_per_minute=job_rpm, tokens_per_minute=job_tpm, clock=clock, settings=settings)
    rng = random.Random(seed)
    events: list[tuple[float, int, str, int, int]] = []  # (time, seq, what, row, attempt)
    seq = itertools.count()
    result = RunResult(rows=rows)
    waiting: deque[tuple[int, int]] = deque()  # rows queued at the limiter: (row, attempt)
    gate_free_at = 0.0
    sent_at: dict[int, float] = {}
    done = 0
    next_row = 0

    def push(at: float, what: str, row: int, attempt: int) -> None:
        heapq.heappush(events, (at, next(seq), what, row, attempt))

    for _ in range(min(concurrency, rows)):
        push(0.0, "want", next_row, 1)
        next_row += 1
    while events and done < rows:
        now, _, what, row, attempt = heapq.heappop(events)
        clock.now = now
        if now > max_s:
            break
        if what == "want":  # a worker queues at the limiter (FIFO); the head books when the gate is free
            waiting.append((row, attempt))
            if len(waiting) == 1:
                push(max(now, gate_free_at), "book", -1, 0)
        elif what == "book":
            row, attempt = waiting.popleft()
            delay = limiter.book(tokens(row))
            gate_free_at = now + delay
            push(gate_free_at, "send", row, attempt)
            if waiting:
                push(gate_free_at, "book", -1, 0)
        elif what == "send":
            sent_at[row] = now
            limiter.sent(tokens(row))
            push(now + rng.uniform(0.0, jitter_s), "arrive", row, attempt)
        elif what == "arrive":  # the request reaches the provider (network and event-loop jitter)
            refused = provider.admit(now, tokens(row))
            result.sends.append((now, refused is None, tokens(row)))
            if refused is None:
                latency = min(latency_s * math.exp(rng.gauss(0.0, sigma)), latency_max_s)
                push(now + latency, "ok", row, attempt)
            else:
                push(now + refusal_rtt_s, "429" + refused, row, attempt)
        elif what == "ok":
            limiter.settle(int(tokens(row)), int(tokens(row)))
            done += 1
            result.duration_s = now
            if next_row < rows:
                push(now, "want", next_row, 1)
                next_row += 1
        else:  # a 429: the limiter hears it, the worker backs off and retries
            code = "insufficient_quota" if what.endswith("tokens") else "limit_requests"
            limiter.on_throttle(retry_after_s, code=code, tokens=tokens(row), started_at=sent_at[row])
            wait = max(backoff_s(attempt, rng=rng), retry_after_s or 0.0)
            push(now + wait, "want", row, attempt + 1)
    return result


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
