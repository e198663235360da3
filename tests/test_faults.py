"""Failure handling over loopback: odd responses, hangs, thinking models, and a run under mixed faults."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import SimulatorProcess, image_rows, write_manifest

from qwenvl_batch import JobError, load_results, run_job
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread

MARKED = {"user": "Describe row {id}. {note}"}


def _marked_job(tmp_path: Path, make_job, markers: list[str], **kwargs):
    rows = image_rows(tmp_path, len(markers))
    for row, marker in zip(rows, markers):
        row["note"] = marker
    return make_job(write_manifest(tmp_path / "m.csv", rows), prompt=MARKED, **kwargs)


def _by_id(job) -> pd.DataFrame:
    return pd.read_parquet(job.output.path).set_index("id").sort_index()


def test_partial_response_is_not_a_success(tmp_path: Path, sim, make_job) -> None:
    """A 200 flagged x-dashscope-partialresponse is retried, and the complete answer is kept."""
    job = _marked_job(tmp_path, make_job, ["[[sim:partial:1]]"])
    summary = run_job(job)
    out = _by_id(job)
    assert out["status"].tolist() == ["ok"] and out["attempts"].tolist() == [2]
    assert summary.retries == {"partial_response": 1}


def test_body_that_is_not_a_completion_is_retried(tmp_path: Path, sim, make_job) -> None:
    """A 200 whose body is not a chat completion is retried, not recorded as an empty answer."""
    job = _marked_job(tmp_path, make_job, ["[[sim:garbage:2]]"])
    summary = run_job(job)
    out = _by_id(job)
    assert out["status"].tolist() == ["ok"] and out["attempts"].tolist() == [3]
    assert out["response"].iloc[0].startswith("Simulated")
    assert summary.retries == {"invalid_response": 2}


def test_hung_request_is_cancelled_and_retried(tmp_path: Path, sim, make_job) -> None:
    """A request that never answers is cut at the timeout and retried; the row ends ok."""
    job = _marked_job(tmp_path, make_job, ["[[sim:hang:1]]", ""], limits={"timeout_s": 0.5})
    summary = run_job(job)
    out = _by_id(job)
    assert (out["status"] == "ok").all()
    assert out["attempts"].tolist() == [2, 1]
    assert summary.retries == {"timeout": 1}


def test_hung_stream_hits_the_idle_timeout(tmp_path: Path, make_job) -> None:
    """A stream whose chunks stop coming is cut by the idle timeout, well before the total timeout."""
    config = SimulatorConfig(stream_chunk_delay_s=0.0)
    with SimulatorThread(config) as slow:
        rows = image_rows(tmp_path, 1)
        rows[0]["note"] = "[[sim:hang:1]]"
        job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt=MARKED,
                       model={"stream": True, "base_url": slow.base_url},
                       limits={"timeout_s": 30, "stream_idle_timeout_s": 0.5})
        summary = run_job(job)
    assert summary.ok == 1 and summary.wall_s < 10
    assert summary.retries == {"timeout": 1}


def test_media_download_timeout_retried_a_few_times_then_recorded(tmp_path: Path, sim, make_job) -> None:
    """'Download the media resource timed out' gets 3 attempts, then becomes a row error."""
    job = _marked_job(tmp_path, make_job, ["[[sim:timeout_media]]"], limits={"max_attempts": 8})
    run_job(job)
    out = _by_id(job)
    assert out["status"].tolist() == ["error"] and out["attempts"].tolist() == [3]
    assert "Download the media resource timed out" in out["error_message"].iloc[0]


def test_context_too_long_is_a_row_error(tmp_path: Path, sim, make_job) -> None:
    """'Range of input length' is recorded on its row after one attempt."""
    job = _marked_job(tmp_path, make_job, ["[[sim:toolong]]", ""])
    run_job(job)
    out = _by_id(job)
    assert out["status"].tolist() == ["error", "ok"]
    assert out["attempts"].iloc[0] == 1 and "Range of input length" in out["error_message"].iloc[0]


def test_stream_only_model_is_streamed_automatically(tmp_path: Path, sim, make_job) -> None:
    """A QVQ model is streamed without being told; its reasoning goes to `reasoning`, the answer to `response`."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)), model={"name": "qvq-max"})
    run_job(job)
    out = _by_id(job)
    assert (out["status"] == "ok").all()
    assert out["reasoning"].str.len().gt(0).all()
    assert out["response"].str.contains("Describe row").all()
    assert (out["reasoning_tokens"] > 0).all()
    assert (out["completion_tokens"] > out["reasoning_tokens"]).all()
    assert all(r["stream"] for r in sim.requests)


def test_enable_thinking_is_passed_through(tmp_path: Path, sim, make_job) -> None:
    """extra_body enable_thinking / thinking_budget reach the model, and thinking jobs stream."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 1)),
                   model={"name": "qwen3-vl-plus", "extra_body": {"enable_thinking": True, "thinking_budget": 8}})
    run_job(job)
    out = _by_id(job)
    assert out["status"].tolist() == ["ok"]
    assert out["reasoning_tokens"].iloc[0] == 8


def test_null_reasoning_tokens_are_derived(tmp_path: Path, make_job) -> None:
    """When the provider sends reasoning_tokens: null, the runner derives it instead of leaving it empty."""
    with SimulatorThread(SimulatorConfig(reasoning_tokens_null=True)) as server:
        job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)),
                       model={"name": "qvq-max", "base_url": server.base_url})
        run_job(job)
    out = _by_id(job)
    assert (out["reasoning_tokens"] > 0).all()
    assert (out["reasoning_tokens"] < out["completion_tokens"]).all()


@pytest.mark.parametrize(("stream", "http_client"), [(False, "httpx"), (True, "httpx"), (False, "aiohttp"),
                                                     (True, "aiohttp")])
def test_run_under_mixed_faults_ends_all_ok_and_pays_once(tmp_path: Path, make_job, stream: bool,
                                                          http_client: str) -> None:
    """10% 5xx, 5% dropped connections, 2% hangs, 5% cut streams: every row ends ok, none paid twice.

    The simulator runs in its own process: its latency must not depend on this process's load. The timeouts are
    1.5 s, not less: a client starved of CPU for longer than its timeout gives up on an answer the server already
    sent, and the retry is then a second payment that no client can avoid (seen at load 20 with 0.5 s)."""
    flags = ["--fail-500-rate", "0.05", "--fail-503-rate", "0.05", "--drop-rate", "0.05", "--hang-rate", "0.02",
             "--truncate-rate", "0.05" if stream else "0", "--seed", "7"]
    with SimulatorProcess(tmp_path, *flags) as server:
        job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 200)),
                       model={"base_url": server.base_url, "stream": stream},
                       limits={"concurrency": 16, "max_attempts": 12, "timeout_s": 1.5,
                               "stream_idle_timeout_s": 1.5, "http_client": http_client})
        summary = run_job(job)
    log = server.requests
    out = pd.read_parquet(job.output.path)
    assert len(out) == 200 and out["id"].is_unique and (out["status"] == "ok").all()
    served_ok = Counter(r["text"] for r in log if r["outcome"] == "ok")
    assert max(served_ok.values()) == 1 and len(served_ok) == 200
    assert summary.retries and sum(summary.retries.values()) == len(log) - 200


def test_job_level_error_mid_run_leaves_the_rest_pending(tmp_path: Path, sim, make_job) -> None:
    """An account error on row 20 of 40 stops the run: done rows are kept, none is marked failed, a re-run finishes."""
    rows = image_rows(tmp_path, 40)
    rows[20]["note"] = "[[sim:arrears:1]]"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt=MARKED, limits={"concurrency": 2})
    with pytest.raises(JobError, match="Arrearage") as caught:
        run_job(job)
    first = load_results(job.output.path)
    assert 15 <= len(first) < 40
    assert (first["status"] == "ok").all()  # a job-level error is never recorded on rows
    assert caught.value.summary.pending == 40 - len(first)
    summary = run_job(job)
    out = pd.read_parquet(job.output.path)
    assert summary.skipped_ok == len(first) and summary.ok == 40 - len(first)
    assert len(out) == 40 and (out["status"] == "ok").all()
