"""One rate limit for a whole Ray cluster: the adaptive limiter in one named actor, and the workers' adapter.

The provider limits an *account* (per model), not a process: ``n`` workers each running their own limiter at the
account's rate would send ``n`` times too much, and splitting the rate ``n`` ways wastes quota under skew and
breaks when workers come and go. So the runner's own ``limits.Limiter`` (GCRA meters driven by
``rate_control.RateController``: slow start, cuts on 429, Retry-After pauses) runs once, in a named async actor
``qwenvl:<endpoint hash>:<model>`` that every worker (and every job on the cluster's namespace) finds with
``get_if_exists``. A 429 or a Retry-After seen by any worker therefore slows every worker.

Cost of sharing: one actor call per *batch* of permits. ``RemoteLimiter.acquire`` (a worker's side) takes a permit
from a local queue of booked start times; when it runs dry one call books the next ``k`` slots, where ``k`` covers
about ``BOOK_AHEAD_S`` of this worker's share of the rate (1 at 20 requests/s, up to ``MAX_BATCH`` at thousands),
so the actor handles a few calls per second per worker whatever the request rate, and a rate change reaches
every worker within ``BOOK_AHEAD_S``. Events (accepted, refused, token corrections) ride along with the next
call; a 429 is sent at once and drops this worker's booked slots (its next call waits until the actor has it).

Clocks: the actor and the workers may be on different hosts, so only durations cross the wire (a slot is "in
0.03 s", a refused request "started 0.4 s ago").
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray

from qwenvl_batch.config import JobConfig
from qwenvl_batch.limits import Limiter, mark_started, started_request
from qwenvl_batch.policy import Decision
from qwenvl_batch.redact import split_url_credentials

BOOK_AHEAD_S = 0.1  # a worker books at most this much of its share of the rate ahead
MAX_BATCH = 64  # permits per actor call, at most
NAMESPACE = "qwenvl-batch"  # named actors are found per namespace: every driver of this package uses this one



def limiter_name(job: JobConfig, base_url: str | None = None) -> str:
    """``qwenvl:<endpoint hash>:<model>``: one limiter per account endpoint and model (credentials not hashed)."""
    url, _ = split_url_credentials(base_url or job.model.endpoint)
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    return f"qwenvl:{digest}:{job.model.name}"


@dataclass(frozen=True)
class Grant:
    """Booked start times, as delays from the actor's now (at most one beyond ``BOOK_AHEAD_S``), and the rate in
    force (to size the next batch)."""

    delays: list[float]
    requests_per_s: float | None


class _LimiterActor:
    """The cluster's one ``limits.Limiter``. Async actor: every method runs on one event loop, no locks needed."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.limiter = Limiter(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
        self.granted = 0
        self.calls = 0

    async def acquire(self, count: int, tokens_each: float, events: list[tuple[Any, ...]]) -> Grant:
        """Apply the caller's events, then book ``count`` request slots of ``tokens_each`` estimated tokens."""
        self.calls += 1
        self._apply(events)
        delays: list[float] = []
        while len(delays) < count and (not delays or delays[-1] <= BOOK_AHEAD_S):  # never far ahead of the rate
            delays.append(self.limiter.book(tokens_each))
            self.limiter.controller.started(time.monotonic(), tokens_each)
        self.granted += count
        return Grant(delays, self.limiter.admission.requests_per_s)

    async def report(self, events: list[tuple[Any, ...]]) -> None:
        """Events without a request for permits (a 429 is reported at once; the rest when a worker goes idle)."""
        self._apply(events)

    async def stats(self) -> dict[str, Any]:
        """Permits granted, calls served and the rates in force (tests, benchmarks, progress)."""
        admission = self.limiter.admission
        return {"granted": self.granted, "calls": self.calls, "throttled": self.limiter.throttled,
                "requests_per_s": admission.requests_per_s, "tokens_per_s": admission.tokens_per_s,
                "paused_for_s": max(0.0, admission.paused_until - time.monotonic())}

    def _apply(self, events: list[tuple[Any, ...]]) -> None:
        now = time.monotonic()
        for event in events:
            kind = event[0]
            if kind == "accepted":  # ("accepted", headers or None)
                self.limiter.controller.accepted(now, headers=event[1])
            elif kind == "tokens":  # ("tokens", correction): estimate vs real usage, or vs the booked estimate
                self.limiter.tokens.adjust(float(event[1]))
            elif kind == "refused":  # ("refused", retry_after_s, code, tokens, started_ago_s)
                _, retry_after_s, code, tokens, ago = event
                self.limiter.on_throttle(retry_after_s, code=code, tokens=tokens, started_at=now - ago)
            elif kind == "failed":  # ("failed", tokens): a connection failure or timeout
                self.limiter.controller.failed(now, tokens=float(event[1]))


LimiterActor: Any = ray.remote(num_cpus=0)(_LimiterActor)  # typed Any: Ray's decorator hides the class


def shared_limiter(job: JobConfig, base_url: str | None = None) -> Any:
    """The cluster's limiter actor for this job's endpoint and model, created on first use (``get_if_exists``).

    It lives as long as the Ray job that created it; its limits are the first creator's (``requests_per_minute``
    and ``tokens_per_minute`` of that job), later jobs on the same account and model share it as it is.
    """
    return LimiterActor.options(name=limiter_name(job, base_url), namespace=NAMESPACE, get_if_exists=True,
                                max_concurrency=10_000).remote(job.limits.requests_per_minute,
                                                               job.limits.tokens_per_minute)


class RemoteLimiter(Limiter):
    """A worker's side of the shared limiter, with ``limits.Limiter``'s interface (the runner uses it unchanged).

    ``workers`` is how many workers share the actor (sizes the batches); permits are booked for the estimate of
    the request that asked for them and corrected with each request's own estimate as it is used.
    """

    def __init__(self, actor: Any, *, workers: int = 1, clock: Any = time.monotonic) -> None:
        super().__init__(requests_per_minute=None, tokens_per_minute=None, clock=clock)
        self.actor = actor
        self.workers = max(1, workers)
        self._permits: deque[tuple[float, float]] = deque()  # (local start time, tokens booked)
        self._events: list[tuple[Any, ...]] = []
        self._fetching: asyncio.Lock | None = None
        self._rate: float | None = None
        self._reported: list[Any] = []  # 429 reports sent: an async actor may run calls out of order
        self.calls = 0

    def _batch_size(self) -> int:
        if self._rate is None:  # unmetered (or not known yet): the actor stops booking BOOK_AHEAD_S ahead
            return MAX_BATCH
        return max(1, min(MAX_BATCH, math.floor(self._rate * BOOK_AHEAD_S / self.workers)))

    async def _fetch(self, estimated_tokens: float) -> None:
        await self._await_reports()  # this worker's 429s are applied before it books again
        events, self._events = self._events, []
        grant: Grant = await self.actor.acquire.remote(self._batch_size(), float(estimated_tokens), events)
        self.calls += 1
        now = self._clock()
        self._rate = grant.requests_per_s
        self._permits.extend((now + delay, float(estimated_tokens)) for delay in grant.delays)

    async def acquire(self, estimated_tokens: int) -> float:
        """Wait for a booked slot (booking the next batch when none is left); returns the seconds waited."""
        if self._fetching is None:
            self._fetching = asyncio.Lock()
        started = self._clock()
        while not self._permits:
            async with self._fetching:
                if not self._permits:
                    await self._fetch(estimated_tokens)
        when, booked = self._permits.popleft()
        if booked != estimated_tokens:
            self._events.append(("tokens", float(estimated_tokens) - booked))
        delay = when - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)
        mark_started(self._clock(), estimated_tokens)
        return self._clock() - started

    def settle(self, estimated_tokens: int, actual_tokens: int | None,
               headers: Mapping[str, str] | None = None) -> None:
        """A request succeeded: tell the actor (with the next call), with its usage correction and headers."""
        limit_headers = {k: v for k, v in (headers or {}).items() if "ratelimit" in k.lower()} or None
        self._events.append(("accepted", limit_headers))
        if actual_tokens is not None:
            self._events.append(("tokens", float(actual_tokens - estimated_tokens)))

    def on_failure(self, decision: Decision) -> None:
        """A failed attempt to be retried: a 429 goes to the actor at once; a connection failure only counts."""
        if decision.error_type == "rate_limit":
            self.on_throttle(decision.retry_after_s, code=decision.code)
        elif decision.error_type in ("connection", "timeout"):
            self._events.append(("failed", started_request(self._clock())[1]))

    def on_throttle(self, retry_after_s: float | None, *, code: str | None = None, tokens: float | None = None,
                    started_at: float | None = None) -> None:
        """A 429: sent to the actor now (every worker slows), and this worker's booked slots are given up."""
        now = self._clock()
        started = started_request(now)
        started_at = started[0] if started_at is None else started_at
        tokens = started[1] if tokens is None else tokens
        self.throttled += 1
        self._permits.clear()
        events, self._events = self._events, []
        events.append(("refused", retry_after_s, code, float(tokens), max(0.0, now - started_at)))
        self._reported.append(self.actor.report.remote(events))  # not awaited here: the next call waits for it

    async def _await_reports(self) -> None:
        reported, self._reported = self._reported, []
        for ref in reported:
            await ref

    async def flush(self) -> None:
        """Send the events still held (at the end of a run, so the actor's view is complete)."""
        await self._await_reports()
        if self._events:
            events, self._events = self._events, []
            await self.actor.report.remote(events)
