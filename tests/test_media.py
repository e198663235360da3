"""Tests for qwenvl_batch.media: references → request parts, validation, probing, redaction."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageDraw, JpegImagePlugin

from qwenvl_batch.errors import InputRowError
from qwenvl_batch.media import (
    MAX_DATA_URL_CHARS,
    ImageInfo,
    ImageRef,
    PreparedImage,
    ResizePolicy,
    parse_image_cell,
    prepare_image,
    probe_image,
    redact_data_url,
)
from qwenvl_batch.tokens import ImageSizeError, effective_pixel_bounds, image_tokens, smart_resize, vision_spec

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
        ({"width": 3}, "has no 'bytes' or 'path'"),
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


# ------------------------------------------------------------------------------------------------ resizing

# min_shrink=1.0: these tests check the resizing itself, down to shrinks by rounding alone.
FLASH = ResizePolicy.for_model("qwen3-vl-flash", min_shrink=1.0)


def _noisy(size: tuple[int, int], mode: str = "RGB", spread: int = 64, seed: int = 0) -> Image.Image:
    """A scan-like page: uniform sensor noise on off-white paper, crossed by dark "text" bars.

    Uniform integers from numpy rather than Image.effect_noise: 24 MP in 0.1 s instead of 0.8 s.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    noise = rng.integers(0, spread, (height, width), dtype=np.uint8)
    page = Image.fromarray((noise + (250 - spread)).astype(np.uint8))
    draw = ImageDraw.Draw(page)
    for y in range(height // 20, height - height // 20, max(8, height // 60)):
        draw.rectangle((width // 15, y, width * 14 // 15, y + max(2, height // 200)), fill=30)
    if mode == "L":
        return page
    return Image.merge("RGB", (page, page.point(lambda v: max(0, v - 6)), page.point(lambda v: max(0, v - 14))))


def _payload(prepared: PreparedImage) -> bytes:
    """The bytes inside a prepared data URL."""
    return base64.b64decode(prepared.url.split(",", 1)[1])


def _sent_image(prepared: PreparedImage) -> Image.Image:
    """The image the provider would receive, decoded."""
    image = Image.open(io.BytesIO(_payload(prepared)))
    image.load()
    return image


def _with_orientation(path: Path, image: Image.Image, orientation: int, fmt: str = "JPEG", **params: object) -> Path:
    """Save ``image`` in ``fmt`` with an EXIF orientation tag that says how to turn it upright."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image.save(path, fmt, exif=exif.tobytes(), **params)
    return path


def _move_exif_after_pixels(path: Path) -> Path:
    """Rewrite a PNG so that its eXIf chunk follows the IDAT chunks (allowed, and what some tools write)."""
    data = path.read_bytes()
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append(data[position : position + 12 + length])
        position += 12 + length
    exif = [chunk for chunk in chunks if chunk[4:8] == b"eXIf"]
    rest = [chunk for chunk in chunks if chunk[4:8] != b"eXIf"]
    path.write_bytes(data[:8] + b"".join(rest[:-1] + exif + rest[-1:]))
    return path


def _halves(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


@pytest.fixture(scope="module")
def scan_24mp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6000×4000 noisy colour scan saved as a JPEG of over 12 MB (too big to send as it is)."""
    path = tmp_path_factory.mktemp("scans") / "scan.jpg"
    _noisy((6000, 4000)).save(path, "JPEG", quality=95)
    return path


@pytest.fixture(scope="module")
def sized_scans(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[int, int]], Path]:
    """Noisy JPEG scans of any size, written once per size for the whole module."""
    folder = tmp_path_factory.mktemp("sized")
    made: dict[tuple[int, int], Path] = {}

    def make(size: tuple[int, int]) -> Path:
        if size not in made:
            made[size] = folder / f"{size[0]}x{size[1]}.jpg"
            _noisy(size, spread=24).save(made[size], "JPEG", quality=90)
        return made[size]

    return make


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("qwen3-vl-flash", {}),
        ("qwen3-vl-flash", {"high_resolution": True}),
        ("qwen-vl-ocr", {}),
        ("qwen-vl-ocr", {"min_pixels": 3_072, "max_pixels": 8_388_608}),
        ("qwen-vl-max", {}),
        ("qwen2.5-vl-72b-instruct", {"max_pixels": 2_007_040}),
        ("qwen3-vl-plus", {"min_pixels": 200_000, "max_pixels": 1_000_000}),
    ],
)
@pytest.mark.parametrize("width, height", [(10, 10), (33, 6000), (1000, 1000), (4000, 3001), (7999, 40), (6000, 6000)])
def test_target_size_is_a_fixed_point_that_keeps_the_tokens(
    model: str, options: dict[str, Any], width: int, height: int
) -> None:
    """A target size is smaller, is what smart_resize gives, is left alone by smart_resize, and keeps the tokens;
    images the provider would shrink by less than ``min_shrink`` are sent as they are."""
    policy = ResizePolicy.for_model(model, min_shrink=1.0, **options)

    def provider(h: int, w: int) -> tuple[int, int] | None:
        """The provider's (h_bar, w_bar), or None where it refuses the shape."""
        try:
            return smart_resize(h, w, factor=policy.factor, min_pixels=policy.min_pixels, max_pixels=policy.max_pixels)
        except ImageSizeError:
            return None

    sizes = [(width, height), (height, width)] + [(w, h) for w in range(10, 9001, 611) for h in range(10, 9001, 587)]
    targets = 0
    for w, h in sizes:
        target, bars = policy.target_size(w, h), provider(h, w)
        if target is None:  # only where the provider would not shrink much, or would refuse or resize again
            assert bars is None or bars[0] * bars[1] * policy.min_shrink > h * w or provider(*bars) != bars
            continue
        targets += 1
        assert bars is not None and target == (bars[1], bars[0]) and bars[0] * bars[1] < w * h
        assert provider(*bars) == bars
        assert image_tokens(*target, model, **options) == image_tokens(w, h, model, **options)
    assert targets > 100  # the grid does exercise the resizing branch


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("qwen3-vl-flash", {}),
        ("qwen-vl-ocr", {"min_pixels": 3_072, "max_pixels": 4_000_000}),
        ("qwen2.5-vl-72b-instruct", {}),
    ],
)
@pytest.mark.parametrize("size", [(1701, 2479), (2563, 1999), (3001, 1501), (4099, 1077)])
def test_resized_file_keeps_the_tokens(
    model: str, options: dict[str, Any], size: tuple[int, int], sized_scans: Callable[[tuple[int, int]], Path]
) -> None:
    """A big file is sent at exactly smart_resize's size, and the image tokens equal the original's."""
    policy = ResizePolicy.for_model(model, min_shrink=1.0, **options)
    prepared = prepare_image(_ref(sized_scans(size)), policy)
    width, height = size
    spec = vision_spec(model)
    lower, upper = effective_pixel_bounds(spec, **options)
    h_bar, w_bar = smart_resize(height, width, factor=spec.factor, min_pixels=lower, max_pixels=upper)
    assert prepared.original_size == size
    assert (prepared.width, prepared.height) == (w_bar, h_bar) == _sent_image(prepared).size
    assert image_tokens(w_bar, h_bar, model, **options) == image_tokens(width, height, model, **options)


def test_24mp_scan_keeps_its_tokens_and_shrinks_at_least_5x(scan_24mp: Path) -> None:
    """A 6000×4000 noisy scan goes at smart_resize's size: ≥ 5× smaller for flash (2.6 MP), ≥ 2× for OCR."""
    for model, shrink in (("qwen3-vl-flash", 5), ("qwen-vl-ocr", 2)):
        policy = ResizePolicy.for_model(model, min_shrink=1.0)
        prepared = prepare_image(_ref(scan_24mp), policy)
        h_bar, w_bar = smart_resize(4000, 6000, factor=32, min_pixels=policy.min_pixels,
                                    max_pixels=policy.max_pixels)
        assert prepared.original_size == (6000, 4000)
        assert (prepared.width, prepared.height) == (w_bar, h_bar)
        assert image_tokens(w_bar, h_bar, model) == image_tokens(6000, 4000, model)
        assert len(_payload(prepared)) * shrink <= scan_24mp.stat().st_size
        assert prepared.mime == "image/jpeg"


def test_12mb_scan_is_refused_as_is_and_accepted_resized(scan_24mp: Path) -> None:
    """A scan too big for a data URL is refused without a policy and with "off", and sent once resized."""
    assert scan_24mp.stat().st_size > 12_000_000
    for policy in (None, replace(FLASH, enabled=False)):
        with pytest.raises(InputRowError) as info:
            prepare_image(_ref(scan_24mp), policy)
        assert info.value.code == "too_large"
    prepared = prepare_image(_ref(scan_24mp), FLASH)
    assert prepared.sent_bytes <= MAX_DATA_URL_CHARS
    assert prepared.sent_bytes == len(prepared.url)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    """A 300×200 JPEG tagged orientation 6 is sent upright as 200×300, its left edge on top, with no tag."""
    path = _with_orientation(tmp_path / "sideways.jpg", _halves((300, 200)), 6, quality=95)
    prepared = prepare_image(_ref(path), FLASH)
    sent = _sent_image(prepared)
    assert (prepared.width, prepared.height) == sent.size == (200, 300)
    assert prepared.original_size is None  # turned, not resized
    assert sent.getexif().get(ExifTags.Base.Orientation) is None
    top, bottom = sent.getpixel((100, 20)), sent.getpixel((100, 280))
    assert top[0] > 200 and top[2] < 60  # red: the stored left half
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "phone.jpg"), ("TIFF", "scan.tif"), ("PNG", "page.png")])
def test_orientation_and_resize_together(fmt: str, name: str, tmp_path: Path) -> None:
    """A sideways 3000×2000 file (orientation 8) is turned, then shrunk to smart_resize's size of 2000×3000."""
    # TIFF matters because Pillow's TIFF reader turns the pixels itself: they must not be stretched or turned twice.
    path = _with_orientation(tmp_path / name, _halves((3000, 2000)), 8, fmt)
    prepared = prepare_image(_ref(path), FLASH)
    assert prepared.original_size == (2000, 3000)
    h_bar, w_bar = smart_resize(3000, 2000, factor=32, min_pixels=FLASH.min_pixels, max_pixels=FLASH.max_pixels)
    sent = _sent_image(prepared)
    assert (prepared.width, prepared.height) == sent.size == (w_bar, h_bar)
    assert sent.getpixel((w_bar // 2, h_bar - 20))[0] > 200  # orientation 8: the stored left half ends at the bottom
    assert sent.getpixel((w_bar // 2, 20))[2] > 200


def test_png_orientation_after_the_pixels_is_found(tmp_path: Path) -> None:
    """A PNG whose eXIf chunk comes after its pixel data is still turned upright (and still verified)."""
    path = _move_exif_after_pixels(_with_orientation(tmp_path / "late.png", _halves((300, 200)), 6, "PNG"))
    with Image.open(path) as stored:
        assert "exif" not in stored.info  # Pillow sees the tag only once it has decoded the pixels
    sent = _sent_image(prepare_image(_ref(path), FLASH))
    assert sent.size == (200, 300)
    assert sent.getpixel((100, 20))[0] > 200


def test_small_image_is_sent_as_its_file(tmp_path: Path) -> None:
    """An image the provider would not shrink is sent as the file's own bytes, not re-encoded."""
    path = _save(tmp_path / "small.jpg", (640, 480), "JPEG", quality=80)
    prepared = prepare_image(_ref(path), FLASH)
    assert _payload(prepared) == path.read_bytes()
    assert prepared.original_size is None
    assert (prepared.width, prepared.height) == (640, 480)


def test_disabled_policy_sends_the_original(tmp_path: Path) -> None:
    """With enabled=False a big, sideways file is sent exactly as without a policy: its bytes, its stored size."""
    path = _with_orientation(tmp_path / "big.jpg", _noisy((3000, 2000), spread=16), 6, quality=85)
    prepared = prepare_image(_ref(path), replace(FLASH, enabled=False))
    assert _payload(prepared) == path.read_bytes()
    assert (prepared.width, prepared.height, prepared.original_size) == (3000, 2000, None)
    assert prepared == prepare_image(_ref(path))


def test_urls_and_data_urls_are_never_resized(tmp_path: Path) -> None:
    """A policy changes nothing for http(s) URLs and data URLs."""
    for value in ("https://example.com/big.jpg", _data_url((3000, 2000))):
        [ref] = parse_image_cell(value, column="image", base_dir=tmp_path)
        assert prepare_image(ref, FLASH) == prepare_image(ref)
        assert prepare_image(ref, FLASH).url == value


def test_reencoding_that_grows_the_file_sends_the_original(tmp_path: Path) -> None:
    """When the provider would shrink only by rounding and the re-encoding is bigger, the file itself is sent."""
    path = _save(tmp_path / "q30.jpg", (1000, 1000), "JPEG", quality=30)
    assert FLASH.target_size(1000, 1000) == (992, 992)
    prepared = prepare_image(_ref(path), FLASH)
    assert _payload(prepared) == path.read_bytes()
    assert (prepared.width, prepared.height, prepared.original_size) == (1000, 1000, None)


def _grey_document(path: Path) -> Path:
    """A clean greyscale page (flat paper, black bars) as a 3000×4000 PNG."""
    page = Image.new("L", (3000, 4000), 255)
    draw = ImageDraw.Draw(page)
    for y in range(200, 3800, 60):
        draw.rectangle((200, y, 2800, y + 20), fill=0)
    page.save(path, "PNG")
    return path


def _grey_noisy_tiff(path: Path) -> Path:
    """A noisy greyscale 5000×3000 TIFF: above 4K, where the provider refuses TIFF."""
    _noisy((5000, 3000), "L").save(path, "TIFF")
    return path


def _transparent_png(path: Path) -> Path:
    """A 3000×2000 few-colour RGBA PNG whose left half is fully transparent."""
    image = Image.new("RGBA", (3000, 2000), (0, 0, 0, 0))
    image.paste((200, 30, 30, 255), (1500, 0, 3000, 2000))
    image.save(path, "PNG")
    return path


def _palette_gif(path: Path) -> Path:
    """A 3000×2000 palette GIF (a chart: few flat colours)."""
    image = Image.new("P", (3000, 2000), 0)
    image.putpalette([255, 255, 255, 30, 90, 200, 220, 40, 40] + [0] * 759)
    image.paste(1, (300, 300, 1200, 1800))
    image.paste(2, (1500, 900, 2700, 1800))
    image.save(path, "GIF")
    return path


def _grey16_png(path: Path) -> Path:
    """A 16-bit greyscale 3000×2000 PNG at half brightness (32768 of 65535)."""
    Image.fromarray(np.full((2000, 3000), 32768, dtype=np.uint16)).save(path, "PNG")
    return path


def _cmyk_jpeg(path: Path) -> Path:
    """A CMYK JPEG (print workflows) of 3000×2000."""
    Image.new("CMYK", (3000, 2000), (0, 255, 255, 0)).save(path, "JPEG", quality=90)
    return path


@pytest.mark.parametrize(
    ("make", "name", "mime", "mode", "pixel"),
    [
        (_grey_document, "doc.png", "image/png", "L", ((5, 5), 255)),
        (_grey_noisy_tiff, "scan.tif", "image/jpeg", "L", None),
        (_transparent_png, "alpha.png", "image/png", "RGB", ((10, 10), (255, 255, 255))),
        (_palette_gif, "chart.gif", "image/png", "RGB", ((5, 5), (255, 255, 255))),
        (_grey16_png, "deep.png", "image/png", "L", ((50, 50), 128)),
        (_cmyk_jpeg, "print.jpg", "image/jpeg", "RGB", None),
    ],
)
def test_reencoding_picks_a_format_and_mode_that_fit(
    make: MakeFile, name: str, mime: str, mode: str, pixel: tuple[tuple[int, int], object] | None, tmp_path: Path
) -> None:
    """Clean, few-colour and palette images become PNG, noisy and JPEG sources JPEG; alpha goes white, 16 bits to 8."""
    prepared = prepare_image(_ref(make(tmp_path / name)), FLASH)
    sent = _sent_image(prepared)
    assert prepared.original_size is not None
    assert (prepared.mime, sent.mode) == (mime, mode)
    assert Image.MIME[sent.format or ""] == mime
    if pixel is not None:
        position, value = pixel
        assert sent.getpixel(position) == value


def test_tiff_above_4k_is_refused_as_is_but_sent_resized(tmp_path: Path) -> None:
    """The JPEG/PNG-only rule above 4K applies to what is sent: a big TIFF is fine once re-encoded."""
    path = tmp_path / "page.tif"
    _grey_document(tmp_path / "page.png")
    with Image.open(tmp_path / "page.png") as page:
        page.resize((4400, 2900)).save(path, "TIFF", compression="tiff_deflate")
    with pytest.raises(InputRowError) as info:
        prepare_image(_ref(path))
    assert info.value.code == "unsupported_format"
    prepared = prepare_image(_ref(path), FLASH)
    assert (prepared.mime, prepared.original_size) == ("image/png", (4400, 2900))


def test_jpeg_keeps_full_chroma_and_its_colour_profile(tmp_path: Path) -> None:
    """A resized colour JPEG is re-encoded 4:4:4 (sharp coloured strokes) and keeps its RGB ICC profile."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "colour.jpg"
    _noisy((3000, 2000), spread=16).save(path, "JPEG", quality=90, icc_profile=icc)
    sent = _sent_image(prepare_image(_ref(path), FLASH))
    assert JpegImagePlugin.get_sampling(sent) == 0
    assert sent.info.get("icc_profile") == icc


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "big.jpg"), ("PNG", "big.png")])
def test_truncated_file_is_refused_with_a_policy_too(fmt: str, name: str, tmp_path: Path) -> None:
    """The decodability check applies to the original file: a truncated big file is still an input error."""
    path = tmp_path / name
    _noisy((2400, 1600), spread=16).save(path, fmt, compress_level=1)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(InputRowError) as info:
        prepare_image(_ref(path), FLASH)
    assert info.value.code == "corrupt_image"


def test_resizing_is_thread_safe_and_leaves_no_open_files(sized_scans: Callable[[tuple[int, int]], Path]) -> None:
    """Concurrent resizing gives the same bytes as sequential resizing, and no file descriptor stays open."""
    refs = [_ref(sized_scans(size)) for size in ((1701, 2479), (2563, 1999), (3001, 1501), (1900, 1500))] * 2
    fds_before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else None
    sequential = [prepare_image(ref, FLASH) for ref in refs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda ref: prepare_image(ref, FLASH), refs))
    assert concurrent == sequential
    assert all(p.original_size is not None for p in sequential)
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) == fds_before


def test_policy_for_model_uses_the_effective_bounds() -> None:
    """for_model takes the factor and the bounds the provider applies, overrides and high-res mode included."""
    policy = ResizePolicy.for_model("qwen-vl-ocr", min_pixels=10_000, max_pixels=99_000_000, jpeg_quality=80,
                                    min_shrink=1.0)
    spec = vision_spec("qwen-vl-ocr")
    lower, upper = effective_pixel_bounds(spec, min_pixels=10_000, max_pixels=99_000_000)
    assert (policy.factor, policy.min_pixels, policy.max_pixels) == (spec.factor, lower, upper)
    assert policy.max_pixels == spec.max_pixels_limit and policy.jpeg_quality == 80
    assert ResizePolicy.for_model("qwen3-vl-flash", high_resolution=True).max_pixels == 16_777_216


@pytest.mark.parametrize(
    "values", [{"jpeg_quality": 0}, {"jpeg_quality": 96}, {"factor": 0}, {"min_pixels": 10, "max_pixels": 5}]
)
def test_policy_refuses_impossible_values(values: dict[str, int]) -> None:
    """A quality outside 1..95, a zero factor or min above max is a ValueError, not a silent bad upload."""
    with pytest.raises(ValueError):
        replace(FLASH, **values)


def test_small_shrinks_are_not_worth_a_reencode(tmp_path: Path) -> None:
    """By default an image the provider would shrink only a little (400x300 → 416x288) is sent byte for byte."""
    default = ResizePolicy.for_model("qwen3-vl-flash")
    path = _save(tmp_path / "small.jpg", (400, 300), "JPEG")
    assert default.target_size(400, 300) is None and default.target_size(4000, 3000) is not None
    prepared = prepare_image(_ref(path), default)
    assert _payload(prepared) == path.read_bytes() and prepared.original_size is None
