"""The output store: journal recovery after crashes, atomic parts, compaction, resume index."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import ipc

from qwenvl_batch.errors import ConfigError
from qwenvl_batch.manifest import hash_ids
from qwenvl_batch.store import OutputStore, ResultWriter, load_results, output_schema

MANIFEST = pa.schema([("id", pa.string()), ("image", pa.string())])


def _row(key: str, status: str = "ok", response: str = "r") -> dict[str, object]:
    return {"id": key, "image": f"{key}.jpg", "status": status, "response": response, "fingerprint": "0" * 16,
            "finished_at": datetime.now(UTC)}


def _store(tmp_path: Path, fold_rows: int = 100_000) -> OutputStore:
    store = OutputStore(tmp_path / "out", output_schema(MANIFEST), "id", fold_rows=fold_rows)
    store.recover()
    store.create()
    return store


def _write(store: OutputStore, rows: list[dict[str, object]]) -> None:
    writer = ResultWriter(store, max_batch=5).start()
    for row in rows:
        writer.put(row)
    writer.close()


def _torn_segment(store: OutputStore, seq: int, rows: list[dict[str, object]], cut_bytes: int) -> Path:
    """A journal segment as kill -9 leaves it: complete batches, then a batch cut mid-write."""
    path = store.journal_dir / f"seg-{seq:06d}.arrows"
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, store.schema) as stream:
        for row in rows:
            stream.write_batch(pa.RecordBatch.from_pylist([row], schema=store.schema))
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data[: len(data) - cut_bytes])
    return path


def test_writer_folds_journal_into_parts(tmp_path: Path) -> None:
    """Rows written through the writer end up in Parquet parts every fold_rows rows, journal empty after close."""
    store = _store(tmp_path, fold_rows=10)
    _write(store, [_row(f"r{i}") for i in range(25)])
    assert [p.name for _, p in store.parts()] == ["part-000001.parquet", "part-000002.parquet",
                                                  "part-000003.parquet"]
    assert store.segments() == []
    assert sorted(pd.read_parquet(store.path)["id"]) == sorted(f"r{i}" for i in range(25))


def test_torn_journal_tail_is_recovered(tmp_path: Path) -> None:
    """A segment whose last batch was cut by a crash yields its complete rows on the next open."""
    store = _store(tmp_path)
    _torn_segment(store, 1, [_row("a"), _row("b"), _row("c")], cut_bytes=40)
    again = OutputStore(store.path, store.schema, "id")
    again.recover()
    assert sorted(pd.read_parquet(store.path)["id"]) == ["a", "b"]
    assert again.segments() == []


def test_crash_between_part_and_segment_delete_does_not_duplicate(tmp_path: Path) -> None:
    """If the part exists, its same-numbered segment is dropped, not folded again."""
    store = _store(tmp_path)
    _write(store, [_row("a"), _row("b")])
    seq = store.parts()[0][0]
    _torn_segment(store, seq, [_row("a"), _row("b")], cut_bytes=0)
    again = OutputStore(store.path, store.schema, "id")
    again.recover()
    assert sorted(pd.read_parquet(store.path)["id"]) == ["a", "b"]


def test_stray_temporary_part_is_removed(tmp_path: Path) -> None:
    """A part being written at the crash (temp file in the state folder) is discarded; readers never saw it."""
    store = _store(tmp_path)
    _write(store, [_row("a")])
    (store.tmp_dir / "part-000009.parquet.tmp").write_bytes(b"half a parquet file")
    assert len(pd.read_parquet(store.path)) == 1
    OutputStore(store.path, store.schema, "id").recover()
    assert not list(store.tmp_dir.iterdir())


def test_newest_row_wins_and_finalize_leaves_one_row_per_id(tmp_path: Path) -> None:
    """A retried row supersedes the old one; finalize rewrites the parts so each id appears once."""
    store = _store(tmp_path)
    _write(store, [_row("a", "error"), _row("b")])
    _write(store, [_row("a", "ok", "second")])
    assert len(pd.read_parquet(store.path)) == 3  # before compaction
    assert load_results(store.path).set_index("id").loc["a", "response"] == "second"
    index = store.resume_index()
    found, ok, _ = index.lookup(hash_ids(pd.Series(["a", "b", "zz"]).to_numpy(object)))
    assert found.tolist() == [True, True, False] and ok.tolist() == [True, True, False]
    store.finalize()
    out = pd.read_parquet(store.path).set_index("id")
    assert sorted(out.index) == ["a", "b"] and out.loc["a", "response"] == "second"
    assert len(store.parts()) == 1  # the two small parts were merged


def test_finalize_keeps_well_sized_parts(tmp_path: Path) -> None:
    """Parts of a healthy size without superseded rows are not rewritten."""
    store = _store(tmp_path, fold_rows=10)
    _write(store, [_row(f"r{i}") for i in range(30)])
    before = [p.name for _, p in store.parts()]
    store.finalize(target_rows=10)
    assert [p.name for _, p in store.parts()] == before


def test_changed_manifest_columns_are_refused(tmp_path: Path) -> None:
    """Resuming into an output written from a manifest with other columns is a clear error."""
    store = _store(tmp_path)
    _write(store, [_row("a")])
    wider = output_schema(pa.schema([("id", pa.string()), ("image", pa.string()), ("extra", pa.string())]))
    with pytest.raises(ConfigError, match="columns changed.*added: \\['extra'\\]"):
        OutputStore(store.path, wider, "id").recover()


def test_output_column_clash_is_refused() -> None:
    """A manifest column named like an output column (e.g. 'status') must be renamed."""
    with pytest.raises(ConfigError, match="status"):
        output_schema(pa.schema([("id", pa.string()), ("status", pa.string())]))


def test_parts_have_well_sized_row_groups(tmp_path: Path) -> None:
    """Parts are zstd-compressed with row groups of at most 50,000 rows."""
    store = _store(tmp_path)
    _write(store, [_row(f"r{i}") for i in range(120)])
    meta = pq.ParquetFile(store.parts()[0][1]).metadata
    assert meta.num_row_groups == 1 and meta.row_group(0).column(0).compression == "ZSTD"


def test_compaction_streams_into_parts_of_the_target_size(tmp_path: Path) -> None:
    """Merging many small parts writes parts of target_rows rows, keeps every id once, newest version."""
    store = _store(tmp_path)
    for start in range(0, 10, 2):
        _write(store, [_row(f"r{i}") for i in range(start, start + 2)])
    _write(store, [_row("r3", response="newer")])
    store.finalize(target_rows=6)  # every part (2 rows, or 1) is small: all are merged, 3 rows a part at least
    counts = [pq.ParquetFile(p).metadata.num_rows for _, p in store.parts()]
    assert counts == [6, 4]
    out = pd.read_parquet(store.path).set_index("id")
    assert sorted(out.index) == sorted(f"r{i}" for i in range(10)) and out.loc["r3", "response"] == "newer"
