"""Datasets as inputs, end to end against the simulator: HF Parquet, img2dataset Parquet, WebDataset, folders.

The simulator's answer carries a tag derived from the image it received (``[xxxxxxxx]``, a hash of the data
URL), so each test checks that row k was answered about image k, not merely that it was answered.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_file
from PIL import Image

from qwenvl_batch import load_job, load_results, run_job
from qwenvl_batch.config import job_from_dict
from qwenvl_batch.errors import ConfigError
from qwenvl_batch.estimate import estimate_rows
from qwenvl_batch.simulator import SimulatorThread

HF_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def jpeg(index: int, size: tuple[int, int] | None = None) -> bytes:
    """A distinct small JPEG per index (its own colour and size, so its own tag and token count)."""
    size = size or (40 + index % 7 * 24, 32 + index % 5 * 16)
    buffer = io.BytesIO()
    Image.new("RGB", size, (index * 37 % 256, 255 - index * 11 % 256, 90)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def noisy_jpeg(seed: int, side: int) -> bytes:
    """A large, incompressible JPEG (noise), for the output-size test."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def tag(image: bytes) -> str:
    """The simulator's image tag for a JPEG sent as it is: blake2b-4 of (blake2b-12 of the data URL) + NUL."""
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
    key = hashlib.blake2b(url.encode(), digest_size=12).hexdigest()
    return hashlib.blake2b(key.encode() + b"\x00", digest_size=4).hexdigest()


def write_hf(path: Path, images: list[bytes | None], names: list[str | None], captions: list[str]) -> Path:
    """A Parquet file shaped like ``datasets``' output for an Image feature (struct + huggingface metadata)."""
    features = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("image", HF_STRUCT), ("caption", pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    rows = [{"image": {"bytes": b, "path": n}, "caption": c} for b, n, c in zip(images, names, captions)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=4)
    return path


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], truncate_at: int | None = None) -> Path:
    """A WebDataset tar: each sample's members in order; ``truncate_at`` cuts the file to that many bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw[:truncate_at] if truncate_at is not None else raw)
    return path


def wds_sample(index: int, key: str, **extra: Any) -> tuple[str, dict[str, bytes]]:
    meta = {"url": f"https://example.com/{key}.jpg", "status": "success", "uid": f"u{index}", **extra}
    return key, {"jpg": jpeg(index), "txt": f"caption {index}".encode(), "json": json.dumps(meta).encode()}


def check_tags(out: pd.DataFrame, expected: dict[str, bytes]) -> None:
    """Every id's answer names its own image."""
    by_id = out.set_index("id")
    for key, image in expected.items():
        assert by_id.loc[key, "status"] == "ok", (key, by_id.loc[key, "error_message"])
        assert f"[{tag(image)}]" in by_id.loc[key, "response"], key


# ------------------------------------------------------------------------------------------------ Hugging Face


def test_hf_parquet_each_row_gets_its_own_image_and_output_keeps_no_bytes(tmp_path: Path, sim, make_job) -> None:
    """HF struct<bytes, path>: bytes are sent, row k gets image k, ids are {stem}/{row}, the cell is a reference."""
    images = [jpeg(i) for i in range(10)]
    manifest = write_hf(tmp_path / "data" / "train-00000.parquet", images, [f"p{i}.jpg" for i in range(10)],
                        [f"cap {i}" for i in range(10)])
    job = make_job(manifest, prompt={"user": "Describe row {id}. {caption}"})
    summary = run_job(job)
    assert summary.ok == 10
    out = pd.read_parquet(job.output.path)
    check_tags(out, {f"train-00000/{i}": images[i] for i in range(10)})
    cell = out.set_index("id").loc["train-00000/3", "image"]
    digest = hashlib.sha256(images[3]).hexdigest()[:12]
    assert cell == f"p3.jpg <bytes sha256:{digest} {len(images[3]):,} bytes>"
    assert pq.read_schema(next(Path(job.output.path).glob("part-*.parquet"))).field("image").type == pa.string()


def test_hf_struct_without_bytes_uses_its_path(tmp_path: Path, sim, make_job) -> None:
    """An HF image whose bytes are null is read from its path, resolved against the Parquet file's folder."""
    image = jpeg(5)
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "a.jpg").write_bytes(image)
    manifest = write_hf(tmp_path / "data" / "t.parquet", [None, jpeg(6)], ["imgs/a.jpg", None], ["x", "y"])
    out = pd.read_parquet(run_job(make_job(manifest)).output)
    check_tags(out, {"t/0": image, "t/1": jpeg(6)})
    assert out.set_index("id").loc["t/0", "image"] == "imgs/a.jpg"


def test_several_parquet_files_by_glob_and_list(tmp_path: Path, sim, make_job) -> None:
    """A glob or a TOML list of Parquet files reads them all, in order, as one input."""
    first = write_hf(tmp_path / "d" / "train-0.parquet", [jpeg(0), jpeg(1)], ["a", "b"], ["", ""])
    second = write_hf(tmp_path / "d" / "train-1.parquet", [jpeg(2)], ["c"], [""])
    out = pd.read_parquet(run_job(make_job(tmp_path / "d" / "train-*.parquet")).output)
    check_tags(out, {"train-0/0": jpeg(0), "train-0/1": jpeg(1), "train-1/0": jpeg(2)})
    raw = {"input": {"path": ["d/train-1.parquet", "d/train-0.parquet"]}, "output": {"path": "out2"},
           "model": {"name": "qwen3-vl-flash", "base_url": sim.base_url, "api_key_optional": True},
           "prompt": {"user": "Describe row {id}."}, "run": {"progress": "off"}}
    listed = pd.read_parquet(run_job(job_from_dict(raw, base_dir=tmp_path)).output)
    assert sorted(listed["id"]) == ["train-0/0", "train-0/1", "train-1/0"]
    assert first.exists() and second.exists()


# ------------------------------------------------------------------------------------------------ img2dataset


def write_img2dataset(path: Path, rows: list[dict[str, Any]]) -> Path:
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("jpg", pa.binary())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_img2dataset_failed_downloads_are_input_errors_never_sent(tmp_path: Path, sim, make_job) -> None:
    """status != success or null bytes → an input-error row saying why; never sent; id comes from key."""
    rows = [{"key": f"{i:09d}", "caption": f"c{i}", "status": "success", "error_message": None, "jpg": jpeg(i)}
            for i in range(6)]
    rows[2].update(status="failed_to_download", error_message="HTTP Error 404: Not Found", jpg=None)
    rows[4].update(jpg=None)
    manifest = write_img2dataset(tmp_path / "00000.parquet", rows)
    job = make_job(manifest, image_columns=["jpg"], prompt={"user": "Describe row {id}: {caption}"})
    summary = run_job(job)
    assert (summary.ok, summary.errors) == (4, 2)
    assert len(sim.requests) == 4
    out = pd.read_parquet(job.output.path).set_index("id")
    check_tags(out.reset_index(), {r["key"]: r["jpg"] for r in rows if r["jpg"] is not None})
    failed = out.loc["000000002"]
    assert failed["error_type"] == "input" and failed["error_code"] == "source_failed"
    assert "failed_to_download" in failed["error_message"] and "HTTP Error 404" in failed["error_message"]
    assert failed["source_status"] == "failed_to_download"
    assert out.loc["000000004", "error_code"] == "no_image" and "null" in out.loc["000000004", "error_message"]


# ------------------------------------------------------------------------------------------------ WebDataset


def test_webdataset_brace_range_rows_columns_and_bad_samples(tmp_path: Path, sim, make_job) -> None:
    """Shards by brace range: id = stem/key, .txt/.json as prompt columns; no-image and truncated samples are
    input errors, never sent, and the good samples before them still run."""
    write_shard(tmp_path / "s" / "shard-00000.tar", [wds_sample(i, f"{i:09d}") for i in range(4)])
    no_image = ("000010001", {"txt": b"lonely caption", "json": b"{}"})
    write_shard(tmp_path / "s" / "shard-00001.tar", [wds_sample(4, "000010000"), no_image, wds_sample(5, "000010002")])
    full = write_shard(tmp_path / "s" / "shard-00002.tar", [wds_sample(6, "000020000"), wds_sample(7, "000020001")])
    with tarfile.open(full) as archive:
        cut = archive.getmember("000020001.jpg").offset_data + 100  # inside the second sample's image
    write_shard(full, [wds_sample(6, "000020000"), wds_sample(7, "000020001")], truncate_at=cut)
    job = make_job(tmp_path / "s" / "shard-{00000..00002}.tar",
                   prompt={"user": "Describe row {id}. Caption: {txt}. From {url} ({uid}, {json_status})."})
    summary = run_job(job)
    out = pd.read_parquet(job.output.path).set_index("id")
    good = {f"shard-0000{s}/{k}": jpeg(i) for s, k, i in
            [(0, "000000000", 0), (0, "000000001", 1), (0, "000000002", 2), (0, "000000003", 3),
             (1, "000010000", 4), (1, "000010002", 5), (2, "000020000", 6)]}
    check_tags(out.reset_index(), good)
    assert summary.ok == 7 and summary.errors == 2 and len(sim.requests) == 7
    assert out.loc["shard-00001/000010001", "error_code"] == "no_image"
    assert "no image member" in out.loc["shard-00001/000010001", "error_message"]
    assert "truncated" in out.loc["shard-00002/000020001", "error_message"]
    sent = [r["text"] for r in sim.requests if "row shard-00000/000000001." in r["text"]]
    assert sent and "Caption: caption 1. From https://example.com/000000001.jpg (u1, success)." in sent[0]
    assert out.loc["shard-00000/000000001", "image"].startswith("shard-00000.tar/000000001.jpg <bytes sha256:")


def test_webdataset_list_of_tars_and_id_from_a_json_key(tmp_path: Path, sim) -> None:
    """A TOML list of tars works, and id_column may name a JSON key instead of the stem/key id."""
    write_shard(tmp_path / "a.tar", [wds_sample(0, "k0"), wds_sample(1, "k1")])
    write_shard(tmp_path / "b.tar", [wds_sample(2, "k2")])
    (tmp_path / "job.toml").write_text(f"""
[input]
path = ["a.tar", "b.tar"]
id_column = "uid"
[output]
path = "out"
[model]
name = "qwen3-vl-flash"
base_url = "{sim.base_url}"
api_key_optional = true
api_key_env = "QWENVL_TEST_KEY"
[prompt]
user = "Describe {{uid}}."
[run]
progress = "off"
""")
    out = pd.read_parquet(run_job(load_job(tmp_path / "job.toml")).output)
    assert sorted(out["uid"]) == ["u0", "u1", "u2"] and sorted(out["id"]) == ["a/k0", "a/k1", "b/k2"]
    assert (out["status"] == "ok").all()


def test_editing_one_tar_member_changes_only_that_rows_fingerprint(tmp_path: Path, sim, make_job) -> None:
    """A re-run skips done keys; after one member's image is replaced only that row counts as changed."""
    samples = [wds_sample(i, f"k{i}") for i in range(6)]
    shard = write_shard(tmp_path / "00000.tar", samples)
    job = make_job(shard)
    run_job(job)
    assert run_job(job).skipped_ok == 6 and len(sim.requests) == 6
    samples[3] = ("k3", {**samples[3][1], "jpg": jpeg(33)})
    write_shard(shard, samples)
    with pytest.raises(ConfigError, match=r"^1 row\(s\) already in"):
        run_job(job)
    rerun = job.model_copy(update={"run": job.run.model_copy(update={"rerun_changed": True})})
    summary = run_job(rerun)
    assert summary.ok == 1 and len(sim.requests) == 7
    check_tags(pd.read_parquet(job.output.path), {"00000/k3": jpeg(33), "00000/k2": jpeg(2)})


# ------------------------------------------------------------------------------------------------ folders


def _photo_tree(root: Path) -> dict[str, bytes]:
    files = {"a.jpg": jpeg(0), "sub/b.jpg": jpeg(1), "sub/deeper/c.jpg": jpeg(2), "z.jpg": jpeg(3)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / ".hidden.jpg").write_bytes(jpeg(9))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(jpeg(8))
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.csv").write_text("a,b\n")
    return files


def test_folder_rows_are_images_with_relative_ids(tmp_path: Path, sim, make_job,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A folder: one row per image, id = relative path, path and file_bytes columns; hidden and non-images
    skipped and counted."""
    files = _photo_tree(tmp_path / "photos")
    with caplog.at_level(logging.WARNING):
        out = pd.read_parquet(run_job(make_job(tmp_path / "photos")).output)
    check_tags(out, files)
    row = out.set_index("id").loc["sub/deeper/c.jpg"]
    assert row["image"] == "sub/deeper/c.jpg" and row["path"] == str(tmp_path / "photos" / "sub/deeper/c.jpg")
    assert row["file_bytes"] == len(files["sub/deeper/c.jpg"])
    assert "skipped 2 hidden file(s)/folder(s) and 2 non-image file(s)" in caplog.text


def test_glob_of_images_selects_files(tmp_path: Path, sim, make_job) -> None:
    """A glob (``photos/sub/**/*.jpg``) yields just the files it matches, ids relative to its fixed part."""
    files = _photo_tree(tmp_path / "photos")
    out = pd.read_parquet(run_job(make_job(tmp_path / "photos" / "sub" / "**" / "*.jpg")).output)
    check_tags(out, {"b.jpg": files["sub/b.jpg"], "deeper/c.jpg": files["sub/deeper/c.jpg"]})
    assert len(out) == 2


def test_input_format_forces_the_reader(tmp_path: Path, sim, make_job) -> None:
    """``[input] format`` overrides detection: a shard without a .tar suffix reads as WebDataset."""
    shard = write_shard(tmp_path / "shard.bin", [wds_sample(0, "k0")])
    job = make_job(shard)
    with pytest.raises(ConfigError, match="cannot tell the input format"):
        run_job(job)
    forced = job.model_copy(update={"input": job.input.model_copy(update={"format": "wds"})})
    check_tags(pd.read_parquet(run_job(forced).output), {"shard/k0": jpeg(0)})


# ------------------------------------------------------------------------------------------------ all sources


def _make_source(kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """One small input of each kind, with an image column named as the job will name it."""
    if kind == "hf":
        return write_hf(tmp_path / "t.parquet", [jpeg(i) for i in range(6)], [None] * 6, [""] * 6), ["image"]
    if kind == "img2dataset":
        rows = [{"key": f"k{i}", "caption": "", "status": "success", "error_message": None, "jpg": jpeg(i)}
                for i in range(6)]
        return write_img2dataset(tmp_path / "0.parquet", rows), ["jpg"]
    if kind == "wds":
        return write_shard(tmp_path / "0.tar", [wds_sample(i, f"k{i}") for i in range(6)]), ["image"]
    for i in range(6):
        (tmp_path / "photos" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(jpeg(i, (300 + 97 * i, 200 + 50 * i)))
    return tmp_path / "photos", ["image"]


@pytest.mark.parametrize("kind", ["hf", "img2dataset", "wds", "folder"])
def test_estimate_equals_the_served_prompt_tokens(kind: str, tmp_path: Path, sim, make_job) -> None:
    """``estimate`` (header reads only) gives each row exactly the prompt tokens the simulator serves."""
    path, columns = _make_source(kind, tmp_path)
    job = make_job(path, image_columns=columns)
    estimated = {row.key: row.prompt_tokens for row in estimate_rows(job)}
    out = pd.read_parquet(run_job(job).output)
    assert len(estimated) == 6 and estimated == dict(zip(out["id"], out["prompt_tokens"]))


@pytest.mark.parametrize("kind", ["hf", "img2dataset", "wds"])
def test_output_size_does_not_grow_with_image_size(kind: str, tmp_path: Path, sim, make_job) -> None:
    """Bytes-carrying inputs: a 100x heavier dataset gives the same output size, and no image bytes in it."""
    sizes = {}
    for label, make in (("small", lambda i: jpeg(i)), ("big", lambda i: noisy_jpeg(i, 700))):
        folder = tmp_path / label
        folder.mkdir()
        images = [make(i) for i in range(4)]
        if kind == "hf":
            path, columns = write_hf(folder / "t.parquet", images, [f"{i}.jpg" for i in range(4)], [""] * 4), ["image"]
        elif kind == "img2dataset":
            rows = [{"key": f"k{i}", "caption": "", "status": "success", "error_message": None, "jpg": images[i]}
                    for i in range(4)]
            path, columns = write_img2dataset(folder / "0.parquet", rows), ["jpg"]
        else:
            path, columns = write_shard(folder / "0.tar", [(f"k{i}", {"jpg": images[i]}) for i in range(4)]), ["image"]
        job = make_job(path, image_columns=columns, output=folder / "out")
        assert run_job(job).ok == 4
        blob = b"".join(p.read_bytes() for p in sorted((folder / "out").rglob("*")) if p.is_file())
        for image in images:
            assert image[100:164] not in blob and base64.b64encode(image)[200:264] not in blob
        sizes[label] = len(blob)
    # the big images are noise JPEGs of 700x700 (~400 KB each), the small ones ~1 KB: the outputs stay alike
    assert sizes["big"] < sizes["small"] * 1.3, sizes


# ------------------------------------------------------------------------------------------------ kill -9




@pytest.mark.parametrize("kind", ["wds", "hf"])
def test_kill_9_then_resume_skips_done_rows(kind: str, tmp_path: Path, slow_sim: SimulatorThread) -> None:
    """kill -9 mid-run over a bytes-carrying input; the re-run sends only what was not committed."""
    n = 80
    if kind == "wds":
        write_shard(tmp_path / "00000.tar", [wds_sample(i, f"k{i:03d}") for i in range(n)])
        source = "00000.tar"
    else:
        write_hf(tmp_path / "train.parquet", [jpeg(i) for i in range(n)], [None] * n, [""] * n)
        source = "train.parquet"
    job_path = job_file(tmp_path, slow_sim.base_url, rows=None, input={"path": source}, output="out.parquet",
                        model={"api_key_optional": True}, limits={"concurrency": 4, "grace_s": 5, "retry_initial_s": 1.0})
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_batch", "run", str(job_path), "--progress", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while len(slow_sim.requests) < 30:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited early"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    committed = load_results(tmp_path / "out.parquet")
    done = set(committed.loc[committed["status"] == "ok", "id"])
    assert 20 <= len(done) < n
    summary = run_job(load_job(job_path))
    assert summary.skipped_ok == len(done)
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == n and out["id"].is_unique and (out["status"] == "ok").all()
    for key in done:
        assert sum(1 for r in slow_sim.requests if r["outcome"] == "ok" and f"row {key}." in r["text"]) == 1


def test_hf_sequence_of_images_sends_every_image(tmp_path: Path, sim, make_job) -> None:
    """An HF ``Sequence(Image())`` column (a list of structs) is a multi-image row; output keeps references."""
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(HF_STRUCT))])
    rows = [{"id": f"r{i}", "images": [{"bytes": jpeg(2 * i), "path": None}, {"bytes": jpeg(2 * i + 1), "path": "b"}]}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    job = make_job(tmp_path / "m.parquet", image_columns=["images"])
    out = pd.read_parquet(run_job(job).output).set_index("id")
    assert len(sim.requests) == 3 and all(r["n_images"] == 2 for r in sim.requests)
    expected = [f"{name}<bytes sha256:{hashlib.sha256(image).hexdigest()[:12]} {len(image):,} bytes>"
                for name, image in (("", jpeg(2)), ("b ", jpeg(3)))]
    assert list(out.loc["r1", "images"]) == expected


def test_a_bytes_column_not_captioned_is_not_copied_to_the_output(tmp_path: Path, sim, make_job) -> None:
    """A second image column the job does not send is still stored as a reference, never as bytes."""
    schema = pa.schema([("id", pa.string()), ("image", HF_STRUCT), ("thumb", pa.binary())])
    rows = [{"id": "a", "image": {"bytes": jpeg(1), "path": "a.jpg"}, "thumb": noisy_jpeg(1, 200)}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    out = pd.read_parquet(run_job(make_job(tmp_path / "m.parquet")).output)
    assert out["thumb"].iloc[0].startswith("<bytes sha256:") and out["status"].iloc[0] == "ok"


def test_compressed_shards_with_dot_slash_names_work(tmp_path: Path, sim, make_job) -> None:
    """A .tar.gz made with ``tar -C folder .`` (``./`` names) streams; its image bytes travel in the row."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for key, members in [wds_sample(0, "k0"), wds_sample(1, "k1")]:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"./{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar.gz").write_bytes(raw.getvalue())
    out = pd.read_parquet(run_job(make_job(tmp_path / "s.tar.gz")).output)
    check_tags(out, {"s/k0": jpeg(0), "s/k1": jpeg(1)})
    assert out.set_index("id").loc["s/k1", "image"].startswith("s.tar.gz/k1.jpg <bytes sha256:")


def test_a_shard_not_in_sample_order_stops_before_sending(tmp_path: Path, sim, make_job) -> None:
    """Members of one key split apart (a tar in directory order) stop the job with the fix; nothing is sent."""
    a, b = wds_sample(0, "k0"), wds_sample(1, "k1")
    write_shard(tmp_path / "s.tar", [("k0", {"jpg": a[1]["jpg"]}), ("k1", b[1]), ("k0", {"txt": a[1]["txt"]})])
    with pytest.raises(ConfigError, match=r"members of sample 'k0' are not next to each other.*--sort=name"):
        run_job(make_job(tmp_path / "s.tar"))
    assert sim.requests == []
