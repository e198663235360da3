"""Result rows: what one manifest row becomes in the output, for an answer or an error.

Kept apart from the worker so that every way a row can end (answer, provider error, unusable input) produces
the same columns, costed the same way, with image data never stored (data URLs and bytes become a short
description with a hash).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from .client import Completion
from .media import redact_cell
from .pricing import ModelPrice, row_cost
from .prompt import RenderedRow
from .redact import redact as redact_secrets
from .response_guard import clean_text, join_warnings


class ResultRows:
    """Builds output rows for one job: the manifest row's columns (images redacted), then the result columns."""

    def __init__(self, model_name: str, price: ModelPrice | None, image_columns: list[str]) -> None:
        self.model_name = model_name
        self.price = price
        self.image_columns = image_columns

    def ok(self, row: dict[str, Any], completion: Completion, attempts: int, latency_s: float,
           billed: list[dict[str, Any]]) -> dict[str, Any]:
        """The row of an answered request; its cost includes every billed attempt (partial answers too)."""
        fields = {
            "status": "ok",
            "response": completion.content,
            "reasoning": completion.reasoning,
            "finish_reason": completion.finish_reason,
            "model": completion.model or self.model_name,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.total_tokens,
            "reasoning_tokens": completion.reasoning_tokens,
            "cached_tokens": completion.cached_tokens,
            "image_tokens": completion.image_tokens,
            "usage_source": "estimate" if completion.usage_estimated else "reported",
            "warning": join_warnings(f"proxy_retries={completion.proxy_retries}" if completion.proxy_retries else None,
                                     completion.warning),
            "attempts": attempts + completion.proxy_retries,  # a proxy's hidden retries are attempts too
            "latency_s": round(latency_s, 4),
            "request_id": completion.request_id,
        }
        fields.update(add_costs(billed))
        return self._output_row(row, fields)

    def error(self, row: dict[str, Any], error_type: str, code: str | None, message: str, *, attempts: int,
              latency_s: float | None = None, billed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The row of a request that failed for good (or was never sent: ``error_type="input"``)."""
        fields = {
            "status": "error",
            "model": self.model_name,
            "error_type": error_type,
            "error_code": code,
            "error_message": stored_message(message),
            "attempts": attempts,
            "latency_s": round(latency_s, 4) if latency_s is not None else None,
        }
        fields.update(add_costs(billed or []))
        return self._output_row(row, fields)

    def cost_of(self, completion: Completion) -> dict[str, Any]:
        """The cost columns of one billed attempt; empty when the model is unpriced or usage is missing."""
        price = self.price
        if price is None or completion.prompt_tokens is None or completion.completion_tokens is None:
            return {}
        try:
            cost = row_cost(price, prompt_tokens=completion.prompt_tokens,
                            completion_tokens=completion.completion_tokens, cached_tokens=completion.cached_tokens or 0)
        except ValueError:  # a prompt above the last priced tier: no price known, like an unknown model
            return {}
        return {"input_cost": cost.input_cost, "output_cost": cost.output_cost, "cost": cost.cost,
                "currency": cost.currency}

    def _output_row(self, row: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for column in self.image_columns:
            out[column] = redact(out[column])
        out.update(fields)
        out["finished_at"] = datetime.now(UTC)
        return out


def stored_message(message: str) -> str:
    """A server's error text as it may be stored and shown: no secret (a proxy may echo the request's
    Authorization header), no lone surrogate (Parquet stores UTF-8 only)."""
    cleaned, _ = clean_text(message)
    return redact_secrets(cleaned or "")


def add_costs(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum cost dicts (the answer's and those of billed failed attempts); empty if none is priced."""
    priced = [c for c in costs if c]
    if not priced:
        return {}
    total = {key: sum(c[key] for c in priced) for key in ("input_cost", "output_cost", "cost")}
    return {**total, "currency": priced[0]["currency"]}


def redact(value: Any) -> Any:
    """Output files never hold image bytes: data URLs and bytes cells become a short reference with a hash."""
    return redact_cell(value)


def local_image_bytes(rendered: RenderedRow) -> int:
    """What a row's local images will take in memory once read and base64-encoded (4/3 of the file size)."""
    total = 0
    for ref in rendered.images:
        if ref.path is not None or ref.blob is not None:  # a file, bytes in the manifest, or a tar member
            with contextlib.suppress(OSError):  # a missing file is reported by prepare_image, not here
                total += ref.source.size() * 4 // 3
    return total
