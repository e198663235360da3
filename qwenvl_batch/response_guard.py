"""What a server sends is bounded and checked before the runner trusts it: one answer never crashes or stalls a job.

A hostile or broken server (or a proxy in front of a good one) can send a body that inflates to gigabytes, JSON
nested 200k deep, usage of 10^15 or -80 tokens or ``"eighty"``, text with a lone surrogate that no Parquet writer
accepts. Each of those must become a retried or recorded row with a clear reason, never a traceback, a memory
blow-up, or a token meter that waits forever. So:

* ``GuardedTransport`` wraps the HTTP transport (httpx or aiohttp): it decodes gzip/deflate itself, incrementally,
  and stops reading past ``MAX_RESPONSE_BYTES`` of *decoded* bytes (or compressed, or a Content-Length above it),
  so memory stays bounded whatever the body; a content-encoding it cannot bound is refused.
* ``checked_usage`` keeps usage only when every count is a non-negative integer within a sane bound for the
  request; otherwise the row records the raw usage in ``warning`` and the runner's estimate is used for the rate
  limiter, the cost and the spend cap.
* ``clean_text`` replaces lone surrogates (U+FFFD) so the answer can be stored, and says that it did.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

from .policy import InvalidResponseError

try:  # openai>=3 ships its HTTP stack as httpx2; older releases use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef]

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # decoded bytes of one answer: a 32k-token streamed answer is ~10 MB of SSE
ABSOLUTE_MAX_TOKENS = 100_000_000  # no usage count of one request is ever above this (100x any context window)
USAGE_FLOOR = 100_000  # a request's usage is sane up to this many tokens ...
USAGE_PER_ESTIMATE = 100  # ... or this many times the runner's own estimate for it, whichever is larger
C = TypeVar("C")
_SURROGATE = re.compile("[\ud800-\udfff]")
_DECODABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_CHUNK = 64 * 1024


class ResponseTooLarge(InvalidResponseError):
    """An answer above ``MAX_RESPONSE_BYTES`` (decoded): not read further, the connection dropped."""


class GuardedTransport(httpx.AsyncBaseTransport):
    """Any transport, with every response body bounded (see the module docstring)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, max_bytes: int | None = None) -> None:
        self.inner = inner
        self.max_bytes = max_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.headers["Accept-Encoding"] = "gzip, deflate"  # the encodings this transport can bound
        response = await self.inner.handle_async_request(request)
        limit = self.max_bytes or MAX_RESPONSE_BYTES
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        length = response.headers.get("content-length", "")
        problem = None
        if encoding not in ("", "identity", *_DECODABLE):
            problem = f"the answer uses content-encoding {encoding!r}, which cannot be read within a size bound"
        elif length.isdigit() and int(length) > limit:
            problem = f"the answer is {int(length)} bytes, over the {limit}-byte bound for one answer"
        if problem is not None:
            await response.aclose()
            raise ResponseTooLarge(problem)
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in (b"content-encoding", b"content-length")]
        return httpx.Response(status_code=response.status_code, headers=headers,
                              stream=_BoundedStream(response, _DECODABLE.get(encoding), limit),
                              request=request, extensions=response.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _BoundedStream(httpx.AsyncByteStream):
    """The inner response's bytes, decoded (gzip/deflate) in bounded steps, cut off past ``limit`` bytes."""

    def __init__(self, response: httpx.Response, wbits: int | None, limit: int) -> None:
        self.response = response
        self.decoder = zlib.decompressobj(wbits) if wbits is not None else None
        self.limit = limit
        self.seen = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for raw in self.response.aiter_raw():
            for piece in self._decode(raw):
                self.seen += len(piece)
                if self.seen > self.limit:
                    raise ResponseTooLarge(f"the answer inflates past the {self.limit}-byte bound for one answer "
                                           "(a compressed body that decodes to more than any answer can be)")
                yield piece
        if self.decoder is not None:
            tail = self.decoder.flush()
            if tail:
                yield tail

    def _decode(self, raw: bytes) -> Iterator[bytes]:
        """Decoded pieces of at most ``_CHUNK`` bytes each, so one small compressed chunk cannot inflate at once
        (the caller counts them and stops at the bound)."""
        if self.decoder is None:
            yield raw
            return
        data = raw
        while data:
            try:
                piece = self.decoder.decompress(data, _CHUNK)
            except zlib.error as exc:
                raise InvalidResponseError(f"the answer's compressed body is damaged: {exc}") from None
            yield piece
            data = self.decoder.unconsumed_tail

    async def aclose(self) -> None:
        await self.response.aclose()


def clean_text(value: Any) -> tuple[str | None, bool]:
    """(text fit for storage, whether anything was replaced): lone surrogates become U+FFFD; a non-string the
    server sent where text belongs becomes its JSON text."""
    if value is None:
        return None, False
    text = value if isinstance(value, str) else _json_text(value)
    cleaned = _SURROGATE.sub("\ufffd", text)
    return cleaned, cleaned != text or not isinstance(value, str)


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, default=str)[:1000]
    except (TypeError, ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def usage_bound(request_estimate: int) -> int:
    """The most tokens one count of a request's usage can sanely be, given the runner's estimate of the request
    (prompt plus expected completion): generous, because estimates of other servers' image tokens can be off."""
    return max(USAGE_FLOOR, USAGE_PER_ESTIMATE * max(request_estimate, 1))


def within_request(completion: C, request_estimate: int) -> C:
    """The completion, its usage dropped (to be estimated) when a count exceeds ``usage_bound`` for this request,
    with the raw usage in ``warning``: 10^6 tokens billed for a 300-token request would stall the token meter and
    break the spend cap."""
    bound = usage_bound(request_estimate)
    counts = {name: getattr(completion, name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    if all(value is None or value <= bound for value in counts.values()):
        return completion
    raw = json.dumps(counts)
    return dataclasses.replace(  # type: ignore[type-var]
        completion, prompt_tokens=None, completion_tokens=None, total_tokens=None,
        reasoning_tokens=None, cached_tokens=None, image_tokens=None,
        warning=join_warnings(getattr(completion, "warning", None), f"usage_invalid={raw} (over {bound} for this "
                              "request)"))


def token_count(value: Any, bound: int) -> int | None:
    """A usage count as the integer it must be (0 ≤ n ≤ bound), else None; 80.0 is 80, "80", True, -1 are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value <= bound else None


def raw_usage_text(usage: Any) -> str:
    """The usage as the server sent it, short, for the row's warning."""
    fields = getattr(usage, "model_dump", None)
    try:
        raw = fields(mode="python", warnings=False) if callable(fields) else usage
    except Exception:  # noqa: BLE001 - only the warning's text is at stake
        raw = usage
    keep = {k: raw.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")} \
        if isinstance(raw, dict) else raw
    return _SURROGATE.sub("\ufffd", _json_text(keep))[:300]


def join_warnings(*warnings: str | None) -> str | None:
    """Several warnings in one column, ``; ``-separated (each ``kind=detail``; the summary counts the kinds)."""
    kept = [w for w in warnings if w]
    return "; ".join(kept) if kept else None
