"""Faults on demand (``[[sim:KIND]]`` markers) or at random, latency draws and connection tricks."""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from .chat_request import ChatRequest, parse_markers
from .config import LOGNORMAL_SIGMA
from .state import SimulatorState

# Faults, latency, connection tricks
# --------------------------------------------------------------------------------------------------------


def marker_fault(request: ChatRequest, state: SimulatorState) -> str | None:
    """The first marker still due for this exact request text; applying it counts one use.

    Markers are tried in order, so ``[[sim:500:1]] [[sim:429:1]]`` gives a 500, then a 429, then answers.
    """
    text = request.full_text
    for kind, limit in parse_markers(text):
        if kind in ("badjson", "fenced", "badschema"):  # answer faults: simulator/structured.py applies them
            continue
        key = (kind, text)
        if limit is None or state.marker_counts[key] < limit:
            state.marker_counts[key] += 1
            return kind
    return None


def random_fault(state: SimulatorState) -> str | None:
    """One seeded draw against the stacked fault rates."""
    rates = state.config.random_fault_rates()
    if not any(rate for _, rate in rates):
        return None
    draw, upper = state.fault_rng.random(), 0.0
    for kind, rate in rates:
        upper += rate
        if draw < upper:
            return kind
    return None


def draw_latency(state: SimulatorState) -> float:
    """Seconds to wait before answering: fixed, uniform in [0, 2x], or lognormal with median = base."""
    cfg = state.config
    if cfg.latency_s <= 0:
        return 0.0
    if cfg.latency_dist == "uniform":
        delay = state.latency_rng.uniform(0.0, 2.0 * cfg.latency_s)
    elif cfg.latency_dist == "lognormal":
        delay = cfg.latency_s * math.exp(state.latency_rng.gauss(0.0, LOGNORMAL_SIGMA))
    else:
        delay = cfg.latency_s
    return min(delay, cfg.latency_max_s)


def close_connection(request: web.Request) -> web.Response:
    """Close the TCP connection with no (more) response bytes; the returned response is never sent."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


async def wait_unless_stopping(state: SimulatorState, seconds: float) -> None:
    """Sleep ``seconds``, waking early when the server shuts down (so hung requests do not block stop)."""
    try:
        await asyncio.wait_for(state.stopping.wait(), timeout=seconds)
    except TimeoutError:
        pass  # the normal way out: the time is up


# --------------------------------------------------------------------------------------------------------
