"""Sample documents for the OCR-over-PDFs job (``jobs/ocr-pdf.toml``): small multi-page PDFs and a multi-page TIFF.

Written with Pillow's PDF and TIFF writers (no extra dependency), kept small (greyscale pages at 72-100 dpi):

* ``pdfs/report_a4.pdf``: 3 A4 portrait pages of typed text, each with its page number in the heading;
* ``pdfs/mixed_sizes.pdf``: US Letter portrait, A4 landscape, A5 portrait (three different page sizes);
* ``pdfs/scanned_letter.pdf``: one page that is a scanned image (grain, tilt) of the sample letter;
* ``pdfs/fax_pages.tiff``: a 3-frame TIFF; frame 2 carries EXIF orientation 6 (stored sideways, shown upright).

Also ``pdf_documents.csv`` (``doc_id, path, archive``) naming them. Fresh ``Image`` objects per format: Pillow
raises ``TypeError`` when the same images are saved as PDF and then as TIFF.
"""

from __future__ import annotations

import csv
import random
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
WORDS = ("ledger archive invoice harbour customs freight tariff bond clerk manifest consignment quay warehouse "
         "register receipt parcel steamer cargo wharf duty").split()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def text_page(size_pt: tuple[float, float], dpi: int, title: str, seed: int) -> Image.Image:
    """A greyscale page of ``size_pt`` points at ``dpi``: a heading and a few paragraphs of seeded words."""
    width, height = round(size_pt[0] * dpi / 72), round(size_pt[1] * dpi / 72)
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    margin = width // 10
    draw.text((margin, margin), title, font=_font(max(12, dpi // 4)), fill=0)
    rng = random.Random(seed)
    y = margin + dpi // 2
    body = _font(max(9, dpi // 7))
    chars = max(20, (width - 2 * margin) // max(5, dpi // 14))
    while y < height - margin - dpi // 5:
        paragraph = " ".join(rng.choice(WORDS) for _ in range(40))
        for line in textwrap.wrap(paragraph, chars):
            if y >= height - margin - dpi // 5:
                break
            draw.text((margin, y), line, font=body, fill=30)
            y += dpi // 6
        y += dpi // 6
    return page


def scanned_page(seed: int) -> Image.Image:
    """A text page made to look scanned: tilted, grey paper, grain (an image-only PDF page)."""
    page = text_page((595, 842), 100, "Scanned letter, 12 March 1998", seed).rotate(0.7, fillcolor=235)
    rng = random.Random(seed)
    pixels = page.load()
    assert pixels is not None
    for _ in range(4000):
        x, y = rng.randrange(page.width), rng.randrange(page.height)
        pixels[x, y] = rng.randint(150, 220)
    return page


def make_documents(here: Path = HERE) -> list[tuple[str, str, str]]:
    """Write the sample documents and their manifest; returns the manifest rows."""
    folder = here / "pdfs"
    folder.mkdir(exist_ok=True)
    a4, letter, a5 = (595.0, 842.0), (612.0, 792.0), (420.0, 595.0)
    report = [text_page(a4, 72, f"Harbour report - page {n} of 3", seed=n) for n in (1, 2, 3)]
    report = [page.convert("1") for page in report]  # bilevel text: a few KB per page
    report[0].save(folder / "report_a4.pdf", save_all=True, append_images=report[1:], resolution=72)
    mixed = [text_page(letter, 72, "Letter portrait page", 11), text_page((842.0, 595.0), 72, "A4 landscape", 12),
             text_page(a5, 72, "A5 portrait page", 13)]
    mixed = [page.convert("1") for page in mixed]
    mixed[0].save(folder / "mixed_sizes.pdf", save_all=True, append_images=mixed[1:], resolution=72)
    scanned_page(21).convert("RGB").save(folder / "scanned_letter.pdf", resolution=100, quality=60)
    # Stored sideways (as a fax machine writes them) with EXIF orientation 6, which turns each frame upright.
    frames = [text_page(letter, 100, f"Fax page {n}", seed=30 + n).rotate(90, expand=True) for n in (1, 2, 3)]
    exif = Image.Exif()
    exif[0x0112] = 6
    frames[0].save(folder / "fax_pages.tiff", save_all=True, append_images=frames[1:], compression="tiff_deflate",
                   dpi=(100, 100), exif=exif)
    rows = [("rpt-001", "pdfs/report_a4.pdf", "reports"), ("mix-001", "pdfs/mixed_sizes.pdf", "misc"),
            ("scan-001", "pdfs/scanned_letter.pdf", "letters"), ("fax-001", "pdfs/fax_pages.tiff", "faxes")]
    with (here / "pdf_documents.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["doc_id", "path", "archive"])
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    for row in make_documents():
        print(",".join(row))
