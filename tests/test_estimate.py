"""The cost estimate: per-row prompt tokens equal what the simulator serves; errors, prices, tiers, wall time."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import image_rows, write_image, write_manifest

from qwenvl_batch import ConfigError, load_job, run_job
from qwenvl_batch import estimate as estimate_module
from qwenvl_batch.estimate import (
    DEFAULT_TYPICAL_COMPLETION_TOKENS,
    estimate_job,
    estimate_rows,
    render_estimate,
    wall_time,
)
from qwenvl_batch.media import probe_image
from qwenvl_batch.pricing import PriceTable
from qwenvl_batch.tokens import image_tokens

REPO = Path(__file__).resolve().parents[1]


def _served_prompt_tokens(job_path: str, tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Run a sample job against the simulator and return each row's served prompt tokens by id."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test-not-a-real-key")
    job = load_job(Path(job_path), {"output": str(tmp_path / "o"), "base_url": sim.base_url, "progress": "off"})
    summary = run_job(job)
    assert summary.errors == 0
    out = pd.read_parquet(job.output.path)
    return dict(zip(out[job.input.id_column], out["prompt_tokens"].astype(int)))


@pytest.mark.parametrize("job_path", ["jobs/caption.toml", "jobs/ocr.toml"])
def test_sample_job_estimate_equals_served_prompt_tokens(job_path: str, tmp_path: Path, sim,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """For every row of the sample jobs, the estimated prompt tokens equal those the simulator served."""
    served = _served_prompt_tokens(job_path, tmp_path, sim, monkeypatch)
    job = load_job(Path(job_path), {"output": str(tmp_path / "fresh"), "base_url": sim.base_url})
    rows = list(estimate_rows(job))
    assert {r.key: r.prompt_tokens for r in rows} == served
    assert all(r.reason is None and r.unmeasured_images == 0 for r in rows)
    total = estimate_job(job)
    assert total.rows == total.rows_to_send == len(served)
    assert total.prompt_tokens_total == sum(served.values())
    assert total.prompt_tokens_max == max(served.values())


@pytest.mark.parametrize(
    ("model", "large_row_vs_default"),
    [({"extra_body": {"vl_high_resolution_images": True}}, "more"),  # the 16,384-token budget
     ({"min_pixels": 200_000, "max_pixels": 400_000}, "less"),  # small images enlarged, the large one capped
     ({"name": "qwen2.5-vl-7b-instruct", "max_pixels": 600_000}, "less")],  # the 28-px family
)
def test_multi_image_rows_and_pixel_settings_match_the_simulator(tmp_path: Path, sim, make_job,
                                                                 model: dict[str, Any],
                                                                 large_row_vs_default: str) -> None:
    """Rows with several images, high-resolution mode and min/max_pixels overrides are counted as served."""
    rows = image_rows(tmp_path, 5)
    write_image(tmp_path / "img" / "large.jpg", size=(4000, 3000))
    rows[0]["image"] = json.dumps(["img/large.jpg", rows[1]["image"]])
    rows[2]["image"] = "img/large.jpg"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), model=model)
    run_job(job)
    out = pd.read_parquet(job.output.path)
    served = dict(zip(out["id"], out["prompt_tokens"].astype(int)))
    fresh = job.model_copy(update={"output": job.output.model_copy(update={"path": tmp_path / "fresh"})})
    assert {r.key: r.prompt_tokens for r in estimate_rows(fresh)} == served
    default = image_tokens(4000, 3000, job.model.name)
    assert (served["row-0002"] > default) == (large_row_vs_default == "more")  # the setting really mattered


def test_input_errors_counted_with_reasons_and_left_out_of_tokens(tmp_path: Path, sim, make_job) -> None:
    """Missing, non-image, too small, too elongated and empty-cell rows are counted by reason, not in tokens."""
    write_image(tmp_path / "img" / "ok.jpg", size=(64, 48))
    write_image(tmp_path / "img" / "tiny.jpg", size=(5, 5))
    write_image(tmp_path / "img" / "strip.png", size=(2010, 10), fmt="PNG")
    (tmp_path / "img" / "notes.jpg").write_text("this is not an image")
    rows = [
        {"id": "ok", "image": "img/ok.jpg"},
        {"id": "missing", "image": "img/nope.jpg"},
        {"id": "blank", "image": ""},
        {"id": "tiny", "image": "img/tiny.jpg"},
        {"id": "strip", "image": "img/strip.png"},
        {"id": "text", "image": "img/notes.jpg"},
    ]
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    result = estimate_job(job)
    assert (result.rows, result.rows_to_send, result.input_errors, result.images) == (6, 1, 5, 1)
    assert result.input_error_reasons == {"file_not_found": 1, "input": 1, "image_too_small": 1,
                                          "aspect_ratio": 1, "not_an_image": 1}
    assert [e["id"] for e in result.input_error_examples] == ["missing", "blank", "tiny", "strip", "text"]
    assert "nope.jpg" in result.input_error_examples[0]["reason"]
    # Only the good row: its 64x48 image plus "Describe row ok." (16 characters: 4 tokens).
    assert result.prompt_tokens_total == result.prompt_tokens_max == image_tokens(64, 48, "qwen3-vl-flash") + 4
    assert sim.requests == []  # estimating never sends anything


def test_each_resolved_path_is_probed_once(tmp_path: Path, sim, make_job, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many rows naming the same files (also spelt differently) cost one header read per distinct file."""
    write_image(tmp_path / "img" / "a.jpg")
    write_image(tmp_path / "img" / "b.jpg", size=(300, 200))
    names = ["img/a.jpg", "./img/a.jpg", "img/b.jpg", "img/missing.jpg"]
    rows = [{"id": f"r{i}", "image": names[i % 4]} for i in range(40)]
    probed: list[Path] = []
    lock = threading.Lock()

    def counting_probe(ref, resize=None):  # type: ignore[no-untyped-def]
        with lock:
            probed.append(ref.path)
        return probe_image(ref, resize)

    monkeypatch.setattr(estimate_module, "probe_image", counting_probe)
    result = estimate_job(make_job(write_manifest(tmp_path / "m.csv", rows)))
    assert sorted(p.name for p in probed) == ["a.jpg", "b.jpg", "missing.jpg"]
    assert (result.rows_to_send, result.input_errors) == (30, 10)


def test_repeated_rows_are_counted_once_with_the_row_by_row_figures(tmp_path: Path, sim, make_job,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows sharing every value that shapes a request are rendered once, and the estimate equals the row-by-row
    one: tokens, images, errors by reason and the error examples with their own ids, in manifest order."""
    write_image(tmp_path / "img" / "a.jpg")
    write_image(tmp_path / "img" / "b.jpg", size=(300, 200))
    names = ["img/a.jpg", "img/b.jpg", "img/missing.jpg", ""]
    hints = ["red", None, "a long blue hint, several tokens"]
    rows = [{"id": f"r{i:03d}", "image": names[i % 4], "hint": hints[i % 3]} for i in range(60)]
    job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt={"user": "Describe this. {hint}"})
    row_by_row = estimate_module._Tally()
    for row in estimate_rows(job):
        row_by_row.add(row)
    renders: list[str] = []
    from qwenvl_batch.prompt import RowRenderer

    original = RowRenderer.render

    def counting_render(self, row):  # type: ignore[no-untyped-def]
        renders.append(row["id"])
        return original(self, row)

    monkeypatch.setattr(RowRenderer, "render", counting_render)
    result = estimate_job(job)
    tokens = row_by_row.prompt_tokens()
    assert (result.rows_to_send, result.prompt_tokens_total, result.prompt_tokens_max) == \
        (len(tokens), int(tokens.sum()), int(tokens.max()))
    assert (result.prompt_tokens_p50, result.prompt_tokens_p95) == \
        (estimate_module._percentile(tokens, 50), estimate_module._percentile(tokens, 95))
    assert (result.images, result.input_errors) == (row_by_row.images, row_by_row.errors) == (30, 30)
    assert result.input_error_reasons == dict(row_by_row.reasons.most_common())
    assert result.input_error_examples == row_by_row.examples
    assert [e["id"] for e in result.input_error_examples] == ["r002", "r003", "r006", "r007", "r010", "r011",
                                                              "r014", "r015", "r018", "r019"]
    assert len(renders) == 12 + 30  # 12 distinct (image, hint) pairs; the 30 error rows again, one by one


def test_images_carried_in_the_manifest_are_probed_once_per_content(tmp_path: Path, sim, make_job,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Hugging Face image structs repeating the same bytes cost one header read per distinct image."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def jpeg(size: tuple[int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", size, (10, 20, 30)).save(out, "JPEG")
        return out.getvalue()

    images = [jpeg((64, 48)), jpeg((300, 200))]
    cells = [{"bytes": images[i % 2], "path": f"p{i % 2}.jpg"} for i in range(20)]
    table = pa.table({"id": [f"r{i}" for i in range(20)],
                      "image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    pq.write_table(table, tmp_path / "m.parquet")
    probed: list[str] = []

    def counting_probe(ref, resize=None):  # type: ignore[no-untyped-def]
        probed.append(ref.value)
        return probe_image(ref, resize)

    monkeypatch.setattr(estimate_module, "probe_image", counting_probe)
    result = estimate_job(make_job(tmp_path / "m.parquet"))
    assert sorted(probed) == ["p0.jpg", "p1.jpg"]
    assert (result.rows_to_send, result.images) == (20, 20)
    assert result.prompt_tokens_total < 20 * result.prompt_tokens_max  # the two sizes really count differently


def test_url_images_count_at_the_per_image_maximum(tmp_path: Path, sim, make_job) -> None:
    """An http(s) image is not fetched; it counts as the whole pixel budget, under the job's max_pixels too."""
    rows = [{"id": "u", "image": "https://example.com/photo.jpg"}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    default = estimate_job(make_job(manifest))
    # "Describe row u." is 15 characters: 4 tokens; qwen3-vl: 2,621,440 px / 32² = 2,560 tokens + 2 markers.
    assert default.prompt_tokens_total == 4 + 2560 + 2
    assert (default.images_from_urls, default.rows_with_url_images) == (1, 1)
    capped = estimate_job(make_job(manifest, model={"max_pixels": 1_024_000}))
    assert capped.prompt_tokens_total == 4 + 1000 + 2
    assert "not fetched" in render_estimate(default, "text")
    assert sim.requests == []


def test_unknown_model_has_no_cost_but_tokens(tmp_path: Path, sim, make_job) -> None:
    """A model without a price gives cost None and names the model; tokens are still estimated."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3)), model={"name": "acme-vlm-1"})
    result = estimate_job(job)
    assert (result.cost_low, result.cost_high, result.currency) == (None, None, None)
    assert result.unpriced_model == "acme-vlm-1"
    assert result.prompt_tokens_total > 0
    assert "no price for model 'acme-vlm-1'" in render_estimate(result, "text")


TIERED_PRICES = """
[models."tiered-test-model".any]
currency = "USD"
source = "test prices"
as_of = "2026-01-01"
tiers = [
  { max_prompt_tokens = 200, input_per_mtok = 1.0, output_per_mtok = 2.0 },
  { max_prompt_tokens = 1500, input_per_mtok = 10.0, output_per_mtok = 20.0 },
]
"""


def test_each_row_is_priced_at_its_own_tier(tmp_path: Path, sim, make_job) -> None:
    """Small and medium prompts get their own tier's rates; a prompt above the last tier is counted unpriced."""
    prices_path = tmp_path / "prices.toml"
    prices_path.write_text(TIERED_PRICES)
    for name, size in (("small", (64, 48)), ("medium", (1280, 720)), ("large", (3000, 3000))):
        write_image(tmp_path / "img" / f"{name}.jpg", size=size)
    rows = [{"id": name, "image": f"img/{name}.jpg"} for name in ("small", "small2", "medium", "large")]
    rows[1]["image"] = "img/small.jpg"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), model={"name": "tiered-test-model", "max_tokens": 300})
    per_row = {r.key: r.prompt_tokens for r in estimate_rows(job)}
    small, medium = per_row["small"], per_row["medium"]
    assert small <= 200 < medium <= 1500 < per_row["large"]  # the rows really sit in tier 1, tier 2, above
    result = estimate_job(job, prices=PriceTable.from_file(prices_path), typical_completion_tokens=100)
    assert result.cost_low == pytest.approx((2 * (small * 1.0 + 100 * 2.0) + medium * 10.0 + 100 * 20.0) / 1e6)
    assert result.cost_high == pytest.approx((2 * (small * 1.0 + 300 * 2.0) + medium * 10.0 + 300 * 20.0) / 1e6)
    assert result.unpriced_rows == 1
    assert (result.currency, result.price_source, result.price_as_of) == ("USD", "test prices", "2026-01-01")
    assert "1 row(s) above the last priced tier" in render_estimate(result, "text")


@pytest.mark.parametrize(
    ("max_tokens", "given", "expected"),
    [(None, None, DEFAULT_TYPICAL_COMPLETION_TOKENS), (100, None, 100), (1000, None, DEFAULT_TYPICAL_COMPLETION_TOKENS),
     (1000, 400, 400), (300, 400, 300)],
)
def test_typical_completion_default_and_cap(tmp_path: Path, sim, make_job, max_tokens: int | None,
                                            given: int | None, expected: int) -> None:
    """The typical answer is the caller's figure or 150, never more than max_tokens."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 1)), model={"max_tokens": max_tokens})
    assert estimate_job(job, typical_completion_tokens=given).completion_tokens_typical == expected


def test_no_max_tokens_means_no_high_cost(tmp_path: Path, sim, make_job) -> None:
    """Without max_tokens the high cost is None and the text says why; the low cost is still given."""
    result = estimate_job(make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2))))
    assert result.cost_high is None and result.completion_tokens_max is None
    assert result.cost_low is not None and result.cost_low > 0
    text = render_estimate(result, "text")
    assert "no max_tokens set" in text and "no upper bound" in text


@pytest.mark.parametrize(
    ("rpm", "tpm", "latency", "seconds", "bound"),
    [
        (60, 1_000_000, 1.0, 120.0, "requests_per_minute"),  # 120 rows at 1/s; tokens 60 s; rounds 12 s
        (6000, 100_000, 1.0, 600.0, "tokens_per_minute"),  # 10^6 tokens at 100k/min
        (None, None, 1.0, 12.0, "concurrency"),  # 12 rounds of 10 requests
        (None, None, 0.0, None, "unknown"),  # nothing bounds it
    ],
)
def test_wall_time_takes_the_slowest_limit(rpm: float | None, tpm: float | None, latency: float,
                                           seconds: float | None, bound: str) -> None:
    """Wall time is the largest of the per-limit times, and names the limit that gives it."""
    result = wall_time(120, 1_000_000, requests_per_minute=rpm, tokens_per_minute=tpm, concurrency=10,
                       latency_s=latency)
    assert (result.seconds, result.bound_by) == (pytest.approx(seconds) if seconds else None, bound)


def test_wall_time_concurrency_counts_whole_rounds() -> None:
    """Fewer rows than the concurrency still take one whole latency."""
    result = wall_time(5, 0, requests_per_minute=None, tokens_per_minute=None, concurrency=16, latency_s=3.0)
    assert (result.seconds, result.bound_by) == (3.0, "concurrency")


def test_estimate_uses_the_jobs_limits_and_limit_option(tmp_path: Path, sim, make_job) -> None:
    """--limit caps the rows estimated, and the job's requests_per_minute bounds the wall time."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 6)),
                   limits={"requests_per_minute": 1, "concurrency": 4}, run={"limit": 3})
    result = estimate_job(job, assumed_latency_s=2.0)
    assert (result.rows, result.rows_to_send) == (3, 3)
    assert (result.wall_time_s, result.wall_time_bound_by) == (180.0, "requests_per_minute")
    assert result.wall_time_by_limit["concurrency"] == 2.0
    assert "bound by requests_per_minute" in render_estimate(result, "text")


def test_render_json_and_text(tmp_path: Path, sim, make_job) -> None:
    """JSON output round-trips to to_dict(); the text names rows, tokens, cost with its currency and date."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4)), model={"max_tokens": 200})
    result = estimate_job(job)
    assert json.loads(render_estimate(result, "json")) == result.to_dict()
    text = render_estimate(result, "text")
    assert "4 in the manifest, 4 to send" in text
    assert f"{result.prompt_tokens_total:,} total" in text
    assert "USD" in text and f"prices as of {result.price_as_of}" in text
    assert "bound by concurrency" in text


def test_estimate_counts_only_rows_still_to_send(tmp_path: Path, sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a partly done output, estimate counts the rows a run would still send, as run's own plan does."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 6))
    raw = {"input": {"path": str(manifest), "id_column": "id", "image_columns": ["image"]},
           "output": {"path": str(tmp_path / "out")},
           "model": {"name": "qwen3-vl-flash", "base_url": sim.base_url, "api_key_optional": True},
           "prompt": {"user": "Describe row {id}."}, "run": {"progress": "off"}}
    from qwenvl_batch.config import job_from_dict

    run_job(job_from_dict({**raw, "run": {"progress": "off", "limit": 4}}, base_dir=tmp_path))
    result = estimate_job(job_from_dict(raw, base_dir=tmp_path))
    assert (result.rows, result.already_done, result.rows_to_send) == (6, 4, 2)


def test_estimate_refuses_duplicate_ids_like_run(tmp_path: Path, sim, make_job) -> None:
    """Duplicate ids are refused by estimate with the same message run gives."""
    rows = image_rows(tmp_path, 3)
    rows[2]["id"] = rows[0]["id"]
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    with pytest.raises(ConfigError, match="duplicate ids"):
        estimate_job(job)
