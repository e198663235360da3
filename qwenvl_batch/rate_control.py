"""Adaptive rate control: from what the server accepted and refused, the request and token rates to admit.

A pure component: events with their timestamps in, rates out; no I/O, no asyncio, no clock of its own. The
async meters (``limits.RateMeter``) take its output; ``limits.Limiter`` is the thin adapter that feeds it.

What it assumes about the provider (Model Studio, OpenAI, LiteLLM proxies; reference §3.1 and §7.2)
-------------------------------------------------------------------------------------------------
* Limits are enforced per second as well as per minute: a bucket that refills at RPM/60 per second and holds
  about one second of credit ("burst protection"), plus a per-minute window. A client that spaces its requests
  evenly at or below RPM/60 never meets either; one that sends a burst meets the per-second one at once.
* A refusal (HTTP 429) costs no inference and comes back within a round trip, while an accepted request answers
  only after the model's latency. So "started and not refused" is known almost at once and *is* what the server
  admitted: **goodput** is measured as starts minus refusals (and connection failures) over the last
  ``window_s`` seconds, not as answers, which would lag by the latency.
* DashScope says which limit refused: ``limit_requests`` / ``Throttling.RateQuota`` / ``limit_burst_rate`` /
  ``Throttling`` are the request limit, ``insufficient_quota`` / ``Throttling.AllocationQuota`` the token limit
  (input + output tokens). Each has its own axis below; an unknown code (a proxy lost it) counts as requests.
* OpenAI and LiteLLM send ``x-ratelimit-limit-requests`` / ``-tokens`` (per minute; LiteLLM also as
  ``llm_provider-x-ratelimit-*``): a limit the server states is taken as known (no discovery), and
  ``x-ratelimit-remaining-*: 0`` is treated like a refusal before it happens.

The algorithm, one instance per axis (requests/s and tokens/s)
-------------------------------------------------------------
It is AIMD as in TCP congestion control (Jacobson 1988; RFC 5681) with borrowings from its descendants, chosen
because the signal here is a loss (a 429), not a latency gradient: Netflix's concurrency-limits gradient methods
and TCP Vegas infer a limit from queueing delay, but a rate limiter adds no delay before it refuses, so there is
no gradient to read. What it does:

* **Slow start** (RFC 5681 §3.1): with no limit configured and none stated by the server, the request rate starts
  at ``start_rps`` and doubles every ``slow_start_doubling_s`` while it is used (growth that is not used is not
  kept, RFC 7661: at most ``app_limited_factor`` x what was sent), so a burst of ``concurrency`` requests never
  meets an account's per-second bucket at once (that burst alone was 35 % 429s of a run), while an unlimited
  server is at full speed within about a second.
* **Decrease to the measured goodput**, like BBR's delivery-rate estimate (Cardwell et al. 2016) rather than a
  blind halving: a 429 sets the rate to ``margin`` x what the server accepted, clamped to [``min_cut``,
  ``max_cut``] x the rate in force while the storm is young, so one cut never more than halves the rate. The
  goodput window is ``window_s`` (longer at low rates, so it holds a few requests); once a storm is
  ``storm_measure_s`` old and has seen ``storm_measure_starts`` requests, goodput is measured since the storm
  began: the bucket is empty then, so what it accepts is exactly its refill rate, burst credit excluded.
* **One cut per congestion event**, like NewReno's recovery (RFC 6582): refusals of requests that started before
  the last cut belong to that cut (the burst that caused it) and are only counted; a refusal of a request that
  started after it cuts again at once. There is no cooldown, so a storm is cut down within a few round trips.
* **An isolated refusal is a dip, not a verdict**: a refusal after ``quiet_s`` without one (or the first of a
  run), while the server refused little of what was sent and the rate is below the level refused before, cuts
  the same way but recovers multiplicatively (x2 every ``dip_recovery_doubling_s``) to the rate it interrupted;
  only a second refusal soon after makes the lower rate stick. A transient 429 on an unlimited server therefore
  costs a fraction of a second, not twenty minutes.
* **Back up after a cut** along CUBIC's curve (RFC 9438), in relative terms: concave from the cut up to the
  plateau (``margin`` x the measured goodput) within ``recover_s``, then convex beyond it at the time scale
  ``probe_cubic_s``: +1 % after 10 s near the level just refused (a per-second bucket overshot by 1 % takes
  ~100 s to refuse again), faster and faster the longer the server stays quiet, so capacity that appears mid-run
  (another job finished) is found within a minute or so.
* **The per-minute window**: a storm that starts when the last minute accepted about the current rate throughout
  is that window running full. Its refusals last until old entries expire, whatever the rate, and say nothing
  about the per-second rate; so the rate is capped at ``minute_margin`` x what that minute accepted (for
  ``minute_hold_s``, renewed while it holds), and the cuts of that storm return to the cap rather than to their
  near-zero measurements.

A configured limit is a ceiling no output ever exceeds; the rate starts there (spaced evenly, no slow start),
and a server that enforces less is learned from its refusals exactly as above. Retry-After pauses every
request until the time it names (``Admission.paused_until``), on top of the cut.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["requests", "tokens"]

_TOKEN_CODES = frozenset({"insufficient_quota", "throttling.allocationquota", "tokens", "limit_tokens"})


def refusal_kind(code: str | None) -> Kind:
    """Which limit a 429's provider code names; unknown codes (a proxy dropped it) count as the request limit."""
    return "tokens" if (code or "").strip().lower() in _TOKEN_CODES else "requests"


@dataclass(frozen=True)
class ControlSettings:
    """The controller's constants; the defaults were tuned on the provider model in tests/provider_model.py."""

    window_s: float = 1.0  # goodput is measured over this many seconds (at least; see history_s)
    history_s: float = 10.0  # ... or over as many as hold ten requests, up to this many
    margin: float = 0.95  # after a refusal, admit this share of the measured goodput
    min_cut: float = 0.5  # one cut never goes below this share of the rate in force ...
    max_cut: float = 0.9  # ... and always goes at least this far down
    quiet_s: float = 10.0  # a refusal after this long without one is "isolated": a dip that recovers ...
    transient_share: float = 0.2  # ... if the server refused at most this share of what was sent meanwhile
    dip_recovery_doubling_s: float = 0.5
    start_rps: float = 8.0  # slow start: the first request rate with no limit known
    slow_start_doubling_s: float = 0.25
    probe_cubic_s: float = 45.0  # CUBIC's time scale: the plateau is left by +1 % after 10 s, +9 % after 20 s
    minute_margin: float = 0.98  # a per-minute window seen running full caps the rate at this share of it ...
    minute_hold_s: float = 120.0  # ... for this long unless renewed
    minute_storm_s: float = 2.0  # a per-minute window's storm is over within this; later refusals are the rate's
    recover_s: float = 10.0  # below the plateau: back from a cut to it within this many seconds (concave)
    storm_measure_s: float = 0.1  # a storm this old (and with this many starts) measures goodput since it
    storm_measure_starts: int = 10  # began (the bucket is empty then: what it accepts is its refill rate) ...
    storm_measure_max_s: float = 1.0  # ... and in any case once it is this old
    app_limited_factor: float = 4.0  # with no ceiling, never admit more than this x what was actually sent
    floor_per_s: float = 1.0 / 60.0  # never below one request (or token) a minute


@dataclass(frozen=True)
class Admission:
    """The controller's output: rates per second (None: unmetered) and a pause every request must respect."""

    requests_per_s: float | None
    tokens_per_s: float | None
    paused_until: float


class _Window:
    """Timestamped amounts over the last ``span_s`` seconds, with a running sum."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._events: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def add(self, now: float, amount: float) -> None:
        self._events.append((now, amount))
        self._sum += amount

    def total(self, now: float) -> float:
        while self._events and self._events[0][0] <= now - self.span_s:
            self._sum -= self._events.popleft()[1]
        return max(self._sum, 0.0)

    def total_since(self, now: float, span_s: float) -> float:
        """The sum over the last ``span_s`` (<= the window's span) seconds."""
        self.total(now)
        total = 0.0
        for at, amount in reversed(self._events):
            if at <= now - span_s:
                break
            total += amount
        return total


class _Axis:
    """One rate (requests/s or tokens/s): slow start or unmetered, dips, cuts to goodput, probing up."""

    def __init__(self, ceiling: float | None, now: float, settings: ControlSettings, *, slow_start: bool) -> None:
        self.s = settings
        self.ceiling = ceiling  # configured, or stated by the server; never exceeded
        self._configured = ceiling
        self.recent = _Window(settings.window_s)  # starts over the last window_s: the sending rate
        self.started = _Window(settings.history_s)
        self.lost = _Window(settings.history_s)  # refused or failed: not accepted
        self.accepted60 = _Window(60.0)  # started minus refused or failed, over the last minute
        self._minute_cap: tuple[float, float, float] | None = None  # (rate, until, since)
        self.total_started = 0.0
        self.n_started = 0
        self._first_start: float | None = None
        self.total_lost = 0.0
        self.mode: Literal["unmetered", "slow_start", "probe"]
        self.mode = "probe" if ceiling else ("slow_start" if slow_start else "unmetered")
        self._mode_at = now
        self._base = ceiling or settings.start_rps  # the rate at _mode_at (probe: the cut)
        self._plateau = self._base  # probe: the level the curve flattens at (the measured limit)
        self._dip: tuple[float, float] | None = None  # (factor, since)
        self._epoch_at = -math.inf  # the last cut; refusals of earlier starts belong to it
        # The current storm: (first refusal, accepted so far then, started so far then)
        self._storm: tuple[float, float, float] | None = None
        self._storm_cut = False  # the current storm has cut (not only dipped)
        self.cuts = 0
        self.learned: float | None = None  # the goodput measured at the last cut (per second)

    def count_start(self, now: float, amount: float) -> None:
        self.started.add(now, amount)
        self.recent.add(now, amount)
        self.accepted60.add(now, amount)
        self.total_started += amount
        self.n_started += 1
        if self._first_start is None:
            self._first_start = now

    def count_loss(self, now: float, amount: float) -> None:
        self.lost.add(now, amount)
        self.accepted60.add(now, -amount)
        self.total_lost += amount

    def rate(self, now: float) -> float | None:
        """The rate to admit now, or None (unmetered)."""
        if self.mode == "unmetered":
            return None
        t = max(now - self._mode_at, 0.0)
        if self.mode == "slow_start":
            rate = self._base * 2.0 ** min(t / self.s.slow_start_doubling_s, 60.0)
        else:
            rate = self._probe(t)
        cap = self._minute_cap_at(now)
        if cap is not None:
            rate = min(rate, cap)
        if self.ceiling is not None:
            rate = min(rate, self.ceiling)
        else:  # application-limited (RFC 7661): growth that is not used is not kept
            rate = min(rate, max(self.s.start_rps, self.s.app_limited_factor * self.sent_rate(now)))
        if self._dip is not None:
            factor, since = self._dip
            recovered = factor * 2.0 ** min((now - since) / self.s.dip_recovery_doubling_s, 60.0)
            if recovered >= 1.0:
                self._dip = None
            else:
                rate *= recovered
        return max(rate, self.s.floor_per_s)

    def _probe(self, t: float) -> float:
        """CUBIC's curve in relative terms: concave from the cut up to the plateau (``recover_s``), then convex
        beyond it (``probe_cubic_s``)."""
        plateau, base = self._plateau, self._base
        if plateau <= base:
            return base * (1.0 + (t / self.s.probe_cubic_s) ** 3)
        k = self.s.recover_s * (1.0 - base / plateau) ** (1.0 / 3.0)
        if t < k:
            return plateau * (1.0 - ((k - t) / self.s.recover_s) ** 3)
        return plateau * (1.0 + ((t - k) / self.s.probe_cubic_s) ** 3)

    def sent_rate(self, now: float) -> float:
        return self.recent.total(now) / self.s.window_s

    def _span(self, now: float) -> float:
        """The goodput window: ``window_s``, or long enough to hold ``storm_measure_starts`` x 2 requests at the
        rate in force (a 60 RPM account sends one a second: one second of it measures nothing)."""
        rate = self.rate(now) or self.sent_rate(now)
        per_start = self.total_started / max(self.n_started, 1)
        wanted = 2 * self.s.storm_measure_starts * per_start / max(rate, self.s.floor_per_s)
        age = now - (self._first_start if self._first_start is not None else now)
        return max(self.s.window_s, min(wanted, age, self.s.history_s))

    def goodput(self, now: float) -> float:
        """What the server accepted per second: since the storm began once that is long enough, else the window."""
        if self._storm is not None:
            since, accepted_then, started_then = self._storm
            span = now - since
            per_start = self.total_started / max(self.n_started, 1)
            enough = self.total_started - started_then >= self.s.storm_measure_starts * per_start
            if span >= self.s.storm_measure_s and (enough or span >= self.s.storm_measure_max_s):
                return max(self.total_started - self.total_lost - accepted_then, 0.0) / span
        return self._window_goodput(now)

    def _started_in_window(self, now: float) -> float:
        return self.started.total_since(now, self._span(now))

    def _refused_in_window(self, now: float) -> float:
        """Refused (or failed) amount in the goodput window, this refusal's one request not counted."""
        per_start = self.total_started / max(self.n_started, 1)
        return max(self.lost.total_since(now, self._span(now)) - per_start, 0.0)

    def _window_goodput(self, now: float) -> float:
        span = self._span(now)
        return max(self.started.total_since(now, span) - self.lost.total_since(now, span), 0.0) / span

    def refused(self, now: float, started_at: float) -> None:
        """A refusal: unless it belongs to the last cut's congestion event, cut to the measured goodput."""
        if started_at < self._epoch_at:
            return
        current = self.rate(now)
        if current is None:  # unmetered until now: start from what was actually sent
            current = max(self.sent_rate(now), self.s.floor_per_s)
        quiet = now - self._epoch_at >= self.s.quiet_s
        if quiet or self._storm is None:
            self._storm = (now, self.total_started - self.total_lost, self.total_started)
            self._storm_cut = False
        young = now - self._storm[0] < self.s.storm_measure_s
        measured = self.goodput(now)
        target = max(measured * self.s.margin, current * self.s.min_cut)
        target = min(target, current * self.s.max_cut if young else current)
        target = max(target, self.s.floor_per_s)
        # A refusal at the level refused before, or while the server refuses a good share of what is sent, is
        # the limit; an isolated one while nearly everything gets through is a transient: a dip.
        expected = self.learned is not None and current >= 0.9 * self.learned
        transient = self._refused_in_window(now) <= self.s.transient_share * self._started_in_window(now)
        if quiet and not expected and transient:  # the curve in force continues; the dip recovers to it
            if self.mode == "unmetered":
                self._set_probe(now, current, current)
            self._dip = (target / current, now)
        else:
            if not self._storm_cut:  # the storm's first real cut: is it the per-minute window?
                self._minute_storm(now, current)
                self._storm_cut = True
            self._set_probe(now, target, self._plateau_after(now, measured, target))
        self._epoch_at = now
        self.cuts += 1
        self.learned = measured

    def _plateau_after(self, now: float, measured: float, target: float) -> float:
        """The level the curve returns to after a cut: the measured goodput (x margin).

        Except right after the per-minute window was seen running full (see ``_minute_storm``): while it is full
        the server accepts only what expires from it, which measures the window, not the rate, so for
        ``minute_storm_s`` the curve returns to the rate the last minute sustained. A refusal below that rate
        later on shows the limit itself is lower (it changed): the minute cap is dropped.
        """
        plateau = max(measured * self.s.margin, target)
        if self._minute_cap is not None:
            cap, _, since = self._minute_cap
            if now - since < self.s.minute_storm_s:
                plateau = max(plateau, cap)
            else:
                self._minute_cap = None
        return plateau

    def _minute_storm(self, now: float, current: float) -> None:
        """A storm that starts when the last minute accepted (about) the current rate x 60 is the per-minute
        window running full, not the per-second bucket: what the minute accepted *is* the minute's limit. The
        rate is then capped just below it for ``minute_hold_s`` (a sliding window refuses for as long as it is
        overshot, so it is cheaper to stay under it than to rediscover it), and the cap lapses unless renewed,
        so a limit raised later is still found.
        """
        per_s = self.accepted60.total(now) / 60.0
        per_start = self.total_started / max(self.n_started, 1)
        if per_s * 60.0 < 10 * per_start or per_s < 0.8 * current:
            return  # the last minute was not at the current rate throughout (or too short to tell)
        held = self._minute_cap_at(now) or 0.0
        self._minute_cap = (max(per_s * self.s.minute_margin, held), now + self.s.minute_hold_s, now)

    def _minute_cap_at(self, now: float) -> float | None:
        if self._minute_cap is None or now >= self._minute_cap[1]:
            return None
        return self._minute_cap[0]

    def _set_probe(self, now: float, base: float, plateau: float) -> None:
        self.mode, self._mode_at, self._base, self._plateau, self._dip = "probe", now, base, plateau, None

    def stated_limit(self, now: float, per_s: float) -> None:
        """The server stated its limit: it becomes the ceiling (under a configured one), reached without search."""
        ceiling = min(per_s, self._configured) if self._configured else per_s
        if self.ceiling == ceiling:
            return
        self.ceiling = ceiling
        if self.mode != "probe" or self._epoch_at == -math.inf:
            self._set_probe(now, ceiling, ceiling)


class RateController:
    """Consumes request events, produces the request and token rates to admit (see the module docstring).

    Every method takes ``now`` (seconds on any monotonic clock) so the controller runs on real time in the
    runner and on simulated time in tests.
    """

    def __init__(self, *, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 now: float = 0.0, settings: ControlSettings | None = None) -> None:
        s = settings or ControlSettings()
        self.settings = s
        self.requests = _Axis(requests_per_minute / 60.0 if requests_per_minute else None, now, s, slow_start=True)
        self.tokens = _Axis(tokens_per_minute / 60.0 if tokens_per_minute else None, now, s, slow_start=False)
        self._paused_until = -math.inf

    # -- events ---------------------------------------------------------------------------------------------
    def started(self, now: float, tokens: float) -> None:
        """A request was sent, expected to cost ``tokens`` (prompt + completion estimate)."""
        self.requests.count_start(now, 1.0)
        self.tokens.count_start(now, tokens)

    def accepted(self, now: float, *, headers: Mapping[str, str] | None = None) -> None:
        """A request was answered; its response's rate-limit headers (if any) may state the limits."""
        if headers:
            self.observe_headers(now, headers)

    def refused(self, now: float, *, started_at: float, tokens: float = 0.0, kind: Kind = "requests",
                retry_after_s: float | None = None) -> None:
        """A 429 for a request sent at ``started_at`` (of ``tokens`` estimated tokens)."""
        self.requests.count_loss(now, 1.0)
        self.tokens.count_loss(now, tokens)
        axis = self.tokens if kind == "tokens" else self.requests
        axis.refused(now, started_at)
        if retry_after_s:
            self._paused_until = max(self._paused_until, now + retry_after_s)

    def failed(self, now: float, *, tokens: float = 0.0) -> None:
        """A connection failure or timeout: not accepted (goodput), but no sign of a rate limit."""
        self.requests.count_loss(now, 1.0)
        self.tokens.count_loss(now, tokens)

    def observe_headers(self, now: float, headers: Mapping[str, str]) -> None:
        """``x-ratelimit-limit-*`` (per minute) become known limits; ``x-ratelimit-remaining-*: 0`` cuts early."""
        for kind, axis in (("requests", self.requests), ("tokens", self.tokens)):
            limit = _header_number(headers, f"x-ratelimit-limit-{kind}")
            if limit is not None and limit >= _LEAST_STATED[kind]:  # a hostile "1e-9" would stall every worker
                axis.stated_limit(now, limit / 60.0)
            remaining = _header_number(headers, f"x-ratelimit-remaining-{kind}")
            if remaining is not None and remaining <= 0:
                axis.refused(now, now)

    # -- output ---------------------------------------------------------------------------------------------
    def admission(self, now: float) -> Admission:
        """The rates to admit from ``now`` on."""
        return Admission(self.requests.rate(now), self.tokens.rate(now), self._paused_until)

    def learned(self) -> tuple[float | None, float | None]:
        """Goodput (per minute) measured at the last request and token refusals: the server's limits as seen."""
        r, t = self.requests.learned, self.tokens.learned
        return (r * 60.0 if r is not None else None, t * 60.0 if t is not None else None)


# The least per-minute limit a server may state and be believed: the configuration's own floors (config.py), so a
# broken or hostile header cannot set a rate under which no request is ever admitted.
_LEAST_STATED = {"requests": 1 / 60, "tokens": 100.0}


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    """A finite numeric header, also under LiteLLM's ``llm_provider-`` prefix; None if absent, not a number, NaN
    or infinite."""
    for key in (name, f"llm_provider-{name}"):
        value = headers.get(key)
        if value is not None:
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
    return None
