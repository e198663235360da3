"""Seeded fuzz (issue 18): journal segments and parts damaged at random positions. ``run`` and ``report`` never
crash (a clean one-line ConfigError is allowed), and no row committed before the damaged bytes is bought again."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import image_rows, ok_requests_for, write_manifest
from test_damaged_state import part_to_segment

from qwenvl_batch import ConfigError, run_job
from qwenvl_batch.cli import main
from qwenvl_batch.store import state_dir_for

TRIALS = 16
ROWS = 8


def _damage(data: bytes, rng: random.Random) -> tuple[bytes, int]:
    """Flip a few bytes, overwrite a run with junk, or truncate; returns the new bytes and the first damaged offset."""
    kind = rng.choice(["flip", "junk", "truncate"])
    at = rng.randrange(len(data))
    if kind == "truncate":
        return data[:at], at
    damaged = bytearray(data)
    if kind == "flip":
        for offset in sorted({at, *(rng.randrange(at, len(data)) for _ in range(2))}):
            damaged[offset] ^= rng.randrange(1, 256)
    else:
        end = min(len(data), at + rng.randrange(1, 64))
        damaged[at:end] = bytes(rng.randrange(256) for _ in range(end - at))
    return bytes(damaged), at


@pytest.mark.parametrize("seed", range(TRIALS))
def test_random_damage_never_crashes_or_rebuys(seed: int, tmp_path: Path, sim, make_job, capsys) -> None:
    """One random damage to a segment or a part: report and status exit cleanly, run finishes or refuses cleanly, and rows
    whose bytes all precede the damage are not sent again."""
    rng = random.Random(seed)
    rows = image_rows(tmp_path, ROWS)
    job = make_job(write_manifest(tmp_path / "m.csv", rows))
    run_job(job)
    out = job.output.path
    target = rng.choice(["segment", "part"])
    # rows are stored in the order they finished, which need not be the manifest's
    stored = pq.read_table(next(out.glob("part-*.parquet")), columns=["id"])["id"].to_pylist()
    if target == "segment":
        ends = part_to_segment(out)
        [path] = (state_dir_for(out) / "journal").glob("seg-*.arrows")
    else:
        ends = []
        [path] = out.glob("part-*.parquet")
    damaged, at = _damage(path.read_bytes(), rng)
    path.write_bytes(damaged)
    safe = [key for key, end in zip(stored, ends, strict=False) if end <= at]  # whole batches before the damage

    assert main(["report", str(out)]) in (0, 2)
    assert main(["status", str(out)]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err
    before = {r["id"]: ok_requests_for(sim, r["id"]) for r in rows}
    sent = len(sim.requests)
    try:
        run_job(job)
    except ConfigError as exc:  # a damaged part: one line naming it, nothing sent
        assert str(path) in str(exc) and "\n" not in str(exc)
        assert len(sim.requests) == sent
        return
    assert all(ok_requests_for(sim, key) == before[key] for key in safe), (target, at, safe)
    # a part damaged in a column the run does not read (resume reads ids, status, fingerprints, costs) is still
    # refused by report, with the file named
    code = main(["report", str(out)])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and str(path) in err and "Traceback" not in err)
    shutil.rmtree(tmp_path / "out")
