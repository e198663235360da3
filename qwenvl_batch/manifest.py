"""Manifests → streamed record batches: CSV / Parquet / JSONL files, and datasets used as they come.

Besides a table of references, ``[input] path`` may name a dataset that carries its images: Hugging Face or
img2dataset Parquet (:mod:`.inputs.parquet_images`), WebDataset tar shards (:mod:`.inputs.webdataset`), or a
folder or glob of image files (:mod:`.inputs.folder`). The format is told from the path (a folder, a glob, a
``.tar``, a suffix) and from the Parquet schema, or forced with ``[input] format``; several files are named with
a brace pattern, a glob or a list (:mod:`.inputs.patterns`).

A manifest may hold 10^7 rows, so it is never loaded whole: every reader yields ``pyarrow.RecordBatch``es of a
few thousand rows, and the runner reads the file twice (a cheap pass over the ids to check them and plan the
run, then the dispatch pass). CSV columns are all read as strings, so an id like ``00042`` keeps its zeros and a
column that looks numeric in the first block cannot change type later.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from .errors import ConfigError
from .inputs import blocks, folder, parquet_images, patterns, webdataset

BATCH_ROWS = 4096
FORMAT_ALIASES = {"wds": "webdataset", "folder": "images"}


@dataclass(frozen=True)
class Manifest:
    """An opened manifest: its path, format and schema; ``batches()`` streams it from the start each call."""

    path: Path
    format: str
    schema: pa.Schema
    paths: tuple[Path, ...] = ()
    """The files behind ``path`` when it is a pattern or a list (tar shards, Parquet files); else ``(path,)``."""
    base_dir: Path | None = None
    """What relative image paths in the rows resolve against: the manifest's folder, or the image folder."""
    batch_rows: int = BATCH_ROWS
    """Rows per batch by default: fewer when the rows carry image bytes, so a batch stays ~32 MB."""
    layout: parquet_images.Layout | None = field(default=None, repr=False)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def root(self) -> Path:
        """``base_dir``, or the manifest file's folder."""
        return self.base_dir or self.path.resolve().parent

    def batches(self, batch_rows: int | None = None, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield the manifest in order, as record batches of at most ``batch_rows`` rows."""
        try:
            yield from _READERS[self.format](self, batch_rows or self.batch_rows, columns)
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as exc:
            where = _locate_bad_line(self)
            detail = str(exc).splitlines()[0][:300]
            raise ConfigError(f"{self.path}{where}: cannot read the {self.format.upper()} manifest: {detail}. Fix "
                              "that line (quote fields that hold the delimiter or a newline) and run again; rows "
                              "already done are kept") from None


def _locate_bad_line(manifest: Manifest) -> str:
    """``", line N"`` for the first line a CSV/JSONL reader rejects (found by a second, plain pass: only on error)."""
    try:
        if manifest.format == "csv":
            return _bad_csv_line(manifest.path)
        if manifest.format == "jsonl":
            return _bad_jsonl_line(manifest.path)
    except (OSError, UnicodeDecodeError) as exc:
        return f" (near byte {getattr(exc, 'start', '?')})"
    return ""


def _bad_csv_line(path: Path) -> str:
    dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, dialect)
        width = len(next(reader, []))
        start = reader.line_num + 1
        try:
            for record in reader:
                if len(record) != width:
                    return f", line {start}"
                start = reader.line_num + 1
        except csv.Error:
            return f", line {start}"
    return ""


def _bad_jsonl_line(path: Path) -> str:
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                return f", line {number}"
            if not isinstance(value, dict):
                return f", line {number}"
    return ""


def open_manifest(path: Path, fmt: str = "auto") -> Manifest:
    """Open a manifest and read its schema (not its rows); errors name the file and the fix."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    pattern = patterns.has_pattern(str(path))
    if not pattern and not path.exists():
        raise ConfigError(f"Manifest not found: {path} (set [input] path in the job file, relative to the job file)")
    if fmt == "auto":
        fmt = patterns.detect_format(path)
        if not fmt:
            raise ConfigError(
                f"{path}: cannot tell the input format from the suffix {path.suffix!r}; use .csv, .parquet, .jsonl "
                "or .tar, a folder of images, or set [input] format (csv, parquet, jsonl, webdataset, images)"
            )
    if fmt == "images":
        root = folder.root_of(path)
        if not root.is_dir():
            raise ConfigError(f"{path}: {root} is not a folder; point [input] path at a folder of images or a glob")
        return Manifest(path=path, format=fmt, schema=folder.SCHEMA, paths=(path,), base_dir=root.resolve())
    files = tuple(patterns.expand_files(path)) if pattern else (path,)
    if len(files) > 1 and fmt in ("csv", "jsonl"):
        raise ConfigError(f"{path}: names {len(files)} {fmt.upper()} files; a job reads one {fmt.upper()} manifest "
                          "(several files work for Parquet and tar shards)")
    try:
        return _open_files(path, fmt, files)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read the {fmt.upper()} manifest: {exc}") from None


def _open_files(path: Path, fmt: str, files: tuple[Path, ...]) -> Manifest:
    """The schema of one format, read from the files' headers or footers (a tar's first sample)."""
    base_dir = files[0].resolve().parent
    if fmt == "parquet":
        layout = parquet_images.layout_of(files, BATCH_ROWS)
        return Manifest(path=path, format=fmt, schema=layout.schema, paths=files, base_dir=base_dir,
                        batch_rows=layout.batch_rows, layout=layout)
    if fmt == "webdataset":
        schema = webdataset.schema_of(files, _result_columns())
        return Manifest(path=path, format=fmt, schema=schema, paths=files, base_dir=base_dir)
    return Manifest(path=files[0], format=fmt, schema=_SCHEMAS[fmt](files[0]), paths=files, base_dir=base_dir)


def _result_columns() -> frozenset[str]:
    """The output's own columns, which a WebDataset JSON key must not shadow (imported late: store imports us)."""
    from .store import RESULT_COLUMNS

    return frozenset(RESULT_COLUMNS)


def _csv_header(path: Path) -> list[str]:
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
        header = next(csv.reader(handle, dialect), None)
    if not header:
        raise ConfigError(f"{path}: the CSV manifest is empty (it needs a header row)")
    return header


def _csv_schema(path: Path) -> pa.Schema:
    return pa.schema([(name, pa.string()) for name in _csv_header(path)])


def _jsonl_schema(path: Path) -> pa.Schema:
    return blocks.schema_growing(
        path, lambda size: pajson.open_json(path, read_options=pajson.ReadOptions(block_size=size)).schema)


def _read_csv(manifest: Manifest, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    delimiter = "\t" if manifest.path.suffix.lower() == ".tsv" else ","
    reader = blocks.open_growing(manifest.path, lambda size: pacsv.open_csv(
        manifest.path,
        read_options=pacsv.ReadOptions(block_size=size),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in manifest.schema.names},
            strings_can_be_null=False,
            include_columns=columns,
        ),
    ))
    yield from _rebatch(reader, batch_rows)


def _read_parquet(manifest: Manifest, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    assert manifest.layout is not None, "opened by open_manifest"
    yield from parquet_images.read_files(manifest.paths, manifest.layout, batch_rows, columns)


def _read_webdataset(manifest: Manifest, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    yield from webdataset.read_shards(manifest.paths, manifest.schema, _result_columns(), batch_rows, columns)


def _read_images(manifest: Manifest, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    yield from folder.read_folder(manifest.path, batch_rows, columns)


def _read_jsonl(manifest: Manifest, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    reader = blocks.open_growing(manifest.path, lambda size: pajson.open_json(
        manifest.path,
        read_options=pajson.ReadOptions(block_size=size),
        parse_options=pajson.ParseOptions(explicit_schema=manifest.schema, unexpected_field_behavior="error"),
    ))
    for batch in _rebatch(reader, batch_rows):
        yield batch.select(columns) if columns else batch


def _rebatch(reader: Iterator[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Readers that work in byte blocks yield uneven batches; cut them to at most ``batch_rows``."""
    for batch in reader:
        for start in range(0, batch.num_rows, batch_rows):
            yield batch.slice(start, batch_rows)


_SCHEMAS = {"csv": _csv_schema, "jsonl": _jsonl_schema}
_READERS = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl, "webdataset": _read_webdataset,
            "images": _read_images}


def require_columns(manifest: Manifest, id_column: str, image_columns: Sequence[str]) -> None:
    """The id and image columns must exist; the message lists the columns the manifest does have."""
    missing = [c for c in (id_column, *image_columns) if c not in manifest.columns]
    if missing:
        raise ConfigError(
            f"{manifest.path}: no column {', '.join(repr(m) for m in missing)} (columns: "
            f"{', '.join(manifest.columns)}); set [input] id_column / image_columns in the job file"
        )


def id_strings(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An id column as an object array of ``str`` (ids of any type are compared as text); nulls stay None."""
    as_text = column.cast(pa.string()) if column.type != pa.string() else column
    return as_text.to_numpy(zero_copy_only=False)


def empty_ids(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Which ids of an id column are null or only whitespace (what IdTracker refuses), without a Python loop."""
    text = column.cast(pa.string()) if column.type != pa.string() else column
    empty = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), "")).fill_null(True)
    return np.asarray(empty.to_numpy(zero_copy_only=False), dtype=bool)


def hash_ids(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of ids (pandas' vectorised SipHash): compact enough to keep 10^7 of them in memory."""
    if len(ids) == 0:
        return np.empty(0, dtype=np.uint64)
    return pd.util.hash_array(ids.astype(object), categorize=False)


@dataclass(frozen=True)
class IdCheck:
    """What the id pass found: the row count and the problems that stop a run before it starts."""

    rows: int
    empty_rows: list[int]
    duplicates: list[str]


class IdTracker:
    """Accumulates id hashes batch by batch (8 bytes per row) to find empty and duplicate ids in one pass.

    A caller that can tell duplicates another way (planning: ids already in the output, by their index entry)
    keeps only the other hashes (``retain``) and reports what it found (``add_duplicates``): at 10^7 rows that
    saves the 80 MB of hashes and the sort.
    """

    def __init__(self, sample: int = 5) -> None:
        self.rows = 0
        self.sample = sample
        self.empty_rows: list[int] = []
        self._hashes: list[np.ndarray] = []
        self._duplicates: list[np.ndarray] = []

    def add(self, ids: np.ndarray, hashes: np.ndarray | None = None, retain: np.ndarray | None = None,
            empty: np.ndarray | None = None) -> np.ndarray:
        """Record one batch of id strings; returns their hashes for the caller's own lookups. ``empty``: which ids
        are empty, when the caller has it (``empty_ids``, vectorised) — else it is found here, row by row."""
        if len(self.empty_rows) < self.sample:
            if empty is not None:
                bad = (self.rows + np.flatnonzero(empty)[: self.sample]).tolist()
            else:
                bad = [self.rows + i for i, value in enumerate(ids) if value is None or not str(value).strip()]
            self.empty_rows.extend(bad[: self.sample - len(self.empty_rows)])
        hashes = hash_ids(ids) if hashes is None else hashes
        self._hashes.append(hashes if retain is None else hashes[retain])
        self.rows += len(ids)
        return hashes

    def add_duplicates(self, hashes: np.ndarray) -> None:
        """Hashes the caller found repeated among the rows it did not ``retain``."""
        if len(hashes):
            self._duplicates.append(hashes)

    def result(self, manifest: Manifest, id_column: str, limit: int | None) -> IdCheck:
        all_hashes = np.concatenate(self._hashes) if self._hashes else np.empty(0, dtype=np.uint64)
        self._hashes = []
        dup_hashes = np.union1d(_repeated(all_hashes), np.concatenate(self._duplicates)) if self._duplicates \
            else _repeated(all_hashes)
        duplicates = _names_of(manifest, id_column, dup_hashes, limit, self.sample) if len(dup_hashes) else []
        return IdCheck(rows=self.rows, empty_rows=self.empty_rows, duplicates=duplicates)


def limited_batches(manifest: Manifest, limit: int | None,
                    columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The manifest's batches, cut after ``limit`` rows (``--limit N``: the first N rows only)."""
    rows = 0
    for batch in manifest.batches(columns=columns):
        if limit is not None:
            if rows >= limit:
                return
            batch = batch.slice(0, limit - rows)
        rows += batch.num_rows
        yield batch


def _repeated(hashes: np.ndarray) -> np.ndarray:
    ordered = hashes
    ordered.sort()  # in place: the caller's concatenation is not needed again
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _names_of(manifest: Manifest, id_column: str, wanted: np.ndarray, limit: int | None, sample: int) -> list[str]:
    """Second, rare pass: the id strings behind duplicate hashes, confirmed by comparing the strings."""
    seen: dict[str, int] = {}
    for batch in limited_batches(manifest, limit, [id_column]):
        ids = id_strings(batch.column(0))
        for value, hit in zip(ids, np.isin(hash_ids(ids), wanted)):
            if hit:
                seen[value] = seen.get(value, 0) + 1
    return [value for value, count in seen.items() if count > 1][:sample]
