"""Interop (opt-in, `pytest -m interop`): a real LiteLLM proxy in front of the project's simulator.

LiteLLM is independent code that re-wraps errors, renames headers, retries on its own and turns a cut upstream
stream into an in-band error event; these tests check the runner stays truthful behind it. Install it with
`pip install -e ".[interop]"` (pure Python, ~40 s); without it the module is skipped with that message.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import image_rows, write_manifest

from qwenvl_batch import JobError, load_results, run_job
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread

pytestmark = pytest.mark.interop
if importlib.util.find_spec("litellm") is None:  # find_spec, not import: importing the proxy takes ~10 s
    pytest.skip("the interop suite needs the LiteLLM proxy: pip install -e '.[interop]'", allow_module_level=True)

MASTER_KEY = "sk-interop-master"
MARKED = {"user": "Describe row {id}. {note}"}
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _litellm_command() -> list[str]:
    script = Path(sys.executable).with_name("litellm")
    return [str(script)] if script.exists() else [shutil.which("litellm") or "litellm"]


class Proxy:
    """A LiteLLM proxy process on 127.0.0.1 forwarding ``qwen3-vl-flash`` to the simulator."""

    def __init__(self, upstream: str, folder: Path, *, num_retries: int) -> None:
        self.port = _free_port()
        config = folder / f"litellm-{num_retries}.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: qwen3-vl-flash\n"
            "    litellm_params:\n"
            "      model: openai/qwen3-vl-flash\n"
            f"      api_base: {upstream}\n"
            "      api_key: sk-upstream\n"
            "litellm_settings:\n"
            f"  num_retries: {num_retries}\n"
            "router_settings:\n"
            f"  num_retries: {num_retries}\n"
        )
        env = {**os.environ, "LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "LITELLM_TELEMETRY": "False", "NO_PROXY": "127.0.0.1,localhost"}
        self.log = (folder / f"litellm-{num_retries}.log").open("w")
        self.process = subprocess.Popen(
            [*_litellm_command(), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self._wait_until_up()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the LiteLLM proxy exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/liveliness", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the LiteLLM proxy did not start within {START_TIMEOUT_S:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimulatorThread]:
    """The simulator as the proxy's upstream (DashScope-shaped bodies; Retry-After 1 s on its 429s)."""
    with SimulatorThread(SimulatorConfig(retry_after_s=1.0)) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The proxy with its own retries off (num_retries: 0), as the README recommends."""
    running = Proxy(upstream.base_url, tmp_path_factory.mktemp("litellm"), num_retries=0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def retrying_proxy(upstream: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The proxy with its own retries on (num_retries: 2), the default a user may leave in place."""
    running = Proxy(upstream.base_url, tmp_path_factory.mktemp("litellm"), num_retries=2)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENVL_TEST_KEY", MASTER_KEY)


def _job(tmp_path: Path, make_job: Any, proxy: Proxy, n: int, note: str = "", **kwargs: Any) -> Any:
    rows = image_rows(tmp_path, n)
    for row in rows:
        row["note"] = note
    model = {"base_url": proxy.base_url, "api_key_optional": False, **kwargs.pop("model", {})}
    limits = {"timeout_s": 60.0, **kwargs.pop("limits", {})}
    return make_job(write_manifest(tmp_path / "m.csv", rows), prompt=MARKED, model=model, limits=limits, **kwargs)


def _out(job: Any) -> pd.DataFrame:
    return load_results(job.output.path).set_index("id").sort_index()


@pytest.mark.parametrize("stream", [False, True])
def test_clean_run(tmp_path: Path, make_job: Any, proxy: Proxy, stream: bool) -> None:
    """Through the proxy every row is ok with the server's own usage (images included), one attempt each."""
    job = _job(tmp_path, make_job, proxy, 4, model={"stream": stream})
    summary = run_job(job)
    out = _out(job)
    assert summary.ok == 4 and (out["usage_source"] == "reported").all() and (out["attempts"] == 1).all()
    assert out["image_tokens"].gt(0).all() and out["warning"].isna().all()


def test_429_with_proxy_retries_off_honours_llm_provider_retry_after(tmp_path: Path, make_job: Any,
                                                                     proxy: Proxy, upstream: SimulatorThread) -> None:
    """The proxy drops Retry-After but forwards llm_provider-retry-after: the runner waits that long, then the row
    is ok after exactly two attempts upstream."""
    job = _job(tmp_path, make_job, proxy, 1, note="[[sim:429:1]]",
               limits={"retry_initial_s": 0.01, "retry_max_s": 0.01})
    summary = run_job(job)
    out = _out(job)
    assert summary.ok == 1 and out["attempts"].iloc[0] == 2
    assert sum(summary.retries.values()) == 1
    times = [r["t"] for r in upstream.requests if "[[sim:429:1]]" in r["text"]]
    assert len(times) == 2 and times[1] - times[0] >= 0.9


def test_429_with_proxy_retries_on_counts_the_hidden_attempts(tmp_path: Path, make_job: Any,
                                                             retrying_proxy: Proxy, upstream: SimulatorThread) -> None:
    """A 429 the proxy retried on its own still shows in `attempts` (from x-litellm-attempted-retries), flagged."""
    job = _job(tmp_path, make_job, retrying_proxy, 1, note="[[sim:429:1]] hidden")
    summary = run_job(job)
    out = _out(job)
    upstream_attempts = sum(1 for r in upstream.requests if "[[sim:429:1]] hidden" in r["text"])
    assert summary.ok == 1 and upstream_attempts == 2
    assert out["attempts"].iloc[0] == upstream_attempts and out["warning"].iloc[0] == "proxy_retries=1"


def test_billing_stop(tmp_path: Path, make_job: Any, proxy: Proxy) -> None:
    """Arrearage re-wrapped as a plain 400 (code "400") stops the job with every row pending."""
    job = _job(tmp_path, make_job, proxy, 10, note="[[sim:arrears]]", limits={"concurrency": 2})
    with pytest.raises(JobError, match="good standing") as caught:
        run_job(job)
    assert caught.value.summary.pending == 10


def test_moderation_keeps_its_code(tmp_path: Path, make_job: Any, proxy: Proxy) -> None:
    """A moderation refusal through the proxy is content_filter / data_inspection_failed after one attempt."""
    job = _job(tmp_path, make_job, proxy, 2, note="[[sim:moderation]]")
    run_job(job)
    out = _out(job)
    assert (out["error_type"] == "content_filter").all() and (out["error_code"] == "data_inspection_failed").all()
    assert (out["attempts"] == 1).all()


def test_cut_stream_is_retried(tmp_path: Path, make_job: Any, proxy: Proxy) -> None:
    """An upstream stream cut mid-answer reaches us as an in-band error event: retried, then ok, never a crash."""
    job = _job(tmp_path, make_job, proxy, 2, note="[[sim:truncate:1]]", model={"stream": True})
    summary = run_job(job)
    out = _out(job)
    assert summary.ok == 2 and (out["attempts"] == 2).all() and summary.retries == {"stream_error": 2}


def test_in_stream_moderation_is_a_content_filter_row(tmp_path: Path, make_job: Any, proxy: Proxy) -> None:
    """Output moderation inside the stream, re-wrapped by the proxy as an APIConnectionError event, is still a
    content_filter row error."""
    job = _job(tmp_path, make_job, proxy, 1, note="[[sim:stream_error]]", model={"stream": True})
    run_job(job)
    out = _out(job)
    assert (out["status"].iloc[0], out["error_type"].iloc[0]) == ("error", "content_filter")


def test_wrong_proxy_key_stops(tmp_path: Path, make_job: Any, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key the proxy does not accept stops the job instead of erroring every row."""
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-not-the-proxy-key")
    job = _job(tmp_path, make_job, proxy, 6, limits={"concurrency": 2})
    with pytest.raises(JobError, match="proxy's own key") as caught:
        run_job(job)
    assert caught.value.summary.pending == 6 and "sk-not-the-proxy-key" not in str(caught.value)


def test_model_the_proxy_does_not_know_stops(tmp_path: Path, make_job: Any, proxy: Proxy) -> None:
    """A model name missing from the proxy's model_list stops the job with the model hint."""
    job = _job(tmp_path, make_job, proxy, 6, model={"name": "qwen3-vl-plus"}, limits={"concurrency": 2})
    with pytest.raises(JobError, match="model_list") as caught:
        run_job(job)
    assert caught.value.code == "model_not_found" and caught.value.summary.pending == 6
