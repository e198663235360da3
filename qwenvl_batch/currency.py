"""Money with its currency: the spend cap's currency, and spend kept apart per currency.

Why this matters: prices come in more than one currency (Beijing in CNY, Singapore and Virginia in USD), and
there is no exchange rate here that anybody could audit, so amounts in different currencies are never added
or compared. A spend cap therefore has one currency, the one the job's model and region are priced in: it may
be stated (``max_cost = "50 CNY"`` or ``max_cost_currency = "CNY"``) or, for a bare number, inferred from that
price. A cap whose stated currency is not the price's is refused before anything is sent, and so is a cap on
an output that already records spend in another currency (the cap could not count it).

A run has one model and one region, hence one currency; only the output, across runs, can hold several.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import JobConfig
    from .pricing import ModelPrice

__all__ = ["UNKNOWN_CURRENCY", "add_spend", "check_cap_currency", "committed_spend", "parse_amount", "split_cap"]

#: The key spend without a currency label is kept under (it is never counted toward a cap).
UNKNOWN_CURRENCY = "(unknown)"

_CODE = re.compile(r"[A-Za-z]{3}")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_AMOUNT = re.compile(rf"\s*(?:(?P<pre>[A-Za-z]{{3}})\s*)?(?P<number>{_NUMBER})\s*(?P<post>[A-Za-z]{{3}})?\s*")


def parse_amount(value: Any) -> tuple[float, str | None]:
    """``25``, ``"25"``, ``"50 CNY"``, ``"CNY 50"``, ``"7.5usd"`` → ``(amount, "CNY" or None)``.

    ``ValueError`` (its message says what to write) for anything else: a negative amount, two currencies, a
    code that is not three letters. The code is upper-cased; whether it matches a price is checked later.
    """
    # ValueError, not TypeError, throughout: pydantic turns only ValueError into a message naming the key.
    if isinstance(value, bool):
        raise ValueError(f"expected an amount such as 25 or \"50 CNY\", got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected an amount >= 0, got {value!r}")
        return float(value), None
    if not isinstance(value, str):
        raise ValueError(f"expected an amount such as 25 or \"50 CNY\", got {value!r}")
    match = _AMOUNT.fullmatch(value)
    if match is None or (match["pre"] and match["post"]):
        raise ValueError(f"expected an amount such as 25 or \"50 CNY\" (a number and a 3-letter currency code), "
                         f"got {value!r}")
    code = match["pre"] or match["post"]
    return float(match["number"]), code.upper() if code else None


def split_cap(limits: Mapping[str, Any]) -> dict[str, Any]:
    """A ``[limits]`` table with ``max_cost = "50 CNY"`` → ``max_cost = 50.0, max_cost_currency = "CNY"``.

    A currency both in the amount and in ``max_cost_currency`` must agree (``ValueError`` otherwise); a lone
    ``max_cost_currency`` is checked and upper-cased.
    """
    out = dict(limits)
    stated = out.get("max_cost_currency")
    if stated is not None:
        if not isinstance(stated, str) or not _CODE.fullmatch(stated):
            raise ValueError(f"max_cost_currency: expected a 3-letter currency code such as \"CNY\", got {stated!r}")
        stated = out["max_cost_currency"] = stated.upper()
    if out.get("max_cost") is None:
        return out
    amount, code = parse_amount(out["max_cost"])
    if code and stated and code != stated:
        raise ValueError(f"max_cost is in {code} but max_cost_currency is {stated}: give one currency")
    out["max_cost"] = amount
    if code:
        out["max_cost_currency"] = code
    return out


def _money(amount: float) -> str:
    """Up to 6 decimals, never in exponent form (``0.000045``, ``50``), for messages."""
    return f"{amount:,.6f}".rstrip("0").rstrip(".")


def _cap_text(amount: float, currency: str) -> str:
    return f"{_money(amount)} {currency}"


def check_cap_currency(job: JobConfig, price: ModelPrice | None) -> str | None:
    """The cap's currency: the stated one if it is the price's, else the price's; ``ConfigError`` on a mismatch.

    ``None`` when there is no cap or no price (the runner refuses a cap without a price on its own).
    """
    limits = job.limits
    if limits.max_cost is None or price is None:
        return None
    stated = limits.max_cost_currency
    if stated is None or stated == price.currency:
        return price.currency
    where = f"{job.job_file}: " if job.job_file else ""
    region = job.model.region or "custom endpoint"
    raise ConfigError(
        f"{where}[limits] max_cost is {_cap_text(limits.max_cost, stated)}, but model {job.model.name!r} "
        f"({region}) is priced in {price.currency} ({price.source}, as of {price.as_of}); a cap in {stated} cannot "
        f"limit spend in {price.currency}, and currencies are never converted. Nothing was sent.\n"
        f"  - state the cap in {price.currency}: max_cost = \"{_money(limits.max_cost)} {price.currency}\" "
        "(or --max-cost)\n"
        f"  - or, if the job should run where prices are in {stated}, set [model] region accordingly "
        "(cn = Beijing, CNY; intl = Singapore and us = Virginia, USD)"
    )


def add_spend(totals: dict[str, float], cost: pa.ChunkedArray | pa.Array, currency: pa.ChunkedArray | pa.Array) -> None:
    """Add one table's recorded costs to ``totals``, per currency (nulls ignored; no currency → UNKNOWN_CURRENCY)."""
    table = pa.table({"cost": cost, "currency": pc.fill_null(currency.cast(pa.string()), UNKNOWN_CURRENCY)})
    table = table.filter(pc.is_valid(table["cost"]))
    if not table.num_rows:
        return
    for row in table.group_by("currency").aggregate([("cost", "sum")]).to_pylist():
        totals[row["currency"]] = totals.get(row["currency"], 0.0) + float(row["cost_sum"])


def committed_spend(costs: Mapping[str, float], currency: str | None, *, output: Path, capped: bool) -> float:
    """The spend an output already records in ``currency`` (what a cap counts from).

    With a cap, spend recorded in any other currency is refused with a ``ConfigError``: the cap applies to the
    output as a whole, and it cannot include an amount it cannot convert.
    """
    if currency is None:
        return 0.0
    others = {code: amount for code, amount in sorted(costs.items()) if code != currency and amount > 0}
    if capped and others:
        recorded = ", ".join(_cap_text(amount, code) for code, amount in others.items())
        raise ConfigError(
            f"{output}: this output already records spend in another currency ({recorded}) from earlier runs; "
            f"a max_cost in {currency} cannot include it, and currencies are never converted. Nothing was sent.\n"
            "  - write this job to a new output (--output PATH), or\n"
            "  - run without max_cost (qwenvl-batch report OUTPUT shows the spend per currency)"
        )
    return float(costs.get(currency, 0.0))
