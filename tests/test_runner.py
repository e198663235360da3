"""End-to-end runs against the simulator over real loopback HTTP."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import image_rows, ok_requests_for, write_image, write_manifest

from qwenvl_batch import ConfigError, JobError, load_results, run_job
from qwenvl_batch.store import RESULT_COLUMNS
from qwenvl_batch.tokens import image_tokens


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_end_to_end_each_manifest_format(tmp_path: Path, sim, make_job, suffix: str) -> None:
    """A 12-row manifest in each format ends with one ok row per id, every column present, each its own answer."""
    rows = image_rows(tmp_path, 12)
    job = make_job(write_manifest(tmp_path / f"m{suffix}", rows))
    summary = run_job(job)
    out = pd.read_parquet(job.output.path)
    assert summary.ok == 12 and summary.errors == 0
    assert sorted(out["id"]) == [r["id"] for r in rows]
    assert list(out.columns) == ["id", "image", "note", *RESULT_COLUMNS]
    assert (out["status"] == "ok").all()
    for _, row in out.iterrows():
        assert f"Describe row {row['id']}." in row["response"]  # each row got its own answer
    assert out["image"].str.startswith("img/").all()  # a local image stays a path
    assert (out["prompt_tokens"] > 0).all() and (out["completion_tokens"] > 0).all()
    assert out["request_id"].notna().all() and out["finished_at"].notna().all()
    assert len(sim.requests) == 12


def test_usage_matches_qwen_vl_token_rule(tmp_path: Path, sim, make_job) -> None:
    """The image tokens recorded are those of Qwen-VL's resize rule for the real image size."""
    image = write_image(tmp_path / "big.png", size=(1280, 720), fmt="PNG")
    job = make_job(write_manifest(tmp_path / "m.csv", [{"id": "a", "image": image.name}]))
    run_job(job)
    out = pd.read_parquet(job.output.path)
    assert out.loc[0, "image_tokens"] == image_tokens(1280, 720, "qwen3-vl-flash")


def test_resume_sends_nothing_already_done(tmp_path: Path, sim, make_job) -> None:
    """A second run of a finished job sends no request and keeps exactly one row per id."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 10)))
    run_job(job)
    sent = len(sim.requests)
    summary = run_job(job)
    assert summary.skipped_ok == 10 and summary.to_do == 0
    assert len(sim.requests) == sent
    assert len(pd.read_parquet(job.output.path)) == 10


def test_limit_runs_first_rows_then_resume_does_the_rest(tmp_path: Path, sim, make_job) -> None:
    """--limit N does the first N rows; the full run afterwards sends only the others."""
    rows = image_rows(tmp_path, 10)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    run_job(make_job(manifest, run={"limit": 4}))
    assert len(sim.requests) == 4
    job = make_job(manifest)
    summary = run_job(job)
    assert summary.ok == 6 and summary.skipped_ok == 4
    assert len(sim.requests) == 10
    assert sorted(pd.read_parquet(job.output.path)["id"]) == [r["id"] for r in rows]


def test_retries_injected_500_and_429(tmp_path: Path, sim, make_job) -> None:
    """Rows whose first attempts get 500 / 503 / 429 / a dropped connection end ok, with attempts recorded."""
    rows = image_rows(tmp_path, 4)
    rows[0]["note"] = "[[sim:500:2]]"
    rows[1]["note"] = "[[sim:429:1]]"
    rows[2]["note"] = "[[sim:503:1]]"
    rows[3]["note"] = "[[sim:drop:1]]"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt={"user": "Describe row {id}. {note}"})
    summary = run_job(job)
    out = pd.read_parquet(job.output.path).set_index("id")
    assert (out["status"] == "ok").all()
    assert out["attempts"].to_dict() == {"row-0000": 3, "row-0001": 2, "row-0002": 2, "row-0003": 2}
    assert summary.retries.get("limit_requests", 0) + summary.retries.get("Throttling", 0) == 1
    assert sum(summary.retries.values()) == 5


def test_retries_exhausted_are_recorded_not_raised(tmp_path: Path, sim, make_job) -> None:
    """A row that fails every attempt with 500 is an error row; the other rows are fine."""
    rows = image_rows(tmp_path, 3)
    rows[1]["note"] = "[[sim:500]]"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt={"user": "Describe row {id}. {note}"},
                   limits={"max_attempts": 3})
    summary = run_job(job)
    out = pd.read_parquet(job.output.path).set_index("id")
    assert summary.ok == 2 and summary.errors == 1
    bad = out.loc["row-0001"]
    assert (bad["status"], bad["error_type"], bad["attempts"]) == ("error", "server", 3)
    assert "gave up after 3 attempt(s)" in bad["error_message"]


def test_row_errors_without_retry(tmp_path: Path, sim, make_job) -> None:
    """Moderation and bad-parameter 400s are recorded on their row after one attempt."""
    rows = image_rows(tmp_path, 3)
    rows[0]["note"] = "[[sim:moderation]]"
    rows[1]["note"] = "[[sim:badparam]]"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt={"user": "Describe row {id}. {note}"})
    run_job(job)
    out = pd.read_parquet(job.output.path).set_index("id")
    assert out.loc["row-0000", "error_type"] == "content_filter"
    assert out.loc["row-0000", "error_code"] == "data_inspection_failed"
    assert out.loc["row-0001", "error_type"] == "invalid_request"
    assert (out.loc[["row-0000", "row-0001"], "attempts"] == 1).all()
    assert out.loc["row-0002", "status"] == "ok"


def test_input_errors_are_recorded_and_never_sent(tmp_path: Path, sim, make_job) -> None:
    """Missing, empty, non-image and truncated files and empty cells become input errors; nothing is sent for them."""
    good = image_rows(tmp_path, 2)
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    (tmp_path / "img" / "notes.jpg").write_text("this is not an image")
    full = write_image(tmp_path / "img" / "whole.jpg", size=(400, 300)).read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(full[: len(full) // 2])
    bad = [
        {"id": "missing", "image": "img/nope.jpg", "note": ""},
        {"id": "empty", "image": "img/empty.jpg", "note": ""},
        {"id": "text", "image": "img/notes.jpg", "note": ""},
        {"id": "cut", "image": "img/cut.jpg", "note": ""},
        {"id": "blank", "image": "", "note": ""},
    ]
    job = make_job(write_manifest(tmp_path / "m.csv", good + bad))
    summary = run_job(job)
    out = pd.read_parquet(job.output.path).set_index("id")
    assert summary.ok == 2 and summary.errors == 5
    assert (out.loc[[b["id"] for b in bad], "error_type"] == "input").all()
    assert "nope.jpg" in out.loc["missing", "error_message"]
    assert "cut.jpg" in out.loc["cut", "error_message"]
    assert len(sim.requests) == 2


def test_duplicate_ids_refused_before_sending(tmp_path: Path, sim, make_job) -> None:
    """Duplicate ids stop the run before any request, naming the duplicates; no output is created."""
    rows = image_rows(tmp_path, 5)
    rows[3]["id"] = rows[1]["id"]
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    with pytest.raises(ConfigError, match="duplicate ids.*'row-0001'"):
        run_job(job)
    assert sim.requests == []
    assert not job.output.path.exists()


def test_missing_template_column_is_a_clear_error(tmp_path: Path, sim, make_job) -> None:
    """A prompt template naming a column the manifest lacks fails before any request."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)),
                   prompt={"user": "Caption {caption_hint}"})
    with pytest.raises(ConfigError, match=r"\{caption_hint\}.*no such column"):
        run_job(job)
    assert sim.requests == []


def test_missing_id_column_is_named(tmp_path: Path, sim, make_job) -> None:
    """A manifest without the id column is refused with the columns it does have."""
    manifest = write_manifest(tmp_path / "m.csv", [{"key": "a", "image": "x.jpg"}])
    with pytest.raises(ConfigError, match="no column 'id'.*key, image"):
        run_job(make_job(manifest))


def test_multi_image_rows(tmp_path: Path, sim, make_job) -> None:
    """A cell holding a list of images sends them all in one request; the output keeps the paths."""
    a = write_image(tmp_path / "a.jpg", size=(320, 240))
    b = write_image(tmp_path / "b.png", size=(100, 800), fmt="PNG")
    rows = [{"id": "pair", "images": [a.name, b.name], "note": ""}]
    job = make_job(write_manifest(tmp_path / "m.jsonl", rows), image_columns=["images"])
    run_job(job)
    out = pd.read_parquet(job.output.path)
    assert list(out.loc[0, "images"]) == ["a.jpg", "b.png"]
    assert sim.requests[0]["n_images"] == 2
    expected = image_tokens(320, 240, "qwen3-vl-flash") + image_tokens(100, 800, "qwen3-vl-flash")
    assert out.loc[0, "image_tokens"] == expected


def test_several_image_columns(tmp_path: Path, sim, make_job) -> None:
    """Two image columns contribute one image each to the same request."""
    write_image(tmp_path / "front.jpg")
    write_image(tmp_path / "back.jpg", color=(1, 2, 3))
    rows = [{"id": "card", "front": "front.jpg", "back": "back.jpg"}]
    job = make_job(write_manifest(tmp_path / "m.csv", rows), image_columns=["front", "back"])
    run_job(job)
    assert sim.requests[0]["n_images"] == 2


def test_streaming_gathers_content_and_usage(tmp_path: Path, sim, make_job) -> None:
    """stream=true gathers the answer from deltas and the usage from the final chunk."""
    rows = image_rows(tmp_path, 3)
    plain = make_job(write_manifest(tmp_path / "m.csv", rows), output=tmp_path / "plain")
    streamed = make_job(write_manifest(tmp_path / "m.csv", rows), model={"stream": True},
                        output=tmp_path / "streamed")
    run_job(plain)
    run_job(streamed)
    a = pd.read_parquet(plain.output.path).set_index("id").sort_index()
    b = pd.read_parquet(streamed.output.path).set_index("id").sort_index()
    assert (b["status"] == "ok").all()
    pd.testing.assert_series_equal(a["response"], b["response"])
    pd.testing.assert_series_equal(a["prompt_tokens"], b["prompt_tokens"])
    assert [r["stream"] for r in sim.requests].count(True) == 3


def test_truncated_stream_is_retried(tmp_path: Path, sim, make_job) -> None:
    """A stream cut before its end is retried, and the row ends ok."""
    rows = image_rows(tmp_path, 1)
    rows[0]["note"] = "[[sim:truncate:1]]"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), model={"stream": True},
                   prompt={"user": "Describe row {id}. {note}"})
    summary = run_job(job)
    out = pd.read_parquet(job.output.path)
    assert out.loc[0, "status"] == "ok" and out.loc[0, "attempts"] == 2
    assert summary.retries == {"stream_cut": 1}


def test_max_tokens_length_is_a_result(tmp_path: Path, sim, make_job) -> None:
    """An answer cut by max_tokens is ok with finish_reason 'length', not retried."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)), model={"max_tokens": 5})
    run_job(job)
    out = pd.read_parquet(job.output.path)
    assert (out["finish_reason"] == "length").all() and (out["completion_tokens"] == 5).all()
    assert (out["attempts"] == 1).all()


def test_retry_failed_replaces_the_old_row(tmp_path: Path, sim, make_job) -> None:
    """--retry-failed sends error rows again and the new result replaces the old one (one row per id)."""
    rows = image_rows(tmp_path, 3)
    rows[2]["note"] = "[[sim:500:3]]"
    manifest = write_manifest(tmp_path / "m.csv", rows)
    job = make_job(manifest, prompt={"user": "Describe row {id}. {note}"}, limits={"max_attempts": 2})
    run_job(job)
    assert pd.read_parquet(job.output.path).set_index("id").loc["row-0002", "status"] == "error"
    again = run_job(job)
    assert again.skipped_error == 1 and again.to_do == 0  # kept as is without the flag
    retried = make_job(manifest, prompt={"user": "Describe row {id}. {note}"}, run={"retry_failed": True})
    summary = run_job(retried)
    out = pd.read_parquet(job.output.path)
    assert summary.ok == 1 and len(out) == 3 and out["id"].is_unique
    assert out.set_index("id").loc["row-0002", "status"] == "ok"


def test_changed_prompt_is_refused_then_rerun_changed(tmp_path: Path, sim, make_job) -> None:
    """Editing the prompt makes a re-run say how many rows differ; --rerun-changed redoes exactly those."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4))
    run_job(make_job(manifest))
    edited = make_job(manifest, prompt={"user": "Describe row {id}. In French."})
    with pytest.raises(ConfigError, match=r"(?s)4 row\(s\) already in .* different settings.*--rerun-changed"):
        run_job(edited)
    assert len(sim.requests) == 4
    summary = run_job(make_job(manifest, prompt={"user": "Describe row {id}. In French."},
                               run={"rerun_changed": True}))
    out = pd.read_parquet(edited.output.path)
    assert summary.ok == 4 and len(out) == 4
    assert out["response"].str.contains("In French").all()


def test_changed_max_tokens_counts_as_changed(tmp_path: Path, sim, make_job) -> None:
    """A different max_tokens is a different request: the re-run refuses to mix them silently."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2))
    run_job(make_job(manifest, model={"max_tokens": 100}))
    with pytest.raises(ConfigError, match="2 row"):
        run_job(make_job(manifest, model={"max_tokens": 50}))


def test_data_url_inputs_are_sent_but_never_stored(tmp_path: Path, sim, make_job) -> None:
    """A data-URL image is sent as is; the output holds a short description, not the base64."""
    png = write_image(tmp_path / "x.png", fmt="PNG").read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    job = make_job(write_manifest(tmp_path / "m.jsonl", [{"id": "d", "image": data_url}]))
    run_job(job)
    out = pd.read_parquet(job.output.path)
    assert out.loc[0, "status"] == "ok"
    stored = out.loc[0, "image"]
    assert stored.startswith("data:image/png") and base64.b64encode(png).decode()[:40] not in stored
    raw = b"".join(p.read_bytes() for p in job.output.path.rglob("*") if p.is_file())
    assert base64.b64encode(png)[:40] not in raw


def test_local_images_are_sent_as_data_urls_with_sniffed_mime(tmp_path: Path, sim, make_job) -> None:
    """A PNG named .jpg is sent as image/png (MIME from content, not name)."""
    write_image(tmp_path / "liar.jpg", fmt="PNG")
    job = make_job(write_manifest(tmp_path / "m.csv", [{"id": "p", "image": "liar.jpg"}]))
    run_job(job)
    assert sim.requests[0]["image_types"] == ["image/png"]  # what the client declared, as the server saw it
    assert pd.read_parquet(job.output.path).loc[0, "status"] == "ok"


def test_job_level_error_stops_fast_and_leaves_rows_pending(tmp_path: Path, sim, make_job, monkeypatch) -> None:
    """A 401 stops the run (JobError), records no error rows, and a re-run with a good key finishes the job."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 30))
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-invalid-key")
    job = make_job(manifest, model={"api_key_optional": False}, limits={"concurrency": 2})
    with pytest.raises(JobError, match="401") as caught:
        run_job(job)
    assert "sk-invalid-key" not in str(caught.value)
    assert len(sim.requests) <= 4  # stopped at once, not once per row
    if job.output.path.exists():
        assert (load_results(job.output.path)["status"] != "error").all()
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-good")
    summary = run_job(job)
    assert summary.ok == 30
    assert len(pd.read_parquet(job.output.path)) == 30


def test_unknown_model_stops_the_job(tmp_path: Path, sim, make_job) -> None:
    """A 404 model_not_found is job-level: the message says to check the model name."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 5)), model={"name": "qwen-nope"})
    with pytest.raises(JobError, match="model"):
        run_job(job)


def test_output_layout_is_a_readable_dataset(tmp_path: Path, sim, make_job) -> None:
    """The output folder holds only Parquet parts; the journal, lock and job metadata live in OUT.state beside it."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 5)))
    run_job(job)
    names = sorted(p.name for p in job.output.path.iterdir())
    assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names)
    state = job.output.path.with_name(job.output.path.name + ".state")
    assert json.loads((state / "job.json").read_text())["id_column"] == "id"
    assert len(load_results(job.output.path)) == 5


def test_ok_rows_of_one_job_each_sent_once(tmp_path: Path, sim, make_job) -> None:
    """Across a run and a resume, each row is requested successfully exactly once."""
    rows = image_rows(tmp_path, 6)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    run_job(make_job(manifest, run={"limit": 3}))
    run_job(make_job(manifest))
    assert all(ok_requests_for(sim, r["id"]) == 1 for r in rows)


def test_big_scan_is_resized_client_side_with_unchanged_tokens(tmp_path: Path, sim, make_job) -> None:
    """A 12 MP scan is shrunk before sending (resize = auto) yet billed the same tokens as the original."""
    from PIL import Image

    scan = tmp_path / "scan.jpg"
    Image.effect_noise((4000, 3000), 60).convert("RGB").save(scan, quality=75)  # ~5 MB: sendable as is too
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "s", "image": scan.name}])
    resized = make_job(manifest, output=tmp_path / "a")
    original = make_job(manifest, output=tmp_path / "b").model_copy(
        update={"images": resized.images.model_copy(update={"resize": "off"})})
    run_job(resized)
    run_job(original)
    expected = image_tokens(4000, 3000, "qwen3-vl-flash")
    assert pd.read_parquet(resized.output.path).loc[0, "image_tokens"] == expected
    assert pd.read_parquet(original.output.path).loc[0, "image_tokens"] == expected
