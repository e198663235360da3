"""What a job will cost, in tokens, money and time, before anything is sent.

``qwenvl-batch estimate JOB`` answers "how much, and how long?" from the manifest and the image *headers*
only: no image is decoded, encoded or uploaded, and no request is made. Each row goes through the same steps
the runner takes before it sends (``RowRenderer`` for the prompt, the provider's input checks for the
images, ``tokens.prompt_tokens`` for the count), so for local files and data URLs the per-row prompt tokens
are exactly those the simulator serves, and the provider's count up to its text tokenizer (``tokens.py``
approximates text at 4 characters a token).

What an estimate cannot know, and what it does instead:

* **Completion length.** ``cost_low`` assumes a typical answer (``typical_completion_tokens``; by default
  ``min(max_tokens, 150)``, a one-to-three-sentence caption: pass a larger figure for OCR or long answers);
  ``cost_high`` assumes every answer runs to ``max_tokens`` (``None`` when the job sets no ``max_tokens``:
  nothing then bounds the answers). Thinking models bill their reasoning as completion tokens too.
* **http(s) images** are not fetched: each counts at the most tokens one image can cost under the job's
  pixel bounds (``images_from_urls``), so their rows are upper bounds. Data URLs whose content Pillow cannot
  read are counted the same way.
* **Corrupt or truncated files** pass a header read; the runner's full decode catches them later (as input
  errors, which cost nothing).
* **Context cache hits** are not predicted: every prompt token is priced at the full input rate.
* **Resume** is not taken into account: rows already done in the output are counted as if to be sent, so a
  re-run's estimate is an upper bound.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import tokens
from .config import JobConfig
from .documents import keyed_like
from .errors import ConfigError, InputRowError
from .manifest import Manifest, limited_batches
from .media import ImageInfo, ImageRef, ResizePolicy, probe_image
from .planning import JobSetup, Plan, open_job, plan_rows
from .pricing import ModelPrice, PriceTable, row_cost
from .prompt import PromptTokens, RenderedRow, template_fields

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TYPICAL_COMPLETION_TOKENS",
    "Estimate",
    "RowEstimate",
    "WallTime",
    "estimate_job",
    "estimate_rows",
    "render_estimate",
    "wall_time",
]

DEFAULT_TYPICAL_COMPLETION_TOKENS = 150
"""Completion tokens assumed for a typical answer when the caller gives none: a short caption.

Capped at the job's ``max_tokens``. Deliberately a captioning figure: it is the common batch job, and for
transcription (OCR) or long descriptions the caller knows better and passes ``typical_completion_tokens``.
"""

PROBE_THREADS = 8
"""Header reads run in this many threads: they wait on the disk, not on the CPU, so 8 help even on 2 cores."""

PROBE_CACHE_ENTRIES = 1_000_000
"""Probe results kept, by resolved path (oldest dropped first): bounds memory on manifests of 10^7 files."""

MAX_ERROR_EXAMPLES = 10

WallBound = Literal["requests_per_minute", "tokens_per_minute", "concurrency", "unknown"]
_ProbeResult = tuple[int, int] | None | InputRowError


# ---------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class RowEstimate:
    """One row as the estimator sees it: its prompt tokens, or why it would never be sent.

    ``prompt_tokens`` is ``None`` exactly when ``reason`` is set (an input error). ``unmeasured_images``
    counts images counted at the per-image maximum (http(s) URLs), which makes ``prompt_tokens`` an upper bound.
    """

    key: str
    prompt_tokens: int | None
    reason: str | None = None
    code: str | None = None
    images: int = 0
    unmeasured_images: int = 0


@dataclass(frozen=True)
class WallTime:
    """How long the rows take at each configured limit; the slowest one decides (``None``: not limited by it)."""

    seconds: float | None
    bound_by: WallBound
    by_limit: dict[str, float]


@dataclass(frozen=True)
class Estimate:
    """Tokens, cost and wall time of a job before it runs; ``to_dict()`` is JSON-serialisable."""

    model: str
    rows: int
    already_done: int  # rows the output already holds (not sent again, not counted below)
    images: int
    rows_to_send: int
    input_errors: int
    input_error_examples: list[dict[str, str]]
    input_error_reasons: dict[str, int]
    prompt_tokens_total: int
    prompt_tokens_p50: int
    prompt_tokens_p95: int
    prompt_tokens_max: int
    completion_tokens_typical: int
    completion_tokens_max: int | None
    cost_low: float | None
    cost_high: float | None
    currency: str | None
    price_source: str | None
    price_as_of: str | None
    unpriced_model: str | None
    unpriced_rows: int
    wall_time_s: float | None
    wall_time_bound_by: WallBound
    wall_time_by_limit: dict[str, float]
    assumed_latency_s: float
    images_from_urls: int
    rows_with_url_images: int
    repair_attempts: int = 0  # [output.schema]: re-asks allowed per row (each billed)
    cost_high_with_repairs: float | None = None  # worst case: every row re-asked repair_attempts times
    batch_cost_low: float | None = None  # the same rows through the Batch API (mode = "batch"); None: no price
    batch_cost_high: float | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain dicts, lists, numbers and strings (``json.dumps`` takes it as is)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- per row


def plan_estimate(job: JobConfig, prices: PriceTable | None = None) -> tuple[JobSetup, Plan]:
    """The run's own planning step, read-only: the same refusals (columns, ids, changed rows) and the same rows
    to send (rows already done in the output are not counted)."""
    setup = open_job(job, prices, sending=False)
    index = setup.store.resume_index()  # reads parts and journal; takes no lock and writes nothing
    job = keyed_like(job, setup.job)  # issue 12: [documents] rows are keyed by page_id
    return setup, plan_rows(job, setup.manifest, setup.renderer, index)


def estimate_rows(job: JobConfig, planned: tuple[JobSetup, Plan] | None = None) -> Iterator[RowEstimate]:
    """Every row this job would send (``--limit`` respected, rows already done skipped), in order, with its
    prompt tokens or its input error.

    Streams the manifest batch by batch; the images of a batch are probed (header only) in a thread pool
    before its rows are counted, and each resolved path is probed once for the whole run.
    """
    setup, plan = planned or plan_estimate(job)
    job = keyed_like(job, setup.job)  # issue 12: [documents] rows are keyed by page_id
    counter = _TokenCounter(job)
    with ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="qwenvl-probe") as pool:
        prober = _Prober(pool, job.resize_policy())
        for batch in _batches_to_send(job, setup, plan):
            yield from _each_row(batch.to_pylist(), setup, counter, prober)


def _batches_to_send(job: JobConfig, setup: JobSetup, plan: Plan) -> Iterator[pa.RecordBatch]:
    """The manifest's batches (only the columns that shape a request), without the rows the plan skips."""
    position = 0
    for batch in limited_batches(setup.manifest, job.run.limit, _needed_columns(job, setup.manifest)):
        mask = plan.todo[position: position + batch.num_rows]
        position += batch.num_rows
        yield batch if mask.all() else batch.filter(pa.array(mask))


def _each_row(rows: list[dict[str, Any]], setup: JobSetup, counter: _TokenCounter,
              prober: _Prober) -> Iterator[RowEstimate]:
    """Rows rendered and counted one by one, their images probed ahead in the pool."""
    rendered = [setup.renderer.render(row) for row in rows]
    prober.prefetch(ref for row in rendered if row.error is None for ref in row.images)
    for row in rendered:
        yield counter.row(row, prober)


def _tally_rows(job: JobConfig, planned: tuple[JobSetup, Plan]) -> _Tally:
    """``estimate_rows`` folded into a tally, fast: rows with the same values in every column that shapes a
    request (image cells and template fields; the id only labels a row) get the same estimate, so each distinct
    combination in a batch is rendered and counted once and stands for all its rows. A manifest of 10^7 rows over
    a few hundred images is thus a few hundred renders per batch, not 10^7 (a render is ~50 µs of Python). Rows
    whose estimate is an input error are counted one by one, in order: their messages name the row."""
    setup, plan = planned
    job = keyed_like(job, setup.job)  # issue 12: [documents] rows are keyed by page_id
    counter = _TokenCounter(job)
    shaping = sorted(set(job.input.image_columns) | template_fields(job.prompt.system)
                     | template_fields(job.prompt.user))
    tally = _Tally()
    with ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="qwenvl-probe") as pool:
        prober = _Prober(pool, job.resize_policy())
        for batch in _batches_to_send(job, setup, plan):
            groups = _distinct_rows(batch, [c for c in shaping if c in batch.schema.names])
            if groups is None:  # a column that cannot be compared cheaply (structs, lists, floats): row by row
                for row in _each_row(batch.to_pylist(), setup, counter, prober):
                    tally.add(row)
                continue
            firsts, inverse = groups
            estimates = list(_each_row(batch.take(pa.array(firsts)).to_pylist(), setup, counter, prober))
            counts = np.bincount(inverse, minlength=len(firsts))
            for estimate, count in zip(estimates, counts.tolist(), strict=True):
                if estimate.reason is None:
                    tally.add(estimate, count)
            failed = [i for i, estimate in enumerate(estimates) if estimate.reason is not None]
            if failed:
                rows = np.flatnonzero(np.isin(inverse, failed))
                for row in _each_row(batch.take(pa.array(rows)).to_pylist(), setup, counter, prober):
                    tally.add(row)
    return tally


_GROUPABLE = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary,
              pa.types.is_integer, pa.types.is_boolean)


def _distinct_rows(batch: pa.RecordBatch, columns: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(index of each distinct combination's first row, each row's combination number) over ``columns``; None when
    a column's values cannot be compared exactly by Arrow's hashing (floats: -0.0 and 0.0 render differently)."""
    code = np.zeros(batch.num_rows, np.int64)
    for name in columns:
        column = batch.column(name)
        if not any(check(column.type) for check in _GROUPABLE):
            return None
        encoded = pc.dictionary_encode(column, null_encoding="encode")
        code = code * len(encoded.dictionary) + encoded.indices.to_numpy(zero_copy_only=False)
        code = np.unique(code, return_inverse=True)[1].reshape(-1)  # renumbered 0..k-1: never overflows
    _, firsts, inverse = np.unique(code, return_index=True, return_inverse=True)
    return firsts, inverse.reshape(-1)


def _needed_columns(job: JobConfig, manifest: Manifest) -> list[str]:
    """Only the columns that shape a request: reading fewer columns is most of the manifest-reading time."""
    used = {job.input.id_column, *job.input.image_columns}
    used |= template_fields(job.prompt.system) | template_fields(job.prompt.user)
    return [name for name in manifest.columns if name in used]


class _Prober:
    """Header reads done ahead of need in a thread pool, each distinct image once: files by resolved path, images
    the manifest carries (bytes, tar members, data URLs) by their content's hash."""

    def __init__(self, pool: ThreadPoolExecutor, resize: ResizePolicy | None = None) -> None:
        self._pool = pool
        self._probe = functools.partial(_probe, resize=resize)  # a file the runner will shrink is no size error
        self._cache: OrderedDict[Hashable, _ProbeResult] = OrderedDict()

    def prefetch(self, refs: Iterable[ImageRef]) -> None:
        """Probe every local file among ``refs`` not yet known, in parallel; each distinct path once."""
        todo = list({ref.path: ref for ref in refs if ref.kind == "path" and ref.path not in self._cache}.values())
        for ref, result in zip(todo, self._pool.map(self._probe, todo)):
            self._store(ref.path, result)

    def size(self, ref: ImageRef) -> tuple[int, int] | None:
        """``(width, height)`` of one image, ``None`` when unmeasurable; raises its InputRowError."""
        key = _cache_key(ref)
        if key is None:  # http(s) URLs are not fetched, document pages know their size: nothing to save
            result = self._probe(ref)
        else:
            result = self._cache.get(key)
            if result is None and key not in self._cache:  # evicted, or not prefetched
                result = self._probe(ref)
                self._store(key, result)
        if isinstance(result, InputRowError):
            raise result
        return result

    def _store(self, key: Hashable, result: _ProbeResult) -> None:
        self._cache[key] = result
        if len(self._cache) > PROBE_CACHE_ENTRIES:
            self._cache.popitem(last=False)


def _cache_key(ref: ImageRef) -> Hashable | None:
    """What identifies a probe's result: the resolved path of a file; the content hash of bytes the manifest
    carries, with what an error message names (the label as written, the column); None: not worth caching."""
    if ref.kind == "path":
        return ref.path
    if ref.kind in ("bytes", "tar"):
        return (ref.kind, ref.column, ref.value, ref.source.digest())
    if ref.kind == "data":
        return (ref.kind, ref.column, ref.value.partition(",")[0], len(ref.value), ref.source.digest())
    return None


def _probe(ref: ImageRef, resize: ResizePolicy | None = None) -> _ProbeResult:
    """One header read; an input error is returned (and cached), not raised, so a pool can carry it."""
    try:
        info: ImageInfo | None = probe_image(ref, resize)
    except InputRowError as exc:
        return exc
    return None if info is None else (info.width, info.height)


class _TokenCounter:
    """A rendered row → its RowEstimate, counted by the same PromptTokens the runner's rate limiter uses."""

    def __init__(self, job: JobConfig) -> None:
        self.tokens = PromptTokens(job)

    def row(self, rendered: RenderedRow, prober: _Prober) -> RowEstimate:
        images = len(rendered.images)
        if rendered.error is not None:
            return _error_row(rendered, rendered.error)
        try:
            sizes = [prober.size(ref) for ref in rendered.images]
        except InputRowError as exc:  # the runner stops at a row's first bad image too
            return _error_row(rendered, exc)
        try:
            prompt = self.tokens.count(rendered, sizes)
        except tokens.ImageSizeError as exc:  # media.py checks the same limits; kept for a data URL's odd size
            return RowEstimate(rendered.key, None, str(exc), "image_size", images)
        unmeasured = sum(1 for size in sizes if size is None)
        return RowEstimate(rendered.key, prompt, None, None, images, unmeasured)


def _error_row(rendered: RenderedRow, error: InputRowError) -> RowEstimate:
    return RowEstimate(rendered.key, None, str(error), error.code or "input", len(rendered.images))


# ---------------------------------------------------------------------------------------------- the job


def estimate_job(
    job: JobConfig,
    *,
    prices: PriceTable | None = None,
    typical_completion_tokens: int | None = None,
    assumed_latency_s: float = 3.0,
) -> Estimate:
    """Estimate a job's tokens, cost range and wall time without sending anything.

    ``prices``: the price table (default: the built-in one). ``typical_completion_tokens``: the answer length
    behind ``cost_low`` (default ``min(max_tokens, 150)``, see DEFAULT_TYPICAL_COMPLETION_TOKENS).
    ``assumed_latency_s``: seconds one request takes, for the concurrency bound on wall time.
    """
    if typical_completion_tokens is not None and typical_completion_tokens < 0:
        raise ConfigError(f"typical_completion_tokens must be >= 0, got {typical_completion_tokens}")
    if assumed_latency_s < 0 or not math.isfinite(assumed_latency_s):
        raise ConfigError(f"assumed_latency_s must be a finite number >= 0, got {assumed_latency_s}")
    planned = plan_estimate(job, prices)  # a cap in another currency than the price's is refused here
    tally = _tally_rows(job, planned)
    tally.rows = planned[1].rows
    already_done = planned[1].skipped_ok + planned[1].skipped_error
    prompt = tally.prompt_tokens()
    max_tokens = job.model.max_tokens
    typical = _typical_completion(max_tokens, typical_completion_tokens)
    price = planned[0].price
    costs = _Costs.of(price, prompt, typical, max_tokens)
    batch = _Costs.of(price, prompt, typical, max_tokens, batch=True) if price and price.batch_discount else None
    limits = job.limits
    wall = wall_time(
        len(prompt), int(prompt.sum()) + typical * len(prompt), requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute, concurrency=limits.concurrency, latency_s=assumed_latency_s,
    )  # fmt: skip
    return Estimate(
        model=job.model.name,
        rows=tally.rows,
        already_done=already_done,
        images=tally.images,
        rows_to_send=len(prompt),
        input_errors=tally.errors,
        input_error_examples=tally.examples,
        input_error_reasons=dict(tally.reasons.most_common()),
        prompt_tokens_total=int(prompt.sum()),
        prompt_tokens_p50=_percentile(prompt, 50),
        prompt_tokens_p95=_percentile(prompt, 95),
        prompt_tokens_max=int(prompt.max()) if len(prompt) else 0,
        completion_tokens_typical=typical,
        completion_tokens_max=max_tokens,
        cost_low=costs.low,
        cost_high=costs.high,
        currency=price.currency if price else None,
        price_source=price.source if price else None,
        price_as_of=price.as_of if price else None,
        unpriced_model=None if price else job.model.name,
        unpriced_rows=costs.unpriced_rows,
        wall_time_s=wall.seconds,
        wall_time_bound_by=wall.bound_by,
        wall_time_by_limit=wall.by_limit,
        assumed_latency_s=assumed_latency_s,
        images_from_urls=tally.unmeasured_images,
        rows_with_url_images=tally.rows_with_unmeasured,
        **_repair_worst_case(planned[0], prompt, typical, max_tokens, costs.high),
        batch_cost_low=batch.low if batch else None,
        batch_cost_high=batch.high if batch else None,
    )


def _repair_worst_case(setup: JobSetup, prompt: np.ndarray, typical: int, max_tokens: int | None,
                       high: float | None) -> dict[str, Any]:
    """[output.schema]: each re-ask re-sends the prompt plus the quoted bad answer and gets another answer; the
    worst case is every row re-asked ``repair_attempts`` times at max_tokens (structured.py)."""
    structured = setup.structured
    if structured is None or not structured.repair_attempts:
        return {}
    repair = _Costs.of(setup.price, prompt + structured.repair_prompt_tokens(max_tokens), typical, max_tokens)
    worst = high + structured.repair_attempts * repair.high if high is not None and repair.high is not None else None
    return {"repair_attempts": structured.repair_attempts, "cost_high_with_repairs": worst}


def _typical_completion(max_tokens: int | None, given: int | None) -> int:
    """The caller's figure, else a caption's length; capped at ``max_tokens``, which no answer exceeds."""
    typical = DEFAULT_TYPICAL_COMPLETION_TOKENS if given is None else given
    return min(max_tokens, typical) if max_tokens else typical


class _Tally:
    """Aggregates RowEstimates: counters, a few error examples, and prompt tokens in a growing int64 buffer."""

    def __init__(self) -> None:
        self.rows = self.images = self.errors = self.unmeasured_images = self.rows_with_unmeasured = 0
        self.examples: list[dict[str, str]] = []
        self.reasons: Counter[str] = Counter()
        self._tokens = np.empty(4096, dtype=np.int64)
        self._sent = 0

    def add(self, row: RowEstimate, count: int = 1) -> None:
        """Count ``row``, or ``count`` rows with its estimate (an error row is always counted alone: its
        example names it)."""
        self.rows += count
        if row.prompt_tokens is None:
            self.errors += count
            self.reasons[row.code or "input"] += count
            if len(self.examples) < MAX_ERROR_EXAMPLES:
                self.examples.append({"id": row.key, "reason": row.reason or ""})
            return
        if self._sent + count > len(self._tokens):
            self._tokens = np.resize(self._tokens, max(2 * len(self._tokens), self._sent + count))
        self._tokens[self._sent: self._sent + count] = row.prompt_tokens
        self._sent += count
        self.images += row.images * count
        self.unmeasured_images += row.unmeasured_images * count
        self.rows_with_unmeasured += count if row.unmeasured_images > 0 else 0

    def prompt_tokens(self) -> np.ndarray:
        """Prompt tokens of the rows to send (in manifest order when added row by row)."""
        return self._tokens[: self._sent]


def _percentile(values: np.ndarray, q: float) -> int:
    """A token count some row really has (``higher``: never below the true percentile); 0 when empty."""
    return int(np.percentile(values, q, method="higher")) if len(values) else 0


@dataclass(frozen=True)
class _Costs:
    low: float | None
    high: float | None
    unpriced_rows: int

    @classmethod
    def of(cls, price: ModelPrice | None, prompt: np.ndarray, typical: int, max_tokens: int | None, *,
           batch: bool = False) -> _Costs:
        """Sum ``row_cost`` over the rows: once per distinct prompt length, times how many rows have it.

        Why per distinct length: the tier depends on each row's prompt, and ``row_cost`` is the one place
        that knows the rules; batch manifests repeat lengths so much that this is a few thousand calls.
        """
        if price is None:
            return cls(None, None, 0)
        lengths, counts = np.unique(prompt, return_counts=True)
        low = high = 0.0
        unpriced = 0
        for length, count in zip(lengths.tolist(), counts.tolist()):
            try:
                low += count * row_cost(price, prompt_tokens=length, completion_tokens=typical, batch=batch).cost
                if max_tokens is not None:
                    high += count * row_cost(price, prompt_tokens=length, completion_tokens=max_tokens,
                                             batch=batch).cost
            except ValueError:  # above the last priced tier: no price known there, count the rows instead
                unpriced += count
        if unpriced:
            log.warning("%s: %d row(s) above the last priced tier are left out of the cost", price.model, unpriced)
        return cls(low, high if max_tokens is not None else None, unpriced)


def wall_time(
    rows: int,
    total_tokens: int,
    *,
    requests_per_minute: float | None,
    tokens_per_minute: float | None,
    concurrency: int,
    latency_s: float,
) -> WallTime:
    """Seconds to send ``rows`` requests under each limit; the largest is the estimate (ties: first listed).

    requests: ``rows / (rpm / 60)``; tokens: ``total_tokens / (tpm / 60)``; concurrency:
    ``ceil(rows / concurrency) * latency_s`` (rounds of requests: 5 rows at concurrency 16 still take one
    latency, not a third of one; for large jobs this is ``rows * latency_s / concurrency``). A limit that is
    not set does not bound; ``unknown`` when nothing does (no rate limits and a zero latency) or when there
    is nothing to send.
    """
    by_limit: dict[str, float] = {}
    if requests_per_minute:
        by_limit["requests_per_minute"] = rows / (requests_per_minute / 60)
    if tokens_per_minute:
        by_limit["tokens_per_minute"] = total_tokens / (tokens_per_minute / 60)
    if latency_s > 0:
        by_limit["concurrency"] = math.ceil(rows / concurrency) * latency_s
    if rows == 0:
        return WallTime(0.0, "unknown", by_limit)
    if not by_limit:
        return WallTime(None, "unknown", by_limit)
    bound = max(by_limit, key=lambda name: by_limit[name])  # max() keeps the first of equal values
    return WallTime(by_limit[bound], bound, by_limit)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- rendering


def render_estimate(estimate: Estimate, fmt: Literal["text", "json"]) -> str:
    """A short table for a person (``text``) or the whole estimate as JSON (``json``)."""
    if fmt == "json":
        return json.dumps(estimate.to_dict(), indent=2)
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r} (use 'text' or 'json')")
    lines = [
        ("model", estimate.model + ("" if not estimate.unpriced_model else
                                    "  (not in the price table: check the name, or add it with --prices FILE)")),
        ("rows", f"{estimate.rows:,} in the manifest, "
                 + (f"{estimate.already_done:,} already done, " if estimate.already_done else "")
                 + f"{estimate.rows_to_send:,} to send, "
                 f"{estimate.input_errors:,} input error(s) (never sent, cost nothing)"),
        ("images", _images_line(estimate)),
        *_error_lines(estimate),
        ("prompt tokens", (f"{estimate.prompt_tokens_total:,} total; per row p50 {estimate.prompt_tokens_p50:,}, "
                           f"p95 {estimate.prompt_tokens_p95:,}, max {estimate.prompt_tokens_max:,}")),
        ("completion tokens", _completion_line(estimate)),
        ("cost", _cost_line(estimate)),
        ("batch cost", _batch_cost_line(estimate)),
        ("wall time", _wall_line(estimate)),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def _images_line(estimate: Estimate) -> str:
    line = f"{estimate.images:,} in the rows to send"
    if estimate.images_from_urls:
        line += (f"; {estimate.images_from_urls:,} from http(s) URLs ({estimate.rows_with_url_images:,} rows) are not "
                 "fetched and count at the per-image maximum")
    return line


def _error_lines(estimate: Estimate) -> list[tuple[str, str]]:
    if not estimate.input_errors:
        return []
    top = ", ".join(f"{code} {count:,}" for code, count in list(estimate.input_error_reasons.items())[:5])
    lines = [("input errors", f"by reason: {top}")]
    for example in estimate.input_error_examples[:3]:
        lines.append(("", f"e.g. {example['id']}: {_shorten(example['reason'], 160)}"))
    return lines


def _completion_line(estimate: Estimate) -> str:
    line = f"{estimate.completion_tokens_typical:,} per row assumed for the low cost"
    if estimate.completion_tokens_max is None:
        return line + "; no max_tokens set, so answers have no upper bound (no high cost)"
    return line + f"; {estimate.completion_tokens_max:,} (max_tokens) for the high cost"


def _cost_line(estimate: Estimate) -> str:
    if estimate.unpriced_model:
        return f"unknown: no price for model {estimate.unpriced_model!r} (see README 'Cost')"
    if estimate.cost_low is None:
        return "unknown"
    currency = estimate.currency or ""
    high = f"{estimate.cost_high:,.4f}" if estimate.cost_high is not None else "no upper bound (max_tokens unset)"
    line = f"{estimate.cost_low:,.4f} to {high} {currency}".rstrip()
    line += f" (prices as of {estimate.price_as_of}, {estimate.price_source}; no cache discount assumed)"
    if estimate.unpriced_rows:
        line += f"; {estimate.unpriced_rows:,} row(s) above the last priced tier are not included"
    if estimate.repair_attempts:
        worst = (f"{estimate.cost_high_with_repairs:,.4f} {currency}" if estimate.cost_high_with_repairs is not None
                 else "no upper bound")
        line += (f"; up to {worst} if every answer is invalid and re-asked {estimate.repair_attempts} time(s) "
                 "([output.schema] repair_attempts: each re-ask is billed)")
    return line


def _batch_cost_line(estimate: Estimate) -> str:
    """The same rows through the Batch API (mode = "batch"), beside the realtime figure (README 'Batch mode')."""
    if estimate.batch_cost_low is None:
        return "no Batch API price for this model and region (multimodal batch: Beijing, region = \"cn\")"
    high = f"{estimate.batch_cost_high:,.4f}" if estimate.batch_cost_high is not None else "no upper bound"
    return (f"{estimate.batch_cost_low:,.4f} to {high} {estimate.currency or ''} with mode = \"batch\" (no "
            "context-cache discount in batch: realtime wins above a ~62.5% cache hit rate; results take hours)")


def _wall_line(estimate: Estimate) -> str:
    if estimate.wall_time_s is None:
        return "unknown (no rate limits set and no latency assumed)"
    if estimate.wall_time_bound_by == "unknown":
        return "nothing to send"
    parts = ", ".join(f"{name} {_duration(s)}" for name, s in estimate.wall_time_by_limit.items())
    return (f"~{_duration(estimate.wall_time_s)}, bound by {estimate.wall_time_bound_by} "
            f"(each limit alone: {parts}; {estimate.assumed_latency_s:g} s per request assumed)")


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
