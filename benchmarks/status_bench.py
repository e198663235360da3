"""How long `qwenvl-batch status` and `report --html` take on a 10^6-row output (target: status ≤ 2 s).

Builds (once, in a temporary folder) a 1.1 × 10^6-row Parquet manifest and an output holding 10^6 finished rows
in ~10 parts, written by the store itself (benchmarks/_fixtures.build_done_output), plus an unfolded journal
segment of 2,000 recent error rows, as a job mid-run would have. Then times, each 3 times (the best and the
median are printed):

- `qwenvl-batch status OUT --job JOB` as a fresh process (what a person typing it waits for: interpreter start,
  imports, the manifest's size, the pass over the output), and `status.read_status` in-process;
- `status --job` with a CSV manifest (its rows are counted by a pass over the id column, not read from a footer);
- `qwenvl-batch report OUT --html FILE --job JOB` (the summary and the charts, one pass over the output).

    python benchmarks/status_bench.py            # 10^6 rows
    python benchmarks/status_bench.py --rows 100000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import synthetic_images, synthetic_manifest
from _fixtures import add_error_segment, build_done_output, job_dict, make_job

from qwenvl_batch.status import manifest_rows, read_status
from qwenvl_batch.store import open_for_reading


def _write_job(path: Path, manifest: Path, output: Path) -> Path:
    path.write_text(f'[input]\npath = "{manifest}"\n\n[output]\npath = "{output}"\n\n[model]\nname = "qwen3-vl-flash"\n'
                    'base_url = "http://127.0.0.1:9/v1"\napi_key_optional = true\n\n[prompt]\nuser = "Caption."\n')
    return path


def _add_recent_errors(output: Path, manifest: Path, first: int, count: int) -> None:
    """A journal segment of ``count`` error rows finished over the last minutes (not folded: a running job's)."""
    rows = pd.read_parquet(manifest).iloc[first: first + count]
    now = np.datetime64(int(time.time() * 1e6), "us")
    add_error_segment(output, list(rows["id"]), list(rows["image"]),
                      now - np.arange(count)[::-1].astype("timedelta64[ms]") * 60)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _times(command: list[str], repeat: int = 3) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each run of ``command`` (CPU is what the wall time would be on an idle core: the
    shared benchmark machine is often busy)."""
    wall, cpu = [], []
    for _ in range(repeat):
        started, cpu_before = time.perf_counter(), _children_cpu_s()
        subprocess.run(command, check=True, capture_output=True)
        wall.append(time.perf_counter() - started)
        cpu.append(_children_cpu_s() - cpu_before)
    return wall, cpu


def _line(name: str, values: tuple[list[float], list[float]]) -> str:
    wall, cpu = values
    return (f"  {name:<52} wall best {min(wall):5.2f} s, median {statistics.median(wall):5.2f} s;"
            f" CPU best {min(cpu):5.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="finished rows in the output")
    parser.add_argument("--workdir", type=Path, help="build the fixture here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="status-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        images = synthetic_images(work / "img", 4)
        manifest = synthetic_manifest(work / "manifest.parquet", args.rows + args.rows // 10, images)
        csv_manifest = work / "manifest.csv"
        pd.read_parquet(manifest).to_csv(csv_manifest, index=False)
        output = work / "out.parquet"
        job = make_job(job_dict(manifest, output, "http://127.0.0.1:9/v1", concurrency=8), work)
        if output.exists():
            shutil.rmtree(output)
            shutil.rmtree(output.with_name(output.name + ".state"))
        built = build_done_output(job, args.rows, part_rows=100_000)  # ~10 parts, as figure 9 was measured
        _add_recent_errors(output, manifest, args.rows, 2_000)
        job_file = _write_job(work / "job.toml", manifest, output)
        csv_job = _write_job(work / "job-csv.toml", csv_manifest, output)
        cli = [sys.executable, "-m", "qwenvl_batch"]
        print(f"output: {args.rows:,} ok rows in {len(open_for_reading(output).parts())} parts + 2,000 error rows in "
              f"the journal (built in {built:.1f} s); manifest {args.rows + args.rows // 10:,} rows")
        in_process: tuple[list[float], list[float]] = ([], [])
        for _ in range(3):
            started, cpu_before = time.perf_counter(), time.process_time()
            status = read_status(output, total=manifest_rows(job))
            in_process[0].append(time.perf_counter() - started)
            in_process[1].append(time.process_time() - cpu_before)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"status: {status.done:,} done, {status.pending:,} pending, {len(status.last_errors)} last errors")
        print(_line("status --job JOB (new process, Parquet manifest)", _times([*cli, "status", str(output), "--job",
                                                                              str(job_file)])))
        print(_line("read_status + manifest_rows (in process)", in_process))
        print(_line("status --job JOB (new process, CSV manifest)", _times([*cli, "status", str(output), "--job",
                                                                          str(csv_job)])))
        print(_line("report --html FILE --job JOB (new process)", _times(
            [*cli, "report", str(output), "--html", str(work / "report.html"), "--job", str(job_file)], repeat=1)))
        print(f"  report.html: {(work / 'report.html').stat().st_size / 1024:,.0f} KB")


if __name__ == "__main__":
    main()
