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
from .config import SIMULATOR_API_KEY, JobConfig
from .errors import ConfigError
from .policy import (
    InvalidResponseError,
    PartialResponseError,
    StreamCutError,
    proxy_retries,
)
from .redact import register_secret, split_url_credentials
from .response_guard import (
    ABSOLUTE_MAX_TOKENS,
    GuardedTransport,
    clean_text,
    join_warnings,
    raw_usage_text,
    token_count,
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
    warning: str | None = None  # what was wrong with the answer and repaired (usage_invalid=…, text_sanitized)


class ChatClient:
    """Sends chat completions for one job; holds the connection pool, so create one per run."""

    def __init__(self, job: JobConfig, *, api_key: str, base_url: str | None = None) -> None:
        limits = job.limits
        self.job = job
        self.stream = job.model.streams
        self._total_timeout_s = limits.timeout_s
        register_secret(api_key)  # redacted from every message, stored column and log line from now on
        url, credentials = split_url_credentials(base_url or job.model.endpoint)
        if credentials is not None and api_key not in ("EMPTY", SIMULATOR_API_KEY):
            raise ConfigError(
                "[model] base_url carries credentials (user:password@) and an API key is set too: a request can "
                "carry only one Authorization header. Remove the credentials from base_url, or unset "
                f"{job.model.api_key_env} (with api_key_optional = true) to send them as HTTP Basic auth.")
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=url,
            max_retries=0,
            timeout=openai.Timeout(limits.timeout_s, connect=limits.connect_timeout_s,
                                   read=limits.stream_idle_timeout_s if self.stream else limits.timeout_s),
            http_client=_http_client(limits.http_client, limits.concurrency + 8),
            # URL credentials become the Basic auth header on both transports (aiohttp refuses them in the URL)
            default_headers={"Authorization": credentials} if credentials else None,
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
        except RecursionError:
            raise InvalidResponseError("the answer's JSON is nested too deeply to read (a broken or hostile "
                                       "server)") from None
        except Exception as exc:
            unusable = _unusable_answer(exc)
            if unusable is not None:
                raise unusable from None
            raise

    def _create(self) -> Any:
        """The SDK's create call, untyped: its overloads cannot type parameters assembled from a job file."""
        return self._client.chat.completions.with_raw_response.create

    async def _complete_plain(self, messages: list[dict[str, Any]]) -> Completion:
        raw = await self._create()(messages=messages, **self._params)
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
        raw = await self._create()(
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
                if finish_reason is not None and usage is not None:
                    break  # complete: what may follow is keep-alives and "[DONE]", never worth a timeout
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
        return _guarded(aiohttp_client(limits=pool))
    return _guarded(openai.DefaultAsyncHttpxClient(limits=pool))


def _guarded(client: Any) -> Any:
    """Every transport of the client (proxy mounts too) bounded by response_guard.GuardedTransport."""
    client._transport = GuardedTransport(client._transport)
    client._mounts = {pattern: GuardedTransport(t) if t is not None else None
                      for pattern, t in client._mounts.items()}
    return client


def _unusable_answer(exc: BaseException) -> InvalidResponseError | None:
    """The answer-level failure inside an SDK wrapper (a body over the size bound, too deeply nested), if any."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 12:
        if isinstance(current, InvalidResponseError) and current is not exc:
            return current
        if isinstance(current, RecursionError):
            return InvalidResponseError("the answer's JSON is nested too deeply to read")
        seen.append(current)
        current = current.__cause__ or current.__context__
    return None


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
    """The attempt's result, checked for storage: text without lone surrogates, usage only when it is sane
    (otherwise none, so the runner estimates it, and the raw usage goes to ``warning``)."""
    texts = {name: clean_text(value) for name, value in (("content", content), ("reasoning", reasoning),
                                                         ("finish_reason", finish_reason), ("model", model),
                                                         ("request_id", request_id))}
    sanitized = any(changed for _, changed in texts.values())
    usage, usage_warning = _sane_usage(usage)
    content, reasoning = texts["content"][0] or "", texts["reasoning"][0]
    prompt_details = _extra(usage, "prompt_tokens_details") if usage else None
    completion_details = _extra(usage, "completion_tokens_details") if usage else None
    completion_tokens = _count(usage, "completion_tokens")
    reasoning_tokens = _detail(completion_details, "reasoning_tokens")
    if reasoning_tokens is None and reasoning and completion_tokens is not None:
        reasoning_tokens = _reasoning_tokens(reasoning, completion_tokens, _detail(completion_details, "text_tokens"))
    return Completion(
        content=content,
        reasoning=reasoning,
        finish_reason=texts["finish_reason"][0],
        model=texts["model"][0],
        prompt_tokens=_count(usage, "prompt_tokens"),
        completion_tokens=completion_tokens,
        total_tokens=_count(usage, "total_tokens"),
        reasoning_tokens=reasoning_tokens if reasoning_tokens is not None else (0 if usage and not reasoning else None),
        cached_tokens=_detail(prompt_details, "cached_tokens"),
        image_tokens=_detail(prompt_details, "image_tokens"),
        request_id=texts["request_id"][0],
        proxy_retries=proxy_retries,
        headers=dict(headers or {}),
        warning=join_warnings(usage_warning, "text_sanitized=lone surrogates or non-text replaced" if sanitized
                              else None),
    )


def _sane_usage(usage: Any) -> tuple[Any, str | None]:
    """(usage, None) when its counts are non-negative integers within the sane bound (``response_guard``), else
    (None, ``usage_invalid=<raw usage>``): the runner then estimates it, for the limiter, the cost and the cap."""
    if not usage:
        return None, None
    bound = ABSOLUTE_MAX_TOKENS
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = getattr(usage, name, None)
        if value is not None and token_count(value, bound) is None:
            return None, f"usage_invalid={raw_usage_text(usage)}"
    return usage, None


def _count(usage: Any, name: str) -> int | None:
    return token_count(getattr(usage, name, None), ABSOLUTE_MAX_TOKENS) if usage else None


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
    return token_count(value, ABSOLUTE_MAX_TOKENS)
