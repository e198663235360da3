"""The command line: flags, messages and exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import job_file

from qwenvl_batch.cli import main


def test_run_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`run --help` lists each override flag."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--model", "--base-url", "--api-key-env", "--concurrency", "--rpm", "--tpm",
                 "--max-attempts", "--timeout", "--limit", "--retry-failed", "--rerun-changed", "--simulate"):
        assert flag in text


def test_finished_run_exits_0_and_prints_summary(tmp_path: Path, sim, monkeypatch, capsys) -> None:
    """A finished run exits 0 and the summary says where the output is, even with an error row."""
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-test")
    job = job_file(tmp_path, sim.base_url)
    (tmp_path / "img" / "row1.jpg").write_text("broken")
    assert main(["run", str(job), "--progress", "off"]) == 0
    out = capsys.readouterr().out
    assert "3 ok, 1 error" in out and str(tmp_path / "out") in out


def test_flags_override_thejob_file(tmp_path: Path, sim, monkeypatch) -> None:
    """--output and --limit from the command line win over the job file."""
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-test")
    monkeypatch.chdir(tmp_path)
    job = job_file(tmp_path, sim.base_url)
    assert main(["run", str(job), "--output", "elsewhere", "--limit", "2", "--progress", "off"]) == 0
    assert len(pd.read_parquet(tmp_path / "elsewhere")) == 2


def test_misspelt_key_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    """An unknown job-file key is a config error (exit 2) that names the key."""
    job = job_file(tmp_path, "http://127.0.0.1:9/v1", model={"max_token": 50})
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'model.max_token'" in err


def test_missing_key_exits_2_with_the_fix(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without the API key variable the message says which variable to set."""
    monkeypatch.delenv("QWENVL_TEST_KEY", raising=False)
    job = job_file(tmp_path, "http://127.0.0.1:9/v1")
    assert main(["run", str(job)]) == 2
    assert "export QWENVL_TEST_KEY=" in capsys.readouterr().err


def test_job_level_error_exits_1_without_leaking_the_key(tmp_path: Path, sim, monkeypatch, capsys) -> None:
    """A rejected key exits 1, says how to continue, and never prints the key."""
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-invalid-SECRET-0123456789")
    job = job_file(tmp_path, sim.base_url)
    assert main(["run", str(job), "--progress", "off"]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "invalid_api_key" in text and "To continue" in text
    assert "SECRET-0123456789" not in text


def test_python_dash_m_works(tmp_path: Path) -> None:
    """`python -m qwenvl_batch` is the same command."""
    done = subprocess.run([sys.executable, "-m", "qwenvl_batch", "--version"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and done.stdout.startswith("qwenvl-batch ")


def test_report_on_an_output(tmp_path: Path, sim, monkeypatch, capsys) -> None:
    """`report` summarises a finished output in each format."""
    monkeypatch.setenv("QWENVL_TEST_KEY", "sk-test")
    job = job_file(tmp_path, sim.base_url)
    main(["run", str(job), "--progress", "off"])
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s*ok\s+4\s*$", text, re.M)  # the 4 rows, counted as ok
    assert main(["report", str(tmp_path / "out"), "--format", "json"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("{")
