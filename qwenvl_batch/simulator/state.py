"""The simulator's mutable state: request log, per-model rate limiters, image-size cache."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
from aiohttp import web

from .chat_request import Trace
from .config import KNOWN_MODELS, SimulatorConfig
from .personas import Persona, get_persona
from .ratelimit import RateLimiter

# Server state
# --------------------------------------------------------------------------------------------------------


@dataclass
class SimulatorState:
    """Everything mutable the server keeps; only the event-loop thread mutates it (the log under a lock)."""

    config: SimulatorConfig
    models: frozenset[str]
    fault_rng: random.Random
    latency_rng: random.Random
    lock: threading.Lock = field(default_factory=threading.Lock)
    log: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    marker_counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    limiters: dict[str, RateLimiter] = field(default_factory=dict)
    image_cache: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    http: aiohttp.ClientSession | None = None
    log_file: IO[str] | None = None
    persona: Persona = field(default_factory=lambda: get_persona("dashscope"))

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> SimulatorState:
        """Fresh state; separate RNGs so enabling latency does not change which requests fail."""
        return cls(
            config=config,
            models=KNOWN_MODELS | frozenset(config.extra_models),
            fault_rng=random.Random(config.seed),
            latency_rng=random.Random(config.seed + 1),
            persona=get_persona(config.persona),
        )

    def record(self, trace: Trace, outcome: str, status: int | None, code: str | None = None) -> None:
        """Append to the in-memory log and, if configured, to the JSONL file, flushed for other processes."""
        entry = trace.entry(outcome, status, code)
        with self.lock:
            self.log.append(entry)
            self.outcomes[outcome] += 1
        if self.log_file is not None:
            self.log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.log_file.flush()

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy of the log, safe to read from another thread."""
        with self.lock:
            return list(self.log)

    def stats(self) -> dict[str, int]:
        """Counts by outcome."""
        with self.lock:
            return dict(self.outcomes)

    def reset(self) -> None:
        """Forget the log, stats, marker counts, rate windows and RNG positions (the log file is kept)."""
        with self.lock:
            self.log.clear()
            self.outcomes.clear()
        self.marker_counts.clear()
        self.limiters.clear()
        self.fault_rng.seed(self.config.seed)
        self.latency_rng.seed(self.config.seed + 1)

    def limiter(self, model: str) -> RateLimiter | None:
        """The model's limiter (limits are per model, as the provider's are), or None without limits."""
        cfg = self.config
        if cfg.requests_per_minute is None and cfg.tokens_per_minute is None:
            return None
        if model not in self.limiters:
            self.limiters[model] = RateLimiter.from_config(cfg)
        return self.limiters[model]


STATE_KEY: web.AppKey[SimulatorState] = web.AppKey("qwenvl_simulator_state", SimulatorState)
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("qwenvl_simulator_request_id", str)


# --------------------------------------------------------------------------------------------------------
