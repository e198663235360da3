"""Progress across workers: each shard's live counters, summed on the driver into one ``progress.Counters``.

The driver shows the ordinary progress line (``progress.Progress``) over the sum, so a sharded run looks like one
process: rows done, ok / error / retries, tokens, spend and projected spend, rows per minute and the ETA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from qwenvl_batch.progress import Counters


def copy_counters(counters: Counters | None = None) -> Counters:
    """A copy of one shard's ``Counters`` (its own dicts), to send across the cluster once a second."""
    if counters is None:
        return Counters()
    return dataclasses.replace(counters, retry_reasons=dict(counters.retry_reasons),
                               error_types=dict(counters.error_types))


def merge_counters(into: Counters, shards: Iterable[Counters]) -> None:
    """Set ``into``'s live totals to the sum of the shards' (its run-level fields, to_do and prior_cost, stay)."""
    into.ok = into.errors = into.retries = into.prompt_tokens = into.completion_tokens = 0
    into.cost = 0.0
    into.retry_reasons, into.error_types = {}, {}
    for shard in shards:
        into.ok += shard.ok
        into.errors += shard.errors
        into.retries += shard.retries
        into.prompt_tokens += shard.prompt_tokens
        into.completion_tokens += shard.completion_tokens
        into.cost += shard.cost
        for total, part in ((into.retry_reasons, shard.retry_reasons), (into.error_types, shard.error_types)):
            for key, n in part.items():
                total[key] = total.get(key, 0) + n
