"""What the simulator knows and can be told: the models it serves, the provider's limits it copies, its
settings (latency, faults, rate limits), and the provider-shaped error it raises inside handlers."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError

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
    "badparam", "timeout_media", "toolong", "garbage", "arrears", "auth", "validation", "stream_error",
    "badjson", "fenced", "badschema",  # JSON answers only (simulator/structured.py)
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
    # How the limits are enforced (simulator/ratelimit.py): "window" (sliding minute + sliding second x
    # burst_tolerance) or "bucket" (per-second token bucket with burst_s seconds of credit, like the emulator of
    # issue 9); limit_changes: (seconds after the first limited request, factor) to change the limits mid-run.
    rate_limit_mode: Literal["window", "bucket"] = "window"
    burst_s: float = 1.0
    limit_changes: tuple[tuple[float, float], ...] = ()
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
    persona: str = "dashscope"  # answer like another server: see simulator/personas.py
    # Batch API (simulator/batch.py): seconds in "validating", lines answered per second (None: all at once),
    # expire after this many lines (the rest are never run), fail validation on purpose, per-line 500 errors
    batch_delay_s: float = 0.0
    batch_lines_per_s: float | None = None
    batch_expire_after_lines: int | None = None
    batch_fail_validation: bool = False
    batch_line_error_rate: float = 0.0
    batch_expired_lines: bool = False  # OpenAI's shape: lines an expired batch never ran, as batch_expired errors

    def __post_init__(self) -> None:
        """Validate now, so a bad flag fails at startup with a message rather than mid-benchmark."""
        object.__setattr__(self, "extra_models", tuple(self.extra_models))
        from .personas import get_persona  # personas builds on SimError below

        get_persona(self.persona)
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
        object.__setattr__(self, "limit_changes", tuple((float(a), float(f)) for a, f in self.limit_changes))
        if self.rate_limit_mode not in ("window", "bucket"):
            raise ConfigError(f"simulator: rate_limit_mode must be window or bucket, got {self.rate_limit_mode!r}")
        if self.burst_s <= 0 or any(f <= 0 for _, f in self.limit_changes):
            raise ConfigError("simulator: burst_s and every limit_changes factor must be > 0")
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
