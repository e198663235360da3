"""Manifest cells → image references: what each cell names, classified but not yet read.

A cell names one image or a list of them: a local path (relative paths resolve against the manifest's folder),
a ``file://`` URL, an ``http(s)`` URL, a ``data:`` URL, or, for datasets that carry their images, the bytes
themselves: a ``binary`` cell (img2dataset's ``jpg``), a Hugging Face image struct ``{"bytes", "path"}`` (bytes
when present, else the path, resolved like any path), or a WebDataset member struct written by
:mod:`qwenvl_batch.sources.webdataset`. A struct may carry an ``error`` a reader found (a failed download, a
sample without an image): the row becomes an input error with that reason and is never sent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import numpy as np

from qwenvl_batch.errors import InputRowError

from .redact import _data_url_header, _shorten, _split_data_url
from .sources import DataUrl, ImageSource, InlineBytes, LocalFile, RemoteUrl, TarMember

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")

RefKind = Literal["path", "url", "data", "bytes", "tar", "page"]


@dataclass(frozen=True)
class ImageRef:
    """One image reference from a manifest cell, classified but not yet read."""

    kind: RefKind
    value: str
    """Exactly as written in the manifest cell (surrounding whitespace removed)."""
    column: str
    path: Path | None = None
    """The resolved absolute path when ``kind == "path"``."""
    blob: ImageSource | None = None
    """Where the bytes are when the manifest carries them (``kind`` "bytes" or "tar"); ``value`` is then a label
    (the HF ``path``, the tar member's name) and never the bytes."""

    def __post_init__(self) -> None:
        if self.kind == "path" and self.path is None:
            raise ValueError("an ImageRef of kind 'path' needs a resolved path")
        if self.kind in ("bytes", "tar", "page") and self.blob is None:
            raise ValueError(f"an ImageRef of kind {self.kind!r} needs its bytes' source")

    @property
    def source(self) -> ImageSource:
        """Where this image's bytes come from (see :mod:`.sources`)."""
        if self.blob is not None:
            return self.blob
        if self.kind == "path":
            assert self.path is not None
            return LocalFile(self.path)
        return DataUrl(self.value) if self.kind == "data" else RemoteUrl(self.value)

    def describe(self) -> str:
        """Name the image for a message or a log line, never with image data in it."""
        if self.kind == "data":
            return f"{_data_url_header(self.value)} ({len(self.value):,} chars)"
        if self.blob is not None:
            if self.kind == "page":
                return repr(self.value)
            return f"{self.value!r} ({self.blob.size():,} bytes in the {'tar' if self.kind == 'tar' else 'manifest'})"
        if self.kind == "path" and str(self.path) != self.value:
            return f"{self.value!r} (resolved: {self.path})"
        return repr(self.value)

    def identity(self) -> str:
        """A stable string for row fingerprints: the path as written, the URL, or a hash of inline data.

        The path is taken as written (not resolved) so that moving the manifest together with its images keeps
        the fingerprints, and a data URL is hashed so that fingerprints stay short.
        """
        if self.kind == "data":
            mime, _, payload = _split_data_url(self.value)
            return f"data:{mime};sha256:{hashlib.sha256(payload.encode('ascii', 'replace')).hexdigest()}"
        if self.blob is not None:
            return f"{self.value}#sha256:{self.blob.digest()}"
        return self.value



def parse_image_cell(cell: object, *, column: str, base_dir: Path) -> list[ImageRef]:
    """Turn one manifest cell into image references; an empty cell gives ``[]`` (the caller reports it).

    Accepts a string, a JSON array string (how a list survives a CSV cell), or a list / tuple / numpy array (how
    Parquet and JSONL list columns arrive through pandas). Anything else is an input error naming the type.
    """
    if isinstance(cell, (dict, bytes, bytearray, memoryview)):
        return _blob_refs(cell, column, base_dir)
    if isinstance(cell, (list, tuple, np.ndarray)) and any(isinstance(c, (dict, bytes)) for c in cell):
        return [ref for item in cell for ref in _blob_refs(item, column, base_dir)]  # HF Sequence(Image())
    return [image_ref(value, column=column, base_dir=base_dir) for value in _cell_values(cell, column)]


def _blob_refs(cell: object, column: str, base_dir: Path) -> list[ImageRef]:
    """A cell that carries its image: raw bytes, an HF ``{"bytes", "path"}`` struct, or a tar member struct."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        data = bytes(cell)
        return [_inline(data, None, column)] if data else []
    if not isinstance(cell, dict):
        raise _cell_error(column, f"a list element is a {type(cell).__name__}", "list image references of one kind")
    if not {"bytes", "path", "tar", "error"} & cell.keys():
        raise _cell_error(column, f"the cell is a struct with fields {sorted(cell)} but has no 'bytes' or 'path'",
                          "use a Hugging Face image column (struct<bytes, path>), bytes, or a path")
    error = cell.get("error")
    if error:
        raise InputRowError(f"column {column!r}: {error}", code=str(cell.get("error_code") or "bad_sample"))
    name = cell.get("path") or None
    if cell.get("page"):  # a document page (issue 12: documents.py writes these cells)
        return [_page_ref(cell, column)]
    if cell.get("tar"):
        member = TarMember(Path(cell["tar"]), int(cell["offset"]), int(cell["length"]), str(cell["sha256"]))
        return [ImageRef(kind="tar", value=str(name), column=column, blob=member)]
    payload = cell.get("bytes")
    if payload:
        return [_inline(bytes(payload), name, column)]
    return [image_ref(str(name), column=column, base_dir=base_dir)] if name else []


def _page_ref(cell: dict[str, object], column: str) -> ImageRef:
    """A document page cell → a reference rendered on read (see :mod:`.pages`)."""
    from .pages import PageSource

    page = PageSource(Path(str(cell["file"])), str(cell["kind"]), int(cell["page"]),  # type: ignore[call-overload]
                      int(cell["width"]), int(cell["height"]), int(cell.get("quality") or 90))  # type: ignore[call-overload]
    return ImageRef(kind="page", value=f"{cell.get('path')}#page={page.page}", column=column, blob=page)


def _inline(data: bytes, name: str | None, column: str) -> ImageRef:
    """Bytes from the manifest; labelled by their HF ``path`` when there is one (it is what the output keeps)."""
    return ImageRef(kind="bytes", value=name or "<bytes>", column=column, blob=InlineBytes(data))


def image_ref(value: str, *, column: str, base_dir: Path) -> ImageRef:
    """Classify one reference string; relative paths resolve against ``base_dir`` (the manifest's folder)."""
    text = value.strip()
    lowered = text.lower()
    if lowered.startswith("data:"):
        return ImageRef(kind="data", value=text, column=column)
    if lowered.startswith(("http://", "https://")):
        if not urlsplit(text).netloc:
            raise _cell_error(column, f"the URL {_shorten(text)!r} has no host", "write it as https://host/path")
        return ImageRef(kind="url", value=text, column=column)
    if lowered.startswith("file://"):
        path = _usable(_file_url_path(text, column), text, column)
        return ImageRef(kind="path", value=text, column=column, path=path)
    scheme = _SCHEME_RE.match(text)
    if scheme:
        raise _cell_error(
            column,
            f"the reference {_shorten(text)!r} uses the {scheme.group(1)}:// scheme, which the provider cannot fetch",
            "use a local path, a public http(s) URL (for cloud storage: a presigned URL) or a data: URL",
            code="unsupported_url",
        )
    return ImageRef(kind="path", value=text, column=column,
                    path=_usable(_resolve(Path(_checked_text(text, column)).expanduser(), base_dir), text, column))


def _checked_text(text: str, column: str) -> str:
    """A path string the OS can take: a NUL byte would make every later ``stat``/``open`` raise ValueError."""
    if "\x00" in text:
        raise _cell_error(column, f"the path {_shorten(text)!r} contains a NUL byte, which no "
                          "file name can hold", "correct the path in the manifest", code="bad_path")
    return text


def _usable(path: Path, text: str, column: str) -> Path:
    """The resolved path, refused as a row error when the OS cannot be given it (NUL byte, unencodable text)."""
    _checked_text(str(path), column)
    try:
        os.fsencode(path)
    except (UnicodeEncodeError, ValueError) as exc:
        raise _cell_error(column, f"the path {_shorten(text)!r} cannot be used as a file name ({exc})",
                          "correct the path in the manifest", code="bad_path") from None
    return path


def _cell_values(cell: object, column: str) -> list[str]:
    """Normalise a cell to a list of non-empty reference strings."""
    if _is_missing(cell):
        return []
    if isinstance(cell, str):
        text = cell.strip()
        if not text:
            return []
        if text.startswith("["):
            return _check_items(_json_list(text, column), column)
        return [text]
    if isinstance(cell, (list, tuple, np.ndarray)):
        return _check_items(list(cell), column)
    raise _cell_error(
        column,
        f"the cell holds a {type(cell).__name__}, not an image reference",
        "store a path or URL, or a list of them (a JSON array string in CSV)",
    )


def _is_missing(cell: object) -> bool:
    """None, NaN and pandas' NA all mean an empty cell."""
    if cell is None:
        return True
    if isinstance(cell, (float, np.floating)):
        return math.isnan(cell)
    return type(cell).__name__ in ("NAType", "NaTType")


def _json_list(text: str, column: str) -> list[object]:
    """Parse a JSON array string cell such as ``["a.jpg", "b.jpg"]``."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _cell_error(
            column,
            f"the cell starts with '[' but is not a valid JSON array ({exc.msg} at char {exc.pos})",
            'write the list as JSON, e.g. ["a.jpg", "b.jpg"]',
        ) from exc
    if not isinstance(parsed, list):
        raise _cell_error(column, "the cell is JSON but not an array", 'write the list as ["a.jpg", "b.jpg"]')
    return parsed


def _check_items(items: list[object], column: str) -> list[str]:
    """Every element of a list cell must be a non-empty string; a hole in a list is an error, not a skip."""
    values: list[str] = []
    for position, item in enumerate(items, start=1):
        if not isinstance(item, str) or not item.strip():
            what = "empty" if isinstance(item, str) or _is_missing(item) else f"a {type(item).__name__}"
            raise _cell_error(
                column, f"element {position} of the list is {what}", "every element must be a path or URL string"
            )
        values.append(item.strip())
    return values


def _file_url_path(text: str, column: str) -> Path:
    """``file:///abs/x.jpg`` or ``file://localhost/abs/x.jpg`` → an absolute path."""
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise _cell_error(
            column,
            f"the file URL {_shorten(text)!r} names the host {parts.netloc!r}; only local files can be read",
            "write it as file:///absolute/path or as a plain path",
        )
    return Path(os.path.abspath(url2pathname(unquote(parts.path))))


def _resolve(path: Path, base_dir: Path) -> Path:
    """Absolute and normalised, without following symlinks, so messages show the path the user knows."""
    return Path(os.path.abspath(path if path.is_absolute() else base_dir / path))



def _cell_error(column: str, reason: str, fix: str, *, code: str = "bad_cell") -> InputRowError:
    """An error about the cell itself, before there is an ImageRef to describe."""
    return InputRowError(f"column {column!r}: {reason}. Fix: {fix}.", code=code)

