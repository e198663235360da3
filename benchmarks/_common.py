"""Shared plumbing for the benchmarks: a simulator in its own process, synthetic manifests, CPU and RSS readings."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SimulatorProcess:
    """A running simulator: its base URL, and its process, whose CPU time a benchmark may want to read."""

    url: str
    pid: int

    def cpu_s(self) -> float:
        """User + system CPU seconds the simulator has used so far (Linux /proc; 0.0 where unavailable).

        Lets a benchmark tell "the runner is the bottleneck" from "the simulator on the same 2 cores is".
        """
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def simulator_process(*args: str, log: Path | None = None) -> Iterator[SimulatorProcess]:
    """Start `qwenvl-batch simulate` in a separate process (so its CPU is not the runner's); yields its handle."""
    cmd = [sys.executable, "-m", "qwenvl_batch", "simulate", "--port", "0", *args]
    if log is not None:
        cmd += ["--request-log", str(log)]
    with spawn_simulator(cmd) as sim:
        yield sim


@contextlib.contextmanager
def spawn_simulator(cmd: list[str]) -> Iterator[SimulatorProcess]:
    """Run a command that starts the simulator and prints its URL on its first line; stopped on exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"(http://127\.0\.0\.1:\d+/\S+)", line)
        if not match:
            raise RuntimeError(f"the simulator did not start: {line!r}")
        yield SimulatorProcess(url=match.group(1), pid=proc.pid)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def simulator(*args: str, log: Path | None = None) -> Iterator[str]:
    """Start `qwenvl-batch simulate` in a separate process (so its CPU is not the runner's); yields the base URL."""
    with simulator_process(*args, log=log) as sim:
        yield sim.url


def synthetic_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[str]:
    """A few real JPEG files that a large manifest points at over and over."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        path = folder / f"img{i:04d}.jpg"
        if not path.exists():
            Image.effect_noise(size, 40 + i % 50).convert("RGB").save(path, quality=85)
        names.append(path.name)
    return names


def synthetic_manifest(path: Path, rows: int, images: list[str], image_dir: str = "img") -> Path:
    """``rows`` rows (``id`` r00000000..., ``image`` cycling over ``images``) as Parquet, written a million rows at
    a time so that 10^7 rows need no more memory than 10^6; written to a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    schema = pa.schema([("id", pa.string()), ("image", pa.string())])
    names = np.array([f"{image_dir}/{name}" for name in images], dtype=object)
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, rows, 1_000_000):
            stop = min(start + 1_000_000, rows)
            ids = pa.array([f"r{i:08d}" for i in range(start, stop)], pa.string())
            cells = pa.array(names[np.arange(start, stop) % len(names)], pa.string())
            writer.write_table(pa.table([ids, cells], schema=schema))
    os.replace(tmp, path)
    return path


def cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu_start = cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.start
        self.cpu = cpu_s() - self.cpu_start
