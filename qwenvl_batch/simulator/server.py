"""Running the simulator: in a background thread (tests, ``--simulate``) or in the foreground
(``qwenvl-batch simulate``), bound to loopback only."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import ConfigError
from .config import ROUTE_PREFIXES, SimulatorConfig, logger
from .handlers import create_app
from .state import STATE_KEY, SimulatorState

# Running it
# --------------------------------------------------------------------------------------------------------


async def _start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; the backlog is large because benchmarks open hundreds of connections at once."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def _stop_site(app: web.Application, runner: web.AppRunner) -> None:
    """Release hung requests first, so the runner's graceful shutdown does not wait for them."""
    app[STATE_KEY].stopping.set()
    await runner.cleanup()


def _url(host: str, port: int) -> str:
    """The base URL clients use (``/compatible-mode/v1``, like the provider's)."""
    host_part = f"[{host}]" if ":" in host else host
    return f"http://{host_part}:{port}{ROUTE_PREFIXES[0]}"


class SimulatorThread:
    """The simulator on 127.0.0.1 in a background thread with its own event loop (for tests and the demo)."""

    def __init__(self, config: SimulatorConfig | None = None, *, port: int = 0) -> None:
        self.config = config or SimulatorConfig()
        self.app = create_app(self.config)
        self.base_url = ""
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    def start(self) -> SimulatorThread:
        """Start serving; returns once the port is bound (raises what startup raised)."""
        self._thread = threading.Thread(target=self._run, name="qwenvl-batch-simulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def _run(self) -> None:
        """Thread body: bind, signal readiness, serve until stop(), then shut down on the same loop."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._runner, self.port = loop.run_until_complete(_start_site(self.app, "127.0.0.1", self.port))
        except BaseException as exc:  # noqa: BLE001 - handed to start() in the caller's thread, which re-raises it
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self.base_url = _url("127.0.0.1", self.port)
        logger.info("qwenvl-batch simulator (not the real service) listening on %s", self.base_url)
        self._loop = loop
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(_stop_site(self.app, self._runner))
        loop.close()

    def stop(self) -> None:
        """Stop serving (hung requests are released) and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = None

    def __enter__(self) -> SimulatorThread:
        """Start; ``with SimulatorThread(...) as sim:``."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop."""
        self.stop()

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the ``/_sim/*`` routes live here)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> SimulatorState:
        """The server state (read its log with ``requests``)."""
        return self.app[STATE_KEY]

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of the request log, safe to read while the server runs."""
        return self.state.snapshot()

    @property
    def stats(self) -> dict[str, int]:
        """Counts by outcome."""
        return self.state.stats()

    def reset(self) -> None:
        """Forget log, stats, marker counts and rate windows (runs on the server's loop)."""
        if self._loop is None:
            self.state.reset()
            return
        asyncio.run_coroutine_threadsafe(_reset(self.state), self._loop).result()


async def _reset(state: SimulatorState) -> None:
    """Reset on the server's loop, so it cannot interleave with a request in flight."""
    state.reset()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses: the simulator must not be reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve in the foreground until SIGINT/SIGTERM, printing the one line that says where (and what) it is."""
    if not is_loopback(host):
        raise ConfigError(f"the simulator only listens on loopback addresses (127.0.0.1, ::1, localhost), not {host!r}")
    asyncio.run(_serve(config, host, port))


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    """serve()'s body: print where we listen, wait for SIGINT/SIGTERM, shut down cleanly."""
    app = create_app(config)
    runner, bound_port = await _start_site(app, host, port)
    url = _url(host, bound_port)
    print(f"qwenvl-batch SIMULATOR (not the real Model Studio service) listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await _stop_site(app, runner)


def iter_log_file(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read a ``request_log`` JSONL file (for tests and benchmarks in another process)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)

