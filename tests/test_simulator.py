"""Tests for qwenvl_batch.simulator, over real loopback HTTP with the openai client (max_retries=0)."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from qwenvl_batch import tokens
from qwenvl_batch.errors import ConfigError
from qwenvl_batch.simulator import (
    RateLimiter,
    SimulatorConfig,
    SimulatorState,
    SimulatorThread,
    draw_latency,
    serve,
)

MODEL = "qwen3-vl-plus"


def png_bytes(width: int, height: int) -> bytes:
    """A real PNG of the given size."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(width: int, height: int) -> str:
    """A base64 PNG data URL of the given size."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height)).decode()


def user_message(text: str, *images: str, **part_extra: Any) -> list[dict[str, Any]]:
    """One user message: the images first, then the text."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}, **part_extra} for url in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def raw_post(url: str, body: object, api_key: str | None = "sk-test") -> tuple[int, dict[str, str], bytes]:
    """POST JSON without the SDK; returns (status, headers, body) for any status."""
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def raw_get(url: str) -> Any:
    """GET a JSON document."""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer sk-test"})) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    """A fault-free simulator shared by the module (marker counts are keyed by text, so tests use unique texts)."""
    with SimulatorThread(SimulatorConfig(extra_models=("my-extra-model",))) as server:
        yield server


@pytest.fixture()
def client(sim: SimulatorThread) -> openai.OpenAI:
    """An SDK client without its own retries."""
    return openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10)


def entries_for(sim: SimulatorThread, text: str) -> list[dict[str, Any]]:
    """Request-log entries whose text is ``text``."""
    return [entry for entry in sim.requests if entry["text"] == text]


# ---------------------------------------------------------------------------------------------- completions


def test_non_stream_usage_matches_token_estimate(sim: SimulatorThread, client: openai.OpenAI) -> None:
    """A non-stream completion with a PNG data URL reports the image tokens tokens.image_tokens computes."""
    text = "Describe this picture in one sentence, please."
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user_message(text, data_url(640, 480))
    )
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens_details.image_tokens == tokens.image_tokens(640, 480, MODEL)
    assert usage.prompt_tokens_details.text_tokens == tokens.text_tokens(text)
    assert usage.prompt_tokens == tokens.prompt_tokens([text], [(640, 480)], MODEL)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == len(completion.choices[0].message.content.split())
    assert text in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL
    assert raw.headers["x-simulator"] == "qwenvl-batch"
    assert raw.headers["x-request-id"]


def test_stream_with_usage_matches_non_stream(client: openai.OpenAI) -> None:
    """A stream with include_usage gathers the same content and usage as the non-stream call."""
    messages = user_message("Stream me a caption.", data_url(300, 200))
    expected = client.chat.completions.create(model=MODEL, messages=messages)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content == expected.choices[0].message.content
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage == expected.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    """Without stream_options.include_usage no chunk carries usage."""
    chunks = list(client.chat.completions.create(model=MODEL, messages=user_message("no usage"), stream=True))
    assert chunks and all(c.usage is None for c in chunks)


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_cuts_with_finish_reason_length(client: openai.OpenAI, param: str) -> None:
    """A token cap below the answer length cuts it there and reports finish_reason 'length'."""
    completion = client.chat.completions.create(
        model=MODEL, messages=user_message(f"cap via {param}"), **{param: 5}  # type: ignore[arg-type]
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert len(completion.choices[0].message.content.split()) == 5


def test_answers_are_deterministic_per_request(client: openai.OpenAI) -> None:
    """The same request gets the same answer whatever the seed/temperature; another text gets another one."""
    first = client.chat.completions.create(model=MODEL, messages=user_message("row 1"), seed=1, temperature=0.1)
    again = client.chat.completions.create(model=MODEL, messages=user_message("row 1"), seed=2, temperature=1.5)
    other = client.chat.completions.create(model=MODEL, messages=user_message("row 2"))
    assert first.choices[0].message.content == again.choices[0].message.content
    assert "row 2" in other.choices[0].message.content
    assert other.choices[0].message.content != first.choices[0].message.content


def test_answer_quotes_first_80_characters_of_last_user_text(client: openai.OpenAI) -> None:
    """The answer quotes the last user text's first 80 characters verbatim, not more."""
    text = "Caption row 0042 with care: " + "abcdefghij" * 10
    messages = [*user_message("an earlier turn"), {"role": "assistant", "content": "ok"}, *user_message(text)]
    content = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
    assert text[:80] in content and text[:81] not in content
    assert "an earlier turn" not in content


def test_image_tag_depends_on_image_bytes(client: openai.OpenAI) -> None:
    """Two different images with the same prompt get different bracket tags."""
    a = client.chat.completions.create(model=MODEL, messages=user_message("same", data_url(100, 100)))
    b = client.chat.completions.create(model=MODEL, messages=user_message("same", data_url(101, 100)))
    tag = lambda text: text.split("[", 1)[1].split("]", 1)[0]  # noqa: E731
    assert tag(a.choices[0].message.content) != tag(b.choices[0].message.content)


def test_ocr_model_returns_ocr_like_lines(client: openai.OpenAI) -> None:
    """qwen-vl-ocr answers with several lines of text and quotes the prompt."""
    completion = client.chat.completions.create(
        model="qwen-vl-ocr", messages=user_message("Read all text", data_url(800, 600))
    )
    content = completion.choices[0].message.content
    assert content.startswith("Simulated OCR text") and "Read all text" in content
    assert content.count("\n") >= 3


def test_per_part_max_pixels_and_high_resolution(client: openai.OpenAI) -> None:
    """Per-part max_pixels and body vl_high_resolution_images change image tokens as tokens computes."""
    capped = client.chat.completions.create(
        model=MODEL, messages=user_message("capped", data_url(2048, 2048), max_pixels=262_144)
    )
    high = client.chat.completions.create(
        model=MODEL,
        messages=user_message("high", data_url(2048, 2048)),
        extra_body={"vl_high_resolution_images": True},
    )
    assert capped.usage.prompt_tokens_details.image_tokens == tokens.image_tokens(  # type: ignore[union-attr]
        2048, 2048, MODEL, max_pixels=262_144
    )
    assert high.usage.prompt_tokens_details.image_tokens == 4098  # type: ignore[union-attr]


def test_system_string_content_counts_as_text(client: openai.OpenAI) -> None:
    """A string message content counts as one text part of the prompt."""
    system = "You are a careful captioner."
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, *user_message("hello")]
    )
    assert completion.usage.prompt_tokens_details.text_tokens == (  # type: ignore[union-attr]
        tokens.text_tokens(system) + tokens.text_tokens("hello")
    )


# ---------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A loopback static file server holding a 333x222 PNG; yields its base URL."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "pic.png").write_bytes(png_bytes(333, 222))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined, method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_loopback_image_url_is_fetched_and_measured(client: openai.OpenAI, image_server: str) -> None:
    """An http URL on 127.0.0.1 is downloaded and its real size is billed."""
    completion = client.chat.completions.create(model=MODEL, messages=user_message("url", f"{image_server}/pic.png"))
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details.image_tokens == tokens.image_tokens(333, 222, MODEL)


def test_missing_loopback_image_is_a_download_error(client: openai.OpenAI, image_server: str) -> None:
    """A loopback URL that 404s is refused with the provider's download error."""
    with pytest.raises(openai.BadRequestError, match="Failed to download multimodal content"):
        client.chat.completions.create(model=MODEL, messages=user_message("gone", f"{image_server}/missing.png"))


def test_remote_image_url_is_assumed_1024_square(client: openai.OpenAI) -> None:
    """An image on a host we cannot reach is billed as 1024x1024."""
    completion = client.chat.completions.create(
        model=MODEL, messages=user_message("remote", "https://example.com/cat.jpg")
    )
    assert completion.usage.prompt_tokens_details.image_tokens == 1026  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (data_url(9, 9), "[height:9 or width:9 must be larger than 10]"),
        (data_url(2010, 10), "aspect ratio"),
        ("data:image/png;base64,bm90IGFuIGltYWdl", "Failed to decode the image during the data inspection."),
        ("data:image/png;base64," + "A" * 10_485_760, "Exceeded limit on max bytes per data-uri item : 10485760"),
        ("ftp://example.com/a.png", "does not appear to be valid"),
    ],
)
def test_bad_images_are_refused_with_provider_messages(client: openai.OpenAI, url: str, needle: str) -> None:
    """Too-small, too-elongated, undecodable, oversized and bad-scheme images get a 400 with the provider's text."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user_message("bad image", url))
    assert needle in info.value.message
    assert info.value.code == "invalid_parameter_error"


# ---------------------------------------------------------------------------------------------- job-level errors


@pytest.mark.parametrize(
    ("api_key", "model", "exc_type", "status", "code", "message"),
    [
        ("sk-invalid-123", MODEL, openai.AuthenticationError, 401, "invalid_api_key", "Incorrect API key provided."),
        ("sk-denied-1", MODEL, openai.PermissionDeniedError, 403, "AccessDenied", "Access denied."),
        ("sk-arrears-1", MODEL, openai.BadRequestError, 400, "Arrearage", "in good standing"),
        ("sk-freequota-1", MODEL, openai.RateLimitError, 429, "insufficient_quota", "Free allocated quota exceeded."),
        ("sk-test", "qwen9-vl-nonexistent", openai.NotFoundError, 404, "model_not_found", "`qwen9-vl-nonexistent`"),
    ],
)
def test_job_level_errors(
    sim: SimulatorThread, api_key: str, model: str, exc_type: type[openai.APIStatusError], status: int, code: str,
    message: str,
) -> None:  # fmt: skip
    """Magic keys and unknown models return the provider's status, code and message, with a request id."""
    client = openai.OpenAI(base_url=sim.base_url, api_key=api_key, max_retries=0)
    with pytest.raises(exc_type) as info:
        client.chat.completions.create(model=model, messages=user_message("job error"))
    error = info.value
    assert (error.status_code, error.code) == (status, code)
    assert message in error.message
    assert error.response.json()["request_id"] == error.response.headers["x-request-id"]
    assert "retry-after-ms" not in error.response.headers


def test_missing_authorization_is_401(sim: SimulatorThread) -> None:
    """A request without an Authorization header gets 401 invalid_api_key."""
    status, headers, body = raw_post(
        sim.base_url + "/chat/completions", {"model": MODEL, "messages": user_message("x")}, api_key=None
    )
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["x-simulator"] == "qwenvl-batch"


def test_extra_and_region_model_names_are_known(sim: SimulatorThread) -> None:
    """Configured extra models and region-suffixed names are served; the model list includes the extras."""
    client = openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
    for model in ("my-extra-model", "qwen3-vl-flash-us"):
        assert client.chat.completions.create(model=model, messages=user_message("m")).model == model
    listed = {model.id for model in client.models.list()}
    assert {"my-extra-model", "qwen3-vl-plus", "qvq-max", "qwen-vl-ocr"} <= listed


def test_accept_any_model() -> None:
    """With accept_any_model, vLLM-style names are served instead of 404."""
    with SimulatorThread(SimulatorConfig(accept_any_model=True)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        completion = client.chat.completions.create(model="Qwen/Qwen2.5-VL-7B-Instruct", messages=user_message("x"))
    assert completion.model == "Qwen/Qwen2.5-VL-7B-Instruct"


# ---------------------------------------------------------------------------------------------- thinking


def test_stream_only_model_refused_without_stream(client: openai.OpenAI) -> None:
    """qvq-max without stream is a 400 saying the model only supports stream mode."""
    with pytest.raises(openai.BadRequestError, match="This model only support stream mode"):
        client.chat.completions.create(model="qvq-max", messages=user_message("think"))


def test_enable_thinking_without_stream_refused(client: openai.OpenAI) -> None:
    """enable_thinking=true on a non-stream call is a 400 (default configuration)."""
    with pytest.raises(openai.BadRequestError, match="enable_thinking must be set to false"):
        client.chat.completions.create(
            model=MODEL, messages=user_message("think"), extra_body={"enable_thinking": True}
        )


def test_thinking_stream_sends_reasoning_first_and_counts_it(client: openai.OpenAI) -> None:
    """A thinking stream sends reasoning deltas before content; thinking_budget caps them; usage counts them."""
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=user_message("think hard"), stream=True, stream_options={"include_usage": True},
            extra_body={"enable_thinking": True, "thinking_budget": 7},
        )  # fmt: skip
    )
    kinds = []
    reasoning = ""
    for chunk in chunks:
        if chunk.choices:
            delta = chunk.choices[0].delta
            piece = getattr(delta, "reasoning_content", None)
            reasoning += piece or ""
            kinds.append("r" if piece else "c" if delta.content else "-")
    usage = chunks[-1].usage
    assert usage is not None
    details = usage.completion_tokens_details
    assert len(reasoning.split()) == details.reasoning_tokens == 7
    assert usage.completion_tokens == details.reasoning_tokens + details.text_tokens
    assert re.fullmatch(r"r+c+", "".join(kind for kind in kinds if kind != "-"))


def test_qvq_stream_always_thinks(client: openai.OpenAI) -> None:
    """A stream-only model thinks without being asked."""
    chunks = list(
        client.chat.completions.create(
            model="qvq-max", messages=user_message("q"), stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens >= 30  # type: ignore[union-attr]


def test_non_stream_thinking_when_allowed_and_null_reasoning_tokens() -> None:
    """With allow_non_stream_thinking, the message carries reasoning_content; reasoning_tokens_null sends null."""
    config = SimulatorConfig(allow_non_stream_thinking=True, reasoning_tokens_null=True)
    with SimulatorThread(config) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        completion = client.chat.completions.create(
            model="qwen3-vl-flash", messages=user_message("t"), extra_body={"enable_thinking": True}
        )
    message = completion.choices[0].message
    assert getattr(message, "reasoning_content", "").startswith("Simulated reasoning")
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens is None
    assert usage.completion_tokens > usage.completion_tokens_details.text_tokens


# ---------------------------------------------------------------------------------------------- marker faults


@pytest.mark.parametrize(
    ("kind", "exc_type", "status", "code"),
    [
        ("500", openai.InternalServerError, 500, "internal_error"),
        ("503", openai.InternalServerError, 503, "ModelUnavailable"),
        ("429", openai.RateLimitError, 429, "Throttling"),
        ("moderation", openai.BadRequestError, 400, "data_inspection_failed"),
        ("badparam", openai.BadRequestError, 400, "invalid_parameter_error"),
        ("timeout_media", openai.BadRequestError, 400, "InvalidParameter.DataInspection"),
        ("toolong", openai.BadRequestError, 400, "invalid_parameter_error"),
    ],
)
def test_marker_error_applies_exactly_n_times(
    sim: SimulatorThread, client: openai.OpenAI, kind: str, exc_type: type[openai.APIStatusError], status: int,
    code: str,
) -> None:  # fmt: skip
    """[[sim:KIND:2]] fails the first two identical requests with that error, then the request is served."""
    text = f"caption [[sim:{kind}:2]] please"
    for _ in range(2):
        with pytest.raises(exc_type) as info:
            client.chat.completions.create(model=MODEL, messages=user_message(text))
        assert (info.value.status_code, info.value.code) == (status, code)
    assert text in client.chat.completions.create(model=MODEL, messages=user_message(text)).choices[0].message.content
    assert [e["outcome"] for e in entries_for(sim, text)] == [f"http_{status}", f"http_{status}", "ok"]


def test_marker_without_count_applies_every_time(client: openai.OpenAI) -> None:
    """[[sim:503]] fails every time."""
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=user_message("always [[sim:503]]"))


def test_markers_apply_in_sequence(client: openai.OpenAI) -> None:
    """Two markers apply one after the other: a 500, then a 429, then the answer."""
    text = "[[sim:500:1]] [[sim:429:1]] sequence"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=user_message(text))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=user_message(text))
    assert client.chat.completions.create(model=MODEL, messages=user_message(text)).choices


def test_unknown_marker_is_refused(client: openai.OpenAI) -> None:
    """A misspelt marker kind is a 400 naming the known kinds, not silently ignored."""
    with pytest.raises(openai.BadRequestError, match="Unknown simulator marker"):
        client.chat.completions.create(model=MODEL, messages=user_message("[[sim:50O]]"))


def test_drop_marker_closes_connection(sim: SimulatorThread, client: openai.OpenAI) -> None:
    """[[sim:drop:1]] closes the connection without a response once."""
    text = "drop me [[sim:drop:1]]"
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=user_message(text))
    assert client.chat.completions.create(model=MODEL, messages=user_message(text)).choices
    assert [e["outcome"] for e in entries_for(sim, text)] == ["dropped", "ok"]


def test_truncate_marker_cuts_stream(sim: SimulatorThread, client: openai.OpenAI) -> None:
    """[[sim:truncate:1]] on a stream sends a few chunks then closes without [DONE]."""
    text = "truncate me [[sim:truncate:1]]"
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model=MODEL, messages=user_message(text), stream=True):
            received.append(chunk)
    assert 1 <= len(received) <= 3
    assert not any(c.choices and c.choices[0].finish_reason for c in received)
    full = list(client.chat.completions.create(model=MODEL, messages=user_message(text), stream=True))
    assert full[-1].choices[0].finish_reason == "stop"
    assert [e["outcome"] for e in entries_for(sim, text)] == ["truncated", "ok"]


def test_partial_marker_returns_cut_answer_with_header(client: openai.OpenAI) -> None:
    """[[sim:partial:1]] answers 200 with x-dashscope-partialresponse and a shorter answer."""
    text = "partial [[sim:partial:1]]"
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=user_message(text))
    partial = raw.parse()
    full = client.chat.completions.create(model=MODEL, messages=user_message(text))
    assert raw.headers["x-dashscope-partialresponse"] == "true"
    assert full.choices[0].message.content.startswith(partial.choices[0].message.content)
    assert partial.usage.completion_tokens < full.usage.completion_tokens  # type: ignore[union-attr]


def test_garbage_marker_returns_non_completion(sim: SimulatorThread) -> None:
    """[[sim:garbage:1]] answers 200 with a body that is not a chat completion."""
    body = {"model": MODEL, "messages": user_message("junk [[sim:garbage:1]]")}
    status, _, payload = raw_post(sim.base_url + "/chat/completions", body)
    assert (status, json.loads(payload)) == (200, {"foo": 1})
    status, _, payload = raw_post(sim.base_url + "/chat/completions", body)
    assert status == 200 and "choices" in json.loads(payload)


def test_hang_marker_times_out_client(sim: SimulatorThread) -> None:
    """[[sim:hang:1]] never answers, so the client's timeout fires; the log says 'hung'."""
    client = openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=0.3)
    text = "hang [[sim:hang:1]]"
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, messages=user_message(text))
    assert client.chat.completions.create(model=MODEL, messages=user_message(text)).choices
    assert [e["outcome"] for e in entries_for(sim, text)] == ["hung", "ok"]


def test_v1_route_alias(sim: SimulatorThread) -> None:
    """/v1/chat/completions serves the same as /compatible-mode/v1/chat/completions."""
    status, headers, payload = raw_post(
        sim.root_url + "/v1/chat/completions", {"model": MODEL, "messages": user_message("alias")}
    )
    assert status == 200 and json.loads(payload)["object"] == "chat.completion"
    assert headers["x-simulator"] == "qwenvl-batch"


# ---------------------------------------------------------------------------------------------- random faults, latency


def _outcomes(config: SimulatorConfig, n: int) -> list[str]:
    with SimulatorThread(config) as server:
        for i in range(n):
            raw_post(server.base_url + "/chat/completions", {"model": MODEL, "messages": user_message(f"r{i}")})
        return [entry["outcome"] for entry in server.requests]


def test_random_faults_are_seeded() -> None:
    """Random fault rates with the same seed fail the same requests; both faults and successes occur."""
    config = SimulatorConfig(fail_500_rate=0.3, fail_429_rate=0.2, moderation_rate=0.1, seed=7)
    first = _outcomes(config, 30)
    assert first == _outcomes(config, 30)
    assert {"ok", "http_500", "http_429", "http_400"} <= set(first)


def test_latency_draws() -> None:
    """Fixed latency is the base; uniform stays within 0..2x; lognormal is clipped at latency_max_s."""
    fixed = SimulatorState.from_config(SimulatorConfig(latency_s=0.5))
    uniform = SimulatorState.from_config(SimulatorConfig(latency_s=0.5, latency_dist="uniform"))
    heavy = SimulatorState.from_config(SimulatorConfig(latency_s=1.0, latency_dist="lognormal", latency_max_s=2.0))
    assert draw_latency(fixed) == 0.5
    assert all(0.0 <= draw_latency(uniform) <= 1.0 for _ in range(200))
    draws = [draw_latency(heavy) for _ in range(400)]
    assert max(draws) == 2.0 and min(draws) < 1.0 < sorted(draws)[300]


@pytest.mark.parametrize(
    "kwargs", [{"fail_500_rate": 1.5}, {"latency_dist": "normal"}, {"requests_per_minute": 0}, {"latency_s": -1}]
)
def test_bad_config_is_refused(kwargs: dict[str, Any]) -> None:
    """Out-of-range knobs raise ConfigError at construction."""
    with pytest.raises(ConfigError):
        SimulatorConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- rate limits


def test_rate_limiter_minute_and_second_windows() -> None:
    """RPM 60 with burst 2 admits 2 per second and 60 per minute; refusals consume nothing."""
    limiter = RateLimiter(60, None, 2.0)
    assert [limiter.admit(0.0, 1), limiter.admit(0.1, 1), limiter.admit(0.2, 1)] == [None, None, "requests"]
    assert limiter.admit(1.0, 1) is None  # the first second's requests have left the 1 s window
    admitted = 3 + sum(limiter.admit(1.0 + 0.5 * i, 1) is None for i in range(1, 118))
    assert admitted == 60
    assert limiter.admit(59.9, 1) == "requests"
    assert limiter.admit(60.05, 1) is None  # the t=0.0 request left the minute window


def test_rate_limiter_tokens() -> None:
    """TPM refuses with 'tokens'; a lone request bigger than the per-second cap still passes."""
    limiter = RateLimiter(None, 600, 1.0)  # 10 tokens per second
    assert limiter.admit(0.0, 50) is None
    assert limiter.admit(0.5, 1) == "tokens"
    assert limiter.admit(1.0, 500) is None
    assert limiter.admit(2.0, 100) == "tokens"  # the minute window holds 550 of 600


def test_rpm_limit_returns_limit_requests_with_retry_after() -> None:
    """Once RPM is exceeded the simulator answers 429 limit_requests, with Retry-After when configured."""
    config = SimulatorConfig(requests_per_minute=3, burst_tolerance=100.0, retry_after_s=0.25)
    with SimulatorThread(config) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        for i in range(3):
            client.chat.completions.create(model=MODEL, messages=user_message(f"rpm {i}"))
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=user_message("rpm 3"))
    error = info.value
    assert error.code == "limit_requests"
    assert error.response.json()["error"]["message"] == "Requests rate limit exceeded, please try again later."
    assert (error.response.headers["Retry-After"], error.response.headers["retry-after-ms"]) == ("1", "250")


def test_tpm_limit_returns_insufficient_quota() -> None:
    """Once TPM is exceeded the simulator answers 429 insufficient_quota 'Allocated quota exceeded'."""
    with SimulatorThread(SimulatorConfig(tokens_per_minute=300, burst_tolerance=100.0)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        served = 0
        with pytest.raises(openai.RateLimitError) as info:
            for i in range(50):
                client.chat.completions.create(model=MODEL, messages=user_message(f"tpm {i}"))
                served += 1
    assert 3 <= served < 50
    assert info.value.code == "insufficient_quota"
    assert "Allocated quota exceeded" in info.value.message


# ---------------------------------------------------------------------------------------------- log, routes, serve


def test_request_log_file_and_sim_routes(tmp_path: Path) -> None:
    """Each request is appended to the JSONL log at once; /_sim/log, /_sim/stats and /_sim/reset work."""
    log_path = tmp_path / "requests.jsonl"
    with SimulatorThread(SimulatorConfig(request_log=log_path)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=user_message("logged", data_url(64, 64)))
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=user_message("logged too"))
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        served = raw_get(server.root_url + "/_sim/log")
        stats = raw_get(server.root_url + "/_sim/stats")
        status, _, _ = raw_post(server.root_url + "/_sim/reset", {})
        after = raw_get(server.root_url + "/_sim/log")
    assert lines == served
    assert [(e["outcome"], e["status"], e["model"]) for e in lines] == [("ok", 200, MODEL), ("http_404", 404, "nope")]
    assert lines[0]["n_images"] == 1 and lines[0]["text"] == "logged"
    assert lines[0]["prompt_tokens"] == tokens.prompt_tokens(["logged"], [(64, 64)], MODEL)
    assert lines[0]["completion_tokens"] > 0 and lines[0]["request_id"]
    assert stats == {"ok": 1, "http_404": 1}
    assert status == 200 and after == []


def test_serve_refuses_non_loopback_host() -> None:
    """serve() refuses to listen on a non-loopback address."""
    with pytest.raises(ConfigError, match="loopback"):
        serve(SimulatorConfig(), host="0.0.0.0")


def test_serve_prints_its_url_and_stops_on_sigterm() -> None:
    """serve() prints the SIMULATOR line with its URL, answers there, and exits cleanly on SIGTERM."""
    code = "from qwenvl_batch.simulator import serve, SimulatorConfig; serve(SimulatorConfig())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        prefix = "qwenvl-batch SIMULATOR (not the real Model Studio service) listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        base_url = line.rsplit(" ", 1)[1]
        assert base_url.endswith("/compatible-mode/v1")
        status, _, _ = raw_post(base_url + "/chat/completions", {"model": MODEL, "messages": user_message("cli")})
        assert status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert exit_code == 0


def test_random_module_state_untouched() -> None:
    """The simulator's seeded RNGs are its own: creating one does not reseed the global random module."""
    random.seed(123)
    expected = random.random()
    random.seed(123)
    SimulatorState.from_config(SimulatorConfig(seed=5))
    assert random.random() == expected
