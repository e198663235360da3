"""JSON answers: ``response_format`` accepted or refused the way the provider does, and an object that conforms to
the requested schema, derived deterministically from the request.

Where the schema comes from: ``response_format.json_schema.schema``, else the first schema written in the
prompt (a JSON Schema, or a value template like qwen-vl-ocr's key-information prompt takes). Model Studio's
rules (next-phase-facts.md §4.1) apply to the models it serves (``KNOWN_MODELS``): ``json_object`` only for the
Qwen3-VL and Qwen-VL-Max/Plus families, never with thinking, and only when a message contains the word "JSON";
``json_schema`` not for vision models. A model answered under its own name (a job for vLLM, SGLang...) gets a
server with grammar-constrained decoding that accepts both.

Faults (markers, counted per kind, image set and first text, so a repair — the same request with a note
appended — gets the next answer): ``[[sim:badjson:N]]`` a trailing comma, ``[[sim:fenced:N]]`` the object in a
```json fence (valid once the fence is stripped), ``[[sim:badschema:N]]`` the first field left out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from ..answer_schema import Node, SchemaError, from_fields, from_json_schema
from ..structured import has_json_mode
from .answers import count_words, image_tag, reasoning_text, request_digest
from .chat_request import Answer, ChatRequest, MeasuredImage
from .config import _INVALID_PARAM, KNOWN_MODELS, _bad_request
from .state import SimulatorState

STRUCTURED_FAULTS = ("badjson", "fenced", "badschema")
JSON_WORD_REQUIRED = ("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                      "'json_object'")
THINKING_REFUSED = "Json mode response is not supported when enable_thinking is true"
NOT_SUPPORTED = _INVALID_PARAM + "response_format {kind} is not supported by model {model}"  # simulator's wording


@dataclass(frozen=True)
class JsonRequest:
    """A request that wants JSON: how it asked (json_object, json_schema or prompt) and the schema, if any."""

    kind: str
    schema: Node | None


def with_json_request(chat: ChatRequest, body: dict[str, Any], persona: str) -> ChatRequest:
    """``chat`` with what it asks of JSON; raises the provider's 400 for a combination it refuses."""
    return replace(chat, json_request=parse_json_request(chat, body, persona))


def parse_json_request(chat: ChatRequest, body: dict[str, Any], persona: str) -> JsonRequest | None:
    """The JSON wish of a request; None for a plain caption/OCR request."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    model_studio = chat.model in KNOWN_MODELS and persona in ("dashscope", "litellm", "litellm-retrying")
    if fmt is None or kind == "text":
        schema = schema_in_prompt(chat.texts)
        return JsonRequest("prompt", schema) if schema is not None else None
    if kind == "json_object":
        if model_studio and not has_json_mode(chat.model):
            raise _bad_request(NOT_SUPPORTED.format(kind="json_object", model=chat.model))
        if model_studio and chat.thinking:
            raise _bad_request(THINKING_REFUSED)
        if not any("json" in text.lower() for text in chat.texts):
            raise _bad_request(JSON_WORD_REQUIRED)
        return JsonRequest("json_object", schema_in_prompt(chat.texts))
    if kind == "json_schema":
        if model_studio:
            raise _bad_request(NOT_SUPPORTED.format(kind="json_schema", model=chat.model))
        spec = fmt.get("json_schema")
        try:
            schema = from_json_schema(spec.get("schema") if isinstance(spec, dict) else None)  # type: ignore[arg-type]
        except SchemaError as exc:
            raise _bad_request(f"response_format.json_schema is invalid: {exc}") from None
        return JsonRequest("json_schema", schema)
    raise _bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def schema_in_prompt(texts: tuple[str, ...]) -> Node | None:
    """The first schema written in the texts: a JSON Schema object, or a value template (keys → type names)."""
    decoder = json.JSONDecoder()
    for text in texts:
        position = text.find("{")
        while position >= 0:
            try:
                value, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                position = text.find("{", position + 1)
                continue
            node = _as_schema(value)
            if node is not None:
                return node
            position = text.find("{", end)
    return None


def _as_schema(value: Any) -> Node | None:
    if not isinstance(value, dict):
        return None
    try:
        if value.get("type") == "object" and "properties" in value:
            return from_json_schema(value)
        return from_fields(value)
    except SchemaError:
        return None


def json_answer(chat: ChatRequest, images: list[MeasuredImage], state: SimulatorState) -> Answer | None:
    """The JSON answer for a request that wants one (None otherwise), with a marker fault applied if one is due."""
    wish = chat.json_request
    if wish is None:
        return None
    digest = request_digest(replace(chat, texts=chat.texts[:1]), images)  # a repair's note does not change it
    tag = image_tag(images)
    value = fill(wish.schema, digest, tag) if wish.schema is not None else {"caption": f"Simulated answer [{tag}]"}
    content = json.dumps(value, ensure_ascii=False)
    fault = _due_fault(chat, tag, state)
    if fault == "badjson":
        content = content[:-1] + ",}"
    elif fault == "fenced":
        content = f"Here is the JSON:\n```json\n{content}\n```"
    elif fault == "badschema" and isinstance(value, dict) and value:
        content = json.dumps(dict(list(value.items())[1:]), ensure_ascii=False)
    tokens, finish = count_words(content), "stop"
    if chat.max_tokens is not None and chat.max_tokens < tokens:  # cut like any answer: the JSON breaks
        content, tokens, finish = content[: max(1, len(content) * chat.max_tokens // tokens)], chat.max_tokens, "length"
    reasoning = reasoning_text(chat, digest) if chat.thinking else None  # a thinking model thinks first
    return Answer(content, reasoning, finish, tokens, count_words(reasoning) if reasoning else 0)


def _due_fault(chat: ChatRequest, tag: str, state: SimulatorState) -> str | None:
    """The first structured-fault marker still due for this image set and first text; using it counts one."""
    from .chat_request import parse_markers

    first = chat.texts[0] if chat.texts else ""
    for kind, limit in parse_markers(chat.full_text):
        if kind not in STRUCTURED_FAULTS:
            continue
        key = (kind, f"{tag}\x00{first}")
        if limit is None or state.marker_counts[key] < limit:
            state.marker_counts[key] += 1
            return kind
    return None


def fill(node: Node, digest: int, tag: str, path: str = "$") -> Any:
    """A value that conforms to ``node``, a function of the request digest and the field's path only."""
    h = int.from_bytes(hashlib.blake2b(f"{digest}:{path}".encode(), digest_size=8).digest(), "big")
    if node.kind == "object":
        return {name: fill(child, digest, tag, f"{path}.{name}") for name, child in node.properties}
    if node.kind == "array":
        assert node.items is not None
        return [fill(node.items, digest, tag, f"{path}[{i}]") for i in range(1 + h % 3)]
    if node.enum is not None:
        return node.enum[h % len(node.enum)]
    if node.kind == "string":
        return f"{path.rsplit('.', 1)[-1].split('[')[0]} {tag}"
    if node.kind == "number":
        return round((h % 100_000) / 100, 2)
    if node.kind == "integer":
        return h % 1000
    if node.kind == "boolean":
        return bool(h % 2)
    day = dt.date(2025, 1, 1) + dt.timedelta(days=h % 365)
    if node.kind == "date":
        return day.isoformat()
    return f"{day.isoformat()}T{h % 24:02d}:{h % 60:02d}:00Z"
