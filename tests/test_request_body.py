"""The request's hot path: the body serialised once with the base64 spliced in, and the SDK's raw and typed paths
reading the same answer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from conftest import image_rows, write_image, write_manifest

from qwenvl_batch.client import ChatClient, Completion
from qwenvl_batch.media import Base64URL, parse_image_cell, prepare_image
from qwenvl_batch.request_body import _TOKEN, json_body


def _messages(url: str, text: str = "Caption this image.") -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}, "max_pixels": 1000},
                                         {"type": "text", "text": text}]}]


def test_prepared_image_url_is_marked_and_spliced_as_json_would_write_it(tmp_path: Path) -> None:
    """A prepared local image's URL is a Base64URL; the body with it spliced in decodes to exactly the fields and
    messages given, and the caller's messages are left as they were."""
    write_image(tmp_path / "a.jpg")
    [ref] = parse_image_cell("a.jpg", column="image", base_dir=tmp_path)
    url = prepare_image(ref).url
    assert type(url) is Base64URL and url.startswith("data:image/jpeg;base64,")
    messages = _messages(url, text='quote " backslash \\ newline \n é \U0001f600')
    fields = {"model": "qwen3-vl-flash", "max_tokens": 100, "vl_high_resolution_images": True}
    body = json_body(fields, messages)
    assert json.loads(body) == {**fields, "messages": messages}
    assert messages[1]["content"][0]["image_url"]["url"] is url


def test_strings_not_built_by_the_runner_are_escaped() -> None:
    """A manifest's own data URL (a plain str, possibly with characters JSON must escape) and a prompt that holds
    the splice token itself still give valid JSON with the exact text."""
    odd = 'data:image/png;name="x\\y";base64,AAAA'
    assert json.loads(json_body({}, _messages(odd)))["messages"] == _messages(odd)
    spliced = Base64URL("data:image/png;base64,QUJD")
    tricky = _messages(spliced, text=f'"{_TOKEN}"')
    assert json.loads(json_body({"model": "m"}, tricky)) == {"model": "m", "messages": tricky}


def test_raw_and_typed_sdk_paths_read_the_same_answer(tmp_path: Path, sim, make_job) -> None:
    """The runner's raw path and the SDK's typed path (kept for benchmarks) send the same request and read the
    same answer, usage and request id, plain and streamed."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 1))
    write_image(tmp_path / "b.jpg", size=(120, 80))
    [ref] = parse_image_cell("b.jpg", column="image", base_dir=tmp_path)
    messages = _messages(prepare_image(ref).url)

    async def both(stream: bool) -> list[Completion]:
        answers = []
        for typed in (False, True):
            client = ChatClient(make_job(manifest, model={"stream": stream}), api_key="x")
            client.full_sdk_path = typed
            try:
                answers.append(await client.complete(messages))
            finally:
                await client.close()
        return answers

    for stream in (False, True):
        raw, typed = asyncio.run(both(stream))
        assert raw.content and raw.prompt_tokens and raw.image_tokens
        same = ("content", "finish_reason", "model", "prompt_tokens", "completion_tokens", "total_tokens",
                "image_tokens", "reasoning_tokens")
        assert {k: getattr(raw, k) for k in same} == {k: getattr(typed, k) for k in same}
    bodies = [entry["text"] for entry in sim.requests]
    assert len(bodies) == 4 and len(set(bodies)) == 1
