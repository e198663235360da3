"""Ray scale-out (issue 15): OCR pages/s with 1 and 2 workers, and what the shared limiter costs per permit.

    python benchmarks/ray_bench.py                  # both, ~3 minutes on 2 cores
    python benchmarks/ray_bench.py --pages 60       # a quicker look at (a)
    python benchmarks/ray_bench.py --only limiter   # (c) alone, ~30 s

(a) **OCR of PDF pages** (the documents pipeline: each page rendered at ``qwen-vl-ocr``'s budget, 2432×3424,
    ~180 ms of CPU, then sent): the archive of benchmarks/documents_bench.py, run as a ``[documents]`` job with
    ``run_job_on_ray`` on a local Ray cluster (4 logical CPUs) with 1 and with 2 workers (one render process
    each), against the simulator in its own process (no latency, no rate limit). Pages/s are counted at the
    simulator, first to last request (the workers' start-up, ~2 s, is not in them; the wall time is printed
    too). One process without Ray is the baseline. Rendering is the bound, so 2 workers on 2 cores should give
    up to ~2× — minus what the simulator and everything else on the machine take.
(c) **The limiter actor's overhead per permit**: a Ray task calls ``LimiterActor.acquire`` (metered far above
    any wait) back to back with batches of 1 and 32 permits; µs of wall time per permit, and the actor's own
    CPU per permit. The runner's in-process ``limits.Limiter`` is the reference.

Ratios are within one run; the machine is shared, so the script prints the load average beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import simulator_process
from documents_bench import write_archive

from qwenvl_batch import job_from_dict, run_job
from qwenvl_batch.config import JobConfig
from qwenvl_batch.limits import Limiter
from qwenvl_batch.media import pages as pages_module
from qwenvl_batch.simulator import iter_log_file


def ocr_job(folder: Path, pdf: Path, base_url: str, pages: int) -> JobConfig:
    (folder / "m.csv").write_text(f"doc_id,path\nreport,{pdf}\n")
    for stale in ("out.parquet", "out.parquet.state"):
        shutil.rmtree(folder / stale, ignore_errors=True)
    return job_from_dict({
        "input": {"path": str(folder / "m.csv"), "id_column": "doc_id", "image_columns": ["path"]},
        "output": {"path": str(folder / "out.parquet")},
        "model": {"name": "qwen-vl-ocr", "base_url": base_url, "api_key_optional": True,
                  "api_key_env": "NO_KEY_NEEDED", "min_pixels": 3072, "max_pixels": 8_388_608, "max_tokens": 200},
        "prompt": {"user": "Read the page."},
        "documents": {"max_pages": pages, "render_processes": 1},
        "limits": {"concurrency": 16},
        "run": {"progress": "off"},
    }, base_dir=folder)


class CpuSampler:
    """CPU seconds of the job's processes (this one, the Ray shard workers, the render processes), sampled from
    /proc every 0.2 s while the job runs (a process that ends keeps its last sample): the robust figure on a
    shared machine, where wall-clock rates depend on what else runs."""

    # Ray's shard workers, and render processes started with this interpreter (not another checkout's)
    MARKERS = (b"ShardWorker", sys.executable.encode() + b"\x00-m\x00qwenvl_batch.media.render_worker")

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample()
        self._before = dict(self.seen)  # CPU so far of processes already there (this one, a render process)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(self.seen.values()) - sum(self._before.values())

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if pid != os.getpid() and not any(m in (entry / "cmdline").read_bytes() for m in self.MARKERS):
                    continue
                self.seen[pid] = _cpu_s(pid)
            except OSError:
                continue


def send_rate(log: Path) -> float:
    """Pages per second at the simulator, from its first to its last request."""
    times = sorted(entry["t"] for entry in iter_log_file(log))
    return (len(times) - 1) / (times[-1] - times[0])


def ocr(pages: int) -> None:
    import ray

    from qwenvl_batch.ray import run_job_on_ray

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pdf = folder / "archive.pdf"
        write_archive(pdf, pages)
        print(f"(a) OCR: {pages} A4 pages ({pdf.stat().st_size / 2**20:.0f} MiB PDF), qwen-vl-ocr budget, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        try:
            for label, workers in (("one process, no Ray", 0), ("--ray, 1 worker", 1), ("--ray, 2 workers", 2)):
                log = folder / f"sim-{workers}.jsonl"
                with simulator_process(log=log) as sim:
                    job = ocr_job(folder, pdf, sim.url, pages)
                    started = time.perf_counter()
                    with CpuSampler() as cpu:
                        summary = run_job(job) if not workers else run_job_on_ray(job, workers=workers)
                    wall = time.perf_counter() - started
                pages_module.shutdown_renderer()  # the one-process run's render process (Ray workers' end with them)
                assert summary.ok == pages, summary.lines()
                print(f"    {label:<22} {send_rate(log):5.1f} pages/s sent; the job's processes used "
                      f"{cpu.cpu_s / wall:.2f} cores, {1000 * cpu.cpu_s / pages:.0f} ms CPU per page (wall "
                      f"{wall:5.1f} s incl. start-up, load average {os.getloadavg()[0]:.1f})")
        finally:
            ray.shutdown()


def limiter_overhead(permits: int) -> None:
    import ray

    from qwenvl_batch.ray.limiter import LimiterActor

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        actor = LimiterActor.remote(1e12, None)  # far above any wait: only the bookkeeping and the call cost
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

        @ray.remote(num_cpus=0)
        def client(actor: Any, batch: int, permits: int) -> float:
            async def main() -> float:
                await actor.acquire.remote(batch, 100.0, [])  # warm
                started = time.perf_counter()
                for _ in range(permits // batch):
                    await actor.acquire.remote(batch, 100.0, [("accepted", None)] * batch)
                return time.perf_counter() - started

            return asyncio.run(main())

        print(f"(c) limiter actor, {permits:,} permits from one client, load average {os.getloadavg()[0]:.1f}")
        for batch in (1, 32):
            cpu0 = _cpu_s(pid)
            wall = ray.get(client.remote(actor, batch, permits))
            cpu = _cpu_s(pid) - cpu0
            print(f"    batch {batch:>2}: {1e6 * wall / permits:7.1f} µs per permit (wall), actor CPU "
                  f"{1e6 * cpu / permits:6.1f} µs per permit, {permits / wall:9,.0f} permits/s")
    finally:
        ray.shutdown()
    print(f"    in-process limits.Limiter (one process, the reference): {1e6 * local_limiter(permits) / permits:.1f} "
          "µs per permit")


def local_limiter(permits: int) -> float:
    limiter = Limiter(requests_per_minute=1e12, tokens_per_minute=None)

    async def main() -> float:
        started = time.perf_counter()
        for _ in range(permits):
            await limiter.acquire(100)
            limiter.settle(100, 100)
        return time.perf_counter() - started

    return asyncio.run(main())


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=120)
    parser.add_argument("--permits", type=int, default=20_000)
    parser.add_argument("--only", choices=["ocr", "limiter"])
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.only in (None, "limiter"):
        limiter_overhead(args.permits)
    if args.only in (None, "ocr"):
        ocr(args.pages)


if __name__ == "__main__":
    main()
