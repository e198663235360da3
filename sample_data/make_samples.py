"""Generate the sample photos, document scans and manifests in ``sample_data/``.

Run ``python sample_data/make_samples.py``; it rewrites every file in place. Everything is drawn with Pillow from
fixed seeds (no network, no fonts beyond Pillow's bundled default), so a re-run on the same Pillow version gives
the same bytes, and the committed files stay small (well under 3 MB in all).

Why synthetic: the demo, the tests and the benchmarks need images that look like real inputs (gradients, edges,
sensor noise, slightly rotated paper, readable text) in the sizes and formats users send, without licensing
questions. The scans carry their ground truth: ``expected_text`` in ``documents.*`` is exactly the text drawn,
lines in reading order joined by ``\\n`` (two-column pages: left column, then right), table cells joined by
``" | "``.

Outputs (paths in manifests are relative to the manifest's folder):

* ``images/``: 8 photo-like images, JPEG mostly, one PNG, one WEBP, 320×240 to 1920×1080, one portrait.
* ``scans/``: 4 document scans, A4 at 150 dpi (1240×1754) JPEG, and one at 200 dpi (1654×2339) PNG.
* ``captions.csv`` / ``captions.parquet`` / ``captions.jsonl``: ``id, image, source, hint``.
* ``pairs.jsonl``: ``id, images`` (a list of 2 paths), ``hint``; for multi-image prompts.
* ``documents.csv`` / ``documents.parquet``: ``doc_id, scan, archive, expected_text``.
* Datasets that carry their images, made from small (≤ 320 px) JPEG copies of the photos, so they stay small:

  * ``hf/train-00000-of-00001.parquet``: a Hugging Face ``datasets``-style image Parquet: ``image``
    (``struct<bytes: binary, path: string>``), ``caption``, ``source``, and the ``huggingface`` schema metadata
    naming ``image`` an ``Image`` feature (no id column, like most HF datasets);
  * ``img2dataset/00000.parquet``: img2dataset's ``output_format=parquet``: ``key, url, caption, status,
    error_message, width, height, original_width, original_height, sha256, jpg``, with one failed download
    (``status="failed_to_download"``, ``jpg`` null);
  * ``wds/00000.tar`` and ``wds/00001.tar``: img2dataset's ``output_format=webdataset`` shards of 4 samples
    each, ``{key}.jpg``, ``{key}.txt`` (the caption) and ``{key}.json`` (its metadata).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import sys
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_documents import make_documents  # noqa: E402  (a sibling script, not a package)

SEED = 20240607
Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]


# ================================================================================================ shared helpers


def vertical_gradient(size: tuple[int, int], stops: Sequence[tuple[float, Colour]]) -> Image.Image:
    """A top-to-bottom gradient through colour stops at fractions 0..1 of the height."""
    width, height = size
    column = Image.new("RGB", (1, height))
    pixels = [_interpolate(stops, y / max(1, height - 1)) for y in range(height)]
    column.putdata(pixels)
    return column.resize((width, height), Image.Resampling.NEAREST)


def _interpolate(stops: Sequence[tuple[float, Colour]], t: float) -> Colour:
    """Linear interpolation between the two stops around ``t``."""
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            k = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
            return tuple(round(a + (b - a) * k) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return stops[-1][1]


def shade(colour: Colour, factor: float) -> Colour:
    """Darken (factor < 1) or lighten (factor > 1) a colour."""
    return tuple(max(0, min(255, round(c * factor))) for c in colour)  # type: ignore[return-value]


def jitter(colour: Colour, rng: random.Random, amount: int) -> Colour:
    """A colour varied a little, so repeated shapes are not identical."""
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def add_grain(image: Image.Image, rng: random.Random, amplitude: int) -> Image.Image:
    """Add sensor-like luminance noise of ±amplitude, drawn from ``rng`` (Pillow's own noise is not seedable)."""
    noise = Image.frombytes("L", image.size, rng.randbytes(image.width * image.height))
    noise = noise.point(lambda v: 128 + (v - 128) * amplitude // 128)
    noise = noise.filter(ImageFilter.GaussianBlur(0.5))
    if image.mode == "RGB":
        noise = Image.merge("RGB", (noise, noise, noise))
    return ImageChops.add(image, noise, 1.0, -128)


def ridge(rng: random.Random, width: int, base: float, spread: float, roughness: float) -> list[tuple[float, float]]:
    """A hill or mountain skyline by midpoint displacement: points from x=0 to x=width."""
    points = [base + rng.uniform(-spread, spread), base + rng.uniform(-spread, spread)]
    amplitude = spread
    while len(points) < 129:
        refined: list[float] = []
        for left, right in zip(points, points[1:]):
            refined += [left, (left + right) / 2 + rng.uniform(-amplitude, amplitude)]
        points = refined + [points[-1]]
        amplitude *= roughness
    step = width / (len(points) - 1)
    return [(i * step, y) for i, y in enumerate(points)]


def fill_below(draw: ImageDraw.ImageDraw, line: list[tuple[float, float]], bottom: int, colour: Colour) -> None:
    """Fill the area under a skyline down to ``bottom``."""
    draw.polygon(line + [(line[-1][0], bottom), (0, bottom)], fill=colour)


def soft_disc(size: tuple[int, int], centre: tuple[int, int], radius: int, colour: Colour, glow: int) -> Image.Image:
    """An RGBA layer with a disc and a blurred halo (sun, lamp)."""
    layer = Image.new("RGBA", size, (*colour, 0))
    draw = ImageDraw.Draw(layer)
    x, y = centre
    draw.ellipse((x - radius - glow, y - radius - glow, x + radius + glow, y + radius + glow), fill=(*colour, 90))
    layer = layer.filter(ImageFilter.GaussianBlur(glow / 2))
    ImageDraw.Draw(layer).ellipse((x - radius, y - radius, x + radius, y + radius), fill=(*colour, 255))
    return layer


def clouds(size: tuple[int, int], rng: random.Random, count: int, top: int, bottom: int) -> Image.Image:
    """An RGBA layer of soft clouds between ``top`` and ``bottom``."""
    layer = Image.new("RGBA", size, (255, 255, 255, 0))
    draw = ImageDraw.Draw(layer)
    width = size[0]
    for _ in range(count):
        cx, cy = rng.uniform(0, width), rng.uniform(top, bottom)
        for _ in range(rng.randint(4, 8)):
            rx, ry = rng.uniform(0.03, 0.08) * width, rng.uniform(0.012, 0.03) * width
            ox, oy = rng.uniform(-2, 2) * rx, rng.uniform(-0.5, 0.5) * ry
            draw.ellipse((cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry), fill=(255, 255, 255, 150))
    return layer.filter(ImageFilter.GaussianBlur(width / 200))


def conifer(draw: ImageDraw.ImageDraw, x: float, ground: float, height: float, colour: Colour) -> None:
    """A fir tree: a trunk and three stacked triangles."""
    trunk_w = height * 0.06
    draw.rectangle((x - trunk_w, ground - height * 0.15, x + trunk_w, ground), fill=(70, 45, 25))
    for level in range(3):
        base = ground - height * (0.12 + 0.25 * level)
        half = height * (0.3 - 0.07 * level)
        draw.polygon(
            [(x - half, base), (x + half, base), (x, base - height * 0.45)], fill=shade(colour, 1 + 0.08 * level)
        )


def round_tree(
    draw: ImageDraw.ImageDraw, x: float, ground: float, height: float, colour: Colour, rng: random.Random
) -> None:
    """A deciduous tree: a trunk and a cluster of overlapping leaf blobs."""
    draw.rectangle((x - height * 0.04, ground - height * 0.5, x + height * 0.04, ground), fill=(85, 60, 35))
    for _ in range(7):
        r = height * rng.uniform(0.16, 0.24)
        cx, cy = x + rng.uniform(-0.2, 0.2) * height, ground - height * rng.uniform(0.55, 0.85)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=jitter(colour, rng, 18))


def finish_photo(image: Image.Image, rng: random.Random, blur: float, grain: int) -> Image.Image:
    """Lens softness then sensor grain, so no region is perfectly flat."""
    return add_grain(image.filter(ImageFilter.GaussianBlur(blur)), rng, grain)


# ================================================================================================ photos


def landscape(size: tuple[int, int], rng: random.Random, *, sunset: bool) -> Image.Image:
    """Sky gradient, sun, clouds, three ranges of hills fading with distance, and trees in front."""
    width, height = size
    horizon = int(height * rng.uniform(0.5, 0.6))
    if sunset:
        sky = [(0.0, (40, 50, 110)), (0.55, (230, 120, 80)), (1.0, (255, 200, 120))]
        hills = [(120, 80, 110), (80, 60, 80), (40, 45, 45)]
        sun = (255, 225, 160)
    else:
        sky = [(0.0, (60, 120, 200)), (0.7, (150, 195, 235)), (1.0, (215, 230, 240))]
        hills = [(120, 150, 170), (80, 130, 90), (50, 105, 55)]
        sun = (255, 250, 225)
    image = vertical_gradient((width, horizon + height // 10), sky)
    image = image.crop((0, 0, width, height)) if image.height >= height else _extend(image, size)
    sun_y = int(horizon * (0.8 if sunset else 0.25))
    image = Image.alpha_composite(
        image.convert("RGBA"),
        soft_disc(size, (int(width * rng.uniform(0.2, 0.8)), sun_y), height // 18, sun, height // 10),
    )
    image = Image.alpha_composite(image, clouds(size, rng, 5, int(height * 0.05), int(horizon * 0.6))).convert("RGB")
    draw = ImageDraw.Draw(image)
    for depth, colour in enumerate(hills):
        base = horizon + depth * height * 0.08
        fill_below(draw, ridge(rng, width, base - height * 0.06, height * (0.09 - depth * 0.02), 0.55), height, colour)
    ground = height * 0.82
    for _ in range(rng.randint(7, 12)):
        x, h = rng.uniform(0, width), height * rng.uniform(0.15, 0.35)
        y = ground + rng.uniform(-0.05, 0.12) * height
        if rng.random() < 0.6:
            conifer(draw, x, y, h, jitter((30, 80, 40) if not sunset else (25, 35, 30), rng, 10))
        else:
            round_tree(draw, x, y, h, (50, 110, 45) if not sunset else (35, 45, 35), rng)
    return finish_photo(image, rng, blur=max(0.6, width / 1600), grain=10)


def _extend(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pad a sky image downwards with its last row's colour (the ground covers it anyway)."""
    canvas = Image.new("RGB", size, image.getpixel((0, image.height - 1)))
    canvas.paste(image, (0, 0))
    return canvas


def street(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A street in perspective: buildings with lit and dark windows, road, lane marks, cars, lamp posts."""
    width, height = size
    image = vertical_gradient(size, [(0.0, (120, 160, 210)), (0.5, (200, 215, 230)), (1.0, (200, 215, 230))])
    draw = ImageDraw.Draw(image)
    ground = int(height * 0.68)
    x = -rng.randint(0, 40)
    while x < width:
        bw, bh = rng.randint(width // 9, width // 5), rng.randint(int(height * 0.3), int(height * 0.62))
        building(
            draw,
            (x, ground - bh, x + bw, ground),
            jitter(rng.choice([(170, 120, 90), (200, 190, 170), (130, 130, 140), (185, 160, 120)]), rng, 15),
            rng,
        )
        x += bw + rng.randint(0, 6)
    draw.rectangle((0, ground, width, height), fill=(150, 150, 150))  # sidewalk
    road_top = ground + height * 0.05
    draw.polygon(
        [(width * 0.3, road_top), (width * 0.7, road_top), (width * 1.1, height), (-width * 0.1, height)],
        fill=(70, 72, 78),
    )
    for i in range(6):
        t0, t1 = i / 6, i / 6 + 0.08
        y0, y1 = road_top + (height - road_top) * t0, road_top + (height - road_top) * t1
        w0, w1 = 2 + 10 * t0 * width / 1000, 2 + 10 * t1 * width / 1000
        draw.polygon(
            [(width / 2 - w0, y0), (width / 2 + w0, y0), (width / 2 + w1, y1), (width / 2 - w1, y1)],
            fill=(230, 220, 150),
        )
    for _ in range(rng.randint(2, 4)):
        car(
            draw, rng.uniform(0.05, 0.8) * width, rng.uniform(0.78, 0.92) * height, width * rng.uniform(0.12, 0.18), rng
        )
    for lx in (width * 0.1, width * 0.9):
        draw.rectangle((lx - 3, ground - height * 0.28, lx + 3, ground + 10), fill=(40, 40, 45))
        draw.ellipse((lx - 12, ground - height * 0.3, lx + 12, ground - height * 0.27), fill=(250, 240, 200))
    return finish_photo(image, rng, blur=0.8, grain=9)


def building(draw: ImageDraw.ImageDraw, box: Box, colour: Colour, rng: random.Random) -> None:
    """A facade with a roof line and a grid of windows, some lit."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=colour)
    draw.rectangle((x0, y0, x1, y0 + 6), fill=shade(colour, 0.7))
    cols, rows = max(2, (x1 - x0) // 40), max(3, (y1 - y0) // 55)
    cw, rh = (x1 - x0) / cols, (y1 - y0 - 20) / rows
    for r in range(rows - 1):
        for c in range(cols):
            wx, wy = x0 + c * cw + cw * 0.25, y0 + 20 + r * rh + rh * 0.2
            lit = rng.random() < 0.25
            draw.rectangle((wx, wy, wx + cw * 0.5, wy + rh * 0.55), fill=(240, 210, 130) if lit else (60, 75, 95))
    door_x = x0 + (x1 - x0) * rng.uniform(0.3, 0.6)
    draw.rectangle((door_x, y1 - rh * 0.8, door_x + cw * 0.6, y1), fill=shade(colour, 0.45))


def car(draw: ImageDraw.ImageDraw, x: float, y: float, length: float, rng: random.Random) -> None:
    """A side view of a car: body, cabin with windows, wheels."""
    colour = rng.choice([(180, 30, 35), (30, 60, 140), (220, 220, 225), (30, 30, 30), (200, 160, 40)])
    h = length * 0.3
    draw.rounded_rectangle((x, y - h, x + length, y), radius=h * 0.3, fill=colour)
    draw.rounded_rectangle(
        (x + length * 0.22, y - h * 1.7, x + length * 0.75, y - h * 0.9), radius=h * 0.3, fill=shade(colour, 0.9)
    )
    draw.rectangle((x + length * 0.27, y - h * 1.55, x + length * 0.47, y - h), fill=(150, 180, 200))
    draw.rectangle((x + length * 0.5, y - h * 1.55, x + length * 0.7, y - h), fill=(150, 180, 200))
    for wx in (x + length * 0.2, x + length * 0.8):
        draw.ellipse((wx - h * 0.38, y - h * 0.38, wx + h * 0.38, y + h * 0.38), fill=(20, 20, 20))
        draw.ellipse((wx - h * 0.15, y - h * 0.15, wx + h * 0.15, y + h * 0.15), fill=(160, 160, 160))


def table_scene(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Objects on a wooden table against a wall: a mug, an apple, a book, a plate; with soft shadows."""
    width, height = size
    edge = int(height * 0.42)
    image = vertical_gradient(
        size, [(0.0, (225, 220, 205)), (0.42, (200, 195, 180)), (0.4201, (150, 100, 60)), (1.0, (110, 70, 40))]
    )
    draw = ImageDraw.Draw(image)
    for _ in range(60):  # wood grain
        y = rng.uniform(edge, height)
        draw.line(
            [(0, y), (width, y + rng.uniform(-8, 8))], fill=jitter((120, 78, 45), rng, 12), width=rng.randint(1, 3)
        )
    shadows = Image.new("L", size, 0)
    shadow_draw = ImageDraw.Draw(shadows)
    u = width / 10
    objects = [(2.0, 0.7), (4.6, 0.62), (6.8, 0.72), (8.4, 0.6)]
    rng.shuffle(objects)
    for cx, cy in objects:
        shadow_draw.ellipse(
            (cx * u - u * 0.9, cy * height - u * 0.05, cx * u + u * 1.2, cy * height + u * 0.35), fill=110
        )
    image = Image.composite(
        Image.new("RGB", size, (40, 25, 15)), image, shadows.filter(ImageFilter.GaussianBlur(u / 6))
    )
    draw = ImageDraw.Draw(image)
    for (cx, cy), shape in zip(objects, (mug, apple, book, plate)):
        shape(draw, cx * u, cy * height, u, rng)
    return finish_photo(image, rng, blur=0.9, grain=8)


def mug(draw: ImageDraw.ImageDraw, x: float, y: float, u: float, rng: random.Random) -> None:
    """A cylindrical mug with a handle, sitting at (x, y)."""
    colour = jitter(rng.choice([(40, 90, 160), (200, 60, 50), (235, 235, 230)]), rng, 10)
    w, h = u * 0.55, u * 0.8
    draw.ellipse((x + w * 0.6, y - h * 0.8, x + w * 1.3, y - h * 0.25), outline=colour, width=int(u * 0.08))
    draw.rectangle((x - w, y - h, x + w, y), fill=colour)
    draw.ellipse((x - w, y - h * 0.08, x + w, y + h * 0.08), fill=colour)
    draw.ellipse((x - w, y - h - h * 0.1, x + w, y - h + h * 0.1), fill=(60, 35, 20))


def apple(draw: ImageDraw.ImageDraw, x: float, y: float, u: float, rng: random.Random) -> None:
    """A red or green apple with a stem and a leaf."""
    colour = rng.choice([(190, 30, 30), (120, 170, 50)])
    r = u * 0.4
    draw.ellipse((x - r, y - 2 * r, x + r, y), fill=colour)
    draw.ellipse((x - r * 0.5, y - 1.7 * r, x - r * 0.1, y - 1.3 * r), fill=shade(colour, 1.4))
    draw.line([(x, y - 2 * r), (x + r * 0.1, y - 2.35 * r)], fill=(80, 50, 20), width=max(2, int(u * 0.04)))
    draw.ellipse((x + r * 0.1, y - 2.4 * r, x + r * 0.5, y - 2.2 * r), fill=(60, 130, 40))


def book(draw: ImageDraw.ImageDraw, x: float, y: float, u: float, rng: random.Random) -> None:
    """A closed book lying flat, seen from the front: cover, page block, a title band."""
    colour = jitter(rng.choice([(30, 70, 50), (120, 30, 40), (40, 50, 110)]), rng, 10)
    w, h = u * 0.9, u * 0.25
    draw.rectangle((x - w, y - h, x + w, y), fill=(235, 230, 215))
    draw.rectangle((x - w, y - h - u * 0.06, x + w, y - h), fill=colour)
    draw.rectangle((x - w, y, x + w, y + u * 0.05), fill=colour)
    for i in range(1, 6):
        draw.line([(x - w, y - h * i / 6), (x + w, y - h * i / 6)], fill=(205, 200, 185))


def plate(draw: ImageDraw.ImageDraw, x: float, y: float, u: float, rng: random.Random) -> None:
    """A plate seen at an angle, with a slice of cake on it."""
    w, h = u * 0.8, u * 0.25
    draw.ellipse((x - w, y - h, x + w, y + h * 0.6), fill=(245, 245, 240), outline=(200, 200, 200), width=2)
    draw.ellipse((x - w * 0.7, y - h * 0.7, x + w * 0.7, y + h * 0.3), fill=(235, 235, 230))
    draw.polygon(
        [(x - w * 0.35, y), (x + w * 0.4, y - h * 0.2), (x + w * 0.1, y - h * 1.6), (x - w * 0.35, y - h * 1.3)],
        fill=(215, 170, 110),
    )
    draw.polygon(
        [
            (x - w * 0.35, y - h * 1.3),
            (x + w * 0.1, y - h * 1.6),
            (x + w * 0.4, y - h * 1.5),
            (x - w * 0.05, y - h * 1.25),
        ],
        fill=(120, 60, 40),
    )


def lighthouse(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Portrait: a striped lighthouse on a grassy cliff above the sea, under a cloudy sky."""
    width, height = size
    image = vertical_gradient(
        size, [(0.0, (70, 130, 200)), (0.55, (180, 210, 235)), (0.56, (40, 90, 140)), (1.0, (25, 60, 100))]
    )
    image = Image.alpha_composite(
        image.convert("RGBA"), clouds(size, rng, 6, int(height * 0.05), int(height * 0.4))
    ).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(80):  # wave glints
        x, y = rng.uniform(0, width), rng.uniform(height * 0.57, height)
        draw.line([(x, y), (x + rng.uniform(5, 25), y)], fill=(200, 220, 235), width=1)
    cliff = ridge(rng, width, height * 0.72, height * 0.03, 0.5)
    fill_below(draw, cliff, height, (70, 120, 50))
    tx, base, top = width * 0.55, height * 0.72, height * 0.3
    for i in range(6):
        y0, y1 = base - (base - top) * i / 6, base - (base - top) * (i + 1) / 6
        half0, half1 = width * (0.07 - 0.02 * i / 6), width * (0.07 - 0.02 * (i + 1) / 6)
        colour = (200, 40, 40) if i % 2 == 0 else (240, 240, 235)
        draw.polygon([(tx - half0, y0), (tx + half0, y0), (tx + half1, y1), (tx - half1, y1)], fill=colour)
    draw.rectangle((tx - width * 0.05, top - height * 0.05, tx + width * 0.05, top), fill=(250, 235, 150))
    draw.polygon(
        [
            (tx - width * 0.065, top - height * 0.05),
            (tx + width * 0.065, top - height * 0.05),
            (tx, top - height * 0.1),
        ],
        fill=(40, 40, 40),
    )
    for _ in range(5):
        round_tree(
            draw,
            rng.uniform(0, width * 0.35),
            height * rng.uniform(0.76, 0.9),
            height * rng.uniform(0.1, 0.16),
            (45, 95, 40),
            rng,
        )
    return finish_photo(image, rng, blur=0.8, grain=9)


# ================================================================================================ document scans


@dataclass(frozen=True)
class Scan:
    """A page being typeset: where we are, which fonts, and the text drawn so far (the ground truth)."""

    page: Image.Image
    draw: ImageDraw.ImageDraw
    dpi: int
    lines: list[str]

    @classmethod
    def a4(cls, dpi: int) -> Scan:
        """A blank A4 page at ``dpi``."""
        size = (round(8.27 * dpi), round(11.69 * dpi))
        page = Image.new("L", size, 255)
        return cls(page=page, draw=ImageDraw.Draw(page), dpi=dpi, lines=[])

    def font(self, points: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        """Pillow's bundled font at a point size for this page's dpi."""
        return ImageFont.load_default(size=round(points * self.dpi / 72))

    def text(
        self, xy: tuple[float, float], text: str, points: float = 10.5, *, anchor: str = "la", record: bool = True
    ) -> float:
        """Draw one line, record it, and return the y of the next line."""
        font = self.font(points)
        self.draw.text(xy, text, font=font, fill=25, anchor=anchor)
        if record:
            self.lines.append(text)
        return xy[1] + points * self.dpi / 72 * 1.45

    def paragraph(self, x: float, y: float, width: float, text: str, points: float = 10.5) -> float:
        """Word-wrap ``text`` into ``width`` pixels; return the y after it, with a paragraph gap."""
        font = self.font(points)
        line = ""
        for word in text.split():
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) > width and line:
                y = self.text((x, y), line, points)
                line = word
            else:
                line = candidate
        if line:
            y = self.text((x, y), line, points)
        return y + points * self.dpi / 72 * 0.7

    def expected_text(self) -> str:
        """The ground truth: every recorded line, in drawing (reading) order."""
        return "\n".join(self.lines)


def scanned(page: Image.Image, rng: random.Random, angle: float) -> Image.Image:
    """Make a clean page look scanned: uneven paper, a slight rotation, softness, grain and dust."""
    width, height = page.size
    shading = vertical_gradient(
        (width, height), [(0.0, (246, 246, 246)), (0.5, (240, 240, 240)), (1.0, (233, 233, 233))]
    ).convert("L")
    page = ImageChops.multiply(page, shading)
    page = page.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=238)
    page = page.filter(ImageFilter.GaussianBlur(0.6))
    draw = ImageDraw.Draw(page)
    for _ in range(90):  # dust: light enough not to read as punctuation
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.6, 2.0)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.randint(150, 210))
    return add_grain(page, rng, 7)


def letter(rng: random.Random) -> tuple[Image.Image, str]:
    """A typed business letter: letterhead, addresses, date, body, signature."""
    scan = Scan.a4(150)
    left, right = 150, 1090
    y = scan.text((left, 140), "NORTHWIND GARDEN SUPPLIES LTD", 18)
    y = scan.text((left, y), "14 Orchard Lane, Bristol BS1 4QT - Tel. 0117 496 0321", 9)
    scan.draw.line([(left, y + 5), (right, y + 5)], fill=40, width=3)
    y = scan.text((left, y + 60), "Ms. Helen Carter")
    y = scan.text((left, y), "27 Willow Crescent")
    y = scan.text((left, y), "Bath BA2 6LP")
    y = scan.text((right, y + 40), "12 March 1998", anchor="ra")
    y = scan.text((left, y + 30), "Re: Order No. 58213 - delayed delivery", 11)
    y = scan.text((left, y + 20), "Dear Ms. Carter,") + 10
    body = [
        (
            "Thank you for your letter of 3 March regarding the greenhouse kit and the two cedar planters you "
            "ordered from our spring catalogue."
        ),
        (
            "We are sorry that the delivery did not arrive on the date we promised. Our supplier in Gloucester "
            "had a fire at the warehouse, and all orders for cedar products were held for nine days."
        ),
        (
            "The complete order will now be delivered on Thursday 19 March between 8 am and 1 pm. As an apology "
            "we have refunded the delivery charge of 12.50 pounds to your account."
        ),
        "If this date is not convenient, please call our customer desk and quote the order number above.",
    ]
    for text in body:
        y = scan.paragraph(left, y, right - left, text)
    y = scan.text((left, y + 20), "Yours sincerely,")
    scan.draw.line(
        [(left + 10, y + 60), (left + 60, y + 30), (left + 110, y + 70), (left + 170, y + 35), (left + 230, y + 55)],
        fill=60,
        width=3,
    )
    y = scan.text((left, y + 100), "Robert Hale")
    scan.text((left, y), "Customer Services Manager")
    return scanned(scan.page, rng, angle=rng.uniform(0.4, 0.9)), scan.expected_text()


def receipt(rng: random.Random) -> tuple[Image.Image, str]:
    """A till receipt (a narrow paper strip) scanned on an A4 flatbed."""
    scan = Scan.a4(150)
    x0, x1 = 380, 860
    scan.draw.rectangle((0, 0, *scan.page.size), fill=228)
    scan.draw.rectangle((x0 - 30, 100, x1 + 30, 1500), fill=255)
    centre = (x0 + x1) / 2
    y = scan.text((centre, 150), "CAFE AURORA", 16, anchor="ma")
    y = scan.text((centre, y), "5 Market Square, Leeds", 9, anchor="ma")
    y = scan.text((centre, y), "VAT No. GB 284 5512 07", 9, anchor="ma")
    y = scan.text((x0, y + 30), "2023-11-04 09:42   Till 2   Ref 000731", 9)
    items = [
        ("Flat white", "3.20"),
        ("Cappuccino", "3.10"),
        ("Croissant", "2.40"),
        ("Avocado toast", "7.95"),
        ("Orange juice", "2.85"),
        ("Blueberry muffin", "2.60"),
    ]
    y += 20
    for name, price in items:
        y = money_line(scan, x0, x1, y, name, price)
    scan.draw.line([(x0, y + 5), (x1, y + 5)], fill=60, width=2)
    y += 20
    for name, price in [
        ("Subtotal", "22.10"),
        ("VAT 20% incl.", "3.68"),
        ("TOTAL", "22.10"),
        ("Card (contactless)", "22.10"),
    ]:
        y = money_line(scan, x0, x1, y, name, price)
    y = scan.text((centre, y + 40), "Thank you for visiting!", 10, anchor="ma")
    scan.text((centre, y), "Free wifi: AURORA-GUEST", 9, anchor="ma")
    return scanned(scan.page, rng, angle=rng.uniform(-1.2, -0.5)), scan.expected_text()


def money_line(scan: Scan, x0: float, x1: float, y: float, name: str, price: str, points: float = 10) -> float:
    """An item on the left and its price right-aligned, recorded as one line ``name | price``."""
    scan.text((x0, y), name, points, record=False)
    scan.lines.append(f"{name} | {price}")
    return scan.text((x1, y), price, points, anchor="ra", record=False)


def invoice(rng: random.Random) -> tuple[Image.Image, str]:
    """An invoice with a ruled table of line items and totals."""
    scan = Scan.a4(150)
    left, right = 130, 1110
    y = scan.text((left, 130), "INVOICE", 22)
    y = scan.text((left, y), "Invoice No. 2024-017     Date: 2024-05-21     Due: 2024-06-20", 10)
    y = scan.text((left, y + 30), "Bill to: Harbour Lights Studio, 9 Quay Street, Galway, Ireland")
    y = scan.text((left, y), "From: Pixel & Grain Printing Co., Unit 3, Dock Road, Cork")
    columns = [left, 260, 720, 820, 960, right]
    header = ["Item", "Description", "Qty", "Unit", "Amount"]
    rows = [
        ["A-101", "Poster print A2, matte", "20", "6.50", "130.00"],
        ["A-204", "Canvas print 60x40 cm", "3", "48.00", "144.00"],
        ["B-017", "Business cards, 500 pcs", "2", "29.90", "59.80"],
        ["C-330", "Photo book, 40 pages", "5", "34.00", "170.00"],
        ["D-002", "Design proof and colour check", "1", "45.00", "45.00"],
        ["S-900", "Courier delivery", "1", "15.00", "15.00"],
    ]
    y = table(scan, columns, y + 40, header, rows)
    for label, amount in [("Subtotal", "563.80"), ("VAT 23%", "129.67"), ("Total due (EUR)", "693.47")]:
        scan.text((columns[4] - 20, y), label, 10.5, anchor="ra", record=False)
        scan.lines.append(f"{label} | {amount}")
        y = scan.text((right - 10, y), amount, 10.5, anchor="ra", record=False)
    y = scan.text(
        (left, y + 50), "Payment by bank transfer to IBAN IE29 AIBK 9311 5212 3456 78, reference 2024-017.", 9
    )
    scan.text((left, y), "Thank you for your business.", 9)
    return scanned(scan.page, rng, angle=rng.uniform(0.3, 0.7)), scan.expected_text()


def table(scan: Scan, columns: list[int], top: float, header: list[str], rows: list[list[str]]) -> float:
    """A ruled table; numeric columns right-aligned; each row recorded as cells joined by ``" | "``."""
    row_h = 44
    lines = [header] + rows
    for index, cells in enumerate(lines):
        y = top + index * row_h
        if index == 0:
            scan.draw.rectangle((columns[0], y, columns[-1], y + row_h), fill=225)
        for col, cell in enumerate(cells):
            numeric = col >= 2
            x = columns[col + 1] - 10 if numeric else columns[col] + 10
            scan.text((x, y + 11), cell, 10, anchor="ra" if numeric else "la", record=False)
        scan.lines.append(" | ".join(cells))
    bottom = top + len(lines) * row_h
    for i in range(len(lines) + 1):
        scan.draw.line([(columns[0], top + i * row_h), (columns[-1], top + i * row_h)], fill=50, width=2)
    for x in columns:
        scan.draw.line([(x, top), (x, bottom)], fill=50, width=2)
    return bottom + 30


def two_column(rng: random.Random) -> tuple[Image.Image, str]:
    """A newsletter page at 200 dpi: a title across the page, then two columns of text, and a page number."""
    scan = Scan.a4(200)
    width = scan.page.width
    margin, gutter = 200, 80
    col_w = (width - 2 * margin - gutter) / 2
    y = scan.text((margin, 190), "RIVERSIDE COMMUNITY NEWS", 20)
    y = scan.text((margin, y), "Issue 42  -  Autumn 2022", 10)
    scan.draw.line([(margin, y + 10), (width - margin, y + 10)], fill=40, width=3)
    top = y + 50
    left_text = [
        "Library reopens after repairs",
        (
            "The Riverside library reopened on 3 October after six months of roof repairs. The children's corner "
            "has new shelves and a reading tent, and the opening hours are now 9 am to 7 pm on weekdays."
        ),
        (
            "Volunteers are needed for the Saturday homework club. Anyone who can help for two hours a month "
            "should speak to Ana at the front desk."
        ),
        "Allotment results",
        (
            "This year's largest pumpkin weighed 61 kg and was grown by the Okafor family on plot 17. The prize "
            "for the best kept plot went to Mr. Lindqvist for the third year running."
        ),
    ]
    right_text = [
        "New bus timetable",
        (
            "From 1 November the number 12 bus will run every 15 minutes between the station and the hospital. "
            "The last bus leaves the station at 23:40 on Fridays and Saturdays."
        ),
        "Clean-up day",
        (
            "Join us on Sunday 13 November at 10 am by the old boathouse. Gloves, bags and tea are provided. Last"
            " spring, 64 people collected 212 bags of litter from the river banks."
        ),
        (
            "Contact the newsletter team at news@riverside.example before 1 December to include your event in the"
            " winter issue."
        ),
    ]
    for texts, x in ((left_text, margin), (right_text, margin + col_w + gutter)):
        y = top
        for text in texts:
            is_heading = len(text) < 40
            y = scan.text((x, y), text, 12) + 6 if is_heading else scan.paragraph(x, y, col_w, text)
    scan.text((width / 2, scan.page.height - 170), "Page 2", 9, anchor="ma")
    return scanned(scan.page, rng, angle=rng.uniform(-0.8, -0.3)), scan.expected_text()


# ================================================================================================ catalogue + output


@dataclass(frozen=True)
class Photo:
    """One sample photo: where it goes, how it is drawn, how it is saved, and its manifest fields."""

    id: str
    file: str
    size: tuple[int, int]
    draw: Callable[[tuple[int, int], random.Random], Image.Image]
    source: str
    hint: str | None
    save: dict[str, object]


PHOTOS = [
    Photo(
        "img-0001",
        "images/hills_morning.jpg",
        (1920, 1080),
        lambda s, r: landscape(s, r, sunset=False),
        "holiday-2023",
        "Mention the time of day.",
        {"quality": 82},
    ),
    Photo(
        "img-0002",
        "images/sunset_valley.jpg",
        (1280, 720),
        lambda s, r: landscape(s, r, sunset=True),
        "holiday-2023",
        None,
        {"quality": 85},
    ),
    Photo("img-0003", "images/main_street.jpg", (1024, 768), street, "street", "Count the cars.", {"quality": 85}),
    Photo("img-0004", "images/side_street.png", (480, 360), street, "street", None, {"optimize": True}),
    Photo(
        "img-0005",
        "images/breakfast_table.jpg",
        (1024, 683),
        table_scene,
        "product-shots",
        "List the objects on the table.",
        {"quality": 85},
    ),
    Photo(
        "img-0006",
        "images/cafe_table.webp",
        (640, 480),
        table_scene,
        "product-shots",
        None,
        {"quality": 80, "method": 4},
    ),
    Photo(
        "img-0007",
        "images/lighthouse_portrait.jpg",
        (768, 1024),
        lighthouse,
        "holiday-2023",
        "Describe the building.",
        {"quality": 85},
    ),
    Photo(
        "img-0008",
        "images/meadow_small.jpg",
        (320, 240),
        lambda s, r: landscape(s, r, sunset=False),
        "thumbnails",
        None,
        {"quality": 88},
    ),
]

DOCUMENTS = [
    ("doc-0001", "scans/letter_1998.jpg", letter, "correspondence-1998"),
    ("doc-0002", "scans/receipt_cafe_aurora.jpg", receipt, "expenses-2023"),
    ("doc-0003", "scans/invoice_2024_017.jpg", invoice, "invoices-2024"),
    ("doc-0004", "scans/newsletter_page2.png", two_column, "newsletters"),
]

PAIRS = [
    ("pair-0001", ["images/hills_morning.jpg", "images/sunset_valley.jpg"], "Compare the light and the weather."),
    ("pair-0002", ["images/main_street.jpg", "images/side_street.png"], None),
    ("pair-0003", ["images/breakfast_table.jpg", "images/cafe_table.webp"], "Which objects appear in both images?"),
]


def make_photos() -> list[dict[str, str | None]]:
    """Draw and save every photo; return the caption manifest rows."""
    rows: list[dict[str, str | None]] = []
    for index, photo in enumerate(PHOTOS):
        image = photo.draw(photo.size, random.Random(SEED + index))
        save_image(image, HERE / photo.file, photo.save)
        rows.append({"id": photo.id, "image": photo.file, "source": photo.source, "hint": photo.hint})
    return rows


def make_scans() -> list[dict[str, str | None]]:
    """Typeset, 'scan' and save every document; return the document manifest rows with their ground truth."""
    rows: list[dict[str, str | None]] = []
    for index, (doc_id, file, make, archive) in enumerate(DOCUMENTS):
        image, expected = make(random.Random(SEED + 100 + index))
        if file.endswith(".png"):
            image = sixteen_greys(image)
        save_image(image, HERE / file, {"quality": 80} if file.endswith(".jpg") else {"optimize": True})
        rows.append({"doc_id": doc_id, "scan": file, "archive": archive, "expected_text": expected})
    return rows


def sixteen_greys(image: Image.Image) -> Image.Image:
    """Quantise a greyscale scan to 16 levels, as a scanner's document mode does; keeps the PNG about 0.6 MB."""
    return image.point(lambda v: min(255, v // 16 * 16 + 8))


def save_image(image: Image.Image, path: Path, params: dict[str, object]) -> None:
    """Save in the format the extension names, without metadata that would change between runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **params)  # type: ignore[arg-type]


def write_manifests(name: str, rows: list[dict[str, str | None]], formats: Sequence[str]) -> None:
    """Write the same rows as CSV, Parquet and/or JSONL; every column is a nullable string."""
    columns = list(rows[0])
    if "csv" in formats:
        with (HERE / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    if "parquet" in formats:
        schema = pa.schema([(column, pa.string()) for column in columns])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), HERE / f"{name}.parquet")
    if "jsonl" in formats:
        write_jsonl(HERE / f"{name}.jsonl", rows)


def write_jsonl(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """One JSON object per line, UTF-8."""
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# ================================================================================================ datasets

DATASET_SIDE = 320
"""Long side of the photo copies the dataset samples carry (small files; still several image-token sizes)."""


def small_jpeg(path: Path) -> tuple[bytes, int, int, int, int]:
    """A photo shrunk to DATASET_SIDE px on its long side, as JPEG bytes: (bytes, w, h, original w, original h)."""
    with Image.open(path) as image:
        original = image.size
        copy = image.convert("RGB")
        copy.thumbnail((DATASET_SIDE, DATASET_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=80)
    return buffer.getvalue(), copy.width, copy.height, original[0], original[1]


def dataset_records() -> list[dict[str, object]]:
    """One img2dataset-style record per photo (key = shard·10^4 + index, zero-padded as img2dataset does)."""
    records: list[dict[str, object]] = []
    for index, photo in enumerate(PHOTOS):
        data, width, height, original_w, original_h = small_jpeg(HERE / photo.file)
        shard, position = divmod(index, 4)
        records.append({
            "key": f"{shard * 10_000 + position:09d}", "url": f"https://example.com/{Path(photo.file).name}",
            "caption": photo.hint or f"A photo from {photo.source}.", "status": "success", "error_message": None,
            "width": width, "height": height, "original_width": original_w, "original_height": original_h,
            "sha256": hashlib.sha256(data).hexdigest(), "jpg": data, "name": Path(photo.file).stem + ".jpg",
            "source": photo.source,
        })
    return records


def write_hf_parquet(records: Sequence[Mapping[str, object]]) -> None:
    """What ``datasets.Dataset.to_parquet`` writes for an ``Image`` feature, without depending on ``datasets``."""
    features = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"},
                "source": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("caption", pa.string()),
         ("source", pa.string())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    rows = [{"image": {"bytes": r["jpg"], "path": r["name"]}, "caption": r["caption"], "source": r["source"]}
            for r in records]
    (HERE / "hf").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), HERE / "hf" / "train-00000-of-00001.parquet")


IMG2DATASET_COLUMNS = ("key", "url", "caption", "status", "error_message", "width", "height", "original_width",
                       "original_height", "sha256", "jpg")


def write_img2dataset_parquet(records: Sequence[Mapping[str, object]]) -> None:
    """img2dataset's Parquet output, plus one row whose download failed (null bytes, as img2dataset leaves it)."""
    failed = {"key": "000000008", "url": "https://example.com/gone.jpg", "caption": "A photo that is gone.",
              "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"}
    rows = [{c: r.get(c) for c in IMG2DATASET_COLUMNS} for r in records] + [{c: failed.get(c) for c in
                                                                           IMG2DATASET_COLUMNS}]
    schema = pa.schema([(c, pa.binary() if c == "jpg" else pa.int64() if "width" in c or "height" in c
                         else pa.string()) for c in IMG2DATASET_COLUMNS])
    (HERE / "img2dataset").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), HERE / "img2dataset" / "00000.parquet")


def write_webdataset_shards(records: Sequence[Mapping[str, object]]) -> None:
    """Two shards of 4 samples, members in img2dataset's order (.jpg, .json, .txt), fixed metadata for stable bytes."""
    (HERE / "wds").mkdir(exist_ok=True)
    for shard in range(2):
        with tarfile.open(HERE / "wds" / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for record in records[shard * 4: shard * 4 + 4]:
                meta = {c: record[c] for c in IMG2DATASET_COLUMNS if c != "jpg"}
                members = [("jpg", record["jpg"]), ("json", json.dumps(meta).encode()),
                           ("txt", str(record["caption"]).encode())]
                for ext, data in members:
                    info = tarfile.TarInfo(f"{record['key']}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # type: ignore[arg-type]
                    archive.addfile(info, io.BytesIO(data))  # type: ignore[arg-type]


def make_datasets() -> None:
    """The HF, img2dataset and WebDataset samples, from the photos already on disk."""
    records = dataset_records()
    write_hf_parquet(records)
    write_img2dataset_parquet(records)
    write_webdataset_shards(records)


def main() -> None:
    """Regenerate everything and print a one-line summary per file (this is a script, not library code)."""
    captions = make_photos()
    documents = make_scans()
    write_manifests("captions", captions, ("csv", "parquet", "jsonl"))
    write_manifests("documents", documents, ("csv", "parquet"))
    write_jsonl(HERE / "pairs.jsonl", [{"id": i, "images": images, "hint": hint} for i, images, hint in PAIRS])
    make_datasets()
    make_documents(HERE)  # multi-page PDFs and a TIFF for jobs/ocr-pdf.toml (make_documents.py)
    total = 0
    for path in sorted(p for p in HERE.rglob("*") if p.is_file() and p.suffix != ".py" and "out" not in p.parts):
        total += path.stat().st_size
        detail = ""
        if path.suffix in (".jpg", ".png", ".webp"):
            with Image.open(path) as image:
                detail = f"{image.format} {image.width}×{image.height}"
        print(f"{path.relative_to(HERE)}  {path.stat().st_size / 1024:.0f} KiB  {detail}")
    print(f"total {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
