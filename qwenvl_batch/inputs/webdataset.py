"""WebDataset tar shards (img2dataset's ``output_format=webdataset``) as a manifest, streamed.

A shard holds samples as consecutive members sharing a key: ``000000001.jpg``, ``000000001.txt``,
``000000001.json``. The key is the member name up to the first dot after the last slash (the ``webdataset``
package's rule). Each sample becomes one row:

* ``id``: ``{shard stem}/{key}`` (``00000/000000001``), unique across shards; set ``[input] id_column`` to a
  JSON key's column to use that instead;
* ``key``: the sample key;
* ``image``: the first member whose suffix is an image's (jpg, jpeg, png, webp, ...), as a reference to the
  member (tar path, offset, length, sha256): the bytes stay in the tar and are read when the row is sent;
* ``txt``: the ``.txt`` member (img2dataset's caption), and one column per top-level key of the ``.json``
  member (values as text; non-scalar values as JSON). The JSON columns are those of the first sample of the
  first shard; a key that clashes with the columns above or the output's own gets a ``json_`` prefix.

Read with the standard library's ``tarfile`` in streaming mode (``r|*``): one pass, no index, gzip/bz2/xz
shards too (their members are carried as bytes, since an offset into a compressed stream cannot be seeked).
Every image member is hashed as it streams past, so a row's fingerprint follows its image's content. A sample
without an image, and a shard that ends mid-member (truncated), become rows with an ``error`` in the image
cell: input errors, never sent, never a crash. A shard whose samples' members are not together (a tar made from
a folder in directory order) cannot be streamed: that stops the job before anything is sent, saying how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from qwenvl_batch.errors import ConfigError

from .patterns import IMAGE_SUFFIXES

IMAGE_EXTENSIONS = tuple(s.lstrip(".") for s in (".jpg", ".jpeg", ".png", ".webp", *sorted(IMAGE_SUFFIXES)))
IMAGE_TYPE = pa.struct([("path", pa.string()), ("tar", pa.string()), ("offset", pa.int64()),
                        ("length", pa.int64()), ("sha256", pa.string()), ("bytes", pa.binary()),
                        ("error", pa.string()), ("error_code", pa.string())])
FIXED = ("id", "key", "image", "txt")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


@dataclass
class Sample:
    """Members of one key, as they stream past."""

    key: str
    image: dict[str, Any] | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    error: str | None = None


def schema_of(shards: Sequence[Path], reserved: frozenset[str]) -> pa.Schema:
    """id, key, image, txt, then the first sample's JSON keys (renamed where they clash with ``reserved``)."""
    first: Sample | None = None
    for sample in _samples(shards[0]):
        first = sample
        break
    keys = list(first.meta) if first is not None else []
    return pa.schema([("id", pa.string()), ("key", pa.string()), ("image", IMAGE_TYPE), ("txt", pa.string())]
                     + [(json_column(k, reserved), pa.string()) for k in keys])


def json_column(key: str, reserved: frozenset[str]) -> str:
    """The column a JSON key becomes: itself, or ``json_<key>`` where it would clash."""
    return f"json_{key}" if key in FIXED or key in reserved else key


def read_shards(shards: Sequence[Path], schema: pa.Schema, reserved: frozenset[str], batch_rows: int,
                columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    """Every sample of every shard, in order, as record batches of ``schema``."""
    json_columns = {name for name in schema.names if name not in FIXED}
    rows: list[dict[str, Any]] = []
    for shard in shards:
        stem = shard.name.split(".", 1)[0]
        for sample in _samples(shard):
            rows.append(_row(stem, sample, reserved, json_columns))
            if len(rows) >= batch_rows:
                yield _batch(rows, schema, columns)
                rows = []
    if rows:
        yield _batch(rows, schema, columns)


def _batch(rows: list[dict[str, Any]], schema: pa.Schema, columns: list[str] | None) -> pa.RecordBatch:
    batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    return batch.select(columns) if columns else batch


def _row(stem: str, sample: Sample, reserved: frozenset[str], json_columns: set[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": f"{stem}/{sample.key}", "key": sample.key, "txt": sample.text}
    for key, value in sample.meta.items():
        name = json_column(key, reserved)
        if name in json_columns:
            row[name] = value if value is None or isinstance(value, str) else json.dumps(value)
    image = sample.image or {"path": f"{stem}/{sample.key}"}
    if sample.error:
        image = {**image, "error": sample.error, "error_code": "bad_sample"}
    elif sample.image is None:
        found = ", ".join(sample.members) or "none"
        image = {**image, "error": f"sample {stem}/{sample.key} has no image member (members: {found}); "
                 "Fix: add a .jpg/.png/.webp member for this key or remove the sample", "error_code": "no_image"}
    row["image"] = image
    return row


def _samples(shard: Path) -> Iterator[Sample]:
    """Group a shard's members by key; a read failure ends the shard with an error on the sample it hit."""
    compressed = _is_compressed(shard)
    current: Sample | None = None
    seen: set[str] = set()  # keys of this shard: a key coming back means the tar is not in sample order
    try:
        with tarfile.open(shard, "r|*") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                key, ext = _split(info.name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    if key in seen:
                        raise ConfigError(_out_of_order(shard, key))
                    seen.add(key)
                    current = Sample(key=key)
                current.members.append(info.name.rsplit("/", 1)[-1])
                _add_member(current, archive, info, ext, shard, compressed)
    except (tarfile.TarError, EOFError, OSError) as exc:
        current = current or Sample(key="#end")
        current.error = (f"the shard {shard.name} is truncated or corrupt at this sample ({exc}); "
                         "Fix: re-download or re-create the shard; later samples in it cannot be read")
    if current is not None:
        yield current


def _add_member(sample: Sample, archive: tarfile.TarFile, info: tarfile.TarInfo, ext: str, shard: Path,
                compressed: bool) -> None:
    """Read one member (streamed past once): image → hashed reference; .txt → text; .json → columns."""
    is_image = ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
    wanted = (is_image and sample.image is None) or ext in ("txt", "json")
    if not wanted:
        return
    handle = archive.extractfile(info)
    data = handle.read() if handle is not None else b""
    if is_image:
        member = f"{shard.name}/{_clean(info.name)}"
        if compressed:
            sample.image = {"path": member, "bytes": data}
        else:
            sample.image = {"path": member, "tar": str(shard.resolve()), "offset": info.offset_data,
                            "length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    elif ext == "txt":
        sample.text = data.decode("utf-8", "replace")
    else:
        try:
            meta = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict):
            sample.meta = meta


def _out_of_order(shard: Path, key: str) -> str:
    return (f"{shard}: the members of sample {key!r} are not next to each other, so samples cannot be streamed "
            "(WebDataset shards hold each sample's files together). Nothing was sent. Fix: re-create the shard in "
            "name order, e.g. GNU tar: tar --sort=name -cf shard.tar -C folder .")


def _split(name: str) -> tuple[str, str]:
    """(key, extension): the key runs to the first dot after the last slash (a leading ``./`` is dropped)."""
    folder, _, base = _clean(name).rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _clean(name: str) -> str:
    """A member name without the ``./`` that ``tar -C folder .`` puts in front."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _is_compressed(shard: Path) -> bool:
    with shard.open("rb") as handle:
        return handle.read(6).startswith(_COMPRESSED_MAGIC)
