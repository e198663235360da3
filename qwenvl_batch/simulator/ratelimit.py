"""The provider's rate limiting as the simulator enforces it (reference §3.1), in one of two modes:

* ``window`` (the default): RPM/TPM over a sliding minute plus RPM/60, TPM/60 (x ``burst_tolerance``) over a
  sliding second;
* ``bucket``: a token bucket per second, refilled at RPM/60 (TPM/60) and holding ``burst_s`` seconds of credit,
  the way the independent DashScope emulator of issue 9 enforces "600 RPM per second, burst 1 s".

``limit_changes`` scales the limits mid-run (seconds after the first limited request, factor), so a benchmark
can lower the account's limit under a running job.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Literal

from .config import SimError

if TYPE_CHECKING:
    from .config import SimulatorConfig

# Rate limiting: sliding windows, like the provider's RPM/TPM plus per-second checks [S7]
# --------------------------------------------------------------------------------------------------------


class SlidingWindow:
    """Requests and tokens admitted in the last ``span_s`` seconds, with optional caps on both.

    A request that finds the window empty is always admitted, so a per-second cap below one request
    (RPM < 30) or a single request bigger than the token cap still gets through, once per window.
    """

    def __init__(self, span_s: float, max_requests: float | None, max_tokens: float | None) -> None:
        self.span_s = span_s
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self._events: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _expire(self, now: float) -> None:
        """Drop events older than the window."""
        while self._events and self._events[0][0] <= now - self.span_s:
            _, n_tokens = self._events.popleft()
            self._tokens -= n_tokens

    def refusal(self, now: float, n_tokens: int) -> Literal["requests", "tokens"] | None:
        """Which cap admitting this request would break, or None."""
        self._expire(now)
        if not self._events:
            return None
        if self.max_requests is not None and len(self._events) + 1 > self.max_requests:
            return "requests"
        if self.max_tokens is not None and self._tokens + n_tokens > self.max_tokens:
            return "tokens"
        return None

    def rescale(self, factor: float) -> None:
        """The limit changed by ``factor``."""
        if self.max_requests is not None:
            self.max_requests *= factor
        if self.max_tokens is not None:
            self.max_tokens *= factor

    def add(self, now: float, n_tokens: int) -> None:
        """Record an admitted request."""
        self._events.append((now, n_tokens))
        self._tokens += n_tokens


class TokenBucket:
    """Refills at ``rate`` per second up to ``rate x burst_s``; starts full. A request bigger than the whole
    bucket is admitted when the bucket is full, so it cannot be refused forever."""

    def __init__(self, rate: float, burst_s: float) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.level = rate * burst_s
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self.level = min(self.rate * self.burst_s, self.level + (now - self._at) * self.rate)
        self._at = now

    def allows(self, now: float, amount: float) -> bool:
        self._refill(now)
        return self.level >= min(amount, self.rate * self.burst_s)

    def take(self, amount: float) -> None:
        self.level -= amount

    def rescale(self, now: float, factor: float) -> None:
        """The limit changed: the refill rate and the capacity scale, the credit held is capped."""
        self._refill(now)
        self.rate *= factor
        self.level = min(self.level, self.rate * self.burst_s)


class RateLimiter:
    """RPM/TPM over a sliding minute AND RPM/60, TPM/60 (times ``burst_tolerance``) over a sliding second, or
    (``mode="bucket"``) per-second token buckets with ``burst_s`` of credit.

    Tokens are input + output, as the provider counts them. Refused requests consume nothing.
    """

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, burst_tolerance: float,
                 *, mode: Literal["window", "bucket"] = "window", burst_s: float = 1.0,
                 limit_changes: tuple[tuple[float, float], ...] = ()) -> None:
        def per_second(limit: int | None) -> float | None:
            return None if limit is None else limit / 60.0 * burst_tolerance

        self.mode = mode
        self._windows: tuple[SlidingWindow, ...] = ()
        self._buckets: dict[Literal["requests", "tokens"], TokenBucket] = {}
        if mode == "bucket":
            if requests_per_minute is not None:
                self._buckets["requests"] = TokenBucket(requests_per_minute / 60.0, burst_s)
            if tokens_per_minute is not None:
                self._buckets["tokens"] = TokenBucket(tokens_per_minute / 60.0, burst_s)
        else:
            self._windows = (
                SlidingWindow(60.0, requests_per_minute, tokens_per_minute),
                SlidingWindow(1.0, per_second(requests_per_minute), per_second(tokens_per_minute)),
            )
        self._changes = sorted(limit_changes)
        self._started: float | None = None

    @classmethod
    def from_config(cls, cfg: SimulatorConfig) -> RateLimiter:
        return cls(cfg.requests_per_minute, cfg.tokens_per_minute, cfg.burst_tolerance, mode=cfg.rate_limit_mode,
                   burst_s=cfg.burst_s, limit_changes=cfg.limit_changes)

    def _apply_changes(self, now: float) -> None:
        """Scale the limits by every change that is due (times count from the first request)."""
        if self._started is None:
            self._started = now
        while self._changes and self._changes[0][0] <= now - self._started:
            _, factor = self._changes.pop(0)
            for bucket in self._buckets.values():
                bucket.rescale(now, factor)
            for window in self._windows:
                window.rescale(factor)

    def _admit_buckets(self, now: float, n_tokens: int) -> Literal["requests", "tokens"] | None:
        for reason, bucket in self._buckets.items():
            if not bucket.allows(now, 1.0 if reason == "requests" else float(n_tokens)):
                return reason
        for reason, bucket in self._buckets.items():
            bucket.take(1.0 if reason == "requests" else float(n_tokens))
        return None

    def admit(self, now: float, n_tokens: int) -> Literal["requests", "tokens"] | None:
        """Admit and record the request, or say which limit refuses it (then nothing is recorded)."""
        self._apply_changes(now)
        if self._buckets:
            return self._admit_buckets(now, n_tokens)
        for window in self._windows:
            refused = window.refusal(now, n_tokens)
            if refused is not None:
                return refused
        for window in self._windows:
            window.add(now, n_tokens)
        return None


def _rate_limit_error(reason: Literal["requests", "tokens"]) -> SimError:
    """The provider's 429 for RPM/RPS (limit_requests) or TPM/TPS (insufficient_quota, not billing) [S6, S7]."""
    if reason == "requests":
        message = "Requests rate limit exceeded, please try again later."
        return SimError(429, "limit_requests", message, retryable_429=True)
    return SimError(
        429, "insufficient_quota", "Allocated quota exceeded, please increase your quota limit.", retryable_429=True
    )


# --------------------------------------------------------------------------------------------------------
