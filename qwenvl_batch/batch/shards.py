"""The plan's rows → JSONL shards within the provider's limits, each with a sidecar of the manifest rows it holds.

A row becomes a line exactly as the realtime worker would build its request (``RowRenderer.render``,
``worker.prepare_all``: the same client-side resize, ``prompt.build_messages``, ``client._request_params``), so
the answers and fingerprints are the same in both modes. A row that cannot be a line (an input error, or a line
over the provider's per-line limit) becomes an input-error result row and is never uploaded. The sidecar
(``rows.arrows``: the manifest row, its fingerprint and custom_id) is what turns result lines back into output
rows, so the manifest need not be read again when results arrive hours later.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyarrow import ipc

from ..client import _request_params
from ..config import JobConfig
from ..errors import InputRowError
from ..media import ResizePolicy
from ..prompt import RowRenderer, build_messages
from ..results import ResultRows
from ..worker import prepare_all
from .rules import ENDPOINT, MB, ProviderRules

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
FINGERPRINT = "_qwenvl_fingerprint"
CUSTOM_ID = "_qwenvl_custom_id"


def custom_id_for(row_id: str) -> str:
    """The row id itself when it is a short plain token, else a hash of it (the sidecar maps it back)."""
    if _SAFE_ID.match(row_id):
        return row_id
    return "h-" + hashlib.blake2b(row_id.encode(), digest_size=12).hexdigest()


@dataclass
class Limits:
    """The cut: the provider's limits, lowered by ``[batch]`` settings when asked."""

    max_lines: int
    max_file_bytes: int
    max_line_bytes: int | None

    @classmethod
    def of(cls, job: JobConfig, rules: ProviderRules) -> Limits:
        lines = min(job.batch.max_lines_per_file or rules.max_lines, rules.max_lines)
        file_bytes = rules.max_file_bytes
        if job.batch.max_file_mb is not None:
            file_bytes = min(file_bytes, int(job.batch.max_file_mb * MB))
        line_bytes = rules.max_line_bytes
        return cls(lines, file_bytes, min(line_bytes, file_bytes) if line_bytes else file_bytes)


@dataclass
class OpenShard:
    """A shard being written: its JSONL handle, its sidecar rows, its size."""

    path: Path
    lines: int = 0
    bytes: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


class LineBuilder:
    """One manifest row → one JSONL line (bytes), or an input-error result row."""

    def __init__(self, job: JobConfig, renderer: RowRenderer, results: ResultRows, rules: ProviderRules,
                 limits: Limits, resize: ResizePolicy) -> None:
        self.job = job
        self.renderer = renderer
        self.results = results
        self.rules = rules
        self.limits = limits
        self.resize = resize
        self.params = _request_params(job)

    def line(self, row: dict[str, Any], custom_id: str) -> tuple[bytes | None, dict[str, Any] | None]:
        """(line, None) or (None, the input-error row)."""
        rendered = self.renderer.render(row)
        if rendered.error is not None:
            return None, self.results.error(row, "input", rendered.error.code, str(rendered.error), attempts=0)
        try:
            images = prepare_all(rendered, self.resize)
        except InputRowError as exc:
            return None, self.results.error(row, "input", exc.code, str(exc), attempts=0)
        messages = build_messages(rendered, images, min_pixels=self.job.model.min_pixels,
                                  max_pixels=self.job.model.max_pixels)
        body = self.rules.body(self.params, messages)
        line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        cap = self.limits.max_line_bytes
        if cap is not None and len(data) > cap:
            message = (f"row {rendered.key!r}: its batch line is {len(data) / MB:.1f} MB, over the "
                       f"{cap / MB:.0f} MB per-line limit of the {self.rules.name} (images inline as base64). "
                       "Give the image as an http(s) URL in the manifest, use smaller images, or run this row "
                       "with mode = \"realtime\"")
            return None, self.results.error(row, "input", "batch_line_too_large", message, attempts=0)
        return data, None


class ShardWriter:
    """Lines into shard files, a new shard whenever the next line would break a limit; ``on_shard`` is called
    with each closed shard (its file fsynced) so the caller records it before anything else happens."""

    def __init__(self, limits: Limits, schema: pa.Schema, path_for: Callable[[], Path],
                 on_shard: Callable[[OpenShard], None]) -> None:
        self.limits = limits
        self.schema = schema.append(pa.field(FINGERPRINT, pa.string())).append(pa.field(CUSTOM_ID, pa.string()))
        self.path_for = path_for
        self.on_shard = on_shard
        self.current: OpenShard | None = None
        self._handle: Any = None
        self.after_line: Callable[[], None] | None = None  # test hook: a kill while writing

    def add(self, line: bytes, row: dict[str, Any], fingerprint: str, custom_id: str) -> None:
        shard = self.current
        if shard is not None and (shard.lines + 1 > self.limits.max_lines
                                  or shard.bytes + len(line) > self.limits.max_file_bytes):
            self.close()
            shard = None
        if shard is None:
            shard = self.current = OpenShard(self.path_for())
            self._handle = open(shard.path, "wb")
        self._handle.write(line)
        shard.lines += 1
        shard.bytes += len(line)
        shard.rows.append({**row, FINGERPRINT: fingerprint, CUSTOM_ID: custom_id})
        if self.after_line is not None:
            self._handle.flush()
            self.after_line()

    def close(self) -> None:
        """Finish the current shard: JSONL and sidecar fsynced, then ``on_shard``."""
        shard, self.current = self.current, None
        if shard is None:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        write_rows(rows_path(shard.path), shard.rows, self.schema)
        self.on_shard(shard)


def rows_path(jsonl: Path) -> Path:
    return jsonl.with_name(jsonl.name.replace(".input.jsonl", ".rows.arrows"))


def write_rows(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """The sidecar: Arrow IPC, so manifest values keep their types; fsynced."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        writer.write_table(table)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The sidecar's rows as dicts (manifest columns plus fingerprint and custom_id)."""
    with pa.memory_map(str(path)) as source:
        table = ipc.open_file(source).read_all()
    yield from table.to_pylist()
