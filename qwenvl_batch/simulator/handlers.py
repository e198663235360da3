"""The HTTP handlers: chat completions (admission, faults, streaming) plus the log, stats, reset and models
endpoints, and the aiohttp application that wires them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
from aiohttp import web

from .answers import (
    _json_response,
    build_answer,
    completion_payload,
    count_words,
    error_response,
    partial_answer,
    stream_events,
)
from .chat_request import (
    Answer,
    ChatRequest,
    MeasuredImage,
    Trace,
    Usage,
    check_auth,
    parse_chat_request,
    parse_markers,
    read_json,
)
from .config import (
    _FAULT_ERRORS,
    FETCH_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_INPUT_TOKENS,
    ROUTE_PREFIXES,
    TRUNCATE_AFTER_CHUNKS,
    SimError,
    SimulatorConfig,
)
from .faults import (
    close_connection,
    draw_latency,
    marker_fault,
    random_fault,
    wait_unless_stopping,
)
from .images import count_prompt, measure_image
from .personas import IMAGE_NOT_SUPPORTED, validation_error
from .ratelimit import _rate_limit_error
from .state import REQUEST_ID_KEY, STATE_KEY, SimulatorState
from .structured import json_answer, with_json_request

# Handlers
# --------------------------------------------------------------------------------------------------------


async def send_stream(
    request: web.Request, events: list[bytes], config: SimulatorConfig, *, cut: bool
) -> web.StreamResponse:
    """Write the SSE events (all but a few when ``cut``, then close without [DONE])."""
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    if cut:
        await response.write(b"".join(events[:TRUNCATE_AFTER_CHUNKS]))
        close_connection(request)
        return response
    if config.stream_chunk_delay_s <= 0:
        await response.write(b"".join(events))
    else:
        for index, event in enumerate(events):
            if index:
                await asyncio.sleep(config.stream_chunk_delay_s)
            await response.write(event)
    await response.write_eof()
    return response


def _stream_tokens_sent(events: list[bytes]) -> int:
    """Words of content/reasoning in the events actually sent before a cut."""
    sent = 0
    for event in events[:TRUNCATE_AFTER_CHUNKS]:
        for choice in json.loads(event[len(b"data: ") :]).get("choices", []):
            delta = choice.get("delta", {})
            sent += count_words(delta.get("content") or "") + count_words(delta.get("reasoning_content") or "")
    return sent


async def apply_fault(
    kind: str,
    request: web.Request,
    chat: ChatRequest,
    answer: Answer,
    usage: Usage,
    trace: Trace,
    state: SimulatorState,
) -> web.StreamResponse | None:
    """Serve fault ``kind``; None when it does not apply here (``partial`` on a stream: served normally)."""
    if kind in _FAULT_ERRORS:
        raise _FAULT_ERRORS[kind]
    if kind == "validation":
        raise validation_error()
    if kind == "stream_error":
        if not chat.stream:
            raise state.persona.stream_error()
        events = stream_events(chat, answer, usage, trace.request_id, state.config)
        state.record(trace, "stream_error", 200)
        error_event = f"data: {json.dumps(state.persona.stream_error_payload())}\n\n".encode()
        return await send_stream(request, events[:TRUNCATE_AFTER_CHUNKS] + [error_event], state.config, cut=False)
    if kind == "garbage":
        state.record(trace, "garbage", 200)
        return _json_response({"foo": 1})
    if kind == "drop" or (kind == "truncate" and not chat.stream):
        state.record(trace, "dropped", None)
        return close_connection(request)
    if kind == "hang":
        state.record(trace, "hung", None)
        await wait_unless_stopping(state, state.config.hang_s)
        return close_connection(request)
    if kind == "truncate":
        events = stream_events(chat, answer, usage, trace.request_id, state.config)
        trace.completion_tokens = _stream_tokens_sent(events)
        state.record(trace, "truncated", 200)
        if state.persona.proxy:  # the proxy "completes" a cut upstream stream: its own usage chunk, then [DONE]
            closing = [e for e in events if b'"usage":{' in e] + [b"data: [DONE]\n\n"]
            return await send_stream(request, events[:TRUNCATE_AFTER_CHUNKS] + closing, state.config, cut=False)
        return await send_stream(request, events, state.config, cut=True)
    if kind == "partial" and not chat.stream:
        cut = partial_answer(answer)
        trace.completion_tokens = cut.completion_tokens
        state.record(trace, "partial", 200)
        payload = completion_payload(chat, cut, usage, trace.request_id, state.config)
        return _json_response(payload, headers={"x-dashscope-partialresponse": "true"})
    return None


async def serve_answer(
    request: web.Request, chat: ChatRequest, answer: Answer, usage: Usage, trace: Trace, state: SimulatorState
) -> web.StreamResponse:
    """The normal, successful response."""
    trace.completion_tokens = answer.completion_tokens
    state.record(trace, "ok", 200)
    if chat.stream:
        events = stream_events(chat, answer, usage, trace.request_id, state.config)
        return await send_stream(request, events, state.config, cut=False)
    return _json_response(completion_payload(chat, answer, usage, trace.request_id, state.config))


async def admit(chat: ChatRequest, answer: Answer, usage: Usage, state: SimulatorState) -> None:
    """Rate-limit, then wait the simulated latency."""
    limiter = state.limiter(chat.model)
    if limiter is not None:
        reason = limiter.admit(time.monotonic(), usage.prompt_tokens + answer.completion_tokens)
        if reason is not None:
            raise _rate_limit_error(reason)
    delay = draw_latency(state)
    if delay > 0:
        await asyncio.sleep(delay)


async def prepare(
    request: web.Request, state: SimulatorState, trace: Trace
) -> tuple[ChatRequest, list[MeasuredImage], Usage]:
    """Auth, body, model, parameters, images, prompt tokens: everything before admission."""
    check_auth(request.headers.get("Authorization"))
    body = await read_json(request)
    trace.model = body.get("model") if isinstance(body.get("model"), str) else None
    trace.stream = body.get("stream") is True
    response_format = body.get("response_format")
    trace.response_format = response_format.get("type") if isinstance(response_format, dict) else None
    chat = with_json_request(parse_chat_request(body, state), body, state.persona.name)
    trace.text, trace.n_images = chat.full_text, len(chat.images)
    trace.image_types = tuple(_image_type(ref.url) for ref in chat.images)
    parse_markers(chat.full_text)  # refuse unknown marker kinds before any work
    if chat.images and state.persona.images == "refuse":  # llama-server without an mmproj
        raise SimError(500, "", IMAGE_NOT_SUPPORTED, type_="server_error")
    # A text-only chat template drops image parts silently (llama-cpp-python): the answer and usage ignore them.
    refs = chat.images if state.persona.images == "see" else ()
    images = [await measure_image(ref, state) for ref in refs]
    usage = count_prompt(chat, images)
    trace.prompt_tokens = usage.prompt_tokens
    if usage.prompt_tokens > MAX_INPUT_TOKENS:
        raise _FAULT_ERRORS["toolong"]
    return chat, images, usage


async def handle_chat(request: web.Request) -> web.StreamResponse:
    """POST .../chat/completions: validate, admit, then fault or answer."""
    state = request.app[STATE_KEY]
    trace = Trace(request_id=str(uuid.uuid4()), t=time.time(), started=time.monotonic())
    request[REQUEST_ID_KEY] = trace.request_id
    try:
        chat, images, usage = await prepare(request, state, trace)
        answer = json_answer(chat, images, state) or build_answer(chat, images)
        await admit(chat, answer, usage, state)
        kind = marker_fault(chat, state) or random_fault(state)
        response = await apply_fault(kind, request, chat, answer, usage, trace, state) if kind else None
        return response or await serve_answer(request, chat, answer, usage, trace, state)
    except SimError as error:
        state.record(trace, f"http_{error.status}", error.status, error.code)
        return error_response(error, trace.request_id, state.config)


async def handle_models(request: web.Request) -> web.Response:
    """GET .../models: the known models, OpenAI list shape."""
    state = request.app[STATE_KEY]
    try:
        check_auth(request.headers.get("Authorization"))
    except SimError as error:
        return error_response(error, request.get(REQUEST_ID_KEY, ""), state.config)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "system"} for name in sorted(state.models)]
    return _json_response({"object": "list", "data": data})


async def handle_log(request: web.Request) -> web.Response:
    """GET /_sim/log: the request log."""
    return _json_response(request.app[STATE_KEY].snapshot())


async def handle_stats(request: web.Request) -> web.Response:
    """GET /_sim/stats: counts by outcome."""
    return _json_response(request.app[STATE_KEY].stats())


async def handle_reset(request: web.Request) -> web.Response:
    """POST /_sim/reset: forget log, stats, marker counts and rate windows."""
    request.app[STATE_KEY].reset()
    return _json_response({"reset": True})


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response says it comes from the simulator and carries a request id."""
    response.headers["x-simulator"] = "qwenvl-batch"
    for name, value in request.app[STATE_KEY].persona.proxy_headers().items():
        response.headers.setdefault(name, value)
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = request.get(REQUEST_ID_KEY) or str(uuid.uuid4())


async def _on_startup(app: web.Application) -> None:
    """Open the loopback image client and the request-log file inside the serving loop."""
    state = app[STATE_KEY]
    state.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
    if state.config.request_log is not None:
        state.log_file = open(state.config.request_log, "a", encoding="utf-8")  # noqa: ASYNC230 - once, at startup; closed at cleanup


async def _on_cleanup(app: web.Application) -> None:
    """Close what startup opened."""
    state = app[STATE_KEY]
    if state.http is not None:
        await state.http.close()
    if state.log_file is not None:
        state.log_file.close()
        state.log_file = None


def create_app(config: SimulatorConfig) -> web.Application:
    """The aiohttp application; state lives in ``app[STATE_KEY]``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = SimulatorState.from_config(config)
    for prefix in ROUTE_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", handle_chat)
        app.router.add_get(f"{prefix}/models", handle_models)
    from .batch import add_batch_routes  # the Batch API: files and batches (simulator/batch.py)

    add_batch_routes(app)
    app.router.add_get("/_sim/log", handle_log)
    app.router.add_get("/_sim/stats", handle_stats)
    app.router.add_post("/_sim/reset", handle_reset)
    app.on_response_prepare.append(_common_headers)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


# --------------------------------------------------------------------------------------------------------


def _image_type(url: str) -> str:
    """A data URL's declared MIME type (what the client claimed), or "url" for a link."""
    return url[5:].split(";", 1)[0].split(",", 1)[0] if url.startswith("data:") else "url"
