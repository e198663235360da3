"""End-of-run compaction that readers never observe half-done, and the spend of the rows it drops.

Compaction (``OutputStore.finalize``) drops superseded rows (a row written again by ``--retry-failed`` or
``--rerun-changed``) and merges small parts. Done in place, a reader (``pandas.read_parquet(OUT)``) could see the
new parts beside the old ones, and a kill between the two left every row twice until the next run. Instead the
new generation of the folder is built complete in the state folder, then switched in at once:

1. ``OUT.state/next/`` gets hard links to the parts that do not change and the rewritten parts (new numbers).
2. ``OUT.state/compaction.json`` records the new parts' names and the new spend totals (below), fsynced.
3. The switch: ``renameat2(RENAME_EXCHANGE)`` swaps ``OUT`` and ``next`` in one atomic step where the OS has it
   (Linux); elsewhere two renames (``OUT`` → ``OUT.state/previous``, ``next`` → ``OUT``), between which ``OUT``
   does not exist for the time of one system call.
4. ``spend.json`` gets the new totals; the old generation and ``compaction.json`` are removed.

``complete(store)`` runs first in every recovery and finishes or undoes an interrupted compaction from
``compaction.json``: if ``OUT`` holds the new parts, the switch happened (finish steps 4); if ``OUT`` is missing,
the kill fell between the two renames (do the second); otherwise the switch never happened (drop ``next``).

What a reader can observe: either the old generation or the new one, never a mix, so never a duplicate or a
missing row introduced by compaction. A reader that listed the folder before the switch and opens a rewritten
part after it gets ``FileNotFoundError`` (read again); with the two-rename fallback, a reader that lists the
folder during that one system call finds no folder. Parts that did not change keep their names and inodes.

Spend: the spend cap counts everything paid, and a dropped row was paid. Its cost is added, per currency, to
the running totals in ``OUT.state/spend.json`` as part of the same switch (absolute totals, so finishing a
compaction twice never counts twice); ``resume_index`` adds them to the costs of the rows kept.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .currency import add_spend
from .durable import fsync_dir as _fsync_dir

if TYPE_CHECKING:
    from .store import OutputStore

log = logging.getLogger(__name__)

COMPACTION_FILE = "compaction.json"
SPEND_FILE = "spend.json"
NEXT_DIR = "next"
PREVIOUS_DIR = "previous"
_BATCH_ROWS = 50_000


@dataclass
class Superseded:
    """What rows dropped by compaction cost, per currency, and how many the simulator answered."""

    costs: dict[str, float] = field(default_factory=dict)
    simulated: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"superseded_costs": self.costs, "superseded_simulated": self.simulated}


def read_superseded(state_dir: Path) -> Superseded:
    """The running totals in ``spend.json`` (none yet: zero); a damaged file is logged and counts as zero."""
    path = state_dir / SPEND_FILE
    if not path.exists():
        return Superseded()
    try:
        raw = json.loads(path.read_text())
        costs = {str(k): float(v) for k, v in dict(raw.get("superseded_costs", {})).items()}
        return Superseded(costs=costs, simulated=int(raw.get("superseded_simulated", 0)))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("%s is damaged (%s): the spend of rows dropped by earlier compactions is not counted; "
                    "restore it to keep the spend cap exact", path, exc)
        return Superseded()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def compact(store: OutputStore, rewrite: list[int], keep: dict[int, np.ndarray], target_rows: int) -> None:
    """Switch the output folder to a generation where parts ``rewrite`` keep only the rows ``keep`` marks."""
    state = store.state_dir
    next_dir = state / NEXT_DIR
    if next_dir.exists():
        shutil.rmtree(next_dir)
    next_dir.mkdir(parents=True)
    rewritten = {store.part_path(seq).name for seq in rewrite}
    for entry in store.path.iterdir():  # everything else stays, whatever it is (a reader's own file too)
        if entry.name not in rewritten:
            _link_or_copy(entry, next_dir / entry.name)
    dropped = read_superseded(state)
    seq = store.next_seq()
    new_parts: list[str] = []
    batches = _kept_batches(store, rewrite, keep, dropped)
    for chunk in _chunks_of(batches, target_rows):
        written = store._write_part(chunk, seq, folder=next_dir)
        if written is not None:
            new_parts.append(written.name)
            seq += 1
    _fsync_dir(next_dir)
    _write_json(state / COMPACTION_FILE, {"new_parts": new_parts, "old_parts": [store.part_path(s).name
                                                                                 for s in rewrite],
                                          **dropped.to_json()})
    _fsync_dir(state)
    _switch(store.path, next_dir, state / PREVIOUS_DIR)
    _finish(store)


def complete(store: OutputStore) -> None:
    """Finish or undo a compaction a crash interrupted (see the module docstring); nothing to do otherwise."""
    state = store.state_dir
    record = state / COMPACTION_FILE
    next_dir, previous = state / NEXT_DIR, state / PREVIOUS_DIR
    if not record.exists():
        for leftover in (next_dir, previous):  # a compaction killed before its record, or after its last step
            if leftover.exists():
                shutil.rmtree(leftover)
        return
    try:
        raw = json.loads(record.read_text())
        new_parts = [str(name) for name in raw["new_parts"]]
        old_parts = [str(name) for name in raw.get("old_parts", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # written before the switch, so the switch did not
        log.warning("%s is damaged (%s); the interrupted compaction is undone", record, exc)
        new_parts, old_parts = ["\0never"], []
    if not store.path.exists() and next_dir.exists():
        os.rename(next_dir, store.path)  # killed between the fallback's two renames
        _fsync_dir(store.path.parent)
    names = {p.name for p in store.path.iterdir()} if store.path.exists() else set()
    switched = set(new_parts) <= names and not (set(old_parts) & names)
    if switched:
        if next_dir.exists():  # after an exchange, next/ holds the old generation
            os.rename(next_dir, previous)
        log.info("finished the compaction of %s that was interrupted", store.path)
        _finish(store)
    else:
        if next_dir.exists():
            shutil.rmtree(next_dir)
        record.unlink()
        log.info("undid the compaction of %s that was interrupted before its switch", store.path)


def _finish(store: OutputStore) -> None:
    """After the switch: record the spend totals, remove the old generation, then the compaction record."""
    state = store.state_dir
    record = state / COMPACTION_FILE
    raw = json.loads(record.read_text())
    _write_json(state / SPEND_FILE, {"superseded_costs": raw.get("superseded_costs", {}),
                                     "superseded_simulated": raw.get("superseded_simulated", 0)})
    previous = state / PREVIOUS_DIR
    if previous.exists():
        shutil.rmtree(previous)
    record.unlink()
    _fsync_dir(state)


def _switch(path: Path, next_dir: Path, previous: Path) -> None:
    """Make ``next_dir`` the output folder: one atomic exchange where the OS has it, else two renames."""
    if _exchange(path, next_dir):
        os.rename(next_dir, previous)
    else:
        os.rename(path, previous)
        os.rename(next_dir, path)
    _fsync_dir(path.parent)
    _fsync_dir(previous.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Linux's ``renameat2(RENAME_EXCHANGE)``: both names swap in one step. False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied, same inode); a copy where the filesystem has no hard links."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True)
        return
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _kept_batches(store: OutputStore, seqs: list[int], keep: dict[int, np.ndarray],
                  dropped: Superseded) -> Iterator[pa.RecordBatch]:
    """The rows of these parts that are not superseded, batch by batch; the dropped rows' spend into ``dropped``."""
    for seq in seqs:
        offset = 0
        source = pq.ParquetFile(store.part_path(seq), page_checksum_verification=True)
        for batch in source.iter_batches(batch_size=_BATCH_ROWS):
            mask = keep[seq][offset: offset + batch.num_rows]
            offset += batch.num_rows
            gone = batch.filter(pa.array(~mask))
            if gone.num_rows:
                _count(dropped, gone)
            yield batch.filter(pa.array(mask))


def _count(dropped: Superseded, gone: pa.RecordBatch) -> None:
    names = gone.schema.names
    if "cost" in names and "currency" in names:
        add_spend(dropped.costs, gone.column("cost"), gone.column("currency"))
    if "simulated" in names:
        dropped.simulated += sum(1 for value in gone.column("simulated").to_pylist() if value)


def _chunks_of(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[Iterator[pa.RecordBatch]]:
    from .store import _chunks_of as chunks

    return chunks(batches, rows)
