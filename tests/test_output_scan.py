"""Reading an output a part at a time (output_scan, report.summarize_output, report_html.render_output_html): the
same figures and page as from ``load_results``, on outputs with rewritten rows, old parts and a journal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from run_frames import START, long_run_frame
from test_status import write_output

from qwenvl_batch.output_scan import id_hashes, newest_rows
from qwenvl_batch.report import summarize, summarize_output
from qwenvl_batch.report_html import render_html, render_output_html
from qwenvl_batch.store import load_results, open_for_reading

NOW = (START + pd.Timedelta(hours=6, minutes=1)).timestamp()


def _same(a: Any, b: Any, path: str = "") -> None:
    """Equal, floats up to rounding (a sum over parts adds in another order than a sum over one frame)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


def rewritten_output(tmp_path: Path) -> Path:
    """Three parts: an old one without the newer columns, the run's rows, and errors retried ok in a later run."""
    frame = long_run_frame(rows=1_200)
    frame["cost"] = np.where(frame["status"] == "ok", 0.001, np.nan)
    frame["currency"] = np.where(frame.index % 5 == 0, "CNY", "USD")
    old = frame.iloc[:300].drop(columns=["simulated", "cost", "currency"])
    retried = frame[frame["status"] == "error"].iloc[:20].copy()
    retried["status"], retried["error_type"], retried["error_code"] = "ok", None, None
    retried["finished_at"] = retried["finished_at"] + pd.Timedelta(hours=1)
    return write_output(tmp_path / "out.parquet", old, frame.iloc[300:], retried)


@pytest.mark.parametrize("by", [None, "source"])
def test_summary_of_an_output_equals_the_summary_of_its_frame(tmp_path: Path, by: str | None) -> None:
    """summarize_output reads a part at a time and gives summarize(load_results(...))'s figures: rewritten rows
    counted once as their newest, columns an old part lacks as nulls, groups by a manifest column."""
    output = rewritten_output(tmp_path)
    expected = summarize(load_results(output), by=by)
    assert expected["overall"]["status"]["ok"] > 0 and expected["overall"]["errors"]  # the frame is non-trivial
    _same(summarize_output(output, by=by), expected)


def test_html_page_of_an_output_equals_the_page_of_its_frame(tmp_path: Path) -> None:
    """render_output_html (one pass, a part at a time) writes the page render_html writes from load_results."""
    output = rewritten_output(tmp_path)
    page = render_output_html(output, by="source", total=2_000, now=NOW, writer="not running")
    assert page == render_html(load_results(output), output=output, by="source", total=2_000, now=NOW,
                               writer="not running")


def test_newest_rows_drops_each_replaced_row_and_keeps_file_order(tmp_path: Path) -> None:
    """Only the newest row of an id written twice is kept (in the later file), every other row in file order."""
    first = pd.DataFrame({"id": ["a", "b", "c"], "status": ["error", "ok", "error"]})
    second = pd.DataFrame({"id": ["c", "a"], "status": ["ok", "ok"]})
    store = open_for_reading(write_output(tmp_path / "out.parquet", first, second))
    rows = pa.concat_tables(newest_rows(store, ["id", "status"])).to_pylist()
    assert rows == [{"id": "b", "status": "ok"}, {"id": "c", "status": "ok"}, {"id": "a", "status": "ok"}]


def test_id_hashes_compare_ids_as_text_whatever_their_lengths() -> None:
    """An id hashes the same in a column of equal-length ids and among ids of other lengths, numbers hash as
    their text, and 200,000 distinct ids get 200,000 distinct hashes."""
    equal = id_hashes(pa.array(["r0001", "r0002"]))
    mixed = id_hashes(pa.array(["x", "r0002", "a-much-longer-identifier-than-the-other-ones-0001", "r0001"]))
    assert (mixed[3], mixed[1]) == (equal[0], equal[1])
    assert (id_hashes(pa.array([7, 42])) == id_hashes(pa.array(["7", "42"]))).all()
    sliced = pa.array([f"id{i}" for i in range(100)]).slice(10, 20)
    assert (id_hashes(sliced) == id_hashes(pa.array([f"id{i}" for i in range(10, 30)]))).all()
    many = np.concatenate([id_hashes(pa.array([f"img-{i}" for i in range(100_000)])),
                           id_hashes(pa.array([f"{i:012d}" for i in range(100_000)]))])
    assert len(np.unique(many)) == 200_000


def test_a_part_removed_during_the_scan_is_still_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction that deletes a part between the two passes changes nothing: the scan reads the files it
    opened at its start (the moment it describes), so every row is counted once."""
    from qwenvl_batch import output_scan

    first = pd.DataFrame({"id": ["a", "b"], "status": ["ok", "error"]})
    second = pd.DataFrame({"id": ["c"], "status": ["ok"]})
    output = write_output(tmp_path / "out.parquet", first, second)
    original = output_scan._first_pass

    def then_compact(store, sources):  # type: ignore[no-untyped-def]
        drop = original(store, sources)
        (output / "part-000001.parquet").unlink()
        return drop

    monkeypatch.setattr(output_scan, "_first_pass", then_compact)
    rows = pa.concat_tables(newest_rows(open_for_reading(output), ["id", "status"])).to_pylist()
    assert [row["id"] for row in rows] == ["a", "b", "c"]


def test_structured_answer_figures_of_an_output_equal_those_of_its_frame(tmp_path: Path) -> None:
    """An [output.schema] job's fill rates, parse errors and repairs are the same read a part at a time."""
    frame = long_run_frame(rows=600)
    frame["answer.caption"] = np.where(frame.index % 3 == 0, None, "a caption")
    frame["repairs"] = pd.array(np.where(frame.index % 7 == 0, 1, 0), dtype="Int32")
    frame["repair_cost"] = np.where(frame.index % 7 == 0, 0.0001, np.nan)
    frame["currency"] = "USD"
    frame.loc[frame.index % 11 == 0, ["status", "error_type", "error_code"]] = ["error", "parse", "json"]
    output = write_output(tmp_path / "out.parquet", frame.iloc[:250], frame.iloc[250:])
    expected = summarize(load_results(output))
    assert expected["structured"]["parse_errors"] > 0 and expected["structured"]["rows_repaired"] > 0
    _same(summarize_output(output), expected)
