"""What client-side resizing saves: bytes sent and CPU time per image, for 20-30 megapixel scans.

Generates, in a temporary folder, a few synthetic scans (text lines on paper, with scanner noise or clean,
colour and greyscale, JPEG and PNG, one with an EXIF rotation), then for each model prints the original file
size, the bytes sent (the data URL), their ratio, the milliseconds ``prepare_image`` takes with and without a
:class:`ResizePolicy`, and the image tokens computed from the original and from the sent size (they must be
equal). Sizes are data-URL characters, what the request body carries and the provider's 10 MB limit counts:
"as is" is the file base64-encoded, as it would be sent without a policy. Not a test: timings depend on the machine.

    python benchmarks/resize_bench.py [--repeat 3] [--models qwen3-vl-flash qwen-vl-ocr]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qwenvl_batch import tokens
from qwenvl_batch.errors import InputRowError
from qwenvl_batch.media import (
    ImageRef,
    PreparedImage,
    ResizePolicy,
    parse_image_cell,
    prepare_image,
)

WORDS = ("invoice", "total", "amount", "due", "qwen", "batch", "2024-05-01", "EUR 1,234.56", "page", "ref.")


@dataclass(frozen=True)
class Scan:
    """One synthetic input file: how to draw it and how to store it."""

    name: str
    size: tuple[int, int]
    colour: bool
    noise: float
    fmt: str
    params: dict[str, object]
    orientation: int = 1


SCANS = (
    Scan("colour_noisy_24mp.jpg", (6000, 4000), True, 12.0, "JPEG", {"quality": 95}),
    Scan("grey_noisy_portrait_24mp.jpg", (4000, 6000), False, 10.0, "JPEG", {"quality": 90}),
    Scan("phone_rotated_20mp.jpg", (5472, 3648), True, 6.0, "JPEG", {"quality": 92}, orientation=6),
    Scan("colour_noisy_24mp.png", (6000, 4000), True, 12.0, "PNG", {"compress_level": 1}),
    Scan("grey_clean_27mp.png", (4500, 6000), False, 0.0, "PNG", {"compress_level": 6}),
)


def draw_scan(scan: Scan, seed: int) -> Image.Image:
    """Lines of text on off-white paper, plus Gaussian sensor noise; a faint colour cast when in colour."""
    rng = np.random.default_rng(seed)
    width, height = scan.size
    page = Image.new("L", scan.size, 245)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=max(12, height // 90))
    for y in range(height // 20, height - height // 20, max(1, height // 70)):
        draw.text((width // 15, y), " ".join(rng.choice(WORDS, size=12)), fill=20, font=font)
    grey = np.asarray(page, dtype=np.float32)
    if scan.noise:
        grey = grey + rng.normal(0.0, scan.noise, grey.shape).astype(np.float32)
    if not scan.colour:
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    rgb = np.stack([grey, grey - 6.0, grey - 14.0], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def write_scan(scan: Scan, folder: Path, seed: int) -> Path:
    """Draw and save one scan; a rotated one is stored sideways with the EXIF tag that turns it upright."""
    image = draw_scan(scan, seed)
    params = dict(scan.params)
    if scan.orientation != 1:
        image = image.transpose(Image.Transpose.ROTATE_90)  # stored as a phone held sideways stores it
        exif = Image.Exif()
        exif[0x0112] = scan.orientation
        params["exif"] = exif.tobytes()
    path = folder / scan.name
    image.save(path, scan.fmt, **params)
    return path


def median_ms(call: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def without_resize(ref: ImageRef, repeat: int) -> str:
    """Milliseconds of today's path, or why the file is refused without resizing."""
    try:
        prepare_image(ref)
    except InputRowError as exc:
        return f"refused ({exc.code})"
    return f"{median_ms(lambda: prepare_image(ref), repeat):.0f}"


def row(ref: ImageRef, path: Path, model: str, repeat: int) -> str:
    """One line of the table for one file and one model."""
    policy = ResizePolicy.for_model(model)
    prepared: PreparedImage = prepare_image(ref, policy)
    with_ms = median_ms(lambda: prepare_image(ref, policy), repeat)
    with Image.open(path) as im:  # probe_image would refuse the files over 10 MB: it knows no policy
        stored, mime = im.size, Image.MIME[im.format or "PNG"]
    original = prepared.original_size or (prepared.width or 0, prepared.height or 0)
    tokens_original = tokens.image_tokens(*stored, model)
    tokens_sent = tokens.image_tokens(prepared.width or 0, prepared.height or 0, model)
    as_is = len(f"data:{mime};base64,") + 4 * math.ceil(path.stat().st_size / 3)
    return (
        f"{path.name:30} {model:15} {as_is:>12,} {prepared.sent_bytes:>12,} "
        f"{as_is / prepared.sent_bytes:>6.1f}x {with_ms:>9.0f} {without_resize(ref, repeat):>17} "
        f"{original[0]:>5}x{original[1]:<5} {prepared.width:>5}x{prepared.height:<5} {prepared.mime:10} "
        f"{tokens_original:>6} {tokens_sent:>6} {'ok' if tokens_original == tokens_sent else 'DIFFERENT'}"
    )


def threaded_throughput(refs: list[ImageRef], policy: ResizePolicy, threads: int) -> float:
    """Images per second through ``threads`` worker threads (Pillow releases the GIL while it decodes/resizes)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda ref: prepare_image(ref, policy), refs))
    return len(refs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--models", nargs="+", default=["qwen3-vl-flash", "qwen-vl-ocr"])
    args = parser.parse_args()
    logging.getLogger("qwenvl_batch").setLevel(logging.ERROR)  # the "above 8K" notes are expected here
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        paths = [write_scan(scan, folder, seed) for seed, scan in enumerate(SCANS)]
        print(f"setup: {len(paths)} scans in {time.perf_counter() - started:.1f} s\n")
        print(
            f"{'file':30} {'model':15} {'as is':>12} {'sent':>12} {'ratio':>7} {'ms resize':>9} "
            f"{'ms no resize':>17} {'original':>11} {'sent':>11} {'mime':10} {'tok in':>6} {'tok out':>6}"
        )
        refs = [parse_image_cell(str(path), column="image", base_dir=folder)[0] for path in paths]
        for model in args.models:
            for ref, path in zip(refs, paths):
                print(row(ref, path, model, args.repeat))
        policy = ResizePolicy.for_model(args.models[0])
        for threads in (1, 2):
            rate = threaded_throughput(refs * 2, policy, threads)
            print(f"\n{threads} thread(s), {args.models[0]}: {rate:.2f} images/s with resizing")


if __name__ == "__main__":
    main()
