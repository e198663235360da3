"""The job's health, as tables: when a run of failures is the job's rather than the rows', and when it is not."""

from __future__ import annotations

import pytest

from qwenvl_batch.client import Completion
from qwenvl_batch.health import (
    JobHealth,
    estimated_usage,
    images_ignored,
    message_shape,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _health(**kwargs: float) -> tuple[JobHealth[str], Clock]:
    clock = Clock()
    return JobHealth(clock=clock, **kwargs), clock  # type: ignore[arg-type]


VALIDATION = ("invalid_request", "server_rejected_input", "HTTP 500, 1 validation error for row {n}: int_parsing")

# (events, expected stop code or None, rows recorded by the end, rows left pending when it stopped)
# events: "ok" | "fail" (the validation failure) | "other" (another failure) | "input" | "moderation"
ROW_CASES = [
    (["fail"] * 5, "server_rejected_input", 0, 5),
    (["fail"] * 4, None, 0, 0),  # not yet decided: the 4 are held until the run ends (flush)
    (["fail"] * 4 + ["ok"], None, 5, 0),
    (["fail", "fail", "other", "fail", "fail", "fail"], None, 3, 0),
    (["ok"] + ["fail"] * 24, None, 1, 0),
    (["ok"] + ["fail"] * 25, "server_rejected_input", 1, 25),
    (["input"] * 10, None, 10, 0),
    (["moderation"] * 10, None, 10, 0),
    (["fail", "input", "fail", "moderation", "fail", "fail", "fail"], "server_rejected_input", 2, 5),
]


@pytest.mark.parametrize(("events", "stop", "recorded", "pending"), ROW_CASES)
def test_systematic_failures(events: list[str], stop: str | None, recorded: int, pending: int) -> None:
    """The first 5 rows (or 25 in a row later) failing the same way stop the job and stay pending; anything that
    breaks the streak releases the held rows as ordinary row errors."""
    health, _ = _health()
    out: list[str] = []
    verdict = None
    seen = 0
    for n, event in enumerate(events):
        seen += 1
        row = f"row{n}"
        if event == "ok":
            out += health.row_succeeded() + [row]
            continue
        error_type, code, message = {
            "fail": VALIDATION, "other": ("server", "http_502", "Bad gateway"),
            "input": ("input", "file_missing", f"img/{n}.jpg is missing"),
            "moderation": ("content_filter", "data_inspection_failed", "Input data may contain inappropriate content."),
        }[event]
        ready, verdict = health.row_failed(row, error_type, code, message.format(n=n))
        out += ready
        if verdict is not None:
            break
    assert (verdict.code if verdict else None) == stop
    assert len(out) == recorded
    if verdict is not None:
        assert verdict.message.startswith("every request fails with invalid_request server_rejected_input")
        assert "check" in verdict.message and "pending" in verdict.message
        assert len(out) + pending == seen  # every row seen is either recorded or left pending
    else:
        assert len(out + health.flush()) == sum(1 for _ in events)


def test_same_shape_ignores_numbers_ids_and_quotes() -> None:
    """Messages that differ only in numbers, ids or quoted values have the same shape."""
    assert message_shape("row 12: 'abc' failed, request 9f8e7d6c5b4a") == message_shape("row 7: 'x' failed, request "
                                                                                         "0a1b2c3d4e5f")
    assert message_shape("Bad gateway") != message_shape("Service unavailable")


# (attempt events with times, expected stop?) — "a" an answer, "c" a connect failure
CONNECT_CASES = [
    ([("c", t) for t in range(8)], True),  # never answered: 8 connect failures
    ([("c", t) for t in range(7)], False),
    ([("a", 0)] + [("c", t) for t in range(1, 9)], False),  # answered before: 8 failures in 8 s is a blip
    ([("a", 0)] + [("c", t * 10) for t in range(1, 9)], True),  # answered before: failing for 70 s is down
    ([("c", 0), ("c", 1), ("a", 2)] + [("c", t) for t in range(3, 9)], False),  # an answer resets the count
]


@pytest.mark.parametrize(("events", "stops"), CONNECT_CASES)
def test_endpoint_down(events: list[tuple[str, float]], stops: bool) -> None:
    """Only a run of connect failures with no answer (or lasting a minute) is the endpoint being down."""
    health, clock = _health()
    verdict = None
    for kind, t in events:
        clock.now = t
        if kind == "a":
            health.attempt_answered()
        else:
            verdict = health.attempt_connect_failed("cannot connect to 127.0.0.1:8000: Connection refused [Errno 111]")
    assert (verdict is not None) == stops
    if verdict is not None:
        assert verdict.code == "connect_failed"
        assert "cannot connect to 127.0.0.1:8000 — is the server running / is the base_url right?" in verdict.message


@pytest.mark.parametrize(("flags", "stops"), [
    ([True, True, True], True),
    ([True, True, False, True, True], False),
    ([False, True, True, True], True),
    ([True, True], False),
])
def test_images_ignored_in_a_row_stop_the_job(flags: list[bool], stops: bool) -> None:
    """Three image rows in a row that the server ignored stop the job; an honoured one resets the count."""
    health, _ = _health()
    verdicts = [health.image_row(flag) for flag in flags]
    assert (verdicts[-1] is not None) == stops
    if stops:
        assert "this server ignored the images: " in verdicts[-1].message  # type: ignore[union-attr]
        assert "is the model multimodal / is the chat template right?" in verdicts[-1].message  # type: ignore[union-attr]


@pytest.mark.parametrize(("n_images", "prompt", "image", "text", "ignored"), [
    (1, 9, None, 22, True),  # llama-cpp-python: 9 tokens for any list-content request
    (1, 22, None, 22, True),  # the text only
    (1, 26, None, 22, False),  # text + the smallest image
    (2, 29, None, 22, True),
    (1, 700, 0, 22, True),  # the server says image_tokens = 0
    (1, 9, 66, 22, False),  # image_tokens reported: it decides
    (0, 9, None, 22, False),  # no images: nothing to check
    (1, None, None, 22, False),  # no usage: cannot tell
])
def test_image_ignored_rule(n_images: int, prompt: int | None, image: int | None, text: int, ignored: bool) -> None:
    """Billed prompt tokens below the text alone plus 4 per image (or image_tokens = 0) mean the images were ignored."""
    assert (images_ignored(n_images=n_images, prompt_tokens=prompt, image_tokens=image, text_tokens=text)
            is not None) == ignored


def test_estimated_usage_is_never_zero() -> None:
    """An answer without usage gets the prompt estimate and a completion count from its text, flagged."""
    bare = Completion(content="a" * 40, reasoning=None, finish_reason="stop", model="m", prompt_tokens=None,
                      completion_tokens=None, total_tokens=None, reasoning_tokens=None, cached_tokens=None,
                      image_tokens=None, request_id=None)
    filled = estimated_usage(bare, 86)
    assert (filled.prompt_tokens, filled.completion_tokens, filled.total_tokens) == (86, 10, 96)
    assert filled.usage_estimated and not bare.usage_estimated
