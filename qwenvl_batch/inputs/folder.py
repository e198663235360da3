"""A folder (or a glob) of image files as a manifest: one row per image, streamed.

``[input] path = "photos/"`` or ``"photos/**/*.jpg"``. Rows: ``id`` (the path relative to the folder, with
``/``), ``image`` (the same relative path: resolved against the folder like any manifest path), ``path`` (the
absolute path) and ``file_bytes``. Hidden files and folders (a name starting with ``.``) and files whose suffix
is not an image's are skipped, and counted: the count is logged once the listing has been walked.

The walk never lists the whole tree in memory: folders are visited in sorted order, each folder's entries
sorted, rows yielded in batches. Sorted order matters beyond looks: the runner plans which rows to send in one
pass and sends them in another, by position, so both walks must meet the files in the same order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .patterns import IMAGE_SUFFIXES, glob_regex, glob_root, has_pattern

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("path", pa.string()),
                    ("file_bytes", pa.int64())])


@dataclass
class Skipped:
    """What a walk left out, for the message that says so."""

    hidden: int = 0
    not_images: int = 0
    examples: list[str] | None = None


def root_of(path: Path) -> Path:
    """The folder that ids are relative to: the folder itself, or a glob's fixed leading part."""
    return glob_root(path)[0] if has_pattern(str(path)) else path


def read_folder(path: Path, batch_rows: int, columns: list[str] | None,
                suffixes: frozenset[str] = IMAGE_SUFFIXES) -> Iterator[pa.RecordBatch]:
    """Stream rows for every image under ``path`` (a folder or a glob), ``batch_rows`` at a time.

    ``suffixes``: what counts as an input file (with ``[documents]``, PDFs too).
    """
    root, pattern = glob_root(path) if has_pattern(str(path)) else (path, "")
    matcher = glob_regex(pattern) if pattern else None
    skipped = Skipped(examples=[])
    rows: dict[str, list[object]] = {name: [] for name in SCHEMA.names}
    for relative, absolute, size in _walk(root, matcher, skipped, suffixes):
        for name, value in zip(SCHEMA.names, (relative, relative, absolute, size)):
            rows[name].append(value)
        if len(rows["id"]) >= batch_rows:
            yield _batch(rows, columns)
            rows = {name: [] for name in SCHEMA.names}
    if rows["id"]:
        yield _batch(rows, columns)
    _report(path, skipped)


def _walk(root: Path, matcher: object, skipped: Skipped,
          suffixes: frozenset[str] = IMAGE_SUFFIXES) -> Iterator[tuple[str, str, int]]:
    """(relative path, absolute path, size) of each image file, folders and files in sorted order."""
    top = os.path.abspath(root)
    for folder, dirs, files in os.walk(top):
        hidden_dirs = [d for d in dirs if d.startswith(".")]
        skipped.hidden += len(hidden_dirs)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            absolute = os.path.join(folder, name)
            relative = os.path.relpath(absolute, top).replace(os.sep, "/")
            if matcher is not None and not matcher.match(relative):  # type: ignore[attr-defined]
                continue
            if name.startswith("."):
                skipped.hidden += 1
            elif os.path.splitext(name)[1].lower() not in suffixes:
                skipped.not_images += 1
                if skipped.examples is not None and len(skipped.examples) < 3:
                    skipped.examples.append(relative)
            else:
                try:
                    size = os.stat(absolute).st_size
                except OSError:
                    size = -1  # vanished or unreadable: the row's image check says which
                yield relative, absolute, size


def _batch(rows: dict[str, list[object]], columns: list[str] | None) -> pa.RecordBatch:
    batch = pa.RecordBatch.from_pydict(rows, schema=SCHEMA)
    return batch.select(columns) if columns else batch


_REPORTED: set[str] = set()


def _report(path: Path, skipped: Skipped) -> None:
    """Say once per process what the listing left out (both passes of a run see the same files)."""
    key = str(path)
    if key in _REPORTED or not (skipped.hidden or skipped.not_images):
        return
    _REPORTED.add(key)
    examples = f" (e.g. {', '.join(skipped.examples)})" if skipped.examples else ""
    log.warning("%s: skipped %d hidden file(s)/folder(s) and %d non-image file(s)%s; images are %s",
                path, skipped.hidden, skipped.not_images, examples, ", ".join(sorted(IMAGE_SUFFIXES)))


def skipped_counts(path: Path) -> Skipped:
    """Walk the listing once and count what it skips (for ``estimate`` and tests)."""
    root, pattern = glob_root(path) if has_pattern(str(path)) else (path, "")
    skipped = Skipped(examples=[])
    for _ in _walk(root, glob_regex(pattern) if pattern else None, skipped):
        pass
    return skipped
