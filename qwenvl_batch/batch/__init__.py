"""``mode = "batch"`` (the provider's Batch API, half price, hours) and ``mode = "batch-chat"`` (the realtime
runner at DashScope's Batch Chat host). See README 'Batch mode'.

Modules in the order a job meets them: ``rules`` (one provider-rules object for DashScope and OpenAI),
``shards`` (rows → JSONL within the limits), ``state`` (the shard state file, durable at every step),
``backend`` (files and batches through the openai client), ``run`` (the lifecycle, crash-safe), ``results``
(result lines → output rows), ``manage`` (``qwenvl-batch batches OUT``: list, cancel).
"""

from __future__ import annotations

from .manage import batch_chat_job, cancel_batches, list_batches
from .run import BatchRun

__all__ = ["BatchRun", "batch_chat_job", "cancel_batches", "list_batches"]
