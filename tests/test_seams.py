"""The seams between stages: supervised lifecycle, the output folder, truthful stops, and the notebook API."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import image_rows, job_file, write_manifest

from qwenvl_batch import ConfigError, JobError, load_results, run_job, run_job_async
from qwenvl_batch import runner as runner_module
from qwenvl_batch.cli import main
from qwenvl_batch.store import ResultWriter, state_dir_for

REPO = Path(__file__).resolve().parents[1]


def _state(job: Any) -> Path:
    return state_dir_for(job.output.path)


# -- structured lifecycle ----------------------------------------------------------------------------------

def test_reader_failure_mid_run_stops_fast_commits_and_resumes(tmp_path: Path, sim, make_job, monkeypatch) -> None:
    """A manifest that fails after its first batch stops the run within seconds, names the reader, keeps the rows
    done, and a re-run (reader fixed) completes."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 12))
    job = make_job(manifest)
    real = runner_module.limited_batches

    def failing(manifest_: Any, limit: Any, columns: Any = None) -> Any:
        batches = real(manifest_, limit, columns, batch_rows=5) if "batch_rows" in real.__code__.co_varnames \
            else iter([b.slice(0, 5) for b in real(manifest_, limit, columns)])
        yield next(batches)
        deadline = time.monotonic() + 5  # fail mid-run: once the first batch's rows are sent (images are
        while len(sim.requests) < 5 and time.monotonic() < deadline:  # prepared in threads, so not at once)
            time.sleep(0.01)
        raise OSError(errno.EIO, "Input/output error", str(manifest))

    monkeypatch.setattr(runner_module, "limited_batches", failing)
    started = time.monotonic()
    with pytest.raises(JobError, match=r"reader.*m\.csv.*rows 6") as info:
        run_job(job)
    assert time.monotonic() - started < 10
    assert info.value.summary.ok == 5 and info.value.summary.pending == 7
    assert len(load_results(job.output.path)) == 5
    monkeypatch.setattr(runner_module, "limited_batches", real)
    summary = run_job(job)
    assert summary.ok == 7 and summary.skipped_ok == 5


def test_worker_bug_stops_the_run_with_a_message_not_a_hang(tmp_path: Path, sim, make_job, monkeypatch) -> None:
    """An unexpected exception in a worker ends the run within seconds with a message naming the worker."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 6)))
    from qwenvl_batch.worker import RowWorker

    original = RowWorker.process

    async def buggy(self: RowWorker, row: dict[str, Any]) -> Any:
        if row["id"] == "row-0003":
            raise KeyError("surprise")
        return await original(self, row)

    monkeypatch.setattr(RowWorker, "process", buggy)
    started = time.monotonic()
    with pytest.raises(JobError, match="worker failed unexpectedly.*KeyError"):
        run_job(job)
    assert time.monotonic() - started < 10


def test_writer_failure_stops_sending_and_a_rerun_completes(tmp_path: Path, sim, make_job, monkeypatch) -> None:
    """A disk-full writer is a job-level stop: no request starts after it, the message says what failed and where,
    the output stays readable, and once the disk is fine again a re-run completes."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 40)), limits={"concurrency": 2})
    original = ResultWriter._append
    calls = {"n": 0}

    def full_disk(self: ResultWriter, rows: list[dict[str, Any]]) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, rows)

    monkeypatch.setattr(ResultWriter, "_append", full_disk)
    with pytest.raises(JobError, match="No space left on device") as info:
        run_job(job)
    assert "run again" in str(info.value) and str(job.output.path) in str(info.value)
    sent_before = len(sim.requests)
    assert sent_before < 40  # sending stopped: not every row was bought
    stored = len(load_results(job.output.path))
    assert stored < 40 and info.value.summary.ok == stored  # the summary counts only rows actually stored
    assert info.value.summary.pending == 40 - stored
    monkeypatch.setattr(ResultWriter, "_append", original)
    summary = run_job(job)
    assert summary.ok + stored == 40
    assert len(pd.read_parquet(job.output.path)) == 40


def test_malformed_csv_line_is_named_and_nothing_is_sent(tmp_path: Path, sim, make_job) -> None:
    """A CSV with a broken line after good rows is refused before sending, naming the line; fixed, it runs."""
    rows = image_rows(tmp_path, 5)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    good = manifest.read_text()
    manifest.write_text(good + 'bad,"unclosed,x\n')
    with pytest.raises(ConfigError, match=r"m\.csv, line 7"):
        run_job(make_job(manifest))
    assert sim.requests == []
    manifest.write_text(good)
    assert run_job(make_job(manifest)).ok == 5


def test_refused_run_leaves_nothing_behind(tmp_path: Path, sim, make_job, monkeypatch) -> None:
    """A run refused for a missing key creates no output folder, no state folder and no thread."""
    monkeypatch.delenv("QWENVL_TEST_KEY", raising=False)
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3)), model={"api_key_optional": False})
    threads = threading.active_count()
    with pytest.raises(ConfigError, match="QWENVL_TEST_KEY"):
        run_job(job)
    assert not job.output.path.exists() and not _state(job).exists()
    assert threading.active_count() == threads


def test_output_under_a_file_is_a_one_line_refusal(tmp_path: Path, sim, monkeypatch, capsys) -> None:
    """An output path that cannot be created exits 2 with one line naming the path, never a traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    job = job_file(tmp_path, sim.base_url, output=str(blocker / "out"), rows=3)
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-test")
    assert main(["run", str(job), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert "blocker" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sim.requests == []


def test_gc_freeze_is_undone_after_a_run(tmp_path: Path, sim, make_job) -> None:
    """A notebook runs many jobs in one process: nothing stays frozen out of the collector after a run."""
    run_job(make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3))))
    assert gc.get_freeze_count() == 0


# -- the output folder ------------------------------------------------------------------------------------

def test_second_run_on_a_live_output_is_refused_at_once(tmp_path: Path, sim, monkeypatch, capsys) -> None:
    """While one process holds an output, another run exits 2 naming that process; the lock dies with it."""
    job = job_file(tmp_path, sim.base_url, rows=3)
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-test")
    assert main(["run", str(job), "--progress", "off", "--limit", "1"]) == 0
    lock = state_dir_for(tmp_path / "out") / "lock"
    hold = ("import fcntl,os,sys,time; f=open(sys.argv[1],'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); "
            "f.truncate(); f.write(f'process {os.getpid()} on testhost'); f.flush(); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["run", str(job), "--progress", "off"]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid} on testhost" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(["run", str(job), "--progress", "off"]) == 0  # the OS released the dead holder's lock


def test_output_reads_with_pandas_pyarrow_duckdb_and_polars(tmp_path: Path, sim, make_job) -> None:
    """The output path as given (no glob) opens in pandas, pyarrow.dataset and polars; duckdb with its glob."""
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    import pyarrow.dataset as ds

    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 7)))
    run_job(job)
    out = str(job.output.path)
    assert len(pd.read_parquet(out)) == 7
    assert ds.dataset(out).count_rows() == 7
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/**/*.parquet')").fetchall()[0][0] == 7
    assert polars.read_parquet(out).height == 7
    assert polars.scan_parquet(out).collect().height == 7


def test_results_visible_to_readers_within_the_fold_interval(tmp_path: Path, sim, make_job) -> None:
    """While a run is going, the journal is folded on time as well as count, so plain readers see rows early."""
    from qwenvl_batch.planning import open_job

    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)))
    store = open_job(job).store
    store.fold_every_s = 0.3
    store.create()
    writer = store.writer().start()
    try:
        writer.put({"id": "row-0000", "status": "ok", "fingerprint": "00"})
        deadline = time.monotonic() + 10
        while not store.parts() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pd.read_parquet(job.output.path)) == 1  # the writer is still open
    finally:
        writer.close()
        store.unlock()


def test_output_of_an_earlier_version_resumes_with_new_columns(tmp_path: Path, sim, make_job) -> None:
    """An output in the version-1 layout (state inside the folder, fewer result columns) resumes: old rows get
    nulls in the new columns, nothing is re-sent, and the state moves beside the folder."""
    rows = image_rows(tmp_path, 6)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    job = make_job(manifest, run={"limit": 4})
    run_job(job)
    _downgrade_to_version_1(job.output.path)
    sent = len(sim.requests)
    summary = run_job(make_job(manifest))
    assert summary.ok == 2 and summary.skipped_ok == 4 and len(sim.requests) == sent + 2
    out = pd.read_parquet(job.output.path)
    assert len(out) == 6 and "simulated" in out.columns
    assert not (job.output.path / "_job.json").exists() and (_state(job) / "job.json").exists()


def _downgrade_to_version_1(out: Path) -> None:
    """Rewrite an output as version 1 wrote it: no `simulated` column, `_job.json` inside the folder."""
    state = state_dir_for(out)
    meta = json.loads((state / "job.json").read_text())
    for part in out.glob("part-*.parquet"):
        table = pq.read_table(part).drop_columns(["simulated"]).replace_schema_metadata(None)
        pq.write_table(table, part)
    (out / "_job.json").write_text(json.dumps({"id_column": meta["id_column"], "created_by": "qwenvl-batch 0.0.9"}))
    for path in sorted(state.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    state.rmdir()


def test_manifest_column_change_names_the_manifest_side(tmp_path: Path, sim, make_job) -> None:
    """A resume refused for changed manifest columns says it is the manifest that changed."""
    rows = image_rows(tmp_path, 3)
    run_job(make_job(write_manifest(tmp_path / "m.csv", rows)))
    for row in rows:
        row["extra"] = "x"
    with pytest.raises(ConfigError, match=r"manifest's columns changed.*added: \['extra'\]"):
        run_job(make_job(write_manifest(tmp_path / "m.csv", rows)))


def test_simulated_rows_are_marked_and_a_real_run_says_so(tmp_path: Path, sim, make_job) -> None:
    """Rows answered by --simulate carry simulated=True; a real run on that output refuses, naming the simulator."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3))
    run_job(make_job(manifest, run={"simulate": True}))
    out = pd.read_parquet(make_job(manifest).output.path)
    assert out["simulated"].all()
    from qwenvl_batch.report import render, summarize

    assert "SIMULATED: 3 row(s)" in render(summarize(load_results(make_job(manifest).output.path)), "text")
    with pytest.raises(ConfigError, match="3 row.*SIMULATOR"):
        run_job(make_job(manifest))
    summary = run_job(make_job(manifest, run={"rerun_changed": True}))
    assert summary.ok == 3
    assert not pd.read_parquet(make_job(manifest).output.path)["simulated"].fillna(False).any()


def test_rerun_summary_separates_skipped_ok_from_kept_errors(tmp_path: Path, sim, make_job) -> None:
    """A re-run's summary says how many rows were skipped as ok and how many kept as error, with --retry-failed."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4))
    (tmp_path / "img" / "row1.jpg").write_text("not an image")
    run_job(make_job(manifest))
    text = "\n".join(run_job(make_job(manifest)).lines())
    assert "3 ok (skipped)" in text and "1 kept as error" in text and "--retry-failed" in text


# -- library and notebook ---------------------------------------------------------------------------------

def test_run_job_works_inside_a_running_event_loop(tmp_path: Path, sim, make_job) -> None:
    """The README's snippet runs as written inside a running loop (a notebook cell): no asyncio.run error."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3)))

    async def cell() -> Any:
        return run_job(job)

    assert asyncio.run(cell()).ok == 3


def test_run_job_async_honours_simulate(tmp_path: Path, make_job, sim) -> None:
    """run_job_async(simulate=True) answers from a simulator of its own, never the job's endpoint."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)))
    summary = asyncio.run(run_job_async(job, simulate=True))
    assert summary.ok == 2 and summary.simulated
    assert sim.requests == []  # the job's own endpoint was not used


def test_run_job_applies_overrides_or_raises_type_error(tmp_path: Path, sim, make_job) -> None:
    """run_job(job, limit=2) applies the override; a misspelt override is a TypeError, not ignored."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 5)))
    assert run_job(job, limit=2).ok == 2
    with pytest.raises(TypeError, match="limt"):
        run_job(job, limt=2)


def test_importing_the_package_loads_no_heavy_dependency() -> None:
    """`import qwenvl_batch` and `--version` stay fast: pandas, pyarrow and openai load only when used."""
    code = ("import sys, qwenvl_batch; from qwenvl_batch.cli import build_parser; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'openai', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- CLI ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("job_file", sorted(p.name for p in (REPO / "jobs").glob("*.toml")))
def test_every_shipped_job_runs_with_simulate(job_file: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """Each job file in jobs/ runs end to end with --simulate (first rows only)."""
    monkeypatch.chdir(REPO)
    code = main(["run", f"jobs/{job_file}", "--simulate", "--limit", "2", "--output", str(tmp_path / "o"),
                 "--progress", "off"])
    assert code == 0, capsys.readouterr().err
    assert "2 ok" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["-v", "report", "OUT"], ["report", "OUT", "-v"]])
def test_verbose_flag_before_or_after_the_subcommand(argv: list[str], tmp_path: Path, sim, make_job) -> None:
    """-v is accepted on either side of the subcommand."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 1)))
    run_job(job)
    assert main([a.replace("OUT", str(job.output.path)) for a in argv]) == 0


def test_simulate_on_a_taken_port_is_one_line(capsys) -> None:
    """`simulate --port N` with the port taken says so in one line and exits 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["simulate", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(port) in err and len(err.splitlines()) == 1


def test_self_hosted_price_example_in_prices_toml_works_with_prices_flag(tmp_path: Path, monkeypatch, capsys) -> None:
    """The self-hosted example in prices.toml's header, saved as a file, prices jobs/vllm-local.toml at zero."""
    lines = (REPO / "qwenvl_batch" / "prices.toml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('#   [models."Qwen/Qwen2.5-VL-7B-Instruct"'))
    example = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        example.append(line[4:])
    prices = tmp_path / "self-hosted.toml"
    prices.write_text("\n".join(example) + "\n")
    monkeypatch.chdir(REPO)
    code = main(["run", "jobs/vllm-local.toml", "--simulate", "--limit", "2", "--output", str(tmp_path / "o"),
                 "--prices", str(prices), "--progress", "off"])
    out = capsys.readouterr().out
    assert code == 0 and "cost this run: 0.0000 USD" in out
    assert (pd.read_parquet(tmp_path / "o")["cost"] == 0).all()


def test_verbose_shows_this_projects_debug_lines_only(tmp_path: Path, sim, monkeypatch, capsys) -> None:
    """-v logs the runner's retry decisions but no third-party debug lines (Pillow's, say)."""
    job = job_file(tmp_path, sim.base_url, rows=3)
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-test")
    rows = (tmp_path / "m.csv").read_text().splitlines()
    rows[1] = rows[1].replace("note 0", "[[sim:500:1]]")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    job.write_text(job.read_text().replace('user = "Describe row {id}."', 'user = "Describe row {id}. {note}"'))
    assert main(["run", str(job), "--progress", "off", "-v"]) == 0
    err = capsys.readouterr().err
    assert "qwenvl_batch.retrying" in err  # the retry decision
    assert not [line for line in err.splitlines() if " DEBUG " in line and " qwenvl_batch" not in line]


def test_manifest_id_type_change_is_refused_and_stored_ids_are_kept(tmp_path: Path, sim, make_job) -> None:
    """CSV ids 001… resumed from a Parquet manifest with integer ids: refused, naming the column and both types;
    the stored ids stay as they were."""
    rows = image_rows(tmp_path, 3)
    for i, row in enumerate(rows):
        row["id"] = f"00{i + 1}"
    run_job(make_job(write_manifest(tmp_path / "m.csv", rows)))
    for row in rows:
        row["id"] = int(row["id"])
    with pytest.raises(ConfigError, match=r"column types changed.*'id' was string, now int64"):
        run_job(make_job(write_manifest(tmp_path / "m.parquet", rows)))
    assert sorted(pd.read_parquet(make_job(tmp_path / "m.csv").output.path)["id"]) == ["001", "002", "003"]


def test_manifest_replaced_during_the_run_stops_the_reader(tmp_path: Path, sim, make_job, monkeypatch) -> None:
    """A manifest replaced between the plan and the dispatch pass stops the run (rows done are kept) instead of
    dispatching the new file against the old plan; a re-run plans against the new file."""
    rows = image_rows(tmp_path, 12)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    job = make_job(manifest)
    real = runner_module.limited_batches

    def replaced_after_planning(manifest_: Any, limit: Any, columns: Any = None) -> Any:
        write_manifest(manifest, list(reversed(rows)))  # same ids, another order: the plan's bitmask is stale
        yield from real(manifest_, limit, columns)

    monkeypatch.setattr(runner_module, "limited_batches", replaced_after_planning)
    with pytest.raises(JobError, match=r"m\.csv changed while the job was running"):
        run_job(job)
    monkeypatch.setattr(runner_module, "limited_batches", real)
    assert run_job(job).ok == 12
