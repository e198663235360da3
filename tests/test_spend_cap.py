"""The spend cap over loopback: stop before the cap could be exceeded, continue with a higher cap."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import image_rows, write_manifest

from qwenvl_batch import ConfigError, load_results, run_job
from qwenvl_batch.errors import SpendCapReached

# 0.01 per token, so costs are easy to read: a row here costs about 0.9.




def test_spend_cap_stops_before_the_cap_and_a_higher_cap_continues(tmp_path: Path, sim, make_job, priced) -> None:
    """With a cap of 5.0 the run stops with spend <= 5.0; the same cap sends nothing more; a higher cap finishes."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 10))

    def job(cap: float):
        return make_job(manifest, model={"max_tokens": 20}, limits={"max_cost": cap, "concurrency": 2},
                        pricing={"file": str(priced)})

    with pytest.raises(SpendCapReached, match=r"Spend cap reached.*max_cost 5\.0000 USD") as caught:
        run_job(job(5.0))
    first = load_results(tmp_path / "out" / "result.parquet")
    assert 3 <= len(first) < 10 and first["cost"].sum() <= 5.0
    assert caught.value.summary.pending == 10 - len(first)
    sent = len(sim.requests)

    with pytest.raises(SpendCapReached):
        run_job(job(5.0))
    assert len(sim.requests) == sent  # the cap counts what earlier runs spent

    summary = run_job(job(100.0))
    out = pd.read_parquet(tmp_path / "out" / "result.parquet")
    assert len(out) == 10 and summary.skipped_ok == len(first)
    assert out["cost"].sum() <= 100.0 and (out["currency"] == "USD").all()


def test_cost_columns_follow_the_price_file(tmp_path: Path, sim, make_job, priced) -> None:
    """Each row's cost is its own usage at the price file's rates."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3)), pricing={"file": str(priced)})
    run_job(job)
    out = pd.read_parquet(job.output.path)
    expected = (out["prompt_tokens"] + out["completion_tokens"]) * 0.01
    assert out["cost"].round(6).tolist() == expected.round(6).tolist()
    assert (out["input_cost"] + out["output_cost"]).round(6).tolist() == out["cost"].round(6).tolist()


def test_unknown_model_has_null_cost_and_the_summary_says_so(tmp_path: Path, make_job) -> None:
    """A model with no price gets null cost columns and a summary line naming it (not an error)."""
    from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread

    with SimulatorThread(SimulatorConfig(accept_any_model=True)) as server:
        job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)),
                       model={"name": "my-finetune", "base_url": server.base_url})
        summary = run_job(job)
    out = pd.read_parquet(job.output.path)
    assert out["cost"].isna().all() and summary.cost is None
    assert any("no price known for model 'my-finetune'" in line for line in summary.lines())


def test_spend_cap_needs_a_price(tmp_path: Path, sim, make_job) -> None:
    """max_cost on a model without a price is refused up front: the cap could not be enforced."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 1)),
                   model={"name": "my-finetune"}, limits={"max_cost": 1.0})
    with pytest.raises(ConfigError, match="no price is known"):
        run_job(job)


def test_billed_partial_answer_is_counted_in_the_row_cost(tmp_path: Path, sim, make_job, priced) -> None:
    """A partial (x-dashscope-partialresponse) answer is billed: its cost is added to the row that was retried."""
    rows = image_rows(tmp_path, 1)
    rows[0]["note"] = "[[sim:partial:1]]"
    job = make_job(write_manifest(tmp_path / "m.csv", rows), prompt={"user": "Describe row {id}. {note}"},
                   pricing={"file": str(priced)})
    run_job(job)
    out = pd.read_parquet(job.output.path).iloc[0]
    final_attempt = (out["prompt_tokens"] + out["completion_tokens"]) * 0.01
    partial = [r for r in sim.requests if r["outcome"] == "partial"][0]
    billed_before = (partial["prompt_tokens"] + partial["completion_tokens"]) * 0.01
    assert out["attempts"] == 2
    assert out["cost"] == pytest.approx(final_attempt + billed_before)
