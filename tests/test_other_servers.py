"""End to end behind servers this project did not write, played by the simulator's personas (llama.cpp, vLLM, a
LiteLLM proxy): every case of issue 10's list is a test here — nothing crashes, nothing silently wrong is `ok`."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import image_rows, write_manifest

from qwenvl_batch import JobError, load_results, run_job
from qwenvl_batch.client import ChatClient
from qwenvl_batch.errors import SpendCapReached
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread

MARKED = {"user": "Describe row {id}. {note}"}


@pytest.fixture
def persona(request: pytest.FixtureRequest) -> Iterator[SimulatorThread]:
    """A simulator answering like the server named by the test's parameter."""
    with SimulatorThread(SimulatorConfig(persona=request.param, retry_after_s=0.2)) as server:
        yield server


def _job(tmp_path: Path, make_job: Any, server: SimulatorThread, n: int, note: str = "", **kwargs: Any) -> Any:
    rows = image_rows(tmp_path, n)
    for row in rows:
        row["note"] = note
    model = {"base_url": server.base_url, **kwargs.pop("model", {})}
    return make_job(write_manifest(tmp_path / "m.csv", rows), prompt=MARKED, model=model, **kwargs)


def _out(job: Any) -> pd.DataFrame:
    return load_results(job.output.path).set_index("id").sort_index()


@pytest.mark.parametrize("persona", ["llamacpp"], indirect=True)
def test_server_that_ignores_images_stops_the_job(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """Rows billed fewer prompt tokens than their text alone are not ok, and three in a row stop the job."""
    job = _job(tmp_path, make_job, persona, 15, limits={"concurrency": 1})
    with pytest.raises(JobError, match="this server ignored the images: .* is the model multimodal / is the chat "
                                       "template right") as caught:
        run_job(job)
    out = _out(job)
    assert len(out) == 3 and (out["status"] == "error").all()
    assert (out["error_code"] == "image_ignored_by_server").all() and (out["warning"] == "image_ignored_by_server").all()
    assert out["response"].str.len().gt(0).all() and out["cost"].gt(0).all()  # the paid answer is kept
    assert caught.value.summary.pending == 12


@pytest.mark.parametrize("persona", ["llamacpp-noimage"], indirect=True)
def test_image_input_not_supported_stops_at_once(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """llama.cpp's "image input is not supported" (a 500) stops the job at once instead of erroring every row."""
    job = _job(tmp_path, make_job, persona, 10, limits={"concurrency": 2})
    with pytest.raises(JobError, match="image input is not supported.*does not take images") as caught:
        run_job(job)
    assert caught.value.code == "model_not_multimodal"
    assert caught.value.summary.pending == 10 and len(persona.requests) <= 2


@pytest.mark.parametrize("persona", ["llamacpp"], indirect=True)
def test_missing_stream_usage_is_estimated_never_zero(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """A stream without usage records usage_source = estimate, a non-zero cost, and the summary says so."""
    job = _job(tmp_path, make_job, persona, 4, model={"stream": True})
    summary = run_job(job)
    out = _out(job)
    assert (out["status"] == "ok").all() and (out["usage_source"] == "estimate").all()
    assert out["prompt_tokens"].gt(0).all() and out["completion_tokens"].gt(0).all() and out["cost"].gt(0).all()
    assert summary.usage_estimated == 4 and summary.prompt_tokens > 0
    assert any("usage not reported for 4 rows" in line for line in summary.lines())


def test_reported_usage_is_marked_reported(tmp_path: Path, sim, make_job) -> None:
    """Against a server that reports usage, every row says usage_source = reported."""
    job = _job(tmp_path, make_job, sim, 2, model={"stream": True})
    assert run_job(job).usage_estimated == 0
    assert (_out(job)["usage_source"] == "reported").all()


@pytest.mark.parametrize("persona", ["llamacpp"], indirect=True)
def test_spend_cap_counts_rows_without_usage(tmp_path: Path, make_job, persona: SimulatorThread, priced: Path) -> None:
    """Without usage the spend cap counts each answer at its worst case, so it still fires before the cap."""
    prices = priced
    job = _job(tmp_path, make_job, persona, 10, model={"stream": True, "max_tokens": 20},
               limits={"max_cost": 5.0, "concurrency": 2}, pricing={"file": str(prices)})
    with pytest.raises(SpendCapReached):
        run_job(job)
    out = _out(job)
    assert 2 <= len(out) < 10 and out["cost"].sum() <= 5.0


@pytest.mark.parametrize("persona", ["llamacpp"], indirect=True)
def test_deterministic_validation_500_stops_the_job(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """A 500 whose body is a validation error is not retried, and the same failure on the first rows stops the job
    with the rows left pending."""
    job = _job(tmp_path, make_job, persona, 20, note="[[sim:validation]]", limits={"concurrency": 2})
    with pytest.raises(JobError, match="every request fails with invalid_request server_rejected_input.*int_parsing"
                                       ".* — check") as caught:
        run_job(job)
    assert caught.value.summary.pending == 20  # nothing recorded: re-run after the fix sends them all
    assert len(persona.requests) <= 7  # each row tried once, stopped after the first 5
    assert not job.output.path.exists() or len(load_results(job.output.path)) == 0


def test_a_few_validation_500s_among_successes_are_row_errors(tmp_path: Path, sim, make_job) -> None:
    """Validation 500s on some rows only are recorded on those rows after one attempt; the job goes on."""
    rows = image_rows(tmp_path, 6)
    for i, row in enumerate(rows):
        row["note"] = "[[sim:validation]]" if i % 3 == 0 else ""
    job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt=MARKED, limits={"concurrency": 1})
    summary = run_job(job)
    out = _out(job)
    assert summary.errors == 2 and summary.ok == 4
    failed = out[out["status"] == "error"]
    assert (failed["error_code"] == "server_rejected_input").all() and (failed["attempts"] == 1).all()


@pytest.mark.parametrize("persona", ["litellm"], indirect=True)
def test_in_band_stream_error_does_not_crash(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """An error event inside a 200 stream is retried with its real message; the run finishes."""
    job = _job(tmp_path, make_job, persona, 3, note="[[sim:stream_error:1]]", model={"stream": True})
    summary = run_job(job)
    out = _out(job)
    assert (out["status"] == "ok").all() and (out["attempts"] == 2).all()
    assert summary.retries == {"stream_error": 3}


@pytest.mark.parametrize("persona", ["litellm"], indirect=True)
def test_in_band_stream_error_every_time_is_a_row_error(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """A stream that always ends in an error event ends as a row error carrying the proxy's real message."""
    job = _job(tmp_path, make_job, persona, 1, note="[[sim:stream_error]]", model={"stream": True})
    run_job(job)
    out = _out(job)
    assert out["status"].tolist() == ["error"]
    assert "upstream closed the stream" in out["error_message"].iloc[0]


def test_in_band_moderation_event_is_a_content_filter_row(tmp_path: Path, sim, make_job) -> None:
    """DashScope's output moderation arriving inside a stream is recorded as content_filter, not retried."""
    job = _job(tmp_path, make_job, sim, 1, note="[[sim:stream_error]]", model={"stream": True})
    run_job(job)
    out = _out(job)
    assert (out["status"].iloc[0], out["error_type"].iloc[0]) == ("error", "content_filter")
    assert out["error_code"].iloc[0] == "data_inspection_failed" and out["attempts"].iloc[0] == 1


@pytest.mark.parametrize("persona", ["litellm"], indirect=True)
def test_proxy_completed_cut_stream_is_retried(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """A stream the proxy closed with usage and [DONE] but no finish_reason is cut: retried, never stored as ok."""
    job = _job(tmp_path, make_job, persona, 2, note="[[sim:truncate:1]]", model={"stream": True})
    summary = run_job(job)
    out = _out(job)
    assert (out["status"] == "ok").all() and (out["attempts"] == 2).all()
    assert summary.retries == {"stream_cut": 2}
    assert out["finish_reason"].eq("stop").all()


@pytest.mark.parametrize("persona", ["litellm"], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
def test_billing_stop_behind_the_proxy(tmp_path: Path, make_job, persona: SimulatorThread, stream: bool) -> None:
    """Arrearage re-wrapped by the proxy as a plain 400 with code "400" still stops the job, rows pending."""
    job = _job(tmp_path, make_job, persona, 20, note="[[sim:arrears]]", model={"stream": stream},
               limits={"concurrency": 2})
    with pytest.raises(JobError, match="good standing") as caught:
        run_job(job)
    assert caught.value.code == "Arrearage" and caught.value.summary.pending == 20


@pytest.mark.parametrize("persona", ["litellm"], indirect=True)
def test_moderation_behind_the_proxy_keeps_its_code(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """A moderation refusal re-wrapped by the proxy is content_filter / data_inspection_failed, not "400"."""
    job = _job(tmp_path, make_job, persona, 2, note="[[sim:moderation]]")
    run_job(job)
    out = _out(job)
    assert (out["error_type"] == "content_filter").all() and (out["error_code"] == "data_inspection_failed").all()


@pytest.mark.parametrize("persona", ["litellm"], indirect=True)
def test_proxy_retry_after_is_honoured(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """Behind the proxy the 429's wait comes from llm_provider-retry-after (Retry-After itself is dropped)."""
    job = _job(tmp_path, make_job, persona, 1, note="[[sim:429:1]]",
               limits={"retry_initial_s": 0.001, "retry_max_s": 0.001})
    summary = run_job(job)
    times = [r["t"] for r in persona.requests]
    assert summary.ok == 1 and times[1] - times[0] >= 0.19  # the 0.2 s asked for, not the 1 ms backoff


@pytest.mark.parametrize("persona", ["litellm-retrying"], indirect=True)
def test_hidden_proxy_retries_are_counted(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """Retries the proxy made on its own count in `attempts` and are flagged in `warning` and the summary."""
    job = _job(tmp_path, make_job, persona, 2)
    summary = run_job(job)
    out = _out(job)
    assert (out["attempts"] == 3).all() and (out["warning"] == "proxy_retries=2").all()
    assert summary.warnings == {"proxy_retries": 2}


@pytest.mark.parametrize("persona", ["vllm"], indirect=True)
def test_flat_error_envelope_keeps_the_message(tmp_path: Path, make_job, persona: SimulatorThread) -> None:
    """A flat {"object": "error", ...} body with an int code is a row error with the server's message."""
    job = _job(tmp_path, make_job, persona, 1, note="[[sim:badparam]]")
    run_job(job)
    out = _out(job)
    assert out["error_type"].iloc[0] == "invalid_request" and "invalid parameter" in out["error_message"].iloc[0]
    assert out["error_code"].iloc[0] == "BadRequestError"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_endpoint_down_stops_the_job_with_rows_pending(tmp_path: Path, sim, make_job) -> None:
    """Nothing listening: the job stops with "cannot connect to HOST:PORT", every row pending, nothing recorded as
    timed out; starting the server and re-running completes the job."""
    port = _closed_port()
    job = _job(tmp_path, make_job, sim, 6, model={"base_url": f"http://127.0.0.1:{port}/v1"},
               limits={"concurrency": 2, "max_attempts": 3})
    with pytest.raises(JobError, match=rf"cannot connect to 127\.0\.0\.1:{port} — is the server running / is the "
                                       r"base_url right\?") as caught:
        run_job(job)
    assert caught.value.summary.pending == 6
    assert "refused" in str(caught.value).lower() and "timed out" not in str(caught.value)
    with SimulatorThread(SimulatorConfig(), port=port):
        assert run_job(job).ok == 6


def test_an_arbitrary_exception_in_one_attempt_does_not_crash(tmp_path: Path, sim, make_job,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception nobody expected on one row's attempts is that row's error; the run finishes."""
    original = ChatClient.complete

    async def flaky(self: ChatClient, messages: list[dict[str, Any]]) -> Any:
        if "row-0001" in str(messages):
            raise KeyError("choices")
        return await original(self, messages)

    monkeypatch.setattr(ChatClient, "complete", flaky)
    job = _job(tmp_path, make_job, sim, 4)
    summary = run_job(job)
    out = _out(job)
    assert summary.ok == 3 and summary.errors == 1
    assert out.loc["row-0001", "error_type"] == "client" and "KeyError" in out.loc["row-0001", "error_message"]


def test_the_same_arbitrary_exception_everywhere_stops_the_job(tmp_path: Path, sim, make_job,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error on every row is the job's: it stops after the first rows, which stay pending."""
    async def broken(self: ChatClient, messages: list[dict[str, Any]]) -> Any:
        raise RuntimeError("decoder exploded at byte 17")

    monkeypatch.setattr(ChatClient, "complete", broken)
    job = _job(tmp_path, make_job, sim, 12, limits={"concurrency": 2})
    with pytest.raises(JobError, match="every request fails with client unexpected_error") as caught:
        run_job(job)
    assert caught.value.summary.pending == 12
