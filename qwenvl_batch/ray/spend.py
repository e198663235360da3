"""The spend cap across a cluster: one ledger actor per run, and each shard's leased share of it.

The runner's ``SpendMeter`` admits a request only if committed spend plus the worst case of everything in flight
stays within the cap, and it decides synchronously, just before the request. Across workers that check needs one
ledger; asking it before every request would put an actor call on every request's path. Instead each shard holds
a *lease* (an amount of the cap it may commit or have in flight) and checks against it locally; when a request
does not fit, ``ready`` (awaited just before the check, limits.SpendMeter's hook) asks the ledger for more. The
ledger never leases more than ``cap - committed before the run``, so the cap holds across the cluster whatever
the shards do; a shard whose request does not fit in what is left stops with the same "Spend cap reached"
message as one process. Leases come in chunks of a share of what is left, so near the cap they shrink and the
last cents are not stranded in one shard while another stops.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from qwenvl_batch.limits import SpendMeter


class _SpendLedger:
    """What the cluster may still spend under the cap (``None``: uncapped), and each shard's lease of it."""

    def __init__(self, cap: float | None, committed: float, shards: int) -> None:
        self.cap = cap
        self.committed = committed
        self.shards = max(1, shards)
        self.leased: dict[int, float] = {}

    async def lease(self, shard: int, needed: float) -> float:
        """Lease at least ``needed`` more to ``shard`` if the cap allows it (more when plenty is left); 0.0 if not."""
        if self.cap is None:
            return float("inf")
        left = self.cap - self.committed - sum(self.leased.values())
        if needed > left + 1e-12:
            return 0.0
        amount = min(left, max(needed, left / (2 * self.shards)))
        self.leased[shard] = self.leased.get(shard, 0.0) + amount
        return amount

    async def settle(self, shard: int, spent: float) -> None:
        """A shard ended having spent ``spent``: that is committed, and the rest of its lease goes back."""
        self.leased.pop(shard, None)
        self.committed += spent


SpendLedger: Any = ray.remote(num_cpus=0)(_SpendLedger)  # typed Any: Ray's decorator hides the class


class LeasedSpend(SpendMeter):
    """A shard's spend meter: the cap it checks against is its lease; ``committed`` shows the output's spend."""

    def __init__(self, ledger: Any, shard: int, cap: float | None, committed_before: float) -> None:
        super().__init__(cap, committed_before)
        self.ledger = ledger
        self.shard = shard
        self.lease = 0.0
        self.spent = 0.0  # by this shard, this run
        self._lock = asyncio.Lock()

    def _fits(self, worst_case: float) -> bool:
        return self.spent + self.in_flight + worst_case <= self.lease + 1e-12

    async def ready(self, worst_case: float) -> None:
        if self.cap is None or self._fits(worst_case):
            return
        async with self._lock:
            if not self._fits(worst_case):
                needed = self.spent + self.in_flight + worst_case - self.lease
                self.lease += await self.ledger.lease.remote(self.shard, needed)

    def reserve(self, worst_case: float) -> bool:
        if self.cap is not None and not self._fits(worst_case):
            return False
        self.in_flight += worst_case
        return True

    def release(self, worst_case: float, actual: float) -> None:
        super().release(worst_case, actual)
        self.spent += actual

    async def close(self) -> None:
        """Return the unused lease to the ledger (the run's spend is then committed there)."""
        await self.ledger.settle.remote(self.shard, self.spent)
