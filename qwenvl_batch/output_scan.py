"""Reading a large output for ``report`` and ``status``: one row per id (the newest), only the columns asked for,
one part at a time.

Why a module of its own: ``load_results`` builds one DataFrame of every column (responses included), which at
10^7 rows is gigabytes and a minute. ``report`` and ``status`` need a few columns and aggregate them, so they take
the output a part (≤ ``FOLD_ROWS`` rows) at a time from ``newest_rows`` and keep only running totals and the few
per-row arrays a percentile or a chart needs (see report.py, report_html.py, status.py).

Two passes over the parts and journal segments, listed once: the first reads the id column only and finds the
rows a later row with the same id replaces (ids compared by a 64-bit hash, ``id_hashes``); the second
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

from .store import OutputStore, _read_part_schema, _with_columns, conform, iter_segment

__all__ = ["id_hashes", "newest_rows", "output_columns"]

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
        hashes.append(id_hashes(ids))
    for _, segment in store.segments():
        ids = _segment_ids(store, segment)
        if ids is None:
            continue
        sources.append(_Source("segment", segment, len(ids)))
        hashes.append(id_hashes(ids))
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


# ---------------------------------------------------------------------------------------------- id hashes

_C1, _C2 = np.uint64(0x87C37B91114253D5), np.uint64(0x4CF5AD432745937F)
_F1, _F2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_SLICE_BYTES = 1 << 22  # padded id bytes hashed at once (ids of unequal length)


def id_hashes(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes (uint64) of ids compared as text, computed on Arrow's buffers with numpy, never as Python
    strings: 3× faster than ``manifest.hash_ids``, which is what a pass over 10^7 ids costs most.

    The function: the id's bytes zero-padded to whole 8-byte words, each word mixed in as MurmurHash3's 64-bit
    block step, seeded and finalised with the byte length (fmix64). Ids of one length (zero-padded numbers,
    uuids, hashes: the common case) are a reshape of the data buffer; others are gathered a slice at a time.
    Only compared within one scan: it need not equal any other hash."""
    text = column.cast(pa.string()) if column.type != pa.string() else column
    array = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    n = len(array)
    if n == 0:
        return np.empty(0, np.uint64)
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32, count=n + 1, offset=array.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    if array.null_count:
        lengths[np.asarray(array.is_null())] = 0
    if not array.null_count and lengths.min() == lengths.max():
        length = int(lengths[0])
        padded = np.zeros((n, -(-length // 8) * 8), np.uint8)
        padded[:, :length] = data[offsets[0]: offsets[0] + n * length].reshape(n, length)
        return _mixed(padded, lengths)
    out = np.empty(n, np.uint64)
    rows = max(1, _SLICE_BYTES // max(8, int(lengths.max())))
    for start in range(0, n, rows):
        part = lengths[start: start + rows]
        columns = np.arange(-(-max(int(part.max()), 1) // 8) * 8)
        padded = np.zeros((len(part), len(columns)), np.uint8)
        inside = columns[None, :] < part[:, None]
        padded[inside] = data[(offsets[:-1][start: start + rows, None] + columns[None, :])[inside]]
        out[start: start + rows] = _mixed(padded, part)
    return out


def _mixed(padded: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The hash of each row of ``padded`` (its id's bytes, zero-padded), mixing only the row's own words."""
    words = padded.view("<u8")
    sizes = lengths.astype(np.uint64)
    counts = -(-lengths // 8)
    h = sizes * _C2
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            mixed = _rotl(h ^ (_rotl(words[:, j] * _C1, 31) * _C2), 27) * np.uint64(5) + np.uint64(0x52DCE729)
            h = mixed if bool((counts > j).all()) else np.where(counts > j, mixed, h)
        h ^= sizes
        h ^= h >> np.uint64(33)
        h *= _F1
        h ^= h >> np.uint64(33)
        h *= _F2
        h ^= h >> np.uint64(33)
    return h


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))
