"""Inputs for benchmarks/run.py: job definitions, large "scans", and pre-built outputs for the resume figures.

A pre-built output must be exactly what the runner would have written, or the resume figures measure the wrong
thing (a wrong fingerprint makes every row "changed" and the run refuses to start; a wrong schema fails the
schema check). So it is built from the library's own pieces: ``RowRenderer.fingerprints`` → ``fingerprint_hex``
for the fingerprints, ``store.output_schema`` for the schema, and ``OutputStore`` for the rest: its part writer
writes ``part-NNNNNN.parquet`` files (compression, row groups, names: the store's own, whatever its internals)
and ``OutputStore.finalize`` writes the persisted resume index as the end of a run does. The benchmark then
checks the plan: all done → "0 to do"; all but the last N → "N to do".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pyarrow import ipc

from qwenvl_batch import job_from_dict
from qwenvl_batch.config import JobConfig
from qwenvl_batch.manifest import open_manifest
from qwenvl_batch.persisted_index import INDEX_FILE
from qwenvl_batch.planning import fingerprint_stamp
from qwenvl_batch.prompt import RowRenderer, fingerprint_hex
from qwenvl_batch.store import COMPACT_ROWS, ROW_GROUP_ROWS, OutputStore, output_schema

MODEL = "qwen3-vl-flash"
MAX_TOKENS = 100
PROMPT = "Caption this image."


def job_dict(manifest: Path, output: Path, base_url: str, *, concurrency: int, resize: str | None = None,
             **limits: Any) -> dict[str, Any]:
    """A job against the simulator, shaped like a job file; ``limits`` go into [limits] as given, ``resize`` into
    [images] (None: the default)."""
    raw: dict[str, Any] = {
        "input": {"path": str(manifest)},
        "output": {"path": str(output)},
        "model": {"name": MODEL, "base_url": base_url, "api_key_optional": True, "api_key_env": "NO_KEY_NEEDED",
                  "max_tokens": MAX_TOKENS},
        "prompt": {"user": PROMPT},
        "limits": {"concurrency": concurrency, **limits},
        "run": {"progress": "off"},
    }
    if resize is not None:
        raw["images"] = {"resize": resize}
    return raw


def large_scans(folder: Path, count: int, target_bytes: int = 5_000_000) -> list[str]:
    """A few ~5 MB JPEGs of about 12 megapixels, like an A4 page scanned at 300 dpi.

    Noise stands in for the page (it compresses like a dense scan); the size is what matters for upload and
    base64 cost, and 12 MP is above every model's default pixel budget, so client-side resizing would shrink it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        path = folder / f"scan{i:02d}.jpg"
        if not path.exists():
            Image.effect_noise((4000, 3000), 27 + i).convert("RGB").save(path, quality=80)
        names.append(path.name)
        size = path.stat().st_size
        if not 0.6 * target_bytes <= size <= 1.6 * target_bytes:
            raise RuntimeError(f"{path} is {size:,} bytes; the large-image figures assume about {target_bytes:,}")
    return names


def build_done_output(job: JobConfig, done_rows: int, *, part_rows: int = COMPACT_ROWS,
                      stamped: bool = True) -> float:
    """Write an output in which the first ``done_rows`` manifest rows are finished ok; returns seconds taken.

    Parts of ``part_rows`` rows are written with the store's own part writer (``OutputStore._write_part``: its
    compression, row groups, metadata and names), then ``OutputStore.finalize`` writes the persisted resume index
    as a run's end does. ``stamped``: the index vouches for the rows' fingerprints as a run that checked them
    leaves it (planning.fingerprint_stamp); False leaves it without, so the next start recomputes them.
    Nothing is sent, and nothing goes through the journal, so 10^7 rows take a few minutes.
    """
    started = time.perf_counter()
    manifest = open_manifest(job.input.path, job.input.format)
    renderer = RowRenderer(job, manifest.columns, job.input.path.resolve().parent)  # as JobRun builds it
    schema = output_schema(manifest.schema)
    store = OutputStore(job.output.path, schema, job.input.id_column)
    store.recover()
    if store.parts() or store.segments():
        raise RuntimeError(f"{job.output.path} is not empty; the fixture must start from nothing")
    store.create()  # OUT.state/: job.json, journal/, the lock
    seq, written = 1, 0
    for batch in _segments_of(manifest.batches(), part_rows):  # readers cap their batches; join them per part
        if written >= done_rows:
            break
        batch = batch.slice(0, done_rows - written)
        table = _done_table(batch, renderer, schema, seed=seq)
        store._write_part(table.to_batches(max_chunksize=ROW_GROUP_ROWS), seq)
        seq += 1
        written += batch.num_rows
    stamp = fingerprint_stamp(manifest, renderer) if stamped else None
    store.finalize(target_rows=part_rows, stamp=stamp)  # the resume index, as a run's end writes it
    if len(store.parts()) != seq - 1 or not (store.state_dir / INDEX_FILE).exists():
        raise RuntimeError(f"{job.output.path}: {len(store.parts())} parts (expected {seq - 1}), or no resume index")
    store.unlock()  # the benchmark's run takes the output's lock itself
    return time.perf_counter() - started


def _segments_of(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Consecutive batches joined into batches of ``rows`` rows (the last one shorter): one part each."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            joined = pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            yield joined.slice(0, rows)
            rest = joined.slice(rows)
            pending, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _done_table(batch: pa.RecordBatch, renderer: RowRenderer, schema: pa.Schema, *, seed: int) -> pa.Table:
    """Result columns for rows answered ok, with realistic sizes (a ~25-word caption, usage, cost)."""
    n = batch.num_rows
    rng = np.random.default_rng(seed)
    prompt_tokens = rng.integers(90, 110, n)
    completion_tokens = rng.integers(20, 60, n)
    words = np.array(["a", "photo", "of", "grey", "noise", "texture", "with", "random", "speckles", "image"])
    response = [" ".join(words[rng.integers(0, len(words), 25)]) for _ in range(min(n, 1000))]
    finished = np.datetime64("2024-01-01T00:00:00", "us") + np.arange(n).astype("timedelta64[ms]")
    cost = (prompt_tokens * 0.05 + completion_tokens * 0.4) / 1e6
    columns: dict[str, Any] = {name: batch.column(name) for name in batch.schema.names}
    columns.update({
        "status": pa.array(["ok"] * n),
        "response": pa.array([response[i % len(response)] for i in range(n)]),
        "reasoning": pa.nulls(n, pa.string()),
        "finish_reason": pa.array(["stop"] * n),
        "model": pa.array([MODEL] * n),
        "prompt_tokens": pa.array(prompt_tokens, pa.int64()),
        "completion_tokens": pa.array(completion_tokens, pa.int64()),
        "total_tokens": pa.array(prompt_tokens + completion_tokens, pa.int64()),
        "reasoning_tokens": pa.array(np.zeros(n, np.int64)),
        "cached_tokens": pa.nulls(n, pa.int64()),
        "image_tokens": pa.array(np.full(n, 80, np.int64)),
        "error_type": pa.nulls(n, pa.string()),
        "error_code": pa.nulls(n, pa.string()),
        "error_message": pa.nulls(n, pa.string()),
        "attempts": pa.array(np.ones(n, np.int32)),
        "latency_s": pa.array(rng.uniform(1.0, 5.0, n).round(4)),
        "request_id": pa.array([f"chatcmpl-{seed:04d}{i:08d}" for i in range(n)]),
        "finished_at": pa.array(finished, pa.timestamp("us", tz="UTC")),
        "fingerprint": pa.array(fingerprint_hex(renderer.fingerprints(batch))),  # what plan_rows will compare
        "input_cost": pa.array(prompt_tokens * 0.05 / 1e6),
        "output_cost": pa.array(completion_tokens * 0.4 / 1e6),
        "cost": pa.array(cost),
        "currency": pa.array(["USD"] * n),
    })
    # columns the fixture does not fill (added by later versions, e.g. `simulated`) are null, as in a real output
    return pa.Table.from_arrays([columns.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema)


def output_layout(folder: Path) -> tuple[int, int, int]:
    """(Parquet parts, row groups, rows) of an output folder."""
    parts = sorted(folder.glob("part-*.parquet"))
    metas = [pq.ParquetFile(p).metadata for p in parts]
    return len(parts), sum(m.num_row_groups for m in metas), sum(m.num_rows for m in metas)


def make_job(raw: dict[str, Any], base_dir: Path) -> JobConfig:
    return job_from_dict(raw, base_dir=base_dir)


def add_error_segment(output: Path, ids: list[str], images: list[str], finished_at: np.ndarray) -> None:
    """A journal segment (not folded: a running job's) of error rows for ``ids``, finished at ``finished_at``
    (datetime64[us]), in the output's own schema: the status screen and the report list the newest with their
    messages, so the read benchmarks need some."""
    from qwenvl_batch.store import _read_part_schema, open_for_reading

    store = open_for_reading(output)
    schema = _read_part_schema(store.parts()[-1][1]).remove_metadata()
    count = len(ids)
    columns = {name: pa.nulls(count, schema.field(name).type) for name in schema.names}
    columns.update({
        "id": pa.array(ids), "image": pa.array(images),
        "status": pa.array(["error"] * count), "error_type": pa.array(["server"] * count),
        "error_code": pa.array(["503"] * count),
        "error_message": pa.array([f"HTTP 503 Service Unavailable for row {i}" for i in ids]),
        "attempts": pa.array(np.full(count, 6, np.int32)),
        "finished_at": pa.array(finished_at, pa.timestamp("us", tz="UTC")),
        "simulated": pa.array([False] * count),
    })
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    store.journal_dir.mkdir(parents=True, exist_ok=True)
    segment = store.journal_dir / f"seg-{store.next_seq():06d}.arrows"
    with pa.OSFile(str(segment), "wb") as sink, ipc.new_stream(sink, schema) as stream:
        stream.write_table(table)
