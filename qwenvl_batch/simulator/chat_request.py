"""A Chat Completions request as the simulator sees it: parsed, validated with the provider's own error
messages, and the small records (answer, usage, trace) that travel with it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import tokens
from .config import (
    _MAGIC_KEYS,
    _MARKER,
    FAULT_KINDS,
    MAX_BODY_BYTES,
    MAX_THINKING_BUDGET,
    SimError,
    SimulatorConfig,
    _bad_request,
)

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
    json_request: Any = None  # structured.JsonRequest: the request wants JSON (response_format or a schema)

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
    image_types: tuple[str, ...] = ()  # the MIME type of each data-URL image ("url" for a URL), in order
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    response_format: str | None = None  # the response_format type asked for (json_object, json_schema)

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
            "image_types": list(self.image_types),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "request_id": self.request_id,
            "response_format": self.response_format,
            "duration_s": round(time.monotonic() - self.started, 6),
        }

if TYPE_CHECKING:
    from .state import SimulatorState


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
    accepts_any = state.config.accept_any_model or state.persona.accept_any_model
    if accepts_any or model in state.models or _strip_region(model) in state.models:
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
