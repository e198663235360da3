"""The rate controller on a fake clock: traces of events in, admitted rates out (public methods only)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from qwenvl_batch.rate_control import RateController, refusal_kind

# A trace is a list of events (time first), fed in time order: ("start", t, tokens), ("refuse", t, started_at,
# kind, retry_after), ("accept", t, headers), ("fail", t).
Event = tuple


def steady(rate: float, t0: float, t1: float, *, refuse_every: int = 0, accept_every: int = 0,
           tokens: float = 100.0, kind: str = "requests") -> list[Event]:
    """Starts at ``rate``/s from t0 to t1; every ``refuse_every``-th one (or all but every ``accept_every``-th)
    is refused 5 ms later."""
    events: list[Event] = []
    n = round((t1 - t0) * rate)
    for i in range(n):
        t = t0 + i / rate
        events.append(("start", t, tokens))
        refused = (refuse_every and i % refuse_every == refuse_every - 1) or (accept_every and i % accept_every)
        if refused:
            events.append(("refuse", t + 0.005, t, kind, None, tokens))
    return events


def feed(controller: RateController, events: list[Event]) -> None:
    for event in sorted(events, key=lambda e: e[1]):
        what, t = event[0], event[1]
        if what == "start":
            controller.started(t, event[2])
        elif what == "refuse":
            controller.refused(t, started_at=event[2], kind=event[3], retry_after_s=event[4],
                               tokens=event[5] if len(event) > 5 else 0.0)
        elif what == "accept":
            controller.accepted(t, headers=event[2])
        elif what == "fail":
            controller.failed(t)


@dataclass
class Case:
    name: str
    rpm: float | None
    tpm: float | None
    events: list[Event]
    at: float
    check: Callable[[float | None, float | None, float], bool]
    doc: str = field(default="")


CASES = [
    Case("no limit: slow start from 8/s, doubling while the rate is used", None, None,
         steady(8, 0, 0.25) + steady(16, 0.25, 0.5), 0.5, lambda r, t, p: r is not None and 16 <= r <= 32),
    Case("no limit: growth that is not used is not kept (at most 4x what was sent)", None, None,
         steady(2, 0, 30), 30.0, lambda r, t, p: r == pytest.approx(8.0)),
    Case("configured ceiling: starts there, unmetered tokens", 600, None, [], 0.0,
         lambda r, t, p: r == pytest.approx(10.0) and t is None),
    Case("first 429 of a run at full speed: a dip, not a verdict", None, None,
         steady(40, 0, 3) + [("refuse", 3.0, 2.999, "requests", None)], 3.001,
         lambda r, t, p: r is not None and 0.5 * 80 <= r <= 0.9 * 160),
    Case("first 429: back to the interrupted rate within a second", None, None,
         steady(40, 0, 3) + [("refuse", 3.0, 2.999, "requests", None)] + steady(40, 3.0, 4.0), 4.0,
         lambda r, t, p: r is not None and r >= 80),
    Case("storm: the server accepts 10/s of 40/s; cut to about the goodput", None, None,
         steady(40, 0, 3) + steady(40, 3, 4, accept_every=4), 4.0, lambda r, t, p: r is not None and 5 <= r <= 12),
    Case("storm with a configured ceiling too high (1200 for 600)", 1200, None,
         steady(20, 0, 1) + steady(20, 1, 2, refuse_every=2), 2.0,
         lambda r, t, p: r is not None and 7 <= r <= 13),
    Case("configured ceiling is never exceeded, however long it is quiet", 600, None, steady(10, 0, 300), 300.0,
         lambda r, t, p: r is not None and r <= 10.0 + 1e-9),
    Case("Retry-After pauses everyone until the time it names", 600, None,
         steady(10, 0, 1) + [("refuse", 1.0, 0.99, "requests", 7.5)], 1.0,
         lambda r, t, p: p == pytest.approx(8.5)),
    Case("TPM refusals (insufficient_quota) cut the token rate, not the request rate", 600, None,
         steady(4, 0, 5, tokens=2500) + steady(4, 5, 7, tokens=2500, refuse_every=2, kind="tokens"), 7.0,
         lambda r, t, p: r == pytest.approx(10.0) and t is not None and 3000 <= t <= 6000),
    Case("stated limits (x-ratelimit-limit-*) need no discovery", None, None,
         steady(8, 0, 0.5) + [("accept", 0.6, {"x-ratelimit-limit-requests": "1200",
                                               "llm_provider-x-ratelimit-limit-tokens": "600000"})], 0.6,
         lambda r, t, p: r == pytest.approx(20.0) and t == pytest.approx(10_000.0)),
    Case("a stated limit above the configured one does not raise the ceiling", 600, None,
         [("accept", 0.6, {"x-ratelimit-limit-requests": "1200"})], 0.6, lambda r, t, p: r == pytest.approx(10.0)),
    Case("x-ratelimit-remaining-requests: 0 cuts like a 429, before one happens", 600, None,
         steady(10, 0, 2) + [("accept", 2.0, {"x-ratelimit-remaining-requests": "0"})] + steady(10, 2, 2.5)
         + [("accept", 2.5, {"x-ratelimit-remaining-requests": "0"})], 2.5, lambda r, t, p: r is not None and r < 10),
    Case("connection failures lower goodput but cut nothing", 600, None,
         steady(10, 0, 2) + [("fail", 2.0)] * 5, 2.0, lambda r, t, p: r == pytest.approx(10.0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_trace(case: Case) -> None:
    """Each trace of events leads to the admitted rates its name describes."""
    controller = RateController(requests_per_minute=case.rpm, tokens_per_minute=case.tpm, now=0.0)
    feed(controller, case.events)
    admission = controller.admission(case.at)
    assert case.check(admission.requests_per_s, admission.tokens_per_s, admission.paused_until), admission


def test_repeated_429s_keep_cutting_without_a_cooldown() -> None:
    """Each refusal of a request sent after the last cut cuts again at once; refusals of earlier sends do not."""
    controller = RateController(requests_per_minute=1200, now=0.0)
    feed(controller, steady(20, 0, 1))
    rates = []
    for i in range(4):  # a refusal every 50 ms, each of a request sent after the previous cut
        t = 1.0 + 0.05 * i
        controller.started(t, 100.0)
        controller.refused(t + 0.005, started_at=t, kind="requests")
        rates.append(controller.admission(t + 0.005).requests_per_s)
    assert all(b is not None and a is not None and b < a for a, b in itertools.pairwise(rates))
    before = controller.admission(1.2).requests_per_s
    controller.refused(1.2, started_at=0.5, kind="requests")  # sent before the last cut: same congestion event
    assert controller.admission(1.2).requests_per_s == before


def test_single_transient_429_after_a_quiet_stretch_recovers_within_seconds() -> None:
    """One 429 after minutes at the ceiling dips the rate, which is back at the ceiling a second later."""
    controller = RateController(requests_per_minute=6000, now=0.0)
    feed(controller, steady(100, 0, 120))
    controller.refused(120.0, started_at=119.99, kind="requests")
    assert (controller.admission(120.0).requests_per_s or 0) < 100
    assert controller.admission(121.0).requests_per_s == pytest.approx(100.0)


def test_limit_lowered_mid_run_is_followed() -> None:
    """A server that halves its limit (accepting 5/s of 10/s) brings the rate to about 5/s within seconds."""
    controller = RateController(requests_per_minute=600, now=0.0)
    feed(controller, steady(10, 0, 30))
    t, rate = 30.0, 10.0
    accepted_credit = 0.0
    while t < 40.0:  # the server now refills 5/s: refuse what exceeds it
        controller.started(t, 100.0)
        accepted_credit = min(accepted_credit + 5.0 / rate, 1.0)
        if accepted_credit >= 1.0:
            accepted_credit -= 1.0
        else:
            controller.refused(t + 0.005, started_at=t, kind="requests")
        rate = controller.admission(t + 0.006).requests_per_s or rate
        t += 1.0 / rate
    assert 3.5 <= rate <= 6.0


@pytest.mark.parametrize(("code", "kind"), [
    ("limit_requests", "requests"), ("Throttling.RateQuota", "requests"), ("limit_burst_rate", "requests"),
    ("Throttling", "requests"), ("429", "requests"), (None, "requests"), ("throttling_error", "requests"),
    ("insufficient_quota", "tokens"), ("Throttling.AllocationQuota", "tokens"),
])
def test_refusal_kind(code: str | None, kind: str) -> None:
    """DashScope's TPM codes steer the token rate; every other 429 (or a code a proxy lost) the request rate."""
    assert refusal_kind(code) == kind
