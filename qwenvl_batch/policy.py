"""What to do about a failed request: retry it, record it on its row, or stop the job.

A wrong decision here costs money or rows: retrying a moderation refusal pays for nothing, recording a 429 as
a row error loses the row, and treating DashScope's ``insufficient_quota`` 429 (its tokens-per-minute throttle)
as billing exhaustion stops a healthy job. So the decisions are one table of small pure functions, tested row by
row (tests/test_policy.py), and the runner has exactly one retry layer (the SDK's own retries are off).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import openai


class Action(str, Enum):
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


# Codes and message fragments, from the provider's error-code page (reference §3.2 and §4).
_STOP_CODES = {
    "invalid_api_key", "InvalidApiKey", "Arrearage", "CommodityNotPurchased", "PrepaidBillOverdue",
    "PostpaidBillOverdue", "AccessDenied", "Model.AccessDenied", "AccessDenied.Unpurchased",
    "Workspace.AccessDenied", "Endpoint.AccessDenied", "AllocationQuota.FreeTierOnly", "model_not_found",
    "ModelNotFound", "model_not_supported",
}
_STOP_MESSAGES = ("free allocated quota exceeded", "free tier of the model has been exhausted")
_MODERATION_CODES = {"data_inspection_failed", "DataInspectionFailed", "DataInspection"}
_MEDIA_TIMEOUT = ("download the media resource timed out", "failed to download multimodal content",
                  "unable to download the media resource")
_NO_RETRY_500 = ("missing content-length of multimodal url",)
MEDIA_DOWNLOAD_ATTEMPTS = 3

_STOP_HINTS = {
    401: "check the API key and that it belongs to the region of the endpoint (a Singapore key does not work in Beijing)",
    403: "the account or workspace has no access to this model; enable it in the Model Studio console",
    404: "check [model] name (and that the model exists in this region and in OpenAI-compatible mode)",
}


def classify(exc: BaseException) -> Decision:
    """Map an exception from one request attempt to a Decision (the table lives in the helpers below)."""
    if isinstance(exc, openai.APIStatusError):
        return classify_status(exc.status_code, _error_fields(exc), exc.response.headers)
    if isinstance(exc, openai.APITimeoutError):
        return Decision(Action.RETRY, "timeout", "timeout", message="the request timed out")
    if isinstance(exc, openai.APIConnectionError):
        return Decision(Action.RETRY, "connection", "connection", message=f"connection error: {exc}")
    if isinstance(exc, StreamCutError):
        return Decision(Action.RETRY, "server", "stream_cut", message=str(exc))
    if isinstance(exc, PartialResponseError):
        return Decision(Action.RETRY, "server", "partial_response", message=str(exc))
    if isinstance(exc, (InvalidResponseError, openai.APIResponseValidationError)):
        return Decision(Action.RETRY, "server", "invalid_response", message=str(exc))
    raise exc


def _error_fields(exc: openai.APIStatusError) -> dict[str, str]:
    """The provider's ``{"error": {"message", "type", "code"}}``, whichever way the SDK exposes it."""
    body = exc.body if isinstance(exc.body, Mapping) else {}
    inner = body.get("error") if isinstance(body.get("error"), Mapping) else body
    message = str(inner.get("message") or exc.message or "")
    return {
        "code": str(inner.get("code") or getattr(exc, "code", None) or inner.get("type") or ""),
        "type": str(inner.get("type") or ""),
        "message": message,
    }


def classify_status(status: int, error: Mapping[str, str], headers: Mapping[str, str]) -> Decision:
    """The error table for HTTP statuses: pure, so it is tested as a table."""
    code, message = error.get("code") or None, error.get("message", "")
    lowered = message.lower()
    label = code or f"http_{status}"
    if code in _STOP_CODES or any(fragment in lowered for fragment in _STOP_MESSAGES):
        return _stop(status, code, message)
    if status == 429:
        return Decision(Action.RETRY, "rate_limit", label, code, message, retry_after(headers))
    if status in (401, 403, 404):
        return _stop(status, code, message)
    if code in _MODERATION_CODES or "inappropriate content" in lowered:
        return Decision(Action.ROW_ERROR, "content_filter", label, code, message)
    if any(fragment in lowered for fragment in _MEDIA_TIMEOUT):
        return Decision(Action.RETRY, "invalid_request", "media_download", code, message,
                        max_attempts=MEDIA_DOWNLOAD_ATTEMPTS)
    if status >= 500 and any(fragment in lowered for fragment in _NO_RETRY_500):
        return Decision(Action.ROW_ERROR, "invalid_request", label, code, message)
    if status >= 500 or status in (408, 409):
        return Decision(Action.RETRY, "server", label, code, message, retry_after(headers))
    return Decision(Action.ROW_ERROR, "invalid_request", label, code, message)


def _stop(status: int, code: str | None, message: str) -> Decision:
    hint = _STOP_HINTS.get(status, "fix the account (billing, quota or access) in the Model Studio console")
    text = f"the provider refused the job: HTTP {status} {code or ''}: {message.strip()} — {hint}".replace("  ", " ")
    return Decision(Action.STOP_JOB, "job", code or f"http_{status}", code, text)


def retry_after(headers: Mapping[str, str], *, cap_s: float = 120.0, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait (``retry-after-ms``, ``Retry-After`` seconds or HTTP date), capped."""
    try:
        value = headers.get("retry-after-ms")
        if value is not None:
            return min(max(float(value) / 1000.0, 0.0), cap_s)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return min(max(float(value), 0.0), cap_s)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value)
            return min(max(parsed.timestamp() - (now if now is not None else time.time()), 0.0), cap_s)
    except (TypeError, ValueError, OverflowError):
        return None


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
