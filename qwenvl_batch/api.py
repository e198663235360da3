"""The library entry points: ``run_job`` (scripts, notebooks) and ``run_job_async`` (inside an event loop).

They are where ``simulate`` is wired: the runner itself never knows the simulator; a simulated job is an
ordinary run pointed at the built-in simulator on 127.0.0.1, started for the run's duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import JobConfig, check_override_names, load_job, with_overrides
from .pricing import PriceTable
from .runner import JobRun, RunSummary

SIMULATED_LATENCY_S = 0.2  # the demo's simulator answers in 0.1-0.3 s: fast, but visibly concurrent


def resolve_job(job: JobConfig | str | Path, overrides: dict[str, Any]) -> JobConfig:
    """A JobConfig from a job, or a job file path; overrides by CLI flag name (unknown names: TypeError)."""
    if isinstance(job, JobConfig):
        return with_overrides(job, overrides)
    if not isinstance(job, (str, Path)):
        raise TypeError(f"run_job takes a JobConfig or a job file path, not {type(job).__name__}")
    check_override_names(overrides)
    return load_job(job, overrides)


@contextlib.contextmanager
def simulated_endpoint(job: JobConfig) -> Iterator[str]:
    """The built-in simulator on a free loopback port for the duration; yields its base URL.

    A job for another server (``base_url`` set, any model name) is answered under its own model name, so every
    shipped job runs with ``--simulate``.
    """
    from .simulator import KNOWN_MODELS, SimulatorConfig, SimulatorThread

    extra = () if job.model.name in KNOWN_MODELS else (job.model.name,)
    config = SimulatorConfig(latency_s=SIMULATED_LATENCY_S, latency_dist="uniform", extra_models=extra)
    with SimulatorThread(config) as sim:
        yield sim.base_url


def make_run(job: JobConfig, *, base_url: str | None = None, prices: PriceTable | None = None) -> Any:
    """The run for the job's ``[model] mode``: the realtime JobRun, or batch.BatchRun (the Batch API)."""
    from .batch import BatchRun, batch_chat_job

    if job.model.mode == "batch":
        return BatchRun(job, base_url=base_url, prices=prices)
    return JobRun(batch_chat_job(job), base_url=base_url, prices=prices)


async def run_job_async(job: JobConfig | str | Path, *, base_url: str | None = None,
                        prices: PriceTable | None = None, **overrides: Any) -> RunSummary:
    """Run a job inside an existing event loop (``await run_job_async(job)`` in a notebook cell)."""
    job = resolve_job(job, overrides)
    return await _execute(job, make_run(job, base_url=base_url, prices=prices))


async def _execute(job: JobConfig, run: Any) -> RunSummary:
    """Run a checked run; with ``simulate`` against a simulator started now (after the checks: a refused job
    starts nothing)."""
    if job.run.simulate:
        with simulated_endpoint(job) as url:
            run.base_url = url
            return await run.run()
    return await run.run()


def run_job(job: JobConfig | str | Path, *, base_url: str | None = None, prices: PriceTable | None = None,
            **overrides: Any) -> RunSummary:
    """Run a job to completion and return its summary; raises ConfigError (nothing sent) or JobError (stopped,
    committed, resumable).

    Works in a script and in a notebook: inside a running event loop (Jupyter) the job runs on a private loop
    in a worker thread, and Ctrl-C (the notebook's interrupt) stops it the way it stops the CLI.
    """
    job = resolve_job(job, overrides)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_job_async(job, base_url=base_url, prices=prices))
    return _run_in_thread(job, base_url=base_url, prices=prices)


def _run_in_thread(job: JobConfig, *, base_url: str | None, prices: PriceTable | None) -> RunSummary:
    """The job on its own event loop in a worker thread; this thread waits, and forwards KeyboardInterrupt."""
    outcome: dict[str, Any] = {}
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> RunSummary:
        holder["loop"] = asyncio.get_running_loop()
        run = make_run(job, prices=prices, base_url=base_url)
        holder["run"] = run
        started.set()
        return await _execute(job, run)

    def target() -> None:
        try:
            outcome["summary"] = asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which re-raises it
            outcome["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=target, name="qwenvl-batch-run", daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.2)
        except KeyboardInterrupt:
            started.wait()
            if "run" in holder:
                holder["loop"].call_soon_threadsafe(holder["run"].interrupt)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]
