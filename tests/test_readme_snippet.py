"""The README's Python snippet works as written: in a script, inside a running event loop, and in a real Jupyter
kernel (the last one needs the `[notebook]` extra and is skipped with a message without it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    """The first ```python block of the README (the quick start's library example)."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README has no python snippet"
    return match.group(1)


def _workspace(tmp_path: Path) -> Path:
    """A copy of the repository's jobs and sample data (the snippet writes its output next to them)."""
    (tmp_path / "jobs").mkdir()
    for job in (REPO / "jobs").glob("*.toml"):
        (tmp_path / "jobs" / job.name).write_text(job.read_text())
    (tmp_path / "sample_data").symlink_to(REPO / "sample_data")
    return tmp_path


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_readme_snippet_runs_as_a_script(tmp_path: Path) -> None:
    """The snippet, pasted into a script, runs the sample job on the simulator and reads the results."""
    done = _python(readme_snippet() + "\nassert summary.ok == len(frame) > 0\n", _workspace(tmp_path))
    assert done.returncode == 0, done.stderr
    assert re.match(r"\d+ 0 ", done.stdout)


def test_readme_snippet_runs_inside_a_running_event_loop(tmp_path: Path) -> None:
    """The snippet inside asyncio.run (what a notebook cell is) works: no 'asyncio.run() cannot be called'."""
    body = textwrap.indent(readme_snippet() + "assert summary.ok == len(frame) > 0\n", "    ")
    code = f"import asyncio\n\nasync def cell():\n{body}\nasyncio.run(cell())\n"
    done = _python(code, _workspace(tmp_path))
    assert done.returncode == 0, done.stderr


@pytest.mark.notebook
def test_readme_snippet_runs_in_a_jupyter_kernel(tmp_path: Path) -> None:
    """The snippet as one notebook cell, executed by a real IPython kernel (which has a running loop)."""
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebook]' for the Jupyter kernel test")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebook]' for the Jupyter kernel test")
    pytest.importorskip("ipykernel", reason="pip install -e '.[notebook]' for the Jupyter kernel test")
    workspace = _workspace(tmp_path)
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(f"import sys; sys.path.insert(0, {str(REPO)!r})"),
                      nbformat.v4.new_code_cell(readme_snippet()),
                      nbformat.v4.new_code_cell("assert summary.ok == len(frame) > 0")]
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(workspace)}}).execute()
    outputs = notebook.cells[1].outputs
    assert any(re.match(r"\d+ 0 ", o.get("text", "")) for o in outputs), outputs
