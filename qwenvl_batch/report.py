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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError
from .structured import ANSWER_PREFIX, answer_lines, summarize_answers

__all__ = [
    "OUTPUT_COLUMNS", "Summary", "cell", "floats", "frame_table", "grouped_tables", "header_lines", "label_column",
    "output_table", "render", "right_aligned", "scan_output", "summarize", "summarize_output",
]  # fmt: skip

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
    summary = Summary(list(df.columns), by=by)
    summary.add(frame_table(df, by))
    return summary.result(structured=summarize_answers(df))


def summarize_output(path: str | Path, *, by: str | None = None) -> dict[str, Any]:
    """``summarize(load_results(path), by=by)``, without loading the output (see ``scan_output``)."""
    summary, structured = scan_output(path, by=by)
    return summary.result(structured=structured)


def scan_output(path: str | Path, *, by: str | None = None,
                also: Callable[[pa.Table], None] | None = None) -> tuple[Summary, dict[str, Any] | None]:
    """The summary of an output folder and its structured-answer figures, built a part at a time: the columns
    the figures need are read by ``output_scan.newest_rows`` (the newest row per id, as ``load_results`` keeps)
    and totalled as they come, so memory holds running totals plus the latencies and finish times (percentiles
    and throughput buckets need every value: 16 bytes a row). ``also`` sees every normalised table too (the
    HTML report's charts are computed in the same pass)."""
    from .output_scan import newest_rows, output_columns
    from .store import open_for_reading

    store = open_for_reading(path)
    columns = output_columns(store)
    summary = Summary(columns, by=by)
    answers = [c for c in columns if c.startswith(ANSWER_PREFIX) or c in ("repairs", "repair_cost")]
    wanted = [c for c in (*SUMMARY_COLUMNS, *answers, *([by] if by else [])) if c in columns]
    structured: dict[str, Any] | None = None
    for table in newest_rows(store, wanted):
        chunk = output_table(table, columns, by)
        summary.add(chunk)
        if also is not None:
            also(chunk)
        if any(c.startswith(ANSWER_PREFIX) for c in answers):
            part = table.select([c for c in (*answers, "error_type", "error_code", "currency") if c in columns])
            structured = _merge_answers(structured, summarize_answers(part.to_pandas()), summary.overall.rows,
                                        table.num_rows)
    return summary, structured


#: The output columns a summary reads (plus the ``--by`` column and a structured job's answer columns).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "status", "model", "currency", "error_type", "error_code", "error_message", *(c for _, c in _TOKEN_COLUMNS),
    "input_cost", "output_cost", "cost", "latency_s", "attempts", "finished_at", "simulated",
)  # fmt: skip
_LABELS = ("status", "model", "currency", "error_type", "error_code", "error_message")
_NUMBERS = (*(c for _, c in _TOKEN_COLUMNS), "input_cost", "output_cost", "cost", "latency_s", "attempts")
_BY = "__by__"  # the --by column's labels in a normalised table
_ROWS = "__rows__"  # keeps a table's length when it has none of the columns


def frame_table(df: pd.DataFrame, by: str | None = None) -> pa.Table:
    """The summary's columns of a frame as one normalised Arrow table (what ``Summary.add`` takes): labels as
    strings, numbers as float64 (anything that is not a number is null, as ``pd.to_numeric(errors="coerce")``
    makes it), ``finished_at`` as UTC timestamps, the ``--by`` column's values as text. Columns the frame lacks
    are left out, so the summary can say which are missing."""
    columns: dict[str, pa.Array] = {_ROWS: pa.nulls(len(df))}
    for name in _LABELS:
        if name in df.columns:
            text = df[name].astype("string")
            columns[name] = pa.array(text.to_numpy(dtype=object), pa.string(), mask=text.isna().to_numpy())
    for name in _NUMBERS:
        if name in df.columns:
            values = pd.to_numeric(df[name], errors="coerce").astype("float64").to_numpy()
            columns[name] = pa.array(values, pa.float64(), from_pandas=True)
    if "finished_at" in df.columns:
        stamps = pd.Series(pd.to_datetime(df["finished_at"], utc=True, errors="coerce")).dt.as_unit("ns")
        columns["finished_at"] = pa.array(stamps, pa.timestamp("ns", tz="UTC"))
    if "simulated" in df.columns:
        columns["simulated"] = pa.array(df["simulated"].fillna(False).astype(bool).to_numpy())
    if by is not None and by in df.columns:
        columns[_BY] = pa.array(df[by].astype("string").fillna(_MISSING).to_numpy(dtype=object), pa.string())
    return pa.table(columns)


def output_table(table: pa.Table, present: list[str], by: str | None = None) -> pa.Table:
    """A table read from an output (``output_scan.newest_rows``), normalised as ``frame_table`` does; columns
    no part of the output has (``present``) are left out, as they would be missing from ``load_results``."""
    columns: dict[str, pa.Array | pa.ChunkedArray] = {_ROWS: pa.nulls(table.num_rows)}
    for name in _LABELS:
        if name in present:
            columns[name] = table.column(name).cast(pa.string())
    for name in _NUMBERS:  # integers stay integers (sums exact, no cast of 10^7 values); nulls of old parts cast
        if name in present:
            column = table.column(name)
            numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            columns[name] = column if numeric else column.cast(pa.float64())
    if "finished_at" in present:
        column = table.column("finished_at")
        columns["finished_at"] = column if pa.types.is_timestamp(column.type) else \
            column.cast(pa.timestamp("us", tz="UTC"))
    if "simulated" in present:
        columns["simulated"] = pc.fill_null(table.column("simulated").cast(pa.bool_()), False)
    if by is not None and by in present:  # as load_results + summarize: pandas' text for the column's values
        labels = table.column(by).to_pandas().astype("string").fillna(_MISSING)
        columns[_BY] = pa.array(labels.to_numpy(dtype=object), pa.string())
    return pa.table(columns)


class Summary:
    """The summary, built from normalised tables (``frame_table``, ``output_table``) added one at a time: counts
    and sums are kept as running totals, latencies and finish times as arrays (percentiles and buckets need them).
    A table's rows must not be added twice; every table must come from the same columns."""

    def __init__(self, columns: list[str], *, by: str | None = None) -> None:
        if by is not None and by not in columns:
            available = ", ".join(map(str, columns)) or "(none)"
            raise ConfigError(f"cannot group the report by {by!r}: no such column. Available columns: {available}")
        self.columns = columns
        self.by = by
        self.overall = _Section()
        self.groups: dict[str, _Section] = {}
        self.simulated = 0

    def add(self, table: pa.Table) -> None:
        self.overall.add(table)
        if "simulated" in table.column_names:
            self.simulated += int(pc.sum(table.column("simulated").cast(pa.int64())).as_py() or 0)
        if self.by is None or _BY not in table.column_names:
            return
        labels = table.column(_BY)
        for value in pc.unique(labels).to_pylist():
            self.groups.setdefault(value, _Section()).add(table.filter(pc.equal(labels, value)))

    def result(self, *, structured: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "rows": self.overall.rows,
            "by": self.by,
            "missing_columns": [c for c in OUTPUT_COLUMNS if c not in self.columns],
            "simulated_rows": self.simulated,
            "overall": self.overall.result(),
            "groups": [{"group": key, **self.groups[key].result()} for key in sorted(self.groups)],
            "structured": structured,  # [output.schema]: fill rates, parse errors, repairs (structured.py)
        }


def _merge_answers(total: dict[str, Any] | None, part: dict[str, Any] | None, rows_before: int,
                   rows: int) -> dict[str, Any] | None:
    """Two tables' ``summarize_answers`` as one (fill rates weighted by rows; counts and costs added)."""
    if part is None or total is None:
        return part if total is None else total
    before = rows_before - rows  # Summary.add has already counted this table's rows
    fill = {name: (round((total["fill_rate"].get(name) or 0.0) * before) + round((rate or 0.0) * rows))
            / (before + rows) if before + rows else None for name, rate in part["fill_rate"].items()}
    codes = Counter(total["parse_error_codes"]) + Counter(part["parse_error_codes"])
    costs = Counter(total["repair_cost"]) + Counter(part["repair_cost"])
    return {
        "fill_rate": fill,
        "parse_errors": total["parse_errors"] + part["parse_errors"],
        "parse_error_codes": dict(codes.most_common()),
        "rows_repaired": total["rows_repaired"] + part["rows_repaired"],
        "repairs": total["repairs"] + part["repairs"],
        "repair_cost": {k: round(v, 6) for k, v in sorted(costs.items())},
    }


def _float(value: float) -> float | None:
    """A plain float for JSON, ``None`` for NaN/inf (which JSON cannot carry)."""
    value = float(value)
    return value if math.isfinite(value) else None


def label_column(table: pa.Table, column: str, missing: str = _MISSING) -> pa.Array | pa.ChunkedArray:
    """A label column with ``missing`` for nulls (or for every row when the column is absent)."""
    if column not in table.column_names:
        return pa.repeat(pa.scalar(missing), table.num_rows)
    return pc.fill_null(table.column(column), missing)


def _counts(values: pa.Array | pa.ChunkedArray) -> Counter[Any]:
    counted = pc.value_counts(values)
    return Counter(dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())))


def _only(table: pa.Table, columns: list[str]) -> pa.Table:
    """The table with just those of ``columns`` it has (filtering a few columns is cheaper than all of them)."""
    return table.select([c for c in columns if c in table.column_names])


def _encoded(labels: pa.Array | pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """A label column as (its distinct values, each row's index into them)."""
    encoded = pc.dictionary_encode(labels)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def floats(table: pa.Table, column: str) -> np.ndarray:
    """A number column as float64 with NaN for nulls (all NaN when the column is absent)."""
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(column).cast(pa.float64()).to_numpy(zero_copy_only=False)


def _finite(table: pa.Table, column: str) -> np.ndarray:
    """A number column's values, nulls and NaN dropped (empty when the column is absent)."""
    if column not in table.column_names:
        return np.empty(0)
    values = pc.drop_null(table.column(column)).to_numpy()
    return values[~np.isnan(values)]


_SUM0 = pc.ScalarAggregateOptions(min_count=0)  # a sum over no values (or nulls only) is 0, as in pandas


class _Section:
    """Running totals of one section (the whole output, or one ``--by`` group)."""

    def __init__(self) -> None:
        self.rows = 0
        self.status: Counter[str] = Counter()
        self.errors: dict[tuple[str, str], list[Any]] = {}  # (type, code) -> [count, first message or None]
        self.usage_rows = 0
        self.tokens: dict[str, int | None] = {name: None for name, _ in _TOKEN_COLUMNS}
        self.cost_computed = False
        self.cost_total: dict[tuple[str, ...], list[Any]] = {}  # key -> [rows, [input], [output], [cost] per table]
        self.cost_model: dict[tuple[str, ...], list[Any]] = {}
        self.unpriced: Counter[str] = Counter()
        self.latency: list[np.ndarray] = []
        self.attempts: Counter[int] = Counter()
        self.times_ns: list[np.ndarray] = []

    def add(self, t: pa.Table) -> None:
        self.rows += t.num_rows
        self.status.update(_counts(label_column(t, "status", _PENDING)))
        self._add_errors(t)
        if "prompt_tokens" in t.column_names:
            self.usage_rows += t.num_rows - t.column("prompt_tokens").null_count
        for name, column in _TOKEN_COLUMNS:
            if column in t.column_names:
                self.tokens[name] = (self.tokens[name] or 0) + int(pc.sum(t.column(column), options=_SUM0).as_py())
        self._add_cost(t)
        self.latency.append(_finite(t, "latency_s"))
        attempts, counts = np.unique(_finite(t, "attempts").astype("int64"), return_counts=True)
        self.attempts.update(dict(zip(attempts.tolist(), counts.tolist())))
        if "finished_at" in t.column_names:
            stamps = pc.drop_null(t.column("finished_at")).to_numpy()
            self.times_ns.append(stamps.astype("datetime64[ns]").view(np.int64))

    def _add_errors(self, t: pa.Table) -> None:
        wanted = _only(t, ["error_type", "error_code", "error_message"])
        if "status" in t.column_names:
            rows = wanted.filter(pc.fill_null(pc.equal(t.column("status"), "error"), False))
        elif "error_type" in t.column_names:
            rows = wanted.filter(pc.is_valid(t.column("error_type")))
        else:
            return
        if not rows.num_rows:
            return
        message = rows.column("error_message") if "error_message" in rows.column_names else \
            pa.nulls(rows.num_rows, pa.string())
        keys = {"t": label_column(rows, "error_type"), "c": label_column(rows, "error_code")}
        grouped = pa.table({**keys, "m": message}).group_by(["t", "c"], use_threads=False) \
            .aggregate([("t", "count"), ("m", "first")])  # in order: "first" is the group's first message
        for row in grouped.to_pylist():
            entry = self.errors.setdefault((row["t"], row["c"]), [0, None])
            entry[0] += row["t_count"]
            if entry[1] is None:
                entry[1] = row["m_first"]

    def _add_cost(self, t: pa.Table) -> None:
        self.cost_computed |= "cost" in t.column_names
        cost = t.column("cost") if "cost" in t.column_names else pa.nulls(t.num_rows, pa.float64())
        if "prompt_tokens" in t.column_names:
            usage = pc.and_(pc.is_valid(t.column("prompt_tokens")), pc.is_null(cost))
            self.unpriced.update(_counts(label_column(_only(t, ["model"]).filter(usage), "model")))
        priced = _only(t, ["model", "currency", "input_cost", "output_cost", "cost"])
        if cost.null_count:
            priced = priced.filter(pc.is_valid(cost))
        if not priced.num_rows:
            return
        models, currencies = (_encoded(label_column(priced, c)) for c in ("model", "currency"))
        groups = models[1] * len(currencies[0]) + currencies[1]
        amounts = [floats(priced, c) for c in ("input_cost", "output_cost", "cost")]
        single = len(models[0]) * len(currencies[0]) == 1
        for code in ([0] if single else np.flatnonzero(np.bincount(groups)).tolist()):
            mask = None if single else groups == code
            rows = priced.num_rows if mask is None else int(mask.sum())
            # numpy's pairwise sums per table, added exactly (math.fsum) at the end: the totals a sum over the
            # whole column would give, to the last digits, whatever the number of parts
            parts = [float(np.nansum(a if mask is None else a[mask])) for a in amounts]
            model, currency = models[0][code // len(currencies[0])], currencies[0][code % len(currencies[0])]
            for entry in (self.cost_model.setdefault((model, currency), [0, [], [], []]),
                          self.cost_total.setdefault((currency,), [0, [], [], []])):
                entry[0] += rows
                for i, part in enumerate(parts, start=1):
                    entry[i].append(part)

    def result(self) -> dict[str, Any]:
        order = {"ok": 0, "error": 1, _PENDING: 3}
        status = {str(k): int(v) for k, v in sorted(self.status.items(), key=lambda kv: (order.get(kv[0], 2), kv[0]))}
        errors = [{"error_type": t, "error_code": c, "count": int(n), "example": _example(m)}
                  for (t, c), (n, m) in sorted(self.errors.items())]
        tokens: dict[str, int | None] = {"rows_with_usage": self.usage_rows, **self.tokens}
        return {
            "rows": self.rows,
            "status": status,
            "errors": sorted(errors, key=lambda e: -e["count"]),  # stable: ties keep the type/code order
            "tokens": tokens,
            "cost": {
                "computed": self.cost_computed,
                "total": _cost_table(self.cost_total, ["currency"]),
                "by_model": _cost_table(self.cost_model, ["model", "currency"]),
                "unpriced": [{"model": str(m), "rows": int(n)} for m, n in sorted(self.unpriced.items())],
            },
            "latency_s": _latency(np.concatenate(self.latency) if self.latency else np.empty(0)),
            "attempts": {str(k): int(v) for k, v in sorted(self.attempts.items())},
            "throughput": _throughput(_times(self.times_ns)),
        }


def _example(message: str | None) -> str | None:
    """A group's first message on one line, cut to about 200 characters (messages can be huge)."""
    if message is None:
        return None
    text = " ".join(str(message).split())
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 1].rstrip() + "…"


def _cost_table(sums: dict[tuple[str, ...], list[Any]], keys: list[str]) -> list[dict[str, Any]]:
    out = []
    for key in sorted(sums):
        rows, input_cost, output_cost, cost = sums[key][0], *(math.fsum(parts) for parts in sums[key][1:])
        out.append(
            {
                **{k: str(v) for k, v in zip(keys, key)},
                "rows": int(rows),
                "input_cost": _float(input_cost),
                "output_cost": _float(output_cost),
                "cost": _float(cost),
                "cost_per_1k_rows": _float(cost / rows * 1000),
            }
        )
    return out


def _latency(values: np.ndarray) -> dict[str, float | int | None]:
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


def _times(chunks: list[np.ndarray]) -> np.ndarray:
    """Finish times (epoch nanoseconds, one array per table), sorted: plain integers, not Timestamps (10^7
    of them are a second of conversions)."""
    if not chunks:
        return np.empty(0, np.int64)
    nanos = np.concatenate(chunks)
    nanos.sort()
    return nanos


def _bucket_minutes(duration_s: float) -> int:
    """1-minute buckets for a run under 10 minutes, else 10 minutes, widened so there are at most 48."""
    if duration_s < 600:
        return 1
    for minutes in _BUCKET_MINUTES:
        if duration_s / (minutes * 60) < _MAX_BUCKETS:
            return minutes
    return _BUCKET_MINUTES[-1]


def _throughput(nanos: np.ndarray) -> dict[str, Any]:
    """Rows per minute from the first to the last ``finished_at`` (sorted epoch nanoseconds), and per bucket
    (gaps show as 0 rows)."""
    if not nanos.size:
        return {"rows": 0, "first": None, "last": None, "duration_s": None, "rows_per_min": None,
                "bucket_minutes": None, "buckets": []}  # fmt: skip
    first, last = (pd.Timestamp(int(value), unit="ns", tz="UTC") for value in (nanos[0], nanos[-1]))
    duration_s = int(nanos[-1] - nanos[0]) / 1e9
    minutes = _bucket_minutes(duration_s)
    width_s = minutes * 60
    counts = np.zeros(int(duration_s // width_s) + 1, np.int64)
    for start in range(0, nanos.size, 1 << 20):  # a slice at a time: 10^7 float offsets would be 80 MB more
        offsets = (nanos[start: start + (1 << 20)] - nanos[0]) / 1e9
        counts += np.bincount((offsets // width_s).astype("int64"), minlength=counts.size)
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
        "rows": int(nanos.size),
        "first": first.isoformat(),
        "last": last.isoformat(),
        "duration_s": _float(duration_s),
        "rows_per_min": _float(nanos.size / (duration_s / 60)) if duration_s > 0 else None,
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
