"""Run summaries: figures from the output frame, grouping, and the four renderings."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pandas as pd
import pytest

from qwenvl_batch.errors import ConfigError
from qwenvl_batch.pricing import PriceTable, add_cost_columns
from qwenvl_batch.report import OUTPUT_COLUMNS, render, summarize

START = pd.Timestamp("2026-11-01 12:00:00", tz="UTC")
LONG_MESSAGE = "The image length and width do not meet the model restrictions. " * 10


def finished_frame() -> pd.DataFrame:
    """A finished-looking output: 8 rows over 25 minutes, two sources, ok rows, errors and an unknown model."""
    n = 8
    status = ["ok", "ok", "ok", "error", "ok", "error", "ok", "error"]
    ok = [s == "ok" for s in status]

    def usage(values: list[int]) -> pd.arrays.IntegerArray:
        return pd.array([v if good else None for v, good in zip(values, ok)], dtype="Int64")

    df = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "image": [f"img{i}.jpg" for i in range(n)],
            "source": ["scans", "scans", "web", "web", "scans", None, "web", "scans"],
            "status": status,
            "response": ["text" if good else None for good in ok],
            "model": ["qwen3-vl-plus"] * 6 + ["mystery-model", "qwen3-vl-plus"],
            "prompt_tokens": usage([1_000, 2_000, 40_000, 0, 1_500, 0, 700, 0]),
            "completion_tokens": usage([100, 200, 300, 0, 150, 0, 70, 0]),
            "total_tokens": usage([1_100, 2_200, 40_300, 0, 1_650, 0, 770, 0]),
            "reasoning_tokens": usage([0, 50, 0, 0, 0, 0, 0, 0]),
            "cached_tokens": usage([0, 0, 1_000, 0, 0, 0, 0, 0]),
            "image_tokens": usage([900, 1_800, 39_000, 0, 1_400, 0, 600, 0]),
            "error_type": [None, None, None, "input", None, "invalid_request", None, "input"],
            "error_code": [None, None, None, "unreadable", None, "InvalidParameter", None, "unreadable"],
            "error_message": [None, None, None, "cannot open img3.jpg", None, LONG_MESSAGE, None, "cannot open img7.jpg"],
            "attempts": [1, 1, 2, 0, 1, 1, 3, 0],
            "latency_s": [1.0, 2.0, 3.0, None, 4.0, 0.5, 5.0, None],
            "finished_at": [START + pd.Timedelta(minutes=m) for m in (0, 1, 5, 5, 12, 13, 24, 25)],
        }
    )
    return add_cost_columns(df, PriceTable.builtin(), "intl")


def table_lines(text: str, title: str) -> list[str]:
    """The lines of one text table (header and rows) following ``title`` in the first group."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


# ---------------------------------------------------------------------------------------------- figures


def test_summary_figures_of_a_finished_run() -> None:
    """Status, tokens, latency percentiles and attempts match the rows they come from."""
    df = finished_frame()
    s = summarize(df)["overall"]
    assert s["rows"] == 8
    assert s["status"] == {"ok": 5, "error": 3}
    assert s["tokens"] == {
        "rows_with_usage": 5, "prompt": 45_200, "completion": 820, "reasoning": 50,
        "cached": 1_000, "image": 43_700, "total": 46_020,
    }  # fmt: skip
    latencies = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 5.0])
    assert s["latency_s"]["count"] == 6
    assert s["latency_s"]["p50"] == pytest.approx(np.percentile(latencies, 50))
    assert s["latency_s"]["p95"] == pytest.approx(np.percentile(latencies, 95))
    assert s["latency_s"]["p99"] == pytest.approx(np.percentile(latencies, 99))
    assert s["attempts"] == {"0": 2, "1": 4, "2": 1, "3": 1}


def test_errors_grouped_with_truncated_example() -> None:
    """Errors are counted by type and code, most frequent first, each with one example cut to ~200 chars."""
    errors = summarize(finished_frame())["overall"]["errors"]
    assert [(e["error_type"], e["error_code"], e["count"]) for e in errors] == [
        ("input", "unreadable", 2),
        ("invalid_request", "InvalidParameter", 1),
    ]
    assert errors[0]["example"] == "cannot open img3.jpg"
    example = errors[1]["example"]
    assert len(example) <= 200 and example.endswith("…") and example.startswith("The image length")


def test_cost_totals_by_model_and_unpriced() -> None:
    """Cost totals equal the sum of row costs; the model without a price is listed and left out of totals."""
    df = finished_frame()
    cost = summarize(df)["overall"]["cost"]
    expected = float(df["cost"].sum())
    assert cost["computed"] is True
    assert [c["currency"] for c in cost["total"]] == ["USD"]
    assert cost["total"][0]["cost"] == pytest.approx(expected)
    assert cost["total"][0]["rows"] == 4
    assert [(c["model"], c["rows"]) for c in cost["by_model"]] == [("qwen3-vl-plus", 4)]
    assert cost["by_model"][0]["cost_per_1k_rows"] == pytest.approx(expected / 4 * 1000)
    assert cost["unpriced"] == [{"model": "mystery-model", "rows": 1}]


def test_throughput_rate_and_buckets() -> None:
    """Rows per minute run from the first to the last finished_at; a 25-minute run gets 10-minute buckets."""
    t = summarize(finished_frame())["overall"]["throughput"]
    assert t["rows"] == 8
    assert t["duration_s"] == 25 * 60
    assert t["rows_per_min"] == pytest.approx(8 / 25)
    assert t["bucket_minutes"] == 10
    assert [b["rows"] for b in t["buckets"]] == [4, 2, 2]
    assert [b["partial"] for b in t["buckets"]] == [False, False, True]
    assert t["first"] == START.isoformat()


@pytest.mark.parametrize("minutes, width, max_buckets", [(5, 1, 6), (200, 10, 21), (3 * 24 * 60, 360, 13)])
def test_bucket_width_follows_run_length(minutes: int, width: int, max_buckets: int) -> None:
    """Short runs get 1-minute buckets, longer ones 10 minutes, and very long ones wider buckets."""
    df = pd.DataFrame({"status": ["ok", "ok"], "finished_at": [START, START + pd.Timedelta(minutes=minutes)]})
    t = summarize(df)["overall"]["throughput"]
    assert t["bucket_minutes"] == width
    assert len(t["buckets"]) <= max_buckets
    assert sum(b["rows"] for b in t["buckets"]) == 2


def test_summary_is_json_serialisable() -> None:
    """The summary goes through json.dumps without NaN or numpy types, and back unchanged."""
    summary = summarize(finished_frame(), by="source")
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


# ---------------------------------------------------------------------------------------------- grouping


def test_by_groups_every_figure() -> None:
    """With by=source each group has its own rows, status, tokens and cost; a null source is its own group."""
    df = finished_frame()
    summary = summarize(df, by="source")
    groups = {g["group"]: g for g in summary["groups"]}
    assert sorted(groups) == ["(missing)", "scans", "web"]
    assert sum(g["rows"] for g in groups.values()) == 8
    scans = groups["scans"]
    assert scans["status"] == {"ok": 3, "error": 1}
    assert scans["tokens"]["prompt"] == 4_500
    scans_cost = float(df.loc[df["source"] == "scans", "cost"].sum())
    assert scans["cost"]["total"][0]["cost"] == pytest.approx(scans_cost)
    assert groups["web"]["cost"]["unpriced"] == [{"model": "mystery-model", "rows": 1}]
    assert groups["(missing)"]["errors"][0]["error_code"] == "InvalidParameter"


def test_by_missing_column_lists_available() -> None:
    """Grouping by a column that is not there raises ConfigError listing the columns that are."""
    with pytest.raises(ConfigError) as info:
        summarize(finished_frame(), by="sorce")
    assert "'sorce'" in str(info.value)
    assert "source" in str(info.value) and "finished_at" in str(info.value)


# ---------------------------------------------------------------------------------------------- partial frames


def test_interrupted_run_with_few_columns() -> None:
    """A frame with only id/status (pending rows) still summarises, with missing columns listed and n/a figures."""
    df = pd.DataFrame({"id": ["a", "b", "c"], "status": ["ok", None, None]})
    summary = summarize(df)
    s = summary["overall"]
    assert s["status"] == {"ok": 1, "pending": 2}
    assert s["tokens"]["prompt"] is None and s["tokens"]["rows_with_usage"] == 0
    assert s["cost"] == {"computed": False, "total": [], "by_model": [], "unpriced": []}
    assert s["latency_s"]["p50"] is None
    assert s["throughput"]["rows_per_min"] is None and s["throughput"]["buckets"] == []
    assert "prompt_tokens" in summary["missing_columns"] and "status" not in summary["missing_columns"]
    for fmt in ("text", "markdown", "json", "csv"):
        assert render(summary, fmt)
    assert "n/a" in render(summary, "text")


def test_all_rows_error() -> None:
    """A run where every row failed has zero tokens, no cost total, and its errors summarised."""
    df = finished_frame()
    df = df[df["status"] == "error"]
    s = summarize(df)["overall"]
    assert s["status"] == {"error": 3}
    assert s["tokens"]["prompt"] == 0
    assert s["cost"]["total"] == [] and s["cost"]["unpriced"] == []
    assert sum(e["count"] for e in s["errors"]) == 3
    text = render(summarize(df), "text")
    assert table_lines(text, "Cost, total") == ["  (none)"]


def test_usage_without_cost_columns_is_unpriced() -> None:
    """When the frame has usage but no cost columns, every model with usage is reported as having no price."""
    df = finished_frame().drop(columns=["input_cost", "output_cost", "cost", "currency"])
    cost = summarize(df)["overall"]["cost"]
    assert cost["computed"] is False
    assert cost["unpriced"] == [{"model": "mystery-model", "rows": 1}, {"model": "qwen3-vl-plus", "rows": 4}]


def test_empty_frame() -> None:
    """A frame with no rows summarises to zeros and renders."""
    summary = summarize(pd.DataFrame(columns=list(OUTPUT_COLUMNS)))
    assert summary["overall"]["rows"] == 0 and summary["overall"]["status"] == {}
    assert render(summary, "text").startswith("Batch run summary")


# ---------------------------------------------------------------------------------------------- render


def big_frame() -> pd.DataFrame:
    """The finished frame with token counts large enough to need thousands separators."""
    df = finished_frame()
    return df.assign(prompt_tokens=df["prompt_tokens"] * 1_000)


def test_text_is_aligned_with_separators_and_4_decimal_costs() -> None:
    """Text shows 45,200,000-style numbers right-aligned in columns and costs with 4 decimals plus currency."""
    text = render(summarize(big_frame()), "text")
    tokens = table_lines(text, "Tokens")
    assert tokens[0].split() == ["tokens", "sum"]
    assert "45,200,000" in text
    assert len({len(line) for line in tokens}) == 1  # right-aligned numbers end in the same column
    total = table_lines(text, "Cost, total")
    assert total[1].split()[0] == "USD"
    cost = total[1].split()[4]
    assert len(cost.split(".")[1]) == 4
    assert "No price for: mystery-model" in text


def test_markdown_tables() -> None:
    """Markdown has a heading per group and pipe tables with right-aligned number columns."""
    md = render(summarize(finished_frame(), by="source"), "markdown")
    assert "## all" in md and "## scans" in md and "### Cost by model" in md
    assert "| model | currency | rows | input_cost | output_cost | cost | cost_per_1k_rows |" in md
    assert "|---|---|---:|---:|---:|---:|---:|" in md


def test_csv_long_form() -> None:
    """CSV is one table (section, group, key, value) with raw numbers that add up to the summary."""
    df = finished_frame()
    out = render(summarize(df, by="source"), "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert set(rows[0]) == {"section", "group", "key", "value"}
    lookup = {(r["section"], r["group"], r["key"]): r["value"] for r in rows}
    assert float(lookup[("cost_total", "all", "USD.cost")]) == pytest.approx(float(df["cost"].sum()))
    assert lookup[("status", "web", "ok")] == "2"
    assert lookup[("errors", "all", "input:unreadable.count")] == "2"
    assert lookup[("tokens", "all", "prompt")] == "45200"
    assert {r["group"] for r in rows} == {"all", "scans", "web", "(missing)"}


def test_json_render_round_trips() -> None:
    """JSON rendering is the summary itself."""
    summary = summarize(finished_frame())
    assert json.loads(render(summary, "json")) == summary


def test_unknown_format() -> None:
    """An unknown format is refused with the list of formats."""
    with pytest.raises(ValueError, match="text, markdown, json or csv"):
        render(summarize(finished_frame()), "html")  # type: ignore[arg-type]
