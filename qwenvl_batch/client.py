"""One request attempt: send it (streamed or not), gather the answer and its usage, or raise.

This module knows the wire: the official ``openai`` AsyncOpenAI client with its own retries off (retries are the
runner's, so they don't multiply), DashScope's extras (``reasoning_content``, ``x-dashscope-partialresponse``,
usage in the last stream chunk via ``stream_options.include_usage``), and the three timeouts a long unattended
job needs: connect, total, and for streams the idle gap between chunks. What to do about a failure is decided
in policy.py, not here.

The cheap path through the SDK (profiled: benchmarks/sdk_floor.py): the body is serialised once by
request_body.py and sent with the client's ``post`` (the SDK still builds the request, authenticates, maps every
error status to its exception classes, and owns the connection pool and timeouts), and the answer is decoded once
with ``json.loads`` and read as plain dicts. ``chat.completions.create`` would walk each message part through its
param transforms and build typed response models, ~0.8 ms of CPU per small-image request on top.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
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
from .request_body import json_body
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

CHAT_PATH = "/chat/completions"
# The SDK's telemetry headers (for OpenAI's servers, meaningless to others): each request builds its headers several
# times over (the SDK's dict, httpx's Headers, the transport's), so 9 headers fewer is ~45 µs less per request.
_TELEMETRY_HEADERS = ("X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-OS", "X-Stainless-Arch",
                      "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Async")
_OPTIONS: Any = {"headers": {"x-stainless-retry-count": openai.Omit(), "x-stainless-read-timeout": openai.Omit()}}
# Keyword arguments chat.completions.create takes by name (the typed path only); any other field is extra_body.
_SDK_ARGUMENTS = ("model", "temperature", "top_p", "max_tokens", "seed", "stream", "stream_options")


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

    full_sdk_path = False  # benchmarks only: send through chat.completions.create's typed path, to compare

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
            default_headers=_default_headers(credentials),
        )
        base = self._client.base_url  # merged once, as the SDK merges a path with it on every request
        self._chat_url = str(base.copy_with(raw_path=base.raw_path + CHAT_PATH.lstrip("/").encode()))
        self._body = _request_fields(job, stream=False)
        self._stream_body = _request_fields(job, stream=True)

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

    async def _post(self, body: dict[str, Any], messages: list[dict[str, Any]], *, stream: bool) -> Any:
        """POST the body through the SDK (its auth, headers, timeouts, connection pool and status errors), already
        serialised (request_body.py), so its per-part param transforms never run; the answer comes back raw (an
        ``httpx.Response``, or for a stream an ``AsyncStream`` of plain dicts) and is parsed once, here."""
        if self.full_sdk_path:
            return await self._post_typed(body, messages, stream=stream)
        content = json_body(body, messages)
        if stream:
            return await self._client.post(self._chat_url, cast_to=object, content=content, stream=True,
                                           stream_cls=openai.AsyncStream[object], options=_OPTIONS)
        return await self._client.post(self._chat_url, cast_to=httpx.Response, content=content, options=_OPTIONS)

    async def _post_typed(self, body: dict[str, Any], messages: list[dict[str, Any]], *, stream: bool) -> Any:
        """The SDK's own path (``chat.completions.create``: param transforms, typed response models), kept only so
        that benchmarks/sdk_floor.py and benchmarks/run.py can measure what the raw path saves."""
        create: Any = self._client.chat.completions.with_raw_response.create  # untyped: params from a job file
        extra = {k: v for k, v in body.items() if k not in _SDK_ARGUMENTS}
        raw = await create(messages=messages, **{k: v for k, v in body.items() if k in _SDK_ARGUMENTS},
                           **({"extra_body": extra} if extra else {}))
        parsed = raw.parse()  # ChatCompletion models (or a stream of chunk models): paid for, then read as dicts
        if stream:
            return _DictStream(parsed)
        return raw.http_response

    async def _complete_plain(self, messages: list[dict[str, Any]]) -> Completion:
        response = await self._post(self._body, messages, stream=False)
        body = _json_answer(response)
        choices = body.get("choices") if isinstance(body, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            _raise_error_body(body, response.request)
            raise InvalidResponseError("the server answered 200 but the body is not a chat completion")
        assert isinstance(body, dict) and isinstance(choice, dict)
        headers = response.headers
        result = _completion(
            content=message.get("content") or "",
            reasoning=message.get("reasoning_content"),
            finish_reason=choice.get("finish_reason"),
            model=body.get("model"),
            usage=body.get("usage"),
            request_id=headers.get("x-request-id") or body.get("id"),
            proxy_retries=proxy_retries(headers),
            headers=rate_limit_headers(headers),
        )
        if headers.get("x-dashscope-partialresponse", "").lower() == "true":
            raise PartialResponseError("the provider cut the answer short (x-dashscope-partialresponse: true)",
                                       billed=result)
        return result

    async def _complete_streamed(self, messages: list[dict[str, Any]]) -> Completion:
        stream = await self._post(self._stream_body, messages, stream=True)
        content: list[str] = []
        reasoning: list[str] = []
        finish_reason = model = usage = None
        chunk_id = None
        try:
            async for chunk in stream:
                if not isinstance(chunk, dict):
                    raise InvalidResponseError("a stream event is not a chat completion chunk")
                chunk_id = chunk_id or chunk.get("id")
                model = chunk.get("model") or model
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    if not isinstance(choice, dict):
                        continue
                    delta = choice.get("delta")
                    if isinstance(delta, dict):
                        content.append(_piece(delta.get("content")))
                        reasoning.append(_piece(delta.get("reasoning_content")))
                    finish_reason = choice.get("finish_reason") or finish_reason
                if finish_reason is not None and usage is not None:
                    break  # complete: what may follow is keep-alives and "[DONE]", never worth a timeout
        except (httpx.TimeoutException, openai.APITimeoutError):
            if finish_reason is None or usage is None:
                raise openai.APITimeoutError(request=stream.response.request) from None
        except (httpx.TransportError, openai.APIConnectionError) as exc:  # newer SDKs wrap the transport error
            if finish_reason is None or usage is None:
                cause = exc.__cause__ or exc
                raise StreamCutError(f"the stream broke off: {type(cause).__name__}: {cause}") from None
            # Only the closing "[DONE]" was lost: the answer and its usage are complete (and paid for); keep them.
        finally:
            await stream.close()
        if finish_reason is None:
            raise StreamCutError("the stream ended before its last chunk (no finish_reason)")
        headers = stream.response.headers
        return _completion(
            content="".join(content),
            reasoning="".join(reasoning) or None,
            finish_reason=finish_reason,
            model=model,
            usage=usage,
            request_id=headers.get("x-request-id") or chunk_id,
            proxy_retries=proxy_retries(headers),
            headers=rate_limit_headers(headers),
        )


class _DictStream:
    """The SDK's typed chunk stream read as dicts (``_post_typed`` only), like the raw path's stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.response = stream.response

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for chunk in self.stream:
            yield chunk.model_dump(mode="json", exclude_unset=True, warnings=False)

    async def close(self) -> None:
        await self.stream.close()


def _json_answer(response: Any) -> Any:
    """The 200's body, decoded once. A body that is not JSON under a JSON content type raises (``ValueError``: the
    policy retries it a bounded number of times); under another content type it is not a chat completion."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    try:
        return json.loads(response.content)
    except ValueError:
        if content_type.endswith("json"):
            raise
        raise InvalidResponseError("the server answered 200 but the body is not a chat completion "
                                   f"(content-type {content_type or 'none'})") from None


def _piece(value: Any) -> str:
    """One delta's text ("" for none; a non-string the server sent, as its JSON text)."""
    if value is None or isinstance(value, str):
        return value or ""
    return clean_text(value)[0] or ""


def _default_headers(credentials: str | None) -> Any:
    """Headers of every request: the SDK's telemetry ones left out; URL credentials as the Basic auth header on both
    transports (aiohttp refuses them in the URL)."""
    headers: dict[str, Any] = {name: openai.Omit() for name in _TELEMETRY_HEADERS}
    if credentials:
        headers["Authorization"] = credentials
    return headers


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
    """The job-wide keyword arguments of every request (model, sampling, DashScope extras), as the SDK's
    ``create`` takes them (the Batch API's lines are built from these too)."""
    model = job.model
    params: dict[str, Any] = {"model": model.name}
    for name in ("temperature", "top_p", "max_tokens", "seed"):
        value = getattr(model, name)
        if value is not None:
            params[name] = value
    if model.extra_body:
        params["extra_body"] = dict(model.extra_body)
    return params


def _request_fields(job: JobConfig, *, stream: bool) -> dict[str, Any]:
    """The job-wide fields of every request body, merged as the SDK merges ``create``'s arguments:
    ``extra_body`` last, so it wins over the named parameters."""
    fields = _request_params(job)
    extra = fields.pop("extra_body", {})
    if stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    fields.update(extra)
    return fields


def _extra(obj: Any, name: str) -> Any:
    """A field the OpenAI types don't declare (DashScope's ``reasoning_content``), from a typed model."""
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


def _raise_error_body(body: Any, request: Any) -> None:
    """A 200 whose body is an error envelope (some proxies do that): raise it as the error it is, with its real
    message, for policy.classify to judge like an in-band stream error."""
    error = body.get("error") if isinstance(body, dict) else None
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
    prompt_details = usage.get("prompt_tokens_details") if usage else None
    completion_details = usage.get("completion_tokens_details") if usage else None
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


def _sane_usage(usage: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(usage, None) when its counts are non-negative integers within the sane bound (``response_guard``), else
    (None, ``usage_invalid=<raw usage>``): the runner then estimates it, for the limiter, the cost and the cap."""
    if not usage:
        return None, None
    if callable(getattr(usage, "model_dump", None)):  # a typed CompletionUsage (the Batch API's result lines)
        usage = usage.model_dump(mode="python", warnings=False)
    if not isinstance(usage, dict):
        return None, f"usage_invalid={raw_usage_text(usage)}"
    bound = ABSOLUTE_MAX_TOKENS
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(name)
        if value is not None and token_count(value, bound) is None:
            return None, f"usage_invalid={raw_usage_text(usage)}"
    return usage, None


def _count(usage: dict[str, Any] | None, name: str) -> int | None:
    return token_count(usage.get(name), ABSOLUTE_MAX_TOKENS) if usage else None


def _reasoning_tokens(reasoning: str, completion_tokens: int, text_tokens: int | None) -> int:
    """The API sometimes sends ``reasoning_tokens: null`` (reference §6.4): derive it, since thinking is billed.

    ``completion_tokens`` includes the thinking, so with ``text_tokens`` the difference is exact; without it,
    approximate from the reasoning text (never more than the completion itself).
    """
    if text_tokens is not None:
        return max(completion_tokens - text_tokens, 0)
    return min(tokens.text_tokens(reasoning), completion_tokens)


def _detail(details: Any, name: str) -> int | None:
    """A count inside ``*_tokens_details`` (absent, null or not an object: unknown)."""
    return token_count(details.get(name), ABSOLUTE_MAX_TOKENS) if isinstance(details, dict) else None
