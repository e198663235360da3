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
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import __version__
from .errors import ConfigError, JobError
from .manifest import hash_ids, id_strings
from .prompt import fingerprints_of

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
    pa.field("usage_source", pa.string()),  # "reported" by the server, or "estimate" (it sent none): issue 10
    pa.field("warning", pa.string()),  # e.g. image_ignored_by_server, proxy_retries=2: issue 10
]
RESULT_COLUMNS = [field.name for field in RESULT_FIELDS]

FOLD_ROWS = 100_000  # rows per part (a 10^6-row output is ~10 files)
ROW_GROUP_ROWS = 50_000
COMPACT_BATCHES = 1024
FOLD_BYTES = 128 * 1024 * 1024  # also fold a journal segment this big (one-row batches carry ~2 KB of framing)
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


def iter_segment(path: Path) -> Iterator[pa.RecordBatch]:
    """The complete record batches of a journal segment; a torn last batch (kill -9 mid-write) is dropped."""
    count = 0
    try:
        with pa.OSFile(str(path), "rb") as source:
            reader = ipc.open_stream(source)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                count += 1
                yield batch
    except (pa.ArrowInvalid, OSError) as exc:
        log.warning("journal segment %s ends with a torn write (%s); kept %d complete batches", path, exc, count)


def read_segment(path: Path, schema: pa.Schema) -> pa.Table:
    """A journal segment as one table (for readers of small, unfolded journals)."""
    return pa.Table.from_batches(list(iter_segment(path)), schema=schema)


def _row_groups(batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """Re-cut a stream of (often one-row) batches into tables of about ``rows`` rows, cast to ``schema``.

    Small batches are compacted every ``COMPACT_BATCHES``: tens of thousands of one-row batches held at once
    cost far more memory (per-batch buffers and objects) than the rows themselves.
    """
    small: list[pa.RecordBatch] = []
    compacted: list[pa.Table] = []
    count = 0
    for batch in batches:
        small.append(batch if batch.schema == schema else batch.cast(schema))
        count += batch.num_rows
        if len(small) >= COMPACT_BATCHES:
            compacted.append(pa.Table.from_batches(small, schema=schema).combine_chunks())
            small = []
        if count >= rows:
            yield _concat(compacted, small, schema)
            small, compacted, count = [], [], 0
    if count:
        yield _concat(compacted, small, schema)


def _concat(compacted: list[pa.Table], small: list[pa.RecordBatch], schema: pa.Schema) -> pa.Table:
    tables = compacted + ([pa.Table.from_batches(small, schema=schema)] if small else [])
    return pa.concat_tables(tables).combine_chunks()


@dataclass(frozen=True)
class ResumeIndex:
    """What is already committed, keyed by 64-bit id hashes (compact for 10^7 rows), sorted for lookups."""

    hashes: np.ndarray  # uint64, sorted
    ok: np.ndarray  # bool
    fingerprints: np.ndarray  # uint64 (prompt.parse_fingerprints)
    committed_cost: float = 0.0  # spend recorded so far, superseded rows included: they were paid for

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
            self._write_part(iter_segment(segment), seq)
        segment.unlink()
        _fsync_dir(self.journal_dir)

    def _write_part(self, batches: Iterable[pa.RecordBatch], seq: int) -> Path | None:
        """Write batches as part ``seq``, streamed in row groups (memory: one row group, whatever the part's size);
        hidden temporary file, fsync, atomic rename. Nothing is written for no rows."""
        final = self.part_path(seq)
        tmp = self.path / f".part-{seq:06d}.parquet.tmp"
        rows = 0
        with pq.ParquetWriter(tmp, self.schema, compression="zstd") as writer:
            for group in _row_groups(batches, self.schema, ROW_GROUP_ROWS):
                writer.write_table(group)
                rows += group.num_rows
        if not rows:
            tmp.unlink()
            return None
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.path)
        return final

    # -- reading --------------------------------------------------------------------------------------------
    def resume_index(self) -> ResumeIndex:
        """Committed rows (parts and journal), newest per id, as a compact sorted index (17 bytes per row), and
        the spend recorded so far, in the same single pass over the output."""
        hashes, ok, fingerprints = [], [], []
        cost = 0.0
        for table in self._iter_tables(["status", "fingerprint", "cost"]):
            hashes.append(hash_ids(id_strings(table.column(self.id_column))))
            ok.append(pc.equal(table.column("status"), "ok").fill_null(False).to_numpy(zero_copy_only=False))
            fingerprints.append(fingerprints_of(table.column("fingerprint")))
            cost += pc.sum(table.column("cost")).as_py() or 0.0
        if not hashes:
            return ResumeIndex(np.empty(0, np.uint64), np.empty(0, bool), np.empty(0, np.uint64))
        all_hashes = np.concatenate(hashes)
        # newest wins: a stable sort keeps file order within equal hashes, so the last of each run is the newest
        order = np.argsort(all_hashes, kind="stable")
        sorted_hashes = all_hashes[order]
        last = np.ones(len(order), bool)
        last[:-1] = sorted_hashes[1:] != sorted_hashes[:-1]
        keep = order[last]
        return ResumeIndex(
            hashes=sorted_hashes[last],
            ok=np.concatenate(ok)[keep],
            fingerprints=np.concatenate(fingerprints)[keep],
            committed_cost=cost,
        )

    def _iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Parts then journal segments, oldest first, so later rows supersede earlier ones."""
        wanted = None if columns is None else [self.id_column, *columns]
        for _, part in self.parts():
            yield pq.read_table(part, columns=wanted)
        for _, segment in self.segments():
            table = read_segment(segment, self.schema) if self.schema.names else \
                pa.Table.from_batches(list(iter_segment(segment)))
            yield table.select(wanted) if wanted else table

    # -- writing --------------------------------------------------------------------------------------------
    def writer(self) -> "ResultWriter":
        return ResultWriter(self)

    def finalize(self, *, target_rows: int = FOLD_ROWS) -> None:
        """Drop superseded rows and merge small parts, so the folder holds one row per id in few files.

        Streamed: parts are read a row group at a time, so memory does not grow with the output.
        """
        parts = self.parts()
        if not parts:
            return
        hashes, seqs = [], []
        for seq, part in parts:
            ids = pq.read_table(part, columns=[self.id_column]).column(self.id_column)
            hashes.append(hash_ids(id_strings(ids)))
            seqs.append(np.full(len(ids), seq, dtype=np.int64))
        all_seqs = np.concatenate(seqs)
        superseded = _superseded(np.concatenate(hashes))
        dirty = set(np.unique(all_seqs[superseded]).tolist())
        sizes = {seq: len(h) for (seq, _), h in zip(parts, hashes)}
        small = {seq for seq, n in sizes.items() if n < target_rows // 2}
        rewrite = sorted(dirty | (small if len(small) > 1 else set()))
        if not rewrite:
            return
        keep = {seq: ~superseded[all_seqs == seq] for seq in rewrite}
        seq = self.next_seq()
        for chunk in _chunks_of(self._kept_batches(rewrite, keep), target_rows):
            if self._write_part(chunk, seq) is not None:
                seq += 1
        for old in rewrite:
            self.part_path(old).unlink()
        _fsync_dir(self.path)

    def _kept_batches(self, seqs: list[int], keep: dict[int, np.ndarray]) -> Iterator[pa.RecordBatch]:
        """The rows of these parts that are not superseded, batch by batch."""
        for seq in seqs:
            offset = 0
            for batch in pq.ParquetFile(self.part_path(seq)).iter_batches(batch_size=ROW_GROUP_ROWS):
                mask = keep[seq][offset: offset + batch.num_rows]
                offset += batch.num_rows
                yield batch.filter(pa.array(mask))


def _superseded(hashes: np.ndarray) -> np.ndarray:
    """True for every row that a later row with the same id hash replaces (rows in file order)."""
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    later_same = np.zeros(len(order), bool)
    later_same[:-1] = ordered[1:] == ordered[:-1]
    result = np.zeros(len(order), bool)
    result[order] = later_same
    return result


def _chunks_of(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[Iterator[pa.RecordBatch]]:
    """Split a batch stream into consecutive sub-streams of about ``rows`` rows each (one per output part)."""
    iterator = iter(batches)
    pending: list[pa.RecordBatch] = []

    def part() -> Iterator[pa.RecordBatch]:
        count = 0
        while pending or count < rows:
            batch = pending.pop() if pending else next(iterator, None)
            if batch is None:
                return
            if count + batch.num_rows > rows:
                head = rows - count
                pending.append(batch.slice(head))
                yield batch.slice(0, head)
                return
            count += batch.num_rows
            yield batch

    while True:
        first = pending.pop() if pending else next(iterator, None)
        if first is None:
            return
        pending.append(first)
        yield part()


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
        if self._segment_rows >= self.store.fold_rows or self._sink.tell() >= FOLD_BYTES:
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
