"""A local SIMULATOR of Model Studio's OpenAI-compatible Chat Completions endpoint for Qwen-VL.

It is not the real service. The demo (``--simulate``), every network test and the benchmarks run against
it, so it copies what a batch runner has to cope with: the request and response shapes (non-stream and
SSE stream, reference seed document), the usage the provider reports (image tokens from
``qwenvl_batch.tokens``, so estimates and served usage agree exactly), the provider's error bodies and
codes (reference §3, §4), its RPM/TPM limits with per-second windows (§3.1), latency, and faults (5xx,
429, dropped and hung connections, cut streams, partial responses, moderation), either at random (seeded)
or on demand with ``[[sim:KIND]]`` / ``[[sim:KIND:N]]`` markers in the request text.

Every response carries ``x-simulator: qwenvl-batch`` and an ``x-request-id``. The answers are deterministic
functions of the request (text and images), never of ``seed`` or ``temperature``: tests can tell that each
row got its own answer, and a re-run gets the same one.

Modules, in the order a request meets them: ``config`` (models, limits, settings), ``handlers`` (HTTP),
``chat_request`` (parse and validate), ``ratelimit`` (the provider's windows), ``images`` (measure),
``faults``, ``answers`` (bodies and streams), ``state``; ``server`` runs it.
"""

from __future__ import annotations

from .config import KNOWN_MODELS, SimulatorConfig
from .faults import draw_latency
from .handlers import create_app
from .ratelimit import RateLimiter
from .server import SimulatorThread, iter_log_file, serve
from .state import STATE_KEY, SimulatorState

__all__ = [
    "KNOWN_MODELS",
    "STATE_KEY",
    "RateLimiter",
    "SimulatorConfig",
    "SimulatorState",
    "SimulatorThread",
    "create_app",
    "draw_latency",
    "iter_log_file",
    "serve",
]
