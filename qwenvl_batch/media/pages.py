"""Document pages as image sources: a PDF page or a TIFF frame, rendered at exactly the provider's size.

A page is rendered straight to the size the provider would resize it to for this job (``smart_resize`` with
the job's ``min_pixels`` / ``max_pixels`` and the model family's ``factor``), so the provider never resizes it
again and the image tokens billed equal the estimate made from the page size alone:

* a PDF page of ``w × h`` points gets ``DPI = 72 · sqrt(max_pixels / (w · h))``, capped at ``[documents]
  max_dpi`` (300 by default: a small receipt page is not worth 8,000 tokens), then snapped to the factor grid;
* a TIFF frame (a scan) keeps its own pixels when they are within the budget and is shrunk to the budget
  otherwise: exactly what the provider would do with it, done here once.

PDFium is not thread-safe ("not allowed to call pdfium functions simultaneously across different threads, not
even with different documents", pypdfium2's docs), so pages are rendered in dedicated render processes (one by
default: ``[documents] render_processes``), never in the runner's threads; the only pdfium calls in the main
process are the page-size reads of the manifest reader, under :data:`PDFIUM_LOCK`. The render process also
does the encoding (JPEG with the transcoder's encoder, or PNG for greyscale / few-colour pages when a trial band
says it is smaller), so the event loop's process only checks and base64-encodes the result. Form fields are not
drawn (annotations are).
"""

from __future__ import annotations

import atexit
import io
import math
import pickle
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageChops, ImageOps, ImageSequence

from qwenvl_batch import tokens

from .sources import ImageSource
from .transcode import ResizePolicy, _encode_jpeg, _has_few_colours, _on_white

DocKind = Literal["pdf", "tiff"]
PDFIUM_LOCK = threading.Lock()
"""Held around every pdfium call made in this process (the render process has its own pdfium and one thread)."""
PDF_SUFFIXES = frozenset({".pdf"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
DOCUMENT_SUFFIXES = PDF_SUFFIXES | TIFF_SUFFIXES
_TIFF_DEFAULT_DPI = 200.0
"""Assumed resolution of a TIFF frame that states none (a typical scan), only for the page-size columns."""


class DocumentError(Exception):
    """A document that cannot become pages (encrypted, corrupt, empty, too many pages): one error row."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PageTarget:
    """How one page is rendered: its size in points, the DPI, and the exact pixel size sent."""

    width_pt: float
    height_pt: float
    dpi: float
    width: int
    height: int


@dataclass(frozen=True)
class PageSource(ImageSource):
    """Page ``page`` (1-based) of a PDF or TIFF, rendered on ``read()`` at ``width × height`` in the render process."""

    path: Path
    kind: str
    page: int
    width: int
    height: int
    jpeg_quality: int = 90

    def size(self) -> int:
        """An upper estimate of the encoded page (half a byte per pixel), for the in-flight byte budget."""
        return max(1, self.width * self.height // 2)

    def read(self) -> bytes:
        return _renderer().render((str(self.path), self.kind, self.page, self.width, self.height, self.jpeg_quality))

    def digest(self) -> str:
        """The page and the pixel size it is sent at: another budget is another request."""
        return f"p{self.page}:{self.width}x{self.height}"


# ---------------------------------------------------------------------------------------------- sizes


def pdf_target(width_pt: float, height_pt: float, policy: ResizePolicy, max_dpi: float) -> PageTarget:
    """The DPI and pixel size for a PDF page: the budget's DPI (capped), snapped to the provider's grid."""
    area = max(width_pt * height_pt, 1.0)
    dpi = min(72.0 * math.sqrt(policy.max_pixels / area), max_dpi)
    height, width = _snap(height_pt * dpi / 72.0, width_pt * dpi / 72.0, policy)
    return PageTarget(width_pt, height_pt, 72.0 * width / max(width_pt, 1e-9), width, height)


def tiff_target(width_px: int, height_px: int, dpi: float, policy: ResizePolicy) -> PageTarget:
    """A scanned frame: the provider's own resize of its pixels (shrunk to the budget when above it)."""
    height, width = _snap(height_px, width_px, policy)
    width_pt, height_pt = width_px * 72.0 / dpi, height_px * 72.0 / dpi
    return PageTarget(width_pt, height_pt, dpi * width / width_px, width, height)


def _snap(height: float, width: float, policy: ResizePolicy) -> tuple[int, int]:
    """``smart_resize`` of the (fractional) natural size: a fixed point of the provider's resize."""
    return tokens.smart_resize(max(1, round(height)), max(1, round(width)), factor=policy.factor,
                               min_pixels=policy.min_pixels, max_pixels=policy.max_pixels)


def document_kind(path: Path) -> DocKind | None:
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return "pdf"
    return "tiff" if suffix in TIFF_SUFFIXES else None


def list_pages(path: Path, kind: DocKind, policy: ResizePolicy, max_dpi: float) -> list[PageTarget]:
    """Every page's target, from page sizes only (no rendering); raises :class:`DocumentError`."""
    if kind == "pdf":
        return [pdf_target(w, h, policy, max_dpi) for w, h in _pdf_sizes(path)]
    return [tiff_target(w, h, dpi, policy) for w, h, dpi in _tiff_sizes(path)]


def _pdf_sizes(path: Path) -> list[tuple[float, float]]:
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(str(path))
        except pdfium.PdfiumError as exc:
            raise _pdf_open_error(path, exc) from None
        try:
            return [_page_size(pdf, i) for i in range(len(pdf))]
        finally:
            pdf.close()


def _page_size(pdf: Any, index: int) -> tuple[float, float]:
    page = pdf[index]
    try:
        width, height = page.get_size()
        if page.get_rotation() in (90, 270):  # rendered upright: the sides swap
            width, height = height, width
        return float(width), float(height)
    finally:
        page.close()


def _pdf_open_error(path: Path, exc: Exception) -> DocumentError:
    text = str(exc)
    if "password" in text.lower() or "security" in text.lower():
        return DocumentError(f"{path}: the PDF is encrypted (password-protected); decrypt it (e.g. `qpdf --decrypt "
                             "in.pdf out.pdf`) and point the manifest at the decrypted file", "pdf_encrypted")
    return DocumentError(f"{path}: not a readable PDF ({text}); re-export or re-download the file, or repair it "
                         "(e.g. `qpdf in.pdf out.pdf`)", "pdf_corrupt")


def _tiff_sizes(path: Path) -> list[tuple[int, int, float]]:
    try:
        with Image.open(path) as im:
            sizes = []
            for frame in ImageSequence.Iterator(im):
                # Pillow's TIFF reader reports (and loads) a frame upright already: no swap for the EXIF tag
                width, height = frame.size
                sizes.append((width, height, _frame_dpi(frame)))
            return sizes
    except (OSError, SyntaxError, ValueError) as exc:
        raise DocumentError(f"{path}: not a readable TIFF ({exc}); re-export or re-scan the file",
                            "tiff_corrupt") from None


def _orientation(frame: Image.Image) -> int:
    return int(frame.getexif().get(0x0112, 1) or 1)


def _frame_dpi(frame: Image.Image) -> float:
    dpi = frame.info.get("dpi")
    try:
        value = float(dpi[0]) if dpi else 0.0
    except (TypeError, ValueError, IndexError):
        value = 0.0
    return value if value >= 10 else _TIFF_DEFAULT_DPI


# ---------------------------------------------------------------------------------------------- rendering
# Everything below runs in the render process.

_OPEN: dict[str, Any] = {}
"""The render process's last opened PDF (one entry): consecutive pages of a document reuse it."""


def _close_open() -> None:
    for pdf in _OPEN.values():
        pdf.close()
    _OPEN.clear()


atexit.register(_close_open)


def render_page(path: str, kind: str, page: int, width: int, height: int, jpeg_quality: int) -> bytes:
    """Page ``page`` at exactly ``width × height``, upright, encoded (PNG when smaller for grey/few colours)."""
    image = _render_pdf(path, page, width, height) if kind == "pdf" else _render_tiff(path, page, width, height)
    if image.size != (width, height):  # a TIFF frame within a grid step of the budget: resampled once, here
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    image = _grey_if_grey(_on_white(image))
    if _has_few_colours(image) and _png_wins(image, jpeg_quality):
        return _encode_png_fast(image)
    return _encode_jpeg(image, None, jpeg_quality).data


_PAGE_PNG_LEVEL = 3
"""zlib level for page PNGs. Measured on 8-megapixel text pages: level 3 takes 55-100 ms and is 10-15% larger
than level 6 (98-230 ms); rendering is what bounds a documents job, so the faster level wins here."""


def _encode_png_fast(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=_PAGE_PNG_LEVEL)
    return buffer.getvalue()


_TRIAL_BAND = 8
"""The PNG-or-JPEG trial encodes one band of 1/8 of the page both ways (the middle, where the text is)."""


def _png_wins(image: Image.Image, jpeg_quality: int) -> bool:
    """Whether PNG is no larger than JPEG, judged on a band of the page (measured on 8-megapixel pages: the PNG
    encode takes 200-350 ms, the JPEG 35-40 ms, so encoding the whole page both ways was most of the CPU)."""
    band = max(1, image.height // _TRIAL_BAND)
    top = (image.height - band) // 2
    sample = image.crop((0, top, image.width, top + band))
    return len(_encode_png_fast(sample)) <= len(_encode_jpeg(sample, None, jpeg_quality).data)


def _render_pdf(path: str, page: int, width: int, height: int) -> Image.Image:
    """Render straight into a ``width × height`` bitmap: PDFium scales the page to fill it (the two sides' scales
    differ by under one grid step, < 1.5%), so there is no resample afterwards (that was 150 ms a page)."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    pdf = _OPEN.get(path)
    if pdf is None:
        _close_open()
        pdf = _OPEN[path] = pdfium.PdfDocument(path)
    handle = pdf[page - 1]
    try:
        bitmap = pdfium.PdfBitmap.new_native(width, height, pdfium_c.FPDFBitmap_BGR)
        pdfium_c.FPDFBitmap_FillRect(bitmap, 0, 0, width, height, 0xFFFFFFFF)
        # the page's own /Rotate is applied by PDFium (rotate=0 adds none); annotations drawn (stamps, notes)
        pdfium_c.FPDF_RenderPageBitmap(bitmap, handle, 0, 0, width, height, 0, pdfium_c.FPDF_ANNOT)
        return bitmap.to_pil().convert("RGB")  # a copy: the bitmap's buffer is freed with it
    finally:
        handle.close()


def _render_tiff(path: str, page: int, width: int, height: int) -> Image.Image:
    with Image.open(path) as im:
        im.seek(page - 1)
        im.load()
        # a no-op where the TIFF reader has turned the pixels itself (it has, for a plain orientation tag)
        frame = ImageOps.exif_transpose(im) if _orientation(im) != 1 else im.copy()
    if frame.mode not in ("L", "RGB", "RGBA", "LA"):
        frame = frame.convert("L" if frame.mode in ("1", "I;16", "I;16B", "I;16L", "I") else "RGB")
    return frame


def _grey_if_grey(image: Image.Image) -> Image.Image:
    """An RGB page whose channels are equal is stored as greyscale (a third of the pixels to encode).

    Judged on a 1/4-scale copy (box-averaged, 8 ms on an 8-megapixel page, against 16-29 ms for the full page):
    a colour mark whose channels differ by 16 or more still shows; a fainter tint than that is sent grey.
    """
    if image.mode != "RGB":
        return image
    red, green, blue = image.reduce(4).split()
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None:
        return image.convert("L")
    return image


class _Worker:
    """One render process and its pipes; used by one thread at a time (the pool hands it out)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "qwenvl_batch.media.render_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, args: tuple[Any, ...]) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        payload = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(len(payload).to_bytes(4, "big") + payload)
            self.proc.stdin.flush()
            header = self.proc.stdout.read(4)
            reply = self.proc.stdout.read(int.from_bytes(header, "big")) if len(header) == 4 else b""
        except (BrokenPipeError, ValueError):
            reply = b""
        if not reply:
            raise OSError(f"the render process exited (code {self.proc.poll()}) while rendering this page; "
                          "run again (the page is retried), and report it if it repeats")
        ok, value = pickle.loads(reply)
        if not ok:
            raise OSError(f"cannot render this page: {value}")
        return bytes(value)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # end of input: the worker exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _Renderer:
    """``processes`` render processes, started on first use; a thread takes an idle one or waits for it."""

    def __init__(self, processes: int) -> None:
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        self._workers: list[_Worker] = []
        for _ in range(processes):
            self._idle.put(None)  # a slot: the process starts when first needed

    def render(self, args: tuple[Any, ...]) -> bytes:
        worker = self._idle.get()
        try:
            if worker is None or not worker.alive:  # first use, or it died (the page that killed it failed)
                worker = _Worker()
                self._workers.append(worker)
            return worker.call(args)
        finally:
            self._idle.put(worker)

    def pids(self) -> list[int]:
        return [worker.proc.pid for worker in self._workers if worker.alive]

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers.clear()


_RENDERER: _Renderer | None = None
_RENDERER_LOCK = threading.Lock()
_PROCESSES = 1


def set_render_processes(count: int) -> None:
    """How many render processes the next renderer starts (``[documents] render_processes``; 1 by default)."""
    global _PROCESSES
    if count != _PROCESSES:
        shutdown_renderer()
        _PROCESSES = count


def _renderer() -> _Renderer:
    """The render processes of this process (started on first use, stopped at exit)."""
    global _RENDERER
    with _RENDERER_LOCK:
        if _RENDERER is None:
            _RENDERER = _Renderer(_PROCESSES)
            atexit.register(shutdown_renderer)
        return _RENDERER


def shutdown_renderer() -> None:
    """Stop the render processes (at exit, or when the number changes)."""
    global _RENDERER
    with _RENDERER_LOCK:
        if _RENDERER is not None:
            _RENDERER.close()
            _RENDERER = None
