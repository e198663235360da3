"""Price table (``prices.toml`` beside this module, or a user's file) and the cost of each request.

Why prices are data: they change more often than the code, and a user must be able to check where a figure
comes from (``source``, ``as_of``) and override it (a negotiated price, a self-hosted model at 0) without a
release. The format is documented at the top of ``prices.toml``.

Why costs are computed per row from that row's own usage: the provider bills each request at the tier chosen
by *that request's* prompt tokens, so an average over the run would be wrong as soon as some requests cross a
tier boundary. A row without a known price gets an empty cost, never a guessed one; the report names those
models, because a bill nobody predicted is worse than a gap everybody can see.

Why per region, each entry with its own currency: the same model name has different prices in Singapore and
Virginia (USD) and Beijing (CNY, with its own tiers), and a dated snapshot is not always billed like its family.
So a price is looked up by (model, region) and never borrowed from another region, and every cost carries its
currency; amounts in different currencies are never added (see ``currency.py`` for the spend cap).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "REGIONS",
    "ModelPrice",
    "PriceTable",
    "RowCost",
    "Tier",
    "add_cost_columns",
    "row_cost",
    "unpriced_models",
]

#: Region names a price file may use; ``any`` matches every region (self-hosted models, negotiated prices).
REGIONS: tuple[str, ...] = ("intl", "us", "cn", "any")
#: The region assumed when the caller does not know it: the runner's default endpoint is Singapore.
DEFAULT_REGION = "intl"

_MTOK = 1_000_000.0
_ENTRY_KEYS = frozenset(
    {
        "currency",
        "source",
        "as_of",
        "note",
        "cached_input_ratio",
        "batch_discount",
        "input_per_mtok",
        "output_per_mtok",
        "tiers",
    }
)
_TIER_KEYS = frozenset({"max_prompt_tokens", "input_per_mtok", "output_per_mtok"})
_CURRENCY = re.compile(r"[A-Z]{3}")
_AS_OF = re.compile(r"\d{4}-\d{2}(-\d{2})?")


@dataclass(frozen=True)
class Tier:
    """Rates for requests whose prompt has at most ``max_prompt_tokens`` tokens (``None``: no upper bound)."""

    max_prompt_tokens: int | None
    input_per_mtok: float
    output_per_mtok: float


@dataclass(frozen=True)
class ModelPrice:
    """What one model costs in one region; ``tiers`` are sorted by bound, only the last may be unbounded."""

    model: str
    region: str
    currency: str
    tiers: tuple[Tier, ...]
    cached_input_ratio: float | None
    batch_discount: float | None
    source: str
    as_of: str
    note: str = ""

    def tier_for(self, prompt_tokens: int) -> Tier:
        """The tier billing a request with ``prompt_tokens`` prompt tokens (bounds are inclusive).

        Raises ``ValueError`` when the prompt is above the last bound: the price is unknown there (e.g. the
        us figures stop at 32K) and a guess would be a wrong bill.
        """
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
        for tier in self.tiers:
            if tier.max_prompt_tokens is None or prompt_tokens <= tier.max_prompt_tokens:
                return tier
        raise ValueError(
            f"{self.model} ({self.region}): no price for prompts over "
            f"{self.tiers[-1].max_prompt_tokens:,} tokens (got {prompt_tokens:,})"
        )

    def _bounds(self) -> np.ndarray:
        """Tier upper bounds as floats (``inf`` for an unbounded tier), for ``np.searchsorted``."""
        return np.array(
            [math.inf if t.max_prompt_tokens is None else float(t.max_prompt_tokens) for t in self.tiers]
        )


@dataclass(frozen=True)
class RowCost:
    """The cost of one request, split the way the provider's bill splits it."""

    input_cost: float
    output_cost: float
    cost: float
    currency: str


class PriceTable:
    """Prices by (model, region), plus aliases (``-latest``, dated snapshots) that share an entry."""

    def __init__(self, entries: Mapping[tuple[str, str], ModelPrice], aliases: Mapping[str, str]) -> None:
        self._entries: Mapping[tuple[str, str], ModelPrice] = MappingProxyType(dict(entries))
        self._aliases: Mapping[str, str] = MappingProxyType(dict(aliases))
        self._folded = _fold_index({name for name, _ in self._entries} | set(self._aliases))

    @classmethod
    def builtin(cls) -> PriceTable:
        """The prices shipped with the package (``prices.toml``)."""
        text = resources.files(__package__).joinpath("prices.toml").read_text(encoding="utf-8")
        return cls._from_text(text, origin="built-in prices.toml")

    @classmethod
    def from_file(cls, path: Path) -> PriceTable:
        """A user's price file in the same format; every error names the file and the offending key."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the price file ({exc.strerror or exc})") from exc
        return cls._from_text(text, origin=str(path))

    @classmethod
    def _from_text(cls, text: str, *, origin: str) -> PriceTable:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
        entries, aliases = _parse_file(data, origin)
        return cls(entries, aliases)

    def merged(self, other: PriceTable) -> PriceTable:
        """This table with ``other``'s entries added, ``other`` winning per (model, region) and per alias."""
        entries = {key: price for key, price in self._entries.items() if key[0] not in other._aliases}
        entries.update(other._entries)
        own_models = {name for name, _ in other._entries}
        aliases = {alias: target for alias, target in self._aliases.items() if alias not in own_models}
        aliases.update(other._aliases)
        return PriceTable(entries, aliases)

    def lookup(self, model: str, region: str | None) -> ModelPrice | None:
        """The price of ``model`` in ``region``; ``None`` when unknown (the cost stays empty, not an error).

        Order: the region's own entry, then an ``any`` entry. With ``region=None`` (a custom endpoint):
        ``any``, then ``intl``, the runner's default endpoint.
        """
        name = self._canonical(model)
        if name is None:
            return None
        regions = (region, "any") if region else ("any", DEFAULT_REGION)
        for candidate in regions:
            price = self._entries.get((name, candidate))
            if price is not None:
                return price
        return None

    def models(self) -> list[str]:
        """Model names with at least one entry (aliases not included), sorted."""
        return sorted({name for name, _ in self._entries})

    def _canonical(self, model: str) -> str | None:
        """The entry name for ``model``: an exact name, an alias, or a case-insensitive match of either."""
        for name in (model, self._folded.get(model.strip().casefold())):
            if name is None:
                continue
            if any((name, region) in self._entries for region in REGIONS):
                return name
            if name in self._aliases:
                return self._aliases[name]
        return None


def _fold_index(names: set[str]) -> dict[str, str]:
    """Case-folded name → name, so ``Qwen-VL-Max`` finds ``qwen-vl-max`` (the provider ignores case)."""
    return {name.casefold(): name for name in sorted(names)}


# ---------------------------------------------------------------------------------------------- parsing


def _fail(origin: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{origin}: {key}: {problem}")


def _parse_file(
    data: Mapping[str, Any], origin: str
) -> tuple[dict[tuple[str, str], ModelPrice], dict[str, str]]:
    """Validate a whole price file; unknown keys are errors because a misspelt key would silently misprice."""
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise _fail(origin, unknown[0], "unknown top-level key (a price file has only [models.\"<name>\"...] tables)")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise _fail(origin, "models", 'no models: add at least one [models."<name>".<region>] table')
    entries: dict[tuple[str, str], ModelPrice] = {}
    aliases: dict[str, str] = {}
    for name, table in models.items():
        key = f'models."{name}"'
        if not isinstance(table, dict):
            raise _fail(origin, key, "must be a table")
        for alias in _parse_aliases(table.get("aliases", []), origin, key):
            if alias in aliases or alias in models:
                raise _fail(origin, f"{key}.aliases", f"{alias!r} already names another model or alias")
            aliases[alias] = name
        regions = {r: t for r, t in table.items() if r != "aliases"}
        if not regions:
            raise _fail(origin, key, f"no region table: add [{key}.intl] (regions: {', '.join(REGIONS)})")
        for region, entry in regions.items():
            if region not in REGIONS:
                raise _fail(origin, f"{key}.{region}", f"unknown region (use one of: {', '.join(REGIONS)})")
            entries[(name, region)] = _parse_entry(entry, origin, f"{key}.{region}", name, region)
    return entries, aliases


def _parse_aliases(value: Any, origin: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
        raise _fail(origin, f"{key}.aliases", "must be a list of model names")
    return list(value)


def _parse_entry(entry: Any, origin: str, key: str, model: str, region: str) -> ModelPrice:
    if not isinstance(entry, dict):
        raise _fail(origin, key, "must be a table")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise _fail(origin, f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
    for required in ("currency", "source", "as_of"):
        if required not in entry:
            raise _fail(origin, f"{key}.{required}", "missing")
    currency = entry["currency"]
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise _fail(origin, f"{key}.currency", f"expected a 3-letter code such as \"USD\", got {currency!r}")
    source = entry["source"]
    if not isinstance(source, str) or not source.strip():
        raise _fail(origin, f"{key}.source", "expected a URL or a short description of where the price comes from")
    note = entry.get("note", "")
    if not isinstance(note, str):
        raise _fail(origin, f"{key}.note", "expected a string")
    return ModelPrice(
        model=model,
        region=region,
        currency=currency,
        tiers=_parse_tiers(entry, origin, key),
        cached_input_ratio=_optional_ratio(entry, "cached_input_ratio", origin, key, allow_zero=True),
        batch_discount=_optional_ratio(entry, "batch_discount", origin, key, allow_zero=False),
        source=source.strip(),
        as_of=_parse_as_of(entry["as_of"], origin, f"{key}.as_of"),
        note=note,
    )


def _parse_as_of(value: Any, origin: str, key: str) -> str:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str) and _AS_OF.fullmatch(value):
        return value
    raise _fail(origin, key, f"expected a date as YYYY-MM-DD or YYYY-MM, got {value!r}")


def _number(value: Any, origin: str, key: str) -> float:
    """A finite number >= 0 (TOML booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(origin, key, f"expected a number >= 0, got {value!r}")
    return float(value)


def _optional_ratio(entry: Mapping[str, Any], name: str, origin: str, key: str, *, allow_zero: bool) -> float | None:
    if name not in entry:
        return None
    value = _number(entry[name], origin, f"{key}.{name}")
    if value > 1 or (value == 0 and not allow_zero):
        low = "0" if allow_zero else "above 0"
        raise _fail(origin, f"{key}.{name}", f"expected a fraction from {low} to 1, got {entry[name]!r}")
    return value


def _parse_tiers(entry: Mapping[str, Any], origin: str, key: str) -> tuple[Tier, ...]:
    flat = "input_per_mtok" in entry or "output_per_mtok" in entry
    if flat and "tiers" in entry:
        raise _fail(origin, f"{key}.tiers", "give either tiers or input_per_mtok/output_per_mtok, not both")
    if flat:
        for name in ("input_per_mtok", "output_per_mtok"):
            if name not in entry:
                raise _fail(origin, f"{key}.{name}", "missing")
        return (
            Tier(
                None,
                _number(entry["input_per_mtok"], origin, f"{key}.input_per_mtok"),
                _number(entry["output_per_mtok"], origin, f"{key}.output_per_mtok"),
            ),
        )
    raw = entry.get("tiers")
    if not isinstance(raw, list) or not raw:
        raise _fail(origin, f"{key}.tiers", "missing: give tiers = [...] or input_per_mtok and output_per_mtok")
    tiers = tuple(_parse_tier(t, origin, f"{key}.tiers[{i}]", last=i == len(raw) - 1) for i, t in enumerate(raw))
    bounds = [t.max_prompt_tokens for t in tiers if t.max_prompt_tokens is not None]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise _fail(origin, f"{key}.tiers", f"max_prompt_tokens must increase from tier to tier, got {bounds}")
    return tiers


def _parse_tier(raw: Any, origin: str, key: str, *, last: bool) -> Tier:
    if not isinstance(raw, dict):
        raise _fail(origin, key, "must be a table {max_prompt_tokens = .., input_per_mtok = .., output_per_mtok = ..}")
    unknown = sorted(set(raw) - _TIER_KEYS)
    if unknown:
        raise _fail(origin, f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(_TIER_KEYS))})")
    bound = raw.get("max_prompt_tokens")
    if bound is None and not last:
        raise _fail(origin, f"{key}.max_prompt_tokens", "missing (only the last tier may be unbounded)")
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0):
        raise _fail(origin, f"{key}.max_prompt_tokens", f"expected a whole number of tokens > 0, got {bound!r}")
    for name in ("input_per_mtok", "output_per_mtok"):
        if name not in raw:
            raise _fail(origin, f"{key}.{name}", "missing")
    return Tier(
        bound,
        _number(raw["input_per_mtok"], origin, f"{key}.input_per_mtok"),
        _number(raw["output_per_mtok"], origin, f"{key}.output_per_mtok"),
    )


# ---------------------------------------------------------------------------------------------- costs


def row_cost(
    price: ModelPrice,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    batch: bool = False,
) -> RowCost:
    """The cost of one request, from its usage.

    The tier is chosen by this request's ``prompt_tokens`` and bills the whole request (input and output).
    Cached prompt tokens cost ``cached_input_ratio`` × the input rate (the full rate when the model has no
    cache discount). Reasoning tokens are part of ``completion_tokens`` and billed as output. With
    ``batch=True`` both parts are multiplied by ``batch_discount`` and the cache discount does not apply (the
    Batch API does not use the context cache). ``ValueError`` for negative counts, for a prompt above the
    last priced tier, and for ``batch=True`` on a model without a Batch price: a caller that must not stop
    (the runner) catches it and leaves the cost empty, as ``add_cost_columns`` does.
    """
    if min(prompt_tokens, completion_tokens, cached_tokens) < 0:
        raise ValueError(
            f"invalid usage: prompt={prompt_tokens}, completion={completion_tokens}, cached={cached_tokens}"
        )
    cached_tokens = min(cached_tokens, prompt_tokens)  # as add_cost_columns does: never a negative uncached part
    tier = price.tier_for(prompt_tokens)
    if batch:
        if price.batch_discount is None:
            raise ValueError(f"{price.model} ({price.region}): no Batch API price")
        factor, ratio = price.batch_discount, 1.0
    else:
        factor = 1.0
        ratio = 1.0 if price.cached_input_ratio is None else price.cached_input_ratio
    billed_input = (prompt_tokens - cached_tokens) + ratio * cached_tokens
    input_cost = factor * tier.input_per_mtok * billed_input / _MTOK
    output_cost = factor * tier.output_per_mtok * completion_tokens / _MTOK
    return RowCost(input_cost, output_cost, input_cost + output_cost, price.currency)


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls; all NaN when the column is absent."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


@dataclass
class _Rates:
    """Scratch arrays of per-row rates, filled model by model, then combined in one vectorised expression."""

    input_per_mtok: np.ndarray
    output_per_mtok: np.ndarray
    cached_ratio: np.ndarray
    currency: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Rates:
        return cls(np.full(n, np.nan), np.full(n, np.nan), np.ones(n), np.full(n, None, dtype=object))

    def fill(self, rows: np.ndarray, prompt: np.ndarray, price: ModelPrice) -> int:
        """Set the rates of ``rows`` from ``price``; returns how many rows were above its last tier."""
        index = np.searchsorted(price._bounds(), prompt[rows], side="left")  # bounds are inclusive
        inside = index < len(price.tiers)
        rows, index = rows[inside], index[inside]
        self.input_per_mtok[rows] = np.array([t.input_per_mtok for t in price.tiers])[index]
        self.output_per_mtok[rows] = np.array([t.output_per_mtok for t in price.tiers])[index]
        self.cached_ratio[rows] = 1.0 if price.cached_input_ratio is None else price.cached_input_ratio
        self.currency[rows] = price.currency
        return int((~inside).sum())


def add_cost_columns(df: pd.DataFrame, table: PriceTable, region: str | None) -> pd.DataFrame:
    """A copy of ``df`` with ``input_cost``, ``output_cost``, ``cost`` and ``currency`` from each row's usage.

    Nulls where the row has no usage (``prompt_tokens`` or ``completion_tokens`` null: input errors, pending
    rows) or its model has no price, or its prompt is above the model's last priced tier. Vectorised per
    model and tier, so a 10^6-row output costs about a second.
    """
    n = len(df)
    prompt = _column(df, "prompt_tokens")
    completion = _column(df, "completion_tokens")
    cached = np.minimum(np.nan_to_num(_column(df, "cached_tokens"), nan=0.0), prompt)
    has_usage = ~np.isnan(prompt) & ~np.isnan(completion)
    rates = _Rates.empty(n)
    if "model" in df.columns and n:
        codes, names = pd.factorize(df["model"])
        for code, name in enumerate(names):
            price = table.lookup(str(name), region)
            rows = np.flatnonzero((codes == code) & has_usage)
            if price is None or not rows.size:
                continue
            above = rates.fill(rows, prompt, price)
            if above:
                log.warning("%s: %d rows above the last priced tier; their cost is left empty", name, above)
    input_cost = rates.input_per_mtok * ((prompt - cached) + rates.cached_ratio * cached) / _MTOK
    output_cost = rates.output_per_mtok * completion / _MTOK
    return df.assign(
        input_cost=pd.array(input_cost, dtype="Float64"),
        output_cost=pd.array(output_cost, dtype="Float64"),
        cost=pd.array(input_cost + output_cost, dtype="Float64"),
        currency=pd.array(rates.currency, dtype="string"),
    )


def unpriced_models(df: pd.DataFrame, table: PriceTable, region: str | None) -> list[str]:
    """Models in ``df`` that have no price in ``region``, sorted: the names to show next to any total.

    Rows of a priced model can still lack a cost (above its last tier); the report counts those per model.
    """
    if "model" not in df.columns:
        return []
    names = pd.Series(df["model"].dropna().unique()).astype(str)
    return sorted(name for name in names if table.lookup(name, region) is None)
