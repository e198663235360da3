"""``mode = "batch"``: plan → JSONL shards → upload → create → poll → download → journal, crash-safe.

The plan is the realtime plan (planning.plan_rows: the same resume index, fingerprints and refusals), and the
results go through the same store and journal with the same columns, so switching a job between modes changes
nothing else. What is added is the shard state file (state.py), written at every step. A re-run first finishes
what the state file lists (polls batches in flight, downloads finished ones, journals downloaded ones, finds a
batch created just before a crash by its ``ds_name``), then plans again: rows in a shard that is not done are in
flight and never go into a second batch.

Rounds: rows a batch did not run (it expired or a line hit a transient error) go into the next batch of the same
run, up to ``[batch] max_rounds``; with ``fallback = "realtime"`` the rows still pending after that are sent
one by one with the realtime runner.

``QWENVL_BATCH_TEST_KILL_AT=<step>`` (tests only) kills the process with SIGKILL right after a named step, so the
crash tests cover every step: writing, written, upload (the file exists, its id not yet recorded), uploaded,
create (the batch exists, its id not yet recorded),
created, poll, downloaded, journal (half the rows journaled), journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import openai
import pyarrow as pa

from ..config import JobConfig
from ..currency import committed_spend
from ..errors import ConfigError, Interrupted, JobError
from ..manifest import hash_ids, id_strings, limited_batches
from ..planning import JobSetup, Plan, open_job, plan_rows
from ..pricing import PriceTable
from ..progress import Counters
from ..prompt import fingerprint_hex
from ..results import ResultRows
from ..runner import RunSummary, stop_signals
from ..store import ResultWriter
from .backend import BatchBackend
from .results import LineOutcome, outcomes, result_row
from .rules import TERMINAL, batch_endpoint_url, check_region, rules_for
from .shards import CUSTOM_ID, FINGERPRINT, Limits, LineBuilder, OpenShard, ShardWriter, custom_id_for, read_rows
from .state import BatchState, Shard, load_state

log = logging.getLogger(__name__)

KILL_ENV = "QWENVL_BATCH_TEST_KILL_AT"
REMOTE_POLL_S = (30.0, 60.0)  # the provider asks for no more than one poll a minute per batch: 30 s, backing off
LOCAL_POLL_S = (0.2, 1.0)  # a loopback server (the simulator) is polled fast
HEARTBEAT_S = 300.0  # a progress line at least this often while nothing changes (plateaus of 30 min are normal)
PREPARE_CHUNK = 64  # rows prepared at once (images in memory: about this many base64 images)


class BatchFailed(JobError):
    """A batch ended without results for its rows (validation failed, cancelled, zero successes)."""


def _kill_point(step: str) -> None:
    """Tests only: die here as ``kill -9`` would (no cleanup, no flush beyond what is already durable)."""
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _is_loopback(url: str) -> bool:
    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


@dataclass
class RoundRows:
    """What one pass over the journaled results left: rows to send again in the next round."""

    again: int = 0
    handled: set[int] = field(default_factory=set)  # id hashes journaled (ok or error) in this run


class BatchRun:
    """One batch-mode run of one job; ``run()`` returns a RunSummary or raises JobError (state saved)."""

    def __init__(self, job: JobConfig, *, base_url: str | None = None, prices: PriceTable | None = None,
                 setup: JobSetup | None = None) -> None:
        self.job = job
        self.base_url = base_url
        self.rules = rules_for(job)
        self.rules.check_window(job.batch.completion_window)
        self.region_warning = check_region(job)  # refused here (ConfigError) unless simulated
        self.setup = setup or open_job(job, prices)
        self.store = self.setup.store
        self.price = self.setup.price
        self.rows = ResultRows(job.model.name, self.price, self.setup.image_columns)
        self.limits = Limits.of(job, self.rules)
        self.counters = Counters()
        self.round_rows = RoundRows()
        self.stop_reason: JobError | None = None
        self.verbose = job.run.progress != "off"
        self._interrupted: Interrupted | None = None
        self._fresh: set[int] = set()  # shards written by this process (no lookup at the provider needed)
        self._writing: asyncio.Future[list[Shard]] | None = None  # the shard writer's thread, while it runs
        self._resumed_downloads: set[int] = set()  # downloaded before a crash: some rows may be journaled already
        self._task: asyncio.Task[Any] | None = None

    # -- the run --------------------------------------------------------------------------------------------
    async def run(self) -> RunSummary:
        started = time.monotonic()
        if self.region_warning:
            self._say(self.region_warning)
        if self.job.limits.max_cost is not None:
            self._say("[limits] max_cost is not enforced in mode = \"batch\": a batch, once created, is billed for "
                      "every line it answers. Check `qwenvl-batch estimate` first, or use --limit")
        try:
            if self.store.exists():
                self.store.lock()
            self.store.recover()
            index = self.store.resume_index()
            plan = plan_rows(self.job, self.setup.manifest, self.setup.renderer, index)
            committed_spend(index.committed_costs, self.price.currency if self.price else None,
                            output=self.job.output.path, capped=False)
            self.store.create()
            url = self.base_url or batch_endpoint_url(self.job)
            state = load_state(self.store.state_dir, url)
            self._check_endpoint(state, url)
            self._resumed_downloads = {s.no for s in state.shards if s.state == "downloaded"}
            state.endpoint = url
            self.poll_s = self._poll_bounds(url)
            backend = BatchBackend(url, self.job.api_key(), self.rules)
            try:
                with self._signals():
                    # re-attach to what a crash left; its transient line errors go into this run's batches
                    await self._drive(state, backend, state.active(), final=False)
                    await self._rounds(state, backend, plan)
            except asyncio.CancelledError:
                if self._interrupted is None:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                if self._writing is not None:  # the shard writer stops after its current chunk; let it record
                    await asyncio.gather(self._writing, return_exceptions=True)
                self.stop_reason = self._interrupted
            finally:
                await backend.close()
            self.store.finalize()
        finally:
            self.store.unlock()
        summary = self._summary(plan, started)
        if self.stop_reason is not None:
            self.stop_reason.summary = summary
            raise self.stop_reason
        if self.job.batch.fallback == "realtime" and summary.pending:
            return await self._fallback(summary)
        return summary

    def _check_endpoint(self, state: BatchState, url: str) -> None:
        """Batches in flight live at one provider account: re-attaching elsewhere would submit their rows twice.

        A simulated run is exempt (the simulator starts on a new port each run and forgets its batches; their
        rows go back to pending when it answers 404)."""
        if self.job.run.simulate or not state.active() or state.endpoint in ("", url):
            return
        raise ConfigError(
            f"{self.job.output.path} has {len(state.active())} batch(es) in flight at {state.endpoint}, but this run "
            f"points at {url}. Run with the same endpoint (region / base_url) to re-attach to them, or cancel them "
            f"first: qwenvl-batch batches {self.job.output.path} --cancel. Nothing was sent.")

    def _poll_bounds(self, url: str) -> tuple[float, float]:
        """(first, longest) poll interval: 30-60 s against a real provider, fast against a loopback server."""
        low, high = LOCAL_POLL_S if _is_loopback(url) else REMOTE_POLL_S
        asked = self.job.batch.poll_interval_s
        if asked is not None:
            low = asked if _is_loopback(url) else max(asked, REMOTE_POLL_S[0])
            high = max(high, low * 2) if not _is_loopback(url) else max(low, high)
        return low, high

    async def _rounds(self, state: BatchState, backend: BatchBackend, plan: Plan) -> None:
        """Submit the plan's rows; rows left unrun (expiry, transient line errors) go again, up to max_rounds."""
        for number in range(1, self.job.batch.max_rounds + 1):
            if self.stop_reason is not None:
                return
            final = number == self.job.batch.max_rounds
            if number > 1:
                index = self.store.resume_index()
                plan = plan_rows(self.job, self.setup.manifest, self.setup.renderer, index)
            self.round_rows.again = 0
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._write_shards, state, plan, number))
            shards = await asyncio.shield(self._writing)
            self._writing = None
            if not shards:
                return
            await self._drive(state, backend, shards, final=final)
            if not self.round_rows.again:
                return

    # -- writing shards -------------------------------------------------------------------------------------
    def _write_shards(self, state: BatchState, plan: Plan, round_no: int) -> list[Shard]:
        """The rows to do that are not in flight → shard files, each recorded as ``written`` once closed."""
        in_flight = self._in_flight(state)
        builder = LineBuilder(self.job, self.setup.renderer, self.rows, self.rules, self.limits,
                              self.job.resize_policy())
        new: list[Shard] = []
        batch_dir = state.folder
        batch_dir.mkdir(parents=True, exist_ok=True)

        def path_for() -> Path:
            return batch_dir / f"shard-{state.next_no():06d}.input.jsonl"

        def on_shard(open_shard: OpenShard) -> None:
            no = state.next_no()
            shard = Shard(no=no, ds_name=f"qwenvl-batch/{state.run_id}/{no}", round=round_no,
                          lines=open_shard.lines, bytes=open_shard.bytes)
            state.shards.append(shard)
            state.save()
            self._fresh.add(no)
            new.append(shard)
            _kill_point("written")

        manifest_schema = pa.schema([f for f in self.store.schema if f.name in self.setup.manifest.columns])
        writer = ShardWriter(self.limits, manifest_schema, path_for, on_shard)
        if os.environ.get(KILL_ENV) == "writing":
            writer.after_line = lambda: _kill_point("writing")
        results = self.store.writer()
        results.start()
        id_column = self.job.input.id_column

        def build(item: tuple[dict[str, Any], str, int]) -> tuple[bytes | None, dict[str, Any] | None, str]:
            custom_id = custom_id_for(str(item[0][id_column]))
            return (*builder.line(item[0], custom_id), custom_id)

        # Reading, resizing and encoding images is most of the work: a few rows at a time in a thread pool (the
        # decoders release the GIL), in chunks so memory stays bounded, written in manifest order.
        pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="qwenvl-batch-lines")
        try:
            for chunk in _chunks(self._rows_to_send(plan, in_flight), PREPARE_CHUNK):
                if self._interrupted is not None:
                    break
                for (row, fingerprint, key), (line, error_row, custom_id) in zip(chunk, pool.map(build, chunk),
                                                                                 strict=True):
                    if error_row is not None:
                        error_row["fingerprint"] = fingerprint
                        self._record(results, error_row)
                        self.round_rows.handled.add(key)
                        continue
                    assert line is not None
                    writer.add(line, row, fingerprint, custom_id)
            writer.close()
        finally:
            pool.shutdown()
            results.close()
        return new

    def _rows_to_send(self, plan: Plan, in_flight: set[int]) -> Any:
        """(row, fingerprint, id hash) of every row the plan marks, minus rows in flight or handled this run."""
        id_column = self.job.input.id_column
        position = 0
        for batch in limited_batches(self.setup.manifest, self.job.run.limit):
            mask = plan.todo[position: position + batch.num_rows].copy()
            position += batch.num_rows
            if not mask.any():
                continue
            keys = hash_ids(id_strings(batch.column(id_column)))
            skip = np.fromiter((int(k) in in_flight or int(k) in self.round_rows.handled for k in keys), bool,
                               len(keys))
            mask &= ~skip
            idx = np.nonzero(mask)[0]
            if not len(idx):
                continue
            todo = batch.take(pa.array(idx))
            fingerprints = fingerprint_hex(self.setup.renderer.fingerprints(todo))
            yield from zip(todo.to_pylist(), fingerprints, (int(k) for k in keys[idx]), strict=True)

    def _in_flight(self, state: BatchState) -> set[int]:
        """Id hashes of the rows in shards that are not done: they are never put into another batch."""
        keys: set[int] = set()
        for shard in state.active():
            sidecar = state.file(shard, "rows.arrows")
            if sidecar.exists():
                ids = [str(r[self.job.input.id_column]) for r in read_rows(sidecar)]
                keys.update(int(k) for k in hash_ids(np.array(ids, dtype=object)))
        return keys

    # -- driving shards through their steps -------------------------------------------------------------------
    async def _drive(self, state: BatchState, backend: BatchBackend, shards: list[Shard], *,
                     final: bool = True) -> None:
        """Every shard from where it stands to ``done``: submit, poll until terminal, download, journal, clean up."""
        if not shards:
            return
        for shard in shards:
            if shard.state in ("written", "uploaded"):
                await self._submit(state, backend, shard)
        waiting = [s for s in shards if s.active]
        delay = self.poll_s[0]
        last_line = 0.0
        first = True
        while waiting and self.stop_reason is None:
            changed = False
            for shard in list(waiting):
                if shard.state == "created":
                    changed |= await self._poll(state, backend, shard)
                    if first:
                        _kill_point("poll")
                if shard.state in ("created",) and shard.status not in TERMINAL:
                    continue
                await self._collect(state, backend, shard, final=final)
                waiting.remove(shard)
                changed = True
            first = False
            now = time.monotonic()
            if changed or now - last_line >= HEARTBEAT_S:
                self._progress(state, shards)
                last_line = now
            if not waiting:
                return
            delay = self.poll_s[0] if changed else min(delay * 1.5, self.poll_s[1])
            await asyncio.sleep(delay)

    async def _submit(self, state: BatchState, backend: BatchBackend, shard: Shard) -> None:
        """written → uploaded (file id recorded) → created (batch id recorded the moment create returns)."""
        fresh = shard.no in self._fresh  # written by this process: nothing of it can exist at the provider yet
        if shard.state == "written":
            filename = shard.ds_name.replace("/", "-") + ".jsonl"
            if not fresh:  # uploaded just before a crash?
                shard.file_id = await backend.find_file(filename, shard.bytes)
            if shard.file_id is None:
                shard.file_id = await backend.upload(state.file(shard, "input.jsonl"), filename)
                _kill_point("upload")
            shard.state = "uploaded"
            state.save()
            _kill_point("uploaded")
        # created just before a crash? then attach, never create again (list: 100 calls/min, so only on a re-run)
        found = None if fresh else await backend.find(shard.ds_name)
        if found is None:
            assert shard.file_id is not None
            metadata = self.rules.metadata(shard.ds_name, f"qwenvl-batch {self.job.output.path.name} shard {shard.no}")
            try:
                found = await backend.create(shard.file_id, self.job.batch.completion_window, metadata)
            except openai.NotFoundError:  # the uploaded file is gone (a restarted simulator): upload again
                shard.state, shard.file_id = "written", None
                state.save()
                await self._submit(state, backend, shard)
                return
            _kill_point("create")
        else:
            log.info("shard %d: found batch %s created before a crash (ds_name %s)", shard.no, found.id, shard.ds_name)
        shard.batch_id = found.id
        shard.submitted_at = shard.submitted_at or time.time()
        shard.changed_at = time.time()
        self._observe(shard, found)
        shard.state = "created"
        state.save()
        _kill_point("created")

    async def _poll(self, state: BatchState, backend: BatchBackend, shard: Shard) -> bool:
        """One retrieve; True when status or counts changed (then saved)."""
        assert shard.batch_id is not None
        try:
            batch = await backend.retrieve(shard.batch_id)
        except openai.NotFoundError:
            self._say(f"batch {shard.batch_id} (shard {shard.no}) is not known to {state.endpoint} any more; its "
                      f"{shard.lines:,} rows go back to pending (a restarted simulator forgets its batches)")
            shard.state, shard.status = "lost", "lost"
            state.save()
            self.round_rows.again += shard.lines
            return True
        before = (shard.status, shard.completed, shard.failed)
        self._observe(shard, batch)
        if (shard.status, shard.completed, shard.failed) == before:
            return False
        shard.changed_at = time.time()
        if shard.status in TERMINAL:
            shard.result_at = time.time()
        state.save()
        return True

    def _observe(self, shard: Shard, batch: Any) -> None:
        shard.status = batch.status
        counts = batch.request_counts
        if counts is not None:
            shard.total, shard.completed, shard.failed = counts.total, counts.completed, counts.failed
        shard.output_file_id = batch.output_file_id or shard.output_file_id
        shard.error_file_id = batch.error_file_id or shard.error_file_id
        errors = getattr(batch, "errors", None)
        data = getattr(errors, "data", None) or []
        shard.errors = [f"line {e.line}: {e.code}: {e.message}" if e.line is not None else f"{e.code}: {e.message}"
                        for e in data]

    async def _collect(self, state: BatchState, backend: BatchBackend, shard: Shard, *, final: bool) -> None:
        """Terminal → downloaded → journaled → done (provider and local files deleted)."""
        if shard.state == "created":
            for file_id, kind in ((shard.output_file_id, "output.jsonl"), (shard.error_file_id, "errors.jsonl")):
                if file_id:
                    await backend.download(file_id, state.file(shard, kind))
            shard.result_at = shard.result_at or time.time()
            shard.state = "downloaded"
            state.save()
            _kill_point("downloaded")
        if shard.state == "downloaded":
            await asyncio.to_thread(self._journal, state, shard, final)
            shard.state = "journaled"
            state.save()
            _kill_point("journaled")
        if shard.state == "journaled":
            await self._clean_up(state, backend, shard)
        self._judge(state, shard)

    def _journal(self, state: BatchState, shard: Shard, final: bool) -> None:
        """Every row of the shard: its result row into the output (ok / error), or back to pending."""
        found = outcomes(state.file(shard, "output.jsonl"), state.file(shard, "errors.jsonl"))
        latency = (shard.result_at - shard.submitted_at) if shard.result_at and shard.submitted_at else None
        already = self._journaled_before(shard) if shard.no in self._resumed_downloads else {}
        counts = {"ok": 0, "error": 0, "pending": 0}
        writer = self.store.writer()
        writer.start()
        halfway = shard.lines // 2
        try:
            for n, row in enumerate(read_rows(state.file(shard, "rows.arrows"))):
                custom_id, fingerprint = row.pop(CUSTOM_ID), row.pop(FINGERPRINT)
                outcome = found.get(custom_id) or LineOutcome("not_run", {})
                if outcome.kind == "not_run" or (outcome.kind == "transient" and not final):
                    counts["pending"] += 1
                    self.round_rows.again += 1
                    continue
                key = int(hash_ids(np.array([str(row[self.job.input.id_column])], dtype=object))[0])
                self.round_rows.handled.add(key)
                if custom_id in already:
                    counts["ok" if already[custom_id] == "ok" else "error"] += 1
                    continue
                result = result_row(self.rows, self.price, row, outcome, attempts=shard.round, latency_s=latency)
                result.update(fingerprint=fingerprint, batch_id=shard.batch_id, custom_id=custom_id)
                self._record(writer, result)
                counts["ok" if result["status"] == "ok" else "error"] += 1
                if n == halfway and os.environ.get(KILL_ENV) == "journal":
                    time.sleep(0.5)  # the writer thread makes what was put durable within milliseconds
                    _kill_point("journal")
        finally:
            writer.close()
        shard.journaled = counts

    def _journaled_before(self, shard: Shard) -> dict[str, str]:
        """custom_id → status of rows of this batch already in the output (a crash while journaling): not twice."""
        rows: dict[str, str] = {}
        for table in self.store._iter_tables(["batch_id", "custom_id", "status"]):
            mask = np.asarray(table.column("batch_id").to_pylist(), dtype=object) == shard.batch_id
            if mask.any():
                picked = table.filter(pa.array(mask))
                rows.update(zip(picked.column("custom_id").to_pylist(), picked.column("status").to_pylist(),
                                strict=True))
        return rows

    async def _clean_up(self, state: BatchState, backend: BatchBackend, shard: Shard) -> None:
        """Provider files deleted (they never expire; 10,000 per account) unless --keep-files; local ones too.
        A failed batch keeps its local input file, so the bad line can be looked at."""
        if not self.job.batch.keep_files:
            for file_id in (shard.file_id, shard.output_file_id, shard.error_file_id):
                if file_id:
                    await backend.delete(file_id)
        kinds = ["output.jsonl", "errors.jsonl", "rows.arrows"]
        if shard.status != "failed":
            kinds.append("input.jsonl")
        for kind in kinds:
            state.file(shard, kind).unlink(missing_ok=True)
        shard.state = "done"
        state.save()

    def _judge(self, state: BatchState, shard: Shard) -> None:
        """A terminal batch that must stop the run: failed validation, cancelled, or completed with no success."""
        where = f"batch {shard.batch_id} (shard {shard.no}, {shard.lines:,} rows)"
        if shard.status == "failed":
            shown = "\n  ".join(shard.errors[:10]) or "no reason given"
            self.stop_reason = BatchFailed(
                f"{where} failed validation; nothing was billed and its rows stay pending:\n  {shown}\n"
                f"The lines are in {state.file(shard, 'input.jsonl')}; fix the cause and run again")
        elif shard.status == "cancelled":
            self.stop_reason = BatchFailed(
                f"{where} was cancelled: {shard.journaled.get('ok', 0):,} rows done before the cancel are kept (and "
                f"billed); {shard.journaled.get('pending', 0):,} stay pending. Run again to submit them")
        elif shard.status == "completed" and shard.lines and not shard.journaled.get("ok") \
                and not shard.journaled.get("pending"):
            self.stop_reason = BatchFailed(
                f"{where} completed with 0 successful lines: every line failed (see error_code / error_message in "
                "the output). Nothing was billed for them; fix the cause and run with --retry-failed")
        elif shard.status == "expired" and shard.journaled.get("pending"):
            self._say(f"{where} expired: {shard.journaled.get('ok', 0):,} rows done are kept; "
                      f"{shard.journaled['pending']:,} go into the next batch")

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def _record(self, writer: ResultWriter, result: dict[str, Any]) -> None:
        writer.put(result)
        self.counters.add(result)

    def _progress(self, state: BatchState, shards: list[Shard]) -> None:
        """One line per batch: state, counts, time since its last change (hours-long waits need that)."""
        if not self.verbose:
            return
        now = time.time()
        for shard in shards:
            quiet = f", no change for {_duration(now - shard.changed_at)}" if shard.changed_at and \
                shard.status not in TERMINAL else ""
            self._say(f"batch {shard.no} {shard.batch_id or '-'}: {shard.status or shard.state} "
                      f"{shard.completed + shard.failed:,}/{shard.lines:,} lines done ({shard.failed:,} failed)"
                      f"{quiet}")

    def _say(self, message: str) -> None:
        print(f"qwenvl-batch: {message}", file=sys.stderr, flush=True)

    def interrupt(self, signum: int = int(signal.SIGINT)) -> None:
        """Ctrl-C / SIGTERM (or a notebook's interrupt): stop waiting; every step done so far is recorded, the
        batches keep running at the provider, and a re-run re-attaches to them."""
        name = signal.Signals(signum).name
        self._interrupted = Interrupted(
            f"Interrupted ({name}) while waiting for the batches; they keep running at the provider. Results so far "
            "are committed; run again to re-attach (or cancel them: qwenvl-batch batches OUT --cancel)",
            signum=signum)
        if self._task is not None:
            self._task.cancel()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM → interrupt(), on the main thread's loop (elsewhere the caller forwards them)."""
        self._task = asyncio.current_task()
        with stop_signals(self.interrupt):
            yield

    async def _fallback(self, summary: RunSummary) -> RunSummary:
        """Rows still pending after the batch rounds: sent one by one by the realtime runner."""
        from ..runner import JobRun

        self._say(f"{summary.pending:,} rows still pending after the batches: sending them in realtime "
                  "(--fallback realtime; full price)")
        job = self.job.model_copy(update={"model": self.job.model.model_copy(update={"mode": "realtime"})})
        realtime = await JobRun(job, base_url=self.base_url, prices=None).run()
        summary.ok += realtime.ok
        summary.errors += realtime.errors
        summary.pending = realtime.pending
        summary.prompt_tokens += realtime.prompt_tokens
        summary.completion_tokens += realtime.completion_tokens
        if summary.cost is not None and realtime.cost is not None:
            summary.cost += realtime.cost
        return summary

    def _summary(self, plan: Plan, started: float) -> RunSummary:
        c = self.counters
        priced = self.price is not None and self.price.batch_discount is not None
        return RunSummary(
            output=self.job.output.path.resolve(), rows=plan.rows, to_do=plan.to_do, ok=c.ok, errors=c.errors,
            skipped_ok=plan.skipped_ok, skipped_error=plan.skipped_error, pending=max(plan.to_do - c.done, 0),
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            cost=c.cost if priced else None, currency=self.price.currency if self.price else None,
            wall_s=time.monotonic() - started, error_types=dict(c.error_types),
            stopped=str(self.stop_reason) if self.stop_reason else None, simulated=self.job.run.simulate,
            unpriced_model=None if priced else f"{self.job.model.name} (Batch API, this region)",
            retried_errors=plan.retried_errors,
        )


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
