"""One benchmark job in a process of its own: run it through the library and print what was measured, as JSON.

Why a child process per job: peak RSS only ever grows (and is inherited across fork + exec: see
``peak_rss_mb``), so each memory figure needs a fresh process; the runner's CPU must be read without the
parent's or the simulator's; and "time from process start to the first request" must include the interpreter
start and the library's imports, as a user's run does.

The job is run with ``run_job_async`` inside our own ``asyncio.run``, next to a monitor task that sleeps 10 ms in
a loop and records how late it wakes up (the event loop's stalls). A few library functions are wrapped, from
outside, to time the phases the figures need; the wrappers only read the clock:

* ``runner.plan_rows``: when planning ended, and how many rows it left to do;
* ``ChatClient.complete``: when the first request started and the last answer came back, requests in flight, and
  the CPU clock at both ends (the steady-state CPU per request excludes start-up and the final commit);
* ``runner.ByteBudget``: the peak image bytes it admitted (``max_inflight_mb`` at work);
* ``ResultWriter._fold`` (journal → Parquet part, in the writer thread) and full garbage collections (via
  ``gc.callbacks``): when they ran, so a stall can be put down to committing or to the collector.

Each stall is also classified by where the time went, from the loop thread's and the process's CPU clocks over
the late sleep: the loop itself was busy (our code on the loop, or a collection), another of our threads held the
GIL (writer, image loading), or the process was not running at all (another process had the cores: on a shared
2-core machine that is noise, not the runner).

A spec may set ``full_sdk_path`` to send through the SDK's typed ``chat.completions.create`` path instead of the
raw one (``ChatClient.full_sdk_path``), so figure 1 can show what the raw path saves in the same run.

A spec may set ``fold_rows`` to fold the journal more often than the store's default (100,000 rows), so that a
short run has folds *while sending* and the stall figure covers them.

    python benchmarks/_job.py SPEC.json SPAWN_TIME     # SPEC: {"job": {...}, "base_dir": "..."}

The last line of stdout is the result; benchmarks/run.py starts this and reads it (see ``run_child``).
"""

from __future__ import annotations

import time

PROCESS_T0 = time.time()  # before the heavy imports below, which a real run pays too

import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from qwenvl_batch import JobConfig, RunSummary, job_from_dict, run_job_async  # noqa: E402
from qwenvl_batch import planning as planning_module  # noqa: E402
from qwenvl_batch import runner as runner_module  # noqa: E402
from qwenvl_batch.client import ChatClient, Completion  # noqa: E402
from qwenvl_batch.errors import QwenVLBatchError  # noqa: E402
from qwenvl_batch.limits import ByteBudget  # noqa: E402
from qwenvl_batch.store import OutputStore, ResultWriter  # noqa: E402

MONITOR_PERIOD_S = 0.010
STALL_RECORD_S = 0.002  # overshoots below this are timer noise, not worth keeping


def cpu_s() -> float:
    """User + system CPU seconds of this process (all threads: image loading and the writer count too).

    ``process_time`` rather than ``getrusage``: it is read on every answer, and under py-spy getrusage shows up
    as a fifth of all samples (an artefact of sampling a syscall that holds the GIL, but it hides the profile).
    """
    return time.process_time()


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (``VmHWM``).

    Not ``getrusage().ru_maxrss``: on Linux it is carried over from the parent across fork + exec (the kernel
    folds the forked copy's high-water mark into it at exec), so a child started by a 400 MB parent reports at
    least 400 MB whatever it does. ``VmHWM`` belongs to the address space exec created, so it is this process's.
    """
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """Resident memory now (``VmRSS``)."""
    return _status_mb("VmRSS")


@dataclass
class Probe:
    """What the wrappers and the monitor saw; times are ``time.time()`` so the parent can compare them."""

    plan_end: float | None = None
    to_do: int | None = None
    first_send: float | None = None
    last_answer: float | None = None
    cpu_first_send: float | None = None
    cpu_last_answer: float | None = None
    sends: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    budget_peak_bytes: int = 0
    stalls: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds late) of each stall
    stall_causes: list[str] = field(default_factory=list)  # "loop", "threads" or "descheduled", per stall
    folds: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each journal fold
    full_gcs: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each generation-2 collection
    budgets: list[ByteBudget] = field(default_factory=list)


def install_probes(probe: Probe, fold_rows: int | None = None) -> None:
    """Wrap the library entry points the figures time (see the module docstring)."""
    original_plan = runner_module.plan_rows

    def plan_rows(*args: Any, **kwargs: Any) -> Any:
        plan = original_plan(*args, **kwargs)
        probe.plan_end = time.time()
        probe.to_do = plan.to_do
        return plan

    runner_module.plan_rows = plan_rows

    original_complete: Callable[[ChatClient, list[dict[str, Any]]], Awaitable[Completion]] = ChatClient.complete

    async def complete(self: ChatClient, messages: list[dict[str, Any]]) -> Completion:
        if probe.first_send is None:
            probe.first_send = time.time()
            probe.cpu_first_send = cpu_s()
        probe.sends += 1
        probe.in_flight += 1
        probe.max_in_flight = max(probe.max_in_flight, probe.in_flight)
        try:
            return await original_complete(self, messages)
        finally:
            probe.in_flight -= 1
            probe.last_answer = time.time()
            probe.cpu_last_answer = cpu_s()

    ChatClient.complete = complete  # type: ignore[method-assign]

    class RecordedBudget(ByteBudget):
        def __init__(self, max_bytes: int) -> None:
            super().__init__(max_bytes)
            probe.budgets.append(self)

    runner_module.ByteBudget = RecordedBudget  # type: ignore[misc]

    original_fold = ResultWriter._fold

    def fold(self: ResultWriter) -> None:
        started = time.time()
        try:
            original_fold(self)
        finally:
            probe.folds.append((started, time.time()))

    ResultWriter._fold = fold  # type: ignore[method-assign]

    if fold_rows is not None:
        class OftenFoldedStore(OutputStore):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.fold_rows = fold_rows

        planning_module.OutputStore = OftenFoldedStore  # type: ignore[misc]

    gc_started: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            gc_started[0] = time.time()
        else:
            probe.full_gcs.append((gc_started[0], time.time()))

    gc.callbacks.append(on_gc)


async def watch_loop(probe: Probe) -> None:
    """Sleep 10 ms in a loop; a late wake-up is a stretch during which nothing else on the loop could run."""
    while True:
        before, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        await asyncio.sleep(MONITOR_PERIOD_S)
        late = time.perf_counter() - before - MONITOR_PERIOD_S
        if late > STALL_RECORD_S:
            probe.stalls.append((time.time() - late, late))
            probe.stall_causes.append(stall_cause(late, time.thread_time() - loop_cpu,
                                                  time.process_time() - process_cpu))


def stall_cause(late: float, loop_cpu: float, process_cpu: float) -> str:
    """Where a stall's time went: the loop thread computing, our other threads holding the GIL, or nothing of ours."""
    if loop_cpu >= 0.5 * late:
        return "loop"
    if process_cpu - loop_cpu >= 0.5 * late:
        return "threads"
    return "descheduled"


async def run_monitored(job: JobConfig, probe: Probe) -> RunSummary:
    """The job, through the library's async entry point, with the stall monitor alongside."""
    monitor = asyncio.create_task(watch_loop(probe))
    try:
        return await run_job_async(job)
    finally:
        monitor.cancel()


def worst_stall(stalls: list[tuple[float, float]], start: float | None, end: float | None) -> float:
    """The longest stall that began inside [start, end] (the whole run when either is unknown)."""
    if start is None or end is None:
        return max((late for _, late in stalls), default=0.0)
    return max((late for begin, late in stalls if start <= begin <= end), default=0.0)


def overlapping(stalls: list[tuple[float, float]], spans: list[tuple[float, float]]) -> list[float]:
    """The stalls (seconds) that overlap any of ``spans`` (start, end)."""
    return [late for begin, late in stalls
            if any(begin <= span_end and begin + late >= span_start for span_start, span_end in spans)]


def stall_figures(probe: Probe) -> dict[str, Any]:
    """Worst stalls overall, while sending, during journal folds, and what the long ones were."""
    window = (probe.first_send or 0.0, probe.last_answer or 0.0)
    in_window = [i for i, (begin, _) in enumerate(probe.stalls) if window[0] <= begin <= window[1]]
    sending = [probe.stalls[i] for i in in_window]
    own = [probe.stalls[i] for i in in_window if probe.stall_causes[i] != "descheduled"]  # the runner's doing
    long_ones = [(begin, late) for begin, late in sending if late > 0.05]
    causes = [probe.stall_causes[i] for i in in_window if probe.stalls[i][1] > 0.05]
    return {
        "stall_worst_s": worst_stall(probe.stalls, None, None),
        "stall_worst_sending_s": max((late for _, late in sending), default=0.0),
        "stall_worst_sending_not_descheduled_s": max((late for _, late in own), default=0.0),
        "stalls_over_50ms_sending": len(long_ones),
        "stalls_over_50ms_sending_by_cause": {cause: causes.count(cause) for cause in sorted(set(causes))},
        "stalls_over_50ms_sending_in_full_gc": len(overlapping(long_ones, probe.full_gcs)),
        # seconds the whole process was not running while sending: another process had the cores
        "descheduled_sending_s": sum(probe.stalls[i][1] for i in in_window if probe.stall_causes[i] == "descheduled"),
        "stall_worst_during_fold_s": max(overlapping(own, probe.folds), default=0.0),
        # a fold runs in the writer thread: it can only stall the loop by holding the GIL ("threads")
        "stall_worst_from_fold_s": max(overlapping([probe.stalls[i] for i in in_window
                                                    if probe.stall_causes[i] == "threads"], probe.folds), default=0.0),
        "folds_while_sending": sum(1 for start, _ in probe.folds if window[0] <= start <= window[1]),
        "full_gcs": len(probe.full_gcs),
        "full_gc_worst_s": max((end - start for start, end in probe.full_gcs), default=0.0),
    }


def measure(spec: dict[str, Any], spawned_at: float) -> dict[str, Any]:
    """Run the spec's job once with the probes installed; everything the parent needs, JSON-able."""
    probe = Probe()
    install_probes(probe, spec.get("fold_rows"))
    ChatClient.full_sdk_path = bool(spec.get("full_sdk_path"))
    job = job_from_dict(spec["job"], base_dir=Path(spec["base_dir"]))
    rss_before_mb = rss_mb()
    cpu_start, run_start = cpu_s(), time.time()
    error = None
    summary = None
    try:
        summary = asyncio.run(run_monitored(job, probe))
    except QwenVLBatchError as exc:  # reported to the parent, which prints it and marks the figure failed
        error = f"{type(exc).__name__}: {exc}"
    run_end = time.time()
    cpu_end = cpu_s()
    probe.budget_peak_bytes = max((b.peak for b in probe.budgets), default=0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result: dict[str, Any] = {
        "error": error,
        "spawned_at": spawned_at,
        "process_t0": PROCESS_T0,
        "run_start": run_start,
        "run_end": run_end,
        "cpu_run_s": cpu_end - cpu_start,
        "rss_before_run_mb": rss_before_mb,
        "peak_rss_mb": peak_rss_mb(),
        "ru_maxrss_mb": usage.ru_maxrss / 1024.0,  # see peak_rss_mb
        "cpu_user_s": usage.ru_utime,  # whole process, imports included: the user / kernel split
        "cpu_sys_s": usage.ru_stime,
        "summary": None,
        **stall_figures(probe),
    }
    skip = ("stalls", "stall_causes", "budgets", "folds", "full_gcs")
    result.update({k: v for k, v in asdict(probe).items() if k not in skip})
    if summary is not None:
        result["summary"] = {name: getattr(summary, name) for name in (
            "rows", "to_do", "ok", "errors", "skipped_ok", "skipped_error", "pending", "wall_s", "retries",
            "error_types")}
    return result


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = measure(spec, float(sys.argv[2]))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["error"] is None else 1


def run_child(spec: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Run one job in a fresh ``python benchmarks/_job.py`` and return its result (parent side).

    The child's stderr goes to ``<workdir>/<name>.stderr``; its tail is shown if the child dies without a result.
    """
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    stderr_path = workdir / f"{name}.stderr"
    spawned_at = time.time()
    with stderr_path.open("w") as stderr:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec_path), repr(spawned_at)],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        tail = stderr_path.read_text()[-3000:]
        raise RuntimeError(f"benchmark child {name!r} exited {done.returncode} without a result:\n{tail}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    sys.exit(main())
