"""Result lines (success and error files) → output rows with exactly the realtime columns, plus batch_id and
custom_id; cost at the Batch price (``batch_discount``, no cache discount); ``latency_s`` = submit → result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion

from ..client import Completion, _completion, _extra
from ..pricing import ModelPrice, row_cost
from ..results import ResultRows
from .rules import error_fields

# Lines the provider did not run (expiry, cancel): not an attempt, the row goes to the next batch.
NOT_RUN_CODES = frozenset({"batch_expired", "batch_cancelled", "expired", "cancelled"})
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_WORDS = ("throttl", "internal", "timeout", "timed out", "unavailable", "overload", "capacity")


@dataclass(frozen=True)
class LineOutcome:
    """What one custom_id's result line says: ``ok``, ``error`` (final), ``transient`` (may go again) or
    ``not_run``."""

    kind: str
    line: dict[str, Any]
    code: str | None = None
    message: str | None = None
    status: int | None = None


def read_lines(path: Path | None) -> Iterator[dict[str, Any]]:
    """The JSON lines of a downloaded result file (none when the batch had no such file)."""
    if path is None or not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for text in handle:
            if text.strip():
                yield json.loads(text)


def outcomes(*paths: Path | None) -> dict[str, LineOutcome]:
    """custom_id → outcome, from both files; results are unordered, so only custom_id maps them back."""
    found: dict[str, LineOutcome] = {}
    for path in paths:
        for line in read_lines(path):
            custom_id = str(line.get("custom_id"))
            code, message, status = error_fields(line)
            if code is None:
                found[custom_id] = LineOutcome("ok", line)
            elif code in NOT_RUN_CODES:
                found.setdefault(custom_id, LineOutcome("not_run", line, code, message, status))
            else:
                transient = (status in TRANSIENT_STATUSES
                             or any(word in f"{code} {message}".lower() for word in TRANSIENT_WORDS))
                found[custom_id] = LineOutcome("transient" if transient else "error", line, code, message, status)
    return found


def completion_of(line: dict[str, Any]) -> Completion:
    """A success line's ``response.body`` (a chat.completion) as the realtime client's Completion."""
    response = line.get("response") or {}
    body = ChatCompletion.model_validate(response.get("body") or {})
    choice = body.choices[0]
    return _completion(content=choice.message.content or "", reasoning=_extra(choice.message, "reasoning_content"),
                       finish_reason=choice.finish_reason, model=body.model, usage=body.usage,
                       request_id=response.get("request_id") or body.id)


def batch_cost(price: ModelPrice | None, completion: Completion) -> dict[str, Any]:
    """The cost columns at the Batch price: ``batch_discount`` × the tier price, no cache discount; empty when
    the model has no known Batch price."""
    if price is None or completion.prompt_tokens is None or completion.completion_tokens is None:
        return {}
    try:
        cost = row_cost(price, prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                        batch=True)
    except ValueError:
        return {}
    return {"input_cost": cost.input_cost, "output_cost": cost.output_cost, "cost": cost.cost,
            "currency": cost.currency}


def result_row(rows: ResultRows, price: ModelPrice | None, row: dict[str, Any], outcome: LineOutcome, *,
               attempts: int, latency_s: float | None) -> dict[str, Any]:
    """The output row of one answered line (ok, or a final error)."""
    if outcome.kind == "ok":
        completion = completion_of(outcome.line)
        return rows.ok(row, completion, attempts, latency_s or 0.0, [batch_cost(price, completion)])
    status = outcome.status or 0
    error_type = "rate_limit" if status == 429 else "server" if status >= 500 or outcome.kind == "transient" \
        else "request"
    return rows.error(row, error_type, outcome.code, f"batch line failed: {outcome.message}", attempts=attempts,
                      latency_s=latency_s)
