"""Reading a large output for ``report`` and ``status``: one row per id (the newest), only the columns asked for,
one part at a time.

Why a module of its own: ``load_results`` builds one DataFrame of every column (responses included), which at
10^7 rows is gigabytes and a minute. ``report`` and ``status`` need a few columns and aggregate them, so they take
the output a part (≤ ``FOLD_ROWS`` rows) at a time from ``newest_rows`` and keep only running totals and the few
per-row arrays a percentile or a chart needs (see report.py, report_html.py, status.py).

Two passes over the parts and journal segments, listed once: the first reads the id column only and finds the
rows a later row with the same id replaces (ids compared by a 64-bit hash, as the resume index does); the second
reads the wanted columns and drops those rows. A run may fold a journal segment into a part, append to a segment,
or compact the parts between the two passes: a segment that grew is read up to the rows the first pass saw, and a
file that vanished restarts the scan (at most ``_ATTEMPTS`` times), so the figures describe one moment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .manifest import hash_ids, id_strings
from .store import OutputStore, _read_part_schema, _with_columns, conform, iter_segment

__all__ = ["newest_rows", "output_columns"]

_ATTEMPTS = 3


@dataclass(frozen=True)
class _Source:
    kind: str  # "part" or "segment"
    path: Path
    rows: int = 0


class OutputChanged(Exception):
    """A file listed by the first pass is gone (a fold or compaction ran meanwhile): scan again."""


def newest_rows(store: OutputStore, columns: list[str]) -> Iterator[pa.Table]:
    """Tables (one per part or journal segment, in write order) holding ``columns`` (ask for the id column if it
    is needed) of every row that no later row with the same id replaces; columns a file lacks come back as nulls."""
    for attempt in range(_ATTEMPTS):
        sources, drop = _first_pass(store)
        try:
            yield from _second_pass(store, sources, drop, columns, restartable=attempt < _ATTEMPTS - 1)
            return
        except OutputChanged:
            continue


def output_columns(store: OutputStore) -> list[str]:
    """Every column any part or journal segment has, in first-seen order (what ``load_results`` would return)."""
    names: dict[str, None] = {}
    for _, part in store.parts():
        names.update(dict.fromkeys(_read_part_schema(part).names))
    for _, segment in store.segments():
        for batch in iter_segment(segment):
            names.update(dict.fromkeys(batch.schema.names))
            break
    return list(names)


def _first_pass(store: OutputStore) -> tuple[list[_Source], np.ndarray]:
    """The files to read, with their row counts, and which rows (in file order) a later row replaces."""
    sources, hashes = [], []
    for _, part in store.parts():
        ids = store._read_part(part, [store.id_column]).column(store.id_column)
        sources.append(_Source("part", part, len(ids)))
        hashes.append(hash_ids(id_strings(ids)))
    for _, segment in store.segments():
        ids = _segment_ids(store, segment)
        if ids is None:
            continue
        sources.append(_Source("segment", segment, len(ids)))
        hashes.append(hash_ids(id_strings(ids)))
    return sources, _superseded(np.concatenate(hashes) if hashes else np.empty(0, np.uint64))


def _segment_ids(store: OutputStore, segment: Path) -> pa.ChunkedArray | None:
    table = _segment_table(store, segment)
    if table is None or store.id_column not in table.column_names:
        return None
    return table.column(store.id_column)


def _segment_table(store: OutputStore, segment: Path) -> pa.Table | None:
    """A journal segment's rows as ``store._iter_tables`` reads them (None: empty, or unreadable columns)."""
    batches = list(iter_segment(segment))
    if not batches:
        return None
    try:
        if store.schema.names:
            return pa.Table.from_batches([conform(b, store.schema) for b in batches], schema=store.schema)
        return pa.Table.from_batches(batches)
    except (pa.ArrowException, ValueError):  # columns a damaged header renamed or retyped (store logs it)
        return None


def _second_pass(store: OutputStore, sources: list[_Source], drop: np.ndarray, columns: list[str], *,
                 restartable: bool) -> Iterator[pa.Table]:
    wanted = list(dict.fromkeys(columns))
    offset = 0
    for source in sources:
        if not source.path.exists():
            if restartable:
                raise OutputChanged(str(source.path))
            offset += source.rows
            continue
        if source.kind == "part":
            table = _with_columns(store._read_part(source.path, wanted), wanted)
        else:
            read = _segment_table(store, source.path)
            if read is None:
                offset += source.rows
                continue
            table = _with_columns(read, wanted).slice(0, source.rows)  # rows appended since the first pass: later
        if len(table) != source.rows:
            if restartable:
                raise OutputChanged(str(source.path))
            table = table.slice(0, source.rows)
        dropped = drop[offset: offset + len(table)]
        offset += source.rows
        yield table.filter(pa.array(~dropped)) if dropped.any() else table


def _superseded(hashes: np.ndarray) -> np.ndarray:
    """True for each row a later row with the same hash replaces. A sort (not an argsort) finds whether any hash
    repeats; only rows whose hash does are then ordered (a finished output has none)."""
    drop = np.zeros(len(hashes), bool)
    if len(hashes) < 2:
        return drop
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not repeated.size:
        return drop
    candidates = np.flatnonzero(np.isin(hashes, np.unique(repeated)))
    order = np.argsort(hashes[candidates], kind="stable")  # equal hashes keep file order: the last is the newest
    sorted_hashes = hashes[candidates][order]
    later_same = np.zeros(len(order), bool)
    later_same[:-1] = sorted_hashes[1:] == sorted_hashes[:-1]
    drop[candidates[order[later_same]]] = True
    return drop
