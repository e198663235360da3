"""Templates + a manifest row → what one request asks for, and the fingerprint that identifies it.

The fingerprint is what makes resume honest: it hashes everything that decides the answer (model, endpoint,
sampling parameters, the prompt templates and the row values they use, the image references as written), so a
re-run after the prompt or ``max_tokens`` was edited can tell which finished rows were produced by different
settings instead of silently keeping or silently redoing them. It is computed for a whole record batch at once
(vectorised hashing of the columns that matter, keyed by a hash of the job's settings): resuming a run of 10^6
finished rows must not mean rendering 10^6 prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import tokens
from .config import JobConfig
from .errors import ConfigError, InputRowError
from .media import ImageRef, PreparedImage, parse_image_cell, too_many_images

_FORMATTER = string.Formatter()


def template_fields(template: str | None) -> set[str]:
    """Column names a template refers to (``{name}``, ``{name!r}``, ``{name:>10}``)."""
    if not template:
        return set()
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ConfigError(f"Prompt template is malformed ({exc}); write literal braces as {{{{ and }}}}") from None
    fields = set()
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ConfigError("Prompt templates take column names in braces, like {caption_hint}; '{}' has none")
        fields.add(name.split(".")[0].split("[")[0])
    return fields


def _cell_text(value: Any) -> str:
    """Manifest values as prompt text: nulls (and NaN) become empty strings, not 'None'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


@dataclass(frozen=True)
class RenderedRow:
    """One row, ready to send except for the image bytes (loaded later, in a worker thread)."""

    key: str
    system: str | None
    user: str
    images: tuple[ImageRef, ...]
    error: InputRowError | None = None


class RowRenderer:
    """Renders rows for one job; checks the templates against the manifest's columns once, up front."""

    def __init__(self, job: JobConfig, columns: Iterable[str], base_dir: Path) -> None:
        self.job = job
        self.base_dir = base_dir
        self._check_columns(set(columns))
        self._template_columns = sorted(template_fields(job.prompt.system) | template_fields(job.prompt.user))
        used = set(self._template_columns) | set(job.input.image_columns)
        self._fingerprint_columns = sorted(used & set(columns))
        self._hash_key = hashlib.blake2b(_job_identity(job).encode(), digest_size=8).hexdigest()

    @property
    def fingerprint_columns(self) -> list[str]:
        """The manifest columns a row's fingerprint is made of (the rest of it is the job's settings)."""
        return list(self._fingerprint_columns)

    @property
    def settings_key(self) -> str:
        """The job-wide part of every fingerprint, as a short hex digest (changes with any setting it covers)."""
        return self._hash_key

    def _check_columns(self, columns: set[str]) -> None:
        where = f"{self.job.job_file or 'job'} [prompt]"
        for name, template in (("system", self.job.prompt.system), ("user", self.job.prompt.user)):
            missing = sorted(template_fields(template) - columns)
            if missing:
                raise ConfigError(
                    f"{where} {name} template uses {', '.join('{' + m + '}' for m in missing)}, but the manifest "
                    f"{self.job.input.path} has no such column (columns: {', '.join(sorted(columns))})"
                )

    def render(self, row: Mapping[str, Any]) -> RenderedRow:
        """Fill the templates and parse the image cells; an empty image cell is an input error, not an exception."""
        key = _cell_text(row[self.job.input.id_column])
        # Only the columns the templates use: an image cell may hold megabytes of bytes, never worth a str().
        values = {name: _cell_text(row.get(name)) for name in self._template_columns}
        system = self.job.prompt.system.format_map(values) if self.job.prompt.system else None
        user = self.job.prompt.user.format_map(values)
        refs: list[ImageRef] = []
        error: InputRowError | None = None
        for column in self.job.input.image_columns:
            try:
                cell_refs = parse_image_cell(row.get(column), column=column, base_dir=self.base_dir)
            except InputRowError as exc:
                error = error or exc
                continue
            refs.extend(cell_refs)
        if not refs and error is None:
            columns = ", ".join(repr(c) for c in self.job.input.image_columns)
            error = InputRowError(f"row {key!r}: no image: the image column {columns} is empty; add an image reference")
        error = error or too_many_images(key, refs)
        return RenderedRow(key=key, system=system, user=user, images=tuple(refs), error=error)

    def fingerprints(self, batch: pa.RecordBatch) -> np.ndarray:
        """One 64-bit fingerprint per row of ``batch`` (uint64), from the job's settings and the used columns."""
        if batch.num_rows == 0:
            return np.empty(0, dtype=np.uint64)
        frame = pd.DataFrame({f"{name}{part}": values for name in self._fingerprint_columns
                              for part, values in _hashable(batch.column(name)).items()})
        if frame.empty:
            frame = pd.DataFrame({"_": np.zeros(batch.num_rows, dtype=np.uint8)})
        hashed = pd.util.hash_pandas_object(frame, index=False, hash_key=self._hash_key, categorize=False)
        return hashed.to_numpy(dtype=np.uint64)


def _hashable(column: pa.Array) -> dict[str, np.ndarray]:
    """A column as arrays pandas can hash: text as text; image bytes and image structs by their identity.

    Bytes cells (HF ``struct<bytes, path>``, binary columns) hash the bytes themselves, and tar members their
    path and sha256, so editing one image changes that row's fingerprint and no other.
    """
    if (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) and (
            pa.types.is_struct(column.type.value_type) or pa.types.is_binary(column.type.value_type)):
        return {"": np.array([_list_identity(cell) for cell in column.to_pylist()], dtype=object)}
    if pa.types.is_struct(column.type):
        fields = [column.type.field(i).name for i in range(column.type.num_fields)]
        kept = [f for f in ("path", "sha256", "bytes", "error") if f in fields]
        return {f".{name}": _hashable_leaf(column.field(name)) for name in kept}
    return {"": _hashable_leaf(column)}


def _list_identity(cell: list[Any] | None) -> bytes:
    """A list of image structs or bytes (HF ``Sequence(Image())``) as one byte string to hash; rare, so per row."""
    if cell is None:
        return b"\x00null"
    parts = []
    for item in cell:
        if isinstance(item, dict):
            item = b"\x1e".join(str(item.get(k)).encode() if k != "bytes" else (item.get(k) or b"")
                                 for k in ("path", "sha256", "bytes", "error"))
        parts.append(item or b"")
    return b"\x1f".join(parts)


def _hashable_leaf(column: pa.Array) -> np.ndarray:
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column.fill_null(b"\x00null").to_numpy(zero_copy_only=False)
    return _as_text(column)


def _as_text(column: pa.Array) -> np.ndarray:
    """A column as text for hashing: list cells joined with a separator, nulls distinct from empty strings."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.binary_join(column.cast(pa.list_(pa.string())), "\x1f")
    elif column.type != pa.string():
        column = column.cast(pa.string())
    return column.fill_null("\x00null").to_numpy(zero_copy_only=False)


def fingerprint_hex(values: np.ndarray) -> list[str]:
    """Fingerprints as 16-character hex strings (how the output stores them)."""
    return [format(value, "016x") for value in values.tolist()]


def fingerprints_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The output's fingerprint column (16-char hex strings) as uint64, without a Python string per row."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = values.fill_null("0" * 16)
    if len(values) and pc.all(pc.equal(pc.utf8_length(values), 16)).as_py():
        offsets, data = values.buffers()[1], values.buffers()[2]
        start = int(np.frombuffer(offsets, dtype=np.int32)[values.offset])  # every value is 16 chars: contiguous
        text = data.to_pybytes()[start: start + 16 * len(values)].decode("ascii")
        return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)
    return parse_fingerprints(values.to_pylist())


def parse_fingerprints(values: Iterable[str | None]) -> np.ndarray:
    """Hex fingerprints back to uint64 (vectorised: one bytes.fromhex over all of them); None → 0."""
    text = "".join(value if value and len(value) == 16 else "0" * 16 for value in values)
    return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)


def _job_identity(job: JobConfig) -> str:
    """The job-wide part of every fingerprint: what the provider sees besides the row itself."""
    model = job.model
    extra = {k: v for k, v in model.extra_body.items() if k not in ("stream", "stream_options")}
    return json.dumps(
        {
            "model": model.name,
            "endpoint": job.endpoint_identity,
            "temperature": model.temperature,
            "top_p": model.top_p,
            "max_tokens": model.max_tokens,
            "seed": model.seed,
            "min_pixels": model.min_pixels,
            "max_pixels": model.max_pixels,
            "extra_body": extra,
            "system": job.prompt.system,
            "user": job.prompt.user,
            "image_columns": list(job.input.image_columns),
            "images": job.images.model_dump(),
        },
        sort_keys=True,
        default=str,
    )


class PromptTokens:
    """A rendered row's prompt tokens exactly as the provider counts them (tokens.py's rules with the job's model,
    pixel bounds and ``vl_high_resolution_images``). Shared by the rate limiter and ``estimate``, so the two never
    disagree. An image whose size is unknown (an http(s) URL, not fetched) counts as the most one image can cost."""

    def __init__(self, job: JobConfig) -> None:
        model = job.model
        self.model = model.name
        self.high_resolution = model.high_resolution
        self.min_pixels, self.max_pixels = model.min_pixels, model.max_pixels
        spec = tokens.vision_spec(model.name)
        _, upper = tokens.effective_pixel_bounds(spec, high_resolution=self.high_resolution,
                                                 min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        self.max_image_tokens = upper // (spec.factor * spec.factor) + tokens.VISION_MARKER_TOKENS

    def count(self, rendered: RenderedRow, sizes: Sequence[tuple[int, int] | None]) -> int:
        """Prompt tokens for the row's texts and its images' (width, height); raises tokens.ImageSizeError for a
        size the provider refuses."""
        known = [size for size in sizes if size is not None]
        texts = [text for text in (rendered.system, rendered.user) if text]
        prompt = tokens.prompt_tokens(texts, known, self.model, high_resolution=self.high_resolution,
                                      min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return prompt + (len(sizes) - len(known)) * self.max_image_tokens


def build_messages(
    rendered: RenderedRow, images: list[PreparedImage], *, min_pixels: int | None, max_pixels: int | None
) -> list[dict[str, Any]]:
    """OpenAI-style messages: images first, then the text; pixel bounds are siblings of ``image_url`` (DashScope)."""
    content: list[dict[str, Any]] = []
    for image in images:
        part: dict[str, Any] = {"type": "image_url", "image_url": {"url": image.url}}
        if min_pixels is not None:
            part["min_pixels"] = min_pixels
        if max_pixels is not None:
            part["max_pixels"] = max_pixels
        content.append(part)
    if rendered.user:
        content.append({"type": "text", "text": rendered.user})
    messages: list[dict[str, Any]] = []
    if rendered.system:
        messages.append({"role": "system", "content": rendered.system})
    messages.append({"role": "user", "content": content})
    return messages
