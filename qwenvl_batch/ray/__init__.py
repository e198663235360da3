"""Beyond one machine: run a job on a Ray cluster (``pip install "qwenvl-batch[ray]"``).

Two ways in, both sharing one rate limit per account and model (a named Ray actor, limiter.py):

* ``run_job_on_ray(job, address=None, workers=N)`` (``qwenvl-batch run JOB --ray``): the manifest is split into
  shards, each shard runs the ordinary runner in a Ray actor with its own journal inside the output, and the
  driver compacts at the end (shards.py). Same per-row resume and ``kill -9`` guarantee as one process.
* ``QwenVLCaller``: an async callable class for ``ray.data.Dataset.map_batches`` in a pipeline of your own
  (caller.py); resume is then Ray Data's own (block-level) checkpointing.

Nothing in the rest of the package imports Ray; importing this package without it says how to install it.
"""

from __future__ import annotations

try:
    import ray  # noqa: F401  (absolute: the real Ray, not this package)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('qwenvl_batch.ray needs Ray: pip install "qwenvl-batch[ray]" (ray[data]>=2.60)') from exc

from qwenvl_batch.ray.caller import QwenVLCaller
from qwenvl_batch.ray.limiter import LimiterActor, RemoteLimiter, limiter_name, shared_limiter
from qwenvl_batch.ray.shards import run_job_on_ray

__all__ = ["LimiterActor", "QwenVLCaller", "RemoteLimiter", "limiter_name", "run_job_on_ray", "shared_limiter"]
