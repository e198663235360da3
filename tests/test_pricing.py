"""Price table loading, tier choice, per-request cost and the vectorised cost columns."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qwenvl_batch.errors import ConfigError
from qwenvl_batch.pricing import (
    ModelPrice,
    PriceTable,
    add_cost_columns,
    row_cost,
    unpriced_models,
)

BUILTIN = PriceTable.builtin()

VLLM_FILE = """
[models."Qwen/Qwen2.5-VL-7B-Instruct".any]
currency = "USD"
input_per_mtok = 0
output_per_mtok = 0
source = "self-hosted vLLM"
as_of = 2026-11-01
"""


def write(tmp_path: Path, text: str, name: str = "prices.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def plus() -> ModelPrice:
    price = BUILTIN.lookup("qwen3-vl-plus", "intl")
    assert price is not None
    return price


# ---------------------------------------------------------------------------------------------- the table


def test_builtin_entries_carry_source_and_date() -> None:
    """Every shipped entry names an https source and an as_of date, in its region's currency (cn: CNY)."""
    checked = 0
    for model in BUILTIN.models():
        for region in ("intl", "us", "cn", "any"):
            price = BUILTIN.lookup(model, region)
            if price is not None and price.region == region:
                checked += 1
                assert price.source.startswith("https://")
                assert price.as_of[:4].isdigit()
                assert price.currency == ("CNY" if region == "cn" else "USD")
                assert region != "any"  # the shipped prices are per region
    assert checked == 92


def test_builtin_figures_match_the_reference() -> None:
    """Spot checks of the shipped rates against the reference's pricing table (USD per 1M tokens)."""
    flash = BUILTIN.lookup("qwen3-vl-flash", "intl")
    assert flash is not None
    assert [(t.input_per_mtok, t.output_per_mtok) for t in flash.tiers] == [(0.05, 0.40), (0.075, 0.60), (0.12, 0.96)]
    ocr = BUILTIN.lookup("qwen-vl-ocr", "intl")
    assert ocr is not None and (ocr.tiers[0].input_per_mtok, ocr.tiers[0].output_per_mtok) == (0.07, 0.16)
    thinking = BUILTIN.lookup("qwen3-vl-235b-a22b-thinking", "intl")
    assert thinking is not None and thinking.tiers[0].output_per_mtok == 4.00


@pytest.mark.parametrize("name, canonical", [("QWEN3-VL-FLASH", "qwen3-vl-flash"), ("Qwen-VL-Max", "qwen-vl-max")])
def test_other_casings_share_the_entry(name: str, canonical: str) -> None:
    """Another casing of a name resolves to that name's entry (the provider ignores case)."""
    assert BUILTIN.lookup(name, "intl") == BUILTIN.lookup(canonical, "intl")
    assert BUILTIN.lookup(name, "intl") is not None


@pytest.mark.parametrize(
    "snapshot, family, region",
    [
        ("qwen-vl-ocr-2025-11-20", "qwen-vl-ocr", "intl"),
        ("qwen-vl-max-latest", "qwen-vl-max", "intl"),
        ("qwen3-vl-plus-2025-12-19", "qwen3-vl-plus", "intl"),
        ("qwen3-vl-flash-2025-10-15", "qwen3-vl-flash", "us"),
        ("qwen-vl-ocr-latest", "qwen-vl-ocr", "cn"),
    ],
)
def test_snapshots_listed_at_the_family_price_have_its_rates(snapshot: str, family: str, region: str) -> None:
    """A dated snapshot or -latest name that the price list prices as its family has the family's rates."""
    own, base = BUILTIN.lookup(snapshot, region), BUILTIN.lookup(family, region)
    assert own is not None and base is not None and own.model == snapshot
    assert (own.tiers, own.currency) == (base.tiers, base.currency)


def test_lookup_unknown_model_and_region() -> None:
    """An unknown model, or a name a region does not list, gives None rather than another region's price."""
    assert BUILTIN.lookup("gpt-4o", "intl") is None
    assert BUILTIN.lookup("qwen-vl-ocr-latest", "intl") is None  # listed for Beijing only
    assert BUILTIN.lookup("qwen3-vl-flash-us", "intl") is None


def test_lookup_without_region_uses_intl() -> None:
    """With no region (custom endpoint), the international price applies."""
    price = BUILTIN.lookup("qwen3-vl-plus", None)
    assert price is not None and price.region == "intl"


def test_us_prices_differ_from_intl() -> None:
    """The us region has its own (Global deployment) figures."""
    price = BUILTIN.lookup("qwen3-vl-plus", "us")
    assert price is not None and price.tiers[0].input_per_mtok == 0.143


# ---------------------------------------------------------------------------------------------- tiers


@pytest.mark.parametrize(
    "prompt_tokens, input_rate",
    [(0, 0.20), (32_000, 0.20), (32_768, 0.20), (32_769, 0.30), (131_072, 0.30), (131_073, 0.60), (262_144, 0.60)],
)
def test_tier_bounds_are_inclusive_with_k_1024(prompt_tokens: int, input_rate: float) -> None:
    """Tiers cover previous bound < prompt <= bound, with 32K = 32,768 and 128K = 131,072."""
    assert plus().tier_for(prompt_tokens).input_per_mtok == input_rate


def test_prompt_above_last_tier_has_no_price() -> None:
    """A prompt above the last bound (262,144 for qwen3-vl-plus) raises instead of borrowing a rate."""
    us = BUILTIN.lookup("qwen3-vl-plus", "us")
    assert us is not None and us.tier_for(262_144).input_per_mtok == 0.43
    with pytest.raises(ValueError, match="no price for prompts over 262,144"):
        us.tier_for(262_145)


def test_user_tier_bound_32000(tmp_path: Path) -> None:
    """A user's 32,000 bound puts 32,000 in the first tier and 32,001 in the second."""
    path = write(
        tmp_path,
        """
[models."m".intl]
currency = "USD"
source = "contract"
as_of = "2026-10"
tiers = [
  { max_prompt_tokens = 32000, input_per_mtok = 1, output_per_mtok = 2 },
  { input_per_mtok = 3, output_per_mtok = 4 },
]
""",
    )
    price = PriceTable.from_file(path).lookup("m", "intl")
    assert price is not None
    assert price.tier_for(32_000).input_per_mtok == 1
    assert price.tier_for(32_001).input_per_mtok == 3
    assert price.tier_for(10**9).input_per_mtok == 3


# ---------------------------------------------------------------------------------------------- row_cost


def test_row_cost_first_tier() -> None:
    """1,000 prompt + 500 completion tokens on qwen3-vl-plus cost 0.0002 + 0.0008 USD."""
    cost = row_cost(plus(), prompt_tokens=1_000, completion_tokens=500)
    assert cost.input_cost == pytest.approx(0.0002)
    assert cost.output_cost == pytest.approx(0.0008)
    assert cost.cost == pytest.approx(0.0010)
    assert cost.currency == "USD"


def test_row_cost_whole_request_at_its_tier() -> None:
    """A 40,000-token prompt bills input and output at the 32K-128K rates."""
    cost = row_cost(plus(), prompt_tokens=40_000, completion_tokens=1_000)
    assert cost.input_cost == pytest.approx(0.30 * 40_000 / 1e6)
    assert cost.output_cost == pytest.approx(2.40 * 1_000 / 1e6)


def test_row_cost_cached_tokens_at_ratio() -> None:
    """Cached prompt tokens cost 20% of the input rate where the model has an implicit cache."""
    cost = row_cost(plus(), prompt_tokens=10_000, completion_tokens=0, cached_tokens=4_000)
    assert cost.input_cost == pytest.approx(0.20 * (6_000 + 0.2 * 4_000) / 1e6)


def test_row_cost_cached_tokens_full_rate_without_ratio() -> None:
    """A model without a cache discount bills cached tokens at the full input rate."""
    ocr = BUILTIN.lookup("qwen-vl-ocr", "intl")
    assert ocr is not None and ocr.cached_input_ratio is None
    cost = row_cost(ocr, prompt_tokens=10_000, completion_tokens=0, cached_tokens=4_000)
    assert cost.input_cost == pytest.approx(0.07 * 10_000 / 1e6)


def test_row_cost_batch(tmp_path: Path) -> None:
    """Batch halves the price and ignores the cache discount; a model without Batch raises."""
    path = write(
        tmp_path,
        """
[models."m".cn]
currency = "CNY"
source = "s"
as_of = "2026-10-01"
cached_input_ratio = 0.2
batch_discount = 0.5
input_per_mtok = 1.0
output_per_mtok = 10.0
""",
    )
    price = PriceTable.from_file(path).lookup("m", "cn")
    assert price is not None
    cost = row_cost(price, prompt_tokens=1_000_000, completion_tokens=100_000, cached_tokens=500_000, batch=True)
    assert cost.input_cost == pytest.approx(0.5)
    assert cost.output_cost == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no Batch API price"):
        row_cost(plus(), prompt_tokens=1, completion_tokens=1, batch=True)


def test_row_cost_rejects_negative_and_caps_cached() -> None:
    """Negative counts are rejected; more cached than prompt tokens is billed as an all-cached prompt."""
    with pytest.raises(ValueError):
        row_cost(plus(), prompt_tokens=10, completion_tokens=-1)
    capped = row_cost(plus(), prompt_tokens=1_000, completion_tokens=0, cached_tokens=1_500)
    assert capped.input_cost == pytest.approx(0.20 * 0.2 * 1_000 / 1e6)


# ---------------------------------------------------------------------------------------------- user files


def test_user_file_prices_vllm_model_at_zero(tmp_path: Path) -> None:
    """A self-hosted model priced at 0 in a user's file costs 0 in every region and is not unpriced."""
    table = BUILTIN.merged(PriceTable.from_file(write(tmp_path, VLLM_FILE)))
    df = pd.DataFrame(
        {"model": ["Qwen/Qwen2.5-VL-7B-Instruct"], "prompt_tokens": [1_000], "completion_tokens": [100]}
    )
    out = add_cost_columns(df, table, None)
    assert out["cost"].iloc[0] == 0
    assert out["currency"].iloc[0] == "USD"
    assert unpriced_models(df, table, "intl") == []
    assert unpriced_models(df, BUILTIN, "intl") == ["Qwen/Qwen2.5-VL-7B-Instruct"]


def test_user_file_overrides_one_region(tmp_path: Path) -> None:
    """A user's entry replaces the built-in one for its region only; other regions keep the built-in figures."""
    path = write(
        tmp_path,
        """
[models."qwen3-vl-plus".intl]
currency = "USD"
input_per_mtok = 0.1
output_per_mtok = 1.0
source = "negotiated"
as_of = "2026-10"
""",
    )
    table = BUILTIN.merged(PriceTable.from_file(path))
    intl = table.lookup("qwen3-vl-plus", "intl")
    assert intl is not None and intl.source == "negotiated" and intl.tiers[0].input_per_mtok == 0.1
    assert table.lookup("qwen3-vl-plus", "us") == BUILTIN.lookup("qwen3-vl-plus", "us")
    assert table.lookup("qwen3-vl-plus", "cn") == BUILTIN.lookup("qwen3-vl-plus", "cn")
    assert table.lookup("qwen3-vl-plus-2025-12-19", "intl") == BUILTIN.lookup("qwen3-vl-plus-2025-12-19", "intl")


def test_user_alias_overrides_builtin_alias(tmp_path: Path) -> None:
    """A user's alias wins over a built-in alias of the same name."""
    path = write(
        tmp_path,
        """
[models."my-ocr"]
aliases = ["qwen-vl-ocr-latest"]
[models."my-ocr".intl]
currency = "USD"
input_per_mtok = 9
output_per_mtok = 9
source = "s"
as_of = "2026-10"
""",
    )
    price = BUILTIN.merged(PriceTable.from_file(path)).lookup("qwen-vl-ocr-latest", "intl")
    assert price is not None and price.model == "my-ocr"


ENTRY = 'currency = "USD"\nsource = "s"\nas_of = "2026-10"\n'


@pytest.mark.parametrize(
    "text, key",
    [
        ('[models."m".intl\n', "not valid TOML"),
        ('[models."m".intl]\n' + ENTRY + "input_per_mtok = 1\nouput_per_mtok = 2\n", 'models."m".intl.ouput_per_mtok'),
        ('[models."m".intl]\n' + ENTRY + "input_per_mtok = 1\n", 'models."m".intl.output_per_mtok'),
        ('[models."m".eu]\n' + ENTRY + "input_per_mtok = 1\noutput_per_mtok = 2\n", 'models."m".eu'),
        ('[models."m".intl]\n' + ENTRY + "input_per_mtok = -1\noutput_per_mtok = 2\n", 'models."m".intl.input_per_mtok'),
        ('[models."m".intl]\n' + ENTRY + 'input_per_mtok = "1"\noutput_per_mtok = 2\n', 'models."m".intl.input_per_mtok'),
        (
            '[models."m".intl]\ncurrency = "usd"\nsource = "s"\nas_of = "2026-10"\ninput_per_mtok = 1\noutput_per_mtok = 2\n',
            'models."m".intl.currency',
        ),
        (
            '[models."m".intl]\ncurrency = "USD"\nsource = "s"\nas_of = "last week"\ninput_per_mtok = 1\noutput_per_mtok = 2\n',
            'models."m".intl.as_of',
        ),
        ('[models."m".intl]\nsource = "s"\nas_of = "2026-10"\ninput_per_mtok = 1\noutput_per_mtok = 2\n', 'models."m".intl.currency'),
        (
            '[models."m".intl]\n' + ENTRY + "tiers = [{max_prompt_tokens = 10, input_per_mtok = 1, output_per_mtok = 1},"
            " {max_prompt_tokens = 10, input_per_mtok = 2, output_per_mtok = 2}]\n",
            'models."m".intl.tiers',
        ),
        (
            '[models."m".intl]\n' + ENTRY + "tiers = [{input_per_mtok = 1, output_per_mtok = 1},"
            " {max_prompt_tokens = 10, input_per_mtok = 2, output_per_mtok = 2}]\n",
            'models."m".intl.tiers[0].max_prompt_tokens',
        ),
        (
            '[models."m".intl]\n' + ENTRY + "input_per_mtok = 1\noutput_per_mtok = 1\n"
            "tiers = [{input_per_mtok = 1, output_per_mtok = 1}]\n",
            'models."m".intl.tiers',
        ),
        ('[models."m".intl]\n' + ENTRY + "cached_input_ratio = 2\ninput_per_mtok = 1\noutput_per_mtok = 1\n", "cached_input_ratio"),
        (
            '[models."m"]\naliases = ["n"]\n[models."m".intl]\n' + ENTRY + "input_per_mtok = 1\noutput_per_mtok = 1\n"
            '[models."n".intl]\n' + ENTRY + "input_per_mtok = 1\noutput_per_mtok = 1\n",
            'models."m".aliases',
        ),
        ('[models."m"]\naliases = ["x"]\n', 'models."m"'),
        ("price = 1\n", "price"),
        ("", "models"),
    ],
)
def test_malformed_price_file_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    """Each kind of mistake in a price file raises ConfigError naming the file and the offending key."""
    path = write(tmp_path, text, "my-prices.toml")
    with pytest.raises(ConfigError) as info:
        PriceTable.from_file(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert key in message


def test_missing_price_file_names_the_file(tmp_path: Path) -> None:
    """A price file that does not exist raises ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        PriceTable.from_file(path)


# ---------------------------------------------------------------------------------------------- columns


def output_frame() -> pd.DataFrame:
    """Rows as the store hands them over: nullable token columns, error rows without usage."""
    return pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e", "f"],
            "status": ["ok", "ok", "error", "ok", "error", "ok"],
            "model": ["qwen3-vl-plus", "qwen3-vl-plus", None, "mystery-model", "qwen3-vl-plus", "qwen3-vl-plus"],
            "prompt_tokens": pd.array([1_000, 40_000, None, 500, None, 10_000], dtype="Int64"),
            "completion_tokens": pd.array([500, 1_000, None, 50, None, 0], dtype="Int64"),
            "cached_tokens": pd.array([0, None, None, 0, None, 4_000], dtype="Int64"),
        }
    )


def test_add_cost_columns_matches_row_cost_and_leaves_nulls() -> None:
    """Costs per row equal row_cost; error rows and unknown models get null cost and currency."""
    df = output_frame()
    out = add_cost_columns(df, BUILTIN, "intl")
    for i in (0, 1, 5):
        row = df.iloc[i]
        expected = row_cost(
            plus(),
            prompt_tokens=int(row["prompt_tokens"]),
            completion_tokens=int(row["completion_tokens"]),
            cached_tokens=0 if pd.isna(row["cached_tokens"]) else int(row["cached_tokens"]),
        )
        assert out["input_cost"].iloc[i] == pytest.approx(expected.input_cost)
        assert out["output_cost"].iloc[i] == pytest.approx(expected.output_cost)
        assert out["cost"].iloc[i] == pytest.approx(expected.cost)
        assert out["currency"].iloc[i] == "USD"
    for i in (2, 3, 4):
        assert all(pd.isna(out[c].iloc[i]) for c in ("input_cost", "output_cost", "cost", "currency"))
    assert "cost" not in df.columns  # the input frame is left alone


def test_add_cost_columns_overwrites_and_handles_missing_columns() -> None:
    """Existing cost columns are recomputed; a frame without usage columns gets all-null costs."""
    df = output_frame().assign(cost=99.0, currency="EUR")
    out = add_cost_columns(df, BUILTIN, "intl")
    assert out["cost"].iloc[0] == pytest.approx(0.001)
    assert pd.isna(out["cost"].iloc[2])
    bare = add_cost_columns(pd.DataFrame({"id": [1, 2]}), BUILTIN, "intl")
    assert bare["cost"].isna().all() and bare["currency"].isna().all()
    assert len(add_cost_columns(output_frame().iloc[0:0], BUILTIN, "intl")) == 0


def test_add_cost_columns_above_last_tier_is_null() -> None:
    """A prompt above the last priced tier (262,144) stays unpriced while smaller ones get their tier's rates."""
    df = output_frame()
    df.loc[1, "prompt_tokens"] = 300_000
    out = add_cost_columns(df, BUILTIN, "us")
    assert out["cost"].iloc[0] == pytest.approx(0.143 * 1_000 / 1e6 + 1.434 * 500 / 1e6)
    assert pd.isna(out["cost"].iloc[1])


def test_add_cost_columns_in_cny_for_beijing() -> None:
    """With region cn the same usage is costed at Beijing's CNY rates and labelled CNY."""
    out = add_cost_columns(output_frame(), BUILTIN, "cn")
    assert out["cost"].iloc[0] == pytest.approx(1.0 * 1_000 / 1e6 + 10.0 * 500 / 1e6)
    assert out["currency"].iloc[0] == "CNY"


def test_unpriced_models_lists_unknown_only() -> None:
    """Only models without any price in the region are listed, sorted."""
    df = output_frame()
    assert unpriced_models(df, BUILTIN, "intl") == ["mystery-model"]
    assert unpriced_models(df, BUILTIN, "cn") == ["mystery-model"]
    assert unpriced_models(df.assign(model="qwen2-vl-7b-instruct"), BUILTIN, "cn") == ["qwen2-vl-7b-instruct"]


def test_add_cost_columns_million_rows_fast() -> None:
    """10^6 rows across tiers and models are priced in well under a few seconds, with the tier-exact sum."""
    n = 1_000_000
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 200_000, n)
    completion = rng.integers(1, 2_000, n)
    df = pd.DataFrame(
        {
            "model": rng.choice(np.array(["qwen3-vl-plus", "qwen3-vl-flash", "unknown"], dtype=object), n),
            "prompt_tokens": pd.array(prompt, dtype="Int64"),
            "completion_tokens": pd.array(completion, dtype="Int64"),
        }
    )
    start = time.perf_counter()
    out = add_cost_columns(df, BUILTIN, "intl")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    mask = (df["model"] == "qwen3-vl-plus").to_numpy() & (prompt > 131_072)
    expected = (0.60 * prompt[mask] + 4.80 * completion[mask]).sum() / 1e6
    assert out["cost"].to_numpy(dtype=float, na_value=np.nan)[mask].sum() == pytest.approx(expected)
    assert out["cost"].isna().sum() == (df["model"] == "unknown").sum()
