"""Rate meters and the adaptive limiter, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import pytest

from qwenvl_batch.limits import Limiter, RateMeter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_meter_spaces_requests_evenly_after_the_burst_credit() -> None:
    """At 10/s with 1 s of credit, 10 start at once, then one every 0.1 s."""
    clock = FakeClock()
    meter = RateMeter(10.0, burst_s=1.0, clock=clock)
    clock.now += 5  # idle time does not accumulate more than burst_s of credit
    waits = [meter.reserve(1) for _ in range(15)]
    assert waits[:10] == pytest.approx([0.0] * 10, abs=1e-9)
    assert waits[10:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_meter_weighted_by_tokens_and_corrected_by_usage() -> None:
    """A token meter charges the estimate, and a refund of unused estimate lets the next request in sooner."""
    clock = FakeClock()
    meter = RateMeter(1000.0, burst_s=1.0, clock=clock)
    assert meter.reserve(1000) == 0.0
    assert meter.reserve(500) == pytest.approx(0.5)
    meter.adjust(-500)  # the second request used 500 fewer tokens than estimated
    assert meter.reserve(500) == pytest.approx(0.5)


def test_pause_until_holds_everyone() -> None:
    """A Retry-After pause applies to the next request whoever makes it."""
    clock = FakeClock()
    meter = RateMeter(100.0, clock=clock)
    meter.pause_until(clock.now + 3.0)
    assert meter.reserve(1) == pytest.approx(3.0)


def test_slow_start_ramps_to_the_configured_rate() -> None:
    """The request rate starts at a quarter of the limit and reaches it after the ramp."""
    clock = FakeClock()
    limiter = Limiter(requests_per_minute=1200, tokens_per_minute=None, clock=clock, ramp_s=20.0)
    limiter._grow()
    assert limiter.state.current_rpm == pytest.approx(300)
    clock.now += 10
    limiter._grow()
    assert limiter.state.current_rpm == pytest.approx(750)
    clock.now += 30
    limiter._grow()
    assert limiter.state.current_rpm == pytest.approx(1200)


def test_throttle_cuts_the_rate_once_per_cooldown_then_recovers() -> None:
    """A burst of 429s lowers the rate once; quiet periods raise it back towards the ceiling."""
    clock = FakeClock()
    limiter = Limiter(requests_per_minute=600, tokens_per_minute=None, clock=clock, ramp_s=0.0,
                      decrease=0.5, increase=0.1, cooldown_s=5.0, recover_s=2.0)
    limiter._grow()
    assert limiter.state.current_rpm == 600
    limiter.on_throttle(None)
    limiter.on_throttle(None)  # same cooldown window: no second cut
    assert limiter.state.current_rpm == pytest.approx(300)
    assert limiter.state.throttled == 1
    for _ in range(10):
        clock.now += 2.1
        limiter._grow()
    assert limiter.state.current_rpm == pytest.approx(600)


def test_unlimited_runner_learns_the_limit_from_429s() -> None:
    """With no RPM configured, nothing is metered until a 429; after a minute the rate follows what was accepted."""
    clock = FakeClock()
    limiter = Limiter(requests_per_minute=None, tokens_per_minute=None, clock=clock)
    assert limiter.requests.reserve(1) == 0.0
    for _ in range(40):  # a burst: 40 started in the first second, 10 of them refused
        clock.now += 0.025
        limiter._starts.append(clock.now)
    for _ in range(9):
        limiter._rejected.append(clock.now)
    limiter.on_throttle(None)  # the 10th refusal
    assert limiter.state.current_rpm == pytest.approx(30 * 60 * 0.5)  # half the rate not refused
    for _ in range(1300):  # then the server accepts 20 a second for 65 s: 1,200 in the last minute
        clock.now += 0.05
        limiter.settle(100, 100)
    limiter.on_throttle(None)
    assert limiter.state.learned
    assert limiter.state.current_rpm == pytest.approx(1200 * 0.95, rel=0.01)
    before = limiter.state.current_rpm
    clock.now += 2.5
    limiter._grow()
    assert before < limiter.state.current_rpm < before * 1.01  # probes upwards, gently once learned


def test_byte_budget_bounds_bytes_in_flight() -> None:
    """A request waits while the image bytes in flight would exceed the budget; an oversized one runs alone."""
    import asyncio

    from qwenvl_batch.limits import ByteBudget

    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        events: list[str] = []
        await budget.acquire(60)

        async def second() -> None:
            await budget.acquire(50)
            events.append("second in")

        task = asyncio.create_task(second())
        await asyncio.sleep(0.01)
        events.append("still waiting" if not task.done() else "too early")
        budget.release(60)
        await asyncio.wait_for(task, 1)
        budget.release(50)
        await budget.acquire(500)  # larger than the budget, but alone: admitted
        events.append(f"peak {budget.peak}")
        return events

    assert asyncio.run(scenario()) == ["still waiting", "second in", "peak 500"]


def test_learned_after_a_minute_even_without_another_429() -> None:
    """A minute after an early 429, the accepted count of that minute sets the rate (if above the current one)."""
    clock = FakeClock()
    limiter = Limiter(requests_per_minute=None, tokens_per_minute=None, clock=clock)
    limiter._starts.extend([clock.now] * 10)
    limiter.on_throttle(None)
    low = limiter.state.current_rpm
    assert low is not None and low < 600
    for _ in range(1300):  # the server accepts 20 a second (1,200 a minute) for 65 s
        clock.now += 0.05
        limiter.settle(100, 100)
    limiter._grow()
    assert limiter.state.learned and limiter.state.current_rpm == pytest.approx(1200 * 0.95, rel=0.01)
