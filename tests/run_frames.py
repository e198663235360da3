"""Output frames shaped like real runs, for the HTML report's tests (no simulator needed to draw a chart)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qwenvl_batch.pricing import PriceTable, add_cost_columns

START = pd.Timestamp("2026-11-30 22:00:00", tz="UTC")


def long_run_frame(rows: int = 6_000, hours: float = 6.0, seed: int = 7) -> pd.DataFrame:
    """A six-hour run still going: heavy-tailed latency, retries, three kinds of error (one burst of 503s), two
    regions (USD and CNY rows) and two sources to group by."""
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.uniform(0, hours * 3600, rows))
    status = np.where(rng.random(rows) < 0.04, "error", "ok")
    burst = (offsets > 2.0 * 3600) & (offsets < 2.3 * 3600) & (rng.random(rows) < 0.5)
    status[burst] = "error"
    error_type = np.where(status == "error", rng.choice(["input", "content_filter", "server"], rows), None)
    error_type[burst] = "server"
    codes = {"input": "unreadable", "content_filter": "data_inspection_failed", "server": "503"}
    error_code = np.array([codes.get(t) if t else None for t in error_type], dtype=object)
    ok = status == "ok"
    prompt = np.where(ok, rng.integers(600, 1_400, rows), 0)
    completion = np.where(ok, rng.integers(30, 120, rows), 0)
    frame = pd.DataFrame({
        "id": [f"img-{i:06d}" for i in range(rows)],
        "source": rng.choice(["scans", "web", "phone"], rows),
        "status": status,
        "model": np.where(rng.random(rows) < 0.8, "qwen3-vl-flash", "qwen3-vl-plus"),
        "prompt_tokens": pd.array(np.where(ok, prompt, None), dtype="Int64"),
        "completion_tokens": pd.array(np.where(ok, completion, None), dtype="Int64"),
        "total_tokens": pd.array(np.where(ok, prompt + completion, None), dtype="Int64"),
        "error_type": error_type,
        "error_code": error_code,
        "error_message": [f"{t} failure on img-{i:06d}" if t else None for i, t in enumerate(error_type)],
        "attempts": np.where(error_type == "input", 0, 1 + rng.poisson(0.15, rows)),
        "latency_s": np.where(error_type == "input", np.nan, rng.lognormal(0.6, 0.5, rows)),
        "finished_at": START + pd.to_timedelta(offsets, unit="s"),
        "simulated": True,
    })
    for column in ("response", "reasoning", "finish_reason", "request_id", "fingerprint"):
        frame[column] = np.where(ok, "x", None) if column != "reasoning" else None
    for column in ("reasoning_tokens", "cached_tokens", "image_tokens"):
        frame[column] = pd.array(np.where(ok, 0, None), dtype="Int64")
    usd = add_cost_columns(frame.iloc[: rows * 3 // 4], PriceTable.builtin(), "intl")
    cny = add_cost_columns(frame.iloc[rows * 3 // 4:], PriceTable.builtin(), "cn")
    return pd.concat([usd, cny]).sort_values("finished_at").reset_index(drop=True)
