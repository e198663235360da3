"""Memory and speed of a manifest that carries its images (Hugging Face-style Parquet), against a path manifest.

    python benchmarks/bytes_manifest.py            # 10^4 and 10^5 rows of bytes, 10^4 rows of paths (~12 min)
    python benchmarks/bytes_manifest.py --rows 20000 --small 2000     # a quick look
    python benchmarks/bytes_manifest.py --paths-only --paths-rows 100000  # the path manifest at 10^5 rows

A bytes manifest puts every image inside the Parquet file (``struct<bytes, path>``, row groups of 100 rows as
``datasets`` writes them), so the runner's reader holds image bytes, not just references: the figure to watch is
that peak RSS does not grow with the number of rows (the flat bound: the 10^5-row run within +100 MB of the
10^4-row one), only with the bytes in flight, and that rows/s match the path manifest over the same images.

The images are 300 distinct 160x120 noise JPEGs (~14 KB), cycled; the image column is written without
dictionary encoding, so the file holds every row's bytes (10^5 rows ≈ 1.4 GB), as a real dataset does. Each run
is a fresh child process (``_job.py``) against the simulator in its own process (zero latency, concurrency 64),
so peak RSS is the runner's alone.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import simulator_process, synthetic_manifest
from _fixtures import job_dict
from _job import run_child

IMAGES = 300
SIDE = (160, 120)
ROW_GROUP = 100


def images(folder: Path) -> list[bytes]:
    """The distinct images, also written as files for the path manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(IMAGES):
        path = folder / f"img{i:04d}.jpg"
        if not path.exists():
            buffer = io.BytesIO()
            Image.effect_noise(SIDE, 40 + i % 50).convert("RGB").save(buffer, "JPEG", quality=85)
            path.write_bytes(buffer.getvalue())
        out.append(path.read_bytes())
    return out


def bytes_manifest(path: Path, rows: int, data: list[bytes]) -> Path:
    """An HF-style Parquet of ``rows`` rows, written row group by row group (never whole in memory)."""
    if path.exists():
        return path
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("caption", pa.string())],
                       metadata={"huggingface": '{"info": {"features": {"image": {"_type": "Image"}}}}'})
    with pq.ParquetWriter(path, schema, use_dictionary=["caption"], compression="none") as writer:
        for start in range(0, rows, ROW_GROUP):
            count = min(ROW_GROUP, rows - start)
            cells = [{"bytes": data[(start + i) % IMAGES], "path": f"img{(start + i) % IMAGES:04d}.jpg"}
                     for i in range(count)]
            writer.write_table(pa.table({"image": pa.array(cells, schema.field("image").type),
                                         "caption": [f"row {start + i}" for i in range(count)]}, schema=schema))
    return path


def figures(name: str, rows: int, result: dict[str, Any]) -> str:
    """One line: peak RSS, whole-run rows/s, rows/s between the first request and the last answer, and the runner's
    CPU per row (the figure that does not depend on what else the shared cores are doing)."""
    summary = result.get("summary") or {}
    wall = result["run_end"] - result["run_start"]
    steady_s = (result.get("last_answer") or 0) - (result.get("first_send") or 0)
    steady = result.get("sends", 0) / steady_s if steady_s > 0 else 0.0
    return (f"{name:<22} rows {rows:>8,}  ok {summary.get('ok', 0):>8,}  peak RSS {result['peak_rss_mb']:6.0f} MB "
            f"(after imports {result['rss_before_run_mb']:4.0f} MB)  {rows / wall:6.0f} rows/s whole run, "
            f"{steady:6.0f} rows/s sending, runner CPU {1000 * result['cpu_run_s'] / max(rows, 1):.2f} ms/row  "
            f"error: {result['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--paths-rows", type=int, default=None, help="rows of the path manifest (default: --small)")
    parser.add_argument("--paths-only", action="store_true", help="run only the path manifest (for comparison)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs here (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenvl-bytes-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = images(work / "img")
        names = [f"img{i:04d}.jpg" for i in range(IMAGES)]
        runs = [("bytes", args.small), ("bytes", args.rows)] if not args.paths_only else []
        runs.append(("paths", args.paths_rows or args.small))
        results = {}
        with simulator_process() as sim:
            for kind, rows in runs:
                if kind == "bytes":
                    manifest = bytes_manifest(work / f"bytes-{rows}.parquet", rows, data)
                else:
                    manifest = work / f"paths-{rows}.parquet"
                    if not manifest.exists():
                        synthetic_manifest(manifest, rows, names, image_dir="img")
                out = work / "out" / f"{kind}-{rows}"
                shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, also with --workdir
                job = job_dict(manifest, out, sim.url, concurrency=64)
                result = run_child({"job": job, "base_dir": str(work), "fold_rows": None}, work, f"{kind}-{rows}")
                results[(kind, rows)] = result
                print(figures(f"{kind} manifest", rows, result), flush=True)
        if args.paths_only:
            return 0
        growth = results[("bytes", args.rows)]["peak_rss_mb"] - results[("bytes", args.small)]["peak_rss_mb"]
        print(f"peak RSS growth, bytes manifest {args.small:,} → {args.rows:,} rows: {growth:+.0f} MB "
              f"(flat bound: ≤ +100 MB) {'met' if growth <= 100 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
