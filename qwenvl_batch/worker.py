"""The per-row worker: one manifest row → images prepared → rate limit → request with retries → result row.

``concurrency`` of these loops share one queue. A row's own failures become data (an error row); a job-level
failure (bad key, spend cap, a bug) stops the run through ``JobRun.stop`` and the worker returns, so nothing
new is started after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from . import tokens
from .client import ChatClient, Completion
from .config import is_stream_only
from .errors import InputRowError, JobError, SpendCapReached
from .health import Stop, estimated_usage, images_ignored
from .limits import Limiter
from .media import PreparedImage, ResizePolicy, prepare_image
from .policy import Action, Decision, InvalidResponseError, PartialResponseError, classify
from .pricing import row_cost
from .progress import Progress
from .prompt import RenderedRow, build_messages
from .redact import redact
from .response_guard import within_request
from .results import add_costs, local_image_bytes
from .retrying import Abandoned, RetryAdapter, interruptible_sleep
from .store import ResultWriter

if TYPE_CHECKING:
    from .runner import JobRun

log = logging.getLogger(__name__)

EXPECTED_COMPLETION_TOKENS = 256  # rate-limiter guess when max_tokens is unset; corrected by real usage
WORST_CASE_COMPLETION_TOKENS = 8192  # spend-cap worst case when max_tokens is unset (Qwen-VL's usual max output)
WORST_CASE_THINKING_TOKENS = 32768  # thinking is not bounded by max_tokens; thinking_budget bounds it when set

PAID_ROW = "paid_row"  # set on a JobError raised after the row was paid for: the row to record before stopping
Item = tuple[dict[str, Any], str]  # a manifest row to do and its fingerprint (hex)


class RowWorker:
    """What every worker does with one row; shared state lives on the JobRun."""

    def __init__(self, run: JobRun, client: ChatClient, limiter: Limiter, writer: ResultWriter,
                 progress: Progress) -> None:
        self.run = run
        self.job = run.job
        self.client = client
        self.limiter = limiter
        self.writer = writer
        self.progress = progress
        self.limits = run.job.limits
        self.rows = run.rows
        self.retry = RetryAdapter(self.limits, stopping=lambda: run.stopping, sleep=self._sleep,
                                  on_retry=self._on_retry)

    async def loop(self, queue: asyncio.Queue[Item | None]) -> None:
        """Take rows until the queue says done (None) or the run stops; a job-level error stops the run."""
        while not self.run.stopping:
            item = await queue.get()
            if item is None:
                return
            row, fingerprint = item
            try:
                result = await self.process(row)
            except JobError as exc:
                paid = getattr(exc, PAID_ROW, None)  # a row paid for before the stop (structured re-ask)
                if paid is not None:
                    paid["fingerprint"] = fingerprint
                    self.record(paid)
                self.run.stop(exc)
                return
            if result is not None:
                result["fingerprint"] = fingerprint
                try:
                    self.record_checked(result)
                except JobError as exc:
                    self.run.stop(exc)
                    return

    async def process(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """One row end to end; returns its output row, or None to leave it pending (the run is stopping)."""
        rendered = self.run.renderer.render(row)
        if rendered.error is not None:
            return self.rows.error(row, "input", rendered.error.code, str(rendered.error), attempts=0)
        reserved = local_image_bytes(rendered)
        await self.run.image_bytes.acquire(reserved)  # bounds image bytes in memory, not only requests
        try:
            return await self._process_rendered(row, rendered, reserved)
        finally:
            self.run.image_bytes.release(reserved)

    async def _prepare(self, rendered: RenderedRow, file_bytes: int) -> list[PreparedImage]:
        """Read, check and encode the row's images in a worker thread, small ones too: most of that work (reading
        the file, the truncation check's decode) runs without the GIL, so on another core while the event loop goes
        on answering. Prepared on the loop, a wave of 512 answers waited ~0.45 ms per small JPEG decode each: at
        C=512 and 2 s latency, 0.77 of C / latency instead of 0.93 (fixed), 0.70 instead of 1.00 (lognormal),
        benchmarks/run.py figure 2; the thread hop costs ~0.06 ms of CPU (more with the httpx transport). A few
        at a time (``preparing``): a 24 MP decode takes ~100 MB, and more threads than cores only contend for the
        GIL. Rows with no local bytes (URLs) need no thread."""
        if file_bytes == 0:
            return prepare_all(rendered, self.run.resize)
        async with self.run.preparing:
            return await asyncio.to_thread(prepare_all, rendered, self.run.resize)

    async def _process_rendered(self, row: dict[str, Any], rendered: RenderedRow,
                                reserved: int) -> dict[str, Any] | None:
        try:
            images = await self._prepare(rendered, reserved)
        except InputRowError as exc:
            return self.rows.error(row, "input", exc.code, str(exc), attempts=0)
        messages = build_messages(rendered, images, min_pixels=self.job.model.min_pixels,
                                  max_pixels=self.job.model.max_pixels)
        prompt_estimate = self.estimate_prompt_tokens(rendered, images)
        estimate = prompt_estimate + (self.job.model.max_tokens or EXPECTED_COMPLETION_TOKENS)
        started = time.monotonic()
        billed: list[dict[str, Any]] = []  # the cost of every attempt the provider billed, the answer's included
        completion, attempts, failure = await self._send(messages, estimate, self.worst_case_cost(prompt_estimate),
                                                         billed, prompt_estimate=prompt_estimate)
        latency_s = time.monotonic() - started
        if completion is not None:
            self.limiter.settle(estimate, completion.total_tokens, completion.headers)
            if self.run.structured is not None:  # [output.schema]: validate, re-ask at most repair_attempts times
                return await self._structured_row(row, rendered, images, messages, completion, attempts, started,
                                                  billed, (estimate, prompt_estimate))
            result = self.rows.ok(row, completion, attempts, latency_s, billed)
            return self._check_images(result, rendered, images, completion)
        if failure is None:
            return None  # the run is stopping: leave the row pending
        decision = classify(failure)
        if decision.error_type == "rate_limit":  # a 429 on the last attempt still tells the controller
            self.limiter.on_failure(self._within_budget(decision))
        if decision.action is Action.STOP_JOB:
            raise JobError(redact(decision.message), code=decision.code)  # a proxy may quote the key back
        if decision.action is Action.RETRY and self.run.stopping:
            return None
        message = decision.message
        if decision.action is Action.RETRY:
            message = f"gave up after {attempts} attempt(s): {message}"
        attempts += decision.proxy_retries
        return self.rows.error(row, decision.error_type, decision.code, message, attempts=attempts,
                               latency_s=latency_s, billed=billed)

    async def _structured_row(self, row: dict[str, Any], rendered: RenderedRow, images: list[PreparedImage],
                              messages: list[dict[str, Any]], completion: Completion, attempts: int, started: float,
                              billed: list[dict[str, Any]], estimates: tuple[int, int]) -> dict[str, Any] | None:
        """An answer checked against the job's schema; an invalid one is re-asked with the problem stated, at most
        ``repair_attempts`` times (each re-ask billed and counted). Still invalid: an error row (``parse``) that
        keeps the raw answer, its tokens and every attempt's cost. A job-level stop during a re-ask (the spend
        cap) records the row first: its first answer was paid for."""
        structured = self.run.structured
        assert structured is not None
        estimate, prompt_estimate = estimates
        prompt_estimate += structured.repair_prompt_tokens(self.job.model.max_tokens)  # a re-ask quotes the answer
        answers, repairs, first_billed = [completion], 0, len(billed)
        checked = structured.check(completion.content, completion.finish_reason)
        repair_failed: str | None = None
        stop: JobError | None = None
        while not checked.ok and repairs < structured.repair_attempts and not self.run.stopping:
            assert checked.error is not None
            again = structured.repair_messages(messages, completion.content, checked.error)
            try:
                repaired, sent, failure = await self._send(again, estimate, self.worst_case_cost(prompt_estimate),
                                                           billed, prompt_estimate=prompt_estimate)
            except JobError as exc:
                repair_failed, stop = str(exc), exc
                break
            attempts += sent
            repairs += sent > 0
            if repaired is None:
                repair_failed = classify(failure).message if failure is not None else "the run is stopping"
                break
            self.limiter.settle(estimate, repaired.total_tokens)
            completion = repaired
            answers.append(repaired)
            checked = structured.check(completion.content, completion.finish_reason)
        result = self.rows.ok(row, completion, attempts, time.monotonic() - started, billed)
        result.update(structured.columns(checked), repairs=repairs,
                      repair_cost=add_costs(billed[first_billed:]).get("cost") if len(billed) > first_billed else None)
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens"):
            values = [getattr(a, name) for a in answers]
            result[name] = sum(values) if None not in values else result[name]
        if checked.ok:
            return self._check_images(result, rendered, images, completion)
        message = f"the answer {'still ' if len(answers) > 1 else ''}does not fit the schema: {checked.error}"
        if repair_failed:
            message += f"; the repair request failed: {repair_failed}"
        result.update(status="error", error_type="parse", error_code=checked.code, error_message=message)
        if stop is not None:
            setattr(stop, PAID_ROW, result)  # loop() records it with its fingerprint, then stops the run
            raise stop
        return result

    async def _send(self, messages: list[dict[str, Any]], estimate: int, worst_cost: float,
                    billed: list[dict[str, Any]], *,
                    prompt_estimate: int = 0) -> tuple[Completion | None, int, BaseException | None]:
        """Attempts with retries: (completion, attempts, None), (None, attempts, last failure), or (None, n, None)
        when the run is stopping. JobErrors (the spend cap) propagate."""
        attempts = 0
        completion: Completion | None = None
        try:
            async for attempt in self.retry.attempts():
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if self.run.stopping:
                        raise Abandoned()
                    completion = await self._attempt(messages, estimate, worst_cost, billed, prompt_estimate)
        except Abandoned:
            return None, attempts, None
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - judged by policy.classify, which judges any exception
            return None, attempts, exc
        return completion, attempts, None

    async def _attempt(self, messages: list[dict[str, Any]], estimate: int, worst_cost: float,
                       billed: list[dict[str, Any]], prompt_estimate: int) -> Completion:
        """One request: reserve the worst-case spend, wait for the rate limiter, send, book what was billed.

        A server that reports no usage gets the runner's estimate (marked as such), and the spend cap counts
        the worst case for it, never zero."""
        await self.run.spend.ready(worst_cost)  # a cluster-wide cap (qwenvl_batch.ray) fetches its share first
        self._reserve_spend(worst_cost)
        actual_cost = 0.0
        try:
            await self.limiter.acquire(estimate)
            completion = within_request(await self._complete(messages), estimate)  # issue 18: sane usage only
            if completion.prompt_tokens is None or completion.completion_tokens is None:
                completion = estimated_usage(completion, prompt_estimate, self.job.model.max_tokens)
            billed.append(self.rows.cost_of(completion))
            actual_cost = worst_cost if completion.usage_estimated else billed[-1].get("cost") or 0.0
            return completion
        except PartialResponseError as exc:  # billed although not usable: count it, then retry
            if isinstance(exc.billed, Completion):
                billed.append(self.rows.cost_of(exc.billed))
                actual_cost = billed[-1].get("cost") or 0.0
            raise
        except InvalidResponseError:  # a 200 that cannot be read was probably billed: the cap counts its worst case
            actual_cost = worst_cost
            raise
        finally:
            self.run.spend.release(worst_cost, actual_cost)

    async def _complete(self, messages: list[dict[str, Any]]) -> Completion:
        """One attempt, its outcome fed to the job's health (an endpoint that never answers stops the job)."""
        health = self.run.health
        try:
            completion = await self.client.complete(messages)
        except Exception as exc:
            decision = classify(exc)
            if decision.connect_failed:
                raise_stop(health.attempt_connect_failed(decision.message))
            elif decision.answered:
                health.attempt_answered()
            raise
        health.attempt_answered()
        return completion

    def _check_images(self, result: dict[str, Any], rendered: RenderedRow, images: list[PreparedImage],
                      completion: Completion) -> dict[str, Any]:
        """A row whose usage shows the server ignored its images is not ok (it keeps its answer and cost); a few
        in a row stop the job."""
        if not images or completion.usage_estimated:
            return result
        why = images_ignored(n_images=len(images), prompt_tokens=completion.prompt_tokens,
                             image_tokens=completion.image_tokens,
                             text_tokens=self.run.prompt_tokens.count(rendered, []))
        stop = self.run.health.image_row(why is not None)
        if why is not None:
            result.update(status="error", error_type="server", error_code="image_ignored_by_server",
                          error_message=f"the server ignored the images: {why}; is the model multimodal?",
                          warning="image_ignored_by_server")
        if stop is not None:
            self.record(result)  # paid for: recorded (as an error, so --retry-failed re-sends it)
            raise_stop(stop)
        return result

    def record_checked(self, result: dict[str, Any]) -> None:
        """Record a row through the job's health: identical errors are held while it decides whether they are the
        rows' or the job's; raises JobError (the held rows stay pending) when it is the job."""
        health, stop = self.run.health, None
        if result.get("error_code") == "image_ignored_by_server":  # the image check decides about these
            ready = [result]
        elif result["status"] == "ok":
            ready = [*health.row_succeeded(), result]
        else:
            ready, stop = health.row_failed(result, result.get("error_type") or "", result.get("error_code"),
                                            result.get("error_message") or "")
        for row in ready:
            self.record(row)
        raise_stop(stop)

    def _on_retry(self, decision: Decision, attempt: int) -> None:
        counters = self.run.counters
        counters.retries += 1
        counters.retry_reasons[decision.reason] = counters.retry_reasons.get(decision.reason, 0) + 1
        self.limiter.on_failure(self._within_budget(decision))  # a 429 steers the rates; a connect failure counts

    def _within_budget(self, decision: Decision) -> Decision:
        """A server's Retry-After pauses every worker: never for longer than a row's whole retry budget."""
        wait = decision.retry_after_s
        if wait is None or wait <= self.limits.max_retry_time_s:
            return decision
        return dataclasses.replace(decision, retry_after_s=self.limits.max_retry_time_s)

    async def _sleep(self, seconds: float) -> None:
        """Backoff that wakes up early when the run is stopping (the row is then left pending)."""
        await interruptible_sleep(seconds, self.run.wait_stopped)

    def _reserve_spend(self, worst_cost: float) -> None:
        spend = self.run.spend
        if not spend.reserve(worst_cost):
            currency = self.run.price.currency if self.run.price else ""
            raise SpendCapReached(
                f"Spend cap reached: {spend.committed:.4f} {currency} spent, and the requests in flight could bring "
                f"it over max_cost {spend.cap:.4f} {currency}. Raise the cap (--max-cost or [limits] max_cost) and "
                "run again to continue; committed results are kept."
            )

    def worst_case_cost(self, prompt_tokens: int) -> float:
        """What one request could cost at most: its prompt plus the longest completion it may produce."""
        price = self.run.price
        if price is None or self.run.spend.cap is None:
            return 0.0
        model = self.job.model
        completion = model.max_tokens or WORST_CASE_COMPLETION_TOKENS
        if is_stream_only(model.name) or model.extra_body.get("enable_thinking"):
            completion += int(model.extra_body.get("thinking_budget") or WORST_CASE_THINKING_TOKENS)
        try:
            return row_cost(price, prompt_tokens=prompt_tokens, completion_tokens=completion).cost
        except ValueError:  # above the last priced tier: price it at the top tier rather than not at all
            top = price.tiers[-1]
            return (prompt_tokens * top.input_per_mtok + completion * top.output_per_mtok) / 1e6

    def estimate_prompt_tokens(self, rendered: RenderedRow, images: list[PreparedImage]) -> int:
        """Prompt tokens from the real image sizes (Qwen-VL's resize rule), before sending."""
        sizes = [(i.width, i.height) if i.width and i.height else None for i in images]
        try:
            return self.run.prompt_tokens.count(rendered, sizes)
        except tokens.ImageSizeError:  # an odd data-URL size: the provider will say; budget the maximum meanwhile
            return self.run.prompt_tokens.count(rendered, [None] * len(images))

    def record(self, result: dict[str, Any]) -> None:
        """Hand the row to the writer (durable within milliseconds) and update the live counters."""
        self.writer.put(result)
        self.run.repair_tally.add(result)
        if result.get("usage_source") == "estimate":
            self.run.usage_estimated_rows += 1
        if result.get("warning"):
            kind = str(result["warning"]).split("=", 1)[0]
            self.run.warning_counts[kind] = self.run.warning_counts.get(kind, 0) + 1
        self.run.counters.add(result)
        self.progress.update()


def raise_stop(stop: Stop | None) -> None:
    """The job's health said stop: a JobError with its message (the run then stops and commits)."""
    if stop is not None:
        raise JobError(stop.message, code=stop.code)


def prepare_all(rendered: RenderedRow, resize: ResizePolicy) -> list[PreparedImage]:
    """Every image of a row, read, checked and encoded."""
    return [prepare_image(ref, resize) for ref in rendered.images]
