"""Summaries of a job's output, for the person who has to explain the run (and its bill) to someone else.

``summarize`` turns the output frame (one row per id) into a plain, JSON-serialisable dict; ``render`` turns
that dict into text, markdown, JSON or long-form CSV. Keeping the two apart means the figures are computed
once and every format shows the same numbers, and the dict can be stored beside the output or diffed.

Every figure is computed from what the frame holds, so an interrupted run (pending rows, missing columns) or a
run where every row failed still gets a summary: a figure that cannot be computed is ``None`` ("n/a"), never
an exception. Costs come from the per-row cost columns (see ``pricing.add_cost_columns``): a model whose rows
used tokens but have no cost is listed as having no price, so a total never silently leaves rows out. Costs
are totalled per currency (an output may hold USD rows from Singapore and CNY rows from Beijing): there is no
exchange rate anyone could audit, so amounts in different currencies are never added up.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import ConfigError
from .structured import answer_lines, summarize_answers

__all__ = ["OUTPUT_COLUMNS", "cell", "grouped_tables", "header_lines", "render", "right_aligned", "summarize"]

#: The columns the runner adds to each manifest row; the summary says which of them a frame lacks.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "status", "response", "reasoning", "finish_reason", "model", "prompt_tokens", "completion_tokens",
    "total_tokens", "reasoning_tokens", "cached_tokens", "image_tokens", "error_type", "error_code",
    "error_message", "attempts", "latency_s", "request_id", "finished_at", "fingerprint",
    "input_cost", "output_cost", "cost", "currency",
)  # fmt: skip

_TOKEN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("reasoning", "reasoning_tokens"),
    ("cached", "cached_tokens"),
    ("image", "image_tokens"),
    ("total", "total_tokens"),
)
_EXAMPLE_CHARS = 200
_PENDING = "pending"  # a row with no status yet: the run was interrupted before it finished
_MISSING = "(missing)"  # a null group key or error type/code
_MAX_BUCKETS = 48  # keeps the throughput table readable for runs of days
_BUCKET_MINUTES = (10, 60, 360, 1440)

# ---------------------------------------------------------------------------------------------- summarize


def summarize(df: pd.DataFrame, *, by: str | None = None) -> dict[str, Any]:
    """Figures for the whole run and, with ``by=COLUMN``, for each value of that (manifest) column.

    Returns ``{"rows", "by", "missing_columns", "overall": SECTION, "groups": [{"group": value, **SECTION}]}``
    where a SECTION has ``rows``, ``status``, ``errors``, ``tokens``, ``cost``, ``latency_s``, ``attempts``
    and ``throughput``. Raises ``ConfigError`` when ``by`` is not a column, listing the ones there are.
    """
    if by is not None and by not in df.columns:
        available = ", ".join(map(str, df.columns)) or "(none)"
        raise ConfigError(f"cannot group the report by {by!r}: no such column. Available columns: {available}")
    groups: list[dict[str, Any]] = []
    if by is not None:
        keys = df[by].astype("string").fillna(_MISSING)
        for value, part in df.groupby(keys, sort=True):
            groups.append({"group": str(value), **_section(part)})
    return {
        "rows": len(df),
        "by": by,
        "missing_columns": [c for c in OUTPUT_COLUMNS if c not in df.columns],
        "simulated_rows": int(df["simulated"].fillna(False).astype(bool).sum()) if "simulated" in df.columns else 0,
        "overall": _section(df),
        "groups": groups,
        "structured": summarize_answers(df),  # [output.schema]: fill rates, parse errors, repairs (structured.py)
    }


def _section(df: pd.DataFrame) -> dict[str, Any]:
    return {
        "rows": len(df),
        "status": _status(df),
        "errors": _errors(df),
        "tokens": _tokens(df),
        "cost": _cost(df),
        "latency_s": _latency(df),
        "attempts": _attempts(df),
        "throughput": _throughput(df),
    }


def _numbers(df: pd.DataFrame, column: str) -> pd.Series:
    """A column as float64 (NaN for nulls and non-numbers); an all-NaN series when the column is absent."""
    if column not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype="float64")
    return pd.to_numeric(df[column], errors="coerce").astype("float64")


def _labels(df: pd.DataFrame, column: str, missing: str = _MISSING) -> pd.Series:
    """A column as strings with ``missing`` for nulls (or for every row when the column is absent)."""
    if column not in df.columns:
        return pd.Series(missing, index=df.index, dtype="string")
    return df[column].astype("string").fillna(missing)


def _float(value: float) -> float | None:
    """A plain float for JSON, ``None`` for NaN/inf (which JSON cannot carry)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _status(df: pd.DataFrame) -> dict[str, int]:
    counts = _labels(df, "status", _PENDING).value_counts()
    order = {"ok": 0, "error": 1, _PENDING: 3}
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (order.get(str(kv[0]), 2), str(kv[0])))}


def _error_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "status" in df.columns:
        return df[df["status"] == "error"]
    if "error_type" in df.columns:
        return df[df["error_type"].notna()]
    return df.iloc[0:0]


def _example(messages: pd.Series) -> str | None:
    """The first message of a group on one line, cut to about 200 characters (messages can be huge)."""
    present = messages.dropna()
    if present.empty:
        return None
    text = " ".join(str(present.iloc[0]).split())
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 1].rstrip() + "…"


def _errors(df: pd.DataFrame) -> list[dict[str, Any]]:
    errors = _error_rows(df)
    if errors.empty:
        return []
    frame = pd.DataFrame(
        {
            "error_type": _labels(errors, "error_type"),
            "error_code": _labels(errors, "error_code"),
            "message": errors["error_message"] if "error_message" in errors.columns else None,
        }
    )
    out = [
        {"error_type": str(t), "error_code": str(c), "count": len(part), "example": _example(part["message"])}
        for (t, c), part in frame.groupby(["error_type", "error_code"], sort=True)
    ]
    return sorted(out, key=lambda e: -e["count"])  # stable: ties keep the type/code order


def _tokens(df: pd.DataFrame) -> dict[str, int | None]:
    out: dict[str, int | None] = {"rows_with_usage": int(_numbers(df, "prompt_tokens").notna().sum())}
    for name, column in _TOKEN_COLUMNS:
        out[name] = int(_numbers(df, column).sum()) if column in df.columns else None
    return out


def _cost(df: pd.DataFrame) -> dict[str, Any]:
    """Costs by currency and by model, and the models whose token usage has no cost (no price)."""
    computed = "cost" in df.columns
    frame = pd.DataFrame(
        {
            "model": _labels(df, "model"),
            "currency": _labels(df, "currency"),
            "input_cost": _numbers(df, "input_cost"),
            "output_cost": _numbers(df, "output_cost"),
            "cost": _numbers(df, "cost"),
            "usage": _numbers(df, "prompt_tokens").notna(),
        }
    )
    priced = frame[frame["cost"].notna()]
    unpriced = frame.loc[frame["usage"] & frame["cost"].isna(), "model"].value_counts().sort_index()
    return {
        "computed": computed,
        "total": _cost_table(priced, ["currency"]),
        "by_model": _cost_table(priced, ["model", "currency"]),
        "unpriced": [{"model": str(model), "rows": int(rows)} for model, rows in unpriced.items()],
    }


def _cost_table(priced: pd.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
    sums = priced.groupby(keys, sort=True).agg(
        rows=("cost", "size"),
        input_cost=("input_cost", "sum"),
        output_cost=("output_cost", "sum"),
        cost=("cost", "sum"),
    )
    out = []
    for key, row in sums.iterrows():
        values = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rows = int(row["rows"])
        out.append(
            {
                **{k: str(v) for k, v in values.items()},
                "rows": rows,
                "input_cost": _float(row["input_cost"]),
                "output_cost": _float(row["output_cost"]),
                "cost": _float(row["cost"]),
                "cost_per_1k_rows": _float(row["cost"] / rows * 1000),
            }
        )
    return out


def _latency(df: pd.DataFrame) -> dict[str, float | int | None]:
    values = _numbers(df, "latency_s").dropna().to_numpy()
    if not values.size:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "count": int(values.size),
        "mean": _float(values.mean()),
        "p50": _float(p50),
        "p95": _float(p95),
        "p99": _float(p99),
        "max": _float(values.max()),
    }


def _attempts(df: pd.DataFrame) -> dict[str, int]:
    values = _numbers(df, "attempts").dropna().astype("int64")
    return {str(k): int(v) for k, v in values.value_counts().sort_index().items()}


def _times(df: pd.DataFrame) -> pd.Series:
    """``finished_at`` as UTC timestamps, nulls dropped, sorted."""
    if "finished_at" not in df.columns:
        return pd.Series([], dtype="datetime64[ns, UTC]")
    return pd.to_datetime(df["finished_at"], utc=True, errors="coerce").dropna().sort_values()


def _bucket_minutes(duration_s: float) -> int:
    """1-minute buckets for a run under 10 minutes, else 10 minutes, widened so there are at most 48."""
    if duration_s < 600:
        return 1
    for minutes in _BUCKET_MINUTES:
        if duration_s / (minutes * 60) < _MAX_BUCKETS:
            return minutes
    return _BUCKET_MINUTES[-1]


def _throughput(df: pd.DataFrame) -> dict[str, Any]:
    """Rows per minute from the first to the last ``finished_at``, and per bucket (gaps show as 0 rows)."""
    times = _times(df)
    if times.empty:
        return {"rows": 0, "first": None, "last": None, "duration_s": None, "rows_per_min": None,
                "bucket_minutes": None, "buckets": []}  # fmt: skip
    first, last = times.iloc[0], times.iloc[-1]
    duration_s = (last - first).total_seconds()
    minutes = _bucket_minutes(duration_s)
    width_s = minutes * 60
    offsets = (times - first).dt.total_seconds().to_numpy()
    counts = np.bincount((offsets // width_s).astype("int64"))
    buckets = []
    for i, count in enumerate(counts):
        span_s = min(width_s, duration_s - i * width_s)
        buckets.append(
            {
                "start": (first + pd.Timedelta(seconds=i * width_s)).isoformat(),
                "rows": int(count),
                "rows_per_min": _float(count / (width_s / 60)),
                "partial": bool(span_s < width_s),
            }
        )
    return {
        "rows": int(times.size),
        "first": first.isoformat(),
        "last": last.isoformat(),
        "duration_s": _float(duration_s),
        "rows_per_min": _float(times.size / (duration_s / 60)) if duration_s > 0 else None,
        "bucket_minutes": minutes,
        "buckets": buckets,
    }


# ---------------------------------------------------------------------------------------------- render

Kind = Literal["str", "int", "cost", "float"]


@dataclass(frozen=True)
class _Column:
    name: str
    kind: Kind = "str"


@dataclass(frozen=True)
class _Table:
    """One table of a section: the unit every format renders (CSV flattens it to key/value rows)."""

    section: str  # machine name, the CSV ``section``
    title: str
    columns: tuple[_Column, ...]
    rows: list[tuple[Any, ...]]
    key_columns: int = 1  # how many leading columns identify a row (the CSV ``key``)


def render(summary: dict[str, Any], fmt: Literal["text", "markdown", "json", "csv"]) -> str:
    """The summary as aligned text, markdown tables, JSON, or one long-form CSV (section, group, key, value).

    No trailing newline: the caller prints it (or writes it with one).
    """
    if fmt == "json":
        return json.dumps(summary, indent=2, ensure_ascii=False)
    tabled = grouped_tables(summary)
    if fmt == "csv":
        return _render_csv(tabled)
    if fmt == "markdown":
        return _render_markdown(summary, tabled)
    if fmt == "text":
        return _render_text(summary, tabled)
    raise ValueError(f"unknown report format {fmt!r} (use text, markdown, json or csv)")


def grouped_tables(summary: dict[str, Any]) -> list[tuple[str, list[_Table]]]:
    """The tables of every section (``all`` first, then each ``--by`` group): what every format renders, so the
    HTML report shows the same tables as the text one."""
    groups = [("all", summary["overall"])] + [(g["group"], g) for g in summary.get("groups", [])]
    return [(name, _tables(section)) for name, section in groups]


def _tables(s: dict[str, Any]) -> list[_Table]:
    tokens, cost, latency, throughput = s["tokens"], s["cost"], s["latency_s"], s["throughput"]
    count = _Column("count", "int")
    cost_columns = (_Column("rows", "int"), _Column("input_cost", "cost"), _Column("output_cost", "cost"),
                    _Column("cost", "cost"), _Column("cost_per_1k_rows", "cost"))  # fmt: skip
    return [
        _Table("status", "Rows by status", (_Column("status"), count), [("rows", s["rows"]), *s["status"].items()]),
        _Table(
            "errors",
            "Errors by type and code",
            (_Column("error_type"), _Column("error_code"), count, _Column("example")),
            [(e["error_type"], e["error_code"], e["count"], e["example"]) for e in s["errors"]],
            key_columns=2,
        ),
        _Table("tokens", "Tokens", (_Column("tokens"), _Column("sum", "int")), list(tokens.items())),
        _Table(
            "cost_total",
            "Cost, total" + ("" if cost["computed"] else " (no cost columns in this output)"),
            (_Column("currency"), *cost_columns),
            [(c["currency"], *(c[col.name] for col in cost_columns)) for c in cost["total"]],
        ),
        _Table(
            "cost_by_model",
            "Cost by model",
            (_Column("model"), _Column("currency"), *cost_columns),
            [(c["model"], c["currency"], *(c[col.name] for col in cost_columns)) for c in cost["by_model"]],
            key_columns=2,
        ),
        _Table(
            "unpriced",
            "Models with token usage but no price (not in the totals)",
            (_Column("model"), _Column("rows", "int")),
            [(u["model"], u["rows"]) for u in cost["unpriced"]],
        ),
        _Table(
            "latency_s",
            "Latency (seconds)",
            (_Column("statistic"), _Column("value", "float")),
            list(latency.items()),
        ),
        _Table(
            "attempts", "Attempts per row", (_Column("attempts"), _Column("rows", "int")), list(s["attempts"].items())
        ),
        _Table(
            "throughput",
            "Throughput (from finished_at)",
            (_Column("figure"), _Column("value")),
            [(k, throughput[k]) for k in ("rows", "first", "last", "duration_s", "rows_per_min", "bucket_minutes")],
        ),
        _Table(
            "throughput_buckets",
            f"Rows finished per {throughput['bucket_minutes'] or '-'}-minute bucket",
            (_Column("start"), _Column("rows", "int"), _Column("rows_per_min", "float"), _Column("partial")),
            [(b["start"], b["rows"], b["rows_per_min"], "yes" if b["partial"] else "") for b in throughput["buckets"]],
        ),
    ]


def cell(value: Any, kind: Kind) -> str:
    """A value for people: thousands separators, costs with 4 decimals, ``n/a`` for unknown."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "cost":
        return f"{value:,.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def right_aligned(column: _Column, cells: Sequence[str]) -> bool:
    return column.kind != "str" or all(c.replace(",", "").replace(".", "").isdigit() for c in cells if c != "n/a")


def header_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"Rows: {summary['rows']:,}"]
    if summary.get("simulated_rows"):
        lines.append(f"SIMULATED: {summary['simulated_rows']:,} row(s) were answered by the built-in simulator "
                     "(--simulate), not the real service")
    if summary.get("by"):
        lines.append(f"Grouped by: {summary['by']}")
    if summary.get("missing_columns"):
        lines.append(f"Columns missing from this output: {', '.join(summary['missing_columns'])}")
    currencies = [c["currency"] for c in summary["overall"]["cost"]["total"]]
    if len(currencies) > 1:
        lines.append(f"Costs are in {len(currencies)} currencies ({', '.join(currencies)}): each has its own total; "
                     "they are never added up or converted")
    unpriced = summary["overall"]["cost"]["unpriced"]
    if unpriced:
        lines.append("No price for: " + ", ".join(u["model"] for u in unpriced) + " (their rows are not in the totals)")
    if summary.get("structured"):
        lines += answer_lines(summary["structured"])
    return lines


def _render_text(summary: dict[str, Any], tabled: list[tuple[str, list[_Table]]]) -> str:
    lines = ["Batch run summary", *header_lines(summary)]
    for group, tables in tabled:
        lines += ["", f"=== {group} ==="]
        for table in tables:
            lines += ["", table.title]
            lines += _text_table(table) if table.rows else ["  (none)"]
    return "\n".join(lines)


def _text_table(table: _Table) -> list[str]:
    cells = [[cell(v, c.kind) for v, c in zip(row, table.columns)] for row in table.rows]
    columns = list(zip(*cells))
    widths = [max(len(c.name), *(len(x) for x in col)) for c, col in zip(table.columns, columns)]
    right = [right_aligned(c, col) for c, col in zip(table.columns, columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return ("  " + "  ".join(parts)).rstrip()

    return [line([c.name for c in table.columns]), *(line(row) for row in cells)]


def _render_markdown(summary: dict[str, Any], tabled: list[tuple[str, list[_Table]]]) -> str:
    lines = ["# Batch run summary", "", *(f"- {line}" for line in header_lines(summary))]
    for group, tables in tabled:
        lines += ["", f"## {group}"]
        for table in tables:
            lines += ["", f"### {table.title}", ""]
            if not table.rows:
                lines.append("_none_")
                continue
            cells = [[cell(v, c.kind).replace("|", "\\|") for v, c in zip(row, table.columns)] for row in table.rows]
            right = [right_aligned(c, col) for c, col in zip(table.columns, zip(*cells))]
            lines.append("| " + " | ".join(c.name for c in table.columns) + " |")
            lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _render_csv(tabled: list[tuple[str, list[_Table]]]) -> str:
    """Long form, one value per line, raw numbers (no separators): easy to load, filter and pivot."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "group", "key", "value"])
    for group, tables in tabled:
        for table in tables:
            values = table.columns[table.key_columns :]
            for row in table.rows:
                key = ":".join(str(v) for v in row[: table.key_columns])
                for column, value in zip(values, row[table.key_columns :]):
                    name = key if len(values) == 1 else f"{key}.{column.name}"
                    writer.writerow([table.section, group, name, "" if value is None else value])
    return out.getvalue().rstrip("\n")
