"""Rate limits end to end: the simulator enforcing a per-second bucket over loopback, the real runner against it
(a few seconds each), and the simulator's own enforcement modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_LIMITS, image_rows, write_manifest

from qwenvl_batch import job_from_dict, run_job
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread
from qwenvl_batch.simulator.ratelimit import RateLimiter

SERVER_RPM = 3000  # 50/s with 1 s of burst: 250 rows take about 5 s


def _run(tmp_path: Path, sim: SimulatorThread, rows: int, limits: dict[str, Any]) -> list[dict[str, Any]]:
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, rows))
    job = job_from_dict({
        "input": {"path": str(manifest), "id_column": "id", "image_columns": ["image"]},
        "output": {"path": str(tmp_path / "out" / "result.parquet")},
        "model": {"name": "qwen3-vl-flash", "base_url": sim.base_url, "api_key_optional": True,
                  "api_key_env": "QWENVL_TEST_KEY"},
        "prompt": {"user": "Describe row {id}."},
        "limits": {**FAST_LIMITS, "concurrency": 64, "max_attempts": 10, "retry_initial_s": 1.0,
                   "retry_max_s": 2.0, **limits},
        "run": {"progress": "off"},
    }, base_dir=tmp_path)
    summary = run_job(job)
    assert summary.ok == rows
    return sim.requests


def _bucket_sim() -> SimulatorThread:
    return SimulatorThread(SimulatorConfig(requests_per_minute=SERVER_RPM, rate_limit_mode="bucket", burst_s=1.0,
                                           latency_s=0.05, latency_dist="lognormal", latency_max_s=0.5))


def _shares(log: list[dict[str, Any]]) -> tuple[float, float]:
    """(accepted per second / the limit's per-second rate, share of requests answered 429)."""
    accepted = sorted(e["t"] for e in log if e["outcome"] != "http_429")
    refused = sum(1 for e in log if e["outcome"] == "http_429")
    rate = (len(accepted) - 1) / max(accepted[-1] - accepted[0], 1e-9)
    return rate / (SERVER_RPM / 60.0), refused / len(log)


def test_no_limit_configured_finds_the_servers_limit(tmp_path: Path) -> None:
    """With no limit in the job, a run against a 3,000 RPM per-second bucket gets most of the limit with few 429s
    (slow start, then the cuts to the measured goodput), and every row succeeds."""
    with _bucket_sim() as sim:
        share, refused = _shares(_run(tmp_path, sim, 250, {}))
    # Slow start overshoots 50/s once: 3-12 % of this short run's requests are 429s on an idle machine, up to
    # 18 % with both cores busy (the runner then reacts late); the pre-issue-9 controller sent over a third.
    assert share >= 0.6, (share, refused)
    assert refused < 0.25, (share, refused)


def test_configured_limit_is_kept_without_429s(tmp_path: Path) -> None:
    """With the right limit configured, requests are spaced from the first one: no 429 at all."""
    with _bucket_sim() as sim:
        share, refused = _shares(_run(tmp_path, sim, 150, {"requests_per_minute": SERVER_RPM}))
    assert refused == 0.0
    assert share >= 0.9


def test_bucket_mode_refuses_beyond_the_burst_then_refills() -> None:
    """The simulator's bucket admits one second of credit at once, then RPM/60 per second."""
    limiter = RateLimiter(600, None, 2.0, mode="bucket", burst_s=1.0)
    assert [limiter.admit(0.0, 10) for _ in range(11)] == [None] * 10 + ["requests"]
    assert limiter.admit(0.1, 10) is None  # 0.1 s refills one request at 10/s
    assert limiter.admit(0.1, 10) == "requests"


def test_bucket_mode_weighs_tokens_and_names_the_refusal() -> None:
    """The token bucket refuses with "tokens" (the simulator answers insufficient_quota)."""
    limiter = RateLimiter(None, 6000, 2.0, mode="bucket", burst_s=1.0)  # 100 tokens/s, 100 of credit
    assert limiter.admit(0.0, 80) is None
    assert limiter.admit(0.0, 80) == "tokens"
    assert limiter.admit(1.0, 80) is None


@pytest.mark.parametrize("mode", ["bucket", "window"])
def test_limit_changes_apply_mid_run(mode: str) -> None:
    """limit_changes halves the limit 10 s after the first request, in either mode."""
    limiter = RateLimiter(600, None, 1.0, mode=mode, burst_s=1.0,  # type: ignore[arg-type]
                          limit_changes=((10.0, 0.5),))
    t, admitted_before = 0.0, 0
    while t < 10.0:
        admitted_before += limiter.admit(t, 1) is None
        t += 0.05
    admitted_after = 0
    while t < 20.0:
        admitted_after += limiter.admit(t, 1) is None
        t += 0.05
    assert admitted_before == pytest.approx(100, abs=12)
    assert admitted_after == pytest.approx(50, abs=12)


def test_simulator_config_rejects_bad_rate_limit_settings() -> None:
    """A misspelt mode or a non-positive factor fails at startup, not mid-benchmark."""
    from qwenvl_batch.errors import ConfigError

    with pytest.raises(ConfigError, match="rate_limit_mode"):
        SimulatorConfig(rate_limit_mode="buckets")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="limit_changes"):
        SimulatorConfig(limit_changes=((10.0, 0.0),))
