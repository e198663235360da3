"""A hostile OpenAI-compatible server for tests: it sends broken bodies, streams and headers on purpose.

Which misbehaviour a request gets is chosen by a marker in its prompt (``HOSTILE:<kind>``, put there through the
manifest's ``note`` column), so one job mixes good rows with exactly one bad one. Every request is counted per
row id, so a test can assert that nothing was bought twice. It runs on 127.0.0.1 in the simulator's thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections import Counter
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from qwenvl_batch.simulator import SimulatorThread
from qwenvl_batch.simulator.config import ROUTE_PREFIXES
from qwenvl_batch.simulator.state import STATE_KEY

KINDS = (
    "ok", "bad_json", "deep_json", "usage_wrong_type", "usage_huge", "usage_negative", "surrogate", "gzip_bomb",
    "sse_bad_chunk", "sse_no_done", "echo_auth", "echo_auth_401", "retry_after_once",
    "ratelimit_tiny",
)
BOMB_BYTES = 1024**3  # what the gzip bomb inflates to (its body on the wire is ~1 MB)
_MARK = re.compile(r"HOSTILE:(\w+)")
_ROW = re.compile(r"row (\S+?)\.")


class HostileServer(SimulatorThread):
    """The simulator's thread serving the hostile app; ``asked[(row, kind)]`` counts what was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: Counter[tuple[str, str]] = Counter()
        self.auth_seen: list[str] = []
        self.app = _app(self)
        self._bomb: bytes | None = None

    def bomb(self) -> bytes:
        """A gzip body that inflates to BOMB_BYTES, built in 1 MB steps (never held inflated, here either)."""
        if self._bomb is None:
            packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            zeros = bytes(1024 * 1024)
            self._bomb = b"".join(packer.compress(zeros) for _ in range(BOMB_BYTES // len(zeros))) + packer.flush()
        return self._bomb


def _app(server: HostileServer) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = json.dumps(body["messages"])
        kind = (_MARK.search(text) or [None, "ok"])[1]
        row = (_ROW.search(text) or [None, "?"])[1]
        server.asked[(row, kind)] += 1
        server.auth_seen.append(request.headers.get("Authorization", ""))
        if body.get("stream"):
            return await _stream(request, kind)
        return await _plain(server, request, kind, row)

    for prefix in ROUTE_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", chat)
    app[STATE_KEY] = SimpleNamespace(stopping=asyncio.Event())  # type: ignore[assignment]  # what _stop_site sets
    return app


def _completion(content: str, usage: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-hostile", "object": "chat.completion", "model": "qwen3-vl-flash",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": usage}


GOOD_USAGE = {"prompt_tokens": 80, "completion_tokens": 6, "total_tokens": 86}


async def _plain(server: HostileServer, request: web.Request, kind: str, row: str) -> web.StreamResponse:
    json_type = {"Content-Type": "application/json"}
    if kind == "bad_json":
        return web.Response(body=b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "cut', headers=json_type)
    if kind == "deep_json":
        return web.Response(body=b"[" * 200_000 + b"]" * 200_000, headers=json_type)
    if kind == "usage_wrong_type":
        return web.json_response(_completion("a cat", {"prompt_tokens": "eighty", "completion_tokens": {"n": 6},
                                                       "total_tokens": [86]}))
    if kind == "usage_huge":
        return web.json_response(_completion("a cat", {"prompt_tokens": 10**15, "completion_tokens": 10**15,
                                                       "total_tokens": 2 * 10**15}))
    if kind == "usage_negative":
        return web.json_response(_completion("a cat", {"prompt_tokens": -80, "completion_tokens": -6,
                                                       "total_tokens": -86}))
    if kind == "surrogate":
        body = json.dumps(_completion("a cat \ud800 on a mat", GOOD_USAGE))  # ensure_ascii: a literal \ud800
        return web.Response(body=body.encode(), headers=json_type)
    if kind == "gzip_bomb":
        return web.Response(body=server.bomb(), headers={**json_type, "Content-Encoding": "gzip"})
    if kind in ("echo_auth", "echo_auth_401"):  # a proxy that quotes the request's headers back
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        return web.json_response({"error": {"message": f"bad request; you sent Authorization: {auth} "
                                            f"(key {key}), headers {dict(request.headers)}",
                                            "type": "invalid_request_error", "code": "bad_request"}},
                                 status=401 if kind == "echo_auth_401" else 400)
    if kind == "retry_after_once" and server.asked[(row, kind)] == 1:
        return web.json_response({"error": {"message": "slow down", "code": "rate_limit"}}, status=429,
                                 headers={"Retry-After": "999999", "retry-after-ms": "1e12"})
    if kind == "ratelimit_tiny":  # states limits under which no request would ever be admitted again
        return web.json_response(_completion(f"answer for {row}", GOOD_USAGE), headers={
            "x-ratelimit-limit-requests": "1e-9", "x-ratelimit-limit-tokens": "nan",
            "llm_provider-x-ratelimit-limit-tokens": "1e-300"})
    return web.json_response(_completion(f"answer for {row}", GOOD_USAGE))


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    event = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "model": "qwen3-vl-flash",
             "choices": choices, "usage": usage}
    return f"data: {json.dumps(event)}\n\n".encode()


async def _stream(request: web.Request, kind: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk({"role": "assistant", "content": "a streamed "}))
    if kind == "sse_bad_chunk":
        await response.write(b"data: {not json at all\n\n")
    await response.write(_chunk({"content": "answer"}, finish="stop"))
    await response.write(_chunk(None, usage=GOOD_USAGE))
    if kind == "sse_no_done":  # the answer is complete; the connection lingers with keep-alives, no [DONE]
        try:
            for _ in range(600):
                await asyncio.sleep(0.1)
                await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, RuntimeError):
            pass
        return response
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
