"""qwenvl-batch: run Qwen-VL (or any OpenAI-compatible vision model) over an image manifest, into Parquet.

The public API; the ``qwenvl-batch`` command is a thin layer over it::

    from qwenvl_batch import load_job, run_job
    summary = run_job(load_job("jobs/caption.toml", {"simulate": True}))
    print(summary.ok, summary.errors, summary.output)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import JobConfig, job_from_dict, load_job  # noqa: E402
from .errors import ConfigError, InputRowError, JobError, QwenVLBatchError, RowError  # noqa: E402
from .runner import RunSummary, run_job, run_job_async  # noqa: E402
from .store import load_results  # noqa: E402

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
