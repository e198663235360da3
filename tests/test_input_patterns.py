"""Input paths and readers without a run: brace/glob patterns, format detection, batch sizing, listings."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwenvl_batch.config import job_from_dict
from qwenvl_batch.errors import ConfigError
from qwenvl_batch.inputs.patterns import (
    detect_format,
    expand_braces,
    expand_files,
    list_as_pattern,
)
from qwenvl_batch.manifest import BATCH_ROWS, open_manifest
from qwenvl_batch.media import parse_image_cell, prepare_image, probe_image, redact_cell


def test_brace_ranges_keep_zero_padding_and_lists_expand() -> None:
    """``{00000..00002}`` keeps its width, ``{a,b}`` lists, and several braces multiply."""
    assert expand_braces("s-{00000..00002}.tar") == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_a_missing_shard_in_a_range_is_an_error_naming_it(tmp_path: Path) -> None:
    """A brace range is a promise: a shard it names that is missing stops the job instead of being skipped."""
    (tmp_path / "s-0.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"s-1\.tar does not exist"):
        expand_files(tmp_path / "s-{0..1}.tar")
    with pytest.raises(ConfigError, match="matches no file"):
        expand_files(tmp_path / "*.parquet")


@pytest.mark.parametrize(("name", "expected"), [
    ("x/00000.tar", "webdataset"), ("x/s-{0..3}.tar", "webdataset"), ("x/*.tar.gz", "webdataset"),
    ("x/train-*.parquet", "parquet"), ("x/m.csv", "csv"), ("x/**/*.jpg", "images"), ("x/*", "images"),
    ("x/m.unknown", ""),
])
def test_format_is_told_from_the_path(name: str, expected: str) -> None:
    """Suffixes (also of a pattern's first member) and globs of images name the format."""
    assert detect_format(Path(name)) == expected


def test_a_list_path_in_the_job_file_becomes_one_pattern(tmp_path: Path) -> None:
    """``path = ["a.tar", "b.tar"]`` resolves against the job file's folder like any path; mixing is refused."""
    raw = {"input": {"path": ["a.tar", "sub/b.tar"]}, "output": {"path": "o"}, "model": {"name": "m"}}
    job = job_from_dict(raw, base_dir=tmp_path)
    assert expand_braces(str(job.input.path)) == [str(tmp_path / "a.tar"), str(tmp_path / "sub/b.tar")]
    assert list_as_pattern(["/x/a.tar", "/y/b.tar"]) == "/{x/a.tar,y/b.tar}"
    with pytest.raises(ConfigError, match="all relative"):
        job_from_dict({**raw, "input": {"path": ["a.tar", "/abs/b.tar"]}}, base_dir=tmp_path)


def test_bytes_carrying_parquet_is_read_in_smaller_batches(tmp_path: Path) -> None:
    """A Parquet of 50 KB images is read ~170 rows at a time (about 8 MB), not 4,096 (200 MB)."""
    blobs = [os.urandom(50_000) for _ in range(1000)]
    table = pa.table({"id": [str(i) for i in range(1000)], "image": pa.array(blobs, pa.binary())})
    pq.write_table(table, tmp_path / "m.parquet", compression="none")
    manifest = open_manifest(tmp_path / "m.parquet")
    assert 150 < manifest.batch_rows < 180
    assert max(batch.num_rows for batch in manifest.batches()) <= manifest.batch_rows
    text = pa.table({"id": ["1"], "image": ["a.jpg"]})
    pq.write_table(text, tmp_path / "t.parquet")
    assert open_manifest(tmp_path / "t.parquet").batch_rows == BATCH_ROWS


def test_bytes_cells_go_through_the_same_checks_and_probe(tmp_path: Path) -> None:
    """Manifest bytes are checked, probed and redacted like files: size from the header, MIME from content."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 20), "red").save(buffer, "PNG")
    data = buffer.getvalue()
    [ref] = parse_image_cell({"bytes": data, "path": "red.jpg"}, column="image", base_dir=tmp_path)
    info = probe_image(ref)
    assert info is not None and (info.width, info.height, info.mime) == (64, 20, "image/png")
    assert prepare_image(ref).url.startswith("data:image/png;base64,")
    [tiny] = parse_image_cell(_png((5, 5)), column="image", base_dir=tmp_path)
    with pytest.raises(Exception, match="at least 10 px"):
        prepare_image(tiny)
    assert redact_cell({"bytes": data, "path": "red.jpg"}).startswith("red.jpg <bytes sha256:")
    assert redact_cell([data]) == [redact_cell(data)] and str(len(data)) in redact_cell(data)


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, "PNG")
    return buffer.getvalue()
