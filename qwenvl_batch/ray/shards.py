"""A job on a Ray cluster: the manifest split into shards, each run by the ordinary runner in a Ray actor.

Why shards of the existing runner rather than a Ray Data pipeline: the runner's journal makes every answer durable
within milliseconds and resume is per row, so ``kill -9`` costs at most the requests in flight; Ray Data's own
checkpointing commits whole blocks (measured: 14 % of requests paid twice after a ``kill -9``). Here the driver
does everything that can refuse the job (planning.open_job, the plan, the output's lock) before a worker
exists, then:

* **Shards.** Each row to do goes to shard ``hash(id) % workers`` (the same ids to the same shard on every run
  with the same ``--workers``). A shard is a ``ShardRun`` (a ``runner.JobRun``) in a ``ShardWorker`` actor: same
  workers, retries, health checks and journal as one process.
* **One writer per shard, one dataset.** Shard ``K`` journals to ``OUT.state/shards/K/journal/`` under its own
  lock (``OUT.state/shards/K/lock``) and folds into ordinary parts in ``OUT`` numbered from its own range
  (``first_seq + n``, ranges ``SEQ_STRIDE`` apart and above every part already there, so "newer part wins" still
  holds). Every reader sees the parts, and store.OutputStore lists the shard journals with its own, so
  ``load_results`` and ``status`` see results within milliseconds as for one process.
* **The end.** The driver folds what is left and compacts (``store.finalize``): one row per id in few files.
* **Crashes.** If the driver dies, Ray ends its workers a few seconds later (measured on a local cluster: ~2 s);
  until then they keep journaling under their shard locks. The next run waits for those locks (an orphaned
  worker still writing), then folds every shard journal before planning: a row answered before the crash is
  never sent again.
* **Limits.** One rate limiter for the cluster (limiter.py) and one spend ledger for the run (spend.py).
* **Progress.** The driver polls each worker's counters once a second and shows one progress line and one
  summary, as for one process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from qwenvl_batch.config import JobConfig, with_overrides
from qwenvl_batch.errors import ConfigError, Interrupted, JobError, SpendCapReached
from qwenvl_batch.manifest import hash_ids, id_strings, limited_batches
from qwenvl_batch.planning import JobSetup, Plan, open_job
from qwenvl_batch.pricing import PriceTable
from qwenvl_batch.progress import Counters, Progress
from qwenvl_batch.ray.limiter import NAMESPACE, RemoteLimiter, shared_limiter
from qwenvl_batch.ray.progress import copy_counters, merge_counters
from qwenvl_batch.ray.spend import LeasedSpend, SpendLedger
from qwenvl_batch.runner import JobRun, RunSummary, close_output, plan_output
from qwenvl_batch.store import SHARDS_DIR, OutputInUse, OutputStore, state_dir_for

log = logging.getLogger(__name__)

SEQ_STRIDE = 1_000_000  # part numbers per shard per run (a part per minute for ~2 years)
POLL_S = 1.0  # how often the driver refreshes progress and looks for finished shards
ORPHAN_WAIT_S = 60.0  # how long a new run waits for the workers of a dead driver to exit
START_TIMEOUT_S = 180.0  # workers that the cluster cannot place within this long: too few CPUs for --workers


def shard_dir(output: Path, shard: int) -> Path:
    """``OUT.state/shards/0003``: shard 3's journal, temporary files and lock."""
    return state_dir_for(output) / SHARDS_DIR / f"{shard:04d}"


class ShardStore(OutputStore):
    """The output as one shard writes it: parts into the shared folder (numbers from its own range), journal,
    temporary files and lock in its shard folder. The driver recovers and compacts; a shard never does."""

    def __init__(self, base: OutputStore, *, shard: int, first_seq: int) -> None:
        super().__init__(base.path, base.schema, base.id_column, fold_rows=base.fold_rows,
                         fold_every_s=base.fold_every_s, simulated=base.simulated)
        self.shard = shard
        self.first_seq = first_seq
        self.state_dir = shard_dir(base.path, shard)
        self.journal_dir = self.state_dir / "journal"
        self.meta_path = self.state_dir / "job.json"
        self.tmp_dir = self.state_dir / "tmp"

    def next_seq(self) -> int:
        """The next number in this shard's range (other shards write their own ranges at the same time)."""
        top = self.first_seq + SEQ_STRIDE
        mine = [seq for seq, _ in self.parts() if self.first_seq <= seq < top] + [seq for seq, _ in self.segments()]
        seq = max(mine, default=self.first_seq - 1) + 1
        if seq >= top:
            raise JobError(f"shard {self.shard} of {self.path} used up its {SEQ_STRIDE:,} part numbers; run again "
                           "to continue (the next run starts new ranges)")
        return seq

    def recover(self) -> None:
        """Only this shard's leftovers (the driver folded everything before planning)."""
        if self.tmp_dir.exists():
            for stray in self.tmp_dir.iterdir():
                stray.unlink()
        for seq, segment in self.segments():
            self._fold_segment(seq, segment)

    def create(self) -> None:
        self.lock()
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def finalize(self, *, target_rows: int = 0, stamp: str | None = None) -> None:
        """Compaction is the driver's, once every shard is done."""

    def save_resume_index(self, index: Any = None, *, stamp: str | None = None, clean: bool | None = None) -> None:
        """So is the persisted resume index (it covers every shard's parts; OUT.state/resume-index.bin)."""


@dataclass
class ShardOutcome:
    """What a shard reports back: its counters and, if it stopped, why (rebuilt as the right error)."""

    shard: int
    counters: Counters
    stop_kind: str | None = None  # "interrupted", "spend_cap", "job"
    stop_message: str | None = None
    stop_code: str | None = None
    signum: int = 0
    usage_estimated: int = 0
    warnings: dict[str, int] = field(default_factory=dict)

    def error(self) -> JobError | None:
        if self.stop_kind is None:
            return None
        message = self.stop_message or "stopped"
        if self.stop_kind == "interrupted":
            return Interrupted(message, signum=self.signum or int(signal.SIGINT))
        if self.stop_kind == "spend_cap":
            return SpendCapReached(message)
        return JobError(message, code=self.stop_code)


class ShardRun(JobRun):
    """The runner on one shard: the driver's plan for it, the shared limiter, a lease of the spend cap."""

    def __init__(self, job: JobConfig, *, shard: int, first_seq: int, limiter: Any, ledger: Any, workers: int,
                 committed_before: float, base_url: str | None) -> None:
        super().__init__(job, base_url=base_url)
        self.shard = shard
        self.store = self.setup.store = ShardStore(self.setup.store, shard=shard, first_seq=first_seq)
        self.limiter_actor = limiter
        self.workers = workers
        self.spend = self.leased = LeasedSpend(ledger, shard, job.limits.max_cost, committed_before)
        self.remote_limiter: RemoteLimiter | None = None

    def new_limiter(self) -> RemoteLimiter:
        self.remote_limiter = RemoteLimiter(self.limiter_actor, workers=self.workers)
        return self.remote_limiter

    async def run_shard(self, todo: np.ndarray, rows: int,
                        manifest_identity: tuple[int, int, int] | None) -> ShardOutcome:
        """Send this shard's rows; always returns (a stop is reported in the outcome, not raised)."""
        started = time.monotonic()
        plan = Plan(rows=rows, todo=todo)
        stop: BaseException | None = None
        try:
            self.store.lock()
            self.store.recover()
            self.store.create()
            self._manifest_identity = manifest_identity
            if self._stop_reason is None:  # the driver may have stopped this shard before it started
                await self._execute(plan)
                if self.remote_limiter is not None:
                    await self.remote_limiter.flush()
            self._finish(plan, started)
        except JobError as exc:
            stop = exc
        finally:
            await self.leased.close()
            self.store.unlock()
        return self._outcome(stop)

    def _outcome(self, stop: BaseException | None) -> ShardOutcome:
        outcome = ShardOutcome(self.shard, copy_counters(self.counters),
                               usage_estimated=self.usage_estimated_rows, warnings=dict(self.warning_counts))
        if stop is not None:
            outcome.stop_message = str(stop)
            outcome.stop_code = getattr(stop, "code", None)
            if isinstance(stop, Interrupted):
                outcome.stop_kind, outcome.signum = "interrupted", stop.signum
            else:
                outcome.stop_kind = "spend_cap" if isinstance(stop, SpendCapReached) else "job"
        return outcome


class _ShardWorker:
    """A Ray actor running one ShardRun; async, so ``stop`` and ``snapshot`` run beside ``run``."""

    def __init__(self, job: JobConfig, secret: dict[str, str], **kwargs: Any) -> None:
        os.environ.update(secret)  # the API key, in this worker process only (never in a runtime_env or a log)
        self.run_: ShardRun | None = None
        self.error: str | None = None
        try:
            self.run_ = ShardRun(job, **kwargs)
        except ConfigError as exc:  # the worker cannot see what the driver saw (another node, another mount)
            self.error = str(exc)

    async def run(self, todo: np.ndarray, rows: int, identity: tuple[int, int, int] | None) -> ShardOutcome:
        if self.run_ is None:
            raise ConfigError(f"a Ray worker on {os.uname().nodename} cannot open the job: {self.error}")
        return await self.run_.run_shard(todo, rows, identity)

    async def stop(self, kind: str, message: str, signum: int = 0) -> None:
        """Stop dispatching (the driver's Ctrl-C, or another shard's job-level stop), commit, return."""
        if self.run_ is None:
            return
        if kind == "interrupted":
            self.run_.stop(Interrupted(message, signum=signum or int(signal.SIGINT)))
        else:
            self.run_.stop(JobError(message))

    async def snapshot(self) -> Counters:
        return copy_counters(self.run_.counters if self.run_ is not None else None)


ShardWorker: Any = ray.remote(num_cpus=1)(_ShardWorker)  # typed Any: Ray's decorator hides the class


@dataclass
class _Driver:
    """The driver's view of a sharded run in progress."""

    job: JobConfig  # as sent (planning.open_job's)
    as_given: JobConfig  # as the caller gave it: what the workers open
    setup: JobSetup
    plan: Plan
    committed: float
    workers: int
    started: float
    counters: Counters = field(default_factory=Counters)
    outcomes: dict[int, ShardOutcome] = field(default_factory=dict)
    stop: JobError | None = None
    interrupted: int = 0  # the signal number of the first Ctrl-C / SIGTERM


def run_job_on_ray(job: JobConfig, *, address: str | None = None, workers: int = 2, base_url: str | None = None,
                   prices: PriceTable | None = None) -> RunSummary:
    """Run ``job`` in ``workers`` shards on a Ray cluster (``address``; None: a local one started for the run, or
    the one this process is already connected to). Returns the RunSummary, or raises ConfigError (nothing sent)
    or JobError (stopped; committed results kept, a re-run continues), as ``run_job`` does.
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1 worker")
    if job.model.mode == "batch":
        raise ConfigError("--ray runs realtime jobs; mode = \"batch\" hands the rows to the provider's Batch API, "
                          "which needs no cluster: run it without --ray")
    started = time.monotonic()
    as_given = job  # what each worker opens again ([documents] and [output.schema] rewrite the job)
    setup = open_job(job, prices)  # every refusal, before Ray or any file
    job = setup.job
    store = setup.store
    try:
        planned = plan_output(setup, before_recovery=wait_for_orphans)  # recovery folds every shard's journal
        plan, committed, identity = planned.plan, planned.committed, planned.manifest_identity
        driver = _Driver(job, as_given, setup, plan, committed, workers, started)
        if plan.to_do:
            with _simulated(job, base_url) as url, _connected(address, workers):
                _run_shards(driver, url, identity)
        store.recover()  # a worker that died left its journal: fold it before compacting
        close_output(store, plan, stopped=driver.stop, done=driver.counters.done)
        summary = _summary(driver)
        if driver.stop is not None:
            driver.stop.summary = summary
            raise driver.stop
        return summary
    finally:
        store.unlock()


def wait_for_orphans(store: OutputStore, timeout_s: float = ORPHAN_WAIT_S) -> None:
    """Wait until no worker of an earlier run still holds its shard's lock (Ray ends a dead driver's workers
    within seconds; until then they may still journal answers, which recovery must see)."""
    deadline = time.monotonic() + timeout_s
    for lock in sorted((store.state_dir / SHARDS_DIR).glob("*/lock")):
        told = False
        with open(lock, "a+", encoding="utf-8") as handle:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                    break
                except OSError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    if time.monotonic() > deadline:
                        raise OutputInUse(f"{lock.parent} is still in use by {holder} (a Ray worker of an earlier run "
                                          f"of {store.path}); stop that run, or wait for it, then run again") from None
                    if not told:
                        log.warning("waiting for %s (a worker of an earlier run of this output) to exit", holder)
                        told = True
                    time.sleep(0.2)


def shard_of_rows(setup: JobSetup, shards: int) -> np.ndarray:
    """Each manifest row's shard: its id's 64-bit hash modulo ``shards`` (stable across runs and processes)."""
    id_column = setup.job.input.id_column
    pieces = [hash_ids(id_strings(batch.column(id_column))) % np.uint64(shards)
              for batch in limited_batches(setup.manifest, setup.job.run.limit, columns=[id_column])]
    return np.concatenate(pieces).astype(np.int64) if pieces else np.empty(0, np.int64)


def _run_shards(driver: _Driver, base_url: str | None, identity: tuple[int, int, int] | None) -> None:
    """Start one actor per shard, watch them to the end, and stop them all when one stops the job."""
    job, store = driver.job, driver.setup.store
    which = shard_of_rows(driver.setup, driver.workers)
    first = store.next_seq()
    limiter = shared_limiter(job, base_url)
    ledger = SpendLedger.remote(job.limits.max_cost, driver.committed, driver.workers)
    shard_job = with_overrides(driver.as_given, {"progress": "off"})
    secret = _secret(job)
    actors: dict[int, Any] = {}
    running: dict[Any, int] = {}
    progress = Progress(driver.plan.to_do, driver.counters, mode=job.run.progress)
    driver.counters.to_do, driver.counters.prior_cost = driver.plan.to_do, driver.committed
    driver.counters.currency = driver.setup.price.currency if driver.setup.price else ""
    try:
        with _driver_signals(driver, actors):  # from the first worker on: a Ctrl-C while they start stops them too
            todos = {k: driver.plan.todo & (which == k) for k in range(driver.workers)}
            for k, todo in todos.items():
                if todo.any():
                    actors[k] = ShardWorker.options(scheduling_strategy="SPREAD", max_concurrency=1000).remote(
                        shard_job, secret, shard=k, first_seq=first + k * SEQ_STRIDE, limiter=limiter,
                        ledger=ledger, workers=driver.workers, committed_before=driver.committed, base_url=base_url)
            _wait_started(actors)
            for k, actor in actors.items():  # all at once: no worker takes the whole rate before the others start
                running[actor.run.remote(todos[k], driver.plan.rows, identity)] = k
            _watch(driver, actors, running, progress)
    finally:
        progress.close()
        for actor in actors.values():
            ray.kill(actor)  # done already; a worker that is not (a second Ctrl-C) ends like kill -9: journal kept
        wait_for_orphans(store, timeout_s=30.0)


def _wait_started(actors: dict[int, Any]) -> None:
    """Every worker constructed (its process started, the job opened there), or a JobError saying why not."""
    ready = {actor.snapshot.remote(): k for k, actor in actors.items()}
    done, pending = ray.wait(list(ready), num_returns=len(ready), timeout=START_TIMEOUT_S)
    if pending:
        raise JobError(f"the Ray cluster did not start {len(pending)} of {len(ready)} worker(s) within "
                       f"{START_TIMEOUT_S:.0f} s (cluster resources: {ray.cluster_resources()}); each needs 1 CPU: "
                       "lower --workers, or add nodes. Nothing was sent")


def _watch(driver: _Driver, actors: dict[int, Any], running: dict[Any, int], progress: Progress) -> None:
    snapshots: dict[int, Counters] = {}
    last_done = 0
    while running:
        done, _ = ray.wait(list(running), num_returns=len(running), timeout=POLL_S, fetch_local=True)
        for ref in done:
            k = running.pop(ref)
            outcome = _outcome_of(ref, k)
            driver.outcomes[k] = outcome
            snapshots[k] = outcome.counters
            error = outcome.error()
            if error is not None and driver.stop is None:
                driver.stop = error
                _stop_all(actors, running, error)
        if driver.interrupted and driver.stop is None:
            driver.stop = Interrupted(f"Interrupted ({signal.Signals(driver.interrupted).name}); results so far "
                                      "are committed.", signum=driver.interrupted)
            _stop_all(actors, running, driver.stop)
        for k, snapshot in _snapshots(actors, running).items():
            snapshots[k] = snapshot
        merge_counters(driver.counters, snapshots.values())
        progress.update(driver.counters.done - last_done)
        last_done = driver.counters.done


def _outcome_of(ref: Any, shard: int) -> ShardOutcome:
    """A finished shard's outcome; a worker that died or failed is a job-level stop naming it."""
    try:
        outcome: ShardOutcome = ray.get(ref)
        return outcome
    except RayError as exc:
        cause = getattr(exc, "cause", None) or exc  # a task error carries the worker's exception (no traceback)
        if isinstance(cause, (ConfigError, JobError)):
            return ShardOutcome(shard, Counters(), stop_kind="job", stop_message=str(cause))
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        return ShardOutcome(shard, Counters(), stop_kind="job",
                            stop_message=f"Ray worker for shard {shard} failed ({type(cause).__name__}: {message}); "
                                         "its committed results are kept, run again to continue")


def _snapshots(actors: dict[int, Any], running: dict[Any, int]) -> dict[int, Counters]:
    """The live counters of the shards still running (a worker too busy to answer keeps its last ones)."""
    live = {k: actors[k].snapshot.remote() for k in running.values()}
    try:
        values = ray.get(list(live.values()), timeout=5.0)
    except (GetTimeoutError, RayError):
        return {}
    return dict(zip(live, values))


def _stop_all(actors: dict[int, Any], running: dict[Any, int], reason: JobError) -> None:
    kind = "interrupted" if isinstance(reason, Interrupted) else "job"
    signum = reason.signum if isinstance(reason, Interrupted) else 0
    message = str(reason) if kind == "interrupted" else f"another worker stopped the job: {reason}"
    for k in running.values():
        actors[k].stop.remote(kind, message, signum)


@contextlib.contextmanager
def _driver_signals(driver: _Driver, actors: dict[int, Any]) -> Iterator[None]:
    """Ctrl-C / SIGTERM: every worker stops dispatching and commits; a second one ends them at once."""
    def on_signal(signum: int, frame: Any) -> None:
        if driver.interrupted:
            for actor in actors.values():
                ray.kill(actor)
            return
        driver.interrupted = signum

    previous: dict[int, Any] = {}
    for signum in (int(signal.SIGINT), int(signal.SIGTERM)):
        try:
            previous[signum] = signal.signal(signum, on_signal)
        except ValueError:  # not the main thread: the caller handles interrupts
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _connected(address: str | None, workers: int) -> Iterator[None]:
    """Connected to Ray for the run: to ``address``, to the cluster this process already uses, or to a local one
    started now (as many logical CPUs as workers need: the workers mostly wait on the network)."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {"namespace": NAMESPACE, "include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, workers) + 1, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address or 'a new local cluster'}: {exc}. "
                          "Check --ray-address (e.g. auto, or ray://HOST:10001), or leave it out for a local "
                          "cluster") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _simulated(job: JobConfig, base_url: str | None) -> Iterator[str | None]:
    """``--simulate``: the built-in simulator in the driver, reachable from workers on this host only."""
    if not job.run.simulate:
        yield base_url
        return
    from qwenvl_batch.api import simulated_endpoint

    with simulated_endpoint(job) as url:
        yield url


def _secret(job: JobConfig) -> dict[str, str]:
    """The API key's variable and value, handed to the workers as an actor argument (not a runtime_env, which
    Ray shows in its dashboard and logs)."""
    name = job.model.api_key_env
    value = os.environ.get(name, "") if name else ""
    return {name: value} if name and value else {}


def _summary(driver: _Driver) -> RunSummary:
    counters, plan, setup = driver.counters, driver.plan, driver.setup
    warnings: dict[str, int] = {}
    for outcome in driver.outcomes.values():
        for kind, n in outcome.warnings.items():
            warnings[kind] = warnings.get(kind, 0) + n
    return RunSummary(
        output=driver.job.output.path.resolve(), rows=plan.rows, to_do=plan.to_do, ok=counters.ok,
        errors=counters.errors, skipped_ok=plan.skipped_ok, skipped_error=plan.skipped_error,
        pending=plan.to_do - counters.done, prompt_tokens=counters.prompt_tokens,
        completion_tokens=counters.completion_tokens, cost=counters.cost if setup.price else None,
        currency=setup.price.currency if setup.price else None, wall_s=time.monotonic() - driver.started,
        retries=dict(counters.retry_reasons), error_types=dict(counters.error_types),
        stopped=str(driver.stop) if driver.stop else None, simulated=driver.job.run.simulate,
        unpriced_model=None if setup.price else driver.job.model.name, retried_errors=plan.retried_errors,
        usage_estimated=sum(o.usage_estimated for o in driver.outcomes.values()), warnings=warnings,
    )
