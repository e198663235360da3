"""Parquet files that carry their images: Hugging Face image datasets and img2dataset output.

* **Hugging Face** (``datasets``' ``Image`` feature): the column is ``struct<bytes: binary, path: string>``,
  and the schema metadata key ``huggingface`` names it (``{"info": {"features": {"image": {"_type":
  "Image"}}}}``). ``bytes`` is used when present, else ``path`` (resolved like any manifest path). Read with
  pyarrow directly: going through ``datasets`` decodes every image to PIL, 17-30x slower (datasets#7508).
  Such datasets rarely have an id column: when there is no ``id`` column one is added, ``{file stem}/{row}``
  (the row's position in its file, so it is stable as long as the file is).
* **img2dataset** (``output_format=parquet``): the image bytes are a binary column named after its encode
  format (``jpg``, ``png``, ``webp``), next to ``key``, ``status``, ``error_message``, ``caption``, ``url``...
  A row whose ``status`` is not ``success`` or whose bytes are null becomes an input error saying why (the
  download error img2dataset recorded), and is never sent. ``key`` is the natural id: ``id`` is added from it
  when absent. img2dataset's ``status`` and ``error_message`` are renamed ``source_status`` and
  ``source_error_message`` (the output has its own ``status`` and ``error_message``).

Any other ``binary``/``large_binary`` column (or list of them) works as an image column as it is: the cell's
bytes are the image. Files are read by record batch; a batch holds at most ``batch_rows`` rows, sized from the
file's metadata so that a batch of image bytes stays around :data:`TARGET_BATCH_BYTES`. pyarrow decodes one
row group at a time, so a row group bounds memory too (HF and img2dataset write ~100-row groups).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qwenvl_batch.errors import ConfigError

TARGET_BATCH_BYTES = 8 * 1024 * 1024
MIN_BATCH_ROWS = 16
IMG2DATASET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")
RENAMED = {"status": "source_status", "error_message": "source_error_message"}
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string()), ("error", pa.string()),
                          ("error_code", pa.string())])


@dataclass(frozen=True)
class Layout:
    """What the files hold and how to present them: the schema rows come out in, and what to add or convert."""

    raw: pa.Schema
    """The files' own schema."""
    schema: pa.Schema
    """The schema rows are presented in."""
    kind: str
    """``hf``, ``img2dataset`` or ``plain``."""
    image_columns: tuple[str, ...]
    add_id: str | None
    """``key`` (copy it) or ``position`` (``{stem}/{row}``), or None when the files have an ``id``."""
    batch_rows: int


def is_binary(column_type: pa.DataType) -> bool:
    return pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)


def is_image_struct(column_type: pa.DataType) -> bool:
    """``struct<bytes: binary, path: string>`` (HF's Image feature), whatever else the struct holds."""
    if not pa.types.is_struct(column_type):
        return False
    names = {column_type.field(i).name: column_type.field(i).type for i in range(column_type.num_fields)}
    return "bytes" in names and is_binary(names["bytes"]) and "path" in names


def hf_image_features(schema: pa.Schema) -> list[str]:
    """Columns the ``huggingface`` schema metadata declares as ``Image`` features."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return []
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (json.JSONDecodeError, AttributeError):
        return []
    return [name for name, spec in features.items() if isinstance(spec, dict) and spec.get("_type") == "Image"]


def layout_of(paths: Sequence[Path], batch_rows: int) -> Layout:
    """Read the footers (not the rows), check the files agree, and decide how rows are presented."""
    first = pq.ParquetFile(paths[0])
    raw = first.schema_arrow
    for other in paths[1:]:
        schema = pq.ParquetFile(other).schema_arrow
        if not schema.remove_metadata().equals(raw.remove_metadata()):
            raise ConfigError(f"{other}: its columns differ from {paths[0]}'s; the Parquet files of one input must "
                              "share one schema (or run them as separate jobs)")
    struct_columns = [f.name for f in raw if is_image_struct(f.type)]
    hf_columns = [c for c in hf_image_features(raw) if c in raw.names]
    binary_columns = [f.name for f in raw if is_binary(f.type)]
    names = set(raw.names)
    if {"key", "status"} <= names and any(c in binary_columns for c in IMG2DATASET_IMAGE_COLUMNS):
        kind, images = "img2dataset", [c for c in IMG2DATASET_IMAGE_COLUMNS if c in binary_columns]
        add_id = None if "id" in names else "key"
    elif struct_columns or hf_columns:
        kind, images = "hf", sorted(set(struct_columns) | set(hf_columns), key=raw.names.index)
        add_id = None if "id" in names else "position"
    else:
        kind, images, add_id = "plain", binary_columns, None
    layout = Layout(raw, raw, kind, tuple(images), add_id, _batch_rows(first, images, batch_rows))
    empty = pa.RecordBatch.from_pylist([], schema=raw)
    return Layout(raw, present(empty, layout, paths[0], 0).schema, kind, tuple(images), add_id, layout.batch_rows)


def _batch_rows(file: pq.ParquetFile, image_columns: Sequence[str], default: int) -> int:
    """Rows per batch such that a batch of image bytes is about TARGET_BATCH_BYTES (from the row-group stats)."""
    meta = file.metadata
    if not image_columns or meta.num_row_groups == 0 or meta.num_rows == 0:
        return default
    group = meta.row_group(0)
    wanted = set(image_columns)
    image_bytes = sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
                      if group.column(i).path_in_schema.split(".")[0] in wanted)
    per_row = max(1, image_bytes // max(1, group.num_rows))
    return max(MIN_BATCH_ROWS, min(default, TARGET_BATCH_BYTES // per_row))


def read_files(paths: Sequence[Path], layout: Layout, batch_rows: int,
               columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    """Every file's rows, in order, presented as ``layout.schema`` (only ``columns`` when given)."""
    source_columns = None if columns is None else _source_columns(columns, layout)
    for path in paths:
        position = 0
        # pre_buffer=False: with pyarrow's default (True) iter_batches keeps every column chunk it has read
        # buffered until the file is closed, so memory grew with the file (measured: +115 MB over 12,000 rows of
        # 14 KB images); without it memory stays at about one row group.
        reader = pq.ParquetFile(path, pre_buffer=False)
        for batch in reader.iter_batches(batch_size=min(batch_rows, layout.batch_rows), columns=source_columns):
            shown = present(batch, layout, path, position)
            position += batch.num_rows
            yield shown.select(columns) if columns is not None else shown


def _source_columns(columns: list[str], layout: Layout) -> list[str]:
    """The file columns needed to present ``columns`` (the id's source, img2dataset's status for its errors)."""
    back = {new: old for old, new in RENAMED.items()} if layout.kind == "img2dataset" else {}
    wanted = {back.get(c, c) for c in columns}
    if layout.add_id is not None:
        wanted.discard("id")
        if "id" in columns and layout.add_id == "key":
            wanted.add("key")
    if layout.kind == "img2dataset" and wanted & set(layout.image_columns):
        wanted |= {"status", "error_message"}
    return [name for name in layout.raw.names if name in wanted]


def present(batch: pa.RecordBatch, layout: Layout, path: Path, position: int) -> pa.RecordBatch:
    """One batch as the runner sees it: an id added if needed, img2dataset's failures as image-cell errors."""
    names, arrays = list(batch.schema.names), list(batch.columns)
    if layout.kind == "img2dataset":
        names, arrays = _img2dataset(names, arrays, layout)
    if layout.add_id and "id" not in names:
        if layout.add_id == "key" and "key" in names:
            ids = arrays[names.index("key")].cast(pa.string())
        else:
            stem = path.name.split(".", 1)[0]
            ids = pa.array([f"{stem}/{position + i}" for i in range(batch.num_rows)], pa.string())
        names.insert(0, "id")
        arrays.insert(0, ids)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _img2dataset(names: list[str], arrays: list[pa.Array], layout: Layout) -> tuple[list[str], list[pa.Array]]:
    """Image columns become ``{bytes, error}`` structs (error set where status != success or bytes are null)."""
    status = arrays[names.index("status")] if "status" in names else None
    message = arrays[names.index("error_message")] if "error_message" in names else None
    for index, name in enumerate(names):
        if name in layout.image_columns:
            arrays[index] = _with_errors(arrays[index], status, message, name)
    return [RENAMED.get(name, name) for name in names], arrays


def _with_errors(images: pa.Array, status: pa.Array | None, message: pa.Array | None, name: str) -> pa.Array:
    """The bytes column as IMAGE_STRUCT: why a row has no usable image, in img2dataset's own words."""
    rows = len(images)
    statuses = status.to_pylist() if status is not None else ["success"] * rows
    messages = message.to_pylist() if message is not None else [None] * rows
    missing = pc.is_null(images).to_pylist()
    errors: list[str | None] = []
    codes: list[str | None] = []
    for state, why, absent in zip(statuses, messages, missing):
        if state != "success":
            detail = f": {why}" if why else ""
            errors.append(f"img2dataset did not download this image (status {state!r}{detail}); Fix: re-run "
                          "img2dataset for it, or leave the row out")
            codes.append("source_failed")
        elif absent:
            errors.append(f"img2dataset marked this row a success but its {name!r} bytes are null; Fix: re-download "
                          "the shard")
            codes.append("no_image")
        else:
            errors.append(None)
            codes.append(None)
    return pa.StructArray.from_arrays(
        [images.cast(pa.binary()), pa.nulls(rows, pa.string()), pa.array(errors, pa.string()),
         pa.array(codes, pa.string())],
        fields=list(IMAGE_STRUCT),
    )
