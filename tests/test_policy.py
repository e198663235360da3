"""The error policy, row by row: retry, record on the row, or stop the job."""

from __future__ import annotations

import random

import pytest

from qwenvl_batch.policy import Action, backoff_s, classify_status, retry_after

R, ROW, STOP = Action.RETRY, Action.ROW_ERROR, Action.STOP_JOB

# (HTTP status, code, message, expected action, expected error_type)
TABLE = [
    (429, "Throttling", "Requests throttling triggered.", R, "rate_limit"),
    (429, "Throttling.RateQuota", "You have exceeded your request limit.", R, "rate_limit"),
    (429, "limit_requests", "Requests rate limit exceeded, please try again later.", R, "rate_limit"),
    (429, "limit_burst_rate", "Request rate increased too quickly.", R, "rate_limit"),
    (429, "insufficient_quota", "Allocated quota exceeded, please increase your quota limit.", R, "rate_limit"),
    (429, "insufficient_quota", "You exceeded your current quota, please check your plan and billing details.", R,
     "rate_limit"),
    (429, "insufficient_quota", "Free allocated quota exceeded.", STOP, "job"),
    (429, "PrepaidBillOverdue", "", STOP, "job"),
    (429, "PostpaidBillOverdue", "", STOP, "job"),
    (429, "CommodityNotPurchased", "", STOP, "job"),
    (500, "InternalError", "An internal error has occured, please try again later.", R, "server"),
    (500, "internal_error", "An internal error has occured", R, "server"),
    (500, "InternalError.Algo", "inference internal error.", R, "server"),
    (500, "InternalError.Algo", "Missing Content-Length of multimodal url.", ROW, "invalid_request"),
    (500, "RequestTimeOut", "Request timed out, please try again later.", R, "server"),
    (502, None, "Bad gateway", R, "server"),
    (503, "ModelUnavailable", "Model is unavailable, please try again later.", R, "server"),
    (503, "ModelServingError", "Too many requests. Your requests are being throttled due to system capacity limits.",
     R, "server"),
    (504, None, "Gateway timeout", R, "server"),
    (400, "invalid_parameter_error",
     "<400> InternalError.Algo.InvalidParameter: The image length and width do not meet the model restrictions.",
     ROW, "invalid_request"),
    (400, "InvalidParameter", "Exceeded limit on max bytes per data-uri item : 10485760", ROW, "invalid_request"),
    (400, "InvalidParameter", "Range of input length should be [1, 258048]", ROW, "invalid_request"),
    (400, "data_inspection_failed", "Input data may contain inappropriate content.", ROW, "content_filter"),
    (400, "DataInspectionFailed", "Output data may contain inappropriate content.", ROW, "content_filter"),
    (400, "InvalidParameter.DataInspection",
     "Download the media resource timed out during the data inspection process.", R, "invalid_request"),
    (400, "Arrearage", "Access denied, please make sure your account is in good standing.", STOP, "job"),
    (401, "invalid_api_key", "Incorrect API key provided.", STOP, "job"),
    (401, "InvalidApiKey", "Invalid API-key provided.", STOP, "job"),
    (403, "AccessDenied", "Access denied.", STOP, "job"),
    (403, "AllocationQuota.FreeTierOnly", "The free tier of the model has been exhausted.", STOP, "job"),
    (404, "model_not_found", "The model `qwen-nope` does not exist.", STOP, "job"),
    (404, "model_not_supported", "Unsupported model x for OpenAI compatibility mode.", STOP, "job"),
    (408, None, "Request Timeout", R, "server"),
    (422, None, "Unprocessable", ROW, "invalid_request"),
]


@pytest.mark.parametrize(("status", "code", "message", "action", "error_type"), TABLE)
def test_error_table(status: int, code: str | None, message: str, action: Action, error_type: str) -> None:
    """Each provider error maps to the documented action and error type."""
    decision = classify_status(status, {"code": code or "", "message": message}, {})
    assert (decision.action, decision.error_type) == (action, error_type)


def test_media_download_timeout_has_a_tighter_attempt_bound() -> None:
    """'Download the media resource timed out' is retried only a few times before it is recorded."""
    decision = classify_status(400, {"code": "InvalidParameter.DataInspection",
                                     "message": "Download the media resource timed out during the data inspection"}, {})
    assert decision.max_attempts == 3


def test_stop_message_says_what_to_fix() -> None:
    """A job-level stop names the status, the code and the fix."""
    decision = classify_status(401, {"code": "invalid_api_key", "message": "Incorrect API key provided."}, {})
    assert "401" in decision.message and "invalid_api_key" in decision.message
    assert "region" in decision.message


RETRY_AFTER = [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": "2.5"}, 2.5),
    ({"retry-after": "-4"}, 0.0),
    ({"retry-after": "100000"}, 120.0),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
    ({"retry-after": "Wed, 25 Nov 2026 12:00:10 GMT"}, 10.0),
    ({"retry-after": "soon"}, None),
    ({}, None),
]


@pytest.mark.parametrize(("headers", "expected"), RETRY_AFTER)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After is read from retry-after-ms, seconds or an HTTP date, and capped."""
    now = 1795608000.0  # Wed, 25 Nov 2026 12:00:00 GMT
    assert retry_after(headers, now=now) == pytest.approx(expected) if expected is not None else \
        retry_after(headers, now=now) is None


def test_429_carries_retry_after_into_the_decision() -> None:
    """A 429 with Retry-After tells the runner how long everyone should wait."""
    decision = classify_status(429, {"code": "limit_requests", "message": "slow down"}, {"retry-after": "7"})
    assert decision.retry_after_s == 7.0


def test_backoff_grows_exponentially_within_jitter_bounds() -> None:
    """Backoff doubles per failure, stays within [base/2, base] and never exceeds the cap."""
    rng = random.Random(1)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (12, 60.0)]:
        waits = [backoff_s(attempt, initial_s=1.0, max_s=60.0, rng=rng) for _ in range(50)]
        assert all(base / 2 <= w <= base for w in waits)
    assert backoff_s(3, initial_s=1.0, max_s=60.0, jitter=0) == 4.0
