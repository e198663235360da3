"""Shard journals (``OUT.state/shards/K/journal``, written by ``qwenvl-batch run --ray``) are part of the output
for every reader and for recovery, also without Ray: the store lists them with its own journal."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import image_rows, ok_requests_for, write_manifest
from pyarrow import ipc

from qwenvl_batch import load_results, run_job
from qwenvl_batch.planning import open_job
from qwenvl_batch.prompt import fingerprint_hex
from qwenvl_batch.store import state_dir_for


def test_a_shard_journal_is_read_and_recovered(tmp_path: Path, sim, make_job) -> None:
    """A row left in a shard's journal (a killed --ray run) is seen by load_results, folded by the next run's
    recovery, and not sent again."""
    job = make_job(write_manifest(tmp_path / "m.csv", image_rows(tmp_path, 4)))
    run_job(job, limit=2)
    row = pq.read_table(job.output.path).to_pylist()[0] | {"id": "row-0003", "image": "img/row3.jpg",
                                                             "note": "note 3"}
    journal = state_dir_for(job.output.path) / "shards" / "0001" / "journal"
    journal.mkdir(parents=True)
    setup = open_job(job)
    schema = setup.store.schema
    manifest_row = next(setup.manifest.batches()).slice(3, 1)
    row["fingerprint"] = fingerprint_hex(setup.renderer.fingerprints(manifest_row))[0]
    with ipc.new_stream(str(journal / "seg-1000001.arrows"), schema) as stream:
        stream.write_batch(pa.RecordBatch.from_pylist([row], schema=schema))
    assert set(load_results(job.output.path)["id"]) == {"row-0000", "row-0001", "row-0003"}
    summary = run_job(job)
    assert summary.ok == 1 and summary.skipped_ok == 3  # only row-0002 was left to send
    assert ok_requests_for(sim, "row-0003") == 0
    assert not list(journal.iterdir())
    assert len(load_results(job.output.path)) == 4
