"""The [ray] extra stays optional: the core never imports Ray, and qwenvl_batch.ray without it says what to
install (default suite: no Ray needed)."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)


def test_core_and_cli_do_not_import_ray() -> None:
    """Importing the package, its CLI and its run path loads no Ray module."""
    done = _python("import sys, qwenvl_batch, qwenvl_batch.cli, qwenvl_batch.api, qwenvl_batch.runner\n"
                   "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_ray_package_without_ray_names_the_extra() -> None:
    """Without Ray installed, importing qwenvl_batch.ray fails with the pip command that installs the extra."""
    done = _python("import sys; sys.modules['ray'] = None\nimport qwenvl_batch.ray")
    assert done.returncode != 0
    assert 'pip install "qwenvl-batch[ray]"' in done.stderr


def test_cli_ray_without_ray_is_a_config_error(tmp_path) -> None:
    """`run JOB --ray` without the extra exits 2 with the install command, not a traceback."""
    from conftest import job_file

    path = job_file(tmp_path, "http://127.0.0.1:9/v1", rows=2)
    done = _python("import sys; sys.modules['ray'] = None\nfrom qwenvl_batch.cli import main\n"
                   f"sys.exit(main(['run', {str(path)!r}, '--ray']))")
    assert done.returncode == 2, done.stderr
    assert 'pip install "qwenvl-batch[ray]"' in done.stderr and "Traceback" not in done.stderr
