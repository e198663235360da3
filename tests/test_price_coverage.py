"""Every model the provider lists, in every region where it lists it, has a built-in price (or is named as unpriced).

The lists below are copied from the provider's "OpenAI compatible - Vision" page (Last Updated Jan 06, 2026;
the project's copy is ../shared/seeds/000_84c1b0f73be0cf5e.txt), section by section, as printed there (the
International list names qwen-vl-max twice). Its "Global" and "US" sections are both served by the Virginia
endpoint, which the job file calls region "us"; "International" is "intl" (Singapore), "Mainland China" is "cn"
(Beijing). When the provider's page changes, update these lists, then prices.toml (or UNPRICED and the README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenvl_batch.pricing import PriceTable

BUILTIN = PriceTable.builtin()
README = Path(__file__).resolve().parents[1] / "README.md"


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


PROVIDER_LISTS: dict[str, list[tuple[str, str]]] = {
    "Global": [
        ("us", ("qwen3-vl-plus, qwen3-vl-plus-2025-09-23, qwen3-vl-flash, qwen3-vl-flash-2025-10-15, "
                "qwen3-vl-235b-a22b-thinking, qwen3-vl-235b-a22b-instruct, qwen3-vl-32b-instruct, "
                "qwen3-vl-30b-a3b-thinking, qwen3-vl-30b-a3b-instruct, qwen3-vl-8b-thinking, qwen3-vl-8b-instruct")),
        ("us", "qwen-vl-ocr, qwen-vl-ocr-2025-11-20"),
    ],
    "International": [
        ("intl", ("qwen3-vl-plus, qwen3-vl-plus-2025-12-19, qwen3-vl-plus-2025-09-23, qwen3-vl-flash, "
                  "qwen3-vl-flash-2025-10-15, qwen3-vl-235b-a22b-thinking, qwen3-vl-235b-a22b-instruct, "
                  "qwen3-vl-32b-instruct, qwen3-vl-30b-a3b-thinking, qwen3-vl-30b-a3b-instruct, qwen3-vl-8b-thinking, "
                  "qwen3-vl-8b-instruct")),
        ("intl", ("qwen-vl-max, qwen-vl-max, qwen-vl-max-latest, qwen-vl-max-2025-08-13, qwen-vl-max-2025-04-08, "
                  "qwen-vl-plus, qwen-vl-plus-latest, qwen-vl-plus-2025-08-15, qwen-vl-plus-2025-07-10, "
                  "qwen-vl-plus-2025-05-07, qwen-vl-plus-2025-01-25, qwen2.5-vl-72b-instruct, qwen2.5-vl-32b-instruct, "
                  "qwen2.5-vl-7b-instruct, qwen2.5-vl-3b-instruct")),
        ("intl", "qvq-max, qvq-max-latest, qvq-max-2025-03-25"),
        ("intl", "qwen-vl-ocr, qwen-vl-ocr-2025-11-20"),
    ],
    "US": [
        ("us", "qwen3-vl-flash-us, qwen3-vl-flash-2025-10-15-us"),
    ],
    "Mainland China": [
        ("cn", ("qwen3-vl-plus, qwen3-vl-plus-2025-12-19, qwen3-vl-plus-2025-09-23, qwen3-vl-flash, "
                "qwen3-vl-flash-2025-10-15, qwen3-vl-235b-a22b-thinking, qwen3-vl-235b-a22b-instruct, "
                "qwen3-vl-32b-instruct, qwen3-vl-30b-a3b-thinking, qwen3-vl-30b-a3b-instruct, qwen3-vl-8b-thinking, "
                "qwen3-vl-8b-instruct")),
        ("cn", ("qwen-vl-max, qwen-vl-max, qwen-vl-max-latest, qwen-vl-max-2025-08-13, qwen-vl-max-2025-04-08, "
                "qwen-vl-max-2025-04-02, qwen-vl-max-2025-01-25, qwen-vl-max-2024-12-30, qwen-vl-max-2024-11-19, "
                "qwen-vl-max-2024-10-30, qwen-vl-max-2024-08-09, qwen-vl-plus, qwen-vl-plus-latest, "
                "qwen-vl-plus-2025-08-15, qwen-vl-plus-2025-07-10, qwen-vl-plus-2025-05-07, qwen-vl-plus-2025-01-25, "
                "qwen-vl-plus-2025-01-02, qwen-vl-plus-2024-08-09, qwen2.5-vl-72b-instruct, qwen2.5-vl-32b-instruct, "
                "qwen2.5-vl-7b-instruct, qwen2.5-vl-3b-instruct, qwen2-vl-72b-instruct, qwen2-vl-7b-instruct, "
                "qwen2-vl-2b-instruct")),
        ("cn", "qvq-max, qvq-max-latest, qvq-max-2025-03-25"),
        ("cn", ("qwen-vl-ocr, qwen-vl-ocr-latest, qwen-vl-ocr-2025-11-20, qwen-vl-ocr-2025-08-28, "
                "qwen-vl-ocr-2025-04-13, qwen-vl-ocr-2024-10-28")),
    ],
}

#: Listed by the provider, but no price source gives a figure: left unpriced (never guessed), and named in the
#: README's "Cost" section and at the top of prices.toml with the reason.
UNPRICED: frozenset[tuple[str, str]] = frozenset(
    {
        ("cn", "qwen-vl-max-2024-10-30"),
        ("cn", "qwen-vl-max-2024-08-09"),
        ("cn", "qwen-vl-plus-2024-08-09"),
        ("cn", "qwen2-vl-72b-instruct"),
        ("cn", "qwen2-vl-7b-instruct"),
        ("cn", "qwen2-vl-2b-instruct"),
        ("intl", "qwen-vl-plus-2025-07-10"),
    }
)

CURRENCY = {"intl": "USD", "us": "USD", "cn": "CNY"}


def listed() -> list[tuple[str, str]]:
    """(region, model) for every distinct model the provider lists, in the order of its page."""
    pairs: list[tuple[str, str]] = []
    for groups in PROVIDER_LISTS.values():
        for region, text in groups:
            for name in _names(text):
                if (region, name) not in pairs:
                    pairs.append((region, name))
    return pairs


def test_the_copied_lists_are_whole() -> None:
    """The data above holds the page's lists in full: 46 names for Mainland China, 31 International, 15 for Virginia."""
    counts = {region: sum(1 for r, _ in listed() if r == region) for region in CURRENCY}
    assert counts == {"cn": 46, "intl": 31, "us": 15}


@pytest.mark.parametrize("region, model", [pair for pair in listed() if pair not in UNPRICED])
def test_every_listed_model_has_a_price_in_its_region(region: str, model: str) -> None:
    """Each listed model resolves to its own region's entry (never another region's), in that region's currency."""
    price = BUILTIN.lookup(model, region)
    assert price is not None, f"{model} ({region}) has no built-in price"
    assert price.region == region
    assert price.currency == CURRENCY[region]
    assert price.source.startswith("https://") and price.as_of[:4].isdigit()
    assert all(t.input_per_mtok > 0 and t.output_per_mtok > 0 for t in price.tiers)


@pytest.mark.parametrize("region, model", sorted(UNPRICED))
def test_unpriced_models_are_listed_by_the_provider_unpriced_and_documented(region: str, model: str) -> None:
    """The unpriced list holds only listed models that really have no price, each named in the README's Cost."""
    assert (region, model) in listed()
    assert BUILTIN.lookup(model, region) is None
    cost_section = README.read_text(encoding="utf-8").split("## Cost", 1)[1].split("\n## ", 1)[0]
    assert model in cost_section


def test_beijing_tiers_and_rates_are_its_own() -> None:
    """Beijing's qwen3-vl-flash tiers are the CNY price list's, not Singapore's USD figures."""
    cn = BUILTIN.lookup("qwen3-vl-flash", "cn")
    intl = BUILTIN.lookup("qwen3-vl-flash", "intl")
    assert cn is not None and intl is not None
    assert [(t.max_prompt_tokens, t.input_per_mtok, t.output_per_mtok) for t in cn.tiers] == [
        (32_768, 0.15, 1.5), (131_072, 0.3, 3.0), (262_144, 0.6, 6.0)]
    assert cn.tiers != intl.tiers and cn.batch_discount == 0.5 and cn.cached_input_ratio == 0.2


def test_snapshots_priced_as_family_only_where_the_list_says_so() -> None:
    """A snapshot with its own Beijing price keeps it; one the list prices as its family says so in its note."""
    own = BUILTIN.lookup("qwen-vl-max-2025-04-08", "cn")
    family = BUILTIN.lookup("qwen-vl-max", "cn")
    same = BUILTIN.lookup("qwen-vl-max-2025-08-13", "cn")
    assert own is not None and family is not None and same is not None
    assert (own.tiers[0].input_per_mtok, own.tiers[0].output_per_mtok) == (3.0, 9.0)
    assert (family.tiers[0].input_per_mtok, family.tiers[0].output_per_mtok) == (1.6, 4.0)
    assert same.tiers == family.tiers and "family's price" in same.note
    assert same.batch_discount is None and family.batch_discount == 0.5
