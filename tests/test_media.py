"""Tests for qwenvl_batch.media: references → request parts, validation, probing, redaction."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_batch.errors import InputRowError
from qwenvl_batch.media import (
    MAX_DATA_URL_CHARS,
    ImageInfo,
    ImageRef,
    parse_image_cell,
    prepare_image,
    probe_image,
    redact_data_url,
)

MakeFile = Callable[[Path], Path]
"""Builds a (possibly broken) file at the given path and returns the path."""


def _save(path: Path, size: tuple[int, int] = (64, 48), fmt: str = "PNG", **params: object) -> Path:
    """Write a small RGB image with some structure (so it is not a trivial encode)."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **params)
    return path


def _ref(path: Path, column: str = "image") -> ImageRef:
    """A path reference as parse_image_cell would build it."""
    [ref] = parse_image_cell(str(path), column=column, base_dir=path.parent)
    return ref


def _data_url(size: tuple[int, int] = (32, 16), fmt: str = "PNG", mime: str = "image/png") -> str:
    """A small image as a base64 data URL."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, fmt)
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


# ------------------------------------------------------------------------------------------------ parse_image_cell


@pytest.mark.parametrize(
    ("cell", "kind"),
    [
        ("photo.jpg", "path"),
        ("/abs/photo.jpg", "path"),
        ("file:///abs/photo.jpg", "path"),
        ("http://example.com/a.jpg", "url"),
        ("HTTPS://example.com/a.jpg?x=1", "url"),
        ("data:image/png;base64,iVBORw0KGgo=", "data"),
    ],
)
def test_each_reference_kind_is_classified(cell: str, kind: str, tmp_path: Path) -> None:
    """Each way of writing a reference maps to its kind, keeps its text, and only paths get a resolved path."""
    [ref] = parse_image_cell(cell, column="image", base_dir=tmp_path)
    assert ref.kind == kind
    assert ref.value == cell
    assert ref.column == "image"
    assert (ref.path is not None) == (kind == "path")


def test_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    """A relative path is resolved against the manifest's folder, not the working directory."""
    [ref] = parse_image_cell("sub/../imgs/a.jpg", column="image", base_dir=tmp_path / "manifest_dir")
    assert ref.path == tmp_path / "manifest_dir" / "imgs" / "a.jpg"
    assert ref.value == "sub/../imgs/a.jpg"


def test_file_url_resolves_to_absolute_path(tmp_path: Path) -> None:
    """A file:// URL (with percent-escapes) becomes the absolute path it names."""
    [ref] = parse_image_cell(f"file://{tmp_path}/my%20photo.png", column="image", base_dir=Path("/elsewhere"))
    assert ref.path == tmp_path / "my photo.png"


def test_json_list_cell_gives_several_refs(tmp_path: Path) -> None:
    """A CSV cell holding a JSON array yields one reference per element, in order."""
    refs = parse_image_cell('["a.jpg", "https://x.org/b.png"]', column="images", base_dir=tmp_path)
    assert [(r.kind, r.value) for r in refs] == [("path", "a.jpg"), ("url", "https://x.org/b.png")]
    assert refs[0].path == tmp_path / "a.jpg"


@pytest.mark.parametrize("cell", [["a.jpg", "b.jpg"], ("a.jpg", "b.jpg"), np.array(["a.jpg", "b.jpg"], dtype=object)])
def test_list_cells_give_several_refs(cell: object, tmp_path: Path) -> None:
    """List, tuple and numpy-array cells (Parquet / JSONL list columns) yield one reference per element."""
    refs = parse_image_cell(cell, column="images", base_dir=tmp_path)
    assert [r.path for r in refs] == [tmp_path / "a.jpg", tmp_path / "b.jpg"]


@pytest.mark.parametrize("cell", [None, float("nan"), np.float64("nan"), "", "   ", [], "[]"])
def test_empty_cells_give_no_refs(cell: object, tmp_path: Path) -> None:
    """None, NaN, blank strings and empty lists mean "no image", left for the caller to report."""
    assert parse_image_cell(cell, column="image", base_dir=tmp_path) == []


def test_pandas_na_is_an_empty_cell(tmp_path: Path) -> None:
    """pandas' NA (nullable string columns) counts as an empty cell."""
    pd = pytest.importorskip("pandas")
    assert parse_image_cell(pd.NA, column="image", base_dir=tmp_path) == []


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        (42, "int"),
        (b"\x89PNG", "bytes"),
        ({"path": "a.jpg"}, "dict"),
        ('["a.jpg", ', "not a valid JSON array"),
        ('["a.jpg", 3]', "element 2 of the list is a int"),
        (["a.jpg", None], "element 2 of the list is empty"),
        ("s3://bucket/a.jpg", "s3://"),
    ],
)
def test_unusable_cells_are_input_errors_naming_the_column(cell: object, expected: str, tmp_path: Path) -> None:
    """A cell of the wrong type, broken JSON, a hole in a list or an unfetchable scheme is an input error."""
    with pytest.raises(InputRowError) as info:
        parse_image_cell(cell, column="photo_col", base_dir=tmp_path)
    assert "'photo_col'" in str(info.value)
    assert expected in str(info.value)
    assert "Fix:" in str(info.value)
    assert info.value.error_type == "input"


# ------------------------------------------------------------------------------------------------ prepare_image


def test_local_png_becomes_data_url_of_the_same_bytes(tmp_path: Path) -> None:
    """A local file is sent as a base64 data URL of its exact bytes, with its size and dimensions."""
    path = _save(tmp_path / "a.png", (64, 48))
    prepared = prepare_image(_ref(path))
    assert prepared.url.startswith("data:image/png;base64,")
    assert base64.b64decode(prepared.url.split(",", 1)[1]) == path.read_bytes()
    assert (prepared.mime, prepared.width, prepared.height) == ("image/png", 64, 48)
    assert prepared.sent_bytes == len(prepared.url)
    assert prepared.notes == ()


@pytest.mark.parametrize(
    ("name", "fmt", "mime"),
    [
        ("png_named.jpg", "PNG", "image/png"),
        ("jpeg_named.png", "JPEG", "image/jpeg"),
        ("noext", "WEBP", "image/webp"),
        ("a.bmp", "BMP", "image/bmp"),
        ("a.tif", "TIFF", "image/tiff"),
        ("a.gif", "GIF", "image/gif"),
    ],
)
def test_mime_comes_from_content_not_name(name: str, fmt: str, mime: str, tmp_path: Path) -> None:
    """The MIME type in the data URL is the detected format's, whatever the file is called."""
    prepared = prepare_image(_ref(_save(tmp_path / name, fmt=fmt)))
    assert prepared.mime == mime
    assert prepared.url.startswith(f"data:{mime};base64,")


def test_http_url_passes_through_unfetched(tmp_path: Path) -> None:
    """An http(s) URL is sent as written, with no dimensions (it is not fetched)."""
    url = "https://example.com/photos/cat.jpg?sig=abc"
    [ref] = parse_image_cell(url, column="image", base_dir=tmp_path)
    prepared = prepare_image(ref)
    assert (prepared.url, prepared.width, prepared.height, prepared.sent_bytes) == (url, None, None, len(url))


def test_data_url_passes_through_with_its_size(tmp_path: Path) -> None:
    """A data URL is sent unchanged; its MIME type and dimensions are read from it."""
    url = _data_url((32, 16))
    [ref] = parse_image_cell(url, column="image", base_dir=tmp_path)
    prepared = prepare_image(ref)
    assert prepared.url == url
    assert (prepared.mime, prepared.width, prepared.height) == ("image/png", 32, 16)


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG cut to 60% of its length (header intact, scan data missing)."""
    data = _save(path, (400, 300), "JPEG", quality=90).read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def _truncated_png(path: Path) -> Path:
    """A PNG cut to 60% of its length."""
    data = _save(path, (400, 300), "PNG").read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def _text_file(path: Path) -> Path:
    """A text file with an image's name."""
    path.write_text("id,image\n1,a.jpg\n")
    return path


def _empty_file(path: Path) -> Path:
    """A zero-byte file."""
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("make", "name", "code", "reason"),
    [
        (lambda p: p, "missing.jpg", "file_not_found", "file not found"),
        (_empty_file, "empty.jpg", "empty_file", "empty"),
        (_text_file, "notes.jpg", "not_an_image", "text file"),
        (_truncated_jpeg, "cut.jpg", "corrupt_image", "truncated"),
        (_truncated_png, "cut.png", "corrupt_image", "truncated"),
        (lambda p: _save(p, (9, 9)), "tiny.png", "image_too_small", "9×9"),
        (lambda p: _save(p, (300, 1)), "line.png", "image_too_small", "300×1"),
        (lambda p: _save(p, (2010, 10)), "strip.png", "aspect_ratio", "201:1"),
        (lambda p: _save(p, (16, 16), "PPM"), "a.ppm", "unsupported_format", "PPM"),
    ],
)
def test_unusable_files_are_input_errors_naming_the_file(
    make: MakeFile, name: str, code: str, reason: str, tmp_path: Path
) -> None:
    """Missing, empty, non-image, truncated, tiny, thin and unaccepted files are refused, naming the file."""
    (tmp_path / "imgs").mkdir()
    path = make(tmp_path / "imgs" / name)
    [ref] = parse_image_cell(f"imgs/{name}", column="photo", base_dir=tmp_path)
    with pytest.raises(InputRowError) as info:
        prepare_image(ref)
    message = str(info.value)
    assert info.value.code == code
    assert reason in message
    assert f"'imgs/{name}'" in message and str(path) in message and "'photo'" in message
    assert "Fix:" in message


@pytest.mark.parametrize("size", [(10, 10), (2000, 10), (10, 2000)])
def test_boundary_sizes_are_accepted(size: tuple[int, int], tmp_path: Path) -> None:
    """10 px sides and a 200:1 aspect ratio are the provider's limits, and are accepted."""
    assert (prepare_image(_ref(_save(tmp_path / "edge.png", size))).width,) == (size[0],)


def test_non_jpeg_png_above_4k_is_refused(tmp_path: Path) -> None:
    """Above 4K the provider takes only JPEG/PNG, so a large TIFF is refused (probe and prepare) with a fix."""
    path = tmp_path / "big.tif"
    Image.new("L", (3900, 2200), 255).save(path, "TIFF", compression="packbits")
    for call in (prepare_image, probe_image):
        with pytest.raises(InputRowError, match="only JPEG and PNG") as info:
            call(_ref(path))
        assert info.value.code == "unsupported_format"


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    """A file whose data URL would pass 10,485,760 chars is refused from its size, with the size, limit and fix."""
    path = tmp_path / "huge.jpg"
    with path.open("wb") as handle:
        handle.truncate(8 * 2**20)  # sparse: nothing to read, and reading it would fail as "not an image"
    with pytest.raises(InputRowError) as info:
        prepare_image(_ref(path))
    message = str(info.value)
    assert info.value.code == "too_large"
    assert "8.0 MB" in message and "10,485,760" in message and "URL" in message and "resize" in message


def test_oversized_data_url_is_refused_without_its_data_in_the_message(tmp_path: Path) -> None:
    """A data URL over the provider's limit is an input error whose message holds no base64 data."""
    url = "data:image/png;base64," + "A" * MAX_DATA_URL_CHARS
    [ref] = parse_image_cell(url, column="image", base_dir=tmp_path)
    with pytest.raises(InputRowError) as info:
        prepare_image(ref)
    assert info.value.code == "too_large"
    assert "AAAAAAAA" not in str(info.value)
    assert f"{len(url):,} chars" in str(info.value)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png,rawbytes", "bad_data_url"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported_format"),
        ("data:image/png;base64", "bad_data_url"),
    ],
)
def test_data_urls_the_provider_refuses_are_input_errors(url: str, code: str, tmp_path: Path) -> None:
    """A data URL that is not base64, not an image type, or has no payload is refused locally."""
    [ref] = parse_image_cell(url, column="image", base_dir=tmp_path)
    with pytest.raises(InputRowError) as info:
        prepare_image(ref)
    assert info.value.code == code


def test_animated_gif_is_sent_with_a_first_frame_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An animated GIF is accepted, and the result and the log say only its first frame is read."""
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    prepared = prepare_image(_ref(path))
    assert prepared.mime == "image/gif"
    assert any("first frame" in note for note in prepared.notes)
    assert "first frame" in caplog.text


def test_prepare_is_thread_safe_and_leaves_no_open_files(tmp_path: Path) -> None:
    """Concurrent prepare calls give the same results as sequential ones, and no file descriptor stays open."""
    good = [_save(tmp_path / f"g{i}.jpg", (50 + i, 40), "JPEG") for i in range(12)]
    bad = [_truncated_jpeg(tmp_path / "bad.jpg"), _text_file(tmp_path / "t.png")]
    refs = [_ref(p) for p in good + bad] * 3

    def attempt(ref: ImageRef) -> object:
        """prepare_image's result, or the error code."""
        try:
            return prepare_image(ref)
        except InputRowError as exc:
            return exc.code

    fds_before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else None
    sequential = [attempt(r) for r in refs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(attempt, refs))
    assert concurrent == sequential
    assert sequential[12:14] == ["corrupt_image", "not_an_image"]
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) == fds_before


# ------------------------------------------------------------------------------------------------ probe_image


def test_probe_returns_header_facts(tmp_path: Path) -> None:
    """probe_image gives width, height, MIME (from content) and file size."""
    path = _save(tmp_path / "really_a_png.jpg", (123, 45))
    assert probe_image(_ref(path)) == ImageInfo(width=123, height=45, mime="image/png", file_bytes=path.stat().st_size)


def test_probe_reads_only_the_header(tmp_path: Path) -> None:
    """A large JPEG probes fast and without decoding: a truncated one probes fine where prepare refuses it."""
    path = tmp_path / "scan.jpg"
    data = _save(path, (6000, 4000), "JPEG", quality=95).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ref = _ref(path)
    started = time.perf_counter()
    infos = [probe_image(ref) for _ in range(20)]
    per_probe_s = (time.perf_counter() - started) / 20
    assert infos[0] == ImageInfo(width=6000, height=4000, mime="image/jpeg", file_bytes=len(data) // 2)
    assert per_probe_s < 0.02  # a header read is ~0.1 ms; decoding 24 MP would take far longer
    with pytest.raises(InputRowError, match="truncated"):
        prepare_image(ref)


def test_probe_of_http_url_is_none(tmp_path: Path) -> None:
    """Remote URLs are not fetched for an estimate, so their facts are unknown."""
    [ref] = parse_image_cell("https://example.com/a.jpg", column="image", base_dir=tmp_path)
    assert probe_image(ref) is None


def test_probe_of_data_url_reads_its_header(tmp_path: Path) -> None:
    """A data URL's dimensions and decoded size come from its payload."""
    url = _data_url((40, 30))
    [ref] = parse_image_cell(url, column="image", base_dir=tmp_path)
    info = probe_image(ref)
    assert info is not None and (info.width, info.height, info.mime) == (40, 30, "image/png")
    assert info.file_bytes == len(base64.b64decode(url.split(",", 1)[1]))


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda p: p, "file_not_found"),
        (_empty_file, "empty_file"),
        (_text_file, "not_an_image"),
        (lambda p: _save(p, (9, 9)), "image_too_small"),
    ],
)
def test_probe_refuses_what_the_header_shows(make: MakeFile, code: str, tmp_path: Path) -> None:
    """probe_image raises the same input errors as prepare_image for what a header read can tell."""
    path = make(tmp_path / "x.jpg")
    with pytest.raises(InputRowError) as info:
        probe_image(_ref(path))
    assert info.value.code == code
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------ describe, redaction


def test_describe_and_identity_of_a_data_url_hold_no_payload(tmp_path: Path) -> None:
    """A data URL is described by its header and length, and identified by a hash of its payload."""
    url = _data_url()
    [ref] = parse_image_cell(url, column="image", base_dir=tmp_path)
    payload = url.split(",", 1)[1]
    assert ref.describe() == f"data:image/png;base64 ({len(url):,} chars)"
    assert ref.identity().startswith("data:image/png;sha256:")
    assert payload not in ref.describe() and payload not in ref.identity()


def test_identity_of_a_path_is_as_written(tmp_path: Path) -> None:
    """A path's identity is the path as written, so moving the whole dataset keeps fingerprints stable."""
    a = parse_image_cell("imgs/a.jpg", column="image", base_dir=tmp_path / "one")[0]
    b = parse_image_cell("imgs/a.jpg", column="image", base_dir=tmp_path / "two")[0]
    assert a.identity() == b.identity() == "imgs/a.jpg"
    assert str(tmp_path / "one" / "imgs" / "a.jpg") in a.describe()


def test_redaction_replaces_payload_with_hash_and_length(tmp_path: Path) -> None:
    """A data URL is redacted to its header, a hash matching identity() and its length."""
    url = _data_url()
    [ref] = parse_image_cell(url, column="image", base_dir=tmp_path)
    digest = ref.identity().rsplit(":", 1)[1][:12]
    assert redact_data_url(url) == f"data:image/png;base64,<sha256:{digest}, {len(url):,} chars>"


def test_redaction_works_inside_a_json_list(tmp_path: Path) -> None:
    """Data URLs inside a JSON list cell are redacted and the rest of the list is kept."""
    url = _data_url()
    redacted = json.loads(redact_data_url(json.dumps(["a.jpg", url])))
    assert redacted[0] == "a.jpg"
    assert redacted[1].startswith("data:image/png;base64,<sha256:")
    assert url.split(",", 1)[1] not in redacted[1]


@pytest.mark.parametrize(
    "value", ["imgs/a.jpg", "https://example.com/a.jpg?x=1,2", "/data/metadata:v2,final.png", "Input data: 3, 4"]
)
def test_redaction_leaves_plain_references_unchanged(value: str) -> None:
    """Paths, URLs and text that merely contain "data:" are returned unchanged."""
    assert redact_data_url(value) == value
