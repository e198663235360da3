"""A local SIMULATOR of Model Studio's OpenAI-compatible Chat Completions endpoint for Qwen-VL.

It is not the real service. The demo (``--simulate``), every network test and the benchmarks run against
it, so it copies what a batch runner has to cope with: the request and response shapes (non-stream and
SSE stream, reference seed document), the usage the provider reports (image tokens from
``qwenvl_batch.tokens``, so estimates and served usage agree exactly), the provider's error bodies and
codes (reference §3, §4), its RPM/TPM limits with per-second windows (§3.1), latency, and faults (5xx,
429, dropped and hung connections, cut streams, partial responses, moderation), either at random (seeded)
or on demand with ``[[sim:KIND]]`` / ``[[sim:KIND:N]]`` markers in the request text.

Every response carries ``x-simulator: qwenvl-batch`` and an ``x-request-id``. The answers are deterministic
functions of the request (text and images), never of ``seed`` or ``temperature``: tests can tell that each
row got its own answer, and a re-run gets the same one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import json
import logging
import math
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp
import yarl
from aiohttp import web
from PIL import Image

from . import tokens
from .errors import ConfigError

__all__ = [
    "KNOWN_MODELS",
    "STATE_KEY",
    "RateLimiter",
    "SimulatorConfig",
    "SimulatorState",
    "SimulatorThread",
    "create_app",
    "iter_log_file",
    "serve",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------

KNOWN_MODELS: frozenset[str] = frozenset(
    {
        # Qwen3-VL commercial (hybrid thinking) and snapshots [S7, S8]
        "qwen3-vl-plus", "qwen3-vl-plus-2025-12-19", "qwen3-vl-plus-2025-09-23",
        "qwen3-vl-flash", "qwen3-vl-flash-2025-10-15", "qwen3-vl-flash-2026-01-22",
        # Qwen3-VL open source
        "qwen3-vl-235b-a22b-thinking", "qwen3-vl-235b-a22b-instruct",
        "qwen3-vl-32b-thinking", "qwen3-vl-32b-instruct",
        "qwen3-vl-30b-a3b-thinking", "qwen3-vl-30b-a3b-instruct",
        "qwen3-vl-8b-thinking", "qwen3-vl-8b-instruct",
        # qwen-vl-max / plus
        "qwen-vl-max", "qwen-vl-max-latest", "qwen-vl-max-2025-08-13", "qwen-vl-max-2025-04-08",
        "qwen-vl-plus", "qwen-vl-plus-latest", "qwen-vl-plus-2025-08-15",
        # OCR
        "qwen-vl-ocr", "qwen-vl-ocr-latest", "qwen-vl-ocr-2025-11-20",
        # Qwen2.5-VL open source
        "qwen2.5-vl-72b-instruct", "qwen2.5-vl-32b-instruct", "qwen2.5-vl-7b-instruct", "qwen2.5-vl-3b-instruct",
        # QVQ (thinking, stream only)
        "qvq-max", "qvq-max-latest", "qvq-max-2025-03-25", "qvq-plus",
    }
)  # fmt: skip

ROUTE_PREFIXES = ("/compatible-mode/v1", "/v1")
MAX_DATA_URI_CHARS = 10_485_760  # "Exceeded limit on max bytes per data-uri item : 10485760" [S3, S6]
MAX_DOWNLOAD_BYTES = 10 * 1024 * 1024  # public-URL images: 10 MB [S3]
MAX_INPUT_TOKENS = 258_048  # qwen3-vl-plus max input in thinking mode [S8]; the "toolong" message uses it
MAX_THINKING_BUDGET = 81_920  # qwen3-vl-plus/flash max chain-of-thought [S8]
MAX_BODY_BYTES = 256 * 1024 * 1024  # up to ~250 base64 images per request [S3]; aiohttp's default is 1 MB
ASSUMED_REMOTE_SIZE = (1024, 1024)  # width, height of images on hosts we cannot reach (loopback only)
FETCH_TIMEOUT_S = 10.0
IMAGE_CACHE_ENTRIES = 50_000
STREAM_WORDS_PER_CHUNK = 3
TRUNCATE_AFTER_CHUNKS = 3
LOGNORMAL_SIGMA = 1.0  # p99 is about 10x the median: a heavy tail like real inference latency
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

FAULT_KINDS = (
    "500", "503", "429", "drop", "hang", "truncate", "partial", "moderation",
    "badparam", "timeout_media", "toolong", "garbage", "arrears", "auth",
)  # fmt: skip
_MARKER = re.compile(r"\[\[sim:([A-Za-z0-9_]+)(?::(\d+))?\]\]")
_WORD = re.compile(r"\S+")
_INVALID_PARAM = "<400> InternalError.Algo.InvalidParameter: "

_CAPTION_WORDS = (
    "the", "image", "shows", "a", "calm", "scene", "with", "soft", "natural", "light", "and", "clear",
    "detail", "in", "foreground", "background", "colors", "are", "muted", "warm", "several", "objects",
    "arranged", "near", "center", "of", "frame", "texture", "visible", "on", "surface", "shadow", "falls",
    "to", "left", "right", "edge", "subject", "appears", "still", "overall",
)  # fmt: skip  (41 words: a prime, so every step walks the whole list)
_OCR_WORDS = (
    "INVOICE", "No.", "4821", "Date:", "2025-03-14", "Total:", "$42.17", "Qty", "Item", "Unit", "Price",
    "Subtotal", "Tax", "8%", "Paid", "Card", "****1234", "Thank", "you!", "Page", "1/1", "Ref", "A-77",
    "Order", "#10293", "Ship", "To:", "Main", "St.", "Phone:", "555-0100",
)  # fmt: skip  (31 tokens: a prime)
_OCR_WORDS_PER_LINE = 6

LatencyDist = Literal["fixed", "uniform", "lognormal"]


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatorConfig:
    """Every knob of the simulator; the defaults give a fast, fault-free server (no latency, no limits).

    Rates are probabilities in [0, 1]; at most one random fault applies per request (one draw against
    the rates stacked in the order listed), so their sum should stay <= 1.
    """

    extra_models: tuple[str, ...] = ()
    accept_any_model: bool = False
    reasoning_tokens_null: bool = False
    # The provider's docs disagree on non-stream thinking: the error table has "parameter.enable_thinking
    # must be set to false for non-streaming calls", the API reference shows message.reasoning_content for
    # qwen3-vl-plus/flash. Default: refuse (the stricter case); True: qwen3-vl-plus/flash think non-stream.
    allow_non_stream_thinking: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    burst_tolerance: float = 2.0
    retry_after_s: float | None = None
    latency_s: float = 0.0
    latency_dist: LatencyDist = "fixed"
    latency_max_s: float = 60.0
    stream_chunk_delay_s: float = 0.0
    seed: int = 0
    fail_500_rate: float = 0.0
    fail_503_rate: float = 0.0
    fail_429_rate: float = 0.0
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 600.0
    truncate_rate: float = 0.0  # streams: cut after a few chunks; non-stream: a dropped connection
    partial_rate: float = 0.0  # non-stream only: streams have no partial-response header and are served normally
    moderation_rate: float = 0.0
    request_log: str | Path | None = None

    def __post_init__(self) -> None:
        """Validate now, so a bad flag fails at startup with a message rather than mid-benchmark."""
        object.__setattr__(self, "extra_models", tuple(self.extra_models))
        for name in ("fail_500_rate", "fail_503_rate", "fail_429_rate", "drop_rate", "hang_rate",
                     "truncate_rate", "partial_rate", "moderation_rate"):  # fmt: skip
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"simulator: {name} must be between 0 and 1, got {value}")
        if self.latency_dist not in ("fixed", "uniform", "lognormal"):
            raise ConfigError(f"simulator: latency_dist must be fixed, uniform or lognormal, got {self.latency_dist!r}")
        for name in ("latency_s", "latency_max_s", "stream_chunk_delay_s", "hang_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"simulator: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"simulator: {name} must be a positive number or unset, got {value}")
        if self.burst_tolerance <= 0:
            raise ConfigError(f"simulator: burst_tolerance must be > 0, got {self.burst_tolerance}")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ConfigError(f"simulator: retry_after_s must be >= 0, got {self.retry_after_s}")

    def random_fault_rates(self) -> tuple[tuple[str, float], ...]:
        """(fault kind, probability) in the order the single random draw is matched against."""
        return (
            ("500", self.fail_500_rate),
            ("503", self.fail_503_rate),
            ("429", self.fail_429_rate),
            ("drop", self.drop_rate),
            ("hang", self.hang_rate),
            ("truncate", self.truncate_rate),
            ("partial", self.partial_rate),
            ("moderation", self.moderation_rate),
        )


# --------------------------------------------------------------------------------------------------------
# Errors the handler turns into provider-shaped responses
# --------------------------------------------------------------------------------------------------------


class SimError(Exception):
    """A provider error response: ``{"error": {message, type, param, code}, "request_id"}`` with ``status``.

    ``retryable_429`` marks throttling 429s, which carry Retry-After when ``retry_after_s`` is set (the
    job-level "Free allocated quota exceeded." 429 does not: retrying it cannot help).
    """

    def __init__(
        self, status: int, code: str, message: str, *, type_: str | None = None, retryable_429: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_ or code
        self.retryable_429 = retryable_429


def _bad_request(message: str, code: str = "invalid_parameter_error") -> SimError:
    """A 400 as the compatible mode sends it: type ``invalid_request_error`` and a specific code."""
    return SimError(400, code, message, type_="invalid_request_error")


_MAGIC_KEYS: tuple[tuple[str, SimError], ...] = (
    ("sk-invalid", SimError(401, "invalid_api_key", "Incorrect API key provided.", type_="invalid_request_error")),
    ("sk-denied", SimError(403, "AccessDenied", "Access denied.")),
    ("sk-arrears", SimError(400, "Arrearage", "Access denied, please make sure your account is in good standing.")),
    ("sk-freequota", SimError(429, "insufficient_quota", "Free allocated quota exceeded.")),
)

_FAULT_ERRORS: dict[str, SimError] = {
    "500": SimError(500, "internal_error", "An internal error has occured, please try again later."),
    "503": SimError(503, "ModelUnavailable", "Model is unavailable, please try again later."),
    "429": SimError(429, "Throttling", "Requests throttling triggered.", retryable_429=True),
    "moderation": SimError(400, "data_inspection_failed", "Input data may contain inappropriate content."),
    "badparam": _bad_request(_INVALID_PARAM + "The request contains an invalid parameter (simulated fault)."),
    "timeout_media": _bad_request(
        "Download the media resource timed out during the data inspection process.",
        code="InvalidParameter.DataInspection",
    ),
    "toolong": _bad_request(f"Range of input length should be [1, {MAX_INPUT_TOKENS}]"),
    # Job-level failures arriving mid-run (the account goes into arrears, a key is revoked):
    "arrears": SimError(400, "Arrearage", "Access denied, please make sure your account is in good standing."),
    "auth": SimError(401, "invalid_api_key", "Incorrect API key provided."),
}


# --------------------------------------------------------------------------------------------------------
# Rate limiting: sliding windows, like the provider's RPM/TPM plus per-second checks [S7]
# --------------------------------------------------------------------------------------------------------


class SlidingWindow:
    """Requests and tokens admitted in the last ``span_s`` seconds, with optional caps on both.

    A request that finds the window empty is always admitted, so a per-second cap below one request
    (RPM < 30) or a single request bigger than the token cap still gets through, once per window.
    """

    def __init__(self, span_s: float, max_requests: float | None, max_tokens: float | None) -> None:
        self.span_s = span_s
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self._events: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _expire(self, now: float) -> None:
        """Drop events older than the window."""
        while self._events and self._events[0][0] <= now - self.span_s:
            _, n_tokens = self._events.popleft()
            self._tokens -= n_tokens

    def refusal(self, now: float, n_tokens: int) -> Literal["requests", "tokens"] | None:
        """Which cap admitting this request would break, or None."""
        self._expire(now)
        if not self._events:
            return None
        if self.max_requests is not None and len(self._events) + 1 > self.max_requests:
            return "requests"
        if self.max_tokens is not None and self._tokens + n_tokens > self.max_tokens:
            return "tokens"
        return None

    def add(self, now: float, n_tokens: int) -> None:
        """Record an admitted request."""
        self._events.append((now, n_tokens))
        self._tokens += n_tokens


class RateLimiter:
    """RPM/TPM over a sliding minute AND RPM/60, TPM/60 (times ``burst_tolerance``) over a sliding second.

    Tokens are input + output, as the provider counts them. Refused requests consume nothing.
    """

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, burst_tolerance: float) -> None:
        def per_second(limit: int | None) -> float | None:
            return None if limit is None else limit / 60.0 * burst_tolerance

        self._windows = (
            SlidingWindow(60.0, requests_per_minute, tokens_per_minute),
            SlidingWindow(1.0, per_second(requests_per_minute), per_second(tokens_per_minute)),
        )

    def admit(self, now: float, n_tokens: int) -> Literal["requests", "tokens"] | None:
        """Admit and record the request, or say which limit refuses it (then nothing is recorded)."""
        for window in self._windows:
            reason = window.refusal(now, n_tokens)
            if reason is not None:
                return reason
        for window in self._windows:
            window.add(now, n_tokens)
        return None


def _rate_limit_error(reason: Literal["requests", "tokens"]) -> SimError:
    """The provider's 429 for RPM/RPS (limit_requests) or TPM/TPS (insufficient_quota, not billing) [S6, S7]."""
    if reason == "requests":
        message = "Requests rate limit exceeded, please try again later."
        return SimError(429, "limit_requests", message, retryable_429=True)
    return SimError(
        429, "insufficient_quota", "Allocated quota exceeded, please increase your quota limit.", retryable_429=True
    )


# --------------------------------------------------------------------------------------------------------
# Parsed request
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """One ``image_url`` content part: its URL and the per-part pixel overrides (siblings of ``image_url``)."""

    url: str
    min_pixels: int | None
    max_pixels: int | None


@dataclass(frozen=True)
class MeasuredImage:
    """An image's size, a short identity ``key`` (hash of the data URL, or the URL) and its overrides."""

    width: int
    height: int
    key: str
    min_pixels: int | None
    max_pixels: int | None


@dataclass(frozen=True)
class ChatRequest:
    """What the simulator needs from a chat-completions body, validated."""

    model: str
    stream: bool
    include_usage: bool
    texts: tuple[str, ...]
    last_user_text: str
    images: tuple[ImageRef, ...]
    high_resolution: bool
    max_tokens: int | None
    thinking: bool
    thinking_budget: int | None

    @property
    def full_text(self) -> str:
        """All text parts joined with newlines: the request log's ``text`` and the marker-count key."""
        return "\n".join(self.texts)


@dataclass(frozen=True)
class Answer:
    """The simulated completion; 1 word = 1 completion token."""

    content: str
    reasoning: str | None
    finish_reason: str
    text_tokens: int
    reasoning_tokens: int

    @property
    def completion_tokens(self) -> int:
        """Output tokens billed: answer plus reasoning, as the provider counts them [S3]."""
        return self.text_tokens + self.reasoning_tokens


@dataclass(frozen=True)
class Usage:
    """Prompt-side token counts of one request."""

    text_tokens: int
    image_tokens: int

    @property
    def prompt_tokens(self) -> int:
        """Text plus image tokens."""
        return self.text_tokens + self.image_tokens


@dataclass
class Trace:
    """What the request log records about one request; filled in as the handler learns it."""

    request_id: str
    t: float
    started: float
    model: str | None = None
    stream: bool = False
    text: str = ""
    n_images: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int = 0

    def entry(self, outcome: str, status: int | None, code: str | None) -> dict[str, Any]:
        """The JSON-able log entry."""
        return {
            "t": self.t,
            "model": self.model,
            "stream": self.stream,
            "outcome": outcome,
            "status": status,
            "code": code,
            "text": self.text,
            "n_images": self.n_images,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "request_id": self.request_id,
            "duration_s": round(time.monotonic() - self.started, 6),
        }


# --------------------------------------------------------------------------------------------------------
# Server state
# --------------------------------------------------------------------------------------------------------


@dataclass
class SimulatorState:
    """Everything mutable the server keeps; only the event-loop thread mutates it (the log under a lock)."""

    config: SimulatorConfig
    models: frozenset[str]
    fault_rng: random.Random
    latency_rng: random.Random
    lock: threading.Lock = field(default_factory=threading.Lock)
    log: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    marker_counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    limiters: dict[str, RateLimiter] = field(default_factory=dict)
    image_cache: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    http: aiohttp.ClientSession | None = None
    log_file: IO[str] | None = None

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> SimulatorState:
        """Fresh state; separate RNGs so enabling latency does not change which requests fail."""
        return cls(
            config=config,
            models=KNOWN_MODELS | frozenset(config.extra_models),
            fault_rng=random.Random(config.seed),
            latency_rng=random.Random(config.seed + 1),
        )

    def record(self, trace: Trace, outcome: str, status: int | None, code: str | None = None) -> None:
        """Append to the in-memory log and, if configured, to the JSONL file, flushed for other processes."""
        entry = trace.entry(outcome, status, code)
        with self.lock:
            self.log.append(entry)
            self.outcomes[outcome] += 1
        if self.log_file is not None:
            self.log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.log_file.flush()

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy of the log, safe to read from another thread."""
        with self.lock:
            return list(self.log)

    def stats(self) -> dict[str, int]:
        """Counts by outcome."""
        with self.lock:
            return dict(self.outcomes)

    def reset(self) -> None:
        """Forget the log, stats, marker counts, rate windows and RNG positions (the log file is kept)."""
        with self.lock:
            self.log.clear()
            self.outcomes.clear()
        self.marker_counts.clear()
        self.limiters.clear()
        self.fault_rng.seed(self.config.seed)
        self.latency_rng.seed(self.config.seed + 1)

    def limiter(self, model: str) -> RateLimiter | None:
        """The model's limiter (limits are per model, as the provider's are), or None without limits."""
        cfg = self.config
        if cfg.requests_per_minute is None and cfg.tokens_per_minute is None:
            return None
        if model not in self.limiters:
            self.limiters[model] = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute, cfg.burst_tolerance)
        return self.limiters[model]


STATE_KEY: web.AppKey[SimulatorState] = web.AppKey("qwenvl_simulator_state", SimulatorState)
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("qwenvl_simulator_request_id", str)


# --------------------------------------------------------------------------------------------------------
# Request parsing and validation
# --------------------------------------------------------------------------------------------------------


def check_auth(authorization: str | None) -> None:
    """401 without a bearer key; the magic keys produce the job-level errors tests need."""
    if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
        raise _MAGIC_KEYS[0][1]
    key = authorization[7:].strip()
    for prefix, error in _MAGIC_KEYS:
        if key.startswith(prefix):
            raise error


async def read_json(request: web.Request) -> dict[str, Any]:
    """The JSON body as a dict, or a 400 (413 when over the body limit)."""
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge as exc:
        raise SimError(413, "RequestTooLarge", f"Request body exceeds {MAX_BODY_BYTES} bytes.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad_request("The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object.")
    return body


def _strip_region(model: str) -> str:
    """``qwen3-vl-flash-us`` -> ``qwen3-vl-flash``: region deployments serve the same models."""
    for suffix in tokens.REGION_SUFFIXES:
        if model.endswith(suffix):
            return model[: -len(suffix)]
    return model


def check_model(model: object, state: SimulatorState) -> str:
    """The requested model name, or 400 (missing) / 404 model_not_found (unknown)."""
    if not isinstance(model, str) or not model:
        raise _bad_request("Model not specified.", code="invalid_parameter_error")
    if state.config.accept_any_model or model in state.models or _strip_region(model) in state.models:
        return model
    raise SimError(
        404, "model_not_found", f"The model `{model}` does not exist or you do not have access to it.",
        type_="invalid_request_error",
    )  # fmt: skip


def is_stream_only(model: str) -> bool:
    """QVQ and the *thinking* open-source models answer only in stream mode [S10, S6]."""
    name = tokens.normalize_model(model)
    return name.startswith("qvq") or "thinking" in name


def is_hybrid_thinker(model: str) -> bool:
    """qwen3-vl-plus/flash (and snapshots) think only when ``enable_thinking`` is true [S3]."""
    return tokens.normalize_model(model).startswith(("qwen3-vl-plus", "qwen3-vl-flash"))


def _optional_positive_int(value: object, message: str) -> int | None:
    """None, or a positive int (not a bool); anything else is a 400 with ``message``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad_request(message)
    return value


def _image_part(part: dict[str, Any]) -> ImageRef:
    """An ``image_url`` part; ``min_pixels``/``max_pixels`` are siblings of ``image_url`` [S5]."""
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise _bad_request("The image_url part has no url.")
    return ImageRef(
        url=url,
        min_pixels=_optional_positive_int(part.get("min_pixels"), "min_pixels must be a positive integer."),
        max_pixels=_optional_positive_int(part.get("max_pixels"), "max_pixels must be a positive integer."),
    )


def _message_parts(message: object) -> tuple[list[str], list[ImageRef]]:
    """Texts and images of one message; a string content is one text."""
    if not isinstance(message, dict):
        raise _bad_request("Each message must be an object.")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return ([content] if content else []), []
    if not isinstance(content, list):
        raise _bad_request("Message content must be a string or a list of content parts.")
    texts: list[str] = []
    images: list[ImageRef] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image_part(part))
        else:
            raise _bad_request(f"Content part type {kind!r} is not supported by the qwenvl-batch simulator.")
    return texts, images


def collect_parts(messages: object) -> tuple[tuple[str, ...], str, tuple[ImageRef, ...]]:
    """All text parts, the last user message's text, and all image parts, in order."""
    if not isinstance(messages, list) or not messages:
        raise _bad_request("The messages parameter must be a non-empty list.")
    texts: list[str] = []
    images: list[ImageRef] = []
    last_user_text = ""
    for message in messages:
        message_texts, message_images = _message_parts(message)
        texts.extend(message_texts)
        images.extend(message_images)
        if message.get("role") == "user" and message_texts:
            last_user_text = "\n".join(message_texts)
    return tuple(texts), last_user_text, tuple(images)


def _wants_thinking(body: dict[str, Any], model: str, stream: bool, config: SimulatorConfig) -> bool:
    """Whether the model thinks; refuses the combinations the provider refuses [S6]."""
    if is_stream_only(model):
        if not stream:
            raise _bad_request(
                "This model only support stream mode, please enable the stream parameter to access the model."
            )
        return True
    enable = body.get("enable_thinking") is True
    if enable and not stream and not (config.allow_non_stream_thinking and is_hybrid_thinker(model)):
        raise _bad_request("parameter.enable_thinking must be set to false for non-streaming calls")
    return enable and is_hybrid_thinker(model)


def parse_chat_request(body: dict[str, Any], state: SimulatorState) -> ChatRequest:
    """Validate the body in the provider's order: model, stream mode, thinking, parameters."""
    model = check_model(body.get("model"), state)
    texts, last_user_text, images = collect_parts(body.get("messages"))
    stream = body.get("stream") is True
    stream_options = body.get("stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        model=model,
        stream=stream,
        include_usage=stream and isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        texts=texts,
        last_user_text=last_user_text,
        images=images,
        high_resolution=body.get("vl_high_resolution_images") is True,
        max_tokens=_optional_positive_int(max_tokens, "Range of max_tokens should be [1, 32768]"),
        thinking=_wants_thinking(body, model, stream, state.config),
        thinking_budget=_optional_positive_int(
            body.get("thinking_budget"),
            f"The thinking_budget parameter must be a positive integer and not greater than {MAX_THINKING_BUDGET}",
        ),
    )


def parse_markers(text: str) -> list[tuple[str, int | None]]:
    """``[[sim:KIND]]`` / ``[[sim:KIND:N]]`` markers in order; an unknown KIND is a 400 (a typo in a test)."""
    markers: list[tuple[str, int | None]] = []
    for match in _MARKER.finditer(text):
        kind, count = match.group(1), match.group(2)
        if kind not in FAULT_KINDS:
            raise _bad_request(f"Unknown simulator marker [[sim:{kind}]]; known kinds: {', '.join(FAULT_KINDS)}.")
        markers.append((kind, int(count) if count is not None else None))
    return markers


# --------------------------------------------------------------------------------------------------------
# Images: measure (header only), cache by content hash
# --------------------------------------------------------------------------------------------------------


def image_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from the image header, or the provider's decode error."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise _bad_request("Failed to decode the image during the data inspection.") from exc


def _cache_put(state: SimulatorState, key: str, size: tuple[int, int]) -> None:
    """Remember a measurement; the oldest entry goes when the cache is full (bounded memory in long benchmarks)."""
    state.image_cache[key] = size
    if len(state.image_cache) > IMAGE_CACHE_ENTRIES:
        state.image_cache.popitem(last=False)


def measure_data_url(url: str, state: SimulatorState) -> tuple[tuple[int, int], str]:
    """Size and key of a ``data:`` URL; decoded once per distinct URL (cached by its hash)."""
    if len(url) > MAX_DATA_URI_CHARS:
        raise _bad_request(f"Exceeded limit on max bytes per data-uri item : {MAX_DATA_URI_CHARS}")
    key = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    cached = state.image_cache.get(key)
    if cached is not None:
        return cached, key
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise _bad_request("The provided URL does not appear to be valid. Ensure it is correctly formatted.")
    try:
        raw = base64.b64decode(payload)
    except (binascii.Error, ValueError) as exc:
        raise _bad_request("Failed to decode the image during the data inspection.") from exc
    size = image_size(raw)
    _cache_put(state, key, size)
    return size, key


async def fetch_local_image(url: str, state: SimulatorState) -> tuple[int, int]:
    """Download an image from a loopback URL (the only network we have) and measure it."""
    assert state.http is not None, "the HTTP client is created at startup"
    try:
        async with state.http.get(url) as response:
            if response.status != 200:
                raise _bad_request("Failed to download multimodal content.", code="InvalidParameter.DataInspection")
            raw = await response.content.read(MAX_DOWNLOAD_BYTES + 1)
    except asyncio.TimeoutError as exc:
        raise _FAULT_ERRORS["timeout_media"] from exc
    except aiohttp.ClientError as exc:
        raise _bad_request("Failed to download multimodal content.", code="InvalidParameter.DataInspection") from exc
    if len(raw) > MAX_DOWNLOAD_BYTES:
        raise _bad_request("Multimodal file size is too large")
    return image_size(raw)


async def measure_image(ref: ImageRef, state: SimulatorState) -> MeasuredImage:
    """Measure one image part: data URL, loopback http(s) URL, or an assumed 1024x1024 for other hosts."""
    if ref.url.startswith("data:"):
        (width, height), key = measure_data_url(ref.url, state)
    elif ref.url.startswith(("http://", "https://")):
        host = yarl.URL(ref.url).host or ""
        # Loopback is the only network here; other hosts cannot be fetched, so their size is assumed.
        if host in LOOPBACK_NAMES:
            width, height = await fetch_local_image(ref.url, state)
        else:
            width, height = ASSUMED_REMOTE_SIZE
        key = ref.url
    else:
        raise _bad_request("The provided URL does not appear to be valid. Ensure it is correctly formatted.")
    return MeasuredImage(width, height, key, ref.min_pixels, ref.max_pixels)


def _image_size_error(image: MeasuredImage) -> SimError:
    """The provider's message shape for refused sizes [S6]; the aspect-ratio wording is our guess."""
    if min(image.width, image.height) < tokens.MIN_SIDE_PX:
        detail = f"[height:{image.height} or width:{image.width} must be larger than 10]"
    else:
        detail = f"[aspect ratio of height:{image.height} and width:{image.width} must not exceed 200]"
    return _bad_request(_INVALID_PARAM + "The image length and width do not meet the model restrictions. " + detail)


def count_prompt(request: ChatRequest, images: list[MeasuredImage]) -> Usage:
    """Prompt tokens with ``tokens`` (each image with its own per-part overrides)."""
    image_total = 0
    for image in images:
        try:
            image_total += tokens.image_tokens(
                image.width, image.height, request.model, high_resolution=request.high_resolution,
                min_pixels=image.min_pixels, max_pixels=image.max_pixels,
            )  # fmt: skip
        except tokens.ImageSizeError as exc:
            raise _image_size_error(image) from exc
    text_total = sum(tokens.text_tokens(text) for text in request.texts)
    return Usage(text_tokens=text_total, image_tokens=image_total)


# --------------------------------------------------------------------------------------------------------
# The deterministic answer
# --------------------------------------------------------------------------------------------------------


def request_digest(request: ChatRequest, images: list[MeasuredImage]) -> int:
    """A hash of the texts and image identities: the answer's only source of variation."""
    hasher = hashlib.blake2b(digest_size=16)
    for text in request.texts:
        hasher.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    for image in images:
        hasher.update(b"\x01" + image.key.encode("utf-8", "surrogatepass"))
    return int.from_bytes(hasher.digest(), "big")


def image_tag(images: list[MeasuredImage]) -> str:
    """The 8-hex-digit bracket identifying the images (the same images give the same tag)."""
    hasher = hashlib.blake2b(digest_size=4)
    for image in images:
        hasher.update(image.key.encode("utf-8", "surrogatepass") + b"\x00")
    return hasher.hexdigest()


def filler_words(vocabulary: tuple[str, ...], seed: int, count: int) -> list[str]:
    """``count`` words walked through ``vocabulary`` (prime length) from a seed-dependent start and step."""
    size = len(vocabulary)
    start, step = seed % size, 1 + (seed // size) % (size - 1)
    return [vocabulary[(start + i * step) % size] for i in range(count)]


def count_words(text: str) -> int:
    """Completion tokens of a text: 1 word = 1 token."""
    return len(_WORD.findall(text))


def cut_words(text: str, count: int) -> str:
    """The prefix of ``text`` holding its first ``count`` words, whitespace kept verbatim."""
    if count <= 0:
        return ""
    for index, match in enumerate(_WORD.finditer(text), start=1):
        if index == count:
            return text[: match.end()]
    return text


def answer_text(request: ChatRequest, images: list[MeasuredImage], digest: int) -> str:
    """Caption (or OCR-looking text) quoting the first 80 characters of the last user text; 20-60 words."""
    is_ocr = tokens.normalize_model(request.model).startswith("qwen-vl-ocr")
    label = "OCR text" if is_ocr else "caption"
    header = f"Simulated {label} of {len(images)} image(s) [{image_tag(images)}] for: {request.last_user_text[:80]}"
    target_words = 20 + digest % 41
    n_filler = max(target_words - count_words(header), 3)
    if not is_ocr:
        return header + " " + " ".join(filler_words(_CAPTION_WORDS, digest >> 32, n_filler)) + "."
    words = filler_words(_OCR_WORDS, digest >> 32, n_filler)
    lines = [" ".join(words[i : i + _OCR_WORDS_PER_LINE]) for i in range(0, len(words), _OCR_WORDS_PER_LINE)]
    return header + "\n" + "\n".join(lines)


def reasoning_text(request: ChatRequest, digest: int) -> str:
    """30-120 words of simulated thinking, cut at ``thinking_budget`` (``max_tokens`` does not cap it [S5])."""
    words = ["Simulated", "reasoning:"] + filler_words(_CAPTION_WORDS, digest >> 64, 28 + (digest >> 16) % 91)
    budget = request.thinking_budget
    return " ".join(words if budget is None else words[:budget])


def build_answer(request: ChatRequest, images: list[MeasuredImage]) -> Answer:
    """The full deterministic answer, cut at ``max_tokens`` with ``finish_reason`` "length"."""
    digest = request_digest(request, images)
    content = answer_text(request, images, digest)
    text_tokens = count_words(content)
    finish_reason = "stop"
    if request.max_tokens is not None and request.max_tokens < text_tokens:
        content, text_tokens, finish_reason = cut_words(content, request.max_tokens), request.max_tokens, "length"
    reasoning = reasoning_text(request, digest) if request.thinking else None
    reasoning_tokens = count_words(reasoning) if reasoning else 0
    return Answer(content, reasoning, finish_reason, text_tokens, reasoning_tokens)


def partial_answer(answer: Answer) -> Answer:
    """Half of the answer, as a timed-out non-stream call returns what was generated [S3]."""
    kept = max(1, answer.text_tokens // 2)
    return Answer(cut_words(answer.content, kept), answer.reasoning, "length", kept, answer.reasoning_tokens)


# --------------------------------------------------------------------------------------------------------
# Response bodies
# --------------------------------------------------------------------------------------------------------


def _dumps(payload: object) -> str:
    """Compact JSON with UTF-8 text kept readable (the provider does not escape non-ASCII either)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def usage_payload(usage: Usage, answer: Answer, config: SimulatorConfig) -> dict[str, Any]:
    """The ``usage`` object with the provider's detail fields [S5]."""
    completion = answer.completion_tokens
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": usage.prompt_tokens + completion,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "image_tokens": usage.image_tokens,
            "text_tokens": usage.text_tokens,
        },
        "completion_tokens_details": {
            "reasoning_tokens": None if config.reasoning_tokens_null else answer.reasoning_tokens,
            "text_tokens": answer.text_tokens,
        },
    }


def completion_payload(
    request: ChatRequest, answer: Answer, usage: Usage, request_id: str, config: SimulatorConfig
) -> dict[str, Any]:
    """A non-stream ``chat.completion``."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": usage_payload(usage, answer, config),
        "system_fingerprint": None,
    }


def word_pieces(text: str, words_per_piece: int) -> list[str]:
    """Consecutive slices of ``text`` of a few words each; they concatenate back to ``text`` exactly."""
    ends = [match.end() for match in _WORD.finditer(text)][words_per_piece - 1 :: words_per_piece]
    if not ends or ends[-1] != len(text):
        ends.append(len(text))
    starts = [0, *ends[:-1]]
    return [text[start:end] for start, end in zip(starts, ends) if end > start]


def stream_events(
    request: ChatRequest, answer: Answer, usage: Usage, request_id: str, config: SimulatorConfig
) -> list[bytes]:
    """The SSE events, in the provider's order: role, reasoning deltas, content deltas, finish, usage, [DONE]."""
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage_obj: dict[str, Any] | None = None) -> bytes:
        payload = {
            "id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created,
            "model": request.model, "choices": choices, "usage": usage_obj, "system_fingerprint": None,
        }  # fmt: skip
        return f"data: {_dumps(payload)}\n\n".encode()

    def delta(fields: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return chunk([{"index": 0, "delta": fields, "finish_reason": finish_reason, "logprobs": None}])

    events = [delta({"content": "", "role": "assistant"})]
    for piece in word_pieces(answer.reasoning or "", STREAM_WORDS_PER_CHUNK):
        events.append(delta({"content": None, "reasoning_content": piece}))
    for piece in word_pieces(answer.content, STREAM_WORDS_PER_CHUNK):
        events.append(delta({"content": piece}))
    events.append(delta({"content": ""}, answer.finish_reason))
    if request.include_usage:
        events.append(chunk([], usage_payload(usage, answer, config)))
    events.append(b"data: [DONE]\n\n")
    return events


def error_payload(error: SimError, request_id: str) -> dict[str, Any]:
    """The provider's error body [seed document, S6]."""
    return {
        "error": {"message": error.message, "type": error.type, "param": None, "code": error.code},
        "request_id": request_id,
    }


def _json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response (common headers are added by the response-prepare hook)."""
    return web.Response(text=_dumps(payload), status=status, content_type="application/json", headers=headers)


def error_response(error: SimError, request_id: str, config: SimulatorConfig) -> web.Response:
    """The error as an HTTP response; throttling 429s carry Retry-After when configured."""
    headers: dict[str, str] = {}
    if error.retryable_429 and config.retry_after_s is not None:
        headers["Retry-After"] = str(max(0, math.ceil(config.retry_after_s)))
        headers["retry-after-ms"] = str(round(config.retry_after_s * 1000))
    return _json_response(error_payload(error, request_id), status=error.status, headers=headers)


# --------------------------------------------------------------------------------------------------------
# Faults, latency, connection tricks
# --------------------------------------------------------------------------------------------------------


def marker_fault(request: ChatRequest, state: SimulatorState) -> str | None:
    """The first marker still due for this exact request text; applying it counts one use.

    Markers are tried in order, so ``[[sim:500:1]] [[sim:429:1]]`` gives a 500, then a 429, then answers.
    """
    text = request.full_text
    for kind, limit in parse_markers(text):
        key = (kind, text)
        if limit is None or state.marker_counts[key] < limit:
            state.marker_counts[key] += 1
            return kind
    return None


def random_fault(state: SimulatorState) -> str | None:
    """One seeded draw against the stacked fault rates."""
    rates = state.config.random_fault_rates()
    if not any(rate for _, rate in rates):
        return None
    draw, upper = state.fault_rng.random(), 0.0
    for kind, rate in rates:
        upper += rate
        if draw < upper:
            return kind
    return None


def draw_latency(state: SimulatorState) -> float:
    """Seconds to wait before answering: fixed, uniform in [0, 2x], or lognormal with median = base."""
    cfg = state.config
    if cfg.latency_s <= 0:
        return 0.0
    if cfg.latency_dist == "uniform":
        delay = state.latency_rng.uniform(0.0, 2.0 * cfg.latency_s)
    elif cfg.latency_dist == "lognormal":
        delay = cfg.latency_s * math.exp(state.latency_rng.gauss(0.0, LOGNORMAL_SIGMA))
    else:
        delay = cfg.latency_s
    return min(delay, cfg.latency_max_s)


def close_connection(request: web.Request) -> web.Response:
    """Close the TCP connection with no (more) response bytes; the returned response is never sent."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


async def wait_unless_stopping(state: SimulatorState, seconds: float) -> None:
    """Sleep ``seconds``, waking early when the server shuts down (so hung requests do not block stop)."""
    try:
        await asyncio.wait_for(state.stopping.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass  # the normal way out: the time is up


# --------------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------------


async def send_stream(
    request: web.Request, events: list[bytes], config: SimulatorConfig, *, cut: bool
) -> web.StreamResponse:
    """Write the SSE events (all but a few when ``cut``, then close without [DONE])."""
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    if cut:
        await response.write(b"".join(events[:TRUNCATE_AFTER_CHUNKS]))
        close_connection(request)
        return response
    if config.stream_chunk_delay_s <= 0:
        await response.write(b"".join(events))
    else:
        for index, event in enumerate(events):
            if index:
                await asyncio.sleep(config.stream_chunk_delay_s)
            await response.write(event)
    await response.write_eof()
    return response


def _stream_tokens_sent(events: list[bytes]) -> int:
    """Words of content/reasoning in the events actually sent before a cut."""
    sent = 0
    for event in events[:TRUNCATE_AFTER_CHUNKS]:
        for choice in json.loads(event[len(b"data: ") :]).get("choices", []):
            delta = choice.get("delta", {})
            sent += count_words(delta.get("content") or "") + count_words(delta.get("reasoning_content") or "")
    return sent


async def apply_fault(
    kind: str,
    request: web.Request,
    chat: ChatRequest,
    answer: Answer,
    usage: Usage,
    trace: Trace,
    state: SimulatorState,
) -> web.StreamResponse | None:
    """Serve fault ``kind``; None when it does not apply here (``partial`` on a stream: served normally)."""
    if kind in _FAULT_ERRORS:
        raise _FAULT_ERRORS[kind]
    if kind == "garbage":
        state.record(trace, "garbage", 200)
        return _json_response({"foo": 1})
    if kind == "drop" or (kind == "truncate" and not chat.stream):
        state.record(trace, "dropped", None)
        return close_connection(request)
    if kind == "hang":
        state.record(trace, "hung", None)
        await wait_unless_stopping(state, state.config.hang_s)
        return close_connection(request)
    if kind == "truncate":
        events = stream_events(chat, answer, usage, trace.request_id, state.config)
        trace.completion_tokens = _stream_tokens_sent(events)
        state.record(trace, "truncated", 200)
        return await send_stream(request, events, state.config, cut=True)
    if kind == "partial" and not chat.stream:
        cut = partial_answer(answer)
        trace.completion_tokens = cut.completion_tokens
        state.record(trace, "partial", 200)
        payload = completion_payload(chat, cut, usage, trace.request_id, state.config)
        return _json_response(payload, headers={"x-dashscope-partialresponse": "true"})
    return None


async def serve_answer(
    request: web.Request, chat: ChatRequest, answer: Answer, usage: Usage, trace: Trace, state: SimulatorState
) -> web.StreamResponse:
    """The normal, successful response."""
    trace.completion_tokens = answer.completion_tokens
    state.record(trace, "ok", 200)
    if chat.stream:
        events = stream_events(chat, answer, usage, trace.request_id, state.config)
        return await send_stream(request, events, state.config, cut=False)
    return _json_response(completion_payload(chat, answer, usage, trace.request_id, state.config))


async def admit(chat: ChatRequest, answer: Answer, usage: Usage, state: SimulatorState) -> None:
    """Rate-limit, then wait the simulated latency."""
    limiter = state.limiter(chat.model)
    if limiter is not None:
        reason = limiter.admit(time.monotonic(), usage.prompt_tokens + answer.completion_tokens)
        if reason is not None:
            raise _rate_limit_error(reason)
    delay = draw_latency(state)
    if delay > 0:
        await asyncio.sleep(delay)


async def prepare(
    request: web.Request, state: SimulatorState, trace: Trace
) -> tuple[ChatRequest, list[MeasuredImage], Usage]:
    """Auth, body, model, parameters, images, prompt tokens: everything before admission."""
    check_auth(request.headers.get("Authorization"))
    body = await read_json(request)
    trace.model = body.get("model") if isinstance(body.get("model"), str) else None
    trace.stream = body.get("stream") is True
    chat = parse_chat_request(body, state)
    trace.text, trace.n_images = chat.full_text, len(chat.images)
    parse_markers(chat.full_text)  # refuse unknown marker kinds before any work
    images = [await measure_image(ref, state) for ref in chat.images]
    usage = count_prompt(chat, images)
    trace.prompt_tokens = usage.prompt_tokens
    if usage.prompt_tokens > MAX_INPUT_TOKENS:
        raise _FAULT_ERRORS["toolong"]
    return chat, images, usage


async def handle_chat(request: web.Request) -> web.StreamResponse:
    """POST .../chat/completions: validate, admit, then fault or answer."""
    state = request.app[STATE_KEY]
    trace = Trace(request_id=str(uuid.uuid4()), t=time.time(), started=time.monotonic())
    request[REQUEST_ID_KEY] = trace.request_id
    try:
        chat, images, usage = await prepare(request, state, trace)
        answer = build_answer(chat, images)
        await admit(chat, answer, usage, state)
        kind = marker_fault(chat, state) or random_fault(state)
        response = await apply_fault(kind, request, chat, answer, usage, trace, state) if kind else None
        return response or await serve_answer(request, chat, answer, usage, trace, state)
    except SimError as error:
        state.record(trace, f"http_{error.status}", error.status, error.code)
        return error_response(error, trace.request_id, state.config)


async def handle_models(request: web.Request) -> web.Response:
    """GET .../models: the known models, OpenAI list shape."""
    state = request.app[STATE_KEY]
    try:
        check_auth(request.headers.get("Authorization"))
    except SimError as error:
        return error_response(error, request.get(REQUEST_ID_KEY, ""), state.config)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "system"} for name in sorted(state.models)]
    return _json_response({"object": "list", "data": data})


async def handle_log(request: web.Request) -> web.Response:
    """GET /_sim/log: the request log."""
    return _json_response(request.app[STATE_KEY].snapshot())


async def handle_stats(request: web.Request) -> web.Response:
    """GET /_sim/stats: counts by outcome."""
    return _json_response(request.app[STATE_KEY].stats())


async def handle_reset(request: web.Request) -> web.Response:
    """POST /_sim/reset: forget log, stats, marker counts and rate windows."""
    request.app[STATE_KEY].reset()
    return _json_response({"reset": True})


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response says it comes from the simulator and carries a request id."""
    response.headers["x-simulator"] = "qwenvl-batch"
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = request.get(REQUEST_ID_KEY) or str(uuid.uuid4())


async def _on_startup(app: web.Application) -> None:
    """Open the loopback image client and the request-log file inside the serving loop."""
    state = app[STATE_KEY]
    state.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
    if state.config.request_log is not None:
        state.log_file = open(state.config.request_log, "a", encoding="utf-8")  # noqa: SIM115 - closed at cleanup


async def _on_cleanup(app: web.Application) -> None:
    """Close what startup opened."""
    state = app[STATE_KEY]
    if state.http is not None:
        await state.http.close()
    if state.log_file is not None:
        state.log_file.close()
        state.log_file = None


def create_app(config: SimulatorConfig) -> web.Application:
    """The aiohttp application; state lives in ``app[STATE_KEY]``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = SimulatorState.from_config(config)
    for prefix in ROUTE_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", handle_chat)
        app.router.add_get(f"{prefix}/models", handle_models)
    app.router.add_get("/_sim/log", handle_log)
    app.router.add_get("/_sim/stats", handle_stats)
    app.router.add_post("/_sim/reset", handle_reset)
    app.on_response_prepare.append(_common_headers)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


# --------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------


async def _start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; the backlog is large because benchmarks open hundreds of connections at once."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def _stop_site(app: web.Application, runner: web.AppRunner) -> None:
    """Release hung requests first, so the runner's graceful shutdown does not wait for them."""
    app[STATE_KEY].stopping.set()
    await runner.cleanup()


def _url(host: str, port: int) -> str:
    """The base URL clients use (``/compatible-mode/v1``, like the provider's)."""
    host_part = f"[{host}]" if ":" in host else host
    return f"http://{host_part}:{port}{ROUTE_PREFIXES[0]}"


class SimulatorThread:
    """The simulator on 127.0.0.1 in a background thread with its own event loop (for tests and the demo)."""

    def __init__(self, config: SimulatorConfig | None = None, *, port: int = 0) -> None:
        self.config = config or SimulatorConfig()
        self.app = create_app(self.config)
        self.base_url = ""
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    def start(self) -> SimulatorThread:
        """Start serving; returns once the port is bound (raises what startup raised)."""
        self._thread = threading.Thread(target=self._run, name="qwenvl-batch-simulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def _run(self) -> None:
        """Thread body: bind, signal readiness, serve until stop(), then shut down on the same loop."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._runner, self.port = loop.run_until_complete(_start_site(self.app, "127.0.0.1", self.port))
        except BaseException as exc:  # handed to start() in the caller's thread, which re-raises it
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self.base_url = _url("127.0.0.1", self.port)
        logger.info("qwenvl-batch simulator (not the real service) listening on %s", self.base_url)
        self._loop = loop
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(_stop_site(self.app, self._runner))
        loop.close()

    def stop(self) -> None:
        """Stop serving (hung requests are released) and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = None

    def __enter__(self) -> SimulatorThread:
        """Start; ``with SimulatorThread(...) as sim:``."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop."""
        self.stop()

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the ``/_sim/*`` routes live here)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> SimulatorState:
        """The server state (read its log with ``requests``)."""
        return self.app[STATE_KEY]

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of the request log, safe to read while the server runs."""
        return self.state.snapshot()

    @property
    def stats(self) -> dict[str, int]:
        """Counts by outcome."""
        return self.state.stats()

    def reset(self) -> None:
        """Forget log, stats, marker counts and rate windows (runs on the server's loop)."""
        if self._loop is None:
            self.state.reset()
            return
        asyncio.run_coroutine_threadsafe(_reset(self.state), self._loop).result()


async def _reset(state: SimulatorState) -> None:
    """Reset on the server's loop, so it cannot interleave with a request in flight."""
    state.reset()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses: the simulator must not be reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve in the foreground until SIGINT/SIGTERM, printing the one line that says where (and what) it is."""
    if not is_loopback(host):
        raise ConfigError(f"the simulator only listens on loopback addresses (127.0.0.1, ::1, localhost), not {host!r}")
    asyncio.run(_serve(config, host, port))


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    """serve()'s body: print where we listen, wait for SIGINT/SIGTERM, shut down cleanly."""
    app = create_app(config)
    runner, bound_port = await _start_site(app, host, port)
    url = _url(host, bound_port)
    print(f"qwenvl-batch SIMULATOR (not the real Model Studio service) listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await _stop_site(app, runner)


def iter_log_file(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read a ``request_log`` JSONL file (for tests and benchmarks in another process)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)

