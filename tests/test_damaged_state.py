"""Damaged or changed state (issue 18): journal segments, parts, job.json, the spend of superseded rows, and a
compaction killed half-way. Nothing crashes, nothing committed is bought again, readers never see a mix."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_rows, ok_requests_for, write_manifest
from pyarrow import ipc

from qwenvl_batch import ConfigError, load_results, run_job
from qwenvl_batch import compaction as compaction_module
from qwenvl_batch.cli import main
from qwenvl_batch.store import open_for_reading, state_dir_for


def _done_job(tmp_path: Path, make_job, rows: int = 6, **kwargs):
    """A job over ``rows`` rows, run once to the end (one part)."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, rows)), **kwargs)
    run_job(job)
    return job


def part_to_segment(out: Path) -> list[int]:
    """Turn the output's only part back into the journal segment a kill -9 before its fold would leave (same
    number, one row per batch, no end-of-stream marker); returns the byte offset where each batch ends."""
    [part] = sorted(out.glob("part-*.parquet"))
    table = pq.read_table(part)
    schema = table.schema.remove_metadata()
    journal = state_dir_for(out) / "journal"
    journal.mkdir(parents=True, exist_ok=True)
    segment = journal / part.name.replace("part-", "seg-").replace(".parquet", ".arrows")
    ends = []
    sink = pa.OSFile(str(segment), "wb")
    writer = ipc.new_stream(sink, schema)
    for batch in table.cast(schema).to_batches(max_chunksize=1):
        writer.write_batch(batch)
        ends.append(sink.tell())
    sink.close()  # no writer.close(): a killed writer never wrote the end-of-stream marker
    part.unlink()
    return ends


def _requests(sim, ids: list[str]) -> int:
    return sum(ok_requests_for(sim, key) for key in ids)


# ------------------------------------------------------------------------------------------------ journal


def test_segment_with_garbled_header_is_recovered_and_quarantined(tmp_path: Path, sim, make_job, caplog) -> None:
    """A segment whose header bytes are garbled keeps every row (header rebuilt from the job's columns), and is
    moved to quarantine/ with a warning, not deleted: the re-run buys nothing again."""
    job = _done_job(tmp_path, make_job)
    out = job.output.path
    part_to_segment(out)
    [segment] = (state_dir_for(out) / "journal").glob("seg-*.arrows")
    data = bytearray(segment.read_bytes())
    data[4:40] = b"\xa5" * 36
    segment.write_bytes(bytes(data))
    sent = len(sim.requests)
    with caplog.at_level(logging.WARNING):
        summary = run_job(job)
    assert len(sim.requests) == sent and summary.ok == 0
    assert len(load_results(out)) == 6
    quarantined = list((state_dir_for(out) / "quarantine").iterdir())
    assert [p.name.split(".arrows")[0] for p in quarantined] == [segment.stem]
    assert any("moved it to" in r.getMessage() and "header" in r.getMessage() for r in caplog.records)


def test_unreadable_segment_is_quarantined_not_deleted(tmp_path: Path, sim, make_job) -> None:
    """A segment damaged beyond rebuilding is moved aside (its bytes kept for a person), never deleted."""
    job = _done_job(tmp_path, make_job)
    out = job.output.path
    part_to_segment(out)
    [segment] = (state_dir_for(out) / "journal").glob("seg-*.arrows")
    damaged = b"\x00garbage" * 200
    segment.write_bytes(damaged)
    run_job(job)
    [kept] = (state_dir_for(out) / "quarantine").iterdir()
    assert kept.read_bytes() == damaged
    assert len(load_results(out)) == 6


def test_zero_byte_segment_does_not_crash_report_or_run(tmp_path: Path, sim, make_job, capsys) -> None:
    """A 0-byte journal file (created, never written) is nothing committed: report and run go on."""
    job = _done_job(tmp_path, make_job)
    (state_dir_for(job.output.path) / "journal" / "seg-000009.arrows").write_bytes(b"")
    assert main(["report", str(job.output.path)]) == 0
    assert "6" in capsys.readouterr().out
    sent = len(sim.requests)
    run_job(job)
    assert len(sim.requests) == sent


def test_torn_segment_keeps_rows_before_the_tear(tmp_path: Path, sim, make_job) -> None:
    """A segment cut inside its 4th batch: the first 3 rows are kept, the others bought once more, nothing else."""
    rows = image_rows(tmp_path, 6)
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    run_job(job)
    ends = part_to_segment(job.output.path)
    [segment] = (state_dir_for(job.output.path) / "journal").glob("seg-*.arrows")
    segment.write_bytes(segment.read_bytes()[: ends[2] + 10])
    before = {r["id"]: ok_requests_for(sim, r["id"]) for r in rows}
    run_job(job)
    again = {r["id"]: ok_requests_for(sim, r["id"]) - before[r["id"]] for r in rows}
    assert [again[r["id"]] for r in rows] == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------------------------------------ parts, job.json


@pytest.mark.parametrize("damage", ["truncate", "footer"])
def test_damaged_part_is_a_one_line_error_naming_it(damage: str, tmp_path: Path, sim, make_job, capsys) -> None:
    """A truncated part or a garbled footer: run and report stop with one line naming the file and the fix."""
    job = _done_job(tmp_path, make_job)
    [part] = job.output.path.glob("part-*.parquet")
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-12] + b"\x13" * 12)
    sent = len(sim.requests)
    with pytest.raises(ConfigError) as info:
        run_job(job)
    message = str(info.value)
    assert str(part) in message and "mv " in message and "\n" not in message
    assert len(sim.requests) == sent
    assert main(["report", str(job.output.path)]) == 2
    err = capsys.readouterr().err
    assert str(part) in err and "Traceback" not in err


def test_following_the_damaged_part_fix_resumes(tmp_path: Path, sim, make_job) -> None:
    """Doing what the message says (move the part aside) lets the run resume; only that part's rows go again."""
    job = _done_job(tmp_path, make_job, rows=3)
    [part] = job.output.path.glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:100])
    quarantine = state_dir_for(job.output.path) / "quarantine"
    quarantine.mkdir()
    shutil.move(str(part), quarantine)
    summary = run_job(job)
    assert summary.ok == 3 and len(load_results(job.output.path)) == 3


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"schema_version": "x", "id_column": "id"}'])
def test_damaged_job_json_is_a_one_line_error(text: str, tmp_path: Path, sim, make_job) -> None:
    """A garbled or mistyped job.json: a ConfigError naming the file and the fix, for run and report."""
    job = _done_job(tmp_path, make_job)
    meta = state_dir_for(job.output.path) / "job.json"
    meta.write_text(text)
    with pytest.raises(ConfigError, match="job.json is damaged.*restore it"):
        run_job(job)
    if text != '{"schema_version": "x", "id_column": "id"}':  # readers need only the id column from it
        with pytest.raises(ConfigError, match="job.json is damaged"):
            load_results(job.output.path)


# ------------------------------------------------------------------------------------------------ spend


def _spent(out: Path) -> float:
    return float(open_for_reading(out).resume_index().committed_costs.get("USD", 0.0))


def test_spend_of_superseded_rows_survives_compaction(tmp_path: Path, sim, make_job, priced) -> None:
    """Rows bought again by --rerun-changed and dropped by compaction still count toward the spend (spend.json)."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4))
    first = make_job(manifest, pricing={"file": str(priced)})
    run_job(first)
    paid_first = float(load_results(first.output.path)["cost"].sum())
    second = make_job(manifest, pricing={"file": str(priced)}, prompt={"user": "Caption row {id}."},
                      run={"rerun_changed": True})
    run_job(second)
    out = load_results(first.output.path)
    assert len(out) == 4 and len(pd.read_parquet(first.output.path)) == 4  # compacted: one row per id
    assert _spent(first.output.path) == pytest.approx(paid_first + float(out["cost"].sum()))


def test_spend_cap_counts_superseded_rows(tmp_path: Path, sim, make_job, priced) -> None:
    """A cap just above what two passes paid refuses a third pass's spending beyond it (the 120 % case)."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4))
    for prompt in ("Describe row {id}.", "Caption row {id}."):
        run_job(make_job(manifest, pricing={"file": str(priced)}, prompt={"user": prompt},
                         run={"rerun_changed": True}))
    out = tmp_path / "out" / "result.parquet"
    paid = _spent(out)
    from qwenvl_batch.errors import SpendCapReached

    with pytest.raises(SpendCapReached):
        run_job(make_job(manifest, pricing={"file": str(priced)}, prompt={"user": "Tag row {id}."},
                         run={"rerun_changed": True}, limits={"max_cost": paid * 1.05}))
    assert _spent(out) <= paid * 1.05 + 1e-9


# ------------------------------------------------------------------------------------------------ compaction


class Killed(BaseException):
    """Stands for kill -9 at one point inside compaction (raised through everything, caught by the test)."""


def _duplicated_output(tmp_path: Path, make_job, priced):
    """An output whose second pass (--rerun-changed) left superseded rows for compaction to drop."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4))
    run_job(make_job(manifest, pricing={"file": str(priced)}))
    return make_job(manifest, pricing={"file": str(priced)}, prompt={"user": "Caption row {id}."},
                    run={"rerun_changed": True})


def _kill_at(monkeypatch, point: str) -> None:
    def boom(*args, **kwargs):
        raise Killed(point)

    if point == "before_record":
        monkeypatch.setattr(compaction_module, "_write_json", boom)
    elif point == "before_switch":
        monkeypatch.setattr(compaction_module, "_switch", boom)
    elif point == "between_renames":  # the fallback's two renames, where renameat2 is not available
        monkeypatch.setattr(compaction_module, "_exchange", lambda a, b: False)
        real_rename, calls = compaction_module.os.rename, []

        def second_fails(src, dst):
            calls.append(src)
            if len(calls) == 2:
                raise Killed(point)
            real_rename(src, dst)

        monkeypatch.setattr(compaction_module.os, "rename", second_fails)
    elif point == "after_switch":
        monkeypatch.setattr(compaction_module, "_finish", boom)


@pytest.mark.parametrize("point", ["before_record", "before_switch", "between_renames", "after_switch"])
def test_kill_inside_compaction_never_shows_a_mix(point: str, tmp_path: Path, sim, make_job, priced,
                                                  monkeypatch) -> None:
    """Killed anywhere in compaction, pandas sees the old generation (rows as written) or the new one (one row per
    id), never both; the next run completes or undoes it, and the spend totals come out the same either way."""
    job = _duplicated_output(tmp_path, make_job, priced)
    out = job.output.path
    _kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        run_job(job)
    monkeypatch.undo()
    if out.exists():
        seen = pd.read_parquet(out)
        assert len(seen) in (8, 4)  # old generation: 4 rows + 4 superseded ones; new: 4
        assert seen["id"].nunique() == 4
    sent = len(sim.requests)
    run_job(job)  # recovery completes or undoes the compaction, then this run's compaction
    assert len(sim.requests) == sent
    final = pd.read_parquet(out)
    assert len(final) == 4 and final["id"].nunique() == 4
    state = state_dir_for(out)
    assert not (state / "next").exists() and not (state / "previous").exists()
    assert not (state / "compaction.json").exists()
    paid = float(final["cost"].sum())
    assert _spent(out) > paid * 1.5  # both passes counted, once each


def test_compaction_keeps_unchanged_parts_as_hard_links(tmp_path: Path, sim, make_job) -> None:
    """Parts compaction does not rewrite keep their inode (linked, not copied); the dirty one is replaced."""
    from qwenvl_batch.store import OutputStore

    job = _done_job(tmp_path, make_job, rows=3)
    out = job.output.path
    [first] = out.glob("part-*.parquet")
    table = pq.read_table(first)
    renamed = table.set_column(0, "id", pa.array([f"x-{i}" for i in range(3)]))
    pq.write_table(renamed, out / "part-000002.parquet")  # other ids: clean, not small at target 4
    pq.write_table(table.slice(0, 1), out / "part-000003.parquet")  # a newer row-0000: part 1 becomes dirty
    inodes = {p.name: p.stat().st_ino for p in out.glob("part-*.parquet")}
    store = OutputStore(out, table.schema.remove_metadata(), "id")
    store.finalize(target_rows=4)
    after = {p.name: p.stat().st_ino for p in out.glob("part-*.parquet")}
    assert "part-000001.parquet" not in after
    assert after["part-000002.parquet"] == inodes["part-000002.parquet"]
    assert after["part-000003.parquet"] == inodes["part-000003.parquet"]
    assert len(pd.read_parquet(out)) == 6 and pd.read_parquet(out)["id"].nunique() == 6
