"""``qwenvl-batch batches OUT``: the output's batches from its state file (live from the provider when it can be
reached), and ``--cancel``; plus the ``batch-chat`` settings."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import openai

from ..config import JobConfig
from ..errors import ConfigError
from ..store import state_dir_for
from .backend import BatchBackend
from .rules import DASHSCOPE, TERMINAL
from .state import BatchState, load_state, state_path

BATCH_CHAT_TIMEOUT_S = 3600.0  # the Batch Chat host queues a request for up to an hour (facts §1.1 [B3])
BATCH_CHAT_CONCURRENCY = 256  # many requests may wait in its queue at once


def batch_chat_job(job: JobConfig) -> JobConfig:
    """``mode = "batch-chat"``: Beijing only; a per-request timeout of an hour (a shorter one cannot work, the
    server queues); a high concurrency unless the job file sets one."""
    if job.model.mode != "batch-chat" or job.model.base_url:
        return job
    if job.model.region not in (None, "cn"):
        raise ConfigError(f"{job.job_file or 'job'}: mode = \"batch-chat\" is offered in the Beijing region only "
                          f"(region = \"cn\" and a Beijing API key), not region = {job.model.region!r}")
    update: dict[str, object] = {"timeout_s": max(job.limits.timeout_s, BATCH_CHAT_TIMEOUT_S)}
    if "concurrency" not in job.limits.model_fields_set:
        update["concurrency"] = BATCH_CHAT_CONCURRENCY
    return job.model_copy(update={"limits": job.limits.model_copy(update=update),
                                  "model": job.model.model_copy(update={"region": "cn"})})


@dataclass
class BatchLine:
    """One batch as ``batches OUT`` shows it."""

    shard: int
    batch_id: str | None
    state: str
    status: str | None
    lines: int
    completed: int
    failed: int
    note: str = ""

    def text(self) -> str:
        return (f"shard {self.shard:>4}  {self.batch_id or '-':<44} {self.status or '-':<11} "
                f"{self.completed + self.failed:>7,}/{self.lines:<7,} done ({self.failed:,} failed)  "
                f"[{self.state}]{'  ' + self.note if self.note else ''}")


def _open(output: str | Path) -> BatchState:
    path = state_path(state_dir_for(Path(output)))
    if not path.exists():
        raise ConfigError(f"{output}: no batches recorded ({path} does not exist); was it run with mode = \"batch\"?")
    return load_state(path.parent.parent, "")


def _backend(state: BatchState, api_key_env: str) -> BatchBackend | None:
    key = os.environ.get(api_key_env, "").strip()
    return BatchBackend(state.endpoint, key, DASHSCOPE, timeout_s=10.0) if key else None


async def _live(state: BatchState, backend: BatchBackend | None, cancel: bool) -> list[BatchLine]:
    rows = []
    for shard in state.shards:
        line = BatchLine(shard.no, shard.batch_id, shard.state, shard.status, shard.lines, shard.completed,
                         shard.failed)
        if backend is not None and shard.batch_id and shard.status not in TERMINAL:
            try:
                batch = await (backend.cancel(shard.batch_id) if cancel else backend.retrieve(shard.batch_id))
                counts = batch.request_counts
                line.status = batch.status
                if counts is not None:
                    line.completed, line.failed = counts.completed, counts.failed
                line.note = "cancel requested" if cancel else "live"
            except openai.APIError as exc:
                line.note = f"recorded state; provider: {type(exc).__name__}"
        rows.append(line)
    return rows


def list_batches(output: str | Path, *, api_key_env: str = "DASHSCOPE_API_KEY") -> list[BatchLine]:
    """The output's batches: recorded state, refreshed from the provider when a key is set and it answers."""
    state = _open(output)
    return asyncio.run(_with_backend(state, api_key_env, cancel=False))


def cancel_batches(output: str | Path, *, api_key_env: str = "DASHSCOPE_API_KEY") -> list[BatchLine]:
    """Cancel every batch of the output that is not finished; lines already answered are still billed."""
    state = _open(output)
    if not os.environ.get(api_key_env, "").strip():
        raise ConfigError(f"cancelling needs the API key: set {api_key_env} (or --api-key-env NAME)")
    return asyncio.run(_with_backend(state, api_key_env, cancel=True))


async def _with_backend(state: BatchState, api_key_env: str, *, cancel: bool) -> list[BatchLine]:
    backend = _backend(state, api_key_env)
    try:
        return await _live(state, backend, cancel)
    finally:
        if backend is not None:
            await backend.close()
