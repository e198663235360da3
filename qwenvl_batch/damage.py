"""Damaged state: journal segments read defensively, damaged files moved aside (never deleted), clear messages.

A journal segment is an Arrow IPC stream: a schema message, then one message per record batch. A kill -9 never
tears a batch (each batch is one ``write`` that the OS holds once it returns); a power cut before ``fsync`` or a
full disk can leave a torn last batch, and a flaky disk, a bad copy or a person can damage any byte. So:

* the stream is read batch by batch and each batch is fully validated (offsets, lengths, UTF-8) before it is
  used: corrupt buffers that pass Arrow's framing would otherwise be read out of bounds (a segfault in ``report``);
* everything before the first unreadable byte is kept; the reason reading stopped is kept with it;
* a segment that was not read to its clean end is moved to the state folder's ``quarantine/`` (with a warning
  naming both paths), never deleted: what it held past the damage may be worth recovering by hand, and a
  garbled *header* must not be mistaken for a torn write (that deleted 111 paid rows).

Only a 0-byte segment is deleted: it never held a row (the writer creates the file, then writes the schema).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from pyarrow import ipc

from .errors import ConfigError

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"


class SegmentReader:
    """The complete, valid record batches of one journal segment; ``damage`` says why reading stopped early."""

    def __init__(self, path: Path, schema: pa.Schema | None = None) -> None:
        self.path = path
        self.schema = schema  # the writer's schema: lets a garbled header be rebuilt (see _rebuilt)
        self.damage: str | None = None
        self.batches_read = 0

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            with pa.OSFile(str(self.path), "rb") as source:
                if source.size() == 0:
                    return
                try:
                    reader = ipc.open_stream(source)
                except (pa.ArrowException, OSError, ValueError) as exc:
                    self.damage = f"its header is unreadable ({_short(exc)})"
                    rebuilt = self._rebuilt()
                    if rebuilt is not None:
                        yield from self._batches(rebuilt)
                    return
                yield from self._batches(reader)
        except OSError as exc:
            self.damage = self.damage or f"it cannot be read ({_short(exc)})"

    def _rebuilt(self) -> ipc.RecordBatchStreamReader | None:
        """The stream with its header replaced by the one the writer wrote for ``schema`` (deterministic bytes),
        so damage confined to the header costs no row. None when that does not give a readable stream."""
        if self.schema is None or not self.schema.names:
            return None
        sink = pa.BufferOutputStream()
        ipc.new_stream(sink, self.schema).close()
        header = sink.getvalue().to_pybytes()[:-8]  # without the 8-byte end-of-stream marker closing adds
        data = self.path.read_bytes()
        if len(data) <= len(header):
            return None
        try:
            reader = ipc.open_stream(pa.BufferReader(header + data[len(header):]))
        except (pa.ArrowException, OSError, ValueError):
            return None
        self.damage = "its header was damaged (rebuilt from the job's columns)"
        return reader

    def _batches(self, reader: ipc.RecordBatchStreamReader) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = reader.read_next_batch()
                batch.validate(full=True)
            except StopIteration:
                return
            # Arrow signals malformed input with many types (ArrowInvalid, ArrowIndexError, ArrowNotImplementedError,
            # ArrowKeyError, ...), all ArrowException; OSError for I/O; ValueError for a bad length or flatbuffer.
            except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
                self.damage = f"it is damaged or torn after {self.batches_read} complete batch(es) ({_short(exc)})"
                return
            self.batches_read += 1
            yield batch


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def quarantine(state_dir: Path, path: Path, reason: str) -> Path:
    """Move a damaged file into ``state_dir/quarantine/`` (a unique name), warn, and return where it went."""
    folder = state_dir / QUARANTINE
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{n}"
    os.replace(path, target)
    log.warning("%s: %s; moved it to %s (the rows before the damage were kept; any after it are sent again)",
                path, reason, target)
    return target


def damaged_part(part: Path, state_dir: Path, exc: BaseException) -> ConfigError:
    """The one-line error for a Parquet part that cannot be read: the file, why, and the manual fix.

    Moving it aside is left to the user (not done automatically): its rows are then sent again and paid again,
    a cost the user should choose knowingly; restoring the file from a backup may avoid it.
    """
    return ConfigError(
        f"{part} is damaged ({_short(exc)}). Nothing was sent. Restore it from a backup, or move it aside "
        f"(mkdir -p {state_dir / QUARANTINE} && mv {part} {state_dir / QUARANTINE}/) and run again: "
        "its rows are then sent again"
    )
