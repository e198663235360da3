"""``qwenvl-batch report OUT --html FILE``: the run as one self-contained HTML page, for the people who would
rather look than read.

One file with everything inline (CSS, SVG charts from ``charts``; no script, no font, no image fetched at view
time), so it can be mailed, attached to a ticket or opened from a VM's disk on a phone. ``chart_data`` computes
the numbers behind every chart (tested without drawing), ``render_html`` draws them, and the summary tables are
the text report's own (``report.grouped_tables``), so both formats always show the same figures. Works on an
output that is still being written or was interrupted: the projection to the end needs the manifest's size
(``--job JOB``) and is drawn dashed.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import charts
from .charts import Series
from .report import (
    Summary,
    cell,
    floats,
    frame_table,
    grouped_tables,
    header_lines,
    label_column,
    right_aligned,
    scan_output,
    summarize,
)
from .timeline import (
    Buckets,
    Histogram,
    buckets,
    cumulative_points,
    eta_s,
    histogram,
    percentiles,
    projected,
    recent_rate_per_min,
    stacked_buckets,
)

__all__ = ["ChartData", "ChartTally", "chart_data", "render_html", "render_output_html"]


@dataclass(frozen=True)
class Line:
    """A cumulative line (downsampled) with its projected end point when the job is not finished."""

    xs: np.ndarray
    ys: np.ndarray
    projection: tuple[float, float] | None = None


@dataclass(frozen=True)
class ChartData:
    """The numbers behind each chart of the page."""

    done: int
    total: int | None
    recent_rate_per_min: float
    whole_rate_per_min: float | None
    finish_at: float | None  # projected end (epoch s), when the manifest size is known and rows are pending
    rows: Buckets
    rows_done: Line | None
    latency: Histogram
    latency_marks: dict[str, float]
    attempts: list[tuple[str, float]]
    error_labels: list[str]
    error_matrix: np.ndarray
    tokens: Line | None
    cost: dict[str, Line] = field(default_factory=dict)  # per currency (never added across currencies)


def _finish_at(times: np.ndarray, done: int, total: int | None, now: float) -> tuple[float | None, float | None]:
    """When the last pending row should finish: at the rate of the last 5 minutes from now, or, for a run that
    is not going (no recent rows), at its whole-run rate from its last row. Also returns the whole-run rate."""
    if times.size == 0:
        return None, None
    span = float(times[-1] - times[0])
    whole = times.size / (span / 60) if span > 0 else None
    if total is None or done >= total:
        return None, whole
    rate, anchor = recent_rate_per_min(times, now), now
    if rate <= 0:
        rate, anchor = whole or 0.0, float(times[-1])
    eta = eta_s(total - done, rate)
    return (None if eta is None else anchor + eta), whole


def _line(times: np.ndarray, values: np.ndarray | None, done: int, total: int | None,
          finish_at: float | None) -> Line | None:
    if times.size == 0:
        return None
    xs, ys = cumulative_points(times, values)
    end = projected(float(ys[-1]), done, total) if finish_at is not None else None
    return Line(xs, ys, (finish_at, end) if finish_at is not None and end is not None else None)


def _seconds(table: pa.Table) -> np.ndarray:
    """``finished_at`` per row as epoch seconds, NaN where missing (aligned with the table's rows)."""
    if "finished_at" not in table.column_names:
        return np.full(table.num_rows, np.nan)
    stamps = table.column("finished_at").to_numpy(zero_copy_only=False).astype("datetime64[ns]")
    seconds = stamps.view(np.int64) / 1e9  # as report.Summary keeps them: epoch nanoseconds
    seconds[np.isnat(stamps)] = np.nan
    return seconds


class ChartTally:
    """What the charts need beyond the summary (``report.Summary``, whose finish times, latencies and attempts
    they share), from normalised tables added one at a time: done rows, the time and type/code of error rows, and
    for every row with a finish time (aligned with the summary's times) its tokens, cost and currency, for the
    cumulative lines: 14 to 18 bytes a row."""

    def __init__(self) -> None:
        self.done = 0
        self.errors: list[tuple[np.ndarray, np.ndarray]] = []
        self.tokens: list[np.ndarray] = []
        self.costs: list[np.ndarray] = []
        self.currency: list[np.ndarray] = []  # int16 codes into currencies
        self.currencies: dict[str, int] = {}

    def add(self, table: pa.Table) -> None:
        status = label_column(table, "status")
        self.done += int(pc.sum(pc.is_in(status, pa.array(["ok", "error"]))).as_py() or 0)
        row_times = _seconds(table)
        timed = np.isfinite(row_times)  # the rows report.Summary keeps a finish time of, in the same order
        is_error = pc.equal(status, "error").to_numpy(zero_copy_only=False) & timed
        if is_error.any():
            errors = table.filter(pa.array(is_error))
            labels = pc.binary_join_element_wise(label_column(errors, "error_type"),
                                                 label_column(errors, "error_code"), "/")
            self.errors.append((row_times[is_error], np.asarray(labels.to_pylist(), dtype=str)))
        self.tokens.append(_compact(floats(table, "total_tokens")[timed]))
        self.costs.append(floats(table, "cost")[timed])
        encoded = pc.dictionary_encode(label_column(table, "currency"))
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        codes = np.array([self.currencies.setdefault(str(c), len(self.currencies))
                          for c in encoded.dictionary.to_pylist()] or [0], np.int16)
        self.currency.append(codes[encoded.indices.to_numpy(zero_copy_only=False)][timed])

    def result(self, summary: Summary, *, total: int | None, now: float) -> ChartData:
        """The chart data, with the finish times, latencies and attempts ``summary`` gathered from the same
        tables. It takes those arrays over (call ``summary.result()`` first, if at all): arrays are joined one at
        a time and dropped once used, so 10^7 rows stay under 1 GB."""
        section = summary.overall
        seconds = _popped(section.times_ns, np.int64) / 1e9  # in table order: aligned with tokens and costs
        times = seconds if _ordered(seconds) else np.sort(seconds)
        latency = _popped(section.latency, np.float64)
        latency_histogram, latency_marks = histogram(latency), percentiles(latency)
        del latency
        finish_at, whole = _finish_at(times, self.done, total, now)
        rows = buckets(times)
        rows_done = _line(times, None, self.done, total, finish_at)
        if rows_done is not None and rows_done.projection is not None and total is not None:
            rows_done = Line(rows_done.xs, rows_done.ys, (rows_done.projection[0], float(total)))
        recent = recent_rate_per_min(times, now)
        del times
        error_times = np.concatenate([t for t, _ in self.errors]) if self.errors else np.empty(0)
        error_labels = np.concatenate([labels for _, labels in self.errors]) if self.errors else np.empty(0, str)
        labels, matrix = stacked_buckets(error_times, error_labels, start=rows.start, width_s=rows.width_s,
                                         count=len(rows.counts))
        token_line = _line(*_masked(seconds, _popped(self.tokens, np.float64)), self.done, total, finish_at)
        costs, currency = _popped(self.costs, np.float64), _popped(self.currency, np.int16)
        cost = {}
        for name, code in sorted(self.currencies.items()):
            line = _line(*_masked(seconds, costs, currency == code), self.done, total, finish_at)
            if line is not None:
                cost[name] = line
        return ChartData(
            done=self.done, total=total, recent_rate_per_min=recent, whole_rate_per_min=whole, finish_at=finish_at,
            rows=rows, rows_done=rows_done, latency=latency_histogram, latency_marks=latency_marks,
            attempts=[(f"{k} attempt{'s' if k != 1 else ''}", float(v)) for k, v in sorted(section.attempts.items())],
            error_labels=labels, error_matrix=matrix, tokens=token_line, cost=cost,
        )


def _masked(times: np.ndarray, values: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The times and values of rows with a value (and in ``mask``), copied only when some row is left out."""
    keep = np.isfinite(values) if mask is None else mask & np.isfinite(values)
    if keep.all():
        return times, values
    values = values[keep]  # the full array is released here, before the times are copied
    return times[keep], values


def _compact(values: np.ndarray) -> np.ndarray:
    """Token counts as float32 when that holds them exactly (it does every count up to 2^24), else float64."""
    narrow = values.astype(np.float32)
    return narrow if np.array_equal(narrow, values, equal_nan=True) else values


def _popped(chunks: list[np.ndarray], dtype: Any) -> np.ndarray:
    """The chunks end to end, emptying ``chunks`` as they are copied (memory: the result and one chunk)."""
    rows = sum(len(chunk) for chunk in chunks)
    if not rows:
        return np.empty(0, dtype)
    out = np.empty(rows, np.result_type(*chunks))
    at = 0
    chunks.reverse()
    while chunks:
        chunk = chunks.pop()
        out[at: at + len(chunk)] = chunk
        at += len(chunk)
    return out


def _ordered(values: np.ndarray) -> bool:
    return bool(np.all(values[1:] >= values[:-1])) if values.size > 1 else True


def chart_data(df: pd.DataFrame, *, total: int | None = None, now: float | None = None) -> ChartData:
    """Everything the charts draw, from the output frame (one row per id, as ``load_results`` returns)."""
    table = frame_table(df)
    summary = Summary(list(df.columns))
    summary.add(table)
    charts = ChartTally()
    charts.add(table)
    return charts.result(summary, total=total, now=time.time() if now is None else now)


# ---------------------------------------------------------------------------------------------- page


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _figure(chart_id: str, title: str, svg: str, note: str = "") -> str:
    extra = f'<p class="note">{_esc(note)}</p>' if note else ""
    caption = f"<figcaption>{_esc(title)}</figcaption>"
    return f'<figure class="chart" id="fig-{_esc(chart_id)}">{caption}{svg}{extra}</figure>'


def _width_text(width_s: int) -> str:
    if width_s < 60:
        return f"{width_s}-second"
    if width_s < 3600:
        return f"{width_s // 60}-minute"
    if width_s < 86400:
        return f"{width_s // 3600}-hour"
    return f"{width_s // 86400}-day"


def _charts(data: ChartData, summary: dict[str, Any]) -> list[str]:
    none_yet = "No row has finished yet"
    out = [_rows_chart(data), _rate_chart(data), _latency_chart(data)]
    if data.attempts:
        out.append(_figure("attempts", "Attempts per row", charts.hbar_chart(
            "attempts", "Attempts per row", items=data.attempts, x_title="rows")))
    else:
        out.append(_figure("attempts", "Attempts per row", charts.empty_chart("attempts", "Attempts", none_yet)))
    out.append(_errors_chart(data))
    out.append(_tokens_chart(data))
    out += _cost_charts(data, summary)
    return out


def _projection_note(data: ChartData) -> str:
    if data.total is None:
        return "Pass --job JOB to project to the end of the manifest."
    if data.finish_at is None:
        return "" if data.done >= data.total else "No rate to project from yet."
    return (f"Dashed: projected to all {data.total:,} rows, finishing about "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(data.finish_at))}.")


def _rows_chart(data: ChartData) -> str:
    title = "Rows done over time" + (f" (of {data.total:,})" if data.total else "")
    if data.rows_done is None:
        return _figure("rows", title, charts.empty_chart("rows", title, "No row has finished yet"))
    line = data.rows_done
    svg = charts.time_line_chart("rows", title, series=[Series("rows done", line.xs, line.ys, line.projection)],
                                 y_title="rows (cumulative)", y_decimals=None)
    return _figure("rows", title, svg, _projection_note(data))


def _rate_chart(data: ChartData) -> str:
    title = "Rows per minute"
    if not data.rows.counts.size:
        return _figure("rate", title, charts.empty_chart("rate", title, "No row has finished yet"))
    svg = charts.time_bar_chart("rate", title, start=data.rows.start, width_s=data.rows.width_s,
                                series=[Series("rows/min", [], data.rows.rate_per_min)], y_title="rows/min",
                                tip_unit="rows/min")
    whole = f"{data.whole_rate_per_min:,.1f}" if data.whole_rate_per_min else "n/a"
    note = (f"Per {_width_text(data.rows.width_s)} bucket (a partial last bucket reads low). Whole run: {whole} "
            f"rows/min; last 5 minutes: {data.recent_rate_per_min:,.1f} rows/min.")
    return _figure("rate", title, svg, note)


def _latency_chart(data: ChartData) -> str:
    title = "Latency per row"
    hist = data.latency
    if not hist.counts.size:
        return _figure("latency", title, charts.empty_chart("latency", title, "No latency recorded yet"))
    overflow = f"last bar includes {hist.overflow:,} row(s) ≥ {charts.format_number(hist.edges[-1])} s" \
        if hist.overflow else ""
    svg = charts.histogram_chart("latency", title, edges=hist.edges, counts=hist.counts, x_title="latency (s)",
                                 y_title="rows", markers=data.latency_marks, overflow_note=overflow, unit=" s")
    marks = ", ".join(f"{k} {v:,.2f} s" for k, v in data.latency_marks.items())
    return _figure("latency", title, svg, f"From the first attempt to the answer, retries included. {marks}.")


def _errors_chart(data: ChartData) -> str:
    title = "Errors over time, by type/code"
    if not data.error_labels:
        return _figure("errors", title, charts.empty_chart("errors", title, "No errors"))
    series = [Series(label, [], data.error_matrix[i]) for i, label in enumerate(data.error_labels)]
    svg = charts.time_bar_chart("errors", title, start=data.rows.start, width_s=data.rows.width_s, series=series,
                                y_title=f"errors per {_width_text(data.rows.width_s)} bucket", tip_unit="errors",
                                integer=True)
    return _figure("errors", title, svg, "Rows that ended in error, by when they finished; the table below has an "
                                         "example message for each.")


def _tokens_chart(data: ChartData) -> str:
    title = "Tokens used (cumulative)"
    if data.tokens is None:
        return _figure("tokens", title, charts.empty_chart("tokens", title, "No token usage recorded yet"))
    line = data.tokens
    svg = charts.time_line_chart("tokens", title, series=[Series("total tokens", line.xs, line.ys, line.projection)],
                                 y_title="tokens")
    return _figure("tokens", title, svg, _projection_note(data))


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def _cost_charts(data: ChartData, summary: dict[str, Any]) -> list[str]:
    out = []
    if not data.cost:
        title = "Cost (cumulative)"
        return [_figure("cost", title, charts.empty_chart("cost", title, "No priced rows yet"))]
    for currency, line in data.cost.items():
        cid = f"cost-{_safe_id(currency)}"
        title = f"Cost in {currency} (cumulative)"
        svg = charts.time_line_chart(cid, title, series=[Series(f"cost, {currency}", line.xs, line.ys,
                                                                line.projection)], y_title=f"cost ({currency})")
        out.append(_figure(cid, title, svg, _projection_note(data)))
    by_model = summary["overall"]["cost"]["by_model"]
    for currency in data.cost:
        items = [(c["model"], c["cost"] or 0.0) for c in by_model if c["currency"] == currency]
        cid = f"cost-model-{_safe_id(currency)}"
        title = f"Cost by model, {currency}"
        out.append(_figure(cid, title, charts.hbar_chart(cid, title, items=items, x_title=f"cost ({currency})")))
    if summary.get("by"):
        for currency in data.cost:
            items = _top_items([(g["group"], t["cost"] or 0.0) for g in summary["groups"] for t in g["cost"]["total"]
                                if t["currency"] == currency])
            cid = f"cost-by-{_safe_id(currency)}"
            title = f"Cost by {summary['by']}, {currency}"
            out.append(_figure(cid, title, charts.hbar_chart(cid, title, items=items, x_title=f"cost ({currency})")))
    return out


def _top_items(items: list[tuple[str, float]], top: int = 15) -> list[tuple[str, float]]:
    """The ``top`` largest bars and one summing the rest: a --by column with 10,000 values stays one screen."""
    if len(items) <= top + 1:
        return items
    ranked = sorted(items, key=lambda item: -item[1])
    rest = ranked[top:]
    return [*ranked[:top], (f"other ({len(rest):,} groups)", sum(value for _, value in rest))]


def _kpis(data: ChartData, summary: dict[str, Any]) -> str:
    status = summary["overall"]["status"]
    cards = [("rows done", f"{data.done:,}" + (f" of {data.total:,}" if data.total is not None else ""))]
    cards += [("ok", f"{status.get('ok', 0):,}"), ("error", f"{status.get('error', 0):,}")]
    if data.total is not None:
        cards.append(("pending", f"{max(data.total - data.done, 0):,}"))
    cards.append(("rows/min, last 5 min", f"{data.recent_rate_per_min:,.1f}"))
    if data.finish_at is not None:
        cards.append(("projected end", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(data.finish_at))))
    for total in summary["overall"]["cost"]["total"]:
        amount = f"{total['cost']:,.4f} {total['currency']}"
        line = data.cost.get(total["currency"])
        if line is not None and line.projection is not None:
            amount += f" → {line.projection[1]:,.4f} projected"
        cards.append(("spend", amount))
    latency = summary["overall"]["latency_s"]
    if latency["p50"] is not None:
        cards.append(("latency p50 / p95", f"{latency['p50']:,.2f} s / {latency['p95']:,.2f} s"))
    return '<section class="kpis">' + "".join(
        f'<div class="kpi"><span>{_esc(k)}</span><b>{_esc(v)}</b></div>' for k, v in cards) + "</section>"


def _tables_html(summary: dict[str, Any]) -> str:
    intro = "The same tables as <code>qwenvl-batch report OUT</code> prints."
    out = [f'<section class="tables"><h2>Summary tables</h2><p class="note">{intro}</p>']
    for n, (group, tables) in enumerate(grouped_tables(summary)):
        out.append(f'<details{" open" if n == 0 else ""}><summary>{_esc(group)}</summary>')
        for table in tables:
            out.append(f"<h3>{_esc(table.title)}</h3>")
            if not table.rows:
                out.append('<p class="note">none</p>')
                continue
            cells = [[cell(v, c.kind) for v, c in zip(row, table.columns)] for row in table.rows]
            right = [right_aligned(c, col) for c, col in zip(table.columns, zip(*cells))]
            head = "".join(f'<th{" class=num" if r else ""}>{_esc(c.name)}</th>' for c, r in zip(table.columns, right))
            body = "".join("<tr>" + "".join(f'<td class="{"num" if r else c.name}">{_esc(v)}</td>'
                                            for v, r, c in zip(row, right, table.columns)) + "</tr>" for row in cells)
            out.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                       "</table></div>")
        out.append("</details>")
    out.append("</section>")
    return "".join(out)


_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#111;
background:#fff}
main{max-width:1240px;margin:0 auto;padding:12px}
h1{font-size:1.35em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}h3{font-size:1em;margin:1em 0 .2em}
.meta{color:#333;margin:.2em 0;overflow-wrap:anywhere}
.banner{border:2px solid #000;padding:6px 10px;margin:8px 0;font-weight:600;background:#fff3cd}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:8px;margin:10px 0}
.kpi{border:1px solid #999;border-radius:6px;padding:6px 10px}.kpi span{color:#333;font-size:.85em}
.kpi b{display:block;font-size:1.15em;overflow-wrap:anywhere}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,480px),1fr));gap:14px}
figure.chart{margin:0;border:1px solid #ccc;border-radius:6px;padding:8px;break-inside:avoid;min-width:0}
figcaption{font-weight:600;margin-bottom:4px}
svg.chart-svg{width:100%;height:auto;display:block}
svg text{fill:#111}svg .grid{stroke:#ddd;stroke-width:1}svg .axis,svg .mark{font-weight:600}
.note{color:#333;font-size:.88em;margin:4px 0 0}
details{margin:6px 0}summary{font-weight:600;cursor:pointer}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;margin:4px 0 10px;font-size:.9em}
th,td{border-bottom:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}td.example{white-space:normal;min-width:14em}
@media print{body{font-size:11pt}main{max-width:none}.banner{background:none}details>*{display:block}
.charts{display:block}figure.chart{margin:0 0 10px}}
"""


def render_html(df: pd.DataFrame, *, output: str | Path, by: str | None = None, total: int | None = None,
                now: float | None = None, writer: str = "") -> str:
    """The page for an output frame (one row per id). ``total`` is the manifest's size, for pending rows and the
    projections; ``writer`` says whether a run is writing the output now (``status.writer_state``)."""
    now = time.time() if now is None else now
    return _page(summarize(df, by=by), chart_data(df, total=total, now=now), output=output, now=now, writer=writer)


def render_output_html(output: str | Path, *, by: str | None = None, total: int | None = None,
                       now: float | None = None, writer: str = "") -> str:
    """``render_html(load_results(output), ...)`` without loading the output: the summary and the charts are
    computed in one pass, a part at a time (``report.scan_output``)."""
    now = time.time() if now is None else now
    charts = ChartTally()
    summary, structured = scan_output(output, by=by, also=charts.add)
    figures = summary.result(structured=structured)
    return _page(figures, charts.result(summary, total=total, now=now), output=output, now=now, writer=writer)


def _page(summary: dict[str, Any], data: ChartData, *, output: str | Path, now: float, writer: str) -> str:
    lines = header_lines(summary)
    banner = [line for line in lines if line.startswith("SIMULATED")]
    meta = [line for line in lines if not line.startswith("SIMULATED")]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>qwenvl-batch report: {_esc(Path(output).name)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Batch run report: {_esc(Path(output).name)}</h1>",
        f'<p class="meta">Output <code>{_esc(output)}</code> · generated {when}'
        + (f" · {_esc(writer)}" if writer else "") + "</p>",
        *(f'<p class="banner">{_esc(line)}</p>' for line in banner),
        *(f'<p class="meta">{_esc(line)}</p>' for line in meta),
        _kpis(data, summary),
        '<section class="charts">', *_charts(data, summary), "</section>",
        _tables_html(summary),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"
