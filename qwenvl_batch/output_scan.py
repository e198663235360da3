"""Reading a large output for ``report`` and ``status``: one row per id (the newest), only the columns asked for,
one part at a time.

Why a module of its own: ``load_results`` builds one DataFrame of every column (responses included), which at
10^7 rows is gigabytes and a minute. ``report`` and ``status`` need a few columns and aggregate them, so they take
the output a part (≤ ``FOLD_ROWS`` rows) at a time from ``newest_rows`` and keep only running totals and the few
per-row arrays a percentile or a chart needs (see report.py, report_html.py, status.py).

Two passes over the parts and journal segments, listed once: the first reads the id column only and finds the
rows a later row with the same id replaces (ids compared by a 64-bit hash, ``id_hashes``); the second
reads the wanted columns and drops those rows. A run may fold a journal segment into a part, append to a segment,
or compact the parts meanwhile: every file is opened before the first pass and read through that handle (an
unlinked file stays readable while open), and a segment that grew is read up to the rows the first pass saw, so
the figures describe one moment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .damage import damaged_part
from .errors import ConfigError
from .store import OutputStore, _read_part_schema, _with_columns, conform, iter_segment

__all__ = ["id_hashes", "newest_rows", "output_columns"]

_ATTEMPTS = 3


@dataclass
class _Source:
    """One file of the output, opened when the scan starts: a fold or a compaction may unlink it meanwhile, and
    the open handle still reads what it held (Linux keeps an unlinked file's content while it is open)."""

    kind: str  # "part" or "segment"
    path: Path
    handle: BinaryIO
    rows: int = 0


def newest_rows(store: OutputStore, columns: list[str]) -> Iterator[pa.Table]:
    """Tables (one per part or journal segment, in write order) holding ``columns`` (ask for the id column if it
    is needed) of every row that no later row with the same id replaces; columns a file lacks come back as nulls.
    """
    sources = _open_sources(store)
    try:
        drop = _first_pass(store, sources)
        yield from _second_pass(store, sources, drop, list(dict.fromkeys(columns)))
    finally:
        for source in sources:
            source.handle.close()


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


def _open_sources(store: OutputStore) -> list[_Source]:
    """Open every part and journal segment: one moment's output. Segments are listed before parts, so a segment
    folded in between is seen twice (the ids then match, and the later copy is kept), never missed; a file
    gone before it could be opened means the listing is stale, so it is taken again."""
    for _ in range(_ATTEMPTS):
        listed = [("segment", path) for _, path in store.segments()]
        listed = [("part", path) for _, path in store.parts()] + listed
        opened: list[_Source] = []
        try:
            for kind, path in listed:
                opened.append(_Source(kind, path, open(path, "rb")))  # closed by newest_rows
            return opened
        except FileNotFoundError:
            for source in opened:
                source.handle.close()
    raise ConfigError(f"{store.path} kept changing while it was being read (a run is folding or compacting it); "
                      "try again")


def _first_pass(store: OutputStore, sources: list[_Source]) -> np.ndarray:
    """Count each file's rows, and find which rows (in file order) a later row replaces."""
    hashes = []
    for source in sources:
        table = _read(store, source, [store.id_column])
        if table is None or store.id_column not in table.column_names:  # nothing committed, or no ids: skipped
            continue
        source.rows = table.num_rows
        hashes.append(id_hashes(table.column(store.id_column)))
    return _superseded(np.concatenate(hashes) if hashes else np.empty(0, np.uint64))


def _read(store: OutputStore, source: _Source, columns: list[str]) -> pa.Table | None:
    """``columns`` of one file (those it has); None for a journal segment with nothing readable."""
    if source.kind == "part":
        try:
            source.handle.seek(0)
            file = pq.ParquetFile(source.handle, page_checksum_verification=True)
            present = set(file.schema_arrow.names)
            return file.read(columns=[c for c in columns if c in present])
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise damaged_part(source.path, store.state_dir, exc) from None
    path = source.path if source.path.exists() else Path(f"/proc/self/fd/{source.handle.fileno()}")
    batches = list(iter_segment(path))
    if not batches:
        return None
    try:
        if store.schema.names:
            table = pa.Table.from_batches([conform(b, store.schema) for b in batches], schema=store.schema)
        else:
            table = pa.Table.from_batches(batches)
    except (pa.ArrowException, ValueError):  # columns a damaged header renamed or retyped (store logs it)
        return None
    return table.select([c for c in columns if c in table.column_names])


def _second_pass(store: OutputStore, sources: list[_Source], drop: np.ndarray,
                 columns: list[str]) -> Iterator[pa.Table]:
    offset = 0
    for source in sources:
        if not source.rows:
            continue
        read = _read(store, source, columns)
        table = _with_columns(read, columns).slice(0, source.rows) if read is not None else None
        dropped = drop[offset: offset + source.rows]
        offset += source.rows
        if table is None or len(table) < source.rows:  # cannot happen to an append-only file; kept safe
            continue
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
