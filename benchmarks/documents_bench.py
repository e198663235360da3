"""Documents: how fast a 200-page PDF archive is rendered and sent, CPU per page, peak memory.

    python benchmarks/documents_bench.py                 # 200 pages, qwen-vl-ocr budget (8,388,608 px), ~2 min
    python benchmarks/documents_bench.py --pages 40      # a quick look

The PDF is 200 A4 pages written by Pillow: four in five are bilevel text pages (a born-digital report, printed
and scanned clean), one in five a grey, grainy scanned page stored as JPEG (the hard case for the encoder).
Two figures:

1. **render only**: ``render_page`` in this process, page after page (what the one render process does):
   pages/s, CPU ms per page, bytes per page, at the OCR budget and at Qwen3-VL's default (2,621,440 px);
2. **end to end**: the whole job (``[documents]``, qwen-vl-ocr's budget) in a fresh process, against the
   simulator in its own process, concurrency 32, no rate limit, with 1 and with 2 render processes: pages/s
   sent, CPU per page of the runner and of the rendering, and the peak RSS of each (``VmHWM``).

Both run on whatever cores the machine has; the README quotes a 2-core box shared with other work.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import simulator_process

from qwenvl_batch import job_from_dict, run_job
from qwenvl_batch.media import ResizePolicy
from qwenvl_batch.media import pages as pages_module
from qwenvl_batch.media.pages import list_pages, render_page

WORDS = "ledger archive invoice harbour customs freight tariff bond clerk manifest consignment quay".split()


def text_page(number: int, dpi: int = 100) -> Image.Image:
    """An A4 page of typed lines (the content differs per page)."""
    width, height = round(595 * dpi / 72), round(842 * dpi / 72)
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    rng = random.Random(number)
    draw.text((80, 60), f"Annual report - page {number}", fill=0)
    for y in range(110, height - 80, 18):
        draw.text((80, y), " ".join(rng.choice(WORDS) for _ in range(12)), fill=0)
    return page


def scanned_page(number: int) -> Image.Image:
    """A text page made grey and grainy, as a flatbed scan."""
    page = text_page(number).rotate(0.6, fillcolor=230).filter(ImageFilter.GaussianBlur(0.6))
    noise = Image.effect_noise(page.size, 18)
    return Image.blend(page, noise, 0.15).convert("RGB")


def write_archive(path: Path, count: int) -> None:
    pages = [scanned_page(n) if n % 5 == 0 else text_page(n).convert("1").convert("RGB") for n in range(1, count + 1)]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=100, quality=75)


def render_only(pdf: Path, model: str, max_pixels: int | None) -> dict[str, float]:
    policy = ResizePolicy.for_model(model, max_pixels=max_pixels)
    targets = list_pages(pdf, "pdf", policy, max_dpi=600.0)
    cpu0, wall0, total = time.process_time(), time.perf_counter(), 0
    for number, target in enumerate(targets, start=1):
        total += len(render_page(str(pdf), "pdf", number, target.width, target.height, 90))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"pages": len(targets), "pages_per_s": len(targets) / wall, "cpu_ms_per_page": 1000 * cpu / len(targets),
            "kb_per_page": total / 1024 / len(targets), "width": targets[0].width, "height": targets[0].height}


def end_to_end_child(folder: Path, pdf: Path, pages: int, processes: int) -> dict[str, float]:
    """The end-to-end run in a fresh process: its peak RSS is the runner's own, not the archive writer's."""
    out = subprocess.run([sys.executable, __file__, "--e2e", str(folder), str(pdf), str(pages), str(processes)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def end_to_end(folder: Path, pdf: Path, pages: int, processes: int = 1) -> dict[str, float]:
    (folder / "m.csv").write_text(f"doc_id,path\nreport,{pdf}\n")
    shutil.rmtree(folder / "out.parquet", ignore_errors=True)
    shutil.rmtree(folder / "out.parquet.state", ignore_errors=True)
    with simulator_process() as sim:
        job = job_from_dict({
            "input": {"path": str(folder / "m.csv"), "id_column": "doc_id", "image_columns": ["path"]},
            "output": {"path": str(folder / "out.parquet")},
            "model": {"name": "qwen-vl-ocr", "base_url": sim.url, "api_key_optional": True,
                      "api_key_env": "NO_KEY_NEEDED", "min_pixels": 3072, "max_pixels": 8_388_608, "max_tokens": 200},
            "prompt": {"user": "Read the page."},
            "documents": {"max_pages": pages, "render_processes": processes},
            "limits": {"concurrency": 32},
            "run": {"progress": "off"},
        }, base_dir=folder)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        summary = run_job(job)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        pids = pages_module._renderer().pids()  # the render processes of this run
        render_cpu = sum(_proc_cpu_s(pid) for pid in pids)
        render_peak = max(_proc_peak_mb(pid) for pid in pids)
        pages_module.shutdown_renderer()
    assert summary.ok == pages, summary
    return {"pages": pages, "pages_per_s": pages / wall, "runner_cpu_ms_per_page": 1000 * cpu / pages,
            "render_cpu_ms_per_page": 1000 * render_cpu / pages, "runner_peak_mb": _proc_peak_mb(None),
            "render_peak_mb": render_peak, "wall_s": wall}


def _proc_cpu_s(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_mb(pid: int | None) -> float:
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--e2e", nargs=4, help=argparse.SUPPRESS)  # the child: FOLDER PDF PAGES PROCESSES
    args = parser.parse_args()
    if args.e2e:
        folder, pdf, pages, processes = args.e2e
        print(json.dumps(end_to_end(Path(folder), Path(pdf), int(pages), int(processes))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pdf = folder / "archive.pdf"
        write_archive(pdf, args.pages)
        print(f"archive: {args.pages} A4 pages, {pdf.stat().st_size / 2**20:.1f} MiB")
        for model, budget in (("qwen-vl-ocr", 8_388_608), ("qwen3-vl-flash", None)):
            figures = render_only(pdf, model, budget)
            print(f"render only, {model} ({figures['width']}x{figures['height']}): "
                  f"{figures['pages_per_s']:.1f} pages/s, {figures['cpu_ms_per_page']:.0f} ms CPU/page, "
                  f"{figures['kb_per_page']:.0f} KB/page")
        pages_module._close_open()  # render_only rendered in this process: close the document it kept open
        for processes in (1, 2):
            figures = end_to_end_child(folder, pdf, args.pages, processes)
            print(f"end to end (qwen-vl-ocr, simulator, concurrency 32, {processes} render process(es)): "
                  f"{figures['pages_per_s']:.1f} pages/s sent, runner {figures['runner_cpu_ms_per_page']:.0f} ms "
                  f"CPU/page + rendering {figures['render_cpu_ms_per_page']:.0f} ms CPU/page; peak RSS runner "
                  f"{figures['runner_peak_mb']:.0f} MB, render process {figures['render_peak_mb']:.0f} MB; "
                  f"wall {figures['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
