"""The runner's performance, figure by figure, against the simulator on loopback (targets are for 2 cores).

1. Overhead: requests/s and the runner's own CPU per request against a zero-latency simulator, small images
   (~48 KB JPEG) with httpx and aiohttp, each through the SDK's typed path (``chat.completions.create``, what the
   runner used before) and its raw path (the runner's now), and ~5 MB scans with client-side resizing off and on.
2. Latency hiding: 2 s latency, fixed and lognormal, rows = 4 x C, throughput while all C are busy vs C / latency.
3. Rate-limit utilisation: benchmarks/ratelimit.py's "rpm" scenario, achieved / limit and the share of 429s.
4. Memory: peak RSS over manifests of 10^4, 10^5 and 10^6 rows (the big ones as resumed runs with 10^4 rows
   left to do), and large images at concurrency 64 vs 8 under the same ``max_inflight_mb``.
5. Resume: a 10^6-row output, all done (time to the end of planning) and all but 10^4 done (time to the first
   request), from process start.
6. Output: Parquet files and row groups written, and the event loop's worst stall while sending.
7. Tail: 1 % of requests hang; the last 1 % of rows must finish within the per-request deadline.

The simulator runs in its own process and every job in a fresh child process (benchmarks/_job.py), so CPU and
peak RSS are the runner's alone. Each figure is printed as a labelled line as soon as it is known, then all of
them as a markdown table with targets and PASS/FAIL.

    python benchmarks/run.py            # everything, about 15 minutes on 2 cores
    python benchmarks/run.py --quick    # smaller runs, about 5 minutes
    python benchmarks/run.py --only 2 7 # some figures
    python benchmarks/run.py --scale    # the 10^7-row figures (benchmarks/scale.py) and figures 2 and 4 at full size
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd
import ratelimit
from _common import SimulatorProcess, simulator_process, synthetic_images, synthetic_manifest
from _fixtures import build_done_output, job_dict, large_scans, make_job, output_layout
from _job import run_child

from qwenvl_batch.media import parse_image_cell, prepare_image
from qwenvl_batch.policy import backoff_s

LEFT_TO_DO = 10_000  # rows still to send in the resumed 10^5 / 10^6 runs


@dataclass(frozen=True)
class Sizes:
    """How big each figure's runs are; --quick shrinks them to fit about 5 minutes."""

    overhead_rows: int
    large_rows: int
    hiding_concurrency: tuple[int, ...]
    ratelimit_s: float
    full_run_max: int  # manifests up to this many rows are sent in full; bigger ones are resumed
    large_memory_rows: int
    fold_run_rows: int  # an unsaturated run that folds its journal every fold_run_rows // 4 rows, while sending
    memory_manifests: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    tail_rows: int = 2000


QUICK = Sizes(overhead_rows=2000, large_rows=24, hiding_concurrency=(64, 512), ratelimit_s=50, full_run_max=10_000,
              large_memory_rows=48, fold_run_rows=2000)
FULL = Sizes(overhead_rows=10_000, large_rows=160, hiding_concurrency=(64, 256, 512), ratelimit_s=100,
             full_run_max=100_000, large_memory_rows=128, fold_run_rows=6000)


@dataclass(frozen=True)
class Result:
    """One figure: what was measured, its value as printed, the target, and whether it was met (None: no target)."""

    figure: str
    measure: str
    value: str
    target: str = ""
    passed: bool | None = None


@dataclass
class Report:
    """Every figure of this invocation, printed as it comes in and as a markdown table at the end."""

    results: list[Result] = field(default_factory=list)

    def add(self, figure: str, measure: str, value: str, target: str = "", passed: bool | None = None) -> None:
        """Record a figure and print it at once (a long run shows its progress)."""
        result = Result(figure, measure, value, target, passed)
        self.results.append(result)
        verdict = "" if passed is None else f"  [target {target}: {'PASS' if passed else 'FAIL'}]"
        print(f"[{figure}] {measure}: {value}{verdict}", flush=True)

    def note(self, figure: str, text: str) -> None:
        print(f"[{figure}] note: {text}", flush=True)

    def table(self) -> str:
        lines = ["| # | measure | value | target | result |", "|---|---|---|---|---|"]
        for r in self.results:
            verdict = "" if r.passed is None else ("PASS" if r.passed else "**FAIL**")
            lines.append(f"| {r.figure} | {r.measure} | {r.value} | {r.target} | {verdict} |")
        return "\n".join(lines)


class Bench:
    """The work folder, the shared inputs, and one way to run a job in a child process."""

    def __init__(self, workdir: Path, sizes: Sizes, report: Report) -> None:
        self.workdir = workdir
        self.sizes = sizes
        self.report = report
        self.small_images = synthetic_images(workdir / "img", 300)  # ~48 KB noise JPEGs, 320x240
        self.revision = revision()

    def manifest(self, name: str, rows: int, images: list[str] | None = None, image_dir: str = "img") -> Path:
        """A manifest of ``rows`` rows cycling over ``images``; made once per name and size (--workdir reuses it)."""
        path = self.workdir / f"{name}-{rows}.parquet"
        if not path.exists():
            synthetic_manifest(path, rows, images or self.small_images, image_dir=image_dir)
        return path

    def output(self, name: str) -> Path:
        """A fresh output folder for a run (a previous run's output under the same name is removed)."""
        path = self.workdir / "out" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, name: str, job: dict[str, Any], sim: SimulatorProcess | None = None, *,
            fold_rows: int | None = None, full_sdk_path: bool = False) -> dict[str, Any]:
        """Run a job in a fresh process; adds the simulator's CPU over the run as ``sim_cpu_s``."""
        now = revision()
        if now != self.revision:  # every child imports the library afresh: say when the code under test moved
            self.report.note(name, f"the code changed during the benchmark: {self.revision} → {now}")
            self.revision = now
        sim_cpu = sim.cpu_s() if sim else 0.0
        spec = {"job": job, "base_dir": str(self.workdir), "fold_rows": fold_rows, "full_sdk_path": full_sdk_path}
        result = run_child(spec, self.workdir, name)
        result["sim_cpu_s"] = (sim.cpu_s() - sim_cpu) if sim else None
        if result["error"]:
            self.report.note(name, f"the run failed: {result['error']}")
        return result


# ---------------------------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Steady:
    """Throughput and CPU between the first request and the last answer (start-up and final commit excluded)."""

    requests: int
    wall_s: float
    cpu_s: float

    @property
    def per_s(self) -> float:
        return self.requests / max(self.wall_s, 1e-9)

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / max(self.requests, 1)

    @property
    def cores(self) -> float:
        return self.cpu_s / max(self.wall_s, 1e-9)


def steady(result: dict[str, Any]) -> Steady:
    """The steady part of a child's run, from its probes (zeros if nothing was sent)."""
    if not result.get("first_send") or not result.get("last_answer"):
        return Steady(0, 0.0, 0.0)
    return Steady(result["sends"], result["last_answer"] - result["first_send"],
                  result["cpu_last_answer"] - result["cpu_first_send"])


def finish_times(output: Path) -> np.ndarray:
    """When each row's result was made (epoch seconds), sorted; empty if the run committed nothing."""
    if not any(output.glob("part-*.parquet")):
        return np.empty(0)
    frame = pd.read_parquet(output, columns=["finished_at"])
    return np.sort(frame["finished_at"].astype("int64").to_numpy() / 1e6)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


# ---------------------------------------------------------------------------------------------- 1. overhead


def fig_overhead(b: Bench) -> None:
    """Small images on both transports, each sent through the SDK's typed path (``chat.completions.create``: param
    transforms, response models; what the runner did before) and through the raw path the runner takes now."""
    fig = "1"
    with simulator_process() as sim:
        manifest = b.manifest("small", b.sizes.overhead_rows)
        clients = {}
        for client in ("httpx", "aiohttp"):
            for path in ("typed", "raw"):
                name = f"overhead-small-{client}-{path}"
                job = job_dict(manifest, b.output(name), sim.url, concurrency=64, http_client=client)
                r = b.run(name, job, sim, full_sdk_path=path == "typed")
                clients[client, path] = _report_small(b, fig, client, path, r)
        for client in ("httpx", "aiohttp"):
            typed, raw = clients[client, "typed"], clients[client, "raw"]
            b.report.add(fig, f"{client}: raw SDK path / typed SDK path",
                         f"requests/s × {raw.per_s / max(typed.per_s, 1e-9):.2f}, CPU per request "
                         f"{typed.cpu_ms:.2f} → {raw.cpu_ms:.2f} ms (× {raw.cpu_ms / max(typed.cpu_ms, 1e-9):.2f})")
        h, a = clients["httpx", "raw"], clients["aiohttp", "raw"]
        b.report.add(fig, "aiohttp / httpx (raw path)", f"requests/s × {a.per_s / max(h.per_s, 1e-9):.2f}, "
                                                         f"CPU per request × {a.cpu_ms / max(h.cpu_ms, 1e-9):.2f}")
        _large_overhead(b, sim, fig)


def _report_small(b: Bench, fig: str, client: str, path: str, r: dict[str, Any]) -> Steady:
    """The two lines of one small-image run; the ≤ 1 ms target applies to the raw path (the runner's own)."""
    s = steady(r)
    total_ms = 1000 * r["cpu_run_s"] / max(r["sends"], 1)
    label = f"small images, {client}, {path} SDK path"
    b.report.add(fig, f"{label}: requests/s", f"{s.per_s:,.0f} ({s.requests:,} requests, C=64)")
    kernel = r["cpu_sys_s"] / max(r["cpu_user_s"] + r["cpu_sys_s"], 1e-9)
    b.report.add(fig, f"{label}: runner CPU per request",
                 f"{s.cpu_ms:.2f} ms steady ({total_ms:.2f} ms incl. planning and final commit; "
                 f"{kernel:.0%} of it in the kernel); runner {s.cores:.2f} cores, simulator "
                 f"{r['sim_cpu_s'] / max(s.wall_s, 1e-9):.2f} cores, max {r['max_in_flight']} of 64 in flight",
                 "≤ 1 ms" if path == "raw" else "", s.cpu_ms <= 1.0 if path == "raw" else None)
    return s


def _large_overhead(b: Bench, sim: SimulatorProcess, fig: str) -> None:
    scans = large_scans(b.workdir / "scans", 4)
    manifest = b.manifest("large", b.sizes.large_rows, scans, image_dir="scans")
    for resize in ("off", "auto"):
        name = f"overhead-large-resize-{resize}"
        job = job_dict(manifest, b.output(name), sim.url, concurrency=16, resize=resize)
        costs = _image_costs(b, job, scans)
        r = b.run(name, job, sim)
        s = steady(r)
        upload_mb_s = s.per_s * costs["sent_mb"]
        sim_cores = r["sim_cpu_s"] / max(s.wall_s, 1e-9)
        label = "resize off" if resize == "off" else "resize auto (default)"
        b.report.add(fig, f"~5 MB scans, {label}: requests/s",
                     f"{s.per_s:,.1f} ({upload_mb_s:,.0f} MB/s of request body; {costs['sent_mb']:.2f} MB sent "
                     f"per image, file {costs['file_mb']:.2f} MB)")
        b.report.add(fig, f"~5 MB scans, {label}: runner CPU per request",
                     f"{s.cpu_ms:,.0f} ms (prepare_image alone {costs['prepare_ms']:,.0f} ms, of which base64 "
                     f"{costs['b64_ms']:.0f} ms; JSON-encoding the body {costs['json_ms']:.0f} ms); runner "
                     f"{s.cores:.2f} cores, simulator {sim_cores:.2f} cores")
        b.report.add(fig, f"~5 MB scans, {label}: bound by", _bound(s, costs, sim_cores, resize))


def _image_costs(b: Bench, job: dict[str, Any], scans: list[str]) -> dict[str, float]:
    """Per-image costs measured here, in one thread: prepare_image (read, check, resize, base64) and JSON."""
    policy = make_job(job, b.workdir).resize_policy()
    prepare, b64, dumps, sent, files = [], [], [], [], []
    for name in scans:
        ref = parse_image_cell(f"scans/{name}", column="image", base_dir=b.workdir)[0]
        started = time.perf_counter()
        image = prepare_image(ref, policy)
        prepare.append(time.perf_counter() - started)
        data = (b.workdir / "scans" / name).read_bytes()
        started = time.perf_counter()
        base64.b64encode(data)
        b64.append(time.perf_counter() - started)
        started = time.perf_counter()
        part = {"type": "image_url", "image_url": {"url": image.url}}
        json.dumps({"messages": [{"role": "user", "content": [part]}]})
        dumps.append(time.perf_counter() - started)
        sent.append(image.sent_bytes)
        files.append(len(data))
    resized = sent[0] < files[0]
    return {"prepare_ms": 1000 * float(np.median(prepare)), "b64_ms": 1000 * float(np.median(b64)) if not resized
            else 0.0, "json_ms": 1000 * float(np.median(dumps)), "sent_mb": float(np.mean(sent)) / 1e6,
            "file_mb": float(np.mean(files)) / 1e6}


def _bound(s: Steady, costs: dict[str, float], sim_cores: float, resize: str) -> str:
    """Which resource limits the large-image throughput, from the measured shares (2 cores in all)."""
    prepare_share = costs["prepare_ms"] / max(s.cpu_ms, 1e-9)
    work = ("read + truncation check (a 1/8-scale JPEG decode that still walks every byte) + base64" if resize == "off"
            else "Pillow decode + resample + JPEG re-encode")
    if prepare_share >= 0.5:
        what = f"CPU in image preparation ({work}): {prepare_share:.0%} of the runner's CPU per request"
    else:
        what = (f"moving bytes: JSON-encoding and sending {costs['sent_mb']:.1f} MB per request through the SDK, and "
                f"the simulator parsing it; image preparation ({work}) is {prepare_share:.0%} of the runner's CPU")
    if s.cores + sim_cores >= 1.6:
        what += f"; runner + simulator use {s.cores + sim_cores:.1f} of 2 cores"
    return what


# ---------------------------------------------------------------------------------------------- 2. latency hiding


LOGNORMAL_MEDIAN_S = 2.0 / math.exp(0.5)  # with the simulator's sigma = 1 the mean is 2 s, like the fixed case


def fig_latency_hiding(b: Bench) -> None:
    """Rows/s while every worker is busy (between the C-th and the 3C-th answer: no start-up, no drain of the
    last stragglers) against the ideal C / mean latency, the latency being what the simulator's request log says
    each request spent in it. Fixed 2 s latency makes each wave of C answers arrive in the same instant; the
    lognormal one (mean 2 s, sigma 1, clipped at 10 s) spreads them like a real service."""
    fig = "2"
    cases = [("fixed", c, ("--latency", "2")) for c in b.sizes.hiding_concurrency]
    cases.append(("lognormal", max(b.sizes.hiding_concurrency), (
        "--latency", f"{LOGNORMAL_MEDIAN_S:.4f}", "--latency-dist", "lognormal", "--latency-max", "10", "--seed", "3")))
    for dist, c, sim_args in cases:
        rows = 4 * c
        name = f"hiding-{dist}-{c}"
        out = b.output(name)
        log = b.workdir / f"{name}-requests.jsonl"
        log.unlink(missing_ok=True)
        with simulator_process(*sim_args, log=log) as sim:
            r = b.run(name, job_dict(b.manifest("small", rows), out, sim.url, concurrency=c), sim)
        times = finish_times(out)
        served = [json.loads(line)["duration_s"] for line in log.read_text().splitlines()]
        mean_latency = float(np.mean(served)) if served else float("nan")
        rate = 2 * c / max(times[3 * c - 1] - times[c - 1], 1e-9) if len(times) == rows else 0.0
        ideal = c / mean_latency
        what = "2 s fixed latency" if dist == "fixed" else "lognormal latency, mean 2 s"
        s = steady(r)
        b.report.add(fig, f"C={c}, {rows:,} rows, {what}: rows/s while all C are busy",
                     f"{rate:,.1f} of ideal {ideal:,.1f} (C / {mean_latency:.3f} s mean latency) = "
                     f"{rate / ideal:.3f} (runner CPU {s.cpu_ms:.1f} ms/request, {s.cores:.2f} cores; the process "
                     f"was descheduled {r['descheduled_sending_s']:.1f} s of {s.wall_s:.1f} s while sending; load "
                     f"average {os.getloadavg()[0]:.1f})", "≥ 0.95 × C / latency", rate >= 0.95 * ideal)


# ---------------------------------------------------------------------------------------------- 3. rate limits


def fig_ratelimit(b: Bench) -> None:
    fig = "3"
    scenario = next(s for s in ratelimit.SCENARIOS if s.name == "rpm")
    workdir = b.workdir / "ratelimit"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    r = ratelimit.run_scenario(scenario, b.sizes.ratelimit_s, workdir)
    b.report.add(fig, f"rpm scenario ({scenario.server_rpm:,.0f} rpm, {b.sizes.ratelimit_s:.0f} s of work): "
                      "achieved / limit",
                 f"{r['ratio']:.3f} ({r['achieved_rpm']:,.0f} rpm over {r['window_s']:.0f} s steady; "
                 f"{r['rows_ok']:,}/{r['rows']:,} rows ok)", "≥ 0.95", r["ratio"] >= 0.95)
    b.report.add(fig, "rpm scenario: share of requests answered 429",
                 f"{r['share_429']:.2%} of {r['requests']:,}", "< 2 %", r["share_429"] < 0.02)


# ------------------------------------------------------------------------------------ 4-6. memory, resume, output


def fig_memory_resume_output(b: Bench, figures: set[str]) -> None:
    with simulator_process() as sim:
        runs = _memory_runs(b, sim)
        if "4" in figures:
            _report_memory(b, runs)
            _large_memory(b)  # its own simulator (1 s latency); this one idles meanwhile
        if "5" in figures:
            _resume_all_done(b, sim)
            _report_resume(b, runs[1_000_000])
        if "6" in figures:
            _report_output(b, runs)
    if "6" in figures:
        _fold_stalls(b)


@dataclass(frozen=True)
class MemoryRun:
    rows: int
    how: str
    result: dict[str, Any]
    output: Path


def _memory_runs(b: Bench, sim: SimulatorProcess) -> dict[int, MemoryRun]:
    runs = {}
    for rows in b.sizes.memory_manifests:
        name = f"memory-{rows}"
        out = b.output(name)
        job = job_dict(b.manifest("small", rows), out, sim.url, concurrency=64)
        if rows <= b.sizes.full_run_max:
            how = "full run"
        else:
            built = build_done_output(make_job(job, b.workdir), rows - LEFT_TO_DO)
            how = f"resumed: {rows - LEFT_TO_DO:,} rows pre-built as done ({built:.0f} s), {LEFT_TO_DO:,} sent"
        r = b.run(name, job, sim)
        expected = rows if rows <= b.sizes.full_run_max else LEFT_TO_DO
        if r["to_do"] != expected:
            b.report.note("4", f"{name}: the plan said {r['to_do']} to do, expected {expected:,}: fixture is wrong")
        runs[rows] = MemoryRun(rows, how, r, out)
    return runs


def _report_memory(b: Bench, runs: dict[int, MemoryRun]) -> None:
    fig = "4"
    for rows, run in runs.items():
        r = run.result
        b.report.add(fig, f"peak RSS, {rows:,}-row manifest ({run.how})",
                     f"{r['peak_rss_mb']:,.0f} MB (after imports {r['rss_before_run_mb']:,.0f} MB; "
                     f"{(r['summary'] or {}).get('ok', 0):,} rows ok this run)")
    small, big = runs[min(runs)], runs[max(runs)]
    growth = big.result["peak_rss_mb"] - small.result["peak_rss_mb"]
    b.report.add(fig, f"peak RSS {big.rows:,} rows − {small.rows:,} rows", f"{growth:+,.0f} MB", "≤ +100 MB",
                 growth <= 100)


def _resume_all_done(b: Bench, sim: SimulatorProcess) -> None:
    fig = "5"
    rows = 1_000_000
    out = b.output("resume-all-done")
    job = job_dict(b.manifest("small", rows), out, sim.url, concurrency=64)
    built = build_done_output(make_job(job, b.workdir), rows)
    r = b.run("resume-all-done", job, sim)
    summary = r["summary"] or {}
    b.report.add(fig, f"all {rows:,} rows done: the plan", f"{r['to_do']} to do, {summary.get('skipped_ok', 0):,} "
                 f"skipped as done (output pre-built in {built:.0f} s)", "0 to do", r["to_do"] == 0)
    if r["plan_end"]:
        b.report.add(fig, "all done: process start → end of planning",
                     f"{r['plan_end'] - r['spawned_at']:.1f} s (whole run to exit {r['run_end'] - r['spawned_at']:.1f}"
                     f" s; peak RSS {r['peak_rss_mb']:,.0f} MB)")


def _report_resume(b: Bench, run: MemoryRun) -> None:
    fig = "5"
    r = run.result
    if not r["first_send"]:
        b.report.add(fig, f"{run.rows:,} rows, last {LEFT_TO_DO:,} not done: time to first request", "no request",
                     "≤ 10 s", False)
        return
    first = r["first_send"] - r["spawned_at"]
    b.report.add(fig, f"{run.rows:,} rows, last {LEFT_TO_DO:,} not done: process start → end of planning",
                 f"{r['plan_end'] - r['spawned_at']:.1f} s (imports {r['run_start'] - r['spawned_at']:.1f} s)")
    b.report.add(fig, f"{run.rows:,} rows, last {LEFT_TO_DO:,} not done: process start → first request",
                 f"{first:.1f} s (peak RSS {r['peak_rss_mb']:,.0f} MB)", "≤ 10 s", first <= 10)


def _report_output(b: Bench, runs: dict[int, MemoryRun]) -> None:
    fig = "6"
    full = max((run for run in runs.values() if run.how == "full run"), key=lambda run: run.rows)
    resumed = runs[max(runs)]
    for run in (full, resumed):
        parts, groups, rows = output_layout(run.output)
        b.report.add(fig, f"output of the {run.rows:,}-row {'full' if run is full else 'resumed'} run",
                     f"{parts} Parquet files, {groups} row groups, {rows:,} rows")
    for run in (full, resumed):
        _report_stalls(b, f"{run.rows:,}-row {'full' if run is full else 'resumed'} run (saturated)", run.result,
                       target=False)


def _report_stalls(b: Bench, what: str, r: dict[str, Any], *, target: bool) -> None:
    """The loop's worst stall while sending, not counting stalls of a descheduled process (the machine was busy).

    Against a zero-latency simulator the runner is CPU-bound and one loop iteration runs every ready worker's
    work back to back, so its "stalls" there measure saturation; the target applies to the unsaturated run.
    """
    causes = ", ".join(f"{n} {cause}" for cause, n in r["stalls_over_50ms_sending_by_cause"].items()) or "none"
    worst = r["stall_worst_sending_not_descheduled_s"]
    b.report.add("6", f"worst event-loop stall while sending, {what}",
                 f"{ms(worst)} (raw {ms(r['stall_worst_sending_s'])}); {r['stalls_over_50ms_sending']} stalls > 50 ms "
                 f"by cause: {causes}; {r['stalls_over_50ms_sending_in_full_gc']} during a full garbage collection "
                 f"({r['full_gcs']} collections, longest {ms(r['full_gc_worst_s'])}); whole run incl. planning and "
                 f"the final commit: {ms(r['stall_worst_s'])}", "≤ 100 ms" if target else "",
                 worst <= 0.1 if target else None)


def _fold_stalls(b: Bench) -> None:
    """Does committing (journal appends, and folds into Parquet in the writer thread) stall the workers?

    An unsaturated run (0.25 s uniform latency, C=32: about half a core) that folds every quarter of its rows,
    so the folds happen while requests are in flight and any stall they cause stands out.
    """
    rows = b.sizes.fold_run_rows
    every = rows // 4
    name = "fold-while-sending"
    out = b.output(name)
    with simulator_process("--latency", "0.25", "--latency-dist", "uniform", "--seed", "2") as sim:
        job = job_dict(b.manifest("small", rows), out, sim.url, concurrency=32)
        r = b.run(name, job, sim, fold_rows=every)
    parts, groups, _ = output_layout(out)
    b.report.add("6", f"worst stall caused by a journal fold while sending ({rows:,} rows, fold every {every:,})",
                 f"{ms(r['stall_worst_from_fold_s'])} with the writer thread holding the GIL, over "
                 f"{r['folds_while_sending']} folds while sending (worst stall of any cause during a fold: "
                 f"{ms(r['stall_worst_during_fold_s'])}); runner {steady(r).cores:.2f} cores; output after "
                 f"compaction: {parts} files, {groups} row groups", "≤ 100 ms",
                 r["folds_while_sending"] > 0 and r["stall_worst_from_fold_s"] <= 0.1)
    _report_stalls(b, f"{rows:,}-row unsaturated run folding every {every:,}", r, target=True)


def _large_memory(b: Bench) -> None:
    """5 MB scans sent as they are, 1 s latency so requests pile up: is memory bounded by the byte budget?"""
    fig = "4"
    scans = large_scans(b.workdir / "scans", 4)
    rows = b.sizes.large_memory_rows
    manifest = b.manifest("large", rows, scans, image_dir="scans")
    per_request_mb = np.mean([(b.workdir / "scans" / s).stat().st_size for s in scans]) * 4 / 3 / 2**20
    peaks = {}
    with simulator_process("--latency", "1") as sim:
        for c, budget in ((8, 64), (64, 64), (64, 512)):
            name = f"memory-large-c{c}-budget{budget}"
            job = job_dict(manifest, b.output(name), sim.url, concurrency=c, resize="off", max_inflight_mb=budget)
            r = b.run(name, job, sim)
            peaks[(c, budget)] = r["peak_rss_mb"]
            b.report.add(fig, f"5 MB scans, C={c}, max_inflight_mb={budget}: peak RSS",
                         f"{r['peak_rss_mb']:,.0f} MB (max {r['max_in_flight']} requests in flight, byte budget peak "
                         f"{r['budget_peak_bytes'] / 2**20:,.0f} MB; C × base64 image = {c * per_request_mb:,.0f} MB)")
    growth = peaks[(64, 64)] - peaks[(8, 64)]
    unbounded = (64 - 8) * per_request_mb
    b.report.add(fig, "5 MB scans, max_inflight_mb=64: peak RSS C=64 − C=8",
                 f"{growth:+,.0f} MB (C × image size would add {unbounded:,.0f} MB)",
                 "< 25 % of C × size growth", growth < 0.25 * unbounded)


# ---------------------------------------------------------------------------------------------- 7. tail


def fig_tail(b: Bench) -> None:
    fig = "7"
    rows, timeout_s = b.sizes.tail_rows, 2.0
    log = b.workdir / "tail-requests.jsonl"
    log.unlink(missing_ok=True)
    name = "tail"
    out = b.output(name)
    sim_args = ("--latency", "0.2", "--latency-dist", "uniform", "--hang-rate", "0.01", "--seed", "1")
    with simulator_process(*sim_args, log=log) as sim:
        job = job_dict(b.manifest("small", rows), out, sim.url, concurrency=64, timeout_s=timeout_s)
        r = b.run(name, job, sim)
    limits = make_job(job, b.workdir).limits
    deadline = limits.max_attempts * timeout_s + sum(
        backoff_s(a, initial_s=limits.retry_initial_s, max_s=limits.retry_max_s, jitter=0)
        for a in range(1, limits.max_attempts))
    hung = sum(1 for line in log.read_text().splitlines() if json.loads(line)["outcome"] == "hung")
    summary = r["summary"] or {}
    times = finish_times(out)
    if len(times) < rows or not r["first_send"]:
        b.report.add(fig, "tail", f"only {len(times)} of {rows} rows finished", "all rows", False)
        return
    t99 = times[int(0.99 * rows) - 1]
    first99, last1 = t99 - r["first_send"], times[-1] - t99
    worst = float(pd.read_parquet(out, columns=["latency_s"])["latency_s"].max())
    b.report.add(fig, f"{rows:,} rows, C=64, 0.2 s uniform latency, 1 % hangs, timeout_s={timeout_s:g}",
                 f"first 99 %: {first99:.1f} s, last 1 %: {last1:.1f} s; slowest row {worst:.1f} s; {hung} hung "
                 f"requests, retries {summary.get('retries', {})}, {summary.get('ok', 0):,} ok, "
                 f"{summary.get('pending', 0)} pending")
    b.report.add(fig, "straggler bound: last 1 % and slowest row vs the per-request deadline",
                 f"{last1:.1f} s / {worst:.1f} s vs {deadline:.0f} s ({limits.max_attempts} attempts × "
                 f"{timeout_s:g} s + backoff)", "≤ deadline, nothing pending",
                 last1 <= deadline and worst <= deadline and summary.get("pending", 1) == 0)


# ---------------------------------------------------------------------------------------------- main


FIGURES: dict[str, Callable[[Bench], None]] = {
    "1": fig_overhead,
    "2": fig_latency_hiding,
    "3": fig_ratelimit,
    "7": fig_tail,
}


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {platform.platform()}"


def revision() -> str:
    """The commit measured, marked dirty if the working tree differs (figures belong to code, not to a date)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "qwenvl_batch")
    return f"{commit}{' + uncommitted changes in qwenvl_batch/' if dirty else ''}"


def _guarded(report: Report, figure: str, measure: Callable[[], None]) -> None:
    """Run one figure; if it crashes, record a FAIL with the reason and go on with the others."""
    try:
        measure()
    except Exception as exc:
        traceback.print_exc()
        report.add(figure, "benchmark error", f"{type(exc).__name__}: {str(exc)[-500:]}", "runs", False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs, about 5 minutes")
    parser.add_argument("--only", nargs="+", choices=sorted("1234567"), help="figures to run (default: all)")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: a temporary folder)")
    parser.add_argument("--scale", action="store_true", help="the ten-million-row figures (benchmarks/scale.py: "
                        "fixtures built once under --workdir, then about 10 minutes plus 45 for the full 10^6-row "
                        "run), and figures 2 and 4 at full size (latency hiding at C=512, memory up to 10^6 rows); "
                        "--only picks other one-process figures instead of 2 and 4")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    figures = set(args.only or ("24" if args.scale else "1234567"))
    kind = "scale" if args.scale else "quick" if args.quick else "full"
    print(f"qwenvl-batch benchmark ({kind}) of {revision()} on {machine()}", flush=True)
    report = Report()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwenvl-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = Bench(workdir, sizes, report)
        if args.scale:
            import scale

            scale.run_scale(bench)
        for key in sorted(figures):
            if key in FIGURES:
                _guarded(report, key, lambda key=key: FIGURES[key](bench))  # type: ignore[misc]
            elif key == min(figures & {"4", "5", "6"}):
                _guarded(report, "4-6", lambda: fig_memory_resume_output(bench, figures))
    print(f"\n## Summary ({kind}, {time.perf_counter() - started:,.0f} s)\n")
    print(report.table())
    failed = sum(1 for r in report.results if r.passed is False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
