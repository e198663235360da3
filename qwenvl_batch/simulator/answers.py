"""The deterministic answer (a function of the request's text and images) and the response bodies that carry
it: non-stream JSON, SSE chunks, usage, and provider-shaped error bodies."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

from aiohttp import web

from .. import tokens
from .chat_request import Answer, ChatRequest, MeasuredImage, Usage
from .config import (
    _CAPTION_WORDS,
    _OCR_WORDS,
    _OCR_WORDS_PER_LINE,
    _WORD,
    STREAM_WORDS_PER_CHUNK,
    SimError,
    SimulatorConfig,
)
from .personas import get_persona

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
    if not get_persona(config.persona).usage_details:  # vLLM, llama.cpp: the three totals only
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": completion,
                "total_tokens": usage.prompt_tokens + completion}
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
    return [text[start:end] for start, end in zip(starts, ends, strict=True) if end > start]


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
    if request.include_usage and get_persona(config.persona).stream_usage:  # llama.cpp never sends it
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
    persona = get_persona(config.persona)
    if persona.name != "dashscope":  # another server's envelope and headers (simulator/personas.py)
        return _json_response(persona.error_body(error, request_id), status=error.status,
                              headers=persona.error_headers(error, config.retry_after_s))
    headers: dict[str, str] = {}
    if error.retryable_429 and config.retry_after_s is not None:
        headers["Retry-After"] = str(max(0, math.ceil(config.retry_after_s)))
        headers["retry-after-ms"] = str(round(config.retry_after_s * 1000))
    return _json_response(error_payload(error, request_id), status=error.status, headers=headers)


# --------------------------------------------------------------------------------------------------------
