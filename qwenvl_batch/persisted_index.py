"""The resume index on disk: what an output's parts hold, as sorted id hashes, memory-mapped on the next start.

Why: a resume used to read the id, status and fingerprint of every committed row, from every part, before
sending anything. At 10^7 rows that is a minute of start-up and hundreds of MB, paid on every resume. Instead the
end of each run (``OutputStore.finalize``, or a stop) writes the index it already has to one file in the state
folder, and the next start maps it instead of reading the parts.

It is a cache, never the truth: the parts are. The file records the parts it was built from (name, size,
modification time) and a CRC of its arrays; it is used only when every part it names is still there, unchanged,
and its CRC is right. A part added since (a fold after the index was written: the run was killed) is read and
merged on top; a part removed, rewritten (compaction, a schema upgrade) or restored from a backup, a damaged or
missing file, another id column or another hash scheme: the index is ignored, rebuilt from the parts, and written
again at the end of the run. A kill at any moment leaves the previous file or the new one (temporary file, fsync,
rename), never a torn one.

Layout of ``OUT.state/resume-index.bin`` (little-endian)::

    magic (8 bytes) | 8 reserved bytes
    hashes        n × uint64   sorted, unique: pandas' SipHash of the id text (manifest.hash_ids)
    fingerprints  n × uint64   what was sent for that id (prompt.fingerprints_of)
    ok            n × uint8    1 when the row's status is "ok"
    header        JSON: format, id column, n, CRC-32 of the three arrays, the parts, ``clean``, ``stamp``
    header length (uint64) | magic (8 bytes)

``clean`` says no id is in two parts (nothing for compaction to drop), so ``finalize`` skips reading every
part's ids. ``stamp`` says every row in the index was checked against (or sent with) the fingerprints of one
manifest file and one job's settings, so a start with that same file and those settings need not recompute them
(planning.fingerprint_stamp).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .durable import fsync_dir

log = logging.getLogger(__name__)

INDEX_FILE = "resume-index.bin"
FORMAT = 1
HASH_SCHEME = "pandas.hash_array/siphash-2-4/default-key"
_MAGIC = b"QVBIDX\x00\x01"
_DATA_OFFSET = 16
_CHUNK = 1 << 20  # rows per streamed step when writing (8 MB of each array)
_CRC_BLOCK = 16 << 20


@dataclass(frozen=True)
class PartSummary:
    """What the index knows of one part: how to tell it is unchanged, and its rows' spend."""

    name: str
    size: int
    mtime_ns: int
    rows: int
    costs: dict[str, float] = field(default_factory=dict)
    simulated: int = 0

    def same_file(self, stat: os.stat_result) -> bool:
        return stat.st_size == self.size and stat.st_mtime_ns == self.mtime_ns

    def to_json(self) -> list[Any]:
        return [self.name, self.size, self.mtime_ns, self.rows, self.costs, self.simulated]

    @classmethod
    def from_json(cls, raw: list[Any]) -> PartSummary:
        name, size, mtime_ns, rows, costs, simulated = raw
        return cls(str(name), int(size), int(mtime_ns), int(rows), {str(k): float(v) for k, v in costs.items()},
                   int(simulated))


@dataclass(frozen=True)
class Entries:
    """Sorted unique id hashes with each one's committed fingerprint and ok flag (memory-mapped or in memory)."""

    hashes: np.ndarray
    fingerprints: np.ndarray
    ok: np.ndarray
    source: Path | None = None  # the index file they are mapped from (``write`` reads it, not the mapping)

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def empty(cls) -> Entries:
        return cls(np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, bool))


@dataclass(frozen=True)
class Persisted:
    """A loaded index: its entries (memory-mapped), the parts it covers, and its flags."""

    entries: Entries
    parts: list[PartSummary]
    clean: bool
    stamp: str | None


def index_path(state_dir: Path) -> Path:
    return state_dir / INDEX_FILE


def load(state_dir: Path, id_column: str) -> Persisted | None:
    """The index file if it is whole and matches this output's id column; None (and why, logged) otherwise.

    Whether the parts it names are still the same is the caller's check (it has the folder's listing).
    """
    path = index_path(state_dir)
    if not path.exists():
        return None
    try:
        header, rows = _read_header(path)
        if header.get("format") != FORMAT or header.get("hash") != HASH_SCHEME:
            log.info("%s was written in another format; rebuilding it from the parts", path)
            return None
        if header.get("id_column") != id_column:
            log.info("%s is for id column %r; rebuilding it from the parts", path, header.get("id_column"))
            return None
        if _crc(path, rows) != int(header["crc32"]):
            raise ValueError("its checksum does not match its contents")
        parts = [PartSummary.from_json(raw) for raw in header["parts"]]
        entries = _mapped(path, rows)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s is damaged (%s); it is a cache: rebuilding it from the parts (slower start, nothing "
                    "is sent again)", path, exc)
        return None
    return Persisted(entries, parts, bool(header.get("clean", False)), header.get("stamp"))


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(8) != _MAGIC:
            raise ValueError("it does not start like a resume index")
        handle.seek(size - 16)
        tail = handle.read(16)
        if len(tail) != 16 or tail[8:] != _MAGIC:
            raise ValueError("it is truncated")
        length = int.from_bytes(tail[:8], "little")
        if length <= 0 or length > size - 32:
            raise ValueError("its header length is impossible")
        handle.seek(size - 16 - length)
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    rows = int(header["rows"])
    if rows < 0 or _DATA_OFFSET + 17 * rows + length + 16 != size:
        raise ValueError("its size does not match its row count")
    return header, rows


def _crc(path: Path, rows: int) -> int:
    """CRC-32 of the three arrays, read in blocks into one reused buffer (no memory grows with the index)."""
    remaining = 17 * rows
    crc = 0
    buffer = bytearray(_CRC_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(_DATA_OFFSET)
        while remaining:
            got = handle.readinto(view[: min(remaining, _CRC_BLOCK)])
            if not got:
                raise ValueError("it is truncated")
            crc = zlib.crc32(view[:got], crc)
            remaining -= got
    return crc


def _mapped(path: Path, rows: int) -> Entries:
    if rows == 0:
        return Entries.empty()
    # plain ndarray views of the mappings (np.memmap's own indexing adds a Python layer to every lookup)
    hashes = np.memmap(path, dtype="<u8", mode="r", offset=_DATA_OFFSET, shape=(rows,)).view(np.ndarray)
    fingerprints = np.memmap(path, dtype="<u8", mode="r", offset=_DATA_OFFSET + 8 * rows,
                             shape=(rows,)).view(np.ndarray)
    ok = np.memmap(path, dtype=np.bool_, mode="r", offset=_DATA_OFFSET + 16 * rows, shape=(rows,)).view(np.ndarray)
    return Entries(hashes, fingerprints, ok, source=path)


def write(state_dir: Path, id_column: str, base: Entries, recent: Entries, parts: list[PartSummary], *,
          clean: bool, stamp: str | None) -> None:
    """Write ``base`` with ``recent`` merged over it (recent wins on equal hashes) as the index of ``parts``.

    Streamed a million rows at a time, so writing a 10^7-row index needs no second copy of it in memory.
    Temporary file, fsync, atomic rename: a kill leaves the old file or the new one.
    """
    path = index_path(state_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    pos = np.searchsorted(base.hashes, recent.hashes)
    replaces = np.zeros(len(recent), bool)
    inside = pos < len(base)
    replaces[inside] = base.hashes[pos[inside]] == recent.hashes[inside]
    rows = len(base) + int((~replaces).sum())
    crc = 0
    try:
        with open(tmp, "wb") as handle:
            handle.write(_MAGIC + bytes(8))
            sections: tuple[tuple[str, str], ...] = (("hashes", "<u8"), ("fingerprints", "<u8"), ("ok", "u1"))
            for number, (name, dtype) in enumerate(sections):
                chunks = _file_chunks(base, number) if base.source is not None else None
                merged = _merged(getattr(base, name), getattr(recent, name), pos, replaces, chunks) if len(base) \
                    else _slices(getattr(recent, name))  # nothing to merge into (a rebuilt index): no copies
                for chunk in merged:
                    data = np.ascontiguousarray(chunk, dtype=dtype).data  # a view: no copy when it already fits
                    crc = zlib.crc32(data, crc)
                    handle.write(data)
            header = json.dumps({"format": FORMAT, "hash": HASH_SCHEME, "id_column": id_column, "rows": rows,
                                 "crc32": crc, "clean": clean, "stamp": stamp,
                                 "parts": [p.to_json() for p in parts]}).encode()
            handle.write(header + len(header).to_bytes(8, "little") + _MAGIC)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(state_dir)
    finally:
        tmp.unlink(missing_ok=True)


def _slices(values: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(values), _CHUNK):
        yield values[start: start + _CHUNK]


def _bounds(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)] or [(0, 0)]


def _file_chunks(base: Entries, section: int) -> Iterator[np.ndarray]:
    """One section of a mapped index read from its file chunk by chunk: reading through the mapping would make
    all of it resident in this process (170 MB at 10^7 rows) just to copy it."""
    assert base.source is not None
    n = len(base)
    width = (8, 8, 1)[section]
    dtype = ("<u8", "<u8", np.bool_)[section]
    with open(base.source, "rb") as handle:
        for start, end in _bounds(n):
            handle.seek(_DATA_OFFSET + 8 * section * n + width * start)
            yield np.fromfile(handle, dtype=dtype, count=end - start)


def _merged(base: np.ndarray, recent: np.ndarray, pos: np.ndarray, replaces: np.ndarray,
            chunks: Iterator[np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """One array of the merged index, chunk by chunk: ``recent``'s values replace equal hashes, the rest are
    inserted where they sort (``pos``, from searchsorted on the base's hashes). ``chunks``: the base's chunks
    as read from its file (else sliced from ``base``)."""
    n = len(base)
    bounds = _bounds(n)
    for number, (start, end) in enumerate(bounds):
        last = number == len(bounds) - 1
        here = (pos >= start) & ((pos <= end) if last else (pos < end))
        chunk = next(chunks) if chunks is not None else np.array(base[start:end])
        hit = here & replaces
        chunk[pos[hit] - start] = recent[hit]
        new = here & ~replaces
        yield np.insert(chunk, pos[new] - start, recent[new]) if new.any() else chunk


def remove(state_dir: Path) -> None:
    """Drop the index (an output emptied, or an index that can no longer be trusted)."""
    index_path(state_dir).unlink(missing_ok=True)
