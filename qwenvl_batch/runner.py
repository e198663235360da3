"""The run's lifecycle: plan → reader → bounded queue → fixed pool of workers → one writer, under one supervisor.

* **Plan** (planning.py, before anything is sent): ids checked, rows already done looked up, a bitmask of the
  rows to do.
* **Reader**: streams the manifest again and puts the rows to do into a queue of ``2 × concurrency`` items, so
  memory stays bounded whatever the manifest size.
* **Workers** (worker.py, ``concurrency`` of them): prepare images, wait for the rate limiter, send with
  retries, hand the result row to the writer.
* **Writer** (store.ResultWriter, its own thread): journal first, Parquet parts later.

Every stage runs under the supervisor here: a failure in any of them (a manifest that cannot be read part-way,
a writer that hits a full disk, a bug) stops dispatching at once, lets the requests in flight finish
(``grace_s``), commits what arrived, and ends the run with a message naming the stage. A job-level error (bad
key, quota, spend cap, Ctrl-C) does the same. The rows not done stay pending and a re-run continues from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .client import ChatClient
from .config import JobConfig
from .currency import committed_spend
from .errors import ConfigError, Interrupted, JobError
from .health import JobHealth
from .limits import ByteBudget, Limiter, SpendMeter
from .manifest import BATCH_ROWS, limited_batches
from .planning import JobSetup, Plan, open_job, plan_rows
from .pricing import PriceTable
from .progress import Counters, Progress
from .prompt import PromptTokens, fingerprint_hex
from .results import ResultRows
from .store import OutputStore, ResultWriter, ResumeIndex, WriterFailed
from .structured import RepairTally
from .worker import Item, RowWorker

log = logging.getLogger(__name__)


REINDEX_ROWS = 100_000  # rows read from parts the persisted index did not cover that make it worth writing at once


class StageFailed(JobError):
    """A stage of the pipeline (reader, worker, writer) failed; the run stopped and committed what was done."""


@dataclass
class RunSummary:
    """The outcome of one run, as the CLI prints it and a notebook inspects it."""

    output: Path
    rows: int
    to_do: int
    ok: int
    errors: int
    skipped_ok: int
    skipped_error: int
    pending: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    currency: str | None
    wall_s: float
    retries: dict[str, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None
    simulated: bool = False
    unpriced_model: str | None = None
    retried_errors: int = 0
    usage_estimated: int = 0  # rows whose server reported no usage (tokens and cost are the runner's estimate)
    warnings: dict[str, int] = field(default_factory=dict)
    structured: str | None = None  # [output.schema]: parse errors, repairs and their cost

    def lines(self) -> list[str]:
        """The end-of-run summary, a few lines a person reads."""
        out = [
            (f"rows: {self.ok:,} ok, {self.errors:,} error, {self.pending:,} pending — this run; "
             f"{self.rows:,} in the manifest"),
        ]
        if self.skipped_ok or self.skipped_error:
            line = f"already done before this run: {self.skipped_ok:,} ok (skipped)"
            if self.skipped_error:
                line += f", {self.skipped_error:,} kept as error (add --retry-failed to send them again)"
            out.append(line)
        out.append(f"tokens: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion")
        if self.cost is not None:
            out.append(f"cost this run: {self.cost:.4f} {self.currency or ''}".rstrip())
        elif self.unpriced_model:
            out.append(f"cost: no price known for model {self.unpriced_model!r} (see README 'Cost')")
        if self.structured:
            out.append(self.structured)
        if self.usage_estimated:
            out.append(f"usage not reported for {self.usage_estimated:,} rows: their tokens and cost are the "
                       "runner's estimate (usage_source = 'estimate')")
        if self.warnings:
            out.append("warnings: " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.warnings.items())))
        if self.retries:
            out.append("retries: " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.retries.items())))
        if self.error_types:
            out.append("errors by type: " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.error_types.items())))
        out.append(f"wall time: {self.wall_s:,.1f} s")
        out.append(f"output: {self.output}" + ("  (SIMULATED answers, not the real service)" if self.simulated else ""))
        return out


class JobRun:
    """One run of one job; ``run()`` returns a RunSummary or raises JobError (after committing what is done).

    Creating it checks everything that can be refused (ConfigError) and creates nothing.
    """

    def __init__(self, job: JobConfig, *, base_url: str | None = None, prices: PriceTable | None = None,
                 setup: JobSetup | None = None) -> None:
        self.base_url = base_url
        self.setup = setup or open_job(job, prices)
        self.job = self.setup.job  # as sent: with [output.schema], its prompt and response_format (structured.py)
        self.structured = self.setup.structured
        self.repair_tally = RepairTally()
        self.manifest = self.setup.manifest
        self.renderer = self.setup.renderer
        self.store = self.setup.store
        self.price = self.setup.price
        self.rows = ResultRows(job.model.name, self.price, self.setup.image_columns)
        self.counters = Counters()
        self.health: JobHealth[dict[str, Any]] = JobHealth()  # systematic failures stop the job, not the rows
        self.usage_estimated_rows = 0
        self.warning_counts: dict[str, int] = {}
        self._manifest_identity: tuple[int, int, int] | None = None
        self._stop_reason: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._hard_stop = False
        self.resize = job.resize_policy()
        self.prompt_tokens = PromptTokens(job)
        self.spend = SpendMeter(job.limits.max_cost)
        self.image_bytes = ByteBudget(int(job.limits.max_inflight_mb * 1024 * 1024))
        # Decoding and resizing a 24 MP scan takes ~100 MB for a moment: a few at a time, not one per worker.
        self.preparing = asyncio.Semaphore(max(2, os.cpu_count() or 2))

    # -- the run --------------------------------------------------------------------------------------------
    async def run(self) -> RunSummary:
        """Plan, dispatch, commit; the output's lock is held from before recovery until the end."""
        started = time.monotonic()
        try:
            planned = plan_output(self.setup)
            plan, self._manifest_identity = planned.plan, planned.manifest_identity
            self.spend = SpendMeter(self.job.limits.max_cost, planned.committed)
            await self._execute(plan)
            return self._finish(plan, started)
        finally:
            self.store.unlock()

    async def _execute(self, plan: Plan) -> None:
        """Start the stages, supervise them, and always close what was opened (the writer commits)."""
        self._stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        client = ChatClient(self.job, api_key=self.job.api_key(), base_url=self.base_url)
        limiter = self.new_limiter()

        def on_writer_error(exc: BaseException) -> None:  # called from the writer's thread
            loop.call_soon_threadsafe(self._writer_failed, writer)

        writer = self.store.writer(on_error=on_writer_error)
        writer.start()  # from here on, the finally below closes it (and with it, commits)
        progress = Progress(plan.to_do, self.counters, mode=self.job.run.progress)
        self.counters.prior_cost = self.spend.committed
        self.counters.to_do = plan.to_do
        self.counters.currency = self.price.currency if self.price else ""
        # Everything alive now (imported modules, the plan) lives for the whole run: keep it out of the cyclic
        # collector, whose full passes over it stalled the event loop for ~100 ms at a time (benchmarks/run.py).
        # Undone at the end: a notebook runs many jobs in one process.
        gc.freeze()
        try:
            with self._signals():
                worker = RowWorker(self, client, limiter, writer, progress)
                await self._dispatch(plan, worker)
                if self._stop_reason is None:
                    for held in self.health.flush():  # a streak of identical errors that never became systematic
                        worker.record(held)
        except asyncio.CancelledError:
            if not self._hard_stop:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # a second Ctrl-C: skip the grace period, still commit below
        finally:
            gc.unfreeze()
            progress.close()
            await client.close()
            try:
                writer.close()
            except WriterFailed as exc:
                self._stop_reason = exc  # the final count of answers that could not be stored
                self._stop_event.set()
                self.counters.ok -= writer.lost.get("ok", 0)  # the summary counts stored rows only
                self.counters.errors -= sum(n for status, n in writer.lost.items() if status != "ok")

    def new_limiter(self) -> Limiter:
        """This run's admission control; a sharded run (qwenvl_batch.ray) returns one that a cluster shares."""
        return Limiter(requests_per_minute=self.job.limits.requests_per_minute,
                       tokens_per_minute=self.job.limits.tokens_per_minute)

    def _writer_failed(self, writer: ResultWriter) -> None:
        self.stop(writer.failure())

    def _finish(self, plan: Plan, started: float) -> RunSummary:
        close_output(self.store, plan, stopped=self._stop_reason, done=self.counters.done)
        summary = self._summary(plan, started)
        if self._stop_reason is not None:
            if isinstance(self._stop_reason, JobError):
                self._stop_reason.summary = summary
            raise self._stop_reason
        return summary

    async def _dispatch(self, plan: Plan, worker: RowWorker) -> None:
        """Supervise the reader and the workers until all rows are done or the run stops."""
        concurrency = self.job.limits.concurrency
        queue: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=2 * concurrency)
        feeder = asyncio.create_task(self._guard("reader", self._feed(plan, queue)))
        tasks = [asyncio.create_task(self._guard("worker", worker.loop(queue))) for _ in range(concurrency)]
        assert self._stop_event is not None
        stop_wait = asyncio.create_task(self._stop_event.wait())
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while pending and not self._stop_event.is_set():
                _, pending = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop_wait)
            if self._stop_event.is_set():
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
                _release_idle_workers(queue, concurrency)
                if self.job.limits.grace_s:
                    await asyncio.wait(tasks, timeout=self.job.limits.grace_s)
        finally:  # whatever is still running now (past the grace period, or a second Ctrl-C) is cancelled
            children = [feeder, stop_wait, *tasks]
            for task in children:
                task.cancel()
            await asyncio.gather(*children, return_exceptions=True)

    async def _guard(self, stage: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one stage; whatever it raises stops the run (with a message naming the stage) instead of
        leaving the other stages waiting on it."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except JobError as exc:
            self.stop(exc)
        except ConfigError as exc:
            self.stop(StageFailed(f"The {stage} stopped the run: {exc}. Results so far are committed; fix the "
                                  "cause and run again to continue"))
        except Exception as exc:
            log.debug("%s failed", stage, exc_info=True)
            self.stop(StageFailed(f"The {stage} failed unexpectedly ({type(exc).__name__}: {exc}). Results so far "
                                  "are committed; run again with -v for details (and please report it)"))

    async def _feed(self, plan: Plan, queue: asyncio.Queue[Item | None]) -> None:
        """Reader: the rows to do, in manifest order, into the bounded queue (batch reads happen in a thread)."""
        assert self._stop_event is not None
        batches: Iterator[pa.RecordBatch] = limited_batches(self.manifest, self.job.run.limit)
        position = 0
        while not self._stop_event.is_set():
            try:
                batch = await asyncio.to_thread(next, batches, None)
                self._check_manifest_unchanged()  # after the read: rows read from a changed file are never sent
                if batch is None:
                    break
                todo, fingerprints = self._rows_to_do(plan, batch, position)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"{self.manifest.path}: cannot read rows {position + 1:,}–"
                                  f"{position + BATCH_ROWS:,} ({type(exc).__name__}: {exc})") from exc
            position += batch.num_rows
            for row, fingerprint in zip(todo, fingerprints, strict=True):
                await queue.put((row, fingerprint))
        for _ in range(self.job.limits.concurrency):
            await queue.put(None)

    def _check_manifest_unchanged(self) -> None:
        """The plan is a bitmask over the manifest as it was read: a file replaced or edited since must not be
        dispatched against it (done rows would be re-sent, others skipped)."""
        if _identity(self.manifest.path) != self._manifest_identity:
            raise ConfigError(f"{self.manifest.path} changed while the job was running (it was planned against "
                              "the earlier file); run again to plan against the new one")

    def _rows_to_do(self, plan: Plan, batch: pa.RecordBatch, position: int) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows of this batch that the plan marked, as dicts, with their fingerprints."""
        mask = plan.todo[position: position + batch.num_rows]
        idx = np.nonzero(mask)[0]
        if not len(idx):
            return [], []
        todo = batch.take(pa.array(idx))
        return todo.to_pylist(), list(fingerprint_hex(self.renderer.fingerprints(todo)))

    def stop(self, reason: BaseException) -> None:
        """Stop dispatching: the first reason wins (it is what the user is told)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._stop_event is not None:
            self._stop_event.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event is not None and self._stop_event.is_set()

    async def wait_stopped(self) -> None:
        """Returns when the run starts stopping (for sleeps that should end early)."""
        assert self._stop_event is not None
        await self._stop_event.wait()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM: stop dispatching, let in-flight requests finish (grace period), commit, exit."""
        first_signal: list[int] = []
        main_task = asyncio.current_task()

        def on_signal(signum: int) -> None:
            if first_signal:
                # A second Ctrl-C: give up on the grace period; what is committed stays intact.
                self._hard_stop = True
                if main_task is not None:
                    main_task.cancel()
                return
            first_signal.append(signum)
            self.interrupt(signum)

        with stop_signals(on_signal):
            yield

    def interrupt(self, signum: int = int(signal.SIGINT)) -> None:
        """Stop as Ctrl-C does (also from a notebook's KeyboardInterrupt, via the loop's thread)."""
        name = signal.Signals(signum).name
        self.stop(Interrupted(f"Interrupted ({name}); results so far are committed.", signum=signum))

    def _summary(self, plan: Plan, started: float) -> RunSummary:
        counters = self.counters
        return RunSummary(
            output=self.job.output.path.resolve(),
            rows=plan.rows,
            to_do=plan.to_do,
            ok=counters.ok,
            errors=counters.errors,
            skipped_ok=plan.skipped_ok,
            skipped_error=plan.skipped_error,
            pending=plan.to_do - counters.done,
            prompt_tokens=counters.prompt_tokens,
            completion_tokens=counters.completion_tokens,
            cost=counters.cost if self.price else None,
            currency=self.price.currency if self.price else None,
            wall_s=time.monotonic() - started,
            retries=dict(counters.retry_reasons),
            error_types=dict(counters.error_types),
            stopped=str(self._stop_reason) if self._stop_reason else None,
            simulated=self.job.run.simulate,
            unpriced_model=None if self.price else self.job.model.name,
            retried_errors=plan.retried_errors,
            usage_estimated=self.usage_estimated_rows,
            warnings=dict(self.warning_counts),
            structured=self.repair_tally.line(self.structured, self.price.currency if self.price else None)
            if self.structured else None,
        )


@contextlib.contextmanager
def stop_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """SIGINT/SIGTERM → ``handler(signum)`` on the running loop while inside; installed only where the loop can
    (the main thread, not Windows): elsewhere the caller forwards them (api._run_in_thread)."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for signum in (int(signal.SIGINT), int(signal.SIGTERM)):
        try:
            loop.add_signal_handler(signum, handler, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


@dataclass
class Planned:
    """What plan_output decided: the plan, the spend already committed, the manifest file as planned."""

    plan: Plan
    committed: float
    manifest_identity: tuple[int, int, int] | None


def plan_output(setup: JobSetup, before_recovery: Callable[[OutputStore], None] | None = None) -> Planned:
    """Lock the output, recover what a crash left, plan the rows and create the output (one process, or a sharded
    run's driver). The lock comes before recovery, which folds journals another live run may be writing;
    ``before_recovery`` runs under it (a sharded run waits there for the workers of a dead driver)."""
    store, job = setup.store, setup.job
    if store.exists():
        store.lock()
        if before_recovery is not None:
            before_recovery(store)
    store.recover()
    index = store.resume_index()
    identity = _identity(setup.manifest.path)
    plan = plan_rows(job, setup.manifest, setup.renderer, index)
    committed = committed_spend(index.committed_costs, setup.price.currency if setup.price else None,
                                output=job.output.path, capped=job.limits.max_cost is not None)
    store.create()
    index_planned(store, index, plan)
    del index  # at 10^7 rows ~100 MB of mapped index: not needed while sending
    release_unused_memory()
    return Planned(plan, committed, identity)


def index_planned(store: OutputStore, index: ResumeIndex, plan: Plan) -> None:
    """After planning: persist an index that had to be rebuilt (or that many rows were added to) at once, not
    only at the end, so a run killed while sending does not pay the rebuild again on its next start."""
    if len(index.recent) >= REINDEX_ROWS:
        store.save_resume_index(index, stamp=plan.stamp if plan.changed == 0 else None)


def close_output(store: OutputStore, plan: Plan, *, stopped: BaseException | None, done: int) -> None:
    """The end of a run (one process, or a sharded run's driver): compact and index a finished output; index a
    stopped one all the same, so the next start is fast (not after a failed disk write: nothing more is written).

    The persisted index vouches for fingerprints only when every row in it was checked or sent with them."""
    complete = stopped is None and plan.to_do == done
    stamp = plan.stamp if plan.changed == 0 or complete else None
    if stopped is None:
        store.finalize(stamp=stamp)
    elif not isinstance(stopped, WriterFailed):
        store.save_resume_index(stamp=stamp)


def release_unused_memory() -> None:
    """Give back what the plan pass freed but the allocators keep (Arrow's pool, glibc's heap): at 10^7 rows the
    pass leaves ~60 MB of freed pages that the whole run would otherwise carry. Best effort: a no-op elsewhere."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Size, modification time and inode: what changes when a file is edited or replaced."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _release_idle_workers(queue: asyncio.Queue[Item | None], workers: int) -> None:
    """Drop the rows still queued (they stay pending) and wake every idle worker with the end marker."""
    while not queue.empty():
        queue.get_nowait()
    for _ in range(workers):
        queue.put_nowait(None)
