"""Redaction: output files and messages never hold image bytes.

A data URL becomes its header plus a short hash and its length; a cell that carried bytes (HF struct, binary
column, tar member) is stored as a short reference: the HF ``path`` or member name if any, then
``<bytes sha256:… N bytes>``. So an output stays small whatever the images weigh, and a stored cell still
identifies its image (the hash prefix is the one in the row's fingerprint identity).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pyarrow as pa

_DATA_URL_RE = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
# A data URL anywhere in a string (also inside a JSON list), up to the end of its payload.
_DATA_URL_ANYWHERE_RE = re.compile(
    r"(?<![A-Za-z0-9_\-])data:([^;,\s\"']*)((?:;[^;,\s\"']*)*),([^\s\"',\]]*)", re.IGNORECASE
)


def redact_data_url(value: str) -> str:
    """Replace every base64 payload in ``value`` by a short hash and its length; other text is unchanged.

    ``"data:image/png;base64,iVBOR..."`` → ``"data:image/png;base64,<sha256:ab12cd34ef56, 12,345 chars>"``, where
    the hash prefix matches :meth:`ImageRef.identity` and the length is that of the whole data URL (the number
    the provider's limit applies to). Works on a single reference or on a string holding several (a JSON list).
    """
    if "data:" not in value.lower():
        return value
    return _DATA_URL_ANYWHERE_RE.sub(_redacted, value)


def _redacted(match: re.Match[str]) -> str:
    """One data URL → its header plus a digest."""
    payload = match.group(3)
    digest = hashlib.sha256(payload.encode("ascii", "replace")).hexdigest()[:12]
    return f"{match.group(0)[: match.start(3) - match.start(0)]}<sha256:{digest}, {len(match.group(0)):,} chars>"


def _split_data_url(value: str) -> tuple[str, str, str]:
    """(mime, parameters, payload) of a data URL, tolerating a malformed one (for describe/identity)."""
    match = _DATA_URL_RE.match(value)
    if match is None:
        return "", "", value[5:]
    return match.group(1).strip().lower(), match.group(2), value[match.end() :]


def _data_url_header(value: str) -> str:
    """``data:image/png;base64`` from a data URL, shortened if the header is absurd."""
    match = _DATA_URL_RE.match(value)
    header = value[: match.end() - 1] if match else "data:"
    return _shorten(header, 80)



def _shorten(text: str, limit: int = 200) -> str:
    """Keep messages short and free of inline image data."""
    text = redact_data_url(text)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def redact_cell(value: Any) -> Any:
    """A manifest image cell as the output stores it: text stays text (data URLs redacted), bytes become a reference."""
    if isinstance(value, str):
        return redact_data_url(value) if "data:" in value.lower() else value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes_reference(None, bytes(value))
    if isinstance(value, dict):
        return _struct_reference(value)
    if isinstance(value, (list, tuple)):
        return [redact_cell(item) for item in value]
    return value


def bytes_reference(name: str | None, data: bytes) -> str:
    """``name <bytes sha256:0123456789ab 12,345 bytes>``: what replaces inline bytes in the output."""
    digest = hashlib.sha256(data).hexdigest()[:12]
    return f"{name + ' ' if name else ''}<bytes sha256:{digest} {len(data):,} bytes>"


def _struct_reference(cell: dict[str, Any]) -> str | None:
    """An HF image struct or a tar-member struct → its short text form; a struct with nothing in it → None."""
    name = cell.get("path") or None
    if cell.get("sha256") and cell.get("length") is not None:
        return f"{name} <bytes sha256:{str(cell['sha256'])[:12]} {int(cell['length']):,} bytes>"
    data = cell.get("bytes")
    if data:
        return bytes_reference(name, bytes(data))
    return name


def stored_type(column_type: pa.DataType) -> pa.DataType:
    """The output type of an image column: anything that can carry bytes is stored as text (or a list of text)."""
    if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
        inner = column_type.value_type
        return pa.list_(pa.string()) if _carries_bytes(inner) or pa.types.is_struct(inner) else column_type
    return pa.string() if _carries_bytes(column_type) or pa.types.is_struct(column_type) else column_type


def stored_schema(schema: pa.Schema, image_columns: Any) -> pa.Schema:
    """The manifest schema with the columns to redact retyped as text (see :func:`redact_cell`); pass
    :func:`redacted_columns`."""
    for name in image_columns:
        index = schema.get_field_index(name)
        if index >= 0:
            schema = schema.set(index, pa.field(name, stored_type(schema.field(index).type)))
    return schema


def redacted_columns(schema: pa.Schema, image_columns: Any) -> list[str]:
    """The columns the output must redact: the image columns, and any other column that carries bytes (a second
    HF image column the prompt does not use, say), so the output never holds image bytes whatever is captioned."""
    images = [name for name in image_columns if name in schema.names]
    return images + [f.name for f in schema if f.name not in images and _carries_bytes(f.type)]


def _carries_bytes(column_type: pa.DataType) -> bool:
    """Binary, a struct with a binary field (an HF image), or a list of those."""
    if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
        return _carries_bytes(column_type.value_type)
    if pa.types.is_struct(column_type):
        return any(_carries_bytes(column_type.field(i).type) for i in range(column_type.num_fields))
    return (pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
            or pa.types.is_fixed_size_binary(column_type))
