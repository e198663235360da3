"""The numbers behind the charts and the status screen: buckets, rates, percentiles, histograms, projections."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qwenvl_batch.timeline import (
    OTHER,
    bucket_width_s,
    buckets,
    cumulative,
    cumulative_points,
    downsample,
    epoch_s,
    eta_s,
    histogram,
    percentiles,
    projected,
    recent_rate_per_min,
    stacked_buckets,
)

T0 = 1_764_000_000.0  # a round minute (divisible by 60)


@pytest.mark.parametrize(("duration_s", "width_s"), [
    (0, 1), (50, 1), (59, 1), (60, 5), (299, 5), (600, 30), (3_000, 60), (3 * 3600, 300), (10 * 3600, 1800),
    (3 * 86400, 3 * 3600), (400 * 86400, 7 * 86400),
])  # fmt: skip
def test_bucket_width_is_round_and_keeps_under_60_buckets(duration_s: float, width_s: int) -> None:
    """The width is the smallest round one giving fewer than 60 buckets (1 s for a minute, 1 week at most)."""
    assert bucket_width_s(duration_s) == width_s
    if duration_s < 400 * 86400:
        assert duration_s / width_s < 60


def test_buckets_start_on_a_round_time_and_keep_gaps() -> None:
    """Bucket edges fall on round clock times, and a stall shows as empty buckets, not a missing one."""
    times = np.array([T0 + 65, T0 + 70, T0 + 130, T0 + 600 + 65])  # a 9-minute stall
    b = buckets(times, width_s=60)
    assert b.start == T0 + 60
    assert b.counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert b.rate_per_min.tolist()[:2] == [2.0, 1.0]
    assert b.edges[0] == b.start and b.edges[-1] == b.start + 60 * 11


def test_buckets_count_every_row_once() -> None:
    """However the width is chosen, the bucket counts add up to the rows."""
    rng = np.random.default_rng(1)
    times = np.sort(T0 + rng.uniform(0, 86_400 * 2, 5_000))
    b = buckets(times)
    assert b.counts.sum() == 5_000 and len(b.counts) <= 60
    assert b.start <= times[0] < b.start + b.width_s


def test_buckets_of_nothing() -> None:
    """No finished rows: no buckets (the chart says so instead of failing)."""
    assert buckets(np.empty(0)).counts.size == 0


def test_epoch_seconds_from_timestamps() -> None:
    """finished_at values (tz-aware, naive = UTC, nulls) become sorted epoch seconds, nulls dropped."""
    values = pd.Series([pd.Timestamp("2026-01-01 00:00:10", tz="UTC"), None, pd.Timestamp("2026-01-01 00:00:00")])
    assert epoch_s(values).tolist() == [1767225600.0, 1767225610.0]


def test_stacked_buckets_keep_top_labels_and_sum_the_rest() -> None:
    """The most frequent labels get their own series, the rest are 'other'; every error lands in one cell."""
    times = T0 + np.array([0, 1, 2, 61, 62, 63, 64, 125], dtype=float)
    labels = np.array(["server/500", "server/500", "input/x", "server/500", "rate/429", "input/x", "z/1", "y/2"])
    names, matrix = stacked_buckets(times, labels, start=T0, width_s=60, count=3, top=2)
    assert names == ["server/500", "input/x", OTHER]
    assert matrix.tolist() == [[2, 1, 0], [1, 1, 0], [0, 2, 1]]
    assert matrix.sum() == len(times)


def test_recent_rate_counts_the_last_five_minutes() -> None:
    """The current rate is rows in the last 5 minutes per minute; older rows do not count."""
    times = np.concatenate([T0 + np.arange(0, 600, 1.0), T0 + 600 + np.arange(0, 300, 2.0)])  # 60/min, then 30/min
    assert recent_rate_per_min(times, now=T0 + 900) == pytest.approx(30.0, rel=0.01)


def test_recent_rate_of_a_young_run_is_not_underrated() -> None:
    """A run 1 minute old is rated over that minute, not over 5."""
    times = T0 + np.arange(0, 60, 0.5)  # 120 rows in the first minute
    assert recent_rate_per_min(times, now=T0 + 60) == pytest.approx(120.0)


def test_recent_rate_of_a_stalled_run_is_zero() -> None:
    """No rows in the last 5 minutes: the rate is 0 (and so the ETA is unknown)."""
    assert recent_rate_per_min(T0 + np.arange(10.0), now=T0 + 3600) == 0.0
    assert recent_rate_per_min(np.empty(0), now=T0) == 0.0


@pytest.mark.parametrize(("pending", "rate", "eta"), [(600, 60.0, 600.0), (0, 0.0, 0.0), (10, 0.0, None), (1, 120.0, 0.5)])
def test_eta(pending: int, rate: float, eta: float | None) -> None:
    """ETA = pending / rate; nothing pending is 0; no rate is unknown."""
    assert eta_s(pending, rate) == eta


@pytest.mark.parametrize(("so_far", "done", "total", "end"), [
    (2.5, 250, 1000, 10.0), (2.5, 250, None, None), (0.0, 0, 1000, None), (3.0, 1000, 1000, 3.0),
    (3.0, 1200, 1000, 3.0),  # more rows done than the manifest holds (it shrank): no projection backwards
])  # fmt: skip
def test_projection_to_the_end(so_far: float, done: int, total: int | None, end: float | None) -> None:
    """The end total is the average per done row times the manifest's rows; unknown without a manifest size."""
    assert projected(so_far, done, total) == end


def test_percentiles_match_numpy_and_ignore_nan() -> None:
    """p50/p95/p99 as report's latency table computes them (linear interpolation), NaN ignored."""
    values = np.concatenate([np.arange(1, 101, dtype=float), [np.nan]])
    assert percentiles(values) == {"p50": 50.5, "p95": pytest.approx(95.05), "p99": pytest.approx(99.01)}
    assert percentiles(np.array([np.nan])) == {}


def test_histogram_has_round_bins_and_an_overflow_bin() -> None:
    """Bins are round widths from 0; one extreme value is folded into the last bin instead of stretching the axis."""
    values = np.concatenate([np.linspace(0.1, 4.9, 999), [600.0]])
    hist = histogram(values, bins=25)
    width = hist.edges[1] - hist.edges[0]
    assert hist.edges[0] == 0 and width == pytest.approx(0.2)
    assert hist.edges[-1] < 10  # not stretched to 600 s
    assert hist.counts.sum() == 1000 and hist.overflow == 1


def test_histogram_keeps_a_modest_maximum_in_range() -> None:
    """When the maximum is not far past the 99.5th percentile, the axis reaches it and nothing overflows."""
    values = np.arange(1, 201, dtype=float) / 10
    hist = histogram(values)
    assert hist.edges[-1] > values.max() and hist.overflow == 0 and hist.counts.sum() == 200


def test_histogram_of_identical_values() -> None:
    """All-equal latencies still make a valid histogram (one non-empty bin)."""
    hist = histogram(np.full(10, 2.0))
    assert hist.counts.sum() == 10 and np.count_nonzero(hist.counts) == 1


def test_cumulative_sums_in_time_order_and_treats_nan_as_zero() -> None:
    """Running totals follow finish time; rows without a value (errors: no cost) add nothing."""
    times = np.array([3.0, 1.0, 2.0])
    xs, ys = cumulative(times, np.array([1.0, 10.0, np.nan]))
    assert xs.tolist() == [1.0, 2.0, 3.0] and ys.tolist() == [10.0, 10.0, 11.0]
    assert cumulative(times)[1].tolist() == [1.0, 2.0, 3.0]


def test_downsample_keeps_ends_and_bounds_points() -> None:
    """A million-point line is drawn from at most 400 points, first and last kept."""
    x = np.arange(1_000_000, dtype=float)
    xs, ys = downsample(x, x * 2)
    assert len(xs) <= 400 and xs[0] == 0 and xs[-1] == 999_999 and ys[-1] == 1_999_998
    assert downsample(x[:10], x[:10])[0].size == 10


@pytest.mark.parametrize("ordered", [True, False])
def test_cumulative_points_equal_the_downsampled_cumulative_line(ordered: bool) -> None:
    """The lean cumulative line (no full-length sorted copies) has exactly the points of cumulative + downsample,
    for times in order and out of order (ties included), with and without values (NaN counting as 0)."""
    rng = np.random.default_rng(7)
    times = rng.uniform(0, 1e5, 20_000).round()
    times = np.sort(times) if ordered else times
    values = rng.uniform(0, 1, 20_000)
    values[::9] = np.nan
    for given in (values, None):
        xs, ys = downsample(*cumulative(times, given))
        lean_xs, lean_ys = cumulative_points(times, given)
        assert np.array_equal(xs, lean_xs) and np.array_equal(ys, lean_ys)
