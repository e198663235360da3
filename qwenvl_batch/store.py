"""The output: a Parquet dataset folder, a journal that makes every result durable at once, and resume.

Layout of an output path (``out/captions.parquet`` is a folder)::

    part-000001.parquet      committed results; pandas.read_parquet(<folder>) reads all parts
    part-000002.parquet
    _journal/seg-000003.arrows   results not yet folded into a part (Arrow IPC stream, appended + flushed)
    _job.json                the id column and the tool version, so `report` and resume read it right

Why this shape: a response that has arrived must survive ``kill -9``, so it is appended to the journal and
flushed before anything else happens to it (one write per result, or per batch of results under load). Parquet
cannot be appended to, so the journal is folded into a new part every ``fold_rows`` rows and at the end. Every
part is written to a hidden temporary file and renamed into place (atomic), and a journal segment is only
deleted once the part with the same number exists: a crash at any moment leaves either the segment or the part
(or both, which recovery resolves by number). Files starting with ``_`` or ``.`` are ignored by pyarrow and
pandas, so the folder always reads as a clean dataset.

A row can be written twice on purpose (``--retry-failed``, ``--rerun-changed``): the newer part wins, and the
end-of-run compaction rewrites the parts holding superseded rows, so a finished run has exactly one row per id.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - makes pa.compute available
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import __version__
from .errors import ConfigError, JobError
from .manifest import hash_ids, id_strings
from .prompt import parse_fingerprints

log = logging.getLogger(__name__)

RESULT_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string()),
    pa.field("response", pa.string()),
    pa.field("reasoning", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("model", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("image_tokens", pa.int64()),
    pa.field("error_type", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_s", pa.float64()),
    pa.field("request_id", pa.string()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("fingerprint", pa.string()),
    pa.field("input_cost", pa.float64()),
    pa.field("output_cost", pa.float64()),
    pa.field("cost", pa.float64()),
    pa.field("currency", pa.string()),
]
RESULT_COLUMNS = [field.name for field in RESULT_FIELDS]

FOLD_ROWS = 100_000
_PART = re.compile(r"^part-(\d{6,})\.parquet$")
_SEGMENT = re.compile(r"^seg-(\d{6,})\.arrows$")


def output_schema(manifest_schema: pa.Schema) -> pa.Schema:
    """Manifest columns first (all of them, as typed in the manifest), then the result columns."""
    clash = sorted(set(manifest_schema.names) & set(RESULT_COLUMNS))
    if clash:
        raise ConfigError(
            f"The manifest has column(s) {', '.join(clash)} that the output adds itself; rename them in the manifest"
        )
    return pa.schema(list(manifest_schema) + RESULT_FIELDS)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_segment(path: Path) -> pa.Table | None:
    """All complete record batches of a journal segment; a torn last batch (kill -9 mid-write) is dropped."""
    batches: list[pa.RecordBatch] = []
    schema = None
    try:
        with pa.OSFile(str(path), "rb") as source:
            reader = ipc.open_stream(source)
            schema = reader.schema
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (pa.ArrowInvalid, OSError) as exc:
        if schema is None:
            log.warning("journal segment %s has no readable header (%s); it held no complete result", path, exc)
            return None
        log.warning("journal segment %s ends with a torn write (%s); kept %d complete batches", path, exc,
                    len(batches))
    return pa.Table.from_batches(batches, schema=schema)


@dataclass(frozen=True)
class ResumeIndex:
    """What is already committed, keyed by 64-bit id hashes (compact for 10^7 rows), sorted for lookups."""

    hashes: np.ndarray  # uint64, sorted
    ok: np.ndarray  # bool
    fingerprints: np.ndarray  # uint64 (prompt.parse_fingerprints)

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each hash: (found, ok, committed fingerprint or None)."""
        if len(self.hashes) == 0:
            n = len(hashes)
            return np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, np.uint64)
        pos = np.clip(np.searchsorted(self.hashes, hashes), 0, len(self.hashes) - 1)
        found = self.hashes[pos] == hashes
        return found, found & self.ok[pos], np.where(found, self.fingerprints[pos], np.uint64(0))


class OutputStore:
    """One output folder; ``open()`` recovers whatever a crash left, ``writer()`` appends, ``finalize()`` compacts."""

    def __init__(self, path: Path, schema: pa.Schema, id_column: str, *, fold_rows: int = FOLD_ROWS) -> None:
        self.path = path
        self.schema = schema
        self.id_column = id_column
        self.fold_rows = fold_rows
        self.journal_dir = path / "_journal"

    # -- layout ---------------------------------------------------------------------------------------------
    def parts(self) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.path.glob("part-*.parquet") if (m := _PART.match(p.name)))

    def segments(self) -> list[tuple[int, Path]]:
        if not self.journal_dir.exists():
            return []
        found = ((int(m.group(1)), p) for p in self.journal_dir.glob("seg-*.arrows") if (m := _SEGMENT.match(p.name)))
        return sorted(found)

    def next_seq(self) -> int:
        numbers = [seq for seq, _ in self.parts()] + [seq for seq, _ in self.segments()]
        return max(numbers, default=0) + 1

    def part_path(self, seq: int) -> Path:
        return self.path / f"part-{seq:06d}.parquet"

    # -- opening and recovery -------------------------------------------------------------------------------
    def recover(self) -> None:
        """If the folder exists: check it belongs to this job and fold any journal a crash left behind."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ConfigError(f"Output path {self.path} is a file; the output is a folder of Parquet parts. "
                              "Choose another [output] path (e.g. out/results.parquet)")
        self._check_meta()
        for stray in self.path.glob(".part-*.tmp"):
            stray.unlink()
        for seq, segment in self.segments():
            self._fold_segment(seq, segment)
        self._check_schema()

    def create(self) -> None:
        """Make the folder (only once the run is known to go ahead, so a refused run leaves nothing behind)."""
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        if not (self.path / "_job.json").exists():
            self._write_meta()

    def _check_meta(self) -> None:
        meta_path = self.path / "_job.json"
        if not meta_path.exists():
            if any(self.path.iterdir()):
                raise ConfigError(f"Output folder {self.path} holds files but is not a qwenvl-batch output; "
                                  "choose another [output] path")
            return
        meta = json.loads(meta_path.read_text())
        if meta.get("id_column") != self.id_column:
            raise ConfigError(
                f"Output {self.path} was written with id column {meta.get('id_column')!r}, this job uses "
                f"{self.id_column!r}; use a new [output] path"
            )

    def _write_meta(self) -> None:
        meta = {"id_column": self.id_column, "created_by": f"qwenvl-batch {__version__}",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _atomic_write_text(self.path / "_job.json", json.dumps(meta, indent=2))

    def _check_schema(self) -> None:
        parts = self.parts()
        if not parts:
            return
        existing = pq.read_schema(parts[-1][1])
        if existing.names != self.schema.names:
            added = sorted(set(self.schema.names) - set(existing.names))
            removed = sorted(set(existing.names) - set(self.schema.names))
            raise ConfigError(
                f"The manifest's columns changed since {self.path} was started (added: {added or 'none'}, removed: "
                f"{removed or 'none'}); use a new [output] path, or restore the manifest's columns"
            )

    def _fold_segment(self, seq: int, segment: Path) -> None:
        """Journal segment → part with the same number, then drop the segment (safe to repeat after a crash)."""
        if not self.part_path(seq).exists():
            table = read_segment(segment)
            if table is not None and table.num_rows:
                self._write_part(table.cast(self.schema) if table.schema != self.schema else table, seq)
        segment.unlink()
        _fsync_dir(self.journal_dir)

    def _write_part(self, table: pa.Table, seq: int) -> Path:
        final = self.part_path(seq)
        tmp = self.path / f".part-{seq:06d}.parquet.tmp"
        pq.write_table(table, tmp, compression="zstd", row_group_size=50_000)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.path)
        return final

    # -- reading --------------------------------------------------------------------------------------------
    def resume_index(self) -> ResumeIndex:
        """Committed rows (parts and journal), newest first per id, as a compact sorted index."""
        frames = [self._key_frame(table) for table in self._iter_tables(["status", "fingerprint"])]
        if not frames:
            return ResumeIndex(np.empty(0, np.uint64), np.empty(0, bool), np.empty(0, np.uint64))
        keys = pd.concat(frames, ignore_index=True).drop_duplicates("hash", keep="last").sort_values("hash")
        return ResumeIndex(
            hashes=keys["hash"].to_numpy(np.uint64),
            ok=(keys["status"] == "ok").to_numpy(bool),
            fingerprints=keys["fingerprint"].to_numpy(np.uint64),
        )

    def committed_cost(self) -> float:
        """Spend recorded in the output so far (every committed row, superseded ones too: they were paid for)."""
        total = 0.0
        for table in self._iter_tables(["cost"]):
            value = pa.compute.sum(table.column("cost")).as_py()
            total += value or 0.0
        return total

    def _key_frame(self, table: pa.Table) -> pd.DataFrame:
        return pd.DataFrame({
            "hash": hash_ids(id_strings(table.column(self.id_column))),
            "status": table.column("status").to_numpy(zero_copy_only=False),
            "fingerprint": parse_fingerprints(table.column("fingerprint").to_pylist()),
        })

    def _iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Parts then journal segments, oldest first, so later rows supersede earlier ones."""
        wanted = None if columns is None else [self.id_column, *columns]
        for _, part in self.parts():
            yield pq.read_table(part, columns=wanted)
        for _, segment in self.segments():
            table = read_segment(segment)
            if table is not None:
                yield table.select(wanted) if wanted else table

    # -- writing --------------------------------------------------------------------------------------------
    def writer(self) -> "ResultWriter":
        return ResultWriter(self)

    def finalize(self, *, target_rows: int = FOLD_ROWS) -> None:
        """Drop superseded rows and merge small parts, so the folder holds one row per id in few files."""
        parts = self.parts()
        if not parts:
            return
        keys = []
        for seq, part in parts:
            ids = pq.read_table(part, columns=[self.id_column]).column(self.id_column)
            keys.append(pd.DataFrame({"hash": hash_ids(id_strings(ids)), "seq": seq}))
        frame = pd.concat(keys, ignore_index=True)
        superseded = frame.duplicated("hash", keep="last").to_numpy()
        dirty = set(frame.loc[superseded, "seq"])
        counts = frame.groupby("seq").size()
        small = [seq for seq, n in counts.items() if n < target_rows // 2]
        rewrite = sorted(dirty | (set(small) if len(small) > 1 else set()))
        if not rewrite:
            return
        keep_by_seq = {seq: ~superseded[frame["seq"].to_numpy() == seq] for seq in rewrite}
        tables = [pq.read_table(self.part_path(seq)).filter(pa.array(keep_by_seq[seq])) for seq in rewrite]
        merged = pa.concat_tables(tables)
        seq = self.next_seq()
        for start in range(0, max(merged.num_rows, 1), target_rows):
            if merged.num_rows:
                self._write_part(merged.slice(start, target_rows), seq)
                seq += 1
        for old in rewrite:
            self.part_path(old).unlink()
        _fsync_dir(self.path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultWriter:
    """Appends result rows to the journal from a thread of its own, so disk I/O never stalls the event loop.

    ``put`` is called from the event loop and only enqueues. The thread writes whatever has queued up as one
    record batch and flushes it at once (so a result survives a crash of this process within milliseconds of
    arriving), fsyncs at most a second later (so it survives a power cut too), and folds the segment into a
    Parquet part every ``fold_rows`` rows.
    """

    _CLOSE = object()

    def __init__(self, store: OutputStore, *, max_batch: int = 2048, fsync_every_s: float = 1.0) -> None:
        self.store = store
        self.max_batch = max_batch
        self.fsync_every_s = fsync_every_s
        self.error: BaseException | None = None
        self.rows_written = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="qwenvl-batch-writer", daemon=True)
        self._seq = 0
        self._segment_rows = 0
        self._sink: pa.OSFile | None = None
        self._ipc: ipc.RecordBatchStreamWriter | None = None
        self._last_fsync = 0.0
        self._dirty = False

    def start(self) -> "ResultWriter":
        self._thread.start()
        return self

    def put(self, row: dict[str, Any]) -> None:
        if self.error is not None:
            raise JobError(f"Cannot write results to {self.store.path}: {self.error}")
        self._queue.put(row)

    def close(self) -> None:
        """Write what is queued, fold the journal into a part, stop the thread."""
        self._queue.put(self._CLOSE)
        self._thread.join()
        if self.error is not None:
            raise JobError(f"Cannot write results to {self.store.path}: {self.error}")

    def _run(self) -> None:
        try:
            while True:
                rows, closing = self._drain()
                if rows:
                    self._append(rows)
                if closing:
                    self._fold()
                    return
        except Exception as exc:  # a full disk, a permission change: reported to the runner, which stops the job
            log.exception("result writer failed")
            self.error = exc

    def _drain(self) -> tuple[list[dict[str, Any]], bool]:
        rows: list[dict[str, Any]] = []
        while True:  # wait for work; a quiet second is the time to fsync what was flushed but not yet synced
            try:
                item = self._queue.get(timeout=self.fsync_every_s)
                break
            except queue.Empty:
                self._sync()
        while True:
            if item is self._CLOSE:
                return rows, True
            rows.append(item)
            if len(rows) >= self.max_batch:
                return rows, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rows, False

    def _append(self, rows: list[dict[str, Any]]) -> None:
        if self._ipc is None:
            self._seq = self.store.next_seq()
            self._sink = pa.OSFile(str(self.store.journal_dir / f"seg-{self._seq:06d}.arrows"), "wb")
            self._ipc = ipc.new_stream(self._sink, self.store.schema)
            self._segment_rows = 0
        self._ipc.write_batch(pa.RecordBatch.from_pylist(rows, schema=self.store.schema))
        self._sink.flush()
        self._dirty = True
        if time.monotonic() - self._last_fsync >= self.fsync_every_s:
            self._sync()
        self._segment_rows += len(rows)
        self.rows_written += len(rows)
        if self._segment_rows >= self.store.fold_rows:
            self._fold()

    def _sync(self) -> None:
        """fsync the journal (survives a power cut, not only a crash) if anything was written since the last."""
        if self._dirty and self._sink is not None:
            os.fsync(self._sink.fileno())
            self._dirty = False
        self._last_fsync = time.monotonic()

    def _fold(self) -> None:
        if self._ipc is None:
            return
        self._ipc.close()
        os.fsync(self._sink.fileno())
        self._sink.close()
        self._ipc = self._sink = None
        self._dirty = False
        segment = self.store.journal_dir / f"seg-{self._seq:06d}.arrows"
        self.store._fold_segment(self._seq, segment)


def load_results(path: str | Path) -> pd.DataFrame:
    """An output folder as a DataFrame, one row per id (newest wins), including results still in the journal.

    Works on the output of a run that is still going or was interrupted; ``pandas.read_parquet`` sees only the
    committed parts.
    """
    folder = Path(path)
    meta_path = folder / "_job.json"
    if not meta_path.exists():
        raise ConfigError(f"{folder} is not a qwenvl-batch output folder (no _job.json)")
    id_column = json.loads(meta_path.read_text())["id_column"]
    store = OutputStore(folder, pa.schema([]), id_column)
    tables = list(store._iter_tables())
    if not tables:
        return pd.DataFrame(columns=[id_column, *RESULT_COLUMNS])
    table = pa.concat_tables(tables, promote_options="default")
    frame = table.to_pandas()
    keys = pd.Series(id_strings(table.column(id_column)))
    return frame.loc[~keys.duplicated(keep="last").to_numpy()].reset_index(drop=True)
