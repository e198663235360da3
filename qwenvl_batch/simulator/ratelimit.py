"""The provider's rate limiting as the simulator enforces it: RPM/TPM over sliding windows, plus
per-second checks with a burst tolerance (reference §3.1)."""

from __future__ import annotations

from collections import deque
from typing import Literal

from .config import SimError

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

    def add(self, now: float, n_tokens: int) -> None:
        """Record an admitted request."""
        self._events.append((now, n_tokens))
        self._tokens += n_tokens


class RateLimiter:
    """RPM/TPM over a sliding minute AND RPM/60, TPM/60 (times ``burst_tolerance``) over a sliding second.

    Tokens are input + output, as the provider counts them. Refused requests consume nothing.
    """

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, burst_tolerance: float) -> None:
        def per_second(limit: int | None) -> float | None:
            return None if limit is None else limit / 60.0 * burst_tolerance

        self._windows = (
            SlidingWindow(60.0, requests_per_minute, tokens_per_minute),
            SlidingWindow(1.0, per_second(requests_per_minute), per_second(tokens_per_minute)),
        )

    def admit(self, now: float, n_tokens: int) -> Literal["requests", "tokens"] | None:
        """Admit and record the request, or say which limit refuses it (then nothing is recorded)."""
        for window in self._windows:
            reason = window.refusal(now, n_tokens)
            if reason is not None:
                return reason
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
