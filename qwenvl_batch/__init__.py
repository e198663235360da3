"""qwenvl-batch: run Qwen-VL (or any OpenAI-compatible vision model) over an image manifest, into Parquet.

The public API; the ``qwenvl-batch`` command is a thin layer over it::

    from qwenvl_batch import run_job
    summary = run_job("jobs/caption.toml", simulate=True)
    print(summary.ok, summary.errors, summary.output)

Names are imported on first use, so ``import qwenvl_batch`` (and ``qwenvl-batch --version``) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "JobConfig": "config", "job_from_dict": "config", "load_job": "config",
    "ConfigError": "errors", "InputRowError": "errors", "JobError": "errors", "QwenVLBatchError": "errors",
    "RowError": "errors",
    "RunSummary": "runner",
    "run_job": "api", "run_job_async": "api",
    "load_results": "store",
}  # fmt: skip

__all__ = [
    "ConfigError",
    "InputRowError",
    "JobConfig",
    "JobError",
    "QwenVLBatchError",
    "RowError",
    "RunSummary",
    "__version__",
    "job_from_dict",
    "load_job",
    "load_results",
    "run_job",
    "run_job_async",
]

if TYPE_CHECKING:
    from .api import run_job, run_job_async
    from .config import JobConfig, job_from_dict, load_job
    from .errors import ConfigError, InputRowError, JobError, QwenVLBatchError, RowError
    from .runner import RunSummary
    from .store import load_results


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwenvl_batch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
