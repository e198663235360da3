"""Is it the rows, or the job? Detecting failures that are systematic, and answers that are silently wrong.

A batch job must not record 10^5 identical errors, retry a dead endpoint for hours, or store empty answers as
``ok`` because the server dropped the images. Each of those looks like a per-row outcome one row at a time; only
the sequence shows it is the job. ``JobHealth`` is fed the outcome of every attempt and every row and says when
the job must stop and why. It is pure (a clock is injected), so its rules are tested as tables
(tests/test_health.py):

* **Endpoint down**: the last ``connect_attempts`` attempts all failed to connect (refused, DNS, unreachable)
  and either no answer ever arrived or the failures have lasted ``connect_window_s``. One flaky connection among
  answers is a per-row retry, not a stop.
* **Systematic failure**: the first ``first_rows`` rows of the run (or ``streak_rows`` rows in a row, later)
  failed with the same error type, code and message shape. Those rows are *held* (not recorded) while the streak
  grows, so when the job stops they stay pending and a re-run after the fix sends them; when a success or another
  error breaks the streak they are released and recorded as the row errors they are.
* **Images ignored**: ``ignored_image_rows`` rows in a row whose usage shows the server did not see the images
  (``images_ignored``) stop the job: the model is not multimodal, or its chat template drops image parts.

``estimated_usage`` fills in the usage of an answer that came without any (llama.cpp streams): tokens are the
runner's own estimate, flagged, never zero.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from . import tokens

T = TypeVar("T")

MIN_IMAGE_TOKENS = 4  # the fewest prompt tokens any vision model spends on an image (Qwen-VL: 4 + 2 markers)
NOT_SYSTEMATIC = frozenset({"input", "content_filter"})  # the row's own data, or the row's own content


@dataclass(frozen=True)
class Stop:
    """A job-level stop: ``code`` for the summary, ``message`` for the user (what failed, what to check)."""

    code: str
    message: str


def message_shape(message: str) -> str:
    """The message with what varies per request removed (numbers, ids, quoted values, row text), so that the
    "same" error on different rows compares equal."""
    text = message.lower()
    text = re.sub(r"(['\"`]).*?\1", "'…'", text)
    text = re.sub(r"\b[0-9a-f]{8,}(-[0-9a-f]{4,})*\b", "#", text)
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return " ".join(text.split())[:160]


def _hint(error_type: str, code: str | None) -> str:
    if code == "server_rejected_input":
        return ("the request settings the server refuses ([model] parameters, extra_body, max_tokens) and the "
                "server's log")
    if error_type == "invalid_request":
        return "[model] settings and extra_body against what this server accepts"
    if error_type == "rate_limit":
        return "the account's limits against [limits] requests_per_minute / tokens_per_minute, and its quota"
    if error_type in ("connection", "timeout"):
        return "that the server is up and reachable at [model] base_url, and its load"
    if error_type == "parse":
        return ("[output.schema] against what the model can answer (the rows' response column shows its answers; "
                "README 'Structured output')")
    if error_type == "client":
        return "the server's answers against what an OpenAI-compatible server sends (please report this error)"
    return "the server's health and its log"


@dataclass(frozen=True)
class _Failure:
    error_type: str
    code: str | None
    shape: str


class JobHealth(Generic[T]):
    """Fed with attempt and row outcomes; returns a ``Stop`` when the job, not the row, is failing.

    ``T`` is the runner's row record, held opaque while a streak of identical failures is undecided."""

    def __init__(self, *, first_rows: int = 5, streak_rows: int = 25, connect_attempts: int = 8,
                 connect_window_s: float = 60.0, ignored_image_rows: int = 3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first_rows = first_rows
        self.streak_rows = streak_rows
        self.connect_attempts = connect_attempts
        self.connect_window_s = connect_window_s
        self.ignored_image_rows = ignored_image_rows
        self._clock = clock
        self.answered = False  # some HTTP answer ever arrived
        self.rows_ok = 0
        self._connect_streak = 0
        self._connect_since: float | None = None
        self._held: list[T] = []
        self._held_failure: _Failure | None = None
        self._ignored_streak = 0

    # -- attempts ---------------------------------------------------------------------------------------------
    def attempt_answered(self) -> None:
        """An HTTP answer arrived (a success or an error status): the endpoint is up."""
        self.answered = True
        self._connect_streak = 0
        self._connect_since = None

    def attempt_connect_failed(self, message: str) -> Stop | None:
        """An attempt could not connect; a Stop when the endpoint looks down rather than flaky."""
        now = self._clock()
        self._connect_streak += 1
        if self._connect_since is None:
            self._connect_since = now
        lasted = now - self._connect_since
        if self._connect_streak < self.connect_attempts:
            return None
        if self.answered and lasted < self.connect_window_s:
            return None
        target = message.split("cannot connect to ", 1)[-1].split(": ", 1)[0] if "cannot connect to " in message \
            else "the server"
        return Stop("connect_failed",
                    f"cannot connect to {target} — is the server running / is the base_url right? (the last "
                    f"{self._connect_streak} attempts over {lasted:.0f} s failed to connect"
                    f"{'' if self.answered else ' and no answer ever arrived'}; last: {message}). The rows not "
                    "done stay pending: start the server, then run the same command again.")

    # -- rows -------------------------------------------------------------------------------------------------
    def row_succeeded(self) -> list[T]:
        """A row ended ok: any held streak was not the job after all; returns the held rows to record now."""
        self.rows_ok += 1
        return self._release()

    def row_failed(self, row: T, error_type: str, code: str | None, message: str) -> tuple[list[T], Stop | None]:
        """A row ended in error: (rows to record now, a Stop or None). On a Stop the held rows are dropped, so
        they stay pending."""
        if error_type in NOT_SYSTEMATIC:
            return [row], None
        failure = _Failure(error_type, code, message_shape(message))
        released = self._release() if failure != self._held_failure else []
        self._held_failure = failure
        self._held.append(row)
        limit = self.first_rows if self.rows_ok == 0 else self.streak_rows
        if len(self._held) < limit:
            return released, None
        count = len(self._held)
        self._held, self._held_failure = [], None
        where = f"the first {count} rows" if self.rows_ok == 0 else f"{count} rows in a row"
        what = f"{error_type}{f' {code}' if code else ''}: {' '.join(message.split())[:240]}"
        return released, Stop(code or error_type,
                              f"every request fails with {what} ({where}) — check {_hint(error_type, code)}. "
                              "Those rows stay pending: fix the cause, then run the same command again.")

    def flush(self) -> list[T]:
        """The run ended without a stop: held rows are ordinary row errors after all."""
        return self._release()

    def _release(self) -> list[T]:
        held, self._held, self._held_failure = self._held, [], None
        return held

    # -- images -----------------------------------------------------------------------------------------------
    def image_row(self, ignored: bool) -> Stop | None:
        """A row with images was answered; a Stop after ``ignored_image_rows`` in a row the server ignored."""
        self._ignored_streak = self._ignored_streak + 1 if ignored else 0
        if self._ignored_streak < self.ignored_image_rows:
            return None
        return Stop("image_ignored_by_server",
                    f"this server ignored the images: {self._ignored_streak} rows in a row were billed fewer prompt "
                    "tokens than their text alone plus a few per image — is the model multimodal / is the chat "
                    "template right? (llama.cpp: load the model's --mmproj and a vision chat format). The rows not "
                    "done stay pending; those answered are recorded as errors (--retry-failed re-sends them).")


def images_ignored(*, n_images: int, prompt_tokens: int | None, image_tokens: int | None,
                   text_tokens: int) -> str | None:
    """Why the usage shows the server did not see the row's images, or None if it did (or cannot tell).

    ``image_tokens`` decides when the server reports it; otherwise the billed ``prompt_tokens`` must reach the
    runner's estimate of the text alone plus ``MIN_IMAGE_TOKENS`` per image."""
    if n_images == 0:
        return None
    if image_tokens is not None:
        return None if image_tokens > 0 else f"the server reported image_tokens = 0 for {n_images} image(s)"
    if prompt_tokens is None:
        return None
    floor = text_tokens + MIN_IMAGE_TOKENS * n_images
    if prompt_tokens >= floor:
        return None
    return (f"the server billed {prompt_tokens} prompt tokens, fewer than the text alone (~{text_tokens}) plus "
            f"{MIN_IMAGE_TOKENS} per image for {n_images} image(s)")


_C = TypeVar("_C")


def estimated_usage(completion: _C, prompt_tokens: int, max_tokens: int | None = None) -> _C:
    """A completion that came without usage, with the runner's estimate filled in (``usage_estimated=True``):
    the prompt as estimated before sending, the completion from the answer's text (at most ``max_tokens``, which
    bounds the answer but not the thinking, which is added)."""
    content = getattr(completion, "content", "") or ""
    reasoning = getattr(completion, "reasoning", None) or ""
    answer_tokens = tokens.text_tokens(content)
    if max_tokens is not None:
        answer_tokens = min(answer_tokens, max_tokens)
    completion_tokens = answer_tokens + tokens.text_tokens(reasoning)
    return dataclasses.replace(  # type: ignore[type-var]
        completion, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens, usage_estimated=True,
        reasoning_tokens=tokens.text_tokens(reasoning) if reasoning else 0,
    )
