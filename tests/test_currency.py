"""Costs in more than one currency: a Beijing job costed in CNY end to end, the cap's currency, per-currency totals.

The end-to-end tests run a job with ``region = "cn"`` against the project's simulator on 127.0.0.1 (the base URL
is passed to ``run_job``, so the job keeps its region and therefore Beijing's built-in CNY prices).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import FAST_LIMITS, image_rows, write_manifest

from qwenvl_batch import ConfigError, job_from_dict, load_results, run_job
from qwenvl_batch.config import JobConfig
from qwenvl_batch.currency import committed_spend, parse_amount
from qwenvl_batch.errors import SpendCapReached
from qwenvl_batch.estimate import estimate_job
from qwenvl_batch.pricing import PriceTable
from qwenvl_batch.report import render, summarize
from qwenvl_batch.simulator import SimulatorThread

BUILTIN = PriceTable.builtin()
FLASH_CN_IN, FLASH_CN_OUT = 0.15, 1.5  # CNY per 1M tokens, qwen3-vl-flash in Beijing, prompts up to 32K


@pytest.fixture
def region_job(tmp_path: Path) -> Callable[..., JobConfig]:
    """A job over a manifest in tmp_path with a region (so region prices apply); run it with base_url=sim."""

    def build(manifest: Path, *, region: str = "cn", limits: dict[str, Any] | None = None,
              model: dict[str, Any] | None = None, output: Path | None = None) -> JobConfig:
        raw = {
            "input": {"path": str(manifest), "id_column": "id", "image_columns": ["image"]},
            "output": {"path": str(output or tmp_path / "out" / "result.parquet")},
            "model": {"name": "qwen3-vl-flash", "region": region, "api_key_optional": True,
                      "api_key_env": "QWENVL_TEST_KEY", "max_tokens": 200, **(model or {})},
            "prompt": {"user": "Describe row {id}."},
            "limits": {**FAST_LIMITS, **(limits or {})},
            "run": {"progress": "off"},
        }
        return job_from_dict(raw, base_dir=tmp_path)

    return build


# ---------------------------------------------------------------------------------------------- a Beijing job


def test_beijing_job_is_costed_in_cny_end_to_end(tmp_path: Path, sim: SimulatorThread, region_job) -> None:
    """Every row's cost is its usage at Beijing's CNY rates; the run summary and the report total say CNY."""
    job = region_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 6)))
    summary = run_job(job, base_url=sim.base_url)
    out = load_results(job.output.path)

    assert len(out) == 6 and (out["status"] == "ok").all() and (out["currency"] == "CNY").all()
    expected = (out["prompt_tokens"] * FLASH_CN_IN + out["completion_tokens"] * FLASH_CN_OUT) / 1e6
    assert out["cost"].tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert out["input_cost"].tolist() == pytest.approx((out["prompt_tokens"] * FLASH_CN_IN / 1e6).tolist())

    assert summary.currency == "CNY" and summary.cost == pytest.approx(expected.sum())
    assert any(line.startswith("cost this run:") and line.endswith(" CNY") for line in summary.lines())

    report = summarize(out)
    assert [(t["currency"], t["rows"]) for t in report["overall"]["cost"]["total"]] == [("CNY", 6)]
    assert report["overall"]["cost"]["total"][0]["cost"] == pytest.approx(expected.sum())
    assert report["overall"]["cost"]["unpriced"] == []
    text = render(report, "text")
    assert "  CNY " in text and "USD" not in text


def test_beijing_spend_cap_in_cny_stops_and_continues(tmp_path: Path, sim: SimulatorThread, region_job) -> None:
    """A cap of "0.001 CNY" stops the run within it; the same cap sends nothing more; a bare 1.0 (CNY) finishes."""
    manifest = write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 10))

    def job(cap: float | str) -> JobConfig:
        return region_job(manifest, limits={"max_cost": cap, "concurrency": 1})  # in order: the same row is next

    assert job("0.001 CNY").limits.max_cost_currency == "CNY"
    with pytest.raises(SpendCapReached, match=r"CNY spent.*max_cost 0\.0010 CNY") as caught:
        run_job(job("0.001 CNY"), base_url=sim.base_url)
    first = load_results(tmp_path / "out" / "result.parquet")
    assert 1 <= len(first) < 10 and first["cost"].sum() <= 0.001 and (first["currency"] == "CNY").all()
    assert caught.value.summary.currency == "CNY"
    sent = len(sim.requests)

    with pytest.raises(SpendCapReached):
        run_job(job("0.001 CNY"), base_url=sim.base_url)
    assert len(sim.requests) == sent  # the CNY spend of the first run counts toward the CNY cap
    assert load_results(tmp_path / "out" / "result.parquet")["cost"].sum() <= 0.001

    summary = run_job(job(1.0), base_url=sim.base_url)  # a bare number: the price's currency, CNY
    out = pd.read_parquet(tmp_path / "out" / "result.parquet")
    assert len(out) == 10 and summary.skipped_ok == len(first) and summary.currency == "CNY"
    assert out["cost"].sum() <= 1.0


def test_cap_in_usd_on_a_beijing_job_is_refused_before_sending(tmp_path: Path, sim: SimulatorThread,
                                                               region_job) -> None:
    """max_cost = "5 USD" on a job priced in CNY is a ConfigError naming both currencies; nothing is sent."""
    job = region_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)), limits={"max_cost": "5 USD"})
    with pytest.raises(ConfigError, match=r"max_cost is 5 USD, but model 'qwen3-vl-flash' \(cn\) is priced in CNY"):
        run_job(job, base_url=sim.base_url)
    assert sim.requests == [] and not job.output.path.exists()
    with pytest.raises(ConfigError, match="priced in CNY"):
        estimate_job(job)


def test_cny_cap_on_an_output_with_usd_spend_is_refused(tmp_path: Path, sim: SimulatorThread, region_job) -> None:
    """An output that already records USD spend cannot take a CNY cap (it could not count it); without one it runs."""
    output = tmp_path / "out" / "mixed.parquet"
    usd = region_job(write_manifest(tmp_path / "a.csv", image_rows(tmp_path, 2, prefix="a")), region="intl",
                     output=output)
    run_job(usd, base_url=sim.base_url)
    manifest_b = write_manifest(tmp_path / "b.csv", image_rows(tmp_path, 2, prefix="b"))
    sent = len(sim.requests)

    capped = region_job(manifest_b, output=output, limits={"max_cost": "1 CNY"})
    with pytest.raises(ConfigError, match=r"already records spend in another currency \(0\.0000\d+ USD\)"):
        run_job(capped, base_url=sim.base_url)
    assert len(sim.requests) == sent

    run_job(region_job(manifest_b, output=output), base_url=sim.base_url)
    report = summarize(load_results(output))
    totals = {t["currency"]: t["rows"] for t in report["overall"]["cost"]["total"]}
    assert totals == {"CNY": 2, "USD": 2}
    assert "Costs are in 2 currencies (CNY, USD)" in render(report, "text")


def test_us_deployment_model_is_costed_at_its_usd_price(tmp_path: Path, sim: SimulatorThread, region_job) -> None:
    """A -us model in region us (the simulator takes the suffix) is costed at the US deployment's USD rates."""
    job = region_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 2)), region="us",
                     model={"name": "qwen3-vl-flash-us"})
    run_job(job, base_url=sim.base_url)
    out = load_results(job.output.path)
    assert (out["currency"] == "USD").all() and (out["status"] == "ok").all()
    expected = (out["prompt_tokens"] * 0.05 + out["completion_tokens"] * 0.40) / 1e6
    assert out["cost"].tolist() == pytest.approx(expected.tolist(), rel=1e-12)


def test_estimate_of_a_beijing_job_is_in_cny(tmp_path: Path, region_job) -> None:
    """The estimate of a Beijing job uses the CNY price list (its source and date), not Singapore's USD."""
    job = region_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 3)), limits={"max_cost": 10})
    result = estimate_job(job)
    assert result.currency == "CNY" and result.price_source == BUILTIN.lookup("qwen3-vl-flash", "cn").source
    low = (result.prompt_tokens_total * FLASH_CN_IN + 3 * result.completion_tokens_typical * FLASH_CN_OUT) / 1e6
    assert result.cost_low == pytest.approx(low)


# ---------------------------------------------------------------------------------------------- the cap's currency


@pytest.mark.parametrize(
    "value, expected",
    [(25, (25.0, None)), (2.5, (2.5, None)), ("25", (25.0, None)), ("50 CNY", (50.0, "CNY")),
     ("CNY 50", (50.0, "CNY")), ("7.5usd", (7.5, "USD")), (" .5 EUR ", (0.5, "EUR")), ("0", (0.0, None))],
)
def test_parse_amount_reads_a_number_and_an_optional_code(value: Any, expected: tuple[float, str | None]) -> None:
    """A number, alone or with a 3-letter code before or after it, in any case."""
    assert parse_amount(value) == expected


@pytest.mark.parametrize("value", [-1, "-5 CNY", "50 CNY USD", "CNY 50 USD", "fifty", "50 CN", "50 yuan", True, None])
def test_parse_amount_refuses_anything_else(value: Any) -> None:
    """Negative amounts, two codes, words and codes that are not three letters are refused with what to write."""
    with pytest.raises(ValueError, match=r'such as 25 or "50 CNY"|>= 0'):
        parse_amount(value)


def _job(tmp_path: Path, limits: dict[str, Any], overrides: dict[str, Any] | None = None) -> JobConfig:
    raw = {"input": {"path": "m.csv"}, "output": {"path": "out"}, "model": {"name": "qwen3-vl-flash", "region": "cn"},
           "limits": limits}
    return job_from_dict(raw, base_dir=tmp_path, overrides=overrides)


def test_job_file_cap_forms(tmp_path: Path) -> None:
    """max_cost takes "50 CNY" or a number plus max_cost_currency (upper-cased); --max-cost replaces both."""
    assert (_job(tmp_path, {"max_cost": "50 cny"}).limits.max_cost, _job(tmp_path, {"max_cost": "50 cny"}).limits
            .max_cost_currency) == (50.0, "CNY")
    stated = _job(tmp_path, {"max_cost": 50, "max_cost_currency": "cny"}).limits
    assert (stated.max_cost, stated.max_cost_currency) == (50.0, "CNY")
    assert _job(tmp_path, {"max_cost": 50}).limits.max_cost_currency is None
    flag = _job(tmp_path, {"max_cost": 50, "max_cost_currency": "CNY"}, overrides={"max_cost": "7 USD"}).limits
    assert (flag.max_cost, flag.max_cost_currency) == (7.0, "USD")
    bare_flag = _job(tmp_path, {"max_cost": "50 CNY"}, overrides={"max_cost": "30"}).limits
    assert (bare_flag.max_cost, bare_flag.max_cost_currency) == (30.0, None)


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_cost": "50 CNY", "max_cost_currency": "USD"}, "max_cost is in CNY but max_cost_currency is USD"),
        ({"max_cost": 50, "max_cost_currency": "yuan"}, "3-letter currency code"),
        ({"max_cost": "lots"}, 'such as 25 or "50 CNY"'),
        ({"max_cost": "-3 CNY"}, 'such as 25 or "50 CNY"'),
    ],
)
def test_job_file_cap_errors_name_the_key(tmp_path: Path, limits: dict[str, Any], message: str) -> None:
    """A cap that cannot be read is a ConfigError that names [limits] and says what to write."""
    with pytest.raises(ConfigError, match="'limits'") as caught:
        _job(tmp_path, limits)
    assert message in str(caught.value)


def test_committed_spend_keeps_currencies_apart(tmp_path: Path) -> None:
    """Only spend in the cap's currency counts; other currencies refuse a cap and are ignored without one."""
    costs = {"USD": 1.25, "CNY": 3.0}
    assert committed_spend(costs, "CNY", output=tmp_path, capped=False) == 3.0
    assert committed_spend({"CNY": 3.0, "USD": 0.0}, "CNY", output=tmp_path, capped=True) == 3.0
    assert committed_spend({}, "USD", output=tmp_path, capped=True) == 0.0
    with pytest.raises(ConfigError, match=r"another currency \(1\.25 USD\)"):
        committed_spend(costs, "CNY", output=tmp_path, capped=True)


# ---------------------------------------------------------------------------------------------- reports


def test_report_totals_each_currency_on_its_own() -> None:
    """A frame with USD and CNY rows gets one total per currency and per (model, currency), never a sum of both."""
    frame = pd.DataFrame(
        {
            "model": ["qwen3-vl-flash", "qwen3-vl-flash", "qwen3-vl-flash", "qwen-vl-max"],
            "currency": ["USD", "CNY", "CNY", "CNY"],
            "prompt_tokens": [10, 10, 10, 10],
            "input_cost": [1.0, 2.0, 3.0, 4.0],
            "output_cost": [0.5, 0.5, 0.5, 0.5],
            "cost": [1.5, 2.5, 3.5, 4.5],
        }
    )
    cost = summarize(frame)["overall"]["cost"]
    assert [(t["currency"], t["rows"], t["cost"]) for t in cost["total"]] == [("CNY", 3, 10.5), ("USD", 1, 1.5)]
    assert [(m["model"], m["currency"], m["cost"]) for m in cost["by_model"]] == [
        ("qwen-vl-max", "CNY", 4.5), ("qwen3-vl-flash", "CNY", 6.0), ("qwen3-vl-flash", "USD", 1.5)]
    text = render(summarize(frame), "text")
    assert "Costs are in 2 currencies (CNY, USD): each has its own total" in text
    assert "12.0000" not in text  # 10.5 CNY + 1.5 USD is never shown as one figure
