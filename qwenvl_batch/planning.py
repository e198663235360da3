"""Planning: everything that can refuse a job is checked here, before any request, file, folder or thread exists.

``run`` and ``estimate`` share it, so they agree on what a job will do: the manifest's columns and ids, the
prompt's fields, the price, the output folder (its owner, its columns, its rows already done), and — for a
real run — the API key. The plan itself is one streamed pass over the manifest: every id is hashed (duplicates
and empty ids stop the job here), looked up in what the output already holds, and for rows already done the
fingerprint of what would be sent now is compared with what was sent then. The result is a bitmask of the rows
to do (one byte per row), so the dispatch pass never re-derives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import JobConfig
from .currency import check_cap_currency
from .documents import for_documents
from .errors import ConfigError
from .manifest import (
    IdTracker,
    Manifest,
    id_strings,
    limited_batches,
    open_manifest,
    require_columns,
)
from .media import redacted_columns, stored_schema
from .pricing import ModelPrice, PriceTable
from .prompt import RowRenderer
from .store import OutputStore, ResumeIndex, output_schema
from .structured import Structured, resolve, sending_job


@dataclass
class Plan:
    """What this run will do, decided before anything is sent."""

    rows: int
    todo: np.ndarray
    skipped_ok: int = 0
    skipped_error: int = 0
    retried_errors: int = 0
    changed: int = 0
    simulated: int = 0  # rows already in the output that the simulator answered

    @property
    def to_do(self) -> int:
        return int(self.todo.sum())


@dataclass
class JobSetup:
    """A job checked and opened: its manifest, renderer, output store and price (nothing written yet)."""

    job: JobConfig
    manifest: Manifest
    renderer: RowRenderer
    store: OutputStore
    price: ModelPrice | None
    image_columns: list[str] = field(default_factory=list)
    structured: Structured | None = None  # [output.schema]; ``job`` is then the job as sent (structured.py)


def open_job(job: JobConfig, prices: PriceTable | None = None, *, sending: bool = True) -> JobSetup:
    """Open and check everything a run needs; raises ConfigError (and creates nothing) when any of it is wrong.

    ``sending=False`` (estimate) skips the API key and spend-cap checks: nothing will be sent.
    """
    structured = resolve(job)  # a schema that cannot be used, or a mode the model refuses: refused here
    job = sending_job(job, structured)
    manifest = open_manifest(job.input.path, job.input.format)
    job, manifest = for_documents(job, manifest)  # issue 12: [documents] → page rows keyed by page_id
    require_columns(manifest, job.input.id_column, job.input.image_columns)
    renderer = RowRenderer(job, manifest.columns, manifest.root)  # a folder input resolves in the folder
    answer_fields = structured.answer_fields() if structured else []
    # image columns, and any column carrying bytes, are stored as short text references (never the bytes)
    image_columns = redacted_columns(manifest.schema, job.input.image_columns)
    stored = stored_schema(manifest.schema, image_columns)
    store = OutputStore(job.output.path, output_schema(stored, answer_fields), job.input.id_column,
                        simulated=job.run.simulate)
    store.check_writable()
    price = (prices or job.price_table()).lookup(job.model.name, job.model.region)
    if sending:
        job.api_key()  # raises a ConfigError naming the variable when the key is missing
        if job.limits.max_cost is not None and price is None:
            raise ConfigError(
                f"[limits] max_cost is set, but no price is known for model {job.model.name!r}, so spend cannot be "
                "capped; add its price with [pricing] file / --prices FILE (see README 'Cost')"
            )
    check_cap_currency(job, price)  # a cap stated in another currency than the price's: refused
    return JobSetup(job, manifest, renderer, store, price, image_columns, structured)


def plan_rows(job: JobConfig, manifest: Manifest, renderer: RowRenderer, index: ResumeIndex) -> Plan:
    """Check every id and decide which rows to send; raises ConfigError before anything is spent."""
    id_column = job.input.id_column
    tracker = IdTracker()
    masks: list[np.ndarray] = []
    plan = Plan(rows=0, todo=np.empty(0, bool), simulated=index.simulated)
    for batch in limited_batches(manifest, job.run.limit):
        hashes = tracker.add(id_strings(batch.column(id_column)))
        found, ok, committed = index.lookup(hashes)
        todo = ~found
        if found.any():
            todo |= _redo_mask(job, batch, renderer, found, ok, committed, plan)
        masks.append(todo)
    check = tracker.result(manifest, id_column, job.run.limit)
    _refuse_bad_ids(job, check.empty_rows, check.duplicates)
    plan.rows = check.rows
    plan.todo = np.concatenate(masks) if masks else np.empty(0, bool)
    _refuse_changed(job, plan)
    return plan


def _refuse_changed(job: JobConfig, plan: Plan) -> None:
    """Rows done with other settings are never silently kept or silently re-bought: the user chooses."""
    if not plan.changed or job.run.rerun_changed:
        return
    if plan.simulated and not job.run.simulate:
        raise ConfigError(
            f"{job.output.path} holds {plan.simulated:,} row(s) answered by the built-in SIMULATOR (--simulate), "
            "not by the real service. Nothing was sent.\n"
            "  - to replace them with real answers (they are paid for): add --rerun-changed\n"
            "  - to keep the simulated output apart: choose a new output path (--output PATH)"
        )
    raise ConfigError(
        f"{plan.changed:,} row(s) already in {job.output.path} were made with different settings than this job "
        "would use now (model, endpoint, parameters, prompt or images changed). Nothing was sent.\n"
        f"  - to redo just those {plan.changed:,} rows (they are paid for again): add --rerun-changed\n"
        "  - to keep them and start fresh elsewhere: choose a new output path (--output PATH)"
    )


def _redo_mask(job: JobConfig, batch: pa.RecordBatch, renderer: RowRenderer, found: np.ndarray, ok: np.ndarray,
               committed: np.ndarray, plan: Plan) -> np.ndarray:
    """For rows already in the output: which to send again (--retry-failed, --rerun-changed); counts the rest."""
    idx = np.nonzero(found)[0]
    changed = renderer.fingerprints(batch.take(pa.array(idx))) != committed[idx]
    failed = ~ok[idx]
    redo = (changed & job.run.rerun_changed) | (failed & job.run.retry_failed)
    plan.changed += int(changed.sum())
    plan.retried_errors += int((failed & redo).sum())
    plan.skipped_ok += int((~failed & ~redo).sum())
    plan.skipped_error += int((failed & ~redo).sum())
    mask = np.zeros(len(found), bool)
    mask[idx[redo]] = True
    return mask


def _refuse_bad_ids(job: JobConfig, empty_rows: list[int], duplicates: list[str]) -> None:
    where = f"{job.input.path} (id column {job.input.id_column!r})"
    if empty_rows:
        rows = ", ".join(str(r + 2 if Path(job.input.path).suffix.lower() == ".csv" else r + 1) for r in empty_rows)
        raise ConfigError(f"{where}: empty id on row(s) {rows}; every row needs a unique id. Nothing was sent.")
    if duplicates:
        raise ConfigError(
            f"{where}: duplicate ids, e.g. {', '.join(repr(d) for d in duplicates)}; ids must be unique so that "
            "each row's result can be found and resumed. Nothing was sent."
        )
