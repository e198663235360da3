"""mode = "batch" end to end against the simulator's Batch API: same output as realtime, half price, limits,
expiry, validation failures, transient line errors, and kill -9 at every step followed by a re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import image_rows, write_manifest

from qwenvl_batch import ConfigError, JobError, load_results, run_job
from qwenvl_batch.batch import batch_chat_job, cancel_batches, list_batches
from qwenvl_batch.batch.rules import DASHSCOPE, OPENAI, error_fields
from qwenvl_batch.batch.state import state_path
from qwenvl_batch.config import BATCH_CHAT_BASE_URL, job_from_dict
from qwenvl_batch.estimate import estimate_job, render_estimate
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread
from qwenvl_batch.simulator.batch import BATCH_KEY, validate
from qwenvl_batch.store import RESULT_COLUMNS, state_dir_for

PRICES = """
[models."qwen3-vl-flash".any]
currency = "CNY"
source = "test"
as_of = "2026-12"
batch_discount = 0.5
input_per_mtok = 1.0
output_per_mtok = 4.0
"""


def batch_job(tmp_path: Path, sim: SimulatorThread, *, rows: int = 6, batch: dict[str, Any] | None = None,
              model: dict[str, Any] | None = None, prompt: str = "Describe row {id}.", output: str = "out.parquet",
              prices: bool = True) -> Any:
    """A batch-mode job over ``rows`` real images, talking to ``sim``."""
    manifest = tmp_path / "m.csv"
    if not manifest.exists():
        write_manifest(manifest, image_rows(tmp_path, rows))
    (tmp_path / "prices.toml").write_text(PRICES)
    raw = {
        "input": {"path": str(manifest)},
        "output": {"path": str(tmp_path / output)},
        "model": {"name": "qwen3-vl-flash", "base_url": sim.base_url, "api_key_optional": True,
                  "api_key_env": "QWENVL_TEST_KEY", "mode": "batch", "max_tokens": 100, **(model or {})},
        "prompt": {"user": prompt},
        "limits": {"concurrency": 4, "max_attempts": 2, "retry_initial_s": 0.01, "timeout_s": 10.0},
        "batch": {"poll_interval_s": 0.05, **(batch or {})},
        "pricing": {"file": str(tmp_path / "prices.toml")} if prices else {},
        "run": {"progress": "off"},
    }
    return job_from_dict(raw, base_dir=tmp_path)


def ops(sim: SimulatorThread) -> Counter[str]:
    """Control-plane calls by operation, from the simulator's request log."""
    return Counter(e["op"] for e in sim.requests if e.get("kind") == "batch_api")


def processed(sim: SimulatorThread) -> Counter[str]:
    """Lines the simulator answered, by custom_id."""
    return Counter(e["custom_id"] for e in sim.requests if e.get("kind") == "batch_line")


def test_batch_output_matches_realtime(tmp_path: Path, sim: SimulatorThread) -> None:
    """A batch job gives the realtime columns (plus batch_id/custom_id filled) and the same answer per row."""
    job = batch_job(tmp_path, sim)
    summary = run_job(job)
    realtime = run_job(batch_job(tmp_path, sim, model={"mode": "realtime"}, output="rt.parquet"))
    out = pd.read_parquet(job.output.path).set_index("id").sort_index()
    rt = pd.read_parquet(tmp_path / "rt.parquet").set_index("id").sort_index()
    assert summary.ok == realtime.ok == 6
    assert list(pd.read_parquet(job.output.path).columns) == ["id", "image", "note", *RESULT_COLUMNS]
    assert (out["response"] == rt["response"]).all()
    assert (out["prompt_tokens"] == rt["prompt_tokens"]).all()
    assert (out["fingerprint"] == rt["fingerprint"]).all()  # a later realtime run resumes a batch output
    assert out["batch_id"].notna().all() and (out["custom_id"] == out.index).all()
    assert rt["batch_id"].isna().all()
    assert (out["latency_s"] >= 0).all() and out["request_id"].notna().all()


def test_batch_cost_is_half_the_realtime_price_without_cache_discount(tmp_path: Path, sim: SimulatorThread) -> None:
    """Cost columns are batch_discount × the realtime price for the same usage."""
    job = batch_job(tmp_path, sim)
    run_job(job)
    out = load_results(job.output.path)
    expected = 0.5 * (out["prompt_tokens"] * 1.0 + out["completion_tokens"] * 4.0) / 1e6
    assert out["cost"].to_numpy() == pytest.approx(expected.to_numpy())
    assert (out["currency"] == "CNY").all()


def test_three_shards_make_three_batches_and_files_are_deleted(tmp_path: Path, sim: SimulatorThread) -> None:
    """A job needing 3 shards (5 lines each) makes 3 batches; every file is deleted from the provider at the end."""
    job = batch_job(tmp_path, sim, rows=13, batch={"max_lines_per_file": 5})
    summary = run_job(job)
    calls = ops(sim)
    assert summary.ok == 13
    assert calls["batches.create"] == 3 and calls["files.create"] == 3
    assert calls["batches.list"] == calls["files.list"] == 0  # lookups only when re-attaching after a crash
    assert set(processed(sim).values()) == {1} and len(processed(sim)) == 13
    assert sim.app[BATCH_KEY].files == {}  # input and result files deleted once journaled
    assert not list(state_path(state_dir_for(job.output.path)).parent.glob("shard-*"))  # local copies too


def test_keep_files_keeps_them(tmp_path: Path, sim: SimulatorThread) -> None:
    """--keep-files leaves the input and result files at the provider."""
    run_job(batch_job(tmp_path, sim, batch={"keep_files": True}))
    assert len(sim.app[BATCH_KEY].files) == 2  # input + output


def test_expiry_part_way_keeps_processed_rows_and_resubmits_the_rest_once(tmp_path: Path) -> None:
    """A batch expiring after 3 of 6 lines keeps those 3; the other 3 go into one more batch, each sent once."""
    with SimulatorThread(SimulatorConfig(batch_expire_after_lines=3)) as sim:
        job = batch_job(tmp_path, sim)
        summary = run_job(job)
        assert summary.ok == 6
        assert ops(sim)["batches.create"] == 2
        assert set(processed(sim).values()) == {1} and len(processed(sim)) == 6
        out = load_results(job.output.path)
        assert out["batch_id"].nunique() == 2


def test_openai_style_batch_expired_lines_go_into_the_next_batch(tmp_path: Path) -> None:
    """Unrun lines reported as batch_expired errors (OpenAI's shape) are not errors: they go into the next batch."""
    with SimulatorThread(SimulatorConfig(batch_expire_after_lines=4, batch_expired_lines=True)) as sim:
        job = batch_job(tmp_path, sim)
        summary = run_job(job)
        out = load_results(job.output.path)
        assert summary.ok == 6 and summary.errors == 0 and (out["status"] == "ok").all()
        assert ops(sim)["batches.create"] == 2 and set(processed(sim).values()) == {1}


def test_poll_interval_is_30_to_60_s_against_a_provider(tmp_path: Path, sim: SimulatorThread) -> None:
    """Against a real provider polls start at 30 s and back off to 60 s (a smaller setting is raised to 30 s);
    a loopback server is polled fast."""
    from qwenvl_batch.batch import BatchRun

    run = BatchRun(batch_job(tmp_path, sim, batch={"poll_interval_s": 5}))
    assert run._poll_bounds("https://dashscope.aliyuncs.com/compatible-mode/v1") == (30.0, 60.0)
    assert run._poll_bounds(sim.base_url) == (5, 5)
    run = BatchRun(batch_job(tmp_path, sim, batch={"poll_interval_s": None}))
    assert run._poll_bounds("https://api.openai.com/v1") == (30.0, 60.0)
    assert run._poll_bounds(sim.base_url)[0] < 1


def test_failed_validation_names_the_line_and_leaves_rows_pending(tmp_path: Path) -> None:
    """A batch that fails validation stops the job with the provider's line-numbered errors; nothing is journaled."""
    with SimulatorThread(SimulatorConfig(batch_fail_validation=True)) as sim:
        job = batch_job(tmp_path, sim)
        with pytest.raises(JobError, match=r"failed validation.*\n\s+line 1: invalid_request") as info:
            run_job(job)
        assert info.value.summary.pending == 6 and info.value.summary.ok == 0
        assert len(load_results(job.output.path)) == 0
        assert processed(sim) == Counter()


def test_simulator_validation_reports_each_bad_line() -> None:
    """Duplicate custom_ids, a foreign url and a second model are reported with their line numbers."""
    lines = [
        b'{"custom_id":"a","url":"/v1/chat/completions","body":{"model":"m1"}}',
        b'{"custom_id":"a","url":"/v1/chat/completions","body":{"model":"m1"}}',
        b'{"custom_id":"b","url":"/v1/embeddings","body":{"model":"m2"}}',
        b"not json",
    ]
    _, errors = validate(b"\n".join(lines), "/v1/chat/completions", False)
    assert [(e["code"], e["line"]) for e in errors] == [
        ("duplicate_custom_id", 2), ("url_mismatch", 3), ("mismatched_model", 3), ("invalid_json_line", 4)]


def test_transient_line_error_goes_into_the_next_batch(tmp_path: Path, sim: SimulatorThread) -> None:
    """A line answered with a 500 in the error file is sent again in the next batch and ends ok (attempts 2)."""
    job = batch_job(tmp_path, sim, prompt="Describe row {id}. {note}")
    manifest = pd.read_csv(job.input.path)
    manifest.loc[2, "note"] = "[[sim:500:1]]"
    manifest.to_csv(job.input.path, index=False)
    summary = run_job(job)
    out = load_results(job.output.path).set_index("id")
    assert summary.ok == 6 and ops(sim)["batches.create"] == 2
    assert out.loc["row-0002", "attempts"] == 2 and (out.drop("row-0002")["attempts"] == 1).all()


def test_completed_with_zero_successes_is_not_success(tmp_path: Path, sim: SimulatorThread) -> None:
    """A batch whose every line failed (moderation) is 'completed', but the job says it failed."""
    job = batch_job(tmp_path, sim, prompt="Describe row {id}. [[sim:moderation]]")
    with pytest.raises(JobError, match="completed with 0 successful lines"):
        run_job(job)
    out = load_results(job.output.path)
    assert (out["status"] == "error").all() and (out["error_code"] == "data_inspection_failed").all()


def test_image_batch_outside_beijing_is_refused_before_upload(tmp_path: Path, sim: SimulatorThread) -> None:
    """mode = batch with region intl is refused (Beijing only for images) before anything is created."""
    job = batch_job(tmp_path, sim)
    job = job.model_copy(update={"model": job.model.model_copy(update={"base_url": None, "region": "intl"})})
    with pytest.raises(ConfigError, match="Beijing region only"):
        run_job(job)
    assert not job.output.path.exists() and ops(sim) == Counter()


def test_batches_lists_and_cancels(tmp_path: Path) -> None:
    """`batches OUT` shows each batch's state and counts; --cancel cancels a running one, and the re-run keeps
    the lines answered before the cancel and says the rest stay pending."""
    with SimulatorThread(SimulatorConfig(batch_lines_per_s=20)) as sim:
        job = batch_job(tmp_path, sim, rows=60)
        assert _run_cli(job, tmp_path, kill_at="created").returncode == -9
        os.environ["QWENVL_TEST_KEY"] = "sk-test"
        try:
            listed = list_batches(job.output.path, api_key_env="QWENVL_TEST_KEY")
            assert len(listed) == 1 and listed[0].status in ("validating", "in_progress")
            cancelled = cancel_batches(job.output.path, api_key_env="QWENVL_TEST_KEY")
            assert cancelled[0].status == "cancelling"
        finally:
            del os.environ["QWENVL_TEST_KEY"]
        with pytest.raises(JobError, match="was cancelled") as info:
            run_job(job)
        done = info.value.summary.ok
        assert 0 < done < 60 and len(load_results(job.output.path)) == done


def test_estimate_shows_batch_cost_beside_realtime(tmp_path: Path, sim: SimulatorThread) -> None:
    """estimate gives the Batch API cost (half) next to the realtime cost, and says batch has no cache discount."""
    estimate = estimate_job(batch_job(tmp_path, sim))
    assert estimate.batch_cost_low == pytest.approx(estimate.cost_low / 2)
    assert "no context-cache discount" in render_estimate(estimate, "text")


def test_provider_rules_cover_both_apis() -> None:
    """DashScope puts request extensions at the top level of body and takes 24h-336h; OpenAI keeps extra_body
    and takes 24h only; error lines in either spelling are read."""
    params = {"model": "m", "max_tokens": 5, "extra_body": {"enable_thinking": False}}
    assert DASHSCOPE.body(params, [])["enable_thinking"] is False
    assert OPENAI.body(params, [])["extra_body"] == {"enable_thinking": False}
    assert DASHSCOPE.check_window("14d") == "14d"
    with pytest.raises(ConfigError, match='"24h"'):
        OPENAI.check_window("48h")
    assert error_fields({"error": {"error_code": "x", "error_message": "y"}})[:2] == ("x", "y")
    assert error_fields({"error": {"code": "batch_expired", "message": "z"}})[0] == "batch_expired"
    assert error_fields({"response": {"status_code": 500, "body": {"error": {"code": "c", "message": "m"}}},
                         "error": None})[:3] == ("c", "m", 500)


def test_batch_chat_is_realtime_at_the_batch_host(tmp_path: Path, sim: SimulatorThread) -> None:
    """batch-chat: the Batch Chat host, an hour per request, high concurrency unless set; Beijing only."""
    raw = {"input": {"path": "m.csv"}, "output": {"path": "o"}, "model": {"name": "qwen3-vl-flash",
                                                                          "mode": "batch-chat"}}
    job = batch_chat_job(job_from_dict(raw, base_dir=tmp_path))
    assert job.model.endpoint == BATCH_CHAT_BASE_URL
    realtime = job_from_dict({**raw, "model": {"name": "qwen3-vl-flash", "region": "cn"}}, base_dir=tmp_path)
    assert job.endpoint_identity == realtime.endpoint_identity  # switching modes does not make rows "changed"
    assert job.limits.timeout_s == 3600 and job.limits.concurrency == 256
    raw["model"]["region"] = "intl"
    with pytest.raises(ConfigError, match="Beijing region only"):
        batch_chat_job(job_from_dict(raw, base_dir=tmp_path))


# -- kill -9 at every step ---------------------------------------------------------------------------------
STEPS = ["writing", "written", "upload", "uploaded", "create", "created", "poll", "downloaded", "journal", "journaled"]


def _run_cli(job: Any, tmp_path: Path, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """The job in a subprocess (the real CLI), optionally killed with SIGKILL right after a named step."""
    job_file = _job_file(job, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "QWENVL_BATCH_TEST_KILL_AT"}
    if kill_at:
        env["QWENVL_BATCH_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "qwenvl_batch", "run", str(job_file)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _job_file(job: Any, tmp_path: Path) -> Path:
    """The job as a TOML file for the CLI."""
    job_file = tmp_path / "job.toml"
    m = job.model
    job_file.write_text(f"""
[input]
path = "{job.input.path}"
[output]
path = "{job.output.path}"
[model]
name = "{m.name}"
base_url = "{m.base_url}"
api_key_env = "QWENVL_TEST_KEY"
api_key_optional = true
mode = "batch"
max_tokens = 100
[prompt]
user = "{job.prompt.user}"
[batch]
poll_interval_s = 0.05
max_lines_per_file = {job.batch.max_lines_per_file or 50000}
[run]
progress = "off"
""")
    return job_file


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_then_rerun_submits_every_row_once(tmp_path: Path, sim: SimulatorThread, step: str) -> None:
    """kill -9 right after a step, then a re-run: every row is in the output once, ok, and was submitted in exactly
    one batch (one batches.create per shard, one processed line per custom_id); provider files cleaned up."""
    job = batch_job(tmp_path, sim, rows=6, batch={"max_lines_per_file": 3})
    killed = _run_cli(job, tmp_path, kill_at=step)
    assert killed.returncode == -9, killed.stderr
    before = len(load_results(job.output.path))  # rows journaled before the kill (a reader takes no lock)
    rerun = run_job(job)  # the re-run, in this process
    assert rerun.pending == 0 and rerun.ok == 6 - before  # nothing journaled twice
    out = pd.read_parquet(job.output.path)
    assert sorted(out["id"]) == [f"row-{i:04d}" for i in range(6)] and (out["status"] == "ok").all()
    assert ops(sim)["batches.create"] == 2 and ops(sim)["files.create"] == 2  # nothing uploaded twice either
    assert len(processed(sim)) == 6 and set(processed(sim).values()) == {1}
    assert sim.app[BATCH_KEY].files == {}


def test_fallback_realtime_sends_what_the_batches_left(tmp_path: Path) -> None:
    """With fallback = realtime and one round, the rows an expired batch did not run are answered in realtime."""
    with SimulatorThread(SimulatorConfig(batch_expire_after_lines=2)) as sim:
        job = batch_job(tmp_path, sim, batch={"max_rounds": 1, "fallback": "realtime"})
        summary = run_job(job)
        out = load_results(job.output.path)
        assert summary.ok == 6 and summary.pending == 0
        assert out["batch_id"].notna().sum() == 2 and out["batch_id"].isna().sum() == 4
        realtime = [e for e in sim.requests if "kind" not in e]
        assert len(realtime) == 4


def test_row_too_large_for_a_line_is_an_input_error(tmp_path: Path, sim: SimulatorThread) -> None:
    """A row whose line exceeds the per-line limit is an input error naming the fix; nothing is uploaded."""
    job = batch_job(tmp_path, sim, rows=2, batch={"max_file_mb": 0.0001})
    summary = run_job(job)
    out = load_results(job.output.path)
    assert summary.errors == 2 and (out["error_code"] == "batch_line_too_large").all()
    assert "http(s) URL" in out["error_message"].iloc[0] and ops(sim) == Counter()


def test_in_flight_batches_are_not_reattached_elsewhere(tmp_path: Path, sim: SimulatorThread) -> None:
    """Batches in flight at one endpoint: a run pointed at another is refused (it would submit them twice)."""
    job = batch_job(tmp_path, sim)
    assert _run_cli(job, tmp_path, kill_at="created").returncode == -9
    other = job.model_copy(update={"model": job.model.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})})
    with pytest.raises(ConfigError, match="in flight at"):
        run_job(other)


def test_ctrl_c_while_waiting_stops_cleanly_and_the_rerun_reattaches(tmp_path: Path) -> None:
    """SIGINT while polling exits 130 with the batch recorded; the re-run re-attaches without a second create."""
    with SimulatorThread(SimulatorConfig(batch_lines_per_s=4)) as sim:
        job = batch_job(tmp_path, sim, rows=8)
        fresh = _job_file(job, tmp_path)
        proc = subprocess.Popen([sys.executable, "-m", "qwenvl_batch", "run", str(fresh)], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        state = state_path(state_dir_for(job.output.path))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and '"created"' not in (state.read_text() if state.exists() else ""):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "keep running at the provider" in err
        rerun = subprocess.run([sys.executable, "-m", "qwenvl_batch", "run", str(fresh)], capture_output=True,
                               text=True, timeout=120, check=False)
        assert rerun.returncode == 0, rerun.stderr
        assert ops(sim)["batches.create"] == 1 and len(pd.read_parquet(job.output.path)) == 8


def test_batches_command_lists_the_output_batches(tmp_path: Path, sim: SimulatorThread, capsys: Any) -> None:
    """`qwenvl-batch batches OUT` prints one line per batch with its status and counts; an output run in
    realtime says it has no batches (exit 2)."""
    from qwenvl_batch.cli import main

    job = batch_job(tmp_path, sim, rows=4, batch={"max_lines_per_file": 2})
    run_job(job)
    assert main(["batches", str(job.output.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("completed" in line and "2/2" in line for line in lines)
    assert main(["batches", str(tmp_path / "nothing.parquet")]) == 2
    assert "no batches recorded" in capsys.readouterr().err
