"""Planning: everything that can refuse a job is checked here, before any request, file, folder or thread exists.

``run`` and ``estimate`` share it, so they agree on what a job will do: the manifest's columns and ids, the
prompt's fields, the price, the output folder (its owner, its columns, its rows already done), and — for a
real run — the API key. The plan itself is one streamed pass over the manifest's id and fingerprint columns:
every id is hashed (duplicates and empty ids stop the job here), looked up in what the output already holds (the
resume index, store.py), and for rows already done the fingerprint of what would be sent now is compared with
what was sent then — unless the persisted index vouches for it (``fingerprint_stamp``). The result is a bitmask
of the rows to do (one byte per row), so the dispatch pass never re-derives it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

import numpy as np
import pyarrow as pa

from .config import JobConfig
from .currency import check_cap_currency
from .documents import for_documents
from .errors import ConfigError
from .manifest import (
    IdTracker,
    Manifest,
    empty_ids,
    hash_ids,
    id_strings,
    limited_batches,
    open_manifest,
    require_columns,
)
from .media import redacted_columns, stored_schema
from .pricing import ModelPrice, PriceTable
from .prompt import RowRenderer
from .store import Located, OutputStore, ResumeIndex, output_schema
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
    stamp: str | None = None  # fingerprint_stamp of this manifest and job (None with --limit: rows unchecked)

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
    """Check every id and decide which rows to send; raises ConfigError before anything is spent.

    Reads only the id and the columns fingerprints are made of. Duplicates among rows already in the output are
    found by their index entry (a byte per entry), so only the hashes of rows not yet done are kept for the sort.
    When the persisted index vouches for the fingerprints of its rows (``stamp``: the same manifest file and the
    same settings), those rows' fingerprints are not recomputed; rows added since are always checked.
    """
    id_column = job.input.id_column
    stamp = fingerprint_stamp(manifest, renderer) if job.run.limit is None else None
    vouched = stamp is not None and stamp == index.stamp
    tracker = IdTracker()
    seen = np.zeros(index.slots, bool)
    masks: list[np.ndarray] = []
    plan = Plan(rows=0, todo=np.empty(0, bool), simulated=index.simulated, stamp=stamp)
    columns = list(dict.fromkeys([id_column, *renderer.fingerprint_columns]))
    for batch in limited_batches(manifest, job.run.limit, columns):
        column = batch.column(id_column)
        ids = id_strings(column)
        hashes = hash_ids(ids)
        located = index.locate(hashes)
        tracker.add(ids, hashes, retain=~located.found, empty=empty_ids(column))
        tracker.add_duplicates(_seen_again(seen, located, hashes))
        todo = ~located.found
        if located.found.any():
            todo |= _redo_mask(job, batch, renderer, located, vouched, plan)
        masks.append(todo)
    del seen
    check = tracker.result(manifest, id_column, job.run.limit)
    _refuse_bad_ids(job, check.empty_rows, check.duplicates)
    plan.rows = check.rows
    plan.todo = np.concatenate(masks) if masks else np.empty(0, bool)
    _refuse_changed(job, plan)
    return plan


def fingerprint_stamp(manifest: Manifest, renderer: RowRenderer) -> str | None:
    """What a row's fingerprint depends on, besides the row: the manifest file(s) exactly as they are (path,
    device, inode, size, modification and change times: an edit, a copy or a replacement changes it) and the
    job's settings. None where rows depend on more than the files (a folder of images, document pages)."""
    if type(manifest) is not Manifest or manifest.format == "images":
        return None
    described = []
    for path in manifest.paths or (manifest.path,):
        try:
            stat = Path(path).stat()
        except OSError:
            return None
        if not S_ISREG(stat.st_mode):
            return None
        described.append([str(Path(path).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
                          stat.st_ctime_ns])
    text = json.dumps({"files": described, "root": str(manifest.root), "settings": renderer.settings_key,
                       "columns": renderer.fingerprint_columns})
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _seen_again(seen: np.ndarray, located: Located, hashes: np.ndarray) -> np.ndarray:
    """Hashes of rows already in the output whose entry an earlier row (or one before it here) already took:
    duplicate ids. Marks this batch's entries as taken."""
    slots = located.slots[located.found]
    again = seen[slots]
    ordered = np.sort(slots)
    if not (ordered[1:] == ordered[:-1]).any():  # the usual case: no id twice in this batch
        seen[slots] = True
        return hashes[located.found][again]
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    repeat = np.zeros(len(slots), bool)
    repeat[1:] = ordered[1:] == ordered[:-1]
    again[order[repeat]] = True
    seen[slots] = True
    return hashes[located.found][again]


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


def _redo_mask(job: JobConfig, batch: pa.RecordBatch, renderer: RowRenderer, located: Located, vouched: bool,
               plan: Plan) -> np.ndarray:
    """For rows already in the output: which to send again (--retry-failed, --rerun-changed); counts the rest."""
    found = located.found
    idx = np.nonzero(found)[0]
    check = ~located.vouched[idx] if vouched else np.ones(len(idx), bool)
    changed = np.zeros(len(idx), bool)
    if check.any():
        rows = idx[check]
        changed[check] = renderer.fingerprints(batch.take(pa.array(rows))) != located.fingerprints(rows)
    failed = ~located.ok[idx]
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
