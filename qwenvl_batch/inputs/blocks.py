"""Arrow's block-based CSV/JSONL readers, with a block size that grows to fit the largest row.

Arrow's streaming readers cut the file into blocks and refuse a row longer than one block ("straddling object
straddles two block boundaries"): with the 1 MiB block a single 3.2 MB photo written as a data URL made the
whole manifest unreadable. A small block keeps memory low for ordinary manifests, so we start there and, on that
error, reopen the file with a block four times larger and skip the rows already yielded (the reader is
deterministic, so the same rows come back in the same order). Arrow reads a row across one block boundary but
not two, so a block of B bytes fits rows up to about 2B. Past ``MAX_BLOCK_SIZE`` the row is refused with its
number and the limit, instead of an Arrow message that names neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from ..errors import ConfigError

log = logging.getLogger(__name__)

BLOCK_SIZE = 1 << 20  # what most manifests need: rows of paths and URLs are well under a kilobyte
MAX_BLOCK_SIZE = 256 << 20  # a row this long (a cell of several data URLs) is refused, not read into memory
GROWTH = 4


def _straddles(exc: pa.ArrowInvalid) -> bool:
    return "straddl" in str(exc)


def _too_large(path: Path, row: int) -> ConfigError:
    return ConfigError(
        f"{path}: data row {row:,} (after the header) is longer than {MAX_BLOCK_SIZE >> 20} MiB, the most read as "
        "one row; put its images in files (or use a Parquet manifest with image bytes) and name them in the cell"
    )


def open_growing(path: Path, open_reader: Callable[[int], Iterator[pa.RecordBatch]]) -> Iterator[pa.RecordBatch]:
    """The batches of ``open_reader(block_size)``, reopened with a bigger block when a row does not fit one."""
    block = BLOCK_SIZE
    done = 0  # rows already yielded: skipped after a reopen
    while True:
        try:
            skip = done
            for batch in open_reader(block):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                if skip:
                    batch, skip = batch.slice(skip), 0
                done += batch.num_rows
                yield batch
            return
        except pa.ArrowInvalid as exc:
            if not _straddles(exc):
                raise
            if block >= MAX_BLOCK_SIZE:
                raise _too_large(path, done + 1) from None
            block *= GROWTH
            log.info("%s: a row after row %d is longer than the reader's block; reading with %d MiB blocks",
                     path, done, block >> 20)


def schema_growing(path: Path, open_schema: Callable[[int], pa.Schema]) -> pa.Schema:
    """``open_schema(block_size)`` (JSONL infers its schema from the first block), growing the block likewise."""
    block = BLOCK_SIZE
    while True:
        try:
            return open_schema(block)
        except pa.ArrowInvalid as exc:
            if not _straddles(exc):
                raise
            if block >= MAX_BLOCK_SIZE:
                raise _too_large(path, 1) from None
            block *= GROWTH
