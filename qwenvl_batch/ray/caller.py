"""``QwenVLCaller``: the runner's request path as an async callable class for ``ray.data.Dataset.map_batches``.

For people who already have a Ray Data pipeline (read → filter → caption → write). Each batch of rows gets the
same treatment as in a run: images checked, resized and encoded, the prompt rendered, the shared rate limiter of
the cluster (limiter.py) waited for, retries with backoff and Retry-After, usage and cost; and it comes back as
the same batch with the same result columns as the runner's output (``status``, ``response``, tokens, ``cost``,
``error_type``/``error_message``...). A row's failure is an error row, never an exception, so one bad image cannot
fail the pipeline; a job-level failure (a bad key, an endpoint that never answers, the spend cap) raises
``JobError``, which stops the pipeline as it stops a run.

What it does not give you is the runner's per-row resume: rows are durable only when Ray Data writes their block.
Ray's own checkpointing (``DataContext.checkpoint_config``, beta) skips blocks already written on a re-run, so a
crash re-pays the rows answered but not yet written (measured: 14 % of requests after a ``kill -9``). Use
``qwenvl-batch run JOB --ray`` (shards.py) when that matters.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from pathlib import Path
from typing import Any, TypeAlias, cast

import pandas as pd
import pyarrow as pa

from qwenvl_batch.api import resolve_job
from qwenvl_batch.client import ChatClient
from qwenvl_batch.config import JobConfig
from qwenvl_batch.errors import ConfigError, JobError
from qwenvl_batch.manifest import require_columns
from qwenvl_batch.media import redacted_columns, stored_schema
from qwenvl_batch.planning import JobSetup
from qwenvl_batch.progress import Progress
from qwenvl_batch.prompt import RowRenderer, fingerprint_hex
from qwenvl_batch.ray.limiter import NAMESPACE, RemoteLimiter, shared_limiter
from qwenvl_batch.ray.spend import LeasedSpend, SpendLedger
from qwenvl_batch.runner import JobRun
from qwenvl_batch.store import OutputStore, output_schema
from qwenvl_batch.structured import resolve, sending_job
from qwenvl_batch.worker import RowWorker

Batch: TypeAlias = pa.Table | pd.DataFrame | dict[str, Any]


class QwenVLCaller:
    """``ds.map_batches(QwenVLCaller, fn_constructor_kwargs={"job": "jobs/caption.toml"}, batch_size=32,
    compute=ray.data.ActorPoolStrategy(size=4))``: each batch back with the runner's result columns added.

    ``job``: a job file or a JobConfig (its ``[model]``, ``[prompt]``, ``[limits]`` and ``[images]`` apply; its
    ``[input] id_column`` and ``image_columns`` name the batch's columns; relative image paths resolve against
    the folder of ``[input] path``). ``workers``: how many of these actors share the limiter (sizes its batches).
    ``base_url`` overrides the job's endpoint. ``[limits] max_cost`` holds across every actor of the pipeline
    (a ledger actor per output path), counting from the pipeline's start.
    """

    def __init__(self, job: JobConfig | str | Path, *, workers: int = 1, base_url: str | None = None) -> None:
        self.job = resolve_job(job, {})
        if self.job.documents is not None:
            raise ConfigError("QwenVLCaller takes image rows; a [documents] job (PDF/TIFF pages) runs with "
                              "qwenvl-batch run JOB --ray")
        self.base_url = base_url
        self.workers = workers
        self._run: JobRun | None = None
        self._worker: RowWorker | None = None
        self._schema: pa.Schema | None = None
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, batch: Batch) -> Batch:
        table = _as_table(batch)
        worker = self._open(table.schema)
        assert self._slots is not None and self._run is not None
        fingerprints = fingerprint_hex(self._run.renderer.fingerprints(table))
        rows = table.to_pylist()
        worker = copy.copy(worker)  # a client per batch, closed with it (Ray Data has no teardown hook)
        worker.client = ChatClient(self._run.job, api_key=self._run.job.api_key(), base_url=self.base_url)
        try:
            results = await asyncio.gather(*(self._one(worker, row, fp) for row, fp in zip(rows, fingerprints)))
        finally:
            await worker.client.close()
        return _like(batch, pa.Table.from_pylist(results, schema=self._output_schema(table.schema)))

    async def _one(self, worker: RowWorker, row: dict[str, Any], fingerprint: str) -> dict[str, Any]:
        """One row; a failure that is the row's (anything but a job-level stop) becomes its error row."""
        assert self._slots is not None
        async with self._slots:
            try:
                result = await worker.process(dict(row))
            except JobError:
                raise
            except Exception as exc:  # noqa: BLE001 - one row must never fail the pipeline
                result = worker.rows.error(row, "client", type(exc).__name__, str(exc), attempts=1)
        if result is None:  # only when stopping, which a caller never does: keep the row visible
            result = worker.rows.error(row, "client", "not_sent", "the caller was stopping", attempts=0)
        result["fingerprint"] = fingerprint
        return result

    def _open(self, schema: pa.Schema) -> RowWorker:
        """The runner's pieces for this schema, built on the first batch (inside the actor's event loop)."""
        if self._worker is not None and self._schema is not None and schema.equals(self._schema):
            return self._worker
        job = self.job
        structured = resolve(job)
        job = sending_job(job, structured)
        require_columns(cast(Any, _Columns(schema)), job.input.id_column, job.input.image_columns)
        root = Path(job.input.path).parent
        renderer = RowRenderer(job, schema.names, root)
        image_columns = redacted_columns(schema, job.input.image_columns)
        answer = structured.answer_fields() if structured else []
        store = OutputStore(job.output.path, output_schema(stored_schema(schema, image_columns), answer),
                            job.input.id_column)
        price = job.price_table().lookup(job.model.name, job.model.region)
        setup = JobSetup(job, cast(Any, None), renderer, store, price, image_columns, structured)
        run = JobRun(job, base_url=self.base_url, setup=setup)
        run._stop_event = asyncio.Event()
        if job.limits.max_cost is not None:
            ledger = SpendLedger.options(name=f"qwenvl-spend:{_digest(str(job.output.path))}", namespace=NAMESPACE,
                                         get_if_exists=True).remote(job.limits.max_cost, 0.0, self.workers)
            run.spend = LeasedSpend(ledger, id(self), job.limits.max_cost, 0.0)
        limiter = RemoteLimiter(shared_limiter(job, self.base_url), workers=self.workers)
        job.api_key()  # a missing key: refused on the first batch, before any request
        self._worker = RowWorker(run, cast(Any, None), limiter, cast(Any, _Collected()),
                                 Progress(0, run.counters, mode="off"))  # the client: one per batch, __call__
        self._run, self._schema = run, schema
        self._slots = asyncio.Semaphore(job.limits.concurrency)
        return self._worker

    def _output_schema(self, schema: pa.Schema) -> pa.Schema:
        assert self._run is not None
        return self._run.store.schema


class _Columns:
    """What manifest.require_columns reads of a manifest: its column names."""

    def __init__(self, schema: pa.Schema) -> None:
        self.columns = list(schema.names)
        self.path = Path("<batch>")


class _Collected:
    """Where RowWorker.record puts a row it records itself (a paid row before a job-level stop)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def put(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


def _as_table(batch: Batch) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pd.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False)
    return pa.table({name: pa.array(list(values)) for name, values in batch.items()})


def _like(batch: Batch, table: pa.Table) -> Batch:
    """The result in the format the batch came in (pyarrow, pandas, or Ray's default dict of numpy arrays)."""
    if isinstance(batch, pa.Table):
        return table
    if isinstance(batch, pd.DataFrame):
        return table.to_pandas()
    return {name: column.to_numpy(zero_copy_only=False) for name, column in zip(table.column_names, table.columns)}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
