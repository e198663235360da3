"""The numbers behind the report's charts and the status screen: buckets over time, rates, percentiles,
histograms, cumulative sums and projections to the end of a job.

Pure functions over numpy arrays (times are float seconds since the epoch, UTC), so every figure a chart draws
can be unit-tested without drawing it, and ``status`` and the HTML report compute "rows per minute", "ETA" and
"projected spend" the same way (the status screen and the report must never disagree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "RECENT_WINDOW_S", "Buckets", "Histogram", "bucket_width_s", "buckets", "cumulative", "cumulative_points",
    "downsample", "epoch_s",
    "eta_s", "histogram", "percentiles", "projected", "recent_rate_per_min", "stacked_buckets",
]  # fmt: skip

RECENT_WINDOW_S = 300.0  # "current rate": rows finished over the last 5 minutes
_WIDTHS_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
_MAX_BUCKETS = 60  # bars a phone screen can still tell apart
OTHER = "other"


def epoch_s(values: pd.Series | np.ndarray | list[object]) -> np.ndarray:
    """Timestamps (naive ones are taken as UTC) as float seconds since the epoch; nulls and junk dropped, sorted."""
    times = pd.to_datetime(pd.Series(values, dtype="object") if isinstance(values, list) else values,
                           utc=True, errors="coerce")
    stamps = pd.DatetimeIndex(times.dropna()).as_unit("us")
    return np.sort(stamps.asi8.astype("float64") / 1e6)


def bucket_width_s(duration_s: float, max_buckets: int = _MAX_BUCKETS) -> int:
    """The smallest round bucket width (1 s, 5 s, ... 1 day, 1 week) that splits ``duration_s`` into at most
    ``max_buckets`` buckets: fine enough to show a stall, coarse enough to read on a phone."""
    for width in _WIDTHS_S:
        if duration_s / width < max_buckets:
            return width
    return _WIDTHS_S[-1]


@dataclass(frozen=True)
class Buckets:
    """Counts per fixed-width time bucket: bucket ``i`` covers ``[start + i*width_s, start + (i+1)*width_s)``."""

    start: float
    width_s: int
    counts: np.ndarray  # int64, one per bucket; gaps are zeros

    @property
    def rate_per_min(self) -> np.ndarray:
        return self.counts * (60.0 / self.width_s)

    @property
    def edges(self) -> np.ndarray:
        return self.start + self.width_s * np.arange(len(self.counts) + 1, dtype="float64")


def _bucket_index(times: np.ndarray, start: float, width_s: int) -> np.ndarray:
    return np.floor((times - start) / width_s).astype("int64")


def buckets(times: np.ndarray, *, width_s: int | None = None) -> Buckets:
    """Rows finished per bucket; the first bucket starts at the first time rounded down to the width (so bucket
    edges fall on round clock times), and the width follows the run's length unless given."""
    if times.size == 0:
        return Buckets(0.0, width_s or 60, np.zeros(0, "int64"))
    width = width_s or bucket_width_s(float(times[-1] - times[0]))
    start = math.floor(times[0] / width) * width
    return Buckets(float(start), width, np.bincount(_bucket_index(times, start, width)).astype("int64"))


def stacked_buckets(times: np.ndarray, labels: np.ndarray, *, start: float, width_s: int, count: int,
                    top: int = 5) -> tuple[list[str], np.ndarray]:
    """Counts per (label, bucket) for the ``top`` most frequent labels (the rest summed as ``other``), on the
    same buckets as the rows chart. Returns the labels (most frequent first) and a ``labels × buckets`` matrix."""
    if times.size == 0:
        return [], np.zeros((0, count), "int64")
    values, frequency = np.unique(labels.astype(str), return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-frequency[i], values[i]))
    kept = [str(values[i]) for i in order[:top]]
    names = kept + ([OTHER] if len(values) > top else [])
    row_of = {name: i for i, name in enumerate(kept)}
    rows = np.array([row_of.get(str(label), len(kept)) for label in labels], dtype="int64")
    index = np.clip(_bucket_index(times, start, width_s), 0, max(count - 1, 0))
    matrix = np.zeros((len(names), max(count, 1)), "int64")
    np.add.at(matrix, (rows, index), 1)
    return names, matrix[:, :count]


def recent_rate_per_min(times: np.ndarray, now: float, window_s: float = RECENT_WINDOW_S) -> float:
    """Rows per minute over the last ``window_s`` seconds before ``now`` (the current rate). When the run began
    less than a window ago, the rate is over the time since its first row, so a young run is not underrated."""
    if times.size == 0:
        return 0.0
    since = now - window_s
    recent = int(np.count_nonzero((times > since) & (times <= now)))
    span = min(window_s, now - float(times[0]))
    return recent * 60.0 / span if span > 0 else 0.0


def eta_s(pending: int, rate_per_min: float) -> float | None:
    """Seconds until ``pending`` rows are done at ``rate_per_min``; 0 when nothing is pending, None at rate 0."""
    if pending <= 0:
        return 0.0
    if rate_per_min <= 0:
        return None
    return pending / rate_per_min * 60.0


def projected(so_far: float, done: int, total: int | None) -> float | None:
    """What a running total (spend, tokens) will be once all ``total`` rows are done, at the average so far per
    done row; None when the total is unknown or nothing is done yet."""
    if total is None or done <= 0:
        return None
    return so_far * max(total, done) / done


def percentiles(values: np.ndarray, qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` (linear interpolation, as ``report``'s latency table); NaNs
    ignored; empty when there are no values."""
    finite = values[np.isfinite(values)]  # a copy, which the percentile may reorder (no second copy of 10^7)
    if finite.size == 0:
        return {}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(finite, qs, overwrite_input=True))}


@dataclass(frozen=True)
class Histogram:
    """Counts per bin; the last bin also holds every value above ``edges[-1]`` (``overflow`` of them) so one
    pathological 10-minute request does not squash the rest of the distribution into one bar."""

    edges: np.ndarray
    counts: np.ndarray
    overflow: int


def _nice_step(span: float, bins: int) -> float:
    raw = span / bins
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def histogram(values: np.ndarray, bins: int = 30) -> Histogram:
    """Round-width bins from 0 to just above the 99.5th percentile (or the maximum, if that is not much more)."""
    finite = values[np.isfinite(values)]  # a copy, which the percentile may reorder (no second copy of 10^7)
    if finite.size == 0:
        return Histogram(np.zeros(0), np.zeros(0, "int64"), 0)
    top = float(np.max(finite))
    cut = float(np.percentile(finite, 99.5, overwrite_input=True))
    upper = top if top <= cut * 1.5 else cut
    upper = max(upper, 1e-9)
    step = _nice_step(upper, bins)
    count = max(1, math.ceil(upper / step + 1e-9))
    if count * step <= upper:  # the maximum falls on an edge: give it its own bin
        count += 1
    edges = step * np.arange(count + 1, dtype="float64")
    counts = np.zeros(count, "int64")
    for start in range(0, finite.size, 1 << 20):  # a slice at a time: bounded temporaries for 10^7 values
        part = finite[start: start + (1 << 20)]
        counts += np.bincount(np.clip(np.floor(np.maximum(part, 0) / step).astype("int64"), 0, count - 1),
                              minlength=count)
    return Histogram(edges, counts, int(np.count_nonzero(finite >= edges[-1])))


def cumulative(times: np.ndarray, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Running total of ``values`` (or of rows, when None) in time order; NaN values count as 0. Times already in
    order (rows are mostly written as they finish) are used as they are: no sort and no copies of 10^7 values."""
    if values is None:
        counts = np.arange(1, times.size + 1, dtype="float64")  # what a cumulative sum of ones is, exactly
        return (times if _ordered(times) else np.sort(times, kind="stable")), counts
    amounts = values.astype("float64", copy=False)
    if np.isnan(amounts).any():
        amounts = np.nan_to_num(amounts)
    if _ordered(times):
        return times, np.cumsum(amounts)
    order = np.argsort(times, kind="stable")
    return times[order], np.cumsum(amounts[order])


def cumulative_points(times: np.ndarray, values: np.ndarray | None = None,
                      max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """``downsample(*cumulative(times, values), max_points)``, computed with one full-length copy (the running
    total) instead of four (order, sorted times, sorted values, running total): 10^7 rows are 80 MB, not 320."""
    if times.size <= max_points:
        return downsample(*cumulative(times, values), max_points)
    index = np.unique(np.linspace(0, times.size - 1, max_points).round().astype("int64"))
    order = None if _ordered(times) else np.argsort(times, kind="stable")
    xs = times[index] if order is None else times[order[index]]
    if values is None:
        return xs, (index + 1).astype("float64")
    amounts = values.astype("float64", copy=True) if order is None else values[order].astype("float64", copy=False)
    del order
    np.nan_to_num(amounts, copy=False)
    np.cumsum(amounts, out=amounts)
    return xs, amounts[index]


def _ordered(values: np.ndarray) -> bool:
    return bool(np.all(values[1:] >= values[:-1])) if values.size > 1 else True


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` evenly spaced points, always keeping the first and last (a 10^6-point path would
    make the page megabytes long and look the same)."""
    if x.size <= max_points:
        return x, y
    index = np.unique(np.linspace(0, x.size - 1, max_points).round().astype("int64"))
    return x[index], y[index]
