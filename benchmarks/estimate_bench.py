"""How fast ``estimate_job`` goes over a large manifest of local images (header reads only, nothing sent).

Builds, in a temporary folder, ~300 JPEG/PNG images of varied sizes and a CSV manifest of 100,000 rows that
reference them (so the probe cache is exercised the way real manifests exercise it: many rows, fewer files),
then times one estimate and prints rows per second. Not a test: timings depend on the machine.

    python benchmarks/estimate_bench.py [--rows 100000] [--images 300]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from PIL import Image

from qwenvl_batch.config import job_from_dict
from qwenvl_batch.estimate import estimate_job, render_estimate


def make_images(folder: Path, count: int) -> list[str]:
    """``count`` small files with varied dimensions (the token count depends on them, not on the pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        size = (200 + (i * 37) % 1800, 150 + (i * 53) % 1200)
        fmt, suffix = ("PNG", "png") if i % 5 == 0 else ("JPEG", "jpg")
        name = f"img{i:04d}.{suffix}"
        Image.new("RGB", size, (i % 255, 80, 160)).save(folder / name, fmt)
        names.append(f"images/{name}")
    return names


def make_manifest(path: Path, images: list[str], rows: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "hint"])
        for i in range(rows):
            writer.writerow([f"row-{i:07d}", images[(i * 7919) % len(images)], "Count the cars." if i % 3 else ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        images = make_images(root / "images", args.images)
        make_manifest(root / "manifest.csv", images, args.rows)
        print(f"setup: {args.images} images, {args.rows:,} rows in {time.perf_counter() - started:.1f} s")
        job = job_from_dict(
            {
                "input": {"path": "manifest.csv"},
                "output": {"path": "out"},
                "model": {"name": "qwen3-vl-flash", "max_tokens": 200},
                "prompt": {"system": "You write short captions.", "user": "Describe this image. {hint}"},
                "limits": {"concurrency": 16, "requests_per_minute": 1200, "tokens_per_minute": 1_000_000},
            },
            base_dir=root,
        )
        started = time.perf_counter()
        estimate = estimate_job(job)
        elapsed = time.perf_counter() - started
        print(render_estimate(estimate, "text"))
        print(f"\nestimate: {estimate.rows:,} rows in {elapsed:.2f} s = {estimate.rows / elapsed:,.0f} rows/s")


if __name__ == "__main__":
    main()
