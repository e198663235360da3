"""Images in a request: measured from their headers only (data URLs, loopback files and URLs) and cached by
content hash, so served usage equals the runner's estimate exactly."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io

import aiohttp
import yarl
from PIL import Image

from .. import tokens
from .chat_request import ChatRequest, ImageRef, MeasuredImage, Usage
from .config import (
    _FAULT_ERRORS,
    _INVALID_PARAM,
    ASSUMED_REMOTE_SIZE,
    IMAGE_CACHE_ENTRIES,
    LOOPBACK_NAMES,
    MAX_DATA_URI_CHARS,
    MAX_DOWNLOAD_BYTES,
    SimError,
    _bad_request,
)
from .state import SimulatorState

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
    except TimeoutError as exc:
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
