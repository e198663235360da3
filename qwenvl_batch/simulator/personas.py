"""Server personalities: the simulator answering like servers this project did not write.

"Any OpenAI-compatible server" differs exactly where a batch runner gets hurt: the error envelope and code
(nested or flat, code as a provider string, an int or a string "400"), whether a stream carries usage, whether
images are seen at all, and what a proxy does to headers and messages. Each persona copies one server's measured
or documented behaviour (next-phase-facts.md §7.2-7.3), so the default test suite covers those paths without
compiling llama.cpp or starting a proxy:

* ``dashscope`` (default): Model Studio's compatible mode, as the rest of the simulator.
* ``vllm``: vLLM < 0.10.1 / SGLang: flat ``{"object": "error", "message", "type", "param", "code": <int>}``; no
  ``prompt_tokens_details``.
* ``llamacpp``: llama-cpp-python's server with a text-only model: list-typed content (every image request) is
  dropped silently (200, prompt tokens of the text alone, an answer that ignores the images), no usage chunk in
  streams even with ``include_usage``, any model name accepted, errors without a code.
* ``llamacpp-noimage``: llama.cpp's ``llama-server`` without an mmproj: an image part is a 500 "image input is not
  supported".
* ``litellm``: a LiteLLM proxy in front of a DashScope-shaped upstream: errors re-wrapped
  ("litellm.BadRequestError: OpenAIException - <original> ...", ``code`` the status as a string, the provider code
  lost), ``Retry-After`` dropped but forwarded as ``llm_provider-retry-after``, ``x-litellm-*`` headers, in-band
  stream error events, and a cut upstream stream "completed" with a usage chunk but no ``finish_reason``.
* ``litellm-retrying``: the same proxy with its own retries on (2 hidden retries reported on every answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError
from .config import SimError

Envelope = Literal["nested", "flat", "litellm", "bare"]
Images = Literal["see", "ignore", "refuse"]

_LITELLM_CLASS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                  404: "NotFoundError", 429: "RateLimitError", 500: "InternalServerError",
                  503: "ServiceUnavailableError"}
_LITELLM_TYPE = {400: "invalid_request_error", 401: "auth_error", 429: "throttling_error",
                 500: "internal_server_error"}
IMAGE_NOT_SUPPORTED = ("image input is not supported - hint: if this is unexpected, you may need to provide the "
                       "mmproj")


@dataclass(frozen=True)
class Persona:
    """How one kind of server differs from Model Studio where a batch runner can tell."""

    name: str
    envelope: Envelope = "nested"
    stream_usage: bool = True  # honours stream_options.include_usage
    usage_details: bool = True  # sends prompt_tokens_details (image_tokens, cached_tokens)
    images: Images = "see"
    accept_any_model: bool = False
    proxy: bool = False  # renames headers like a LiteLLM proxy, adds x-litellm-*
    hidden_retries: int = 0  # retries the proxy made on its own, reported in x-litellm-attempted-retries

    def error_body(self, error: SimError, request_id: str) -> dict[str, Any]:
        """The error as this server's body."""
        if self.envelope == "flat":
            return {"object": "error", "message": error.message, "type": "BadRequestError" if error.status < 500
                    else "InternalServerError", "param": None, "code": error.status}
        if self.envelope == "bare":
            return {"error": {"code": error.status, "message": error.message, "type": _LITELLM_TYPE.get(
                error.status, "server_error")}}
        if self.envelope == "litellm":
            return {"error": {"message": litellm_message(error), "type": _LITELLM_TYPE.get(error.status),
                              "param": None, "code": str(error.status)}}
        return {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code},
                "request_id": request_id}

    def error_headers(self, error: SimError, retry_after_s: float | None) -> dict[str, str]:
        """Retry-After on throttling 429s: as sent, or (behind the proxy) only as ``llm_provider-*``."""
        headers: dict[str, str] = self.proxy_headers()
        if error.retryable_429 and retry_after_s is not None:
            prefix = "llm_provider-" if self.proxy else ""
            headers[f"{prefix}retry-after"] = str(max(0, math.ceil(retry_after_s)))
            headers[f"{prefix}retry-after-ms"] = str(round(retry_after_s * 1000))
        return headers

    def proxy_headers(self) -> dict[str, str]:
        """The ``x-litellm-*`` family a LiteLLM proxy adds to every answer."""
        if not self.proxy:
            return {}
        return {"x-litellm-version": "1.108.7-sim", "x-litellm-model-api-base": "http://upstream/v1",
                "x-litellm-attempted-retries": str(self.hidden_retries), "x-litellm-max-retries": "2"}

    def stream_error(self) -> SimError:
        """The error event a stream of this server can carry after some content."""
        if self.proxy:
            return SimError(500, "500", "Connection error. upstream closed the stream", type_="api_connection_error")
        return SimError(400, "data_inspection_failed", "Output data may contain inappropriate content.")

    def stream_error_payload(self) -> dict[str, Any]:
        """The in-band ``data: {"error": {...}}`` event."""
        error = self.stream_error()
        if self.proxy:
            return {"error": {"message": litellm_message(error), "type": None, "param": None, "code": "500"}}
        return {"error": {"message": error.message, "type": error.type, "code": error.code}}


def litellm_message(error: SimError) -> str:
    """LiteLLM's re-wrapping of an upstream error message (next-phase-facts.md §7.3)."""
    kind = _LITELLM_CLASS.get(error.status, "APIError")
    return (f"litellm.{kind}: {kind}: OpenAIException - {error.message}\n\nLiteLLM: model group 'm' failed with "
            "the error above. No fallback was attempted.")


PERSONAS: dict[str, Persona] = {
    "dashscope": Persona("dashscope"),
    "vllm": Persona("vllm", envelope="flat", usage_details=False, accept_any_model=True),
    "llamacpp": Persona("llamacpp", envelope="bare", stream_usage=False, usage_details=False, images="ignore",
                        accept_any_model=True),
    "llamacpp-noimage": Persona("llamacpp-noimage", envelope="bare", stream_usage=False, usage_details=False,
                                images="refuse", accept_any_model=True),
    "litellm": Persona("litellm", envelope="litellm", proxy=True),
    "litellm-retrying": Persona("litellm-retrying", envelope="litellm", proxy=True, hidden_retries=2),
}


def get_persona(name: str) -> Persona:
    """The persona called ``name``; a ConfigError naming the known ones otherwise."""
    try:
        return PERSONAS[name]
    except KeyError:
        raise ConfigError(f"simulator: unknown persona {name!r}; known: {', '.join(sorted(PERSONAS))}") from None


def validation_error(status: int = 500) -> SimError:
    """llama-cpp-python's answer to a parameter of the wrong type: a 500 carrying pydantic's validation message and
    a Python file path (deterministic: the same request fails the same way every time)."""
    return SimError(status, "", "1 validation error for CreateChatCompletionRequest\nmax_tokens\n  Input should be a "
                    "valid integer, unable to parse string as an integer [type=int_parsing, input_value='abc', "
                    "input_type=str]\n    For further information visit https://errors.pydantic.dev/2.11/v/int_parsing"
                    " (File \"/usr/lib/python3/site-packages/llama_cpp/server/app.py\", line 412)",
                    type_="internal_server_error")
