"""What to do about a failed request: retry it, record it on its row, or stop the job.

A wrong decision here costs money or rows: retrying a moderation refusal pays for nothing, recording a 429 as
a row error loses the row, and treating DashScope's ``insufficient_quota`` 429 (its tokens-per-minute throttle)
as billing exhaustion stops a healthy job. So the decisions are one table of small pure functions, tested row by
row (tests/test_policy.py), and the runner has exactly one retry layer (the SDK's own retries are off).

The table must hold behind any OpenAI-compatible server or proxy, where provider codes do not survive: vLLM and
SGLang send ``code`` as an int (the HTTP status), LiteLLM as a string ("400") and re-wraps the message
("litellm.BadRequestError: OpenAIException - <original> ..."), llama.cpp sends no code at all, and the envelope is
either nested (``{"error": {...}}``) or flat (``{"object": "error", "message", ...}``). So the order is: HTTP
status, then the provider code when it is a real one, then known message fragments wherever they appear
(reference: next-phase-facts.md §7, qwen-vl-facts.md §3.2 and §4). And ``classify`` never raises: any exception
from one attempt becomes a Decision, so no request can crash the run.
"""

from __future__ import annotations

import email.utils
import errno
import math
import os
import random
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TypedDict, Unpack

import openai


class Action(StrEnum):
    RETRY = "retry"
    ROW_ERROR = "row_error"
    STOP_JOB = "stop_job"


@dataclass(frozen=True)
class Decision:
    """The verdict on one failure; ``reason`` is a short label used in logs and the summary's retry counts."""

    action: Action
    error_type: str
    reason: str
    code: str | None = None
    message: str = ""
    retry_after_s: float | None = None
    max_attempts: int | None = None  # a tighter bound for this kind of failure (e.g. media download timeouts)
    connect_failed: bool = False  # no connection was made (refused, DNS, unreachable): the endpoint may be down
    answered: bool = False  # the server sent an HTTP answer (so it is up, whatever it said)
    proxy_retries: int = 0  # attempts a proxy made on its own before answering (x-litellm-attempted-retries)


class StreamCutError(Exception):
    """A stream ended before its final chunk (no finish_reason / no [DONE]); the answer is incomplete."""


class InvalidResponseError(Exception):
    """A 200 whose body is not a usable chat completion."""


class PartialResponseError(Exception):
    """A non-streaming answer flagged ``x-dashscope-partialresponse: true``: the provider timed out mid-answer.

    The provider bills such an answer, so ``billed`` carries its usage (a client.Completion) for the cost columns.
    """

    def __init__(self, message: str, *, billed: object | None = None) -> None:
        super().__init__(message)
        self.billed = billed


# Codes and message fragments, from the provider's error-code page (reference §3.2 and §4) and the other servers'
# real bodies (next-phase-facts.md §7).
_STOP_CODES = {
    "invalid_api_key", "InvalidApiKey", "Arrearage", "CommodityNotPurchased", "PrepaidBillOverdue",
    "PostpaidBillOverdue", "AccessDenied", "Model.AccessDenied", "AccessDenied.Unpurchased",
    "Workspace.AccessDenied", "Endpoint.AccessDenied", "AllocationQuota.FreeTierOnly", "model_not_found",
    "ModelNotFound", "model_not_supported", "model_not_multimodal",
}
_MODERATION_CODES = {"data_inspection_failed", "DataInspectionFailed", "DataInspection"}
# Codes that keep their meaning when a proxy folds them into the message text (word-bounded match).
_CODES_IN_MESSAGES = sorted(_STOP_CODES | {"data_inspection_failed", "DataInspectionFailed"}, key=len, reverse=True)
_CODE_WORD = re.compile(r"(?<!\w)(?<!\w\.)(" + "|".join(re.escape(c) for c in _CODES_IN_MESSAGES) + r")(?!\w|\.\w)")

# (fragment of the lowered message, stop code, hint): job-level stops wherever they appear, whatever the status.
_STOP_MESSAGES: tuple[tuple[str, str, str], ...] = (
    ("free allocated quota exceeded", "insufficient_quota", "billing"),
    ("free tier of the model has been exhausted", "AllocationQuota.FreeTierOnly", "billing"),
    ("make sure your account is in good standing", "Arrearage", "billing"),
    ("access denied", "AccessDenied", "access"),
    ("incorrect api key", "invalid_api_key", "key"),
    ("invalid api-key", "invalid_api_key", "key"),
    ("invalid api key", "invalid_api_key", "key"),
    ("invalid proxy server token", "invalid_api_key", "key"),
    ("no connected db", "invalid_api_key", "key"),  # LiteLLM without a database, given a key other than its master
    ("invalid model name passed in model=", "model_not_found", "model"),
    ("does not exist or you do not have access to it", "model_not_found", "model"),
    ("unsupported model", "model_not_supported", "model"),
    ("image input is not supported", "model_not_multimodal", "multimodal"),  # llama.cpp without an mmproj
    ("image_url is only supported by certain models", "model_not_multimodal", "multimodal"),  # OpenAI text models
)
_CODE_HINT = {
    "invalid_api_key": "key", "InvalidApiKey": "key", "model_not_found": "model", "ModelNotFound": "model",
    "model_not_supported": "model", "model_not_multimodal": "multimodal",
}
_HINTS = {
    "key": "check the API key and that it belongs to the region of the endpoint (a Singapore key does not work in "
           "Beijing); behind a proxy, the key is the proxy's own key",
    "access": "the account or workspace has no access to this model; enable it in the Model Studio console",
    "model": "check [model] name (and that the model exists in this region and in OpenAI-compatible mode); behind "
             "a proxy, the name must be a model_name of its model_list",
    "multimodal": "this server does not take images: serve a vision-language model (llama.cpp: load its --mmproj) "
                  "or point [model] at one",
    "billing": "fix the account (billing, quota or access) in the Model Studio console",
}
_STATUS_HINT = {401: "key", 403: "access", 404: "model"}
_MEDIA_TIMEOUT = ("download the media resource timed out", "failed to download multimodal content",
                  "unable to download the media resource")
_NO_RETRY_500 = ("missing content-length of multimodal url",)
# A 5xx whose body is a request-validation error is deterministic: the same request fails the same way every time
# (llama-cpp-python's pydantic 500s, vLLM's preprocessing failures, #17769/#18890/#28123).
_VALIDATION_500 = ("validation error", "int_parsing", "traceback (most recent call last)", "pydantic",
                   "error in preprocessing prompt inputs", "input should be a valid", "field required")
MEDIA_DOWNLOAD_ATTEMPTS = 3
# A 200 whose body cannot be used (invalid JSON or SSE, too large, too deep) was probably billed: two retries (a
# proxy's glitch), then the row records it, so neither this run nor a re-run buys it again and again.
UNUSABLE_ANSWER_ATTEMPTS = 3
UNEXPECTED_ATTEMPTS = 2  # an exception nobody expected: one more try, then the row records it
_CONNECT_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL,
                   errno.ECONNABORTED, errno.EHOSTDOWN, errno.ENETDOWN}


def classify(exc: BaseException) -> Decision:
    """Map any exception from one request attempt to a Decision; never raises (no request can crash the run)."""
    try:
        return _classify(exc)
    except Exception as bug:  # noqa: BLE001 - a classifier bug must not crash the run either
        return _unexpected(exc, note=f" (and classifying it failed: {type(bug).__name__}: {_text(bug)})")


def _classify(exc: BaseException) -> Decision:
    if isinstance(exc, openai.APIStatusError):
        return classify_status(exc.status_code, error_fields(exc.body, exc.message), exc.response.headers)
    if isinstance(exc, (openai.APIConnectionError, OSError)) or _connect_cause(exc) is not None:
        return _connection(exc)
    if isinstance(exc, StreamCutError):  # these three: the server answered (it is up), but not usefully
        return Decision(Action.RETRY, "server", "stream_cut", message=str(exc), answered=True)
    if isinstance(exc, PartialResponseError):
        return Decision(Action.RETRY, "server", "partial_response", message=str(exc), answered=True)
    if isinstance(exc, (InvalidResponseError, openai.APIResponseValidationError)):  # possibly billed: bounded
        return Decision(Action.RETRY, "server", "invalid_response", message=str(exc), answered=True,
                        max_attempts=UNUSABLE_ANSWER_ATTEMPTS)
    if isinstance(exc, openai.APIError):  # no HTTP status: an error event inside a 200 stream
        return _stream_error(exc)
    if isinstance(exc, (ValueError, UnicodeError)):  # a body that does not decode (JSON, UTF-8)
        return Decision(Action.RETRY, "server", "invalid_response", message=f"the answer could not be decoded: "
                        f"{type(exc).__name__}: {exc}", max_attempts=UNUSABLE_ANSWER_ATTEMPTS, answered=True)
    return _unexpected(exc)


def _text(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` itself fails."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - only the message is at stake
        return f"<{type(exc).__name__} without a printable message>"


def _unexpected(exc: BaseException, note: str = "") -> Decision:
    return Decision(Action.RETRY, "client", "unexpected_error", "unexpected_error",
                    message=f"unexpected error: {type(exc).__name__}: {_text(exc)}{note}",
                    max_attempts=UNEXPECTED_ATTEMPTS)


def _stream_error(exc: openai.APIError) -> Decision:
    """An in-band ``data: {"error": {...}}`` event (LiteLLM, DashScope's output moderation): its real message and
    code decide; a numeric code stands for the HTTP status the error would have had, else it counts as a 500."""
    fields = error_fields(exc.body, exc.message)
    raw_code = _raw_code(exc.body)
    status = int(raw_code) if raw_code is not None and raw_code.isdigit() and 400 <= int(raw_code) < 600 else 500
    decision = classify_status(status, fields, {})
    prefix = "" if decision.action is Action.STOP_JOB else "error event inside the stream: "
    reason = "stream_error" if decision.action is Action.RETRY else decision.reason
    return Decision(decision.action, decision.error_type, reason, decision.code,
                    prefix + decision.message, decision.retry_after_s, decision.max_attempts, answered=True)


# -- connections ----------------------------------------------------------------------------------------------

def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (``raise ... from``) and contexts, outermost first, without cycles."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 12:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _connect_cause(exc: BaseException) -> BaseException | None:
    """The OS-level reason no connection was made (refused, DNS, unreachable), or a connect timeout; else None.

    Python's TimeoutError is an OSError too: it is a connect failure only when the chain says "connect"."""
    chain = _chain(exc)
    for link in chain:  # the OS error first: aiohttp's refused connection reaches us wrapped as a ConnectTimeout
        if isinstance(link, socket.gaierror):
            return link
        if isinstance(link, OSError) and not isinstance(link, TimeoutError) and link.errno in _CONNECT_ERRNOS:
            return link
    for link in chain:
        if type(link).__name__ in ("ConnectTimeout", "ConnectionTimeoutError", "ServerTimeoutError") and \
                "connect" in f"{type(link).__name__} {link}".lower():
            return link
    return None


def _target(exc: BaseException) -> str:
    """``host:port`` the attempt was for (from the SDK's request, else from the aiohttp connection key)."""
    for link in _chain(exc):
        request = getattr(link, "request", None) if isinstance(link, openai.APIError) else None
        url = getattr(request, "url", None)
        if url is not None and getattr(url, "host", None):
            port = url.port or (443 if url.scheme == "https" else 80)
            return f"{url.host}:{port}"
        host, port = getattr(link, "host", None), getattr(link, "port", None)
        if isinstance(host, str) and host and isinstance(port, int):
            return f"{host}:{port}"
    return "the server"


def _os_text(cause: BaseException) -> str:
    if isinstance(cause, socket.gaierror):
        return f"DNS lookup failed: {cause.strerror or cause} [Errno {cause.errno}]"
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"{os.strerror(cause.errno)} [Errno {cause.errno}]"
    return f"{type(cause).__name__}: {cause}"


def _connection(exc: BaseException) -> Decision:
    """A refused connection, a DNS failure or an unreachable host is ``connection`` with its real cause (never
    "timed out"); a real timeout (the answer did not come in time) stays ``timeout``."""
    cause = _connect_cause(exc)
    target = _target(exc)
    if cause is not None:
        what = "connect timeout" if "timeout" in type(cause).__name__.lower() else _os_text(cause)
        return Decision(Action.RETRY, "connection", "connect_failed",
                        message=f"cannot connect to {target}: {what}", connect_failed=True)
    if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
        return Decision(Action.RETRY, "timeout", "timeout", message=f"the request to {target} timed out")
    detail = next((f"{type(link).__name__}: {link}" for link in _chain(exc)[1:] if str(link)), str(exc))
    return Decision(Action.RETRY, "connection", "connection", message=f"connection to {target} broke: {detail}")


# -- HTTP statuses --------------------------------------------------------------------------------------------

def _raw_code(body: object) -> str | None:
    if not isinstance(body, Mapping):
        return None
    inner = body.get("error") if isinstance(body.get("error"), Mapping) else body
    code = inner.get("code")  # type: ignore[union-attr]
    return None if code is None or code == "" else str(code).strip()


def error_fields(body: object, fallback_message: str = "") -> dict[str, str]:
    """``code``, ``type`` and ``message`` from either envelope: nested ``{"error": {...}}`` (OpenAI, DashScope,
    vLLM >= 0.10.1, llama.cpp, LiteLLM) or flat ``{"object": "error", "message", ...}`` (SGLang, vLLM < 0.10.1).

    A numeric code ("400", 500) is the HTTP status echoed, not a provider code, so it is dropped; a known provider
    code that a proxy folded into the message ("... data_inspection_failed ...") is recovered from there."""
    mapping = body if isinstance(body, Mapping) else {}
    inner = mapping.get("error") if isinstance(mapping.get("error"), Mapping) else mapping
    message = inner.get("message")  # type: ignore[union-attr]
    if not isinstance(message, str) or not message:
        message = (inner.get("error") if isinstance(inner.get("error"), str) else None) or fallback_message or ""  # type: ignore[union-attr]
    raw = _raw_code(body)
    code = None if raw is None or raw.lstrip("-").isdigit() else raw
    if code is None:
        found = _CODE_WORD.search(message)
        code = found.group(1) if found else None
    kind = inner.get("type")  # type: ignore[union-attr]
    kind = str(kind) if kind else ""
    return {"code": code or kind, "type": kind, "message": str(message)}


def classify_status(status: int, error: Mapping[str, str], headers: Mapping[str, str]) -> Decision:
    """The error table for HTTP statuses: pure, so it is tested as a table."""
    code, message = error.get("code") or None, error.get("message", "")
    lowered = message.lower()
    label = code or f"http_{status}"
    extra = _Answered(answered=True, proxy_retries=proxy_retries(headers))
    stop = _stop_kind(code, lowered)
    if stop is not None:
        return _stop(status, stop[0], message, stop[1], **extra)
    if status == 429:
        return Decision(Action.RETRY, "rate_limit", label, code, message, retry_after(headers), **extra)
    if status in (401, 403, 404):
        return _stop(status, code, message, _STATUS_HINT[status], **extra)
    if code in _MODERATION_CODES or "inappropriate content" in lowered:
        moderation = code if code in _MODERATION_CODES else "data_inspection_failed"
        return Decision(Action.ROW_ERROR, "content_filter", moderation, moderation, message, **extra)
    if any(fragment in lowered for fragment in _MEDIA_TIMEOUT):
        return Decision(Action.RETRY, "invalid_request", "media_download", code, message,
                        max_attempts=MEDIA_DOWNLOAD_ATTEMPTS, **extra)
    if status >= 500 and any(fragment in lowered for fragment in _NO_RETRY_500):
        return Decision(Action.ROW_ERROR, "invalid_request", label, code, message, **extra)
    if status >= 500 and any(fragment in lowered for fragment in _VALIDATION_500):
        return Decision(Action.ROW_ERROR, "invalid_request", "server_rejected_input", "server_rejected_input",
                        f"HTTP {status}, a request-validation error (deterministic, not retried): {message}", **extra)
    if status >= 500 or status in (408, 409):
        return Decision(Action.RETRY, "server", label, code, message, retry_after(headers), **extra)
    return Decision(Action.ROW_ERROR, "invalid_request", label, code, message, **extra)


class _Answered(TypedDict):
    answered: bool
    proxy_retries: int


def _stop_kind(code: str | None, lowered: str) -> tuple[str, str] | None:
    """(stop code, hint key) when the code or the message says the job cannot go on, else None."""
    if code in _STOP_CODES:
        return code, _CODE_HINT.get(code, "billing")
    for fragment, stop_code, hint in _STOP_MESSAGES:
        if fragment in lowered:
            return stop_code, hint
    return None


def _stop(status: int, code: str | None, message: str, hint: str, **extra: Unpack[_Answered]) -> Decision:
    text = (f"the provider refused the job: HTTP {status} {code or ''}: {message.strip()} — "
            f"{_HINTS[hint]}").replace("  ", " ")
    return Decision(Action.STOP_JOB, "job", code or f"http_{status}", code, text, **extra)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header as sent, or as a LiteLLM proxy forwards the upstream's (``llm_provider-<name>``)."""
    value = headers.get(name)
    return value if value is not None else headers.get(f"llm_provider-{name}")


def retry_after(headers: Mapping[str, str], *, cap_s: float = 120.0, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait (``retry-after-ms``, ``Retry-After`` seconds or HTTP date), capped;
    also read from a LiteLLM proxy's ``llm_provider-retry-after(-ms)``."""
    try:
        value = _header(headers, "retry-after-ms")
        if value is not None:
            return _capped(float(value) / 1000.0, cap_s)
        value = _header(headers, "retry-after")
        if value is None:
            return None
        try:
            return _capped(float(value), cap_s)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value)
            return _capped(parsed.timestamp() - (now if now is not None else time.time()), cap_s)
    except (TypeError, ValueError, OverflowError):
        return None


def _capped(seconds: float, cap_s: float) -> float | None:
    """A server's wait within ``[0, cap_s]``; NaN (``Retry-After: nan``) is no wait asked at all."""
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), cap_s)


def proxy_retries(headers: Mapping[str, str]) -> int:
    """Attempts a LiteLLM proxy made on its own before answering (``x-litellm-attempted-retries``; 0 if absent).

    They are real upstream requests (billed when they succeed, counted against the rate limit when they fail), so
    the row's ``attempts`` includes them."""
    try:
        return max(int(str(headers.get("x-litellm-attempted-retries") or 0).strip()), 0)
    except (TypeError, ValueError):
        return 0


def backoff_s(attempt: int, *, initial_s: float = 1.0, max_s: float = 60.0, jitter: float = 1.0,
              rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": ``base = min(max_s, initial_s * 2**(attempt-1))``, wait drawn
    uniformly from ``[base/2, base]`` (``jitter=0``: exactly ``base``). Jitter spreads the retries of many workers
    that failed together, so they do not come back as one burst. ``attempt`` counts failures so far (1 after the
    first).
    """
    base = min(max_s, initial_s * (2 ** max(attempt - 1, 0)))
    spread = (rng or random).uniform(0, jitter * base / 2)
    return min(max_s, base / 2 + spread) if jitter else base
