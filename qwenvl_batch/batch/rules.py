"""One provider-rules object for the Batch API: DashScope's and OpenAI's differ only in limits and shapes.

Everything that differs between the two is data here (line/file limits, completion windows, where request
extensions go, how a batch is tagged and found again, how an error line is spelt), so the rest of the batch
package is one implementation. Sources: ../shared/reference/next-phase-facts.md §1.1 (DashScope) and §1.2
(OpenAI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config import REGION_BASE_URLS, JobConfig
from ..errors import ConfigError

MB = 1024 * 1024
ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Multimodal batch is offered in Beijing only; Singapore batch is text-only (facts §1.1 "Which models").
BEIJING_ONLY_NOTE = ("Multimodal (image) batch is offered in the Beijing region only (region = \"cn\", a Beijing "
                     "API key); the Singapore Batch API takes text-only models (qwen-max/plus/flash/turbo)")


@dataclass(frozen=True)
class ProviderRules:
    """The Batch API's contract for one provider."""

    name: str
    max_lines: int
    max_file_bytes: int
    max_line_bytes: int | None
    windows_hours: tuple[int, int]  # the completion windows accepted, in hours (inclusive)
    extensions_in_body: bool  # DashScope: enable_thinking etc. at the top level of ``body``, never extra_body
    list_filter: bool  # the list endpoint filters on metadata.ds_name server-side

    def check_window(self, window: str) -> str:
        """``"24h"``/``"14d"`` within this provider's range, or a ConfigError saying which are accepted."""
        match = re.fullmatch(r"([1-9][0-9]*)([hd])", window)
        hours = int(match.group(1)) * (24 if match.group(2) == "d" else 1) if match else -1
        low, high = self.windows_hours
        if not low <= hours <= high:
            accepted = '"24h"' if low == high else f'"{low}h" to "{high}h" (or "1d" to "{high // 24}d")'
            raise ConfigError(f"[batch] completion_window = {window!r}: {self.name} accepts {accepted}")
        return window

    def body(self, params: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
        """A JSONL line's ``body``: the realtime request's parameters, with ``extra_body`` merged in at the top
        level (DashScope reads ``enable_thinking``, ``vl_high_resolution_images``… there, not in extra_body)."""
        body = {key: value for key, value in params.items() if key != "extra_body"}
        extra = {k: v for k, v in (params.get("extra_body") or {}).items() if k not in ("stream", "stream_options")}
        if self.extensions_in_body:
            body.update(extra)
        elif extra:
            body["extra_body"] = extra
        body["messages"] = messages
        return body

    def metadata(self, ds_name: str, description: str) -> dict[str, str]:
        """The batch's tag: ``ds_name`` finds a batch created just before a crash (``list``) on both APIs."""
        return {"ds_name": ds_name[:100], "ds_description": description[:200]}


DASHSCOPE = ProviderRules("DashScope Batch API", max_lines=50_000, max_file_bytes=480 * MB,
                          max_line_bytes=6 * MB, windows_hours=(24, 336), extensions_in_body=True, list_filter=True)
OPENAI = ProviderRules("OpenAI Batch API", max_lines=50_000, max_file_bytes=190 * MB, max_line_bytes=None,
                       windows_hours=(24, 24), extensions_in_body=False, list_filter=False)


def rules_for(job: JobConfig) -> ProviderRules:
    """OpenAI's rules for api.openai.com, DashScope's for everything else (the simulator speaks DashScope)."""
    return OPENAI if "api.openai.com" in (job.model.base_url or "") else DASHSCOPE


def check_region(job: JobConfig) -> str | None:
    """Refuse an image batch job aimed at a DashScope region other than Beijing, before anything is uploaded.

    With ``--simulate`` the simulator would accept it, so the same sentence comes back as a warning instead.
    """
    if job.model.base_url or (job.model.region or "intl") == "cn":
        return None
    where = f"{job.job_file or 'job'} [model] region = {job.model.region or 'intl'!r}"
    message = f"{where}: {BEIJING_ONLY_NOTE}. Set region = \"cn\", or use mode = \"realtime\"."
    if job.run.simulate:
        return message + " (Simulated run: going ahead, but the real service would not take this job.)"
    raise ConfigError(message + " Nothing was uploaded.")


def batch_endpoint_url(job: JobConfig) -> str:
    """The base URL the file and batch calls go to (the Batch API lives beside chat completions)."""
    return job.model.base_url.rstrip("/") if job.model.base_url else REGION_BASE_URLS[job.model.region or "intl"]


def error_fields(line: dict[str, Any]) -> tuple[str | None, str | None, int | None]:
    """(code, message, HTTP status) of a result line that failed, or (None, None, None) for a success.

    Accepts every spelling seen: ``error.{code,message}``, ``error.{error_code,error_message}`` (DashScope's CSV
    sample) and a ``response.status_code`` other than 200 with the error in ``response.body.error``.
    """
    response = line.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    error = line.get("error")
    if isinstance(error, dict) and error:
        code = error.get("code") or error.get("error_code")
        message = error.get("message") or error.get("error_message")
        return (str(code) if code is not None else "error"), str(message or code or "error"), status
    if status is not None and status != 200:
        body = response.get("body") or {}
        inner = body.get("error") if isinstance(body, dict) else None
        inner = inner if isinstance(inner, dict) else {}
        return str(inner.get("code") or f"http_{status}"), str(inner.get("message") or f"HTTP {status}"), status
    return None, None, None
