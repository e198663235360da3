"""The persisted resume index (issue 17): used only when it describes the parts exactly, rebuilt when it is missing,
stale or damaged, and correct across kills, --retry-failed, changed settings and edited manifests."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import image_rows, ok_requests_for, write_manifest

from qwenvl_batch import ConfigError, run_job
from qwenvl_batch import compaction as compaction_module
from qwenvl_batch.manifest import hash_ids
from qwenvl_batch.persisted_index import INDEX_FILE
from qwenvl_batch.planning import open_job
from qwenvl_batch.store import open_for_reading, state_dir_for


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"row-{i:04d}" for i in range(start, start + n)]


def _lookup(out: Path, ids: list[str]) -> tuple[list[bool], list[bool]]:
    found, ok, _ = open_for_reading(out).resume_index().lookup(hash_ids(np.array(ids, dtype=object)))
    return found.tolist(), ok.tolist()


def _index(out: Path) -> Path:
    return state_dir_for(out) / INDEX_FILE


def _run(tmp_path: Path, make_job, rows: int, **kwargs):
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, rows)), **kwargs)
    return job, run_job(job)


def test_a_finished_run_leaves_an_index_the_next_start_maps(tmp_path: Path, make_job) -> None:
    """After a run the index file covers every part, and a resume answers from it without reading a part."""
    job, _ = _run(tmp_path, make_job, 6)
    index = open_for_reading(job.output.path).resume_index()
    assert _index(job.output.path).exists()
    assert len(index.base) == 6 and len(index.recent) == 0 and index.clean and index.stamp
    assert _lookup(job.output.path, [*_ids(6), "nope"]) == ([True] * 6 + [False], [True] * 6 + [False])


def test_parts_added_after_the_index_are_read_and_merged(tmp_path: Path, make_job) -> None:
    """A run killed after folding (no index written) leaves new parts: they are read on top of the index."""
    job, _ = _run(tmp_path, make_job, 2)
    store = open_job(job).store
    store.lock()
    writer = store.writer().start()  # a fold without the end of a run, as a kill leaves it
    writer.put({"id": "row-0001", "image": "x.jpg", "status": "error", "fingerprint": "0" * 16})
    writer.put({"id": "extra", "image": "x.jpg", "status": "ok", "fingerprint": "0" * 16})
    writer.close()
    index = store.resume_index()
    assert len(index.base) == 2 and len(index.recent) == 2 and len(index) == 3 and not index.clean
    assert _lookup(job.output.path, ["row-0000", "row-0001", "extra"]) == ([True] * 3, [True, False, True])
    store.save_resume_index()
    renewed = store.resume_index()
    assert len(renewed.base) == 3 and not len(renewed.recent) and not renewed.clean
    assert _lookup(job.output.path, ["row-0000", "row-0001", "extra"]) == ([True] * 3, [True, False, True])
    store.unlock()


def test_a_part_moved_away_makes_the_index_unusable(tmp_path: Path, make_job, sim) -> None:
    """An index naming a part that is gone is not trusted: that part's rows are sent again."""
    job, _ = _run(tmp_path, make_job, 3)
    [part] = job.output.path.glob("part-*.parquet")
    quarantine = state_dir_for(job.output.path) / "quarantine"
    quarantine.mkdir()
    shutil.move(part, quarantine / part.name)
    assert _lookup(job.output.path, _ids(3))[0] == [False] * 3
    summary = run_job(job)
    assert summary.ok == 3 and sum(ok_requests_for(sim, key) for key in _ids(3)) == 6


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_a_damaged_index_is_rebuilt_from_the_parts(damage: str, tmp_path: Path, make_job, sim, caplog) -> None:
    """A damaged index file is ignored with a warning and rebuilt; nothing is sent again."""
    job, _ = _run(tmp_path, make_job, 5)
    path = _index(job.output.path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[20] ^= 0x40  # inside the hashes
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not an index at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert _lookup(job.output.path, _ids(5)) == ([True] * 5, [True] * 5)
    assert "is damaged" in caplog.text and "rebuilding it from the parts" in caplog.text
    summary = run_job(job)
    assert summary.to_do == 0 and sum(ok_requests_for(sim, key) for key in _ids(5)) == 5
    assert len(open_for_reading(job.output.path).resume_index().base) == 5  # written again, whole


def test_a_part_rewritten_in_place_makes_the_index_stale(tmp_path: Path, make_job) -> None:
    """A part with the same name but other contents (size or time changed) is read, not answered from the index."""
    job, _ = _run(tmp_path, make_job, 4)
    [part] = job.output.path.glob("part-*.parquet")
    frame = pd.read_parquet(part)
    frame.loc[frame["id"] == "row-0001", "status"] = "error"
    frame.to_parquet(part, index=False)
    os.utime(part, ns=(1, 1))
    assert _lookup(job.output.path, _ids(4))[1] == [True, False, True, True]


def test_kill_between_compaction_and_index_rebuilds(tmp_path: Path, make_job, sim, monkeypatch) -> None:
    """A compaction switched in but no new index (kill in between): the old index names gone parts and is not
    used; every row stays done and the retried row's new answer wins."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4)),
                   prompt={"user": "[[sim:badparam:1]] Describe row {id}."})
    run_job(job)  # every row's first request is refused (400): recorded as errors
    stale = _index(job.output.path).read_bytes()
    written = []
    monkeypatch.setattr("qwenvl_batch.persisted_index.write", lambda *a, **k: written.append(a))
    retry = job.model_copy(update={"run": job.run.model_copy(update={"retry_failed": True})})
    run_job(retry)  # retried rows supersede the errors; compaction rewrites the part; "killed" before the index
    assert written  # the index write was reached (and skipped) after the compaction
    _index(job.output.path).write_bytes(stale)
    assert not (state_dir_for(job.output.path) / compaction_module.COMPACTION_FILE).exists()
    assert _lookup(job.output.path, _ids(4)) == ([True] * 4, [True] * 4)


def test_retry_failed_uses_and_renews_the_index(tmp_path: Path, make_job, sim) -> None:
    """Errors kept in the index are sent again with --retry-failed, and the renewed index records them ok."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3)),
                   prompt={"user": "[[sim:badparam:1]] Describe row {id}."})
    run_job(job)
    assert _lookup(job.output.path, _ids(3))[1] == [False] * 3
    summary = run_job(job.model_copy(update={"run": job.run.model_copy(update={"retry_failed": True})}))
    assert summary.retried_errors == 3 and summary.ok == 3
    index = open_for_reading(job.output.path).resume_index()
    assert len(index.base) == 3 and not len(index.recent) and index.clean
    assert _lookup(job.output.path, _ids(3))[1] == [True] * 3
    assert len(pd.read_parquet(job.output.path)) == 3


def test_changed_prompt_is_refused_despite_the_stamp(tmp_path: Path, make_job) -> None:
    """The stamp vouches only for the settings it was made with: another prompt recomputes and refuses."""
    job, _ = _run(tmp_path, make_job, 3)
    changed = job.model_copy(update={"prompt": job.prompt.model_copy(update={"user": "Caption row {id}."})})
    with pytest.raises(ConfigError, match="3 row\\(s\\) already in"):
        run_job(changed)


def test_edited_manifest_row_is_found_despite_the_stamp(tmp_path: Path, make_job, sim) -> None:
    """Editing the manifest (one row's image) voids the stamp: that row is found changed."""
    rows = image_rows(tmp_path, 3)
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    run_job(job)
    rows[2]["image"] = rows[0]["image"]
    write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ConfigError, match="1 row\\(s\\) already in"):
        run_job(job)
    summary = run_job(job.model_copy(update={"run": job.run.model_copy(update={"rerun_changed": True})}))
    assert summary.ok == 1


def test_rows_added_since_the_index_are_checked_despite_the_stamp(tmp_path: Path, make_job, sim) -> None:
    """Rows from parts the index does not cover were maybe sent with other settings: they are always checked."""
    job, _ = _run(tmp_path, make_job, 4, run={"limit": 2})
    stamped = job.model_copy(update={"run": job.run.model_copy(update={"limit": None})})
    run_job(stamped)
    before = _index(job.output.path).read_bytes()
    other = stamped.model_copy(update={"prompt": stamped.prompt.model_copy(update={"user": "Caption row {id}."})})
    run_job(other.model_copy(update={"run": other.run.model_copy(update={"rerun_changed": True, "limit": 1})}))
    _index(job.output.path).write_bytes(before)  # killed before the index: row0000 redone, outside the index
    with pytest.raises(ConfigError, match="1 row\\(s\\) already in"):
        run_job(stamped)


def test_duplicate_ids_among_done_rows_are_refused(tmp_path: Path, make_job) -> None:
    """A manifest repeating an id that is already done stops the run, as it does for new ids."""
    rows = image_rows(tmp_path, 3)
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    run_job(job)
    write_manifest(tmp_path / "m.csv", [*rows, {**rows[1], "image": rows[0]["image"]}])
    with pytest.raises(ConfigError, match="duplicate ids, e.g. 'row-0001'"):
        run_job(job)


def test_index_lookups_agree_with_a_plain_binary_search() -> None:
    """The bucketed lookup finds exactly what searchsorted finds, at the ends of the hash range too."""
    from qwenvl_batch.persisted_index import Entries
    from qwenvl_batch.store import ResumeIndex

    rng = np.random.default_rng(7)
    for size in (0, 5, 65, 1000, 50_000):
        stored = np.unique(np.concatenate([rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True),
                                           np.array([0, 2**64 - 1], np.uint64)]))[: max(size, 0)]
        entries = Entries(stored, stored ^ np.uint64(1), (stored % np.uint64(3)) == 0)
        index = ResumeIndex(Entries.empty(), entries, unique=len(stored))
        wanted = np.concatenate([stored[::3], rng.integers(0, 2**64 - 1, 500, dtype=np.uint64, endpoint=True),
                                 np.array([0, 1, 2**64 - 1], np.uint64)])
        found, ok, fingerprints = index.lookup(wanted)
        expected = np.isin(wanted, stored)
        assert found.tolist() == expected.tolist()
        assert (fingerprints[found] == (wanted[found] ^ np.uint64(1))).all()
        assert (ok[found] == ((wanted[found] % np.uint64(3)) == 0)).all()


def test_a_rebuilt_index_is_written_before_sending(tmp_path: Path, make_job, monkeypatch) -> None:
    """A start that had to read many parts writes the index at once, so a kill during the run costs no rebuild."""
    job, _ = _run(tmp_path, make_job, 3)
    _index(job.output.path).unlink()
    monkeypatch.setattr("qwenvl_batch.runner.REINDEX_ROWS", 1)
    monkeypatch.setattr("qwenvl_batch.store.OutputStore.finalize", lambda self, **kwargs: None)  # no end-of-run write
    run_job(job)
    index = open_for_reading(job.output.path).resume_index()
    assert len(index.base) == 3 and index.stamp
