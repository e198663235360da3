"""Documents: PDFs and multi-page TIFFs become page rows rendered at the provider's size, against the simulator."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import FAST_LIMITS, write_manifest
from PIL import Image, ImageDraw

from qwenvl_batch import load_results, run_job, tokens
from qwenvl_batch.cli import main
from qwenvl_batch.config import JobConfig, job_from_dict
from qwenvl_batch.documents import PAGE_ID
from qwenvl_batch.errors import InputRowError
from qwenvl_batch.estimate import estimate_rows
from qwenvl_batch.media import ImageRef, ResizePolicy
from qwenvl_batch.media.pages import PageSource, list_pages, pdf_target, render_page, shutdown_renderer
from qwenvl_batch.media.prepare import prepare_image
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread
from qwenvl_batch.status import manifest_rows

pytest.importorskip("pypdfium2")

A4 = (595.0, 842.0)


def page_image(size_pt: tuple[float, float], number: int, dpi: int = 36) -> Image.Image:
    """A small greyscale page whose content depends on its number (so each page renders differently)."""
    width, height = round(size_pt[0] * dpi / 72), round(size_pt[1] * dpi / 72)
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    for k in range(number):
        draw.rectangle((10 + 25 * k, 20, 25 + 25 * k, 60 + 10 * number), fill=0)
    draw.text((10, height - 30), f"page {number}", fill=0)
    return page


def write_pdf(path: Path, sizes: list[tuple[float, float]]) -> Path:
    """A PDF with one page per size, each page different (Pillow's PDF writer at 36 dpi keeps it tiny)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pages = [page_image(size, n) for n, size in enumerate(sizes, start=1)]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=36)
    return path


def write_encrypted_pdf(path: Path) -> Path:
    """A PDF whose trailer names a standard security handler the empty password does not open."""
    write_pdf(path, [A4])
    data = path.read_bytes()
    at = data.index(b"<<", data.rindex(b"trailer")) + 2
    encrypt = (b"\n/Encrypt << /Filter /Standard /V 1 /R 2 /Length 40 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32
               + b"> /P -44 >>\n/ID [<" + b"ab" * 16 + b"> <" + b"ab" * 16 + b">]\n")
    path.write_bytes(data[:at] + encrypt + data[at:])
    return path


def write_tiff(path: Path, frames: int, orientation: int = 1) -> Path:
    """A multi-page TIFF at 100 dpi; with ``orientation`` 6 every frame is stored sideways."""
    images = [page_image((612.0, 792.0), n, dpi=50) for n in range(1, frames + 1)]
    if orientation == 6:
        images = [image.rotate(90, expand=True) for image in images]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], dpi=(50, 50), exif=exif)
    return path


def doc_job(tmp_path: Path, sim: SimulatorThread, manifest: Path, *, model: str = "qwen3-vl-flash",
            documents: dict[str, Any] | None = None, max_pixels: int | None = 400_000) -> JobConfig:
    """A [documents] job keyed by doc_id, prompting with each row's page_id (so a request names its page)."""
    raw = {
        "input": {"path": str(manifest), "id_column": "doc_id", "image_columns": ["path"]},
        "output": {"path": str(tmp_path / "out.parquet")},
        "model": {"name": model, "base_url": sim.base_url, "api_key_optional": True, "api_key_env": "QWENVL_TEST_KEY",
                  **({"max_pixels": max_pixels} if max_pixels else {})},
        "prompt": {"user": "Transcribe {page_id}."},
        "limits": FAST_LIMITS,
        "run": {"progress": "off"},
        "documents": documents or {},
    }
    return job_from_dict(raw, base_dir=tmp_path)


def expected_tag(file: Path, kind: str, page: int, width: int, height: int) -> str:
    """The simulator's image tag for this page rendered as the runner renders it (its answer names the pixels)."""
    data = render_page(str(file), kind, page, width, height, 90)
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    url = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    key = hashlib.blake2b(url.encode(), digest_size=12).hexdigest()
    return hashlib.blake2b(key.encode() + b"\x00", digest_size=4).hexdigest()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A manifest of a 3-page PDF (A4, landscape, Letter), a 2-frame TIFF and an ordinary image."""
    write_pdf(tmp_path / "docs" / "report.pdf", [A4, (842.0, 595.0), (612.0, 792.0)])
    write_tiff(tmp_path / "docs" / "fax.tif", 2)
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "docs" / "photo.jpg")
    return write_manifest(tmp_path / "docs.csv", [
        {"doc_id": "rpt", "path": "docs/report.pdf", "box": "A1"},
        {"doc_id": "fax", "path": "docs/fax.tif", "box": "B2"},
        {"doc_id": "pic", "path": "docs/photo.jpg", "box": "C3"},
    ])


def test_every_page_row_gets_the_answer_for_its_own_page(tmp_path: Path, sim: SimulatorThread, archive: Path) -> None:
    """One row per page keyed doc#p000N; each answer carries the tag of that page's own pixels; columns carried."""
    summary = run_job(doc_job(tmp_path, sim, archive))
    out = load_results(tmp_path / "out.parquet").set_index(PAGE_ID)
    assert summary.ok == 6
    assert sorted(out.index) == ["fax#p0001", "fax#p0002", "pic", "rpt#p0001", "rpt#p0002", "rpt#p0003"]
    assert (out.loc["rpt#p0002", ["doc_id", "box", "page_number", "page_count"]].tolist() == ["rpt", "A1", 2, 3])
    assert out.loc["rpt#p0002", ["page_width_pt", "page_height_pt"]].tolist() == pytest.approx([842, 595], abs=2)
    tags = set()
    for page_id, row in out.drop(index="pic").iterrows():
        kind = "pdf" if row["doc_id"] == "rpt" else "tiff"
        tag = expected_tag(tmp_path / row["path"], kind, int(row["page_number"]), int(row["rendered_width"]),
                           int(row["rendered_height"]))
        assert f"[{tag}]" in row["response"], page_id
        tags.add(tag)
    assert len(tags) == 5  # five different pages, five different images sent
    assert pd.isna(out.loc["pic", "page_number"]) and out.loc["pic", "status"] == "ok"


def test_document_view_joins_pages_in_order_with_spans(tmp_path: Path, sim: SimulatorThread, archive: Path) -> None:
    """load_results(documents=True): one row per document, text in page order, spans cut out each page's answer."""
    run_job(doc_job(tmp_path, sim, archive))
    pages = load_results(tmp_path / "out.parquet")
    docs = load_results(tmp_path / "out.parquet", documents=True).set_index("doc_id")
    assert sorted(docs.index) == ["fax", "pic", "rpt"]
    report = docs.loc["rpt"]
    assert report["page_count"] == 3 and report["pages_done"] == 3 and report["pages_failed"] == 0
    by_page = pages[pages["doc_id"] == "rpt"].set_index("page_number")["response"]
    assert [report["text"][start:end] for start, end, _ in report["page_spans"]] == [by_page[n] for n in (1, 2, 3)]
    assert [page for _, _, page in report["page_spans"]] == [1, 2, 3]
    assert report["prompt_tokens"] == pages.loc[pages["doc_id"] == "rpt", "prompt_tokens"].sum()
    assert report["cost"] == pytest.approx(pages.loc[pages["doc_id"] == "rpt", "cost"].sum())


def test_export_documents_writes_one_row_per_document(tmp_path: Path, sim: SimulatorThread, archive: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`qwenvl-batch export OUT --documents FILE` writes the document view as Parquet."""
    run_job(doc_job(tmp_path, sim, archive))
    target = tmp_path / "docs.parquet"
    assert main(["export", str(tmp_path / "out.parquet"), "--documents", str(target)]) == 0
    assert "3 document(s)" in capsys.readouterr().out
    assert sorted(pd.read_parquet(target)["doc_id"]) == ["fax", "pic", "rpt"]


def test_encrypted_corrupt_and_too_long_documents_are_error_rows_never_sent(tmp_path: Path,
                                                                            sim: SimulatorThread) -> None:
    """Each bad document is one input-error row with its code and fix; the good document is unaffected."""
    write_encrypted_pdf(tmp_path / "locked.pdf")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf at all\n")
    write_pdf(tmp_path / "long.pdf", [A4] * 4)
    write_pdf(tmp_path / "good.pdf", [A4])
    manifest = write_manifest(tmp_path / "m.csv", [
        {"doc_id": "locked", "path": "locked.pdf"}, {"doc_id": "broken", "path": "broken.pdf"},
        {"doc_id": "long", "path": "long.pdf"}, {"doc_id": "good", "path": "good.pdf"},
        {"doc_id": "gone", "path": "missing.pdf"},
    ])
    summary = run_job(doc_job(tmp_path, sim, manifest, documents={"max_pages": 3}))
    out = load_results(tmp_path / "out.parquet").set_index(PAGE_ID)
    assert summary.ok == 1 and out.loc["good#p0001", "status"] == "ok"
    codes = {"locked": "pdf_encrypted", "broken": "pdf_corrupt", "long": "too_many_pages", "gone": "file_not_found"}
    for doc, code in codes.items():
        assert out.loc[doc, "status"] == "error" and out.loc[doc, "error_type"] == "input", doc
        assert out.loc[doc, "error_code"] == code
    assert "decrypt" in out.loc["locked", "error_message"] and "locked.pdf" in out.loc["locked", "error_message"]
    assert "4 pages" in out.loc["long", "error_message"] and "max_pages" in out.loc["long", "error_message"]
    assert [r["text"] for r in sim.requests] == ["Transcribe good#p0001."]  # nothing else was sent


def test_estimate_equals_served_tokens_per_page(tmp_path: Path, sim: SimulatorThread, archive: Path) -> None:
    """estimate (from page sizes alone, nothing rendered) predicts each page's served prompt tokens exactly."""
    job = doc_job(tmp_path, sim, archive, model="qwen-vl-ocr", max_pixels=None)
    estimated = {row.key: row.prompt_tokens for row in estimate_rows(job)}
    run_job(job)
    served = load_results(tmp_path / "out.parquet").set_index(PAGE_ID)["prompt_tokens"].to_dict()
    assert len(served) == 6 and estimated == served


@pytest.mark.parametrize("model", ["qwen3-vl-flash", "qwen2.5-vl-72b-instruct", "qwen-vl-ocr", "qwen-vl-max"])
def test_rendered_size_is_the_providers_size_for_each_family(tmp_path: Path, model: str) -> None:
    """Pages render straight to a fixed point of the family's smart_resize (factor, max_pixels): no second resize."""
    policy = ResizePolicy.for_model(model)
    pdf = write_pdf(tmp_path / "p.pdf", [A4, (842.0, 595.0), (300.0, 200.0)])
    for number, target in enumerate(list_pages(pdf, "pdf", policy, max_dpi=300.0), start=1):
        assert target.width % policy.factor == 0 and target.height % policy.factor == 0
        assert target.width * target.height <= policy.max_pixels
        resized = tokens.smart_resize(target.height, target.width, factor=policy.factor,
                                      min_pixels=policy.min_pixels, max_pixels=policy.max_pixels)
        assert resized == (target.height, target.width)
        with Image.open(io.BytesIO(render_page(str(pdf), "pdf", number, target.width, target.height, 90))) as im:
            assert im.size == (target.width, target.height)
        assert target.dpi <= 300.0 * 1.05  # the small page is capped near max_dpi, not blown up to the budget


def test_dpi_lands_an_a4_page_on_the_ocr_budget() -> None:
    """DPI = 72·sqrt(budget / area): A4 at qwen-vl-ocr's 8,388,608-pixel budget renders at ~295 DPI."""
    policy = ResizePolicy.for_model("qwen-vl-ocr", min_pixels=3072, max_pixels=8_388_608)
    target = pdf_target(*A4, policy, max_dpi=300.0)
    assert target.dpi == pytest.approx(295, abs=2)
    assert (target.width, target.height) == (2432, 3424)


def test_tiff_frames_are_pages_turned_upright(tmp_path: Path) -> None:
    """Each TIFF frame is a page; frames stored sideways with EXIF orientation 6 render upright (portrait)."""
    tiff = write_tiff(tmp_path / "f.tif", 3, orientation=6)
    policy = ResizePolicy.for_model("qwen3-vl-flash")
    targets = list_pages(tiff, "tiff", policy, max_dpi=300.0)
    assert len(targets) == 3
    for number, target in enumerate(targets, start=1):
        assert target.height > target.width  # Letter portrait
        with Image.open(io.BytesIO(render_page(str(tiff), "tiff", number, target.width, target.height, 90))) as im:
            assert im.size == (target.width, target.height)
            # the page's black bars are at its top: upright, not turned
            top = im.convert("L").crop((0, 0, im.width, im.height // 4))
            assert top.getextrema()[0] < 50


def test_folder_of_pdfs_and_tiffs_is_an_input(tmp_path: Path, sim: SimulatorThread) -> None:
    """[input] path = a folder: PDFs and TIFFs in it become pages, keyed by their relative path."""
    write_pdf(tmp_path / "archive" / "a.pdf", [A4, A4])
    write_tiff(tmp_path / "archive" / "sub" / "b.tiff", 2)
    raw = doc_job(tmp_path, sim, tmp_path / "archive").model_dump()
    raw["input"].update(id_column="id", image_columns=["image"])
    raw["prompt"]["user"] = "Transcribe {page_id}."
    job = job_from_dict({k: v for k, v in raw.items() if k != "job_file"}, base_dir=tmp_path)
    run_job(job)
    out = load_results(tmp_path / "out.parquet")
    assert sorted(out[PAGE_ID]) == ["a.pdf#p0001", "a.pdf#p0002", "sub/b.tiff#p0001", "sub/b.tiff#p0002"]
    assert (out["status"] == "ok").all()


def test_pages_all_sends_one_multi_image_request_per_document(tmp_path: Path, sim: SimulatorThread,
                                                              archive: Path) -> None:
    """pages = "all": one row and one request per document, carrying every page as an image."""
    run_job(doc_job(tmp_path, sim, archive, documents={"pages": "all"}))
    out = load_results(tmp_path / "out.parquet").set_index(PAGE_ID)
    assert sorted(out.index) == ["fax", "pic", "rpt"] and (out["status"] == "ok").all()
    assert out.loc["rpt", "page_count"] == 3
    images = {r["text"]: r["n_images"] for r in sim.requests}
    assert images == {"Transcribe rpt.": 3, "Transcribe fax.": 2, "Transcribe pic.": 1}


def test_kill_9_mid_document_then_resume_skips_done_pages(tmp_path: Path) -> None:
    """After kill -9 inside a 40-page document, the re-run sends only the pages not committed."""
    with SimulatorThread(SimulatorConfig(latency_s=0.05)) as slow:
        write_pdf(tmp_path / "big.pdf", [A4] * 40)
        write_manifest(tmp_path / "m.csv", [{"doc_id": "big", "path": "big.pdf"}])
        job = doc_job(tmp_path, slow, tmp_path / "m.csv")
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(job.model_dump(mode="json", exclude={"job_file"})))
        proc = subprocess.Popen([sys.executable, "-c", _RUN_SCRIPT, str(job_file)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while len(slow.requests) < 12:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited early"
            assert time.monotonic() < deadline, "no requests in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        done = set(load_results(tmp_path / "out.parquet").query("status == 'ok'")[PAGE_ID])
        assert 5 <= len(done) < 40
        before = len(slow.requests)
        summary = run_job(job)
        assert summary.skipped_ok == len(done)
        resent = {r["text"].removeprefix("Transcribe ").removesuffix(".") for r in slow.requests[before:]}
        assert not resent & done  # no committed page was paid for twice
        out = load_results(tmp_path / "out.parquet")
        assert len(out) == 40 and (out["status"] == "ok").all()


_RUN_SCRIPT = """
import json, sys
from pathlib import Path
from qwenvl_batch import run_job
from qwenvl_batch.config import job_from_dict
raw = json.loads(Path(sys.argv[1]).read_text())
run_job(job_from_dict(raw, base_dir=Path(sys.argv[1]).parent))
"""


def test_pages_all_over_the_models_input_limit_is_one_error_row(tmp_path: Path, sim: SimulatorThread) -> None:
    """pages = "all" on qwen-vl-ocr: 4 pages at the OCR budget exceed its 30,000 input tokens: refused, not sent."""
    write_pdf(tmp_path / "four.pdf", [A4] * 4)
    write_pdf(tmp_path / "two.pdf", [A4] * 2)
    manifest = write_manifest(tmp_path / "m.csv", [{"doc_id": "four", "path": "four.pdf"},
                                                   {"doc_id": "two", "path": "two.pdf"}])
    job = doc_job(tmp_path, sim, manifest, model="qwen-vl-ocr", max_pixels=8_388_608, documents={"pages": "all"})
    run_job(job)
    out = load_results(tmp_path / "out.parquet").set_index(PAGE_ID)
    assert out.loc["two", "status"] == "ok"
    assert out.loc["four", "error_code"] == "request_too_large" and out.loc["four", "error_type"] == "input"
    assert "30,000" in out.loc["four", "error_message"] and 'pages = "each"' in out.loc["four", "error_message"]
    assert [r["text"] for r in sim.requests] == ["Transcribe two."]


def test_a_document_changed_after_planning_fails_its_pages_not_the_run(tmp_path: Path) -> None:
    """A page the render process cannot render (the file was truncated after listing) is that row's input error."""

    pdf = write_pdf(tmp_path / "gone.pdf", [A4, A4])
    ref = ImageRef(kind="page", value="gone.pdf#page=2", column="path", blob=PageSource(pdf, "pdf", 2, 640, 896))
    assert prepare_image(ref).width == 640  # renders while the file is whole
    pdf.write_bytes(b"%PDF-1.4 truncated")

    shutdown_renderer()  # a fresh render process: no cached open document
    with pytest.raises(InputRowError, match="cannot render this page"):
        prepare_image(ref)
    assert prepare_image(ImageRef(kind="page", value="x", column="path",
                                  blob=PageSource(write_pdf(tmp_path / "ok.pdf", [A4]), "pdf", 1, 640, 896))).width


def test_status_counts_pages_not_documents(tmp_path: Path, sim: SimulatorThread, archive: Path) -> None:
    """`status --job` on a [documents] job counts the manifest's pages (6 here), not its 3 rows."""
    assert manifest_rows(doc_job(tmp_path, sim, archive)) == 6
