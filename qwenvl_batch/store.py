"""The output: a folder of Parquet parts any reader opens as given, a journal that makes every result durable at
once, and resume.

Layout of an output path ``out/captions.parquet`` (a folder) and its state folder beside it::

    out/captions.parquet/part-000001.parquet   committed results, nothing else: pandas, pyarrow, polars and
    out/captions.parquet/part-000002.parquet   duckdb all read the folder as the path is given
    out/captions.parquet.state/job.json        schema version, id column, manifest and result columns
    out/captions.parquet.state/journal/seg-000003.arrows   results not yet folded into a part (Arrow IPC)
    out/captions.parquet.state/lock            held (flock) by the one run writing this output; pid and host
    out/captions.parquet.state/tmp/            parts being written, renamed into the folder when complete

Why this shape: a response that has arrived must survive ``kill -9``, so it is appended to the journal and
flushed before anything else happens to it (one write per result, or per batch of results under load). Parquet
cannot be appended to, so the journal is folded into a new part every ``fold_rows`` rows, at least every
``fold_every_s`` seconds while results arrive (a days-long job is visible to every reader within a minute), and
at the end. Every part is written to a temporary file and renamed into place (atomic), and a journal segment is
only deleted once the part with the same number exists: a crash at any moment leaves either the segment or the
part (or both, which recovery resolves by number). The state lives beside the folder, not in it, because Polars
reads every file under a folder it is given (a ``_job.json`` there breaks ``polars.read_parquet(OUT)``). Each part
also carries the id column and schema version in its Parquet metadata, so a folder copied without its state is
still readable by ``report`` and ``load_results``.

One writer at a time: a run holds an exclusive ``flock`` on the state folder's lock for its whole life; the OS
releases it when the process dies, so ``kill -9`` never leaves a stale lock. Readers take no lock.

A row can be written twice on purpose (``--retry-failed``, ``--rerun-changed``): the newer part wins, and the
end-of-run compaction rewrites the parts holding superseded rows, so a finished run has exactly one row per id.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import ipc

from . import __version__, compaction, persisted_index
from .currency import add_spend
from .damage import SegmentReader, damaged_part, quarantine
from .durable import fsync_dir as _fsync_dir
from .errors import ConfigError, JobError
from .manifest import hash_ids, id_strings
from .persisted_index import Entries, PartSummary
from .prompt import fingerprints_of
from .structured import is_answer_column

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
    pa.field("simulated", pa.bool_()),  # True when the built-in simulator answered (never the real service)
    pa.field("usage_source", pa.string()),  # "reported" by the server, or "estimate" (it sent none)
    pa.field("warning", pa.string()),  # e.g. image_ignored_by_server, proxy_retries=2
    pa.field("batch_id", pa.string()),  # mode = "batch": the provider's batch that answered the row
    pa.field("custom_id", pa.string()),  # mode = "batch": the row's custom_id in that batch's JSONL
]
RESULT_COLUMNS = [field.name for field in RESULT_FIELDS]

FOLD_ROWS = 100_000  # rows per journal segment and the part it is folded into
COMPACT_ROWS = 500_000  # rows per part after the end-of-run merge of small parts (a 10^6-row output: 2 files)
ROW_GROUP_ROWS = 50_000
COMPACT_BATCHES = 1024
FOLD_BYTES = 128 * 1024 * 1024  # also fold a journal segment this big (one-row batches carry ~2 KB of framing)
SCHEMA_VERSION = 2  # 1: state inside the folder (_job.json, _journal/); 2: state folder beside it
FOLD_EVERY_S = 60.0  # fold the journal at least this often while results arrive (rows visible to every reader)
PART_META_KEY = b"qwenvl_batch"
SHARDS_DIR = "shards"  # state/shards/K/: one writer per shard of a sharded run (qwenvl_batch.ray)
_PART = re.compile(r"^part-(\d{6,})\.parquet$")
_SEGMENT = re.compile(r"^seg-(\d{6,})\.arrows$")


def output_schema(manifest_schema: pa.Schema, answer_fields: Iterable[pa.Field] = ()) -> pa.Schema:
    """Manifest columns first (all of them, as typed in the manifest), then the result columns, then the
    structured answer's columns when the job has ``[output.schema]`` (structured.py)."""
    answer = list(answer_fields)
    clash = sorted(set(manifest_schema.names) & (set(RESULT_COLUMNS) | {f.name for f in answer}))
    clash += sorted(n for n in manifest_schema.names if is_answer_column(n) and n not in clash)
    if clash:
        raise ConfigError(
            f"The manifest has column(s) {', '.join(clash)} that the output adds itself; rename them in the manifest"
        )
    return pa.schema(list(manifest_schema) + RESULT_FIELDS + answer)


def _is_result(name: str) -> bool:
    return name in RESULT_COLUMNS or is_answer_column(name)


def iter_segment(path: Path) -> Iterator[pa.RecordBatch]:
    """The complete, valid record batches of a journal segment, up to any damage (damage.SegmentReader)."""
    reader = SegmentReader(path)
    yield from reader
    if reader.damage:
        log.warning("journal segment %s: %s; kept %d complete batches", path, reader.damage, reader.batches_read)


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
        small.append(batch if batch.schema == schema else conform(batch, schema))
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
class Located:
    """Where a batch of id hashes stand in a ResumeIndex (planning.plan_rows). Fingerprints are gathered only for
    the rows asked (``fingerprints``): a resume the index vouches for never touches them."""

    found: np.ndarray  # bool: the id is committed
    ok: np.ndarray  # bool: committed with status "ok"
    slots: np.ndarray  # int64: one number per committed id, < ResumeIndex.slots (-1 where not found)
    vouched: np.ndarray  # bool: found in the persisted index, whose ``stamp`` may vouch for its fingerprint
    index: ResumeIndex

    def fingerprints(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The committed fingerprint (uint64; 0 where not found) of ``rows`` (positions; default: all)."""
        slots = self.slots if rows is None else self.slots[rows]
        result = np.zeros(len(slots), np.uint64)
        base_size = len(self.index.base)
        in_base = (slots >= 0) & (slots < base_size)
        in_recent = slots >= base_size
        result[in_base] = self.index.base.fingerprints[slots[in_base]]
        result[in_recent] = self.index.recent.fingerprints[slots[in_recent] - base_size]
        return result


class _Directory:
    """Where each 2^k-th slice of the hash space starts in a sorted hash array: a lookup then searches a window
    of about 8 entries (a cache line or two) instead of binary-searching all of it. A plain ``searchsorted`` of
    10^7 random hashes in 10^7 takes ~10 s on a 2-core VM, nearly all of it cache misses; this takes ~1 s."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = hashes
        self.bits = max(1, min(32, int(np.ceil(np.log2(max(len(hashes), 1) / 8))))) if len(hashes) > 64 else 0
        if self.bits:
            self.shift = np.uint64(64 - self.bits)
            starts = np.arange(1 << self.bits, dtype=np.uint64) << self.shift
            self.starts = np.append(np.searchsorted(hashes, starts), len(hashes))
            self.steps = int(np.ceil(np.log2(int(np.diff(self.starts).max()) + 1))) + 1

    def find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, position) of each wanted hash."""
        n = len(self.hashes)
        if n == 0:
            return np.zeros(len(wanted), bool), np.zeros(len(wanted), np.int64)
        if not self.bits:
            pos = np.clip(np.searchsorted(self.hashes, wanted), 0, n - 1)
            return self.hashes[pos] == wanted, pos
        bucket = (wanted >> self.shift).astype(np.int64)
        lo, hi = self.starts[bucket], self.starts[bucket + 1]
        for _ in range(self.steps):  # a vectorised binary search inside each window
            mid = (lo + hi) >> 1
            right = self.hashes[np.minimum(mid, n - 1)] < wanted
            active = lo < hi
            lo = np.where(active & right, mid + 1, lo)
            hi = np.where(active & ~right, mid, hi)
        pos = np.minimum(lo, n - 1)
        return self.hashes[pos] == wanted, pos


def _find(hashes: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, position) of each wanted hash in a sorted array: for a few sorted ``wanted`` (a plain binary
    search touches only the pages on their paths; ResumeIndex.locate uses a _Directory for many)."""
    if len(hashes) == 0:
        return np.zeros(len(wanted), bool), np.zeros(len(wanted), np.int64)
    pos = np.clip(np.searchsorted(hashes, wanted), 0, len(hashes) - 1)
    return hashes[pos] == wanted, pos


@dataclass(frozen=True)
class ResumeIndex:
    """What is already committed, keyed by 64-bit id hashes (compact for 10^7 rows), sorted for lookups.

    Two layers: ``base``, the persisted index of the parts it covers (persisted_index.py: memory-mapped, nothing
    copied), and ``recent``, the newest row per id of the parts and journal it does not cover (read now; all of
    them when there is no usable persisted index). A hash in both is answered by ``recent``.
    """

    base: Entries
    recent: Entries
    # spend recorded so far per currency, superseded rows included (they were paid for); never summed across
    committed_costs: dict[str, float] = field(default_factory=dict)
    simulated: int = 0  # rows (superseded ones included) that the built-in simulator answered
    parts: tuple[PartSummary, ...] = ()  # every part read or covered, in order (what the next index binds to)
    clean: bool = True  # no id is in two parts or segments: compaction has nothing to drop
    stamp: str | None = None  # the persisted index's fingerprint stamp (vouches for ``base`` only)
    unique: int = 0  # ids committed (base and recent together)
    _directories: list[_Directory] = field(default_factory=list, repr=False, compare=False)

    def __len__(self) -> int:
        return self.unique

    @property
    def slots(self) -> int:
        """The range of ``Located.slots``: one number per entry of either layer."""
        return len(self.base) + len(self.recent)

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each hash: (found, ok, committed fingerprint or 0)."""
        located = self.locate(hashes)
        return located.found, located.ok, located.fingerprints()

    def locate(self, hashes: np.ndarray) -> Located:
        """Each hash's entry, from ``recent`` first, then ``base``."""
        if not self._directories:
            self._directories.extend([_Directory(self.recent.hashes), _Directory(self.base.hashes)])
        recent, base = self._directories
        in_recent, pos_r = recent.find(hashes)
        in_base, pos_b = base.find(hashes)
        in_base &= ~in_recent
        ok = np.zeros(len(hashes), bool)
        slots = np.full(len(hashes), -1, np.int64)
        if in_recent.any():
            ok[in_recent] = self.recent.ok[pos_r[in_recent]]
            slots[in_recent] = len(self.base) + pos_r[in_recent]
        if in_base.any():
            ok[in_base] = self.base.ok[pos_b[in_base]]
            slots[in_base] = pos_b[in_base]
        return Located(in_recent | in_base, ok, slots, in_base, self)


class OutputInUse(ConfigError):
    """Another process holds this output's lock (exit 2: nothing was sent)."""


def state_dir_for(path: Path) -> Path:
    """The state folder beside an output folder: ``out/x.parquet`` → ``out/x.parquet.state``."""
    return path.with_name(path.name + ".state")


class OutputStore:
    """One output folder; ``recover()`` folds whatever a crash left, ``writer()`` appends, ``finalize()`` compacts.

    ``lock()`` must be held by the one process that writes; readers (report, load_results) never take it.
    """

    def __init__(self, path: Path, schema: pa.Schema, id_column: str, *, fold_rows: int = FOLD_ROWS,
                 fold_every_s: float = FOLD_EVERY_S, simulated: bool = False) -> None:
        self.path = path
        self.schema = schema
        self.id_column = id_column
        self.fold_rows = fold_rows
        self.fold_every_s = fold_every_s
        self.simulated = simulated
        self.state_dir = state_dir_for(path)
        self.journal_dir = self.state_dir / "journal"
        self.meta_path = self.state_dir / "job.json"
        self.tmp_dir = self.state_dir / "tmp"
        self._lock_handle: Any = None

    # -- layout ---------------------------------------------------------------------------------------------
    def parts(self) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.path.glob("part-*.parquet") if (m := _PART.match(p.name)))

    def segments(self) -> list[tuple[int, Path]]:
        """Journal segments, oldest first: this run's journal and the per-shard journals of a sharded run
        (``state/shards/K/journal``, qwenvl_batch.ray), so every reader and recovery sees them all."""
        folders = [self.journal_dir, *sorted((self.state_dir / SHARDS_DIR).glob("*/journal"))]
        found = ((int(m.group(1)), p) for folder in folders if folder.exists()
                 for p in folder.glob("seg-*.arrows") if (m := _SEGMENT.match(p.name)))
        return sorted(found)

    def next_seq(self) -> int:
        numbers = [seq for seq, _ in self.parts()] + [seq for seq, _ in self.segments()]
        return max(numbers, default=0) + 1

    def part_path(self, seq: int) -> Path:
        return self.path / f"part-{seq:06d}.parquet"

    # -- checks before anything is written ------------------------------------------------------------------
    def check_writable(self) -> None:
        """The output and its state folder can be created and written; a one-line ConfigError otherwise."""
        for target in (self.path, self.state_dir):
            if target.exists() and not target.is_dir():
                raise ConfigError(f"Output path {target} is a file; the output is a folder of Parquet parts. "
                                  "Choose another [output] path (e.g. out/results.parquet)")
            existing = target if target.exists() else _nearest_existing(target)
            if not existing.is_dir():
                raise ConfigError(f"Cannot create the output folder {target}: {existing} is a file, not a folder. "
                                  "Choose another [output] path")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"Cannot write the output folder {target}: no write permission on {existing}. "
                                  "Choose another [output] path (--output PATH) or fix the folder's permissions")

    # -- the writer's lock ----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the exclusive lock on this output (created with the state folder); OutputInUse if it is held."""
        if self._lock_handle is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.state_dir / "lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputInUse(f"Output {self.path} is in use by {holder}: one run writes an output at a time. Wait "
                              "for it to finish (or stop it), or choose another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        """Release the lock (the OS does it too when the process dies)."""
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # -- opening and recovery -------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.exists() or self.state_dir.exists()

    def recover(self) -> None:
        """If the output exists: check it belongs to this job, fold any journal a crash left behind, and bring an
        output written by an earlier version to the current columns. Call with the lock held."""
        if not self.exists():
            return
        compaction.complete(self)  # issue 18: finish or undo a compaction a kill interrupted
        self._migrate_legacy_layout()
        self._check_meta()
        if self.tmp_dir.exists():
            for stray in self.tmp_dir.iterdir():
                stray.unlink()
        for seq, segment in self.segments():
            self._fold_segment(seq, segment)
        self._check_schema()

    def create(self) -> None:
        """Make the folders (only once the run is known to go ahead, so a refused run leaves nothing behind)."""
        self.lock()
        self.path.mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._write_meta()

    def _migrate_legacy_layout(self) -> None:
        """Schema version 1 kept ``_job.json`` and ``_journal/`` inside the folder: move them to the state folder."""
        legacy_meta, legacy_journal = self.path / "_job.json", self.path / "_journal"
        if not (legacy_meta.exists() or legacy_journal.exists()):
            return
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        if legacy_journal.exists():
            for segment in legacy_journal.glob("seg-*.arrows"):
                os.replace(segment, self.journal_dir / segment.name)
            legacy_journal.rmdir()
        if legacy_meta.exists():
            os.replace(legacy_meta, self.meta_path)
        for stray in self.path.glob(".part-*.tmp"):
            stray.unlink()
        log.info("moved %s's journal and job metadata to %s", self.path, self.state_dir)

    def read_meta(self) -> dict[str, Any]:
        """The state folder's job.json (empty if there is none); a damaged one is a ConfigError naming it."""
        if not self.meta_path.exists():
            return {}
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.meta_path} is damaged ({exc}); restore it, or delete it and run again "
                              "(the id column and columns are then read from the parts)") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"{self.meta_path} is damaged (not a JSON object); restore it, or delete it and run "
                              "again (the id column and columns are then read from the parts)")
        return meta

    def _check_meta(self) -> None:
        meta = self.read_meta()
        if not meta:
            others = [p for p in self.path.iterdir() if not _PART.match(p.name)] if self.path.is_dir() else []
            if others:
                raise ConfigError(f"Output folder {self.path} holds files that are not qwenvl-batch parts (e.g. "
                                  f"{others[0].name}); choose another [output] path")
            return
        if meta.get("id_column") != self.id_column:
            raise ConfigError(
                f"Output {self.path} was written with id column {meta.get('id_column')!r}, this job uses "
                f"{self.id_column!r}; use a new [output] path"
            )
        if _meta_version(meta, self.meta_path) > SCHEMA_VERSION:
            raise ConfigError(f"Output {self.path} was written by a newer qwenvl-batch ({meta.get('updated_by')}); "
                              "upgrade qwenvl-batch to resume it")

    def _write_meta(self) -> None:
        old = self.read_meta()
        manifest_columns = [n for n in self.schema.names if not _is_result(n)]
        meta = {"schema_version": SCHEMA_VERSION, "id_column": self.id_column,
                "manifest_columns": manifest_columns, "result_columns": RESULT_COLUMNS,
                "answer_columns": [n for n in self.schema.names if is_answer_column(n)],
                "created_by": old.get("created_by", f"qwenvl-batch {__version__}"),
                "created_at": old.get("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                "updated_by": f"qwenvl-batch {__version__}"}
        _atomic_write_text(self.meta_path, json.dumps(meta, indent=2))

    def _check_schema(self) -> None:
        """Manifest columns must match; result columns may have grown with a newer version (old parts upgraded)."""
        parts = self.parts()
        if not parts:
            return
        existing = _read_part_schema(parts[-1][1])
        old_results = [n for n in existing.names if n in RESULT_COLUMNS or n not in self.schema.names]
        old_manifest = [n for n in existing.names if not _is_result(n)]
        new_manifest = [n for n in self.schema.names if not _is_result(n)]
        if old_manifest != new_manifest:
            added = sorted(set(new_manifest) - set(old_manifest))
            removed = sorted(set(old_manifest) - set(new_manifest))
            raise ConfigError(
                f"The manifest's columns changed since {self.path} was started (added: {added or 'none'}, removed: "
                f"{removed or 'none'}); use a new [output] path, or restore the manifest's columns"
            )
        changed = [f"{name!r} was {existing.field(name).type}, now {self.schema.field(name).type}"
                   for name in new_manifest if not existing.field(name).type.equals(self.schema.field(name).type)]
        if changed:
            raise ConfigError(
                f"The manifest's column types changed since {self.path} was started ({'; '.join(changed)}): stored "
                "values are never rewritten to another type (ids like 001 would become 1). Give the manifest its "
                "original types (e.g. the same file format), or use a new [output] path"
            )
        self._check_answer_columns(existing)
        unknown = sorted(set(old_results) - set(RESULT_COLUMNS) - {n for n in existing.names if is_answer_column(n)})
        if unknown:
            raise ConfigError(f"Output {self.path} has result columns this version does not know ({unknown}); it was "
                              "written by a newer qwenvl-batch: upgrade to resume it")
        if existing.names != self.schema.names or any(_part_schema_version(p) < SCHEMA_VERSION for _, p in parts):
            self._upgrade_parts(parts)

    def _check_answer_columns(self, existing: pa.Schema) -> None:
        """The structured answer's columns ([output.schema]) may grow (old rows get nulls); a field removed, or
        given another type, is refused: the output's columns would no longer describe its rows."""
        old = {f.name: f.type for f in existing if is_answer_column(f.name)}
        new = {f.name: f.type for f in self.schema if is_answer_column(f.name)}
        if not old or old.items() <= new.items():
            return
        removed = sorted(set(old) - set(new))
        retyped = sorted(n for n in set(old) & set(new) if old[n] != new[n])
        what = "the job has no [output.schema] now" if not new else (
            f"removed: {removed or 'none'}; changed type: "
            f"{', '.join(f'{n} {old[n]} -> {new[n]}' for n in retyped) or 'none'}")
        raise ConfigError(
            f"The output schema ([output.schema]) changed since {self.path} was started ({what}). Nothing was sent. "
            "Use a new [output] path (--output PATH), or restore the schema; adding fields is fine"
        )

    def _upgrade_parts(self, parts: list[tuple[int, Path]]) -> None:
        """Rewrite parts of an earlier version with this version's columns (new ones null), one at a time."""
        for seq, part in parts:
            if _read_part_schema(part).names == self.schema.names and _part_schema_version(part) == SCHEMA_VERSION:
                continue
            batches = pq.ParquetFile(part).iter_batches(batch_size=ROW_GROUP_ROWS)
            self._write_part(batches, seq, replace=True)
        log.info("upgraded %d part(s) of %s to schema version %d", len(parts), self.path, SCHEMA_VERSION)

    def _fold_segment(self, seq: int, segment: Path) -> None:
        """Journal segment → part with the same number, then drop the segment (safe to repeat after a crash).

        A damaged segment (damage.py) gives its rows up to the damage, and is then quarantined, not deleted."""
        reader = SegmentReader(segment, self.schema)
        if not self.part_path(seq).exists():
            self._write_part(reader, seq)
        else:
            for _ in reader:  # folded before a crash: only whether it is damaged is still needed
                pass
        if reader.damage:
            quarantine(self.state_dir, segment, f"journal segment {reader.damage}")
        else:
            segment.unlink()
        _fsync_dir(segment.parent)

    def _write_part(self, batches: Iterable[pa.RecordBatch], seq: int, *, replace: bool = False,
                    folder: Path | None = None) -> Path | None:
        """Write batches as part ``seq``, streamed in row groups (memory: one row group, whatever the part's size);
        temporary file in the state folder, fsync, atomic rename. Nothing is written for no rows. ``folder``:
        another folder than the output's (compaction builds the next generation there)."""
        final = self.part_path(seq) if folder is None else folder / self.part_path(seq).name
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"part-{seq:06d}.parquet.tmp"
        schema = self.schema.with_metadata({PART_META_KEY: json.dumps(
            {"id_column": self.id_column, "schema_version": SCHEMA_VERSION}).encode()})
        rows = 0
        # page checksums: a flipped bit in a part is an error naming the part, not a silently altered id (issue 18)
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer:
            for group in _row_groups(batches, self.schema, ROW_GROUP_ROWS):
                writer.write_table(group.replace_schema_metadata(schema.metadata))
                rows += group.num_rows
        if not rows and not replace:
            tmp.unlink()
            return None
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    # -- reading --------------------------------------------------------------------------------------------
    def resume_index(self) -> ResumeIndex:
        """Committed rows (parts and journal), newest per id, as a compact sorted index (17 bytes per row), and
        the spend recorded so far.

        The persisted index (persisted_index.py) answers for the parts it was written for when they are all
        still there and unchanged; only parts added since, and the journal, are read. Without a usable one (none
        yet, stale, damaged), every part is read, as before. Read-only: nothing is written here.
        """
        parts = self.parts()
        persisted = persisted_index.load(self.state_dir, self.id_column) if parts else None
        covered = _covered(persisted.parts, parts) if persisted is not None else None
        if persisted is not None and covered is None:
            log.info("%s's resume index describes other parts than the folder holds; reading every part",
                     self.path)
            persisted = None
        summaries = list(persisted.parts) if persisted is not None else []
        costs: dict[str, float] = {}
        simulated = 0
        for summary in summaries:
            for currency, amount in summary.costs.items():
                costs[currency] = costs.get(currency, 0.0) + amount
            simulated += summary.simulated
        hashes, ok, fingerprints = [], [], []
        columns = ["status", "fingerprint", "cost", "currency", "simulated"]
        for source, table in self._uncovered_tables(parts[len(summaries):], columns):
            hashes.append(hash_ids(id_strings(table.column(self.id_column))))
            ok.append(pc.equal(table.column("status"), "ok").fill_null(False).to_numpy(zero_copy_only=False))
            fingerprints.append(fingerprints_of(table.column("fingerprint")))
            table_costs: dict[str, float] = {}
            add_spend(table_costs, table.column("cost"), table.column("currency"))
            table_simulated = int(pc.sum(table.column("simulated").cast(pa.int64())).as_py() or 0)
            for currency, amount in table_costs.items():
                costs[currency] = costs.get(currency, 0.0) + amount
            simulated += table_simulated
            if isinstance(source, os.stat_result):  # a part (not a journal segment): the next index binds to it
                summaries.append(PartSummary(parts[len(summaries)][1].name, source.st_size, source.st_mtime_ns,
                                             table.num_rows, table_costs, table_simulated))
        superseded = compaction.read_superseded(self.state_dir)  # rows compaction dropped were paid for too
        for currency, amount in superseded.costs.items():
            costs[currency] = costs.get(currency, 0.0) + amount
        simulated += superseded.simulated
        base = persisted.entries if persisted is not None else Entries.empty()
        recent, repeated = _newest(hashes, ok, fingerprints)
        overlap = int(_find(base.hashes, recent.hashes)[0].sum()) if len(recent) else 0
        clean = (persisted.clean if persisted is not None else True) and not repeated and not overlap
        return ResumeIndex(base, recent, committed_costs=costs, simulated=simulated, parts=tuple(summaries),
                           clean=clean, stamp=persisted.stamp if persisted is not None else None,
                           unique=len(base) + len(recent) - overlap)

    def save_resume_index(self, index: ResumeIndex | None = None, *, stamp: str | None = None,
                          clean: bool | None = None) -> None:
        """Persist the resume index for the parts the folder holds now (after any compaction), so the next start
        maps it instead of reading every part. A cache: a failure costs the next start time, never a row (it is
        logged, not raised). Nothing is written while journal segments hold rows outside the parts."""
        try:
            index = index if index is not None else self.resume_index()
            if self.segments():
                return
            parts = self.parts()
            if not parts:
                persisted_index.remove(self.state_dir)
                return
            known = {summary.name: summary for summary in index.parts}
            summaries = []
            for _, part in parts:
                stat = part.stat()
                summary = known.get(part.name)
                summaries.append(summary if summary is not None and summary.same_file(stat)
                                 else self._summarize(part, stat))
            persisted_index.write(self.state_dir, self.id_column, index.base, index.recent, summaries,
                                  clean=index.clean if clean is None else clean, stamp=stamp)
        except (OSError, ValueError, pa.ArrowException, ConfigError) as exc:
            log.warning("could not write the resume index of %s (%s); the next start reads every part instead",
                        self.path, exc)

    def _summarize(self, part: Path, stat: os.stat_result) -> PartSummary:
        """A part the index has not seen (compaction wrote it): its rows and their spend."""
        table = _with_columns(self._read_part(part, ["cost", "currency", "simulated"]),
                              ["cost", "currency", "simulated"])
        costs: dict[str, float] = {}
        add_spend(costs, table.column("cost"), table.column("currency"))
        simulated = int(pc.sum(table.column("simulated").cast(pa.int64())).as_py() or 0)
        return PartSummary(part.name, stat.st_size, stat.st_mtime_ns, table.num_rows, costs, simulated)

    def _uncovered_tables(self, parts: list[tuple[int, Path]],
                          columns: list[str]) -> Iterator[tuple[os.stat_result | None, pa.Table]]:
        """``parts`` then every journal segment, oldest first; a part comes with its stat as read (what an index
        built from it binds to)."""
        wanted = [self.id_column, *columns]
        for _, part in parts:
            stat = part.stat()
            yield stat, _with_columns(self._read_part(part, wanted), wanted)
        for table in self._segment_tables(wanted):
            yield None, table

    def _iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Parts then journal segments, oldest first, so later rows supersede earlier ones. Columns a part of an
        earlier version lacks come back as nulls."""
        wanted = None if columns is None else [self.id_column, *columns]
        for _, part in self.parts():
            table = self._read_part(part, wanted)
            yield _with_columns(table, wanted) if wanted else table
        yield from self._segment_tables(wanted)

    def _segment_tables(self, wanted: list[str] | None) -> Iterator[pa.Table]:
        for _, segment in self.segments():
            batches = list(iter_segment(segment))
            if not batches:  # empty (0 bytes, only a header) or unreadable from its start: nothing committed
                continue
            try:
                table = pa.Table.from_batches([conform(b, self.schema) for b in batches], schema=self.schema) \
                    if self.schema.names else pa.Table.from_batches(batches)
            except (pa.ArrowException, ValueError) as exc:  # columns a damaged header renamed or retyped
                log.warning("journal segment %s does not match the output's columns (%s); skipped", segment, exc)
                continue
            if wanted and self.id_column not in table.column_names:
                log.warning("journal segment %s has no id column %r; skipped", segment, self.id_column)
                continue
            yield _with_columns(table, wanted) if wanted else table

    def _read_part(self, part: Path, columns: list[str] | None) -> pa.Table:
        """One part's table, opened once: of ``columns``, those the part has (an earlier version's part lacks the
        newer ones); a damaged part is a one-line ConfigError naming it and the fix (damage.py)."""
        try:
            with pq.ParquetFile(part, page_checksum_verification=True) as file:
                present = set(file.schema_arrow.names)
                return file.read(columns=[c for c in columns if c in present] if columns is not None else None)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise damaged_part(part, self.state_dir, exc) from None

    # -- writing --------------------------------------------------------------------------------------------
    def writer(self, on_error: Callable[[BaseException], None] | None = None) -> ResultWriter:
        return ResultWriter(self, on_error=on_error)

    def finalize(self, *, target_rows: int = COMPACT_ROWS, stamp: str | None = None) -> None:
        """Drop superseded rows and merge small parts, so the folder holds one row per id in few files; then
        persist the resume index for the next start (``stamp``: see persisted_index.py).

        Streamed: parts are read a row group at a time, so memory does not grow with the output. Every part's ids
        are read only when the index says some id may be in two parts (``clean``); otherwise the parts' row
        counts, which the index holds, are enough.
        """
        index = self.resume_index()
        parts = self.parts()
        if parts:
            rows = {summary.name: summary.rows for summary in index.parts}
            sizes = {seq: rows[part.name] for seq, part in parts}
            keep = {} if index.clean else self._kept_rows(parts)
            dirty = {seq for seq, mask in keep.items() if not mask.all()}
            small = {seq for seq, n in sizes.items() if n < target_rows // 2}
            rewrite = sorted(dirty | (small if len(small) > 1 else set()))
            if rewrite:  # a new generation, switched in at once
                compaction.compact(self, rewrite, {seq: keep[seq] if seq in keep else np.ones(sizes[seq], bool)
                                                   for seq in rewrite}, target_rows)
        self.save_resume_index(index, stamp=stamp, clean=True)
        release_arrow_memory()

    def _kept_rows(self, parts: list[tuple[int, Path]]) -> dict[int, np.ndarray]:
        """Per part, which rows no later row with the same id replaces (every part's ids are read)."""
        hashes, seqs = [], []
        for seq, part in parts:
            ids = self._read_part(part, [self.id_column]).column(self.id_column)
            hashes.append(hash_ids(id_strings(ids)))
            seqs.append(np.full(len(ids), seq, dtype=np.int64))
        all_seqs = np.concatenate(seqs)
        superseded = _superseded(np.concatenate(hashes))
        return {seq: ~superseded[all_seqs == seq] for seq, _ in parts}


def release_arrow_memory() -> None:
    """Hand the pages Arrow's pool freed back to the OS. Its default allocator (mimalloc) keeps them: each fold and
    the final compaction left ~1.3 KB per row folded resident for the rest of the run, so a 10^6-row run's RSS
    grew by hundreds of MB while Arrow itself held ~5 MB (measured: /proc VmRSS vs pa.total_allocated_bytes)."""
    pa.default_memory_pool().release_unused()


def _covered(summaries: list[PartSummary], parts: list[tuple[int, Path]]) -> int | None:
    """How many of the folder's first parts a persisted index covers: all it names must be those parts, in order,
    unchanged (size and modification time); parts after them are newer folds. None when it does not fit."""
    if len(summaries) > len(parts):
        return None
    for summary, (_, part) in zip(summaries, parts, strict=False):
        try:
            if part.name != summary.name or not summary.same_file(part.stat()):
                return None
        except OSError:
            return None
    return len(summaries)


def _newest(hashes: list[np.ndarray], ok: list[np.ndarray],
            fingerprints: list[np.ndarray]) -> tuple[Entries, bool]:
    """Rows in file order → the newest per id hash, sorted; and whether any id came more than once.

    Consumes the lists (they are emptied as they are joined) and drops each intermediate array as soon as it is
    used: rebuilding a 10^7-row index this way peaks at about half of what keeping them all would."""
    if not hashes:
        return Entries.empty(), False
    all_hashes = np.concatenate(hashes)
    hashes.clear()
    # newest wins: a stable sort keeps file order within equal hashes, so the last of each run is the newest
    order = np.argsort(all_hashes, kind="stable")
    all_hashes = all_hashes[order]
    rows = len(order)
    last = np.ones(rows, bool)
    last[:-1] = all_hashes[1:] != all_hashes[:-1]
    keep = order[last]
    del order
    unique = all_hashes[last]
    del all_hashes, last
    joined = np.concatenate(fingerprints)
    fingerprints.clear()
    kept_fingerprints = joined[keep]
    del joined
    joined_ok = np.concatenate(ok)
    ok.clear()
    return Entries(unique, kept_fingerprints, joined_ok[keep]), bool(len(keep) < rows)


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


def _nearest_existing(path: Path) -> Path:
    """The closest ancestor of ``path`` that exists (where a missing output folder would be created)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def _read_part_schema(part: Path) -> pa.Schema:
    """A part's schema; a damaged part is a ConfigError naming the file and the fix."""
    try:
        return pq.read_schema(part)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise damaged_part(part, state_dir_for(part.parent), exc) from None


def _meta_version(meta: dict[str, Any], path: Path) -> int:
    """job.json's schema version; a value that is not a number is a damaged file (ConfigError naming it)."""
    try:
        return int(meta.get("schema_version", 1))
    except (TypeError, ValueError):
        raise ConfigError(f"{path} is damaged (schema_version {meta.get('schema_version')!r}); restore it, or "
                          "delete it and run again (the id column and columns are then read from the parts)") from None


def _part_schema_version(part: Path) -> int:
    metadata = _read_part_schema(part).metadata or {}
    raw = metadata.get(PART_META_KEY)
    try:
        return int(json.loads(raw)["schema_version"]) if raw else 1
    except (ValueError, KeyError, TypeError):
        return 1


def _with_columns(table: pa.Table, columns: list[str]) -> pa.Table:
    """``table`` with exactly ``columns``, in that order; missing ones (an earlier version's part) as nulls."""
    for name in columns:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table.select(columns)


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A batch in ``schema``'s column order and types; columns it lacks (written by an earlier version) as nulls."""
    arrays = []
    for target in schema:
        index = batch.schema.get_field_index(target.name)
        column = batch.column(index) if index >= 0 else pa.nulls(batch.num_rows, target.type)
        arrays.append(column if column.type == target.type else column.cast(target.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class WriterFailed(JobError):
    """The result writer could not store results (disk full, I/O error, folder removed): the job stops."""


class ResultWriter:
    """Appends result rows to the journal from a thread of its own, so disk I/O never stalls the event loop.

    ``put`` is called from the event loop and only enqueues. The thread writes whatever has queued up as one
    record batch and flushes it at once (so a result survives a crash of this process within milliseconds of
    arriving), fsyncs at most a second later (so it survives a power cut too), and folds the segment into a
    Parquet part every ``fold_rows`` rows or ``fold_every_s`` seconds. If writing fails, ``on_error`` is called
    at once (from the writer's thread) so the runner starts no new request; rows put after that are counted as
    received but not stored.
    """

    _CLOSE = object()

    def __init__(self, store: OutputStore, *, max_batch: int = 2048, fsync_every_s: float = 1.0,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.store = store
        self.max_batch = max_batch
        self.fsync_every_s = fsync_every_s
        self.on_error = on_error
        self.error: BaseException | None = None
        self.lost: dict[str, int] = {}  # rows received but not stored because writing failed, by status
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="qwenvl-batch-writer", daemon=True)
        self._seq = 0
        self._segment_rows = 0
        self._segment_opened = 0.0
        self._sink: pa.OSFile | None = None
        self._ipc: ipc.RecordBatchStreamWriter | None = None
        self._last_fsync = 0.0
        self._dirty = False

    def start(self) -> ResultWriter:
        self._thread.start()
        return self

    def put(self, row: dict[str, Any]) -> None:
        if self.error is not None:
            self._lose([row])
            return
        if self.store.simulated:
            row["simulated"] = True
        self._queue.put(row)

    def close(self) -> None:
        """Write what is queued, fold the journal into a part, stop the thread; WriterFailed if writing failed."""
        self._queue.put(self._CLOSE)
        self._thread.join()
        if self.error is not None:
            raise self.failure()

    def failure(self) -> WriterFailed:
        """The job-level error for a failed writer: what failed, where, and how many answers were not stored."""
        count = sum(self.lost.values())
        lost = f"; {count:,} answer(s) received could not be stored and stay pending" if count else ""
        return WriterFailed(f"Cannot write results to {self.store.path} (journal {self.store.journal_dir}): "
                            f"{self.error}{lost}. The output stays readable; free space or fix the folder, then run "
                            "again to continue")

    def _run(self) -> None:
        rows: list[dict[str, Any]] = []
        try:
            while True:
                rows, closing = self._drain()
                if rows:
                    self._append(rows)  # a batch that fails is dropped whole on recovery: all of it is lost
                rows = []
                if closing:
                    self._fold()
                    return
        except Exception as exc:  # a full disk, a vanished folder: the runner stops the job
            log.debug("result writer failed", exc_info=True)
            self.error = exc
            self._lose(rows)
            self._discard_queued()
            if self.on_error is not None:
                self.on_error(exc)

    def _lose(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            status = str(row.get("status"))
            self.lost[status] = self.lost.get(status, 0) + 1

    def _discard_queued(self) -> None:
        """Rows still queued when writing failed: not stored (they stay pending), counted for the message."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not self._CLOSE:
                self._lose([item])

    def _drain(self) -> tuple[list[dict[str, Any]], bool]:
        rows: list[dict[str, Any]] = []
        while True:  # wait for work; a quiet second is the time to fsync (and, when due, fold) what was written
            try:
                item = self._queue.get(timeout=self.fsync_every_s)
                break
            except queue.Empty:
                self._sync()
                if self._fold_due():
                    self._fold()
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
            self._segment_opened = time.monotonic()
        self._ipc.write_batch(pa.RecordBatch.from_pylist(rows, schema=self.store.schema))
        assert self._sink is not None
        self._sink.flush()
        self._dirty = True
        if time.monotonic() - self._last_fsync >= self.fsync_every_s:
            self._sync()
        self._segment_rows += len(rows)
        if self._segment_rows >= self.store.fold_rows or self._sink.tell() >= FOLD_BYTES or self._fold_due():
            self._fold()

    def _fold_due(self) -> bool:
        """A segment open for ``fold_every_s``: fold it so every reader sees its rows within about a minute."""
        return self._ipc is not None and time.monotonic() - self._segment_opened >= self.store.fold_every_s

    def _sync(self) -> None:
        """fsync the journal (survives a power cut, not only a crash) if anything was written since the last."""
        if self._dirty and self._sink is not None:
            os.fsync(self._sink.fileno())
            self._dirty = False
        self._last_fsync = time.monotonic()

    def _fold(self) -> None:
        if self._ipc is None or self._sink is None:
            return
        self._ipc.close()
        os.fsync(self._sink.fileno())
        self._sink.close()
        self._ipc = self._sink = None
        self._dirty = False
        segment = self.store.journal_dir / f"seg-{self._seq:06d}.arrows"
        self.store._fold_segment(self._seq, segment)
        release_arrow_memory()


def load_results(path: str | Path, *, documents: bool = False) -> pd.DataFrame:
    """An output folder as a DataFrame, one row per id (newest wins), including results still in the journal.

    Works on the output of a run that is still going or was interrupted (no lock is taken);
    ``pandas.read_parquet`` sees only the committed parts. ``documents=True`` (a ``[documents]`` job): one row
    per document instead of per page (see documents.document_view).
    """
    store = open_for_reading(path)
    tables = list(store._iter_tables())
    id_column = store.id_column
    if not tables:
        frame = pd.DataFrame(columns=[id_column, *RESULT_COLUMNS])
    else:
        table = pa.concat_tables(tables, promote_options="default")
        keys = pd.Series(id_strings(table.column(id_column)))
        frame = table.to_pandas().loc[~keys.duplicated(keep="last").to_numpy()].reset_index(drop=True)
    if documents:  # issue 12
        from .documents import document_view

        return document_view(frame, source=Path(path))
    return frame


def open_for_reading(path: str | Path) -> OutputStore:
    """An existing output (either layout), read-only: the id column from the state folder or the parts."""
    folder = Path(path)
    probe = OutputStore(folder, pa.schema([]), "")
    meta = probe.read_meta()
    legacy = folder / "_job.json"
    if not meta and legacy.exists():
        try:
            meta = json.loads(legacy.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{legacy} is damaged ({exc}); restore it, or delete it (the id column is then read "
                              "from the parts)") from None
        meta = meta if isinstance(meta, dict) else {}
        probe.journal_dir = folder / "_journal"
    id_column = meta.get("id_column")
    if not id_column:
        parts = probe.parts()
        raw = (_read_part_schema(parts[0][1]).metadata or {}).get(PART_META_KEY) if parts else None
        try:
            id_column = json.loads(raw).get("id_column") if raw else None
        except (ValueError, AttributeError):
            id_column = None
    if not id_column:
        raise ConfigError(f"{folder} is not a qwenvl-batch output folder (no {probe.meta_path}, and no part "
                          "says which column is the id)")
    probe.id_column = id_column
    return probe
