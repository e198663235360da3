"""Hostile inputs (issue 18): one row's path, file, cell or manifest line costs that row, never the job."""

from __future__ import annotations

import base64
import io
import json
import resource
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from conftest import image_rows, ok_requests_for, write_image, write_manifest
from PIL import Image

from qwenvl_batch import load_results, run_job
from qwenvl_batch.errors import ConfigError, InputRowError
from qwenvl_batch.inputs import blocks
from qwenvl_batch.manifest import open_manifest
from qwenvl_batch.media import ResizePolicy, parse_image_cell, prepare_image, probe_image, too_many_images
from qwenvl_batch.media.rules import JPEG_HEADER_BYTES, MAX_READ_BYTES

AUTO = ResizePolicy.for_model("qwen3-vl-flash")  # resize = "auto"


def _ref(path: Path):
    [ref] = parse_image_cell(str(path), column="image", base_dir=path.parent)
    return ref


def _jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ unusable paths


@pytest.mark.parametrize("cell", ["img/a\x00b.jpg", "file:///tmp/a%00b.jpg", "img/\ud800.jpg"])
def test_unusable_path_is_a_row_error(cell: str, tmp_path: Path) -> None:
    """A NUL byte or unencodable text in a path is a 'bad_path' InputRowError naming the column, not a ValueError."""
    with pytest.raises(InputRowError) as info:
        parse_image_cell(cell, column="image", base_dir=tmp_path)
    assert info.value.code == "bad_path"
    assert "column 'image'" in str(info.value) and "Fix:" in str(info.value)


def test_nul_byte_path_costs_its_row_only(tmp_path: Path, sim, make_job) -> None:
    """A manifest row whose path holds a NUL byte ends as an input error; the other rows are sent once and ok."""
    rows = image_rows(tmp_path, 3)
    rows[1]["image"] = "img/row1\x00.jpg"
    job = make_job(write_manifest(tmp_path / "m.parquet", rows))
    summary = run_job(job)
    out = load_results(job.output.path).set_index("id")
    assert out.loc["row-0001", "status"] == "error" and out.loc["row-0001", "error_code"] == "bad_path"
    assert (out.drop("row-0001")["status"] == "ok").all()
    assert summary.ok == 2
    assert ok_requests_for(sim, "row-0001") == 0 and ok_requests_for(sim, "row-0000") == 1


# ------------------------------------------------------------------------------------------------ size caps


def test_huge_file_with_resize_is_refused_by_size_without_reading(tmp_path: Path) -> None:
    """With resize enabled, a 64 GB (sparse) file is refused from its stat: size and limit named, memory untouched."""
    path = tmp_path / "huge.jpg"
    path.write_bytes(_jpeg_bytes())
    with path.open("r+b") as handle:
        handle.truncate(64 * 2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for call in (lambda: prepare_image(_ref(path), AUTO), lambda: probe_image(_ref(path), AUTO)):
        with pytest.raises(InputRowError) as info:
            call()
        assert info.value.code == "too_large"
        assert "65,536.0 MB" in str(info.value) and f"{MAX_READ_BYTES >> 20} MB" in str(info.value)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 200 * 1024


def test_file_that_grows_after_its_stat_is_read_only_up_to_the_cap(tmp_path: Path, monkeypatch) -> None:
    """A file bigger than its stat said is read to at most the cap plus one byte, then refused."""
    from qwenvl_batch.media import prepare as prepare_module

    path = tmp_path / "grows.jpg"
    path.write_bytes(_jpeg_bytes() + b"\0" * 4096)
    monkeypatch.setattr(prepare_module, "MAX_READ_BYTES", 1024)
    monkeypatch.setattr(prepare_module, "_source_size", lambda ref: 10)  # the stat said small
    with pytest.raises(InputRowError) as info:
        prepare_image(_ref(path), AUTO)
    assert info.value.code == "too_large" and "1,025" not in str(info.value)


def _junk_jpeg(path: Path, megabytes: int) -> Path:
    """A JPEG start followed by tiny comment segments: Pillow walks each one in Python."""
    segments = b"\xff\xfe\x00\x04ab" * (megabytes * 2**20 // 6)
    path.write_bytes(b"\xff\xd8" + segments)
    return path


def test_jpeg_header_followed_by_junk_is_refused_quickly(tmp_path: Path) -> None:
    """A JPEG start and 24 MB of junk segments is a corrupt_image row error within seconds (run and estimate)."""
    path = _junk_jpeg(tmp_path / "junk.jpg", 24)
    for call in (lambda: prepare_image(_ref(path), AUTO), lambda: probe_image(_ref(path), AUTO)):
        started = time.monotonic()
        with pytest.raises(InputRowError) as info:
            call()
        assert time.monotonic() - started < 6
        assert info.value.code == "corrupt_image"
        assert f"first {JPEG_HEADER_BYTES >> 20} MB" in str(info.value)


def test_large_valid_jpeg_still_prepares(tmp_path: Path) -> None:
    """A real JPEG over the header budget (big, noisy) is still read, resized and sent."""
    path = tmp_path / "big.jpg"
    Image.effect_noise((3000, 2200), 90).convert("RGB").save(path, "JPEG", quality=98)
    assert path.stat().st_size > JPEG_HEADER_BYTES
    prepared = prepare_image(_ref(path), AUTO)
    assert prepared.url.startswith("data:image/jpeg;base64,") and prepared.original_size == (3000, 2200)


# ------------------------------------------------------------------------------------------------ images per row


def test_images_over_the_providers_limit_are_a_row_error(tmp_path: Path, sim, make_job) -> None:
    """A cell with 300 images is an input error naming the count and the limit; the other rows go out once."""
    rows = image_rows(tmp_path, 2)
    rows[0]["image"] = json.dumps([rows[1]["image"]] * 300)
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    run_job(job)
    out = load_results(job.output.path).set_index("id")
    assert out.loc["row-0000", "error_code"] == "too_many_images"
    assert "300 images" in out.loc["row-0000", "error_message"] and "250" in out.loc["row-0000", "error_message"]
    assert out.loc["row-0001", "status"] == "ok" and len(sim.requests) == 1


def test_image_limit_is_250_inline_and_256_by_url(tmp_path: Path) -> None:
    """250 files or 256 URLs pass; one more of either is refused."""
    files = parse_image_cell(json.dumps(["a.jpg"] * 251), column="image", base_dir=tmp_path)
    urls = parse_image_cell(json.dumps(["https://x.test/a.jpg"] * 257), column="image", base_dir=tmp_path)
    assert too_many_images("k", files[:250]) is None and too_many_images("k", files) is not None
    assert too_many_images("k", urls[:256]) is None and too_many_images("k", urls) is not None


# ------------------------------------------------------------------------------------------------ long manifest rows


def _big_data_url() -> str:
    """A legitimate ~3.2 MB photo as a data URL (noise does not compress)."""
    buffer = io.BytesIO()
    Image.effect_noise((1400, 1100), 90).convert("RGB").save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(url) > 2 * 2**20
    return url


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_row_over_the_block_size_is_read(suffix: str, tmp_path: Path, sim, make_job) -> None:
    """A CSV/JSONL row holding a 3 MB data URL (first, middle) is read and sent; every other row too."""
    rows = image_rows(tmp_path, 5)
    big = _big_data_url()
    rows[0]["image"] = big
    rows[3]["image"] = big
    job = make_job(write_manifest(tmp_path / f"m{suffix}", rows))
    summary = run_job(job)
    out = load_results(job.output.path)
    assert summary.ok == 5 and sorted(out["id"]) == [r["id"] for r in rows]
    assert len(sim.requests) == 5


def test_row_over_the_largest_block_names_the_row(tmp_path: Path, monkeypatch) -> None:
    """A row longer than the largest block is a ConfigError naming the file and the data row's number."""
    monkeypatch.setattr(blocks, "MAX_BLOCK_SIZE", 4 << 20)
    rows = [{"id": str(i), "image": "a.jpg"} for i in range(5)]
    rows[2]["image"] = "x" * (9 << 20)  # Arrow reads a row across one block boundary, not two
    path = write_manifest(tmp_path / "m.csv", rows)
    manifest = open_manifest(path)
    with pytest.raises(ConfigError, match=r"m\.csv: data row 3 \(after the header\) is longer than 4 MiB"):
        for _ in manifest.batches(1000):
            pass


def test_grown_reader_yields_every_row_once(tmp_path: Path) -> None:
    """After regrowing, rows already yielded are skipped: ids come out once each, in file order."""
    rows = [{"id": str(i), "image": ("y" * (3 << 20)) if i in (700, 1900) else "a.jpg"} for i in range(3000)]
    manifest = open_manifest(write_manifest(tmp_path / "m.csv", rows))
    ids = pa.concat_arrays([batch.column(0) for batch in manifest.batches(500)]).to_pylist()
    assert ids == [str(i) for i in range(3000)]


def test_big_first_jsonl_row_gives_the_schema(tmp_path: Path) -> None:
    """A JSONL manifest whose first row is over the block size still opens (its schema comes from a grown block)."""
    rows = [{"id": "0", "image": "z" * (3 << 20)}, {"id": "1", "image": "a.jpg"}]
    manifest = open_manifest(write_manifest(tmp_path / "m.jsonl", rows))
    assert manifest.schema.names == ["id", "image"]
    assert sum(batch.num_rows for batch in manifest.batches(10)) == 2


def test_parquet_manifest_ids_unchanged(tmp_path: Path) -> None:
    """Control: the same long row in Parquet is read as before (no block size involved)."""
    frame = pd.DataFrame([{"id": "0", "image": "z" * (3 << 20)}])
    frame.to_parquet(tmp_path / "m.parquet")
    manifest = open_manifest(tmp_path / "m.parquet")
    assert sum(batch.num_rows for batch in manifest.batches(10)) == 1


def test_write_image_helper_is_jpeg(tmp_path: Path) -> None:
    """Control for the junk test: the JPEG start marker used there is what real JPEGs begin with."""
    assert write_image(tmp_path / "a.jpg").read_bytes()[:2] == b"\xff\xd8"
