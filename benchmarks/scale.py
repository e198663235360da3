"""Ten million rows on one machine (issue 17): resume start-up and memory at 10^7 rows, and the output of a full
10^6-row run.

    python benchmarks/run.py --scale                                # every scale figure (see below for the time)
    python benchmarks/run.py --scale --workdir /tmp/qwenvl-scale    # keep the fixtures: a re-run reuses them
    python benchmarks/scale.py --workdir /tmp/qwenvl-scale --figures resume   # some figures only
    python benchmarks/scale.py --workdir /tmp/qwenvl-scale --figures million --full-run-rows 20000   # a quick look

Figures (each printed with its target and PASS/FAIL, like benchmarks/run.py's):

* ``resume``: a 10^7-row manifest with all but the last 10^4 rows done: process start → end of planning → first
  request, and peak RSS against a 10^4-row full run; also the same start with fingerprints recomputed (an index
  without a stamp) and with no persisted index at all (an output written before it existed), for comparison.
  About 5 minutes once the fixtures exist.
* ``million``: a full 10^6-row run against a zero-latency simulator: the Parquet files it leaves and the event
  loop's worst stall while sending. About an hour on 2 shared cores.

Fixtures (``build_fixture``, cached under ``WORKDIR/scale/``, reusable by other modules):

* ``manifest-10000000.parquet``: 10^7 rows cycling over 300 real JPEGs (``WORKDIR/img``).
* ``done-10000000-9990000/``: its output with every row but the last 10^4 done, in 500,000-row parts with the
  persisted resume index, as a run's end leaves it (benchmarks/_fixtures.build_done_output: the library's own
  part writer and index). A few minutes to build, 1.2 GB on disk.
* ``fixture.json``: what was built, and the simulator port the fixture's fingerprints name (a row's fingerprint
  records the endpoint, so runs on the fixture use a simulator on that same port: ``ScaleFixture.simulator``).

A figure never changes a fixture: ``ScaleFixture.clone_done(name)`` gives each run its own copy, made of hard
links (parts are never modified in place; the store replaces files by renaming).

Plugging a figure in: a function ``(ctx: ScaleContext) -> None`` that reports with ``ctx.report.add(...)``, and one
line in ``SCALE_FIGURES`` naming it ``"module:function"`` (a module of benchmarks/; one not there yet is skipped
with a note).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SimulatorProcess, spawn_simulator, synthetic_manifest
from _fixtures import build_done_output, job_dict, make_job, output_layout

from qwenvl_batch.store import state_dir_for

SCALE_ROWS = 10_000_000
LEFT = 10_000  # rows still to send in the resumed 10^7-row run
BASELINE_ROWS = 10_000
MILLION = 1_000_000
FIXTURE_VERSION = 1  # bump when the fixture's shape changes: a cached one of another version is rebuilt

# (label, "module:function"): one line per figure; other modules plug theirs in here
SCALE_FIGURES: list[tuple[str, str]] = [
    ("resume", "scale:fig_resume"),
    ("read", "scale:fig_read"),  # estimate / report / status at 10^7 (benchmarks/scale_read.py)
    ("million", "scale:fig_million"),
]


@dataclass(frozen=True)
class ScaleFixture:
    """The 10^7-row inputs: the manifest, its output with all but ``left`` rows done, and the simulator port."""

    root: Path  # WORKDIR/scale
    manifest: Path
    done_output: Path
    rows: int
    left: int
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/compatible-mode/v1"

    def job(self, output: Path, *, concurrency: int = 64, **limits: Any) -> dict[str, Any]:
        """The fixture's job (the settings its fingerprints were made with), writing to ``output``."""
        return job_dict(self.manifest, output, self.base_url, concurrency=concurrency, **limits)

    def clone_done(self, name: str) -> Path:
        """A private copy of the done output (and its state folder) made of hard links, under ``root/runs``."""
        target = self.root / "runs" / name
        for source, copy in ((self.done_output, target), (state_dir_for(self.done_output), state_dir_for(target))):
            shutil.rmtree(copy, ignore_errors=True)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, copy, copy_function=_link_or_copy)
        return target

    @contextlib.contextmanager
    def simulator(self, *args: str) -> Iterator[SimulatorProcess]:
        """A zero-latency simulator (plus ``args``) on the port the fixture's fingerprints name."""
        cmd = [sys.executable, "-m", "qwenvl_batch", "simulate", "--port", str(self.port), *args]
        with spawn_simulator(cmd) as sim:
            if sim.url.rstrip("/") != self.base_url:
                raise RuntimeError(f"the simulator serves {sim.url}, the fixture was built for {self.base_url}")
            yield sim


def _link_or_copy(source: str, target: str) -> None:
    """Hard links for parts and the index; the lock is copied (a shared inode would share the flock)."""
    if Path(source).name == "lock":
        shutil.copy2(source, target)
    else:
        os.link(source, target)


def build_fixture(workdir: Path, images: list[str], *, rows: int = SCALE_ROWS, left: int = LEFT,
                  log: Callable[[str], None] = print) -> ScaleFixture:
    """The 10^7-row fixture under ``workdir/scale`` (``images`` are names under ``workdir/img``); built once,
    reused while ``fixture.json`` says it is complete and of this version."""
    root = workdir / "scale"
    root.mkdir(parents=True, exist_ok=True)
    record = root / "fixture.json"
    manifest = root / f"manifest-{rows}.parquet"
    done = root / f"done-{rows}-{rows - left}"
    if record.exists():
        raw = json.loads(record.read_text())
        if raw.get("version") == FIXTURE_VERSION and raw.get("rows") == rows and raw.get("left") == left \
                and manifest.exists() and done.exists():
            return ScaleFixture(root, manifest, done, rows, left, int(raw["port"]))
        record.unlink()
    started = time.perf_counter()
    synthetic_manifest(manifest, rows, images)  # image paths relative to the manifest: make them resolve
    img = root / "img"
    if not img.exists():
        img.symlink_to(workdir / "img", target_is_directory=True)
    log(f"[scale] manifest: {rows:,} rows in {time.perf_counter() - started:.0f} s")
    fixture = ScaleFixture(root, manifest, done, rows, left, _free_port())
    for path in (done, state_dir_for(done)):
        shutil.rmtree(path, ignore_errors=True)
    built = build_done_output(make_job(fixture.job(done), workdir), rows - left)
    log(f"[scale] done output: {rows - left:,} rows in {built:.0f} s")
    record.write_text(json.dumps({"version": FIXTURE_VERSION, "rows": rows, "left": left, "port": fixture.port}))
    return fixture


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ScaleContext:
    """What a scale figure gets: the work folder, the fixture, the report, and run.py's Bench (runs in a child)."""

    workdir: Path
    fixture: ScaleFixture
    report: Any  # run.Report
    bench: Any  # run.Bench
    full_run_rows: int = MILLION  # the ``million`` figure's run (smaller: a quick look at the same code path)


# ---------------------------------------------------------------------------------------------- resume at 10^7


def fig_resume(ctx: ScaleContext) -> None:
    """Start-up and memory of a 10^7-row resume with 10^4 rows left, against a 10^4-row full run."""
    fig, fx, b = "S1", ctx.fixture, ctx.bench
    with fx.simulator() as sim:
        name = f"scale-baseline-{BASELINE_ROWS}"
        base = b.run(name, job_dict(b.manifest("small", BASELINE_ROWS), b.output(name), sim.url, concurrency=64), sim)
        ctx.report.add(fig, f"peak RSS, {BASELINE_ROWS:,}-row full run (the baseline)",
                       f"{base['peak_rss_mb']:,.0f} MB")
        for variant in ("stamped", "fingerprints recomputed", "no persisted index"):
            out = fx.clone_done(f"resume-{variant.split()[0]}")
            _prepare(out, fx, variant)
            r = b.run(f"scale-resume-{variant.split()[0]}", fx.job(out), sim)
            if r["to_do"] != fx.left:
                ctx.report.note(fig, f"{variant}: the plan said {r['to_do']} to do, expected {fx.left:,}")
            _report_start(ctx, fig, variant, r, base, target=variant == "stamped")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(state_dir_for(out), ignore_errors=True)


def _prepare(out: Path, fx: ScaleFixture, variant: str) -> None:
    """The clone as the variant needs it: as built; its index without a stamp; or without an index."""
    from qwenvl_batch.persisted_index import INDEX_FILE
    from qwenvl_batch.store import open_for_reading

    index = state_dir_for(out) / INDEX_FILE
    if variant == "no persisted index":
        index.unlink()
    elif variant == "fingerprints recomputed":
        open_for_reading(out).save_resume_index(stamp=None)  # the library rewrites it (a new file, not the link)


def _report_start(ctx: ScaleContext, fig: str, variant: str, r: dict[str, Any], base: dict[str, Any], *,
                  target: bool) -> None:
    fx = ctx.fixture
    what = f"{fx.rows:,} rows, last {fx.left:,} to do, {variant}"
    if r["error"] or not r["first_send"]:
        ctx.report.add(fig, f"{what}: process start → first request", f"no request ({r['error']})",
                       "≤ 10 s" if target else "", False if target else None)
        return
    first = r["first_send"] - r["spawned_at"]
    growth = r["peak_rss_mb"] - base["peak_rss_mb"]
    summary = r["summary"] or {}
    load = os.getloadavg()[0]
    ctx.report.add(fig, f"{what}: process start → first request",
                   f"{first:.1f} s, {r['cpu_first_send']:.1f} s of CPU (imports {r['run_start'] - r['spawned_at']:.1f}"
                   f" s, end of planning {r['plan_end'] - r['spawned_at']:.1f} s; whole run "
                   f"{r['run_end'] - r['spawned_at']:.1f} s, {summary.get('ok', 0):,} ok; load average {load:.1f} on "
                   f"{os.cpu_count()} cores)", "≤ 10 s" if target else "", first <= 10 if target else None)
    ctx.report.add(fig, f"{what}: peak RSS − the {BASELINE_ROWS:,}-row run",
                   f"{growth:+,.0f} MB ({r['peak_rss_mb']:,.0f} MB)", "≤ +300 MB" if target else "",
                   growth <= 300 if target else None)


# ---------------------------------------------------------------------------------------------- a 10^6-row run


def fig_million(ctx: ScaleContext) -> None:
    """A full 10^6-row run, zero-latency simulator: the files it leaves and the worst stall while sending."""
    fig, b, size = "S2", ctx.bench, ctx.full_run_rows
    name = f"scale-full-{size}"
    out = b.output(name)
    with ctx.fixture.simulator() as sim:
        r = b.run(name, job_dict(b.manifest("small", size), out, sim.url, concurrency=64), sim)
    parts, groups, rows = output_layout(out)
    summary = r["summary"] or {}
    ctx.report.add(fig, f"full {size:,}-row run: Parquet files left",
                   f"{parts} files, {groups} row groups, {rows:,} rows ({summary.get('ok', 0):,} ok; "
                   f"{summary.get('wall_s', 0):,.0f} s; peak RSS {r['peak_rss_mb']:,.0f} MB)", "≤ 5 files",
                   parts <= 5 and rows == size)
    ctx.report.add(fig, f"full {size:,}-row run: worst event-loop stall while sending",
                   f"{r['stall_worst_sending_not_descheduled_s'] * 1000:,.0f} ms (raw "
                   f"{r['stall_worst_sending_s'] * 1000:,.0f} ms; {r['stalls_over_50ms_sending']} over 50 ms, by cause "
                   f"{r['stalls_over_50ms_sending_by_cause']}; {r['full_gcs']} full collections, longest "
                   f"{r['full_gc_worst_s'] * 1000:,.0f} ms; folds while sending {r['folds_while_sending']})")


# ---------------------------------------------------------------------------------------------- read commands


def fig_read(ctx: ScaleContext) -> None:
    """Figure 10: status, report, report --html and estimate on the fixture (benchmarks/scale_read.py measures;
    this hands it the fixture and a job file with the settings the fixture's fingerprints were made with)."""
    import scale_read

    fx = ctx.fixture
    output = fx.clone_done("read")
    job = fx.root / "runs" / "read-job.toml"
    job.write_text(scale_read._toml(fx.job(output)), encoding="utf-8")
    for measure, value, target, passed in scale_read.figures(ctx.workdir, fx.manifest, output, job):
        ctx.report.add("10", measure, value, target, passed)


# ---------------------------------------------------------------------------------------------- entry points


def run_scale(bench: Any, figures: list[str] | None = None, full_run_rows: int = MILLION) -> None:
    """Every scale figure (or those named) on ``bench``'s work folder and report (called by run.py --scale)."""
    fixture = build_fixture(bench.workdir, bench.small_images, log=lambda text: print(text, flush=True))
    ctx = ScaleContext(bench.workdir, fixture, bench.report, bench, full_run_rows)
    for label, target in SCALE_FIGURES:
        if figures and label not in figures:
            continue
        module_name, function_name = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            bench.report.note(label, f"benchmarks/{module_name}.py is not there; skipped")
            continue
        figure: Callable[[ScaleContext], None] = getattr(module, function_name)
        started = time.perf_counter()
        try:
            figure(ctx)
        except Exception as exc:  # one figure's crash is a FAIL line, the others still run
            import traceback

            traceback.print_exc()
            bench.report.add(label, "benchmark error", f"{type(exc).__name__}: {str(exc)[-500:]}", "runs", False)
        bench.report.note(label, f"took {time.perf_counter() - started:,.0f} s")


def main() -> int:
    import run  # run.py: the Bench, the Report and the machine line

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the fixtures here (default: a temporary folder)")
    parser.add_argument("--figures", nargs="+", choices=[label for label, _ in SCALE_FIGURES])
    parser.add_argument("--full-run-rows", type=int, default=MILLION,
                        help="rows of the `million` figure's full run (default 10^6; fewer for a quick look)")
    args = parser.parse_args()
    print(f"qwenvl-batch scale benchmark of {run.revision()} on {run.machine()}", flush=True)
    report = run.Report()
    with tempfile.TemporaryDirectory(prefix="qwenvl-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        run_scale(run.Bench(workdir, run.FULL, report), args.figures, args.full_run_rows)
    print("\n## Summary (scale)\n")
    print(report.table())
    return 1 if any(r.passed is False for r in report.results) else 0


if __name__ == "__main__":
    sys.exit(main())
