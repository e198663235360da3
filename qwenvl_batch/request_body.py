"""A request's JSON body as bytes, built once per attempt, with the images' base64 spliced in unescaped.

Why not let the SDK build it: ``chat.completions.create`` walks every message part through its typed param
transforms (~90 recursive calls per small-image request) and then JSON-encodes a body whose base64 image is
60 KB to 10 MB of text that ``json.dumps`` scans character by character for escapes. A data URL the runner built
itself (:class:`~qwenvl_batch.media.Base64URL`: ``data:<mime>;base64,`` + the base64 alphabet) never needs
escaping, so the body is the JSON of everything else with the URLs put in place as they are. Any other string
(a manifest's own data URL, the prompt) goes through ``json.dumps`` like before.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

from .media import Base64URL

_TOKEN = f"qwenvl-image-{secrets.token_hex(8)}"  # stands in for each URL while the rest is JSON-encoded


def json_body(fields: Mapping[str, Any], messages: list[dict[str, Any]]) -> bytes:
    """``{**fields, "messages": messages}`` as compact JSON bytes, the way any JSON encoder would write it."""
    urls: list[str] = []
    body = {**fields, "messages": [_with_placeholders(message, urls) for message in messages]}
    text = json.dumps(body, separators=(",", ":"))
    if not urls:
        return text.encode("ascii")
    pieces = text.split(f'"{_TOKEN}"')
    if len(pieces) != len(urls) + 1:  # the token also occurs in the text itself (never by chance): no splicing
        return json.dumps({**fields, "messages": messages}, separators=(",", ":")).encode("ascii")
    out = [pieces[0].encode("ascii")]
    for url, piece in zip(urls, pieces[1:]):
        out += (b'"', url.encode("ascii"), b'"', piece.encode("ascii"))
    return b"".join(out)


def _with_placeholders(message: dict[str, Any], urls: list[str]) -> dict[str, Any]:
    """The message with each runner-built image URL replaced by the token (copies; the caller's dicts stay)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        image = part.get("image_url") if isinstance(part, dict) else None
        url = image.get("url") if isinstance(image, dict) else None
        if type(url) is Base64URL and isinstance(image, dict):
            urls.append(url)
            part = {**part, "image_url": {**image, "url": _TOKEN}}
        parts.append(part)
    return {**message, "content": parts}
