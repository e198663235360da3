"""Tests for qwenvl_batch.tokens: the server's smart-resize rule and the token counts it implies."""

from __future__ import annotations

import pytest

from qwenvl_batch.tokens import (
    QWEN3_VL,
    QWEN25_VL_28,
    QWEN_VL_MAX_PLUS_32,
    QWEN_VL_OCR_32,
    ImageSizeError,
    VisionSpec,
    image_tokens,
    prompt_tokens,
    smart_resize,
    text_tokens,
    vision_spec,
)


@pytest.mark.parametrize(
    ("side", "high_resolution", "expected"),
    [
        (64, False, 66),
        (512, False, 258),
        (1024, False, 1026),
        (2048, False, 2502),
        (4096, False, 2502),
        (2048, True, 4098),
        (4096, True, 16386),
    ],
)
def test_measured_qwen3_vl_plus_square_images(side: int, high_resolution: bool, expected: int) -> None:
    """Square images on qwen3-vl-plus cost exactly the image tokens measured against the real API (§1.4)."""
    assert image_tokens(side, side, "qwen3-vl-plus", high_resolution=high_resolution) == expected


@pytest.mark.parametrize(
    ("width", "height", "model", "kwargs", "expected"),
    [
        # factor 28 (QVQ / Qwen2.5-VL): 1000 rounds to 1008, over the cap, shrinks and floors to 980 = 35*28.
        (1000, 1000, "qvq-max", {}, 35 * 35 + 2),
        # factor 28 rounding within bounds: 300 -> 308 (11*28), 500 -> 504 (18*28).
        (500, 300, "qvq-max-latest", {}, 11 * 18 + 2),
        # factor 28 enlargement: 20 px rounds to 28, 784 < 3136, scaled x2.8 to 56 = 2*28.
        (20, 20, "qwen2.5-vl-7b-instruct", {}, 2 * 2 + 2),
        # OCR budget: 4000x3000 -> over 8,388,608, shrinks to 3328x2496 = 104*78 tokens.
        (4000, 3000, "qwen-vl-ocr", {}, 104 * 78 + 2),
        # OCR has no high-resolution mode: the flag changes nothing.
        (4000, 3000, "qwen-vl-ocr-2025-11-20", {"high_resolution": True}, 104 * 78 + 2),
        # OCR minimum is 3072 pixels, so 64x64 (4096) is not enlarged, unlike on qwen3-vl-plus.
        (64, 64, "qwen-vl-ocr-latest", {}, 4 + 2),
        # qwen-vl-max (2025-08-13 generation): factor 32, cap 1,310,720 -> 2048 shrinks to 1120 = 35*32.
        (2048, 2048, "qwen-vl-max", {}, 35 * 35 + 2),
        # qwen-vl-max minimum is 4096 pixels: a 64x64 image stays 2x2 patches.
        (64, 64, "qwen-vl-plus-2025-08-15", {}, 4 + 2),
        # an older dated qwen-vl-max snapshot is a 28-px model.
        (1000, 1000, "qwen-vl-max-2025-04-08", {}, 35 * 35 + 2),
        # per-request max_pixels lowers the cap: 2048 -> 1024.
        (2048, 2048, "qwen3-vl-plus", {"max_pixels": 1_048_576}, 1024 + 2),
        # per-request max_pixels is clamped to the family limit 16,777,216: 8192 -> 4096, not 65,536 tokens.
        (8192, 8192, "qwen3-vl-plus", {"max_pixels": 100_000_000}, 16384 + 2),
        # high resolution replaces a requested max_pixels with the fixed budget.
        (4096, 4096, "qwen3-vl-plus", {"high_resolution": True, "max_pixels": 1_048_576}, 16384 + 2),
        # per-request min_pixels raises the floor: 64 -> 512.
        (64, 64, "qwen3-vl-flash", {"min_pixels": 262_144}, 256 + 2),
        # per-request min_pixels cannot go below the family minimum.
        (64, 64, "qwen3-vl-flash", {"min_pixels": 1}, 64 + 2),
        # Python's round() is half-to-even, as in qwen_vl_utils: 80 / 32 = 2.5 rounds to 2, not 3.
        (80, 80, "qwen-vl-ocr", {}, 2 * 2 + 2),
        # region suffix and org prefix are ignored.
        (2048, 2048, "qwen3-vl-plus-us", {}, 2502),
        (1000, 1000, "Qwen/Qwen2.5-VL-7B-Instruct", {}, 35 * 35 + 2),
        # unknown names follow the Qwen3-VL rules.
        (2048, 2048, "my-local-vlm", {}, 2502),
    ],
)
def test_image_tokens_table(width: int, height: int, model: str, kwargs: dict[str, object], expected: int) -> None:
    """Image tokens follow each model family's factor, bounds and request overrides."""
    assert image_tokens(width, height, model, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("qwen3-vl-plus", QWEN3_VL),
        ("qwen3-vl-flash-2025-10-15", QWEN3_VL),
        ("qwen3-vl-8b-thinking", QWEN3_VL),
        ("qwen3.5-plus", QWEN3_VL),
        ("qwen-vl-max-latest", QWEN_VL_MAX_PLUS_32),
        ("qwen-vl-plus", QWEN_VL_MAX_PLUS_32),
        ("qwen-vl-ocr", QWEN_VL_OCR_32),
        ("qwen-vl-ocr-2024-10-28", QWEN25_VL_28),
        ("qvq-plus", QWEN25_VL_28),
        ("qwen2-vl-72b-instruct", QWEN25_VL_28),
        ("QWEN3-VL-PLUS-US", QWEN3_VL),
    ],
)
def test_vision_spec_by_model_name(model: str, expected: VisionSpec) -> None:
    """Each model name maps to the family table of the reference (§1.2)."""
    assert vision_spec(model) == expected


@pytest.mark.parametrize(("width", "height"), [(10, 10), (200, 10), (2000, 10), (10, 2000)])
def test_smallest_and_most_elongated_accepted_sizes(width: int, height: int) -> None:
    """10 px sides and a 200:1 aspect ratio are accepted."""
    assert image_tokens(width, height, "qwen3-vl-plus") >= 66


@pytest.mark.parametrize(
    ("width", "height", "needle"),
    [(9, 9, "at least 10 px"), (9, 100, "at least 10 px"), (2010, 10, "limit of 200"), (10, 2010, "limit of 200")],
)
def test_refused_sizes_raise_with_the_limit(width: int, height: int, needle: str) -> None:
    """A side under 10 px or an aspect ratio over 200 raises ImageSizeError naming the limit."""
    with pytest.raises(ImageSizeError, match=needle) as info:
        image_tokens(width, height, "qwen3-vl-plus")
    assert isinstance(info.value, ValueError)
    assert (info.value.width, info.value.height) == (width, height)


def test_smart_resize_returns_multiples_of_factor() -> None:
    """smart_resize returns (height, width) in that order, each a multiple of the factor."""
    assert smart_resize(300, 500, factor=28, min_pixels=3_136, max_pixels=1_003_520) == (308, 504)


@pytest.mark.parametrize(("text", "expected"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 40, 10)])
def test_text_tokens_is_ceil_of_quarter_length(text: str, expected: int) -> None:
    """Text tokens are ceil(len / 4), and 0 for an empty string."""
    assert text_tokens(text) == expected


def test_prompt_tokens_sums_texts_and_images() -> None:
    """prompt_tokens adds every text's and every (width, height) image's tokens."""
    total = prompt_tokens(["abcdefgh", "xyz"], [(64, 64), (512, 512)], "qwen3-vl-plus")
    assert total == 2 + 1 + 66 + 258


def test_prompt_tokens_applies_options_to_every_image() -> None:
    """The high-resolution flag passed to prompt_tokens applies to each image."""
    total = prompt_tokens([], [(2048, 2048), (4096, 4096)], "qwen3-vl-plus", high_resolution=True)
    assert total == 4098 + 16386
