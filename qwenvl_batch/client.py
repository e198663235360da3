"""One request attempt: send it (streamed or not), gather the answer and its usage, or raise.

This module knows the wire: the official ``openai`` AsyncOpenAI client with its own retries off (retries are the
runner's, so they don't multiply), DashScope's extras (``reasoning_content``, ``x-dashscope-partialresponse``,
usage in the last stream chunk via ``stream_options.include_usage``), and the three timeouts a long unattended
job needs: connect, total, and for streams the idle gap between chunks. What to do about a failure is decided
in policy.py, not here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import openai

from . import tokens
from .config import JobConfig
from .errors import ConfigError
from .policy import (
    InvalidResponseError,
    PartialResponseError,
    StreamCutError,
    proxy_retries,
)

try:  # openai>=3 ships its HTTP stack as httpx2; older releases use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """What one successful attempt returned."""

    content: str
    reasoning: str | None
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    reasoning_tokens: int | None
    cached_tokens: int | None
    image_tokens: int | None
    request_id: str | None
    usage_estimated: bool = False  # the server sent no usage: the token counts are the runner's estimate
    proxy_retries: int = 0  # upstream attempts a proxy made on its own first (x-litellm-attempted-retries)
    headers: Mapping[str, str] = field(default_factory=dict)  # rate-limit headers only, names lower-cased


class ChatClient:
    """Sends chat completions for one job; holds the connection pool, so create one per run."""

    def __init__(self, job: JobConfig, *, api_key: str, base_url: str | None = None) -> None:
        limits = job.limits
        self.job = job
        self.stream = job.model.streams
        self._total_timeout_s = limits.timeout_s
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url or job.model.endpoint,
            max_retries=0,
            timeout=openai.Timeout(limits.timeout_s, connect=limits.connect_timeout_s,
                                   read=limits.stream_idle_timeout_s if self.stream else limits.timeout_s),
            http_client=_http_client(limits.http_client, limits.concurrency + 8),
        )
        self._params = _request_params(job)

    async def close(self) -> None:
        await self._client.close()

    async def complete(self, messages: list[dict[str, Any]]) -> Completion:
        """One attempt, bounded by the total timeout; raises for policy.classify to judge."""
        try:
            async with asyncio.timeout(self._total_timeout_s):
                if self.stream:
                    return await self._complete_streamed(messages)
                return await self._complete_plain(messages)
        except TimeoutError:
            raise openai.APITimeoutError(request=httpx.Request("POST", str(self._client.base_url))) from None

    async def _complete_plain(self, messages: list[dict[str, Any]]) -> Completion:
        raw = await self._client.chat.completions.with_raw_response.create(messages=messages, **self._params)
        completion = raw.parse()
        choices = getattr(completion, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            _raise_error_body(completion, raw.http_request)
            raise InvalidResponseError("the server answered 200 but the body is not a chat completion")
        message = choices[0].message
        result = _completion(
            content=message.content or "",
            reasoning=_extra(message, "reasoning_content"),
            finish_reason=choices[0].finish_reason,
            model=getattr(completion, "model", None),
            usage=getattr(completion, "usage", None),
            request_id=raw.headers.get("x-request-id") or getattr(completion, "id", None),
            proxy_retries=proxy_retries(raw.headers),
            headers=rate_limit_headers(raw.headers),
        )
        if raw.headers.get("x-dashscope-partialresponse", "").lower() == "true":
            raise PartialResponseError("the provider cut the answer short (x-dashscope-partialresponse: true)",
                                       billed=result)
        return result

    async def _complete_streamed(self, messages: list[dict[str, Any]]) -> Completion:
        raw = await self._client.chat.completions.with_raw_response.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **self._params
        )
        stream = raw.parse()
        content: list[str] = []
        reasoning: list[str] = []
        finish_reason = model = usage = None
        chunk_id = None
        try:
            async for chunk in stream:
                chunk_id = chunk_id or getattr(chunk, "id", None)
                model = getattr(chunk, "model", None) or model
                usage = getattr(chunk, "usage", None) or usage
                for choice in chunk.choices or []:
                    delta = choice.delta
                    if delta is not None:
                        content.append(delta.content or "")
                        reasoning.append(_extra(delta, "reasoning_content") or "")
                    finish_reason = choice.finish_reason or finish_reason
        except (httpx.TimeoutException, openai.APITimeoutError):
            if finish_reason is None or usage is None:
                raise openai.APITimeoutError(request=raw.http_request) from None
        except (httpx.TransportError, openai.APIConnectionError) as exc:  # newer SDKs wrap the transport error
            if finish_reason is None or usage is None:
                cause = exc.__cause__ or exc
                raise StreamCutError(f"the stream broke off: {type(cause).__name__}: {cause}") from None
            # Only the closing "[DONE]" was lost: the answer and its usage are complete (and paid for); keep them.
        finally:
            await stream.close()
        if finish_reason is None:
            raise StreamCutError("the stream ended before its last chunk (no finish_reason)")
        return _completion(
            content="".join(content),
            reasoning="".join(reasoning) or None,
            finish_reason=finish_reason,
            model=model,
            usage=usage,
            request_id=raw.headers.get("x-request-id") or chunk_id,
            proxy_retries=proxy_retries(raw.headers),
            headers=rate_limit_headers(raw.headers),
        )


def _http_client(kind: str, connections: int) -> Any:
    """The SDK's HTTP stack: its aiohttp transport ("auto" where available) or httpx (``[limits] http_client``).

    The connection pool must be at least as large as the concurrency, or workers queue for connections while
    the rate limiter thinks their requests are in flight.
    """
    pool = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    aiohttp_client = getattr(openai, "DefaultAioHttpClient", None)
    if kind == "auto":  # aiohttp where the SDK offers it: ~1.3x the requests per CPU second (benchmarks/run.py)
        kind = "aiohttp" if aiohttp_client is not None else "httpx"
    if kind == "aiohttp":
        if aiohttp_client is None:
            raise ConfigError("[limits] http_client = 'aiohttp' needs a newer openai package (pip install -U openai)")
        return aiohttp_client(limits=pool)
    return openai.DefaultAsyncHttpxClient(limits=pool)


def _request_params(job: JobConfig) -> dict[str, Any]:
    """The job-wide keyword arguments of every request (model, sampling, DashScope extras)."""
    model = job.model
    params: dict[str, Any] = {"model": model.name}
    for name in ("temperature", "top_p", "max_tokens", "seed"):
        value = getattr(model, name)
        if value is not None:
            params[name] = value
    if model.extra_body:
        params["extra_body"] = dict(model.extra_body)
    return params


def _extra(obj: Any, name: str) -> Any:
    """A field the OpenAI types don't declare (DashScope's ``reasoning_content``)."""
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


def _raise_error_body(completion: Any, request: Any) -> None:
    """A 200 whose body is an error envelope (some proxies do that): raise it as the error it is, with its real
    message, for policy.classify to judge like an in-band stream error."""
    error = (getattr(completion, "model_extra", None) or {}).get("error")
    if isinstance(error, dict):
        message = error.get("message")
        raise openai.APIError(message if isinstance(message, str) else "error in a 200 answer", request, body=error)


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The response headers the rate controller reads (``x-ratelimit-*``, LiteLLM's ``llm_provider-x-ratelimit-*``,
    ``retry-after*``), names lower-cased; everything else is dropped."""
    wanted = ("x-ratelimit-", "llm_provider-x-ratelimit-", "retry-after")
    return {name.lower(): value for name, value in headers.items() if name.lower().startswith(wanted)}


def _completion(*, content: str, reasoning: str | None, finish_reason: str | None, model: str | None,
                usage: Any, request_id: str | None, proxy_retries: int = 0,
                headers: Mapping[str, str] | None = None) -> Completion:
    prompt_details = _extra(usage, "prompt_tokens_details") if usage else None
    completion_details = _extra(usage, "completion_tokens_details") if usage else None
    completion_tokens = getattr(usage, "completion_tokens", None) if usage else None
    reasoning_tokens = _detail(completion_details, "reasoning_tokens")
    if reasoning_tokens is None and reasoning and completion_tokens is not None:
        reasoning_tokens = _reasoning_tokens(reasoning, completion_tokens, _detail(completion_details, "text_tokens"))
    return Completion(
        content=content,
        reasoning=reasoning,
        finish_reason=finish_reason,
        model=model,
        prompt_tokens=getattr(usage, "prompt_tokens", None) if usage else None,
        completion_tokens=completion_tokens,
        total_tokens=getattr(usage, "total_tokens", None) if usage else None,
        reasoning_tokens=reasoning_tokens if reasoning_tokens is not None else (0 if usage and not reasoning else None),
        cached_tokens=_detail(prompt_details, "cached_tokens"),
        image_tokens=_detail(prompt_details, "image_tokens"),
        request_id=request_id,
        proxy_retries=proxy_retries,
        headers=dict(headers or {}),
    )


def _reasoning_tokens(reasoning: str, completion_tokens: int, text_tokens: int | None) -> int:
    """The API sometimes sends ``reasoning_tokens: null`` (reference §6.4): derive it, since thinking is billed.

    ``completion_tokens`` includes the thinking, so with ``text_tokens`` the difference is exact; without it,
    approximate from the reasoning text (never more than the completion itself).
    """
    if text_tokens is not None:
        return max(completion_tokens - text_tokens, 0)
    return min(tokens.text_tokens(reasoning), completion_tokens)


def _detail(details: Any, name: str) -> int | None:
    if details is None:
        return None
    value = details.get(name) if isinstance(details, dict) else _extra(details, name)
    return int(value) if isinstance(value, (int, float)) else None
