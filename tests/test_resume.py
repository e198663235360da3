"""Crash safety: kill -9 or Ctrl-C a real run mid-way, re-run, and check nothing committed is paid twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import image_rows, job_file, ok_requests_for, write_manifest

from qwenvl_batch import load_job, load_results, run_job
from qwenvl_batch.cli import main
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread

ROWS = 120


def _write_job(tmp_path: Path, base_url: str) -> Path:
    return job_file(tmp_path, base_url, rows=ROWS, input={"image_columns": ["image"]}, output="out.parquet",
                    model={"api_key_optional": True}, limits={"concurrency": 4, "grace_s": 5})


def _start(job: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qwenvl_batch", "run", str(job), "--progress", "lines"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=job.parent,
    )


def _wait_for_requests(sim: SimulatorThread, proc: subprocess.Popen[str], n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(sim.requests) < n:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "runner exited early"
        assert time.monotonic() < deadline, "the runner did not send requests in time"
        time.sleep(0.02)




def test_kill_9_mid_run_then_resume_pays_nothing_twice(tmp_path: Path, slow_sim: SimulatorThread,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """After kill -9, committed rows survive; the re-run sends only the rest and ends with one row per id."""
    job_path = _write_job(tmp_path, slow_sim.base_url)
    proc = _start(job_path)
    _wait_for_requests(slow_sim, proc, 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    committed = load_results(tmp_path / "out.parquet")
    committed_ok = set(committed.loc[committed["status"] == "ok", "id"])
    assert len(committed_ok) >= 30  # what the runner had received was durable at the kill
    assert len(committed) < ROWS
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out.parquet"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(committed)  # the report reads the journal too

    summary = run_job(load_job(job_path))
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == ROWS and out["id"].is_unique and (out["status"] == "ok").all()
    assert summary.skipped_ok == len(committed_ok)
    for key in committed_ok:  # never paid twice for a committed row
        assert ok_requests_for(slow_sim, key) == 1, key
    # rows in flight at the kill may have been sent twice; nothing else was
    twice = [k for k in out["id"] if ok_requests_for(slow_sim, k) > 1]
    assert len(twice) <= 4 + 1  # concurrency (+ one being written)


@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_commits_and_says_how_to_resume(tmp_path: Path, slow_sim: SimulatorThread, signum: int, code: int,
                                               name: str) -> None:
    """Ctrl-C / SIGTERM stop dispatching, commit, exit 130 / 143 with a resume hint; a re-run finishes the job."""
    job_path = _write_job(tmp_path, slow_sim.base_url)
    proc = _start(job_path)
    _wait_for_requests(slow_sim, proc, 30)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, output
    assert f"Interrupted ({name})" in output and "To continue" in output
    done = pd.read_parquet(tmp_path / "out.parquet")  # folded into parts on the way out
    assert 0 < len(done) < ROWS
    sent_before = len(slow_sim.requests)
    assert sent_before - len(done) <= 4  # in-flight requests got their grace period and were committed

    run_job(load_job(job_path))
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == ROWS and out["id"].is_unique
    for key in done["id"]:
        assert ok_requests_for(slow_sim, key) == 1


def test_second_ctrl_c_exits_at_once_keeping_commits(tmp_path: Path) -> None:
    """A second SIGINT skips the grace period: exit 130 in about a second, committed rows intact and readable."""
    with SimulatorThread(SimulatorConfig(latency_s=0.05)) as fast_then_slow:
        job_path = _write_job(tmp_path, fast_then_slow.base_url)
        job_path.write_text(job_path.read_text().replace("grace_s = 5", "grace_s = 60")
                            .replace('user = "Describe row {id}."', 'user = "Describe row {id}. {note}"'))
        rows = image_rows(tmp_path, ROWS)
        for row in rows[20:]:
            row["note"] = "[[sim:hang]]"  # from row 20 on, requests never answer
        write_manifest(tmp_path / "m.csv", rows)
        proc = _start(job_path)
        _wait_for_requests(fast_then_slow, proc, 24)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
        elapsed = time.monotonic() - started
    assert proc.returncode == 130, output
    assert elapsed < 10  # not the 60 s grace period
    done = load_results(tmp_path / "out.parquet")
    assert len(done) == 20 and (done["status"] == "ok").all()
