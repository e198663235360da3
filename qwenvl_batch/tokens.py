"""Qwen-VL prompt-token estimation: the server's image resize rule, reproduced.

Model Studio bills an image as ``h_bar * w_bar / factor**2 + 2`` tokens, where ``(h_bar, w_bar)`` is the
image after the server's *smart resize* (round each side to a multiple of ``factor``, then scale into
``[min_pixels, max_pixels]``) and the ``+2`` are the vision start/end markers (reference §1.1, §1.3).

One function computes this for three users: the simulator (the usage it serves), the runner's token rate
limiter and the ``estimate`` command. They must agree exactly, so everything here is pure integer/float
arithmetic with no I/O and no randomness.

The per-model constants come from the provider's OpenAI-compatible API reference (reference §1.2) and were
checked against third-party measurements on qwen3-vl-plus (§1.4), which this module reproduces exactly.
Text is *approximated* (4 characters per token): the real tokenizer and the chat template's own tokens are
not modelled, so treat text counts as an estimate and the server's ``usage`` as the truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ImageSizeError",
    "VisionSpec",
    "image_tokens",
    "prompt_tokens",
    "smart_resize",
    "text_tokens",
    "vision_spec",
]

MIN_SIDE_PX = 10
"""Both sides must be at least this many pixels (9x9 is refused, 10x10 accepted; reference §1.4)."""

MAX_ASPECT_RATIO = 200
"""Longer side / shorter side may not exceed this (reference §1.3, §2.1)."""

VISION_MARKER_TOKENS = 2
"""``<vision_bos>`` and ``<vision_eos>``: one token each, added to every image (reference §1.1)."""

CHARS_PER_TOKEN = 4
"""The text approximation: one token per 4 characters, rounded up."""

REGION_SUFFIXES = ("-us",)
"""Deployment suffixes on model names (e.g. the US/Virginia deployment) that do not change the vision rules."""


class ImageSizeError(ValueError):
    """The image is too small or too elongated for the model; the server would refuse it with a 400."""

    def __init__(self, message: str, *, height: int, width: int) -> None:
        super().__init__(message)
        self.height = height
        self.width = width


@dataclass(frozen=True)
class VisionSpec:
    """Image-resize constants of one model family (reference §1.2).

    ``max_pixels`` is the default cap per image; a request may raise it up to ``max_pixels_limit``.
    ``high_res_pixels`` is the fixed budget used instead of ``max_pixels`` when the request sets
    ``vl_high_resolution_images=true``; ``None`` means the family has no such mode (the flag is ignored).
    """

    factor: int
    min_pixels: int
    max_pixels: int
    max_pixels_limit: int
    high_res_pixels: int | None


# Qwen3-VL / Qwen3.5: 32 px per token side, >= 64 tokens, 2560 tokens by default, 16384 in high-res mode.
QWEN3_VL = VisionSpec(
    factor=32, min_pixels=65_536, max_pixels=2_621_440, max_pixels_limit=16_777_216, high_res_pixels=16_777_216
)

# qwen-vl-max/plus (unversioned, -latest, 2025-08-13 / 2025-08-15): factor 32 but their own min/max.
# Conflict in the sources: the API reference [S5] says max_pixels defaults to 1,310,720 (1280 tokens), the
# qwencloud vision table [S3] says 2,621,440. We follow the API reference, as the task asks.
QWEN_VL_MAX_PLUS_32 = VisionSpec(
    factor=32, min_pixels=4_096, max_pixels=1_310_720, max_pixels_limit=16_777_216, high_res_pixels=16_777_216
)

# qwen-vl-ocr (= 2025-11-20, Qwen3-VL based): the docs' recommended 3072..8,388,608 and a 15.68 MP ceiling.
# No high-resolution mode is documented for OCR, so the flag is ignored.
QWEN_VL_OCR_32 = VisionSpec(
    factor=32, min_pixels=3_072, max_pixels=8_388_608, max_pixels_limit=15_680_000, high_res_pixels=None
)

# Qwen2.5-VL family (QVQ, qwen2.5-vl-*, qwen2-vl-*, older qwen-vl-max/plus/ocr snapshots): 28 px per token
# side. Conflict: [S5] gives a fixed 12,845,056 budget in high-res mode, [S3] says the flag is not supported
# for this group; we follow [S5].
QWEN25_VL_28 = VisionSpec(
    factor=28, min_pixels=3_136, max_pixels=1_003_520, max_pixels_limit=12_845_056, high_res_pixels=12_845_056
)

_MAX_PLUS_32_NAMES = frozenset(
    {
        "qwen-vl-max",
        "qwen-vl-max-latest",
        "qwen-vl-max-2025-08-13",
        "qwen-vl-plus",
        "qwen-vl-plus-latest",
        "qwen-vl-plus-2025-08-15",
        "qwen-vl-plus-2025-07-10",  # listed with the 32-px models by the zh vision doc only (reference §1.1)
    }
)
_OCR_32_NAMES = frozenset({"qwen-vl-ocr", "qwen-vl-ocr-latest", "qwen-vl-ocr-2025-11-20"})
_FAMILY_28_PREFIXES = ("qvq-", "qwen2.5-vl-", "qwen2-vl-", "qwen-vl-max-", "qwen-vl-plus-", "qwen-vl-ocr-")


def normalize_model(model: str) -> str:
    """Lower-case, drop an ``org/`` prefix (``Qwen/Qwen2.5-VL-7B-Instruct``) and a region suffix (``-us``).

    Why: vLLM-style names and region deployments use the same vision rules as the base model name.
    """
    name = model.strip().lower().rsplit("/", 1)[-1]
    for suffix in REGION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def vision_spec(model: str) -> VisionSpec:
    """The resize constants for ``model`` (reference §1.2).

    Exact names are checked before prefixes, because the newest qwen-vl-max/plus/ocr snapshots use factor
    32 while their older dated siblings use 28. Names we do not recognise (new families such as qwen3.6,
    or a local model) get the Qwen3-VL rules: they are the current generation's, and the estimate is only
    a budget, the server's usage is the truth.
    """
    name = normalize_model(model)
    if name in _MAX_PLUS_32_NAMES:
        return QWEN_VL_MAX_PLUS_32
    if name in _OCR_32_NAMES:
        return QWEN_VL_OCR_32
    if name.startswith(_FAMILY_28_PREFIXES):
        return QWEN25_VL_28
    return QWEN3_VL


def _check_shape(height: int, width: int) -> None:
    """Refuse what the server refuses: a side under 10 px, or an aspect ratio over 200."""
    if height < MIN_SIDE_PX or width < MIN_SIDE_PX:
        raise ImageSizeError(
            f"image is {width}x{height} px (width x height): both sides must be at least {MIN_SIDE_PX} px",
            height=height,
            width=width,
        )
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"image is {width}x{height} px (width x height): its aspect ratio "
            f"{max(height, width) / min(height, width):.1f} exceeds the limit of {MAX_ASPECT_RATIO}",
            height=height,
            width=width,
        )


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The server's resize: returns ``(h_bar, w_bar)``, both multiples of ``factor`` (reference §1.3).

    Same steps and the same rounding as QwenLM's ``qwen_vl_utils.smart_resize`` (Python's ``round``, i.e.
    half-to-even; floor when shrinking, ceil when enlarging; the scale factor is computed from the original
    size), because matching the server to the token matters more here than elegance.
    """
    _check_shape(height, width)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def effective_pixel_bounds(
    spec: VisionSpec,
    *,
    high_resolution: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """The ``(min_pixels, max_pixels)`` the server applies to one image, after request overrides.

    A requested ``max_pixels`` is clamped to the family's limit; with ``vl_high_resolution_images`` the
    fixed budget replaces it (families without that mode ignore the flag). A requested ``min_pixels`` cannot
    go below the family's minimum (its default is documented as the minimum) nor above the maximum.
    """
    upper = spec.max_pixels if max_pixels is None else min(max_pixels, spec.max_pixels_limit)
    if high_resolution and spec.high_res_pixels is not None:
        upper = spec.high_res_pixels
    lower = spec.min_pixels if min_pixels is None else max(min_pixels, spec.min_pixels)
    upper = max(upper, spec.min_pixels)
    return min(lower, upper), upper


def image_tokens(
    width: int,
    height: int,
    model: str,
    *,
    high_resolution: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> int:
    """Tokens billed for one ``width`` x ``height`` image sent to ``model``, including the 2 marker tokens.

    Raises ``ImageSizeError`` for images the server refuses (a side under 10 px, aspect ratio over 200).
    """
    spec = vision_spec(model)
    lower, upper = effective_pixel_bounds(
        spec, high_resolution=high_resolution, min_pixels=min_pixels, max_pixels=max_pixels
    )
    h_bar, w_bar = smart_resize(height, width, factor=spec.factor, min_pixels=lower, max_pixels=upper)
    return h_bar * w_bar // (spec.factor * spec.factor) + VISION_MARKER_TOKENS


def text_tokens(text: str) -> int:
    """Approximate tokens of one text: ``ceil(len(text) / 4)``, 0 for the empty string.

    An approximation (the real tokenizer is not bundled): good enough for budgets and rate limiting.
    """
    return -(-len(text) // CHARS_PER_TOKEN)


def prompt_tokens(
    texts: Sequence[str],
    images: Sequence[tuple[int, int]],
    model: str,
    *,
    high_resolution: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> int:
    """Estimated prompt tokens of a request: each text part plus each ``(width, height)`` image."""
    text_total = sum(text_tokens(text) for text in texts)
    image_total = sum(
        image_tokens(
            width, height, model, high_resolution=high_resolution, min_pixels=min_pixels, max_pixels=max_pixels
        )
        for width, height in images
    )
    return text_total + image_total
