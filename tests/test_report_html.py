"""The HTML report: the data behind each chart, a self-contained page, and the page in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from run_frames import START, long_run_frame

from qwenvl_batch.report import grouped_tables, summarize
from qwenvl_batch.report_html import chart_data, render_html

NOW = (START + pd.Timedelta(hours=6, minutes=1)).timestamp()  # one minute after the last row of long_run_frame
CHART_IDS = ["rows", "rate", "latency", "attempts", "errors", "tokens", "cost-CNY", "cost-USD", "cost-model-CNY",
             "cost-model-USD"]


def _cost_of(frame: pd.DataFrame, currency: str) -> float:
    return float(frame.loc[frame["currency"] == currency, "cost"].sum())


# ---------------------------------------------------------------------------------------------- chart data


def test_chart_data_of_a_running_job_projects_to_the_manifest() -> None:
    """With 6,000 of 9,000 rows done, rows, tokens and each currency's cost are projected to 9,000 rows at a
    finish time given by the last 5 minutes' rate."""
    frame = long_run_frame()
    data = chart_data(frame, total=9_000, now=NOW)
    assert data.done == 6_000 and int(data.rows.counts.sum()) == 6_000
    assert data.rows_done is not None and data.rows_done.projection is not None
    assert data.rows_done.projection[1] == 9_000 and data.rows_done.ys[-1] == 6_000
    assert data.recent_rate_per_min > 0
    assert data.finish_at == pytest.approx(NOW + 3_000 / data.recent_rate_per_min * 60)
    for currency in ("USD", "CNY"):
        line = data.cost[currency]
        assert line.ys[-1] == pytest.approx(_cost_of(frame, currency))
        assert line.projection is not None and line.projection[1] == pytest.approx(line.ys[-1] * 9_000 / 6_000)
    assert data.tokens is not None and data.tokens.ys[-1] == pytest.approx(float(frame["total_tokens"].sum()))


def test_chart_data_counts_every_error_once_by_type_and_code() -> None:
    """The errors-over-time matrix holds each error row once, on the same buckets as the rows chart."""
    frame = long_run_frame()
    data = chart_data(frame, total=9_000, now=NOW)
    assert int(data.error_matrix.sum()) == int((frame["status"] == "error").sum())
    assert data.error_labels[0] == "server/503"  # the burst makes it the most frequent
    assert data.error_matrix.shape[1] == len(data.rows.counts)
    burst = int(np.argmax(data.error_matrix[0]))
    burst_start = data.rows.start + burst * data.rows.width_s
    assert START.timestamp() + 2 * 3600 <= burst_start <= START.timestamp() + 2.3 * 3600


def test_chart_data_latency_and_attempts_match_the_text_report() -> None:
    """The percentile marks are the text report's p50/p95/p99 and the attempts bars its table."""
    frame = long_run_frame()
    data = chart_data(frame, now=NOW)
    latency = summarize(frame)["overall"]["latency_s"]
    assert data.latency_marks == {k: pytest.approx(latency[k]) for k in ("p50", "p95", "p99")}
    attempts = summarize(frame)["overall"]["attempts"]
    assert [(label.split()[0], int(n)) for label, n in data.attempts] == [(k, v) for k, v in attempts.items()]
    assert int(data.latency.counts.sum()) == int(frame["latency_s"].notna().sum())


def test_no_projection_without_manifest_size_or_when_finished() -> None:
    """Without --job there is no projection; a finished job (all rows done) has none either."""
    frame = long_run_frame(rows=500)
    for total in (None, 500):
        data = chart_data(frame, total=total, now=NOW)
        assert data.finish_at is None and data.rows_done is not None and data.rows_done.projection is None
        assert all(line.projection is None for line in data.cost.values())


def test_stalled_run_is_projected_at_its_whole_run_rate_from_its_last_row() -> None:
    """An interrupted job (nothing in the last 5 minutes) ends pending/(whole-run rate) after its last row."""
    frame = long_run_frame(rows=600, hours=1.0)
    last = pd.to_datetime(frame["finished_at"]).max().timestamp()
    data = chart_data(frame, total=1_200, now=last + 86_400)
    assert data.recent_rate_per_min == 0 and data.whole_rate_per_min is not None
    assert data.finish_at == pytest.approx(last + 600 / data.whole_rate_per_min * 60)


# ---------------------------------------------------------------------------------------------- the page


def test_page_is_self_contained() -> None:
    """No script, stylesheet link, image, font or URL is fetched at view time: everything is inline."""
    page = render_html(long_run_frame(), output="out/x.parquet", by="source", total=9_000, now=NOW)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "<img" not in page
    assert not re.search(r"""(src|href)\s*=""", page)
    urls = set(re.findall(r"""https?://[^\s"'<>)]+""", page))
    assert urls <= {"http://www.w3.org/2000/svg"}
    assert all(ref.startswith("#") for ref in re.findall(r"url\(([^)]*)\)", page))


def test_page_has_every_chart_with_units_and_the_text_reports_tables() -> None:
    """Each chart is an inline SVG with labelled axes; the tables are the text report's, for every group."""
    frame = long_run_frame()
    page = render_html(frame, output="out/x.parquet", by="source", total=9_000, now=NOW)
    for chart_id in [*CHART_IDS, "cost-by-USD", "cost-by-CNY"]:
        assert f'<svg id="{chart_id}"' in page, chart_id
    for unit in ("rows/min", "latency (s)", "cost (USD)", "cost (CNY)", "tokens", "time (UTC"):
        assert unit in page
    for group, tables in grouped_tables(summarize(frame, by="source")):
        assert f"<summary>{group}</summary>" in page
        assert all(f"<h3>{table.title}</h3>" in page for table in tables)
    assert "SIMULATED: 6,000 row(s)" in page
    assert "Dashed: projected to all 9,000 rows, finishing about 2026-12-01 07:38 UTC." in page
    assert "Costs are in 2 currencies" in page and "USD + CNY" not in page


def test_page_escapes_text_from_the_output() -> None:
    """An error message or group value holding markup is shown as text, never run."""
    frame = long_run_frame(rows=200)
    frame.loc[frame["status"] == "error", "error_message"] = "<script>alert(1)</script>"
    frame["source"] = "<b>bold</b>"
    page = render_html(frame, output="out/<x>.parquet", by="source", now=NOW)
    assert "<script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_page_of_an_output_with_no_rows_yet() -> None:
    """A run that has not finished a row yet still gets a page: each chart says there is nothing to draw."""
    empty = pd.DataFrame(columns=["id", "status", "finished_at"])
    page = render_html(empty, output="out/x.parquet", total=100, now=NOW)
    for chart_id in ("rows", "rate", "latency", "attempts", "errors", "tokens", "cost"):
        assert f'<svg id="{chart_id}"' in page
    assert "No row has finished yet" in page and "pending" in page


def test_page_of_an_interrupted_output_with_few_columns() -> None:
    """An output of an older version (no cost, no tokens, no latency) renders the charts it can."""
    frame = long_run_frame(rows=300)[["id", "status", "finished_at", "error_type", "error_code"]]
    page = render_html(frame, output="out/x.parquet", total=1_000, now=NOW)
    assert '<svg id="rows"' in page and "No priced rows yet" in page and "No latency recorded yet" in page


def test_series_differ_in_pattern_not_only_colour() -> None:
    """Stacked error series carry distinct hatch patterns, so they stay apart when printed in greyscale."""
    page = render_html(long_run_frame(), output="out/x.parquet", now=NOW)
    errors_svg = page[page.index('<svg id="errors"'):]
    errors_svg = errors_svg[: errors_svg.index("</svg>")]
    assert {"url(#errors-p1)", "url(#errors-p2)"} <= set(re.findall(r"url\(#errors-p\d\)", errors_svg))


# ---------------------------------------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: `apt-get install -y chromium` (Debian; .ci/run installs it where it can)",
)
_MEASURE = """<script>
window.addEventListener('load', () => {
  const figures = [...document.querySelectorAll('figure.chart')].map(f => {
    const box = f.querySelector('svg').getBoundingClientRect();
    return f.id + '=' + Math.round(box.width) + 'x' + Math.round(box.height);
  });
  const fetched = performance.getEntriesByType('resource').map(e => e.name);
  const out = document.createElement('pre');
  out.id = 'measured';
  out.textContent = 'FIGURES ' + figures.join(' ') + '\\nFETCHED ' + fetched.join(' ') + '\\nSCROLL '
    + document.documentElement.scrollWidth + ' ' + window.innerWidth;
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
               "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _console_lines(stderr: str) -> list[str]:
    """Console messages Chromium logged (the page has no script, so any is a problem: a CSS or SVG error...)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _measure(tmp_path: Path, page: Path, window: str) -> dict[str, str]:
    probe = tmp_path / f"measure-{page.stem}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    result = _chromium(tmp_path, f"--window-size={window}", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="measured">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"no measurement in the DOM Chromium dumped; stderr: {result.stderr[-2000:]}"
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] if " " in line else "" for line in found.group(1).splitlines()}


def _check_page_in_browser(tmp_path: Path, page: Path, expected_ids: list[str], window: str) -> None:
    loaded = _chromium(tmp_path, f"--window-size={window}", "--dump-dom", page.as_uri())
    assert loaded.returncode == 0 and "</html>" in loaded.stdout, loaded.stderr[-2000:]
    assert _console_lines(loaded.stderr) == []
    measured = _measure(tmp_path, page, window)
    sizes = dict(item.split("=") for item in measured["FIGURES"].split())
    assert sorted(sizes) == sorted(f"fig-{i}" for i in expected_ids)
    for figure, size in sizes.items():
        width, height = map(int, size.split("x"))
        assert width > 0 and height > 0, f"{figure} is drawn {size}"
    assert measured["FETCHED"] == ""  # nothing fetched: no network at view time
    scroll_width, viewport = map(int, measured["SCROLL"].split())
    assert scroll_width <= viewport, "the page scrolls sideways"


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize(("window", "name"), [("1280,900", "laptop"), ("390,844", "phone")])
def test_report_renders_in_chromium(tmp_path: Path, window: str, name: str) -> None:
    """In headless Chromium the page loads with no console message, every chart has a non-zero size, nothing is
    fetched, nothing scrolls sideways (laptop and phone widths), and a screenshot is written."""
    page = tmp_path / "report.html"
    page.write_text(render_html(long_run_frame(), output="out/captions.parquet", by="source", total=9_000, now=NOW),
                    encoding="utf-8")
    _check_page_in_browser(tmp_path, page, [*CHART_IDS, "cost-by-USD", "cost-by-CNY"], window)
    shot = tmp_path / f"report-{name}.png"
    result = _chromium(tmp_path, f"--window-size={window}", f"--screenshot={shot}", page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == tuple(map(int, window.split(",")))
        darkest, lightest = image.convert("L").getextrema()
        assert lightest - darkest > 100  # not a blank page


@pytest.mark.browser
@needs_chromium
def test_empty_report_renders_in_chromium(tmp_path: Path) -> None:
    """The page of an output with no finished row loads cleanly too, each chart box visible."""
    page = tmp_path / "empty.html"
    page.write_text(render_html(pd.DataFrame(columns=["id", "status"]), output="out/x.parquet", now=NOW),
                    encoding="utf-8")
    _check_page_in_browser(tmp_path, page, ["rows", "rate", "latency", "attempts", "errors", "tokens", "cost"],
                           "800,900")
