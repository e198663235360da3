"""The pipeline: plan → reader → bounded queue → fixed pool of workers → one writer.

* **Plan** (before anything is sent): one streamed pass over the manifest hashes every id (duplicates and
  empty ids stop the run here), looks each up in what the output already holds, and for rows already done
  compares the fingerprint of what would be sent now with what was sent then. The result is a bitmask of the
  rows to do (one byte per row), so the dispatch pass never re-derives it.
* **Reader**: streams the manifest again and puts the rows to do into a queue of ``2 × concurrency`` items:
  memory stays bounded whatever the manifest size.
* **Workers** (``concurrency`` of them): load and check the images (in a thread), wait for the rate limiter,
  send with retries (policy.py decides), and hand the result row to the writer.
* **Writer** (store.ResultWriter, its own thread): journal first, Parquet parts later.

A job-level failure (bad key, unknown model, Ctrl-C) stops dispatching at once: requests in flight get a grace
period, everything received is committed, the rest stays pending, and a re-run continues from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from . import tokens
from .client import ChatClient, Completion
from .config import JobConfig, is_stream_only
from .errors import ConfigError, InputRowError, Interrupted, JobError, SpendCapReached
from .limits import ByteBudget, Limiter, SpendMeter
from .manifest import IdTracker, Manifest, id_strings, limited_batches, open_manifest, require_columns
from .media import PreparedImage, ResizePolicy, prepare_image, redact_cell, redacted_columns, stored_schema
from .policy import Action, Decision, PartialResponseError, backoff_s, classify
from .pricing import ModelPrice, PriceTable, row_cost
from .progress import Counters, Progress
from .prompt import PromptTokens, RenderedRow, RowRenderer, build_messages, fingerprint_hex
from .store import OutputStore, ResumeIndex, ResultWriter, output_schema

log = logging.getLogger(__name__)

INLINE_PREPARE_BYTES = 256 * 1024  # images up to this size (base64) are prepared on the event loop
EXPECTED_COMPLETION_TOKENS = 256  # rate-limiter guess when max_tokens is unset; corrected by real usage
WORST_CASE_COMPLETION_TOKENS = 8192  # spend-cap worst case when max_tokens is unset (Qwen-VL's usual max output)
WORST_CASE_THINKING_TOKENS = 32768  # thinking is not bounded by max_tokens; thinking_budget bounds it when set


@dataclass
class Plan:
    """What this run will do, decided before anything is sent."""

    rows: int
    todo: np.ndarray
    skipped_ok: int = 0
    skipped_error: int = 0
    retried_errors: int = 0
    changed: int = 0

    @property
    def to_do(self) -> int:
        return int(self.todo.sum())


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

    def lines(self) -> list[str]:
        """The end-of-run summary, a few lines a person reads."""
        out = [
            f"rows: {self.ok:,} ok, {self.errors:,} error, {self.skipped_ok + self.skipped_error:,} skipped "
            f"(already done), {self.pending:,} pending — of {self.rows:,} in the manifest",
            f"tokens: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion",
        ]
        if self.cost is not None:
            out.append(f"cost this run: {self.cost:.4f} {self.currency or ''}".rstrip())
        elif self.unpriced_model:
            out.append(f"cost: no price known for model {self.unpriced_model!r} (see README 'Cost')")
        if self.retries:
            out.append("retries: " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.retries.items())))
        if self.error_types:
            out.append("errors by type: " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.error_types.items())))
        out.append(f"wall time: {self.wall_s:,.1f} s")
        out.append(f"output: {self.output}" + ("  (SIMULATED answers, not the real service)" if self.simulated else ""))
        return out


_Item = tuple[dict[str, Any], str]  # a manifest row to do and its fingerprint (hex)


class _Abandoned(Exception):
    """The run is stopping: leave this row pending instead of recording it."""


def plan_run(job: JobConfig, manifest: Manifest, renderer: RowRenderer, index: ResumeIndex) -> Plan:
    """Check every id and decide which rows to send; raises ConfigError before anything is spent."""
    id_column = job.input.id_column
    tracker = IdTracker()
    masks: list[np.ndarray] = []
    plan = Plan(rows=0, todo=np.empty(0, bool))
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
    if plan.changed and not job.run.rerun_changed:
        raise ConfigError(
            f"{plan.changed:,} row(s) already in {job.output.path} were made with different settings than this job "
            "would use now (model, endpoint, parameters, prompt or images changed). Nothing was sent.\n"
            f"  - to redo just those {plan.changed:,} rows (they are paid for again): add --rerun-changed\n"
            "  - to keep them and start fresh elsewhere: choose a new output path (--output PATH)"
        )
    return plan


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
        rows = ", ".join(str(r + 2 if job.input.path.suffix.lower() == ".csv" else r + 1) for r in empty_rows)
        raise ConfigError(f"{where}: empty id on row(s) {rows}; every row needs a unique id. Nothing was sent.")
    if duplicates:
        raise ConfigError(
            f"{where}: duplicate ids, e.g. {', '.join(repr(d) for d in duplicates)}; ids must be unique so that "
            "each row's result can be found and resumed. Nothing was sent."
        )


class JobRun:
    """One run of one job; ``run()`` returns a RunSummary or raises JobError (after committing what is done)."""

    def __init__(self, job: JobConfig, *, base_url: str | None = None, prices: PriceTable | None = None) -> None:
        self.job = job
        self.base_url = base_url
        self.manifest = open_manifest(job.input.path, job.input.format)
        require_columns(self.manifest, job.input.id_column, job.input.image_columns)
        self.renderer = RowRenderer(job, self.manifest.columns, self.manifest.root)  # issue 11: folder inputs
        # issue 11: image columns and any column carrying bytes are stored as short text references
        self._image_columns = redacted_columns(self.manifest.schema, job.input.image_columns)
        stored = stored_schema(self.manifest.schema, self._image_columns)
        self.store = OutputStore(job.output.path, output_schema(stored), job.input.id_column)
        self.price: ModelPrice | None = (prices or job.price_table()).lookup(job.model.name, job.model.region)
        if job.limits.max_cost is not None and self.price is None:
            raise ConfigError(
                f"[limits] max_cost is set, but no price is known for model {job.model.name!r}, so spend cannot be "
                "capped; add its price with [pricing] file / --prices FILE (see README 'Cost')"
            )
        self.counters = Counters()
        self._stop_reason: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._hard_stop = False
        self.resize = job.resize_policy()
        self.prompt_tokens = PromptTokens(job)
        # Decoding and resizing a 24 MP scan takes ~100 MB for a moment: a few at a time, not one per worker.
        self.preparing = asyncio.Semaphore(max(2, os.cpu_count() or 2))

    # -- the run --------------------------------------------------------------------------------------------
    async def run(self) -> RunSummary:
        started = time.monotonic()
        self.store.recover()
        index = self.store.resume_index()
        plan = plan_run(self.job, self.manifest, self.renderer, index)
        self.store.create()
        self._stop_event = asyncio.Event()
        writer = self.store.writer().start()
        progress = Progress(plan.to_do, self.counters, mode=self.job.run.progress)
        client = ChatClient(self.job, api_key=self.job.api_key(), base_url=self.base_url)
        limiter = Limiter(requests_per_minute=self.job.limits.requests_per_minute,
                          tokens_per_minute=self.job.limits.tokens_per_minute)
        self.spend = SpendMeter(self.job.limits.max_cost, index.committed_cost)
        self.image_bytes = ByteBudget(int(self.job.limits.max_inflight_mb * 1024 * 1024))
        self.counters.prior_cost = self.spend.committed
        self.counters.to_do = plan.to_do
        # Everything alive now (imported modules, the plan) lives for the whole run: keep it out of the cyclic
        # collector, whose full passes over it stalled the event loop for ~100 ms at a time (benchmarks/run.py).
        gc.freeze()
        try:
            with self._signals():
                await self._dispatch(plan, _Workers(self, client, limiter, writer, progress))
        except asyncio.CancelledError:
            if not self._hard_stop:
                raise
            asyncio.current_task().uncancel()  # a second Ctrl-C: skip the grace period, still commit below
        finally:
            progress.close()
            await client.close()
            writer.close()
        if self._stop_reason is None:
            self.store.finalize()
        summary = self._summary(plan, started)
        if self._stop_reason is not None:
            if isinstance(self._stop_reason, JobError):
                self._stop_reason.summary = summary
            raise self._stop_reason
        return summary

    async def _dispatch(self, plan: Plan, workers: "_Workers") -> None:
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=2 * self.job.limits.concurrency)
        feeder = asyncio.create_task(self._feed(plan, queue))
        tasks = [asyncio.create_task(workers.loop(queue)) for _ in range(self.job.limits.concurrency)]
        stop_wait = asyncio.create_task(self._stop_event.wait())
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while pending and not self._stop_event.is_set():
                _, pending = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop_wait)
            if self._stop_event.is_set() and self.job.limits.grace_s:
                feeder.cancel()
                await asyncio.wait(tasks, timeout=self.job.limits.grace_s)
        finally:  # whatever is still running now (past the grace period, or a second Ctrl-C) is cancelled
            children = [feeder, stop_wait, *tasks]
            for task in children:
                task.cancel()
            await asyncio.gather(*children, return_exceptions=True)

    async def _feed(self, plan: Plan, queue: asyncio.Queue[_Item | None]) -> None:
        """Reader: the rows to do, in manifest order, into the bounded queue (batch reads happen in a thread)."""
        batches: Iterator[pa.RecordBatch] = limited_batches(self.manifest, self.job.run.limit)
        position = 0
        while not self._stop_event.is_set():
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                break
            mask = plan.todo[position: position + batch.num_rows]
            position += batch.num_rows
            idx = np.nonzero(mask)[0]
            if len(idx):
                todo = batch.take(pa.array(idx))
                for row, fingerprint in zip(todo.to_pylist(), fingerprint_hex(self.renderer.fingerprints(todo))):
                    await queue.put((row, fingerprint))
        for _ in range(self.job.limits.concurrency):
            await queue.put(None)

    def stop(self, reason: BaseException) -> None:
        """Stop dispatching: the first reason wins (it is what the user is told)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._stop_event is not None:
            self._stop_event.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event is not None and self._stop_event.is_set()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM: stop dispatching, let in-flight requests finish (grace period), commit, exit."""
        loop = asyncio.get_running_loop()
        installed: list[int] = []
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
            name = signal.Signals(signum).name
            self.stop(Interrupted(f"Interrupted ({name}); results so far are committed.", signum=signum))

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
                pass
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

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
        )


class _Workers:
    """What every worker does with one row; shared state lives on the JobRun."""

    def __init__(self, run: JobRun, client: ChatClient, limiter: Limiter, writer: ResultWriter,
                 progress: Progress) -> None:
        self.run = run
        self.job = run.job
        self.client = client
        self.limiter = limiter
        self.writer = writer
        self.progress = progress
        self.limits = run.job.limits

    async def loop(self, queue: asyncio.Queue[_Item | None]) -> None:
        while not self.run.stopping:
            item = await queue.get()
            if item is None:
                return
            row, fingerprint = item
            try:
                result = await self.process(row)
            except JobError as exc:
                self.run.stop(exc)
                return
            except Exception as exc:  # a bug: stop the run cleanly (commit what is done), then surface it
                self.run.stop(exc)
                raise
            if result is not None:
                result["fingerprint"] = fingerprint
                self.record(result)

    async def process(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """One row end to end; returns its output row, or None to leave it pending (the run is stopping)."""
        rendered = self.run.renderer.render(row)
        if rendered.error is not None:
            return self.error_row(row, rendered, "input", rendered.error.code, str(rendered.error), attempts=0)
        reserved = _local_image_bytes(rendered)
        await self.run.image_bytes.acquire(reserved)  # bounds image bytes in memory, not only requests
        try:
            return await self._process_rendered(row, rendered, reserved)
        finally:
            self.run.image_bytes.release(reserved)

    async def _prepare(self, rendered: RenderedRow, file_bytes: int) -> list[PreparedImage]:
        """Read, check and encode the row's images: small ones right here (a thread hop costs more than the work),
        big ones in a worker thread so the event loop keeps serving the other requests."""
        if file_bytes <= INLINE_PREPARE_BYTES:
            return _prepare_all(rendered, self.run.resize)
        async with self.run.preparing:
            return await asyncio.to_thread(_prepare_all, rendered, self.run.resize)

    async def _process_rendered(self, row: dict[str, Any], rendered: RenderedRow,
                                reserved: int) -> dict[str, Any] | None:
        try:
            images = await self._prepare(rendered, reserved)
        except InputRowError as exc:
            return self.error_row(row, rendered, "input", exc.code, str(exc), attempts=0)
        messages = build_messages(rendered, images, min_pixels=self.job.model.min_pixels,
                                  max_pixels=self.job.model.max_pixels)
        prompt_estimate = self.estimate_prompt_tokens(rendered, images)
        estimate = prompt_estimate + (self.job.model.max_tokens or EXPECTED_COMPLETION_TOKENS)
        started = time.monotonic()
        billed: list[dict[str, Any]] = []  # the cost of every attempt the provider billed, the answer's included
        completion, attempts, failure = await self._send(messages, estimate, self.worst_case_cost(prompt_estimate),
                                                         billed)
        latency_s = time.monotonic() - started
        if completion is not None:
            self.limiter.settle(estimate, completion.total_tokens)
            return self.ok_row(row, rendered, completion, attempts, latency_s, billed)
        if failure is None:
            return None  # the run is stopping: leave the row pending
        decision = classify(failure)
        if decision.action is Action.STOP_JOB:
            raise JobError(decision.message, code=decision.code)
        if decision.action is Action.RETRY and self.run.stopping:
            return None
        message = decision.message
        if decision.action is Action.RETRY:
            message = f"gave up after {attempts} attempt(s): {message}"
        return self.error_row(row, rendered, decision.error_type, decision.code, message, attempts=attempts,
                              latency_s=latency_s, billed=billed)

    async def _send(self, messages: list[dict[str, Any]], estimate: int, worst_cost: float,
                    billed: list[dict[str, Any]]) -> tuple[Completion | None, int, BaseException | None]:
        """Attempts with retries: (completion, attempts, None), (None, attempts, last failure), or (None, n, None)
        when the run is stopping. JobErrors (the spend cap) propagate."""
        attempts = 0
        try:
            async for attempt in self._retrying():
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if self.run.stopping:
                        raise _Abandoned()
                    self._reserve_spend(worst_cost)
                    actual_cost = 0.0
                    try:
                        await self.limiter.acquire(estimate)
                        completion = await self.client.complete(messages)
                        billed.append(self._cost(completion))
                        actual_cost = billed[-1].get("cost") or 0.0
                    except PartialResponseError as exc:  # billed although not usable: count it, then retry
                        if isinstance(exc.billed, Completion):
                            billed.append(self._cost(exc.billed))
                            actual_cost = billed[-1].get("cost") or 0.0
                        raise
                    finally:
                        self.run.spend.release(worst_cost, actual_cost)
        except _Abandoned:
            return None, attempts, None
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - judged by policy.classify, which re-raises what it does not know
            return None, attempts, exc
        return completion, attempts, None

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=self._should_stop,
            wait=self._wait_s,
            before_sleep=self._before_sleep,
            sleep=self._sleep,
            reraise=True,
        )

    def _should_stop(self, state: RetryCallState) -> bool:
        decision = _decision(state)
        limit = min(self.limits.max_attempts, decision.max_attempts or self.limits.max_attempts)
        elapsed = state.seconds_since_start or 0.0
        return self.run.stopping or state.attempt_number >= limit or elapsed >= self.limits.max_retry_time_s

    def _wait_s(self, state: RetryCallState) -> float:
        decision = _decision(state)
        wait = backoff_s(state.attempt_number, initial_s=self.limits.retry_initial_s, max_s=self.limits.retry_max_s)
        return max(wait, decision.retry_after_s or 0.0)

    def _before_sleep(self, state: RetryCallState) -> None:
        decision = _decision(state)
        counters = self.run.counters
        counters.retries += 1
        counters.retry_reasons[decision.reason] = counters.retry_reasons.get(decision.reason, 0) + 1
        if decision.error_type == "rate_limit":
            self.limiter.on_throttle(decision.retry_after_s)
        log.debug("retry %d (%s): %s", state.attempt_number, decision.reason, decision.message[:200])

    async def _sleep(self, seconds: float) -> None:
        """Backoff that wakes up early when the run is stopping (the row is then left pending)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.run._stop_event.wait(), timeout=seconds)

    def _reserve_spend(self, worst_cost: float) -> None:
        spend = self.run.spend
        if not spend.reserve(worst_cost):
            currency = self.run.price.currency if self.run.price else ""
            raise SpendCapReached(
                f"Spend cap reached: {spend.committed:.4f} {currency} spent, and the requests in flight could bring "
                f"it over max_cost {spend.cap:.4f} {currency}. Raise the cap (--max-cost or [limits] max_cost) and "
                "run again to continue; committed results are kept."
            )

    def worst_case_cost(self, prompt_tokens: int) -> float:
        """What one request could cost at most: its prompt plus the longest completion it may produce."""
        price = self.run.price
        if price is None or self.run.spend.cap is None:
            return 0.0
        model = self.job.model
        completion = model.max_tokens or WORST_CASE_COMPLETION_TOKENS
        if is_stream_only(model.name) or model.extra_body.get("enable_thinking"):
            completion += int(model.extra_body.get("thinking_budget") or WORST_CASE_THINKING_TOKENS)
        try:
            return row_cost(price, prompt_tokens=prompt_tokens, completion_tokens=completion).cost
        except ValueError:  # above the last priced tier: price it at the top tier rather than not at all
            top = price.tiers[-1]
            return (prompt_tokens * top.input_per_mtok + completion * top.output_per_mtok) / 1e6

    def estimate_prompt_tokens(self, rendered: RenderedRow, images: list[PreparedImage]) -> int:
        """Prompt tokens from the real image sizes (Qwen-VL's resize rule), before sending."""
        sizes = [(i.width, i.height) if i.width and i.height else None for i in images]
        try:
            return self.run.prompt_tokens.count(rendered, sizes)
        except tokens.ImageSizeError:  # an odd data-URL size: the provider will say; budget the maximum meanwhile
            return self.run.prompt_tokens.count(rendered, [None] * len(images))

    # -- result rows ----------------------------------------------------------------------------------------
    def ok_row(self, row: dict[str, Any], rendered: RenderedRow, completion: Completion, attempts: int,
               latency_s: float, billed: list[dict[str, Any]]) -> dict[str, Any]:
        fields = {
            "status": "ok",
            "response": completion.content,
            "reasoning": completion.reasoning,
            "finish_reason": completion.finish_reason,
            "model": completion.model or self.job.model.name,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.total_tokens,
            "reasoning_tokens": completion.reasoning_tokens,
            "cached_tokens": completion.cached_tokens,
            "image_tokens": completion.image_tokens,
            "attempts": attempts,
            "latency_s": round(latency_s, 4),
            "request_id": completion.request_id,
        }
        fields.update(_add_costs(billed))
        return self._output_row(row, rendered, fields)

    def error_row(self, row: dict[str, Any], rendered: RenderedRow, error_type: str, code: str | None,
                  message: str, *, attempts: int, latency_s: float | None = None,
                  billed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        fields = {
            "status": "error",
            "model": self.job.model.name,
            "error_type": error_type,
            "error_code": code,
            "error_message": message,
            "attempts": attempts,
            "latency_s": round(latency_s, 4) if latency_s is not None else None,
        }
        fields.update(_add_costs(billed or []))
        return self._output_row(row, rendered, fields)

    def _cost(self, completion: Completion) -> dict[str, Any]:
        price = self.run.price
        if price is None or completion.prompt_tokens is None or completion.completion_tokens is None:
            return {}
        try:
            cost = row_cost(price, prompt_tokens=completion.prompt_tokens,
                            completion_tokens=completion.completion_tokens, cached_tokens=completion.cached_tokens or 0)
        except ValueError:  # a prompt above the last priced tier: no price known, like an unknown model
            return {}
        return {"input_cost": cost.input_cost, "output_cost": cost.output_cost, "cost": cost.cost,
                "currency": cost.currency}

    def _output_row(self, row: dict[str, Any], rendered: RenderedRow, fields: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for column in self.run._image_columns:
            out[column] = _redact(out[column])
        out.update(fields)
        out["finished_at"] = datetime.now(timezone.utc)
        return out

    def record(self, result: dict[str, Any]) -> None:
        """Hand the row to the writer (durable within milliseconds) and update the live counters."""
        self.writer.put(result)
        counters = self.run.counters
        counters.cost += result.get("cost") or 0.0
        if result["status"] == "ok":
            counters.ok += 1
            counters.prompt_tokens += result.get("prompt_tokens") or 0
            counters.completion_tokens += result.get("completion_tokens") or 0
        else:
            counters.errors += 1
            kind = result.get("error_type") or "unknown"
            counters.error_types[kind] = counters.error_types.get(kind, 0) + 1
        self.progress.update()


def _add_costs(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum cost dicts (the answer's and those of billed failed attempts); empty if none is priced."""
    priced = [c for c in costs if c]
    if not priced:
        return {}
    total = {key: sum(c[key] for c in priced) for key in ("input_cost", "output_cost", "cost")}
    return {**total, "currency": priced[0]["currency"]}


def _local_image_bytes(rendered: RenderedRow) -> int:
    """What a row's local images will take in memory once read and base64-encoded (4/3 of the file size)."""
    total = 0
    for ref in rendered.images:
        if ref.path is not None or ref.blob is not None:  # issue 11: bytes in the manifest or a tar member too
            with contextlib.suppress(OSError):  # a missing file is reported by prepare_image, not here
                total += ref.source.size() * 4 // 3
    return total


def _prepare_all(rendered: RenderedRow, resize: ResizePolicy) -> list[PreparedImage]:
    return [prepare_image(ref, resize) for ref in rendered.images]


def _redact(value: Any) -> Any:
    """Output files never hold image bytes: data URLs and bytes cells become a short reference with a hash."""
    return redact_cell(value)  # issue 11: media/redact.py handles str, lists, bytes and image structs


def _decision(state: RetryCallState) -> Decision:
    return classify(state.outcome.exception())


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, _Abandoned):
        return False
    try:
        return classify(exc).action is Action.RETRY
    except Exception:  # noqa: BLE001 - unknown exception types are not retried; they surface to the caller
        return False


async def run_job_async(job: JobConfig, *, base_url: str | None = None,
                        prices: PriceTable | None = None) -> RunSummary:
    """Run a job inside an existing event loop (a notebook's, say)."""
    return await JobRun(job, base_url=base_url, prices=prices).run()


def run_job(job: JobConfig | str | Path, *, base_url: str | None = None, prices: PriceTable | None = None,
            **overrides: Any) -> RunSummary:
    """Run a job to completion (``--simulate`` starts the built-in simulator for the duration)."""
    if not isinstance(job, JobConfig):
        from .config import load_job

        job = load_job(job, overrides)
    if job.run.simulate:
        from .simulator import SimulatorConfig, SimulatorThread

        with SimulatorThread(SimulatorConfig(latency_s=0.2, latency_dist="uniform")) as sim:
            return asyncio.run(run_job_async(job, base_url=sim.base_url, prices=prices))
    return asyncio.run(run_job_async(job, base_url=base_url, prices=prices))
