"""Shared fixtures: a real simulator on 127.0.0.1 and small jobs with real image files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from qwenvl_batch.config import JobConfig, job_from_dict
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread

# Unexpected exceptions should crash tests rather than become friendly messages.
sys._called_from_test = True  # type: ignore[attr-defined]

FAST_LIMITS = {"concurrency": 8, "max_attempts": 4, "retry_initial_s": 0.01, "retry_max_s": 0.05,
               "timeout_s": 10.0, "grace_s": 2.0}


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """A fresh, fault-free simulator per test."""
    with SimulatorThread(SimulatorConfig()) as server:
        yield server


def write_image(path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 80, 40),
                fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    """CSV, Parquet or JSONL by suffix."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def image_rows(folder: Path, n: int, prefix: str = "row") -> list[dict[str, Any]]:
    """n rows, each with its own small image (different sizes, so different token counts)."""
    rows = []
    for i in range(n):
        image = write_image(folder / "img" / f"{prefix}{i}.jpg", size=(40 + i % 7 * 30, 30 + i % 5 * 20),
                            color=(i * 37 % 255, 90, 150))
        rows.append({"id": f"{prefix}-{i:04d}", "image": f"img/{image.name}", "note": f"note {i}"})
    return rows


@pytest.fixture
def make_job(tmp_path: Path, sim: SimulatorThread) -> Callable[..., JobConfig]:
    """Build a job over a manifest in tmp_path that talks to the test's simulator."""

    def build(manifest: Path, *, model: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
              prompt: dict[str, Any] | None = None, run: dict[str, Any] | None = None,
              image_columns: list[str] | None = None, output: Path | None = None,
              pricing: dict[str, Any] | None = None) -> JobConfig:
        raw = {
            "input": {"path": str(manifest), "id_column": "id", "image_columns": image_columns or ["image"]},
            "output": {"path": str(output or tmp_path / "out" / "result.parquet")},
            "model": {"name": "qwen3-vl-flash", "base_url": sim.base_url, "api_key_optional": True,
                      "api_key_env": "QWENVL_TEST_KEY", **(model or {})},
            "prompt": {"user": "Describe row {id}.", **(prompt or {})},
            "limits": {**FAST_LIMITS, **(limits or {})},
            "run": {"progress": "off", **(run or {})},
            "pricing": pricing or {},
        }
        return job_from_dict(raw, base_dir=tmp_path)

    return build


def job_file(tmp_path: Path, base_url: str, *, rows: int | list[dict[str, Any]] | None = 4, output: str = "out",
             prompt: str = "Describe row {id}.", model: dict[str, Any] | None = None,
             limits: dict[str, Any] | None = None, run: dict[str, Any] | None = None,
             input: dict[str, Any] | None = None) -> Path:
    """A job file in tmp_path for tests that go through the CLI or a subprocess, over ``m.csv``: ``rows`` image
    rows written there (a count, the rows themselves, or None to write no manifest, e.g. with ``input``)."""
    if rows is not None:
        write_manifest(tmp_path / "m.csv", image_rows(tmp_path, rows) if isinstance(rows, int) else rows)
    raw: dict[str, dict[str, Any]] = {
        "input": {"path": "m.csv", **(input or {})},
        "output": {"path": output},
        "model": {"name": "qwen3-vl-flash", "base_url": base_url, "api_key_env": "QWENVL_TEST_KEY", **(model or {})},
        "prompt": {"user": prompt},
        "limits": {"retry_initial_s": 0.01, **(limits or {})},
    }
    if run:
        raw["run"] = run
    path = tmp_path / "job.toml"
    path.write_text("".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in section.items())
                            for name, section in raw.items()))
    return path


PRICES = """
[models."qwen3-vl-flash".any]
currency = "USD"
input_per_mtok = 10000
output_per_mtok = 10000
source = "test"
as_of = "2026-11-25"
"""


@pytest.fixture
def priced(tmp_path: Path) -> Path:
    """A price file that makes qwen3-vl-flash expensive (10,000 USD per 1M tokens), so a cap fires in a few rows."""
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return path


@pytest.fixture
def slow_sim() -> Iterator[SimulatorThread]:
    """A simulator slow enough (50 ms a request) that a run can be killed mid-way."""
    with SimulatorThread(SimulatorConfig(latency_s=0.05)) as server:
        yield server


def ok_requests_for(sim: SimulatorThread, key: str) -> int:
    """How many successful requests carried this row's id in their text (prompts are 'Describe row {id}.')."""
    return sum(1 for r in sim.requests if r["outcome"] == "ok" and f"row {key}." in r["text"])


class SimulatorProcess:
    """The simulator in a process of its own (``qwenvl-batch simulate``), for tests where timing matters: an
    in-process simulator shares the test's GIL and event-loop time, so a busy machine turns its latency into
    the client's timeouts."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        import subprocess

        self.log_path = tmp_path / f"sim-{id(self)}.jsonl"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwenvl_batch", "simulate", "--port", "0", "--request-log", str(self.log_path),
             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on " not in line:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"simulator did not start: {line!r} {err}")
        self.base_url = line.rsplit("listening on ", 1)[1].strip()

    @property
    def requests(self) -> list[dict[str, Any]]:
        from qwenvl_batch.simulator import iter_log_file

        return list(iter_log_file(self.log_path)) if self.log_path.exists() else []

    def stop(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
