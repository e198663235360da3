"""The shard state file: where every shard of a batch job is, written durably at every step.

``OUT.state/batch/state.json`` lists the shards; each moves forward only::

    written → uploaded (file id) → created (batch id) → downloaded → journaled → done

and each step is recorded (write a temporary file, fsync, rename, fsync the folder) before the next starts, so a
``kill -9`` at any moment leaves a state that says exactly what to do next: write again, upload again, look the
batch up by its ``ds_name`` before creating one (a batch created just before a crash is found, not created
twice), poll, download, journal. Rows of a shard that is not ``done`` are *in flight*: no later plan sends them.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..durable import fsync_dir

ACTIVE = ("written", "uploaded", "created", "downloaded", "journaled")
STATE_VERSION = 1


@dataclass
class Shard:
    """One JSONL file and the batch made of it."""

    no: int
    ds_name: str
    round: int
    lines: int
    bytes: int
    state: str = "written"
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's batch status, as last seen
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    submitted_at: float | None = None  # epoch seconds when create returned
    result_at: float | None = None  # epoch seconds when the terminal status was first seen
    changed_at: float | None = None  # the last time status or counts changed (for "no progress for N min")
    errors: list[str] = field(default_factory=list)  # a failed batch's validation errors, with line numbers
    journaled: dict[str, int] = field(default_factory=dict)  # rows journaled by status ("ok", "error", "pending")

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass
class BatchState:
    """All shards of one output; ``save()`` after every change."""

    path: Path
    run_id: str
    endpoint: str
    shards: list[Shard] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def file(self, shard: Shard, kind: str) -> Path:
        """The shard's local files: ``input.jsonl``, ``rows.arrows``, ``output.jsonl``, ``errors.jsonl``."""
        return self.folder / f"shard-{shard.no:06d}.{kind}"

    def next_no(self) -> int:
        return max((s.no for s in self.shards), default=0) + 1

    def active(self) -> list[Shard]:
        return [s for s in self.shards if s.active]

    def save(self) -> None:
        """Durable before it returns: temporary file, fsync, atomic rename, fsync of the folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"version": STATE_VERSION, "run_id": self.run_id, "endpoint": self.endpoint,
                "shards": [asdict(s) for s in self.shards]}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.folder)


def state_path(state_dir: Path) -> Path:
    return state_dir / "batch" / "state.json"


def load_state(state_dir: Path, endpoint: str) -> BatchState:
    """The output's batch state, or a new one (with a new run id, used in every ``ds_name``)."""
    path = state_path(state_dir)
    if not path.exists():
        return BatchState(path, uuid.uuid4().hex[:12], endpoint)
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    shards = [Shard(**s) for s in raw.get("shards", [])]
    return BatchState(path, raw["run_id"], raw.get("endpoint", endpoint), shards)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
