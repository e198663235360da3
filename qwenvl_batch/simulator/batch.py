"""The Batch API's files and batches, as DashScope's OpenAI-compatible mode serves them (facts §1.1).

``POST /files`` (purpose=batch), ``GET /files`` (list), ``GET /files/{id}/content``, ``DELETE /files/{id}``,
``POST /batches``, ``GET /batches/{id}``, ``GET /batches`` (``ds_name`` filter, cursor pages),
``POST /batches/{id}/cancel``.
A batch validates its file (JSON, unique ``custom_id``, ``url`` = ``endpoint``, one model, ≤ 6 MB per line,
≤ 50,000 lines), then answers its lines one by one with the realtime handler's logic (``parse_chat_request``,
``measure_image``, ``build_answer``, markers and random faults), so each custom_id gets the answer a realtime
request would get. Knobs (SimulatorConfig ``batch_*``): time in validating, lines per second, expiry after N
lines, a forced validation failure, per-line transient errors. The request log gets one entry per control-plane
call (``kind = "batch_api"``, ``op``) and one per processed line (``kind = "batch_line"``, with batch_id and
custom_id).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .answers import _json_response, build_answer, completion_payload
from .chat_request import Trace, check_auth, parse_chat_request
from .config import _FAULT_ERRORS, ROUTE_PREFIXES, SimError
from .faults import marker_fault, random_fault
from .images import count_prompt, measure_image
from .state import STATE_KEY, SimulatorState

MB = 1024 * 1024
MAX_FILE_BYTES = 500 * MB
MAX_LINE_BYTES = 6 * MB
MAX_LINES = 50_000
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/chat/ds-test")
_WINDOW = re.compile(r"^([1-9][0-9]*)([hd])$")


@dataclass
class SimBatch:
    """One batch and its lifecycle fields, served in OpenAI's ``Batch`` shape."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    created_at: int
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancel: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
            "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.created_at + _hours(self.completion_window) * 3600,
            **{f"{name}_at": self.times.get(name) for name in ("in_progress", "finalizing", "completed", "failed",
                                                              "expired", "cancelling", "cancelled")},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
        }


@dataclass
class BatchStore:
    """Files and batches of the simulated account."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, SimBatch] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


BATCH_KEY: web.AppKey[BatchStore] = web.AppKey("qwenvl_simulator_batches", BatchStore)


def _hours(window: str) -> int:
    match = _WINDOW.match(window)
    return int(match.group(1)) * (24 if match.group(2) == "d" else 1) if match else 0


def _bad(message: str, code: str = "invalid_request_error", status: int = 400) -> web.Response:
    return _json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}, "request_id": str(uuid.uuid4())}, status=status)


def _log(state: SimulatorState, op: str, **fields: Any) -> None:
    """A control-plane call or a processed line in the request log (and its file)."""
    entry = {"t": time.time(), "kind": "batch_api", "op": op, **fields}
    _append(state, entry)


def _append(state: SimulatorState, entry: dict[str, Any]) -> None:
    with state.lock:
        state.log.append(entry)
    if state.log_file is not None:
        state.log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        state.log_file.flush()


def _auth(request: web.Request) -> web.Response | None:
    try:
        check_auth(request.headers.get("Authorization"))
    except SimError as error:
        return _bad(error.message, error.code, error.status)
    return None


# -- files ------------------------------------------------------------------------------------------------
async def upload_file(request: web.Request) -> web.Response:
    """POST /files: multipart ``file`` + ``purpose=batch``."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    form = await request.post()
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose != "batch":
        return _bad(f"purpose must be 'batch', got {purpose!r}")
    if not isinstance(upload, web.FileField):
        return _bad("a multipart 'file' is required")
    data = upload.file.read()
    if len(data) > MAX_FILE_BYTES:
        return _bad(f"file is {len(data) / MB:.0f} MB; at most 500 MB", "BadRequest.TooLarge")
    file_id = f"file-batch-{uuid.uuid4().hex[:24]}"
    _store_file(store, file_id, upload.filename or "input.jsonl", data)
    _log(state, "files.create", file_id=file_id, bytes=len(data))
    return _json_response(store.files[file_id])


def _store_file(store: BatchStore, file_id: str, filename: str, data: bytes, purpose: str = "batch") -> None:
    store.contents[file_id] = data
    store.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                            "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}


async def list_files(request: web.Request) -> web.Response:
    """GET /files?purpose=&after=&limit=: newest first."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    _log(state, "files.list")
    files = sorted(store.files.values(), key=lambda f: f["created_at"], reverse=True)
    if request.query.get("purpose"):
        files = [f for f in files if f["purpose"] == request.query["purpose"]]
    if request.query.get("after"):
        ids = [f["id"] for f in files]
        files = files[ids.index(request.query["after"]) + 1:] if request.query["after"] in ids else []
    limit = max(1, min(int(request.query.get("limit", 10_000)), 10_000))
    return _json_response({"object": "list", "data": files[:limit], "has_more": len(files) > limit,
                           "first_id": files[0]["id"] if files else None,
                           "last_id": files[:limit][-1]["id"] if files else None})


async def file_content(request: web.Request) -> web.Response:
    """GET /files/{id}/content."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    file_id = request.match_info["file_id"]
    _log(state, "files.content", file_id=file_id)
    if file_id not in store.contents:
        return _bad(f"No such file: {file_id}", "not_found", 404)
    return web.Response(body=store.contents[file_id], content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    """DELETE /files/{id}."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    file_id = request.match_info["file_id"]
    _log(state, "files.delete", file_id=file_id)
    if store.files.pop(file_id, None) is None:
        return _bad(f"No such file: {file_id}", "not_found", 404)
    store.contents.pop(file_id, None)
    return _json_response({"id": file_id, "object": "file", "deleted": True})


# -- batches ----------------------------------------------------------------------------------------------
async def create_batch(request: web.Request) -> web.Response:
    """POST /batches: checks the request, then validates and runs the file in the background."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    body = await request.json()
    file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), str(body.get("completion_window"))
    metadata = body.get("metadata") or {}
    if file_id not in store.contents:
        _log(state, "batches.create", error="file_not_found")
        return _bad(f"No such file: {file_id}", "not_found", 404)
    if endpoint not in ENDPOINTS:
        return _bad(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if not 24 <= _hours(window) <= 336:
        return _bad(f"completion_window must be 24h to 336h (or 1d to 14d), got {window!r}")
    if len(str(metadata.get("ds_name", ""))) > 100 or len(str(metadata.get("ds_description", ""))) > 200:
        return _bad("metadata.ds_name takes at most 100 characters, ds_description 200")
    batch = SimBatch(id=f"batch_{uuid.uuid4()}", input_file_id=file_id, endpoint=endpoint, completion_window=window,
                     metadata={str(k): str(v) for k, v in metadata.items()}, created_at=int(time.time()))
    store.batches[batch.id] = batch
    _log(state, "batches.create", batch_id=batch.id, file_id=file_id, ds_name=batch.metadata.get("ds_name"))
    task = asyncio.create_task(_run_batch(state, store, batch))
    store.tasks.add(task)
    task.add_done_callback(store.tasks.discard)
    return _json_response(batch.payload())


async def retrieve_batch(request: web.Request) -> web.Response:
    """GET /batches/{id}."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    batch_id = request.match_info["batch_id"]
    _log(state, "batches.retrieve", batch_id=batch_id)
    batch = store.batches.get(batch_id)
    if batch is None:
        return _bad(f"No such batch: {batch_id}", "not_found", 404)
    return _json_response(batch.payload())


async def list_batches(request: web.Request) -> web.Response:
    """GET /batches?after=&limit=&ds_name=: newest first, cursor pages."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    query = request.query
    _log(state, "batches.list", ds_name=query.get("ds_name"))
    batches = sorted(store.batches.values(), key=lambda b: b.created_at, reverse=True)
    if query.get("ds_name"):
        batches = [b for b in batches if b.metadata.get("ds_name") == query["ds_name"]]
    if query.get("after"):
        ids = [b.id for b in batches]
        batches = batches[ids.index(query["after"]) + 1:] if query["after"] in ids else []
    limit = max(1, min(int(query.get("limit", 20)), 100))
    page = batches[:limit]
    return _json_response({"object": "list", "data": [b.payload() for b in page],
                           "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                           "has_more": len(batches) > limit})


async def cancel_batch(request: web.Request) -> web.Response:
    """POST /batches/{id}/cancel: lines answered so far are kept (and billed)."""
    if (denied := _auth(request)) is not None:
        return denied
    state, store = request.app[STATE_KEY], request.app[BATCH_KEY]
    batch_id = request.match_info["batch_id"]
    _log(state, "batches.cancel", batch_id=batch_id)
    batch = store.batches.get(batch_id)
    if batch is None:
        return _bad(f"No such batch: {batch_id}", "not_found", 404)
    if batch.status in ("validating", "in_progress", "finalizing"):
        batch.cancel = True
        batch.status = "cancelling"
        batch.times["cancelling"] = int(time.time())
    return _json_response(batch.payload())


# -- running a batch ----------------------------------------------------------------------------------------
def validate(data: bytes, endpoint: str, force_fail: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(lines, errors): errors as ``{code, line, message, param}`` with 1-based line numbers."""
    errors: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    raw_lines = [raw for raw in data.split(b"\n") if raw.strip()]
    if not raw_lines:
        return [], [{"code": "empty_file", "line": None, "message": "The input file is empty.", "param": None}]
    if len(raw_lines) > MAX_LINES:
        errors.append({"code": "too_many_tasks", "line": None, "param": None,
                       "message": f"The file has {len(raw_lines)} lines; at most {MAX_LINES}."})
    for number, raw in enumerate(raw_lines, 1):
        def bad(code: str, message: str, param: str | None = None, n: int = number) -> None:
            errors.append({"code": code, "line": n, "message": message, "param": param})
        if len(raw) > MAX_LINE_BYTES:
            bad("line_too_large", f"Line {number} is {len(raw) / MB:.1f} MB; at most 6 MB per line.")
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            bad("invalid_json_line", f"Line {number} is not valid JSON.")
            continue
        custom_id = line.get("custom_id")
        body = line.get("body") if isinstance(line.get("body"), dict) else {}
        if not custom_id:
            bad("missing_custom_id", f"Line {number} has no custom_id.", "custom_id")
        elif custom_id in seen:
            bad("duplicate_custom_id", f"The custom_id {custom_id!r} on line {number} is not unique.", "custom_id")
        seen.add(str(custom_id))
        if line.get("url") != endpoint:
            bad("url_mismatch", f"Line {number}: url {line.get('url')!r} is not the batch endpoint {endpoint!r}.",
                "url")
        model = model or body.get("model")
        if body.get("model") != model:
            bad("mismatched_model", f"Line {number}: model {body.get('model')!r} differs from {model!r}; one "
                                    "model per file.", "body.model")
        lines.append(line)
    if force_fail and not errors:
        errors.append({"code": "invalid_request", "line": 1, "param": "body",
                       "message": "Line 1: simulated validation failure (batch_fail_validation)."})
    return lines, errors


async def _run_batch(state: SimulatorState, store: BatchStore, batch: SimBatch) -> None:
    """validating → in_progress → (lines) → finalizing → completed / expired / cancelled, or failed."""
    config = state.config
    if config.batch_delay_s:
        await asyncio.sleep(config.batch_delay_s)
    lines, errors = validate(store.contents.get(batch.input_file_id, b""), batch.endpoint,
                             config.batch_fail_validation)
    if errors:
        batch.errors, batch.status = errors, "failed"
        batch.times["failed"] = int(time.time())
        return
    batch.total = len(lines)
    if batch.cancel:
        return _finish(store, batch, [], [], "cancelled")
    batch.status, batch.times["in_progress"] = "in_progress", int(time.time())
    ok_lines: list[dict[str, Any]] = []
    error_lines: list[dict[str, Any]] = []
    for number, line in enumerate(lines):
        if batch.cancel:
            return _finish(store, batch, ok_lines, error_lines, "cancelled")
        if config.batch_expire_after_lines is not None and number >= config.batch_expire_after_lines:
            if config.batch_expired_lines:  # OpenAI returns the lines it never ran in the error file
                error_lines += [_expired_line(line) for line in lines[number:]]
            return _finish(store, batch, ok_lines, error_lines, "expired")
        if config.batch_lines_per_s:
            await asyncio.sleep(1.0 / config.batch_lines_per_s)
        result = await answer_line(state, batch, line)
        (ok_lines if result["error"] is None else error_lines).append(result)
        if result["error"] is None:
            batch.completed += 1
        else:
            batch.failed += 1
    batch.status, batch.times["finalizing"] = "finalizing", int(time.time())
    await asyncio.sleep(0)
    _finish(store, batch, ok_lines, error_lines, "cancelled" if batch.cancel else "completed")


def _finish(store: BatchStore, batch: SimBatch, ok_lines: list[dict[str, Any]], error_lines: list[dict[str, Any]],
            status: str) -> None:
    """Write the result files (only those with lines) and set the terminal status."""
    for lines, kind in ((ok_lines, "output"), (error_lines, "error")):
        if lines:
            file_id = f"file-batch_{kind}-{uuid.uuid4().hex[:24]}"
            data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
            _store_file(store, file_id, f"{batch.id}_{kind}.jsonl", data, purpose="batch_output")
            if kind == "output":
                batch.output_file_id = file_id
            else:
                batch.error_file_id = file_id
    batch.status = status
    batch.times[status] = int(time.time())


def _expired_line(line: dict[str, Any]) -> dict[str, Any]:
    """A line an expired batch never ran, as OpenAI reports it."""
    return {"id": str(uuid.uuid4()), "custom_id": str(line.get("custom_id")), "response": None,
            "error": {"code": "batch_expired", "message": "This line could not be executed before the batch expired."}}


async def answer_line(state: SimulatorState, batch: SimBatch, line: dict[str, Any]) -> dict[str, Any]:
    """One line answered as the chat handler would answer it (same answer, usage, markers, faults)."""
    trace = Trace(request_id=str(uuid.uuid4()), t=time.time(), started=time.monotonic())
    custom_id = str(line.get("custom_id"))
    try:
        body = dict(line.get("body") or {})
        body.pop("stream", None)
        trace.model = body.get("model")
        chat = parse_chat_request(body, state)
        trace.text, trace.n_images = chat.full_text, len(chat.images)
        images = [await measure_image(ref, state) for ref in chat.images]
        usage = count_prompt(chat, images)
        trace.prompt_tokens = usage.prompt_tokens
        answer = build_answer(chat, images)
        kind = marker_fault(chat, state) or random_fault(state)
        if kind is None and state.config.batch_line_error_rate and \
                state.fault_rng.random() < state.config.batch_line_error_rate:
            kind = "500"
        if kind is not None:
            raise _FAULT_ERRORS.get(kind) or _FAULT_ERRORS["500"]
        trace.completion_tokens = answer.completion_tokens
        payload = completion_payload(chat, answer, usage, trace.request_id, state.config)
        _append(state, {**trace.entry("ok", 200, None), "kind": "batch_line", "batch_id": batch.id,
                        "custom_id": custom_id})
        return {"id": str(uuid.uuid4()), "custom_id": custom_id, "error": None,
                "response": {"status_code": 200, "request_id": trace.request_id, "body": payload}}
    except SimError as error:
        _append(state, {**trace.entry(f"http_{error.status}", error.status, error.code), "kind": "batch_line",
                        "batch_id": batch.id, "custom_id": custom_id})
        return {"id": str(uuid.uuid4()), "custom_id": custom_id,
                "response": {"status_code": error.status, "request_id": trace.request_id, "body": None},
                "error": {"code": error.code, "message": error.message}}


def add_batch_routes(app: web.Application) -> None:
    """Wire the Batch API under every route prefix (called by handlers.create_app)."""
    app[BATCH_KEY] = BatchStore()
    for prefix in ROUTE_PREFIXES:
        app.router.add_post(f"{prefix}/files", upload_file)
        app.router.add_get(f"{prefix}/files", list_files)
        app.router.add_get(f"{prefix}/files/{{file_id}}/content", file_content)
        app.router.add_delete(f"{prefix}/files/{{file_id}}", delete_file)
        app.router.add_post(f"{prefix}/batches", create_batch)
        app.router.add_get(f"{prefix}/batches", list_batches)
        app.router.add_get(f"{prefix}/batches/{{batch_id}}", retrieve_batch)
        app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", cancel_batch)
    app.on_cleanup.append(_stop_batches)


async def _stop_batches(app: web.Application) -> None:
    """Batches still running when the server stops are abandoned (a restarted simulator forgets them)."""
    tasks = list(app[BATCH_KEY].tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
