"""Issue 18 (server half): a hostile server's bodies, streams and headers never crash or stall the job, never
cost a re-purchase, and never put a secret into the output, a report or the screen (tests/hostile_server.py)."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import FAST_LIMITS, image_rows, job_file, write_manifest
from hostile_server import HostileServer

from qwenvl_batch import load_results, run_job
from qwenvl_batch.cli import main
from qwenvl_batch.client import Completion
from qwenvl_batch.config import JobConfig, job_from_dict
from qwenvl_batch.errors import ConfigError, JobError
from qwenvl_batch.policy import UNUSABLE_ANSWER_ATTEMPTS, retry_after
from qwenvl_batch.redact import install_log_redaction, redact, register_secret, split_url_credentials
from qwenvl_batch.response_guard import within_request
from qwenvl_batch.retrying import bounded_wait

KEY = "sk-hostile0123456789abcdef"  # what the tests' environment holds as the API key
BAD = "row-0001"  # the row that gets the misbehaviour; row-0000 and row-0002 are answered normally


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    """One hostile server for the module (its gzip bomb is built once)."""
    with HostileServer() as server:
        yield server


def _job(tmp_path: Path, server: HostileServer, kind: str, *, stream: bool = False, model: dict[str, Any] | None = None,
         limits: dict[str, Any] | None = None, rows: int = 3) -> JobConfig:
    """Three rows; the middle one carries the hostile marker."""
    manifest_rows = image_rows(tmp_path, rows)
    for row in manifest_rows:
        row["note"] = f"HOSTILE:{kind}" if row["id"] == BAD else "HOSTILE:ok"
    raw = {
        "input": {"path": str(write_manifest(tmp_path / "m.csv", manifest_rows))},
        "output": {"path": str(tmp_path / "out")},
        "model": {"name": "qwen3-vl-flash", "base_url": server.base_url, "api_key_env": "QWENVL_HOSTILE_KEY",
                  "stream": stream, **(model or {})},
        "prompt": {"user": "Describe row {id}. {note}"},
        "limits": {**FAST_LIMITS, "timeout_s": 5.0, **(limits or {})},
        "run": {"progress": "off"},
    }
    return job_from_dict(raw, base_dir=tmp_path)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENVL_HOSTILE_KEY", KEY)


def _out(job: JobConfig) -> pd.DataFrame:
    return load_results(job.output.path).set_index("id").sort_index()


def _asked(server: HostileServer, kind: str) -> int:
    return sum(n for (row, k), n in server.asked.items() if k == kind and row == BAD)


def _assert_good_rows_ok(out: pd.DataFrame) -> None:
    good = out.drop(index=BAD)
    assert (good["status"] == "ok").all() and good["response"].str.len().gt(0).all()


# -- one response never crashes or stalls the job ----------------------------------------------------------------

@pytest.mark.parametrize(("kind", "stream", "reason"), [
    ("bad_json", False, "could not be decoded: JSONDecodeError"),
    ("deep_json", False, "nested too deeply"),
    ("gzip_bomb", False, "inflates past the"),
    ("sse_bad_chunk", True, "could not be decoded: JSONDecodeError"),
])
def test_unusable_answer_is_recorded_once_and_not_bought_again(tmp_path: Path, hostile: HostileServer, kind: str,
                                                               stream: bool, reason: str) -> None:
    """A 200 that cannot be read is tried a bounded number of times, recorded with its reason, and a re-run
    does not buy it again; the other rows finish."""
    job = _job(tmp_path, hostile, kind, stream=stream)
    run_job(job)
    out = _out(job)
    _assert_good_rows_ok(out)
    bad = out.loc[BAD]
    assert bad["status"] == "error" and bad["error_type"] == "server" and reason in bad["error_message"]
    asked = _asked(hostile, kind)
    assert 1 <= asked <= UNUSABLE_ANSWER_ATTEMPTS and bad["attempts"] == asked
    run_job(job)  # a re-run: the recorded row is not sent again
    assert _asked(hostile, kind) == asked


def test_gzip_bomb_is_read_within_the_size_bound(tmp_path: Path, hostile: HostileServer) -> None:
    """A gzip body inflating to 1 GB is cut at the bound: the run's memory stays far below the inflated size."""
    hostile.bomb()  # built before measuring (the server's own buffer is not the client's)
    job = _job(tmp_path, hostile, "gzip_bomb", limits={"concurrency": 1})
    tracemalloc.start()
    try:
        run_job(job)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _out(job).loc[BAD, "status"] == "error"
    assert peak < 300 * 1024**2, f"peak {peak / 1024**2:.0f} MB"


@pytest.mark.parametrize("kind", ["usage_wrong_type", "usage_huge", "usage_negative"])
def test_insane_usage_is_recorded_raw_and_estimated(tmp_path: Path, hostile: HostileServer, kind: str) -> None:
    """Usage of the wrong type, 10^15 tokens or negative: the answer is kept once, the raw usage is in warning,
    the tokens and cost are the estimate, and with tokens_per_minute set the later rows do not wait on the meter."""
    job = _job(tmp_path, hostile, kind, rows=6, limits={"concurrency": 1, "tokens_per_minute": 60_000},
               model={"name": "qwen3-vl-flash"})
    started = time.monotonic()
    summary = run_job(job)
    elapsed = time.monotonic() - started
    out = _out(job)
    assert (out["status"] == "ok").all() and summary.ok == 6
    bad = out.loc[BAD]
    assert bad["usage_source"] == "estimate" and bad["warning"].startswith("usage_invalid=")
    assert 0 < bad["prompt_tokens"] < 10_000 and 0 <= bad["completion_tokens"] < 1000
    assert (out.drop(index=BAD)["usage_source"] == "reported").all()
    assert _asked(hostile, kind) == 1
    assert elapsed < 15, f"the run took {elapsed:.1f}s: something waited on the token meter"


def test_usage_far_above_the_request_is_not_trusted(tmp_path: Path, hostile: HostileServer) -> None:
    """A count above any sane bound for the request (here 10^15 tokens) never reaches the cost columns."""
    job = _job(tmp_path, hostile, "usage_huge")
    run_job(job)
    bad = _out(job).loc[BAD]
    assert bad["total_tokens"] < 10_000 and "1000000000000000" in bad["warning"]


def test_usage_over_the_bound_for_this_request_is_dropped_with_its_raw_values() -> None:
    """500k prompt tokens for a request estimated at 300 is above the request's bound (not the absolute one):
    the counts are dropped (to be estimated) and the warning keeps them; sane usage is kept as it is."""
    sane = Completion(content="x", reasoning=None, finish_reason="stop", model="m", prompt_tokens=300,
                      completion_tokens=20, total_tokens=320, reasoning_tokens=0, cached_tokens=None,
                      image_tokens=None, request_id=None)
    assert within_request(sane, 300) is sane
    huge = dataclasses.replace(sane, prompt_tokens=500_000, total_tokens=500_020)
    checked = within_request(huge, 300)
    assert checked.prompt_tokens is None and checked.total_tokens is None
    assert checked.warning is not None and checked.warning.startswith('usage_invalid={"prompt_tokens": 500000')


def test_lone_surrogate_is_replaced_and_noted(tmp_path: Path, hostile: HostileServer) -> None:
    """A lone surrogate in the answer is stored as U+FFFD, the row is ok, and warning says the text was changed."""
    job = _job(tmp_path, hostile, "surrogate")
    run_job(job)
    out = _out(job)
    _assert_good_rows_ok(out)
    bad = out.loc[BAD]
    assert bad["status"] == "ok" and bad["response"] == "a cat \ufffd on a mat"
    assert bad["warning"].startswith("text_sanitized")


# -- a complete stream is complete ------------------------------------------------------------------------------

def test_complete_stream_without_done_is_accepted_at_once(tmp_path: Path, hostile: HostileServer) -> None:
    """finish_reason and usage, then keep-alive comments and no [DONE]: the answer is kept, bought once, and
    the row does not wait for the total timeout."""
    job = _job(tmp_path, hostile, "sse_no_done", stream=True, limits={"timeout_s": 20.0})
    started = time.monotonic()
    run_job(job)
    elapsed = time.monotonic() - started
    bad = _out(job).loc[BAD]
    assert bad["status"] == "ok" and bad["response"] == "a streamed answer" and bad["usage_source"] == "reported"
    assert _asked(hostile, "sse_no_done") == 1 and bad["attempts"] == 1
    assert elapsed < 10


# -- every wait bounded by the row's budget ---------------------------------------------------------------------

def test_huge_retry_after_and_backoff_are_capped_by_the_retry_budget(tmp_path: Path, hostile: HostileServer) -> None:
    """Retry-After: 999999 / retry-after-ms: 1e12 with retry_initial_s = 1e9: the row waits at most what remains
    of max_retry_time_s, then is answered."""
    job = _job(tmp_path, hostile, "retry_after_once",
               limits={"max_retry_time_s": 1.5, "retry_initial_s": 1e9, "retry_max_s": 1e9})
    started = time.monotonic()
    run_job(job)
    elapsed = time.monotonic() - started
    out = _out(job)
    assert (out["status"] == "ok").all() and out.loc[BAD, "attempts"] == 2
    assert elapsed < 8, f"the run took {elapsed:.1f}s"


def test_stated_rate_limits_that_admit_nothing_are_ignored(tmp_path: Path, hostile: HostileServer) -> None:
    """x-ratelimit-limit-requests: 1e-9 (and NaN / 1e-300 token limits) in an answer: the later rows are not
    held back by a limit under which no request would ever be admitted."""
    job = _job(tmp_path, hostile, "ratelimit_tiny", rows=6, limits={"concurrency": 1})
    started = time.monotonic()
    summary = run_job(job)
    assert summary.ok == 6 and time.monotonic() - started < 15


@pytest.mark.parametrize(("wait", "budget", "elapsed", "expected"), [
    (999999.0, 20.0, 5.0, 15.0),
    (1e9, 20.0, 0.0, 20.0),
    (3.0, 20.0, 5.0, 3.0),
    (3.0, 20.0, 25.0, 0.0),
    (math.nan, 20.0, 5.0, 15.0),
    (-1.0, 20.0, 5.0, 0.0),
])
def test_bounded_wait_table(wait: float, budget: float, elapsed: float, expected: float) -> None:
    """A wait is cut to what remains of the retry budget, never negative, never NaN."""
    assert bounded_wait(wait, budget, elapsed) == expected


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after-ms": "1e12"}, 120.0),
    ({"retry-after": "999999"}, 120.0),
    ({"retry-after": "nan"}, None),
    ({"retry-after-ms": "nan"}, None),
    ({"retry-after": "inf"}, 120.0),
    ({"retry-after": "-5"}, 0.0),
])
def test_retry_after_never_nan_or_unbounded(headers: dict[str, str], expected: float | None) -> None:
    """The server's Retry-After is read within [0, cap]; NaN is no wait asked at all."""
    assert retry_after(headers) == expected


@pytest.mark.parametrize(("limits", "key"), [
    ({"timeout_s": math.inf}, "timeout_s"),
    ({"timeout_s": math.nan}, "timeout_s"),
    ({"retry_initial_s": math.inf}, "retry_initial_s"),
    ({"max_retry_time_s": math.nan}, "max_retry_time_s"),
    ({"requests_per_minute": 1e-9}, "requests_per_minute"),
    ({"tokens_per_minute": 1e-9}, "tokens_per_minute"),
])
def test_unusable_limits_are_config_errors(tmp_path: Path, hostile: HostileServer, limits: dict[str, float],
                                           key: str) -> None:
    """A non-finite value, or a limit so low that no request could ever be admitted, is a config error naming
    the key, before anything is sent."""
    with pytest.raises(ConfigError, match=key):
        _job(tmp_path, hostile, "ok", limits=limits)


def test_infinite_timeout_on_the_command_line_is_a_clear_error(tmp_path: Path, hostile: HostileServer,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--timeout inf` exits with a config error naming the key, no traceback."""
    job_path = _job_file(tmp_path, hostile.base_url, "ok")
    assert main(["run", str(job_path), "--timeout", "inf", "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert "timeout_s" in err and "finite" in err and "Traceback" not in err


# -- secrets ----------------------------------------------------------------------------------------------------

def _job_file(tmp_path: Path, base_url: str, kind: str, *, model: dict[str, Any] | None = None,
              key_env: str = "QWENVL_HOSTILE_KEY") -> Path:
    rows = image_rows(tmp_path, 3)
    for row in rows:
        row["note"] = f"HOSTILE:{kind}" if row["id"] == BAD else "HOSTILE:ok"
    return job_file(tmp_path, base_url, rows=rows, prompt="Describe row {id}. {note}",
                    model={"api_key_env": key_env, **(model or {})},
                    limits={"concurrency": 2, "max_attempts": 2, "retry_max_s": 0.05})


def test_echoed_key_never_reaches_parquet_report_or_screen(tmp_path: Path, hostile: HostileServer,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A server that echoes the Authorization header in its error: the key is in no stored column, no report
    format, nothing on stdout or stderr."""
    job_path = _job_file(tmp_path, hostile.base_url, "echo_auth")
    assert main(["run", str(job_path), "--progress", "off", "-v"]) == 0
    out = load_results(tmp_path / "out").set_index("id")
    message = out.loc[BAD, "error_message"]
    assert out.loc[BAD, "status"] == "error" and "you sent Authorization: ***" in message
    texts = [capsys.readouterr()]
    for fmt in ("text", "markdown", "json", "csv", "html"):
        assert main(["report", str(tmp_path / "out"), "--format", fmt]) == 0
        texts.append(capsys.readouterr())
    stored = (tmp_path / "out").rglob("*")
    assert all(KEY not in t.out and KEY not in t.err for t in texts)
    assert all(KEY.encode() not in p.read_bytes() for p in stored if p.is_file())
    assert KEY not in out.to_csv()


def test_echoed_key_in_a_job_stop_is_redacted(tmp_path: Path, hostile: HostileServer,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A 401 quoting the key stops the job: the stop message and the "run again" line show no key."""
    job_path = _job_file(tmp_path, hostile.base_url, "echo_auth_401")
    assert main(["run", str(job_path), "--progress", "off"]) != 0
    err = capsys.readouterr().err
    assert "stopped" in err and "run again" in err and KEY not in err and "***" in err


def test_echoed_key_in_a_job_error_from_the_library_is_redacted(tmp_path: Path, hostile: HostileServer) -> None:
    """run_job's JobError (what a notebook shows) carries no key either."""
    with pytest.raises(JobError) as caught:
        run_job(_job(tmp_path, hostile, "echo_auth_401", limits={"concurrency": 1}))
    assert "you sent Authorization: ***" in str(caught.value) and KEY not in str(caught.value)


@pytest.fixture
def _quiet_after_vv() -> Iterator[None]:
    """-vv leaves the HTTP stack's loggers at DEBUG on a handler bound to this test's captured stderr: undo it."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_qwenvl_batch", False)]:
        root.removeHandler(handler)
    for name in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "aiohttp.client"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.usefixtures("_quiet_after_vv")
@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
def test_url_credentials_become_basic_auth_and_never_print(tmp_path: Path, hostile: HostileServer, transport: str,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """base_url with user:password@ works on both transports (sent as Basic auth, not in the URL), and the
    password is in no output, no log line (-vv) and not in the "run again" line."""
    password = "pa55-w0rd-hostile"
    base = hostile.base_url.replace("http://", f"http://alice:{password}@")
    monkeypatch.delenv("QWENVL_HOSTILE_KEY")
    job_path = _job_file(tmp_path, base, "echo_auth_401", key_env="QWENVL_NO_SUCH_KEY",
                         model={"api_key_optional": True})
    job_path.write_text(job_path.read_text().replace("[limits]", f'[limits]\nhttp_client = "{transport}"'))
    seen_before = len(hostile.auth_seen)
    argv = ["run", str(job_path), "--progress", "off", "-vv", "--base-url", base]
    monkeypatch.setattr(sys, "argv", ["qwenvl-batch", *argv])  # the "run again" line echoes sys.argv
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0  # the 401 row stops the job, so the "run again" line (which echoes argv) is printed
    assert any(a.startswith("Basic ") for a in hostile.auth_seen[seen_before:])
    assert "run again" in captured.err and "--base-url http://***@127.0.0.1" in captured.err
    assert password not in captured.err and password not in captured.out
    assert all(password.encode() not in p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_url_credentials_and_a_key_are_refused_clearly(tmp_path: Path, hostile: HostileServer,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Credentials in base_url and an API key cannot both be sent: a config error that says what to change,
    without the password."""
    base = hostile.base_url.replace("http://", "http://alice:s3cret-pw-x@")
    job_path = _job_file(tmp_path, base, "ok")
    assert main(["run", str(job_path), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert "user:password@" in err and "s3cret-pw-x" not in err


@pytest.mark.parametrize(("text", "gone"), [
    ("Authorization: Bearer sk-abcdefabcdef0123456789", "sk-abcdef"),
    ("{'Authorization': 'Bearer tok_123456789'}", "tok_123456789"),
    ("api-key: 0123456789abcdef", "0123456789abcdef"),
    ("x-api-key=0123456789abcdef", "0123456789abcdef"),
    ("GET http://bob:hunter22@example.test/v1", "hunter22"),
    ("proxy said: key sk-proj_abcdefghijklmnopqrst is invalid", "abcdefghijklmnopqrst"),
])
def test_redact_table(text: str, gone: str) -> None:
    """Anything shaped like a credential is masked whatever its value."""
    assert gone not in redact(text) and "***" in redact(text)


def test_registered_secret_is_masked_anywhere_and_in_log_records(caplog: pytest.LogCaptureFixture) -> None:
    """A registered secret (the key, a URL's password) is masked in free text and in every log record."""
    register_secret("plainsecretvalue42")
    assert redact("the key plainsecretvalue42 was sent") == "the key *** was sent"
    url, header = split_url_credentials("http://u:p%40ss-word-1@127.0.0.1:9/v1")
    assert url == "http://127.0.0.1:9/v1" and header is not None and header.startswith("Basic ")
    install_log_redaction()
    with caplog.at_level(logging.DEBUG, logger="httpx2"):
        logging.getLogger("httpx2").debug("HTTP Request: POST %s %s", "http://u:p@ss-word-1@h/v1",
                                          "plainsecretvalue42")
    assert "plainsecretvalue42" not in caplog.text and "p@ss-word-1" not in caplog.text
