"""`status`: one screen on an output, its numbers equal to `report`'s, on finished, running and rewritten outputs;
and the `status` / `report --html` / `report --brief` commands."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import SimulatorProcess, image_rows, job_file, write_manifest
from run_frames import START, long_run_frame

from qwenvl_batch.api import run_job
from qwenvl_batch.cli import main
from qwenvl_batch.config import load_job
from qwenvl_batch.errors import ConfigError
from qwenvl_batch.report import summarize
from qwenvl_batch.status import Status, manifest_rows, read_status, render_status, watch
from qwenvl_batch.store import load_results

NOW = (START + pd.Timedelta(hours=6, minutes=1)).timestamp()


def write_output(folder: Path, *parts: pd.DataFrame) -> Path:
    """An output folder holding ``parts`` as Parquet parts (oldest first) and a state folder naming the id column."""
    folder.mkdir(parents=True)
    for i, part in enumerate(parts, start=1):
        part.to_parquet(folder / f"part-{i:06d}.parquet", index=False)
    state = folder.with_name(folder.name + ".state")
    state.mkdir()
    (state / "job.json").write_text(json.dumps({"schema_version": 2, "id_column": "id"}))
    return folder


def assert_matches_report(status: Status, output: Path) -> None:
    """The status counts and spend are the ones `report` computes from `load_results`."""
    overall = summarize(load_results(output))["overall"]
    assert status.ok == overall["status"].get("ok", 0)
    assert status.error == overall["status"].get("error", 0)
    assert status.done == overall["rows"] - overall["status"].get("pending", 0)
    report_spend = {c["currency"]: c["cost"] for c in overall["cost"]["total"]}
    assert status.spend.keys() == report_spend.keys()
    for currency, amount in report_spend.items():
        assert status.spend[currency] == pytest.approx(amount)


def _job_toml(tmp_path: Path, base_url: str, rows: list[dict[str, str]], concurrency: int = 4) -> Path:
    return job_file(tmp_path, base_url, rows=rows, prompt="Describe row {id}. {note}",
                    model={"api_key_optional": True},
                    limits={"concurrency": concurrency, "max_attempts": 2}, run={"progress": "off"})


def test_status_of_a_finished_run_matches_report(tmp_path: Path, sim) -> None:
    """After a run with ok rows, an input error and a moderation error, status counts what report counts."""
    rows = image_rows(tmp_path, 6)
    rows[1]["image"] = "img/missing.jpg"
    rows[2]["note"] = "[[sim:moderation]]"
    job = load_job(_job_toml(tmp_path, sim.base_url, rows))
    run_job(job)
    status = read_status(job.output.path, total=manifest_rows(job))
    assert (status.ok, status.error, status.pending) == (4, 2, 0)
    assert_matches_report(status, job.output.path)
    assert [e.row_id for e in status.last_errors] and {e.error_type for e in status.last_errors} == \
        {"input", "content_filter"}
    assert status.writer.startswith("not running")
    assert status.eta_s == 0


def _done_so_far(output: Path) -> int:
    try:
        return read_status(output).done
    except ConfigError:  # the run has not created its output yet
        return 0


def test_status_on_a_running_job_matches_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While a job runs against a slow simulator, status says it is running, and on one snapshot of the output
    its done/ok/error counts and spend equal report's; the commands work mid-run; afterwards both agree on the
    finished output."""
    server = SimulatorProcess(tmp_path, "--latency", "0.25")
    try:
        rows = image_rows(tmp_path, 40)
        for i in (3, 17):
            rows[i]["note"] = "[[sim:badparam]]"
        job = load_job(_job_toml(tmp_path, server.base_url, rows, concurrency=2))
        runner = threading.Thread(target=run_job, args=(job,))
        runner.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _done_so_far(job.output.path) < 8:
            time.sleep(0.05)
        live = read_status(job.output.path, total=40)
        assert live.writer.startswith("running (process"), live.writer
        assert 8 <= live.done < 40 and live.pending == 40 - live.done
        assert live.rate_per_min > 0 and live.eta_s is not None and live.eta_s > 0
        snapshot = tmp_path / "snapshot" / "out"
        snapshot.parent.mkdir()
        shutil.copytree(job.output.path.with_name("out.state"), snapshot.with_name("out.state"))  # journal first
        shutil.copytree(job.output.path, snapshot)
        assert_matches_report(read_status(snapshot, total=40), snapshot)
        job_file = str(tmp_path / "job.toml")
        assert main(["status", str(job.output.path), "--job", job_file]) == 0
        screen = capsys.readouterr().out
        assert re.search(r"^Run:\s+running \(process \d+ on ", screen, re.MULTILINE) and " of 40 done " in screen
        page = tmp_path / "live.html"
        assert main(["report", str(job.output.path), "--html", str(page), "--job", job_file]) == 0
        assert "Dashed: projected to all 40 rows" in page.read_text(encoding="utf-8")
        runner.join(timeout=120)
        assert not runner.is_alive()
    finally:
        server.stop()
    final = read_status(job.output.path, total=40)
    assert (final.ok, final.error, final.pending) == (38, 2, 0)
    assert final.writer.startswith("not running")
    assert_matches_report(final, job.output.path)


def test_status_keeps_the_newest_row_of_an_id_written_twice(tmp_path: Path) -> None:
    """A row retried in a later run (an error, then ok) counts once, as its newest result, as report counts it."""
    first = long_run_frame(rows=300)
    retried = first[first["status"] == "error"].copy()
    retried["status"], retried["error_type"], retried["error_code"] = "ok", None, None
    retried["finished_at"] = retried["finished_at"] + pd.Timedelta(hours=7)
    output = write_output(tmp_path / "out.parquet", first, retried)
    status = read_status(output, now=NOW)
    assert (status.ok, status.error) == (300, 0) and status.last_errors == []
    assert_matches_report(status, output)


def test_status_never_adds_currencies(tmp_path: Path) -> None:
    """USD and CNY spend are shown (and projected) each on its own line, never summed."""
    frame = long_run_frame()
    output = write_output(tmp_path / "out.parquet", frame)
    status = read_status(output, total=9_000, now=NOW)
    assert_matches_report(status, output)
    text = render_status(status)
    usd, cny = status.spend["USD"], status.spend["CNY"]
    assert f"{usd:,.4f} USD so far, projected {usd * 1.5:,.4f} USD" in text
    assert f"{cny:,.4f} CNY so far, projected {cny * 1.5:,.4f} CNY" in text
    assert f"{usd + cny:,.4f}" not in text and "never added up" in text


def test_status_screen_of_a_running_job(tmp_path: Path) -> None:
    """The screen shows done of total, the last-5-minute rate, an ETA with its clock time, the SIMULATED warning
    and the newest errors first, in under 20 lines."""
    frame = long_run_frame()
    output = write_output(tmp_path / "out.parquet", frame)
    status = read_status(output, total=9_000, now=NOW)
    text = render_status(status)
    assert "6,000 of 9,000 done (66.7 %): ok 5,640 · error 360 · pending 3,000" in text
    assert text.count("\n") < 20 and "SIMULATED: 6,000 row(s)" in text
    rate = re.search(r"Rate:\s+([\d.,]+) rows/min over the last 5 min", text)
    assert rate and float(rate.group(1).replace(",", "")) == pytest.approx(status.rate_per_min, abs=0.05)
    assert re.search(r"ETA:\s+\d+ h \d\d min \(about 2026-12-01 \d\d:\d\d:\d\d UTC\)", text)
    newest = frame[frame["status"] == "error"].sort_values("finished_at").iloc[-1]
    first_error = text.split("Last errors (newest first):\n")[1].splitlines()[0]
    assert newest["id"] in first_error and newest["error_message"] in first_error
    assert status.writer.startswith("no run has written this output")


def test_status_of_a_stalled_job_has_no_eta(tmp_path: Path) -> None:
    """Nothing finished in the last 5 minutes: rate 0, ETA unknown, and how long ago the last row finished."""
    frame = long_run_frame(rows=200)
    last = frame["finished_at"].max().timestamp()
    output = write_output(tmp_path / "out.parquet", frame)
    text = render_status(read_status(output, total=1_000, now=last + 7_260))
    assert "0.0 rows/min over the last 5 min" in text and "last row finished 2 h 01 min ago" in text
    assert "ETA:      unknown: 800 pending and no row finished in the last 5 min" in text


def test_status_of_an_output_with_no_rows_yet(tmp_path: Path) -> None:
    """Right after a run created its output (no part, no journal row), status shows zeros, not an error."""
    output = write_output(tmp_path / "out.parquet")
    status = read_status(output, total=10, now=NOW)
    assert (status.done, status.pending, status.rate_per_min, status.eta_s) == (0, 10, 0.0, None)
    text = render_status(status)
    assert "0 of 10 done (0.0 %)" in text and "no row has finished yet" in text and "none recorded" in text


def test_status_without_the_job_file(tmp_path: Path) -> None:
    """Without --job the manifest size is unknown: no pending count, ETA or projection, and the fix is named."""
    output = write_output(tmp_path / "out.parquet", long_run_frame(rows=200))
    text = render_status(read_status(output, now=NOW))
    assert "pending unknown: pass --job JOB" in text and "projected" not in text


def test_manifest_rows_counts_csv_and_parquet_and_respects_limit(tmp_path: Path) -> None:
    """The manifest's size comes from a Parquet footer or a pass over a CSV's ids, capped by the job's limit."""
    rows = [{"id": f"r{i}", "image": "a.jpg", "note": ""} for i in range(1_234)]
    job_file = _job_toml(tmp_path, "http://127.0.0.1:9/v1", [])
    for suffix in ("csv", "parquet", "jsonl"):
        manifest = write_manifest(tmp_path / f"big.{suffix}", rows)
        assert manifest_rows(load_job(job_file, {"input": str(manifest)})) == 1_234
    assert manifest_rows(load_job(job_file, {"input": str(tmp_path / "big.csv"), "limit": 100})) == 100


def test_watch_redraws_every_n_seconds() -> None:
    """--watch redraws the screen N times with the given pause between (a fake sleep: no waiting)."""
    status = Status(output=Path("out"), now=NOW, ok=1, error=0, total=2, first=NOW - 60, last=NOW, rate_per_min=1.0)
    out, sleeps = io.StringIO(), []
    watch(lambda: status, 7.5, out=out, sleep=sleeps.append, rounds=3)
    assert out.getvalue().count("1 of 2 done") == 3 and sleeps == [7.5, 7.5]


# ---------------------------------------------------------------------------------------------- the commands


def test_status_and_report_commands(tmp_path: Path, sim, capsys: pytest.CaptureFixture[str]) -> None:
    """`status`, `report --brief`, `report --html FILE` and `report --format html` all work on a run's output."""
    rows = image_rows(tmp_path, 5)
    rows[0]["note"] = "[[sim:moderation]]"
    job = _job_toml(tmp_path, sim.base_url, rows)
    assert main(["run", str(job)]) == 0
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert main(["status", out, "--job", str(job)]) == 0
    screen = capsys.readouterr().out
    assert "5 of 5 done (100.0 %): ok 4 · error 1 · pending 0" in screen and "content_filter" in screen
    assert main(["report", out, "--brief", "--job", str(job)]) == 0
    assert "5 of 5 done" in capsys.readouterr().out
    page = tmp_path / "report.html"
    assert main(["report", out, "--html", str(page), "--job", str(job), "--by", "note"]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and '<svg id="cost-by-USD"' in html and "5 of 5" in html
    assert main(["report", out, "--format", "html"]) == 0
    assert capsys.readouterr().out.startswith("<!doctype html>")


def test_watch_command_redraws_until_ctrl_c(tmp_path: Path) -> None:
    """`status --watch N` redraws every N seconds and ends cleanly (exit 0) on Ctrl-C."""
    output = write_output(tmp_path / "out.parquet", long_run_frame(rows=50))
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_batch", "status", str(output), "--watch", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    screens, deadline = 0, time.monotonic() + 60
    while screens < 3 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        screens += "(refreshing every 0.2 s; Ctrl-C to stop)" in line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert screens == 3 and proc.returncode == 0, err
    assert "Traceback" not in err


def test_status_command_errors_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that is not an output, a bad --watch and an unwritable --html exit 2 with a message."""
    (tmp_path / "notout").mkdir()
    assert main(["status", str(tmp_path / "notout")]) == 2
    assert "is not a qwenvl-batch output folder" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "not-yet")]) == 2
    assert "no such output (yet): check the path, or start the job" in capsys.readouterr().err
    output = write_output(tmp_path / "out.parquet", long_run_frame(rows=20))
    assert main(["status", str(output), "--watch", "0"]) == 2
    assert "--watch 0: give a number of seconds above 0" in capsys.readouterr().err
    assert main(["report", str(output), "--html", str(tmp_path / "no" / "such" / "dir.html")]) == 2
    assert "cannot write the HTML report to" in capsys.readouterr().err
