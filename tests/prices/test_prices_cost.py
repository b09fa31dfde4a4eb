"""Costs from the price table on every driver: ``prices.cost``, usage rows written with
``cost=None`` (record, record_many, the writer, settle), tiers and dates, against a
``Decimal`` reference with the rounding stated (once, at the end, half up)."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstore import NotFoundError, Store, UsageRecord, ValidationError
from llmstore._prices.cost import TokenCounts, cost_of
from llmstore._prices.records import Price, PriceTier

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
)
AS_INPUT = ("cached_input", "cache_write", "audio_input")
AS_OUTPUT = ("reasoning", "audio_output")


def _or(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


def reference(
    prices: dict[str, Decimal | None], tiers: list[dict[str, Any]], usage: dict[str, int]
) -> int:
    """The documented formula, in Decimal arithmetic wide enough to be exact."""
    with decimal.localcontext() as context:
        context.prec = 400
        chosen = dict(prices)
        for tier in sorted(tiers, key=lambda t: int(t["above"])):
            if usage.get("prompt_tokens", 0) > tier["above"]:
                own = {k: v for k, v in tier.items() if k != "above" and v is not None}
                chosen = {**prices, **own}
        base_in, base_out = chosen["input"], chosen["output"]
        assert base_in is not None and base_out is not None
        rate = {k: _or(chosen.get(k), base_in) for k in AS_INPUT}
        rate |= {k: _or(chosen.get(k), base_out) for k in AS_OUTPUT}
        u = {k: usage.get(k, 0) for k in COUNTS}
        text_in = (u["prompt_tokens"] - u["cached_tokens"] - u["cache_write_tokens"]) - u[
            "audio_input_tokens"
        ]
        text_out = u["completion_tokens"] - u["reasoning_tokens"] - u["audio_output_tokens"]
        total = (
            text_in * base_in
            + u["cached_tokens"] * rate["cached_input"]
            + u["cache_write_tokens"] * rate["cache_write"]
            + u["audio_input_tokens"] * rate["audio_input"]
            + text_out * base_out
            + u["reasoning_tokens"] * rate["reasoning"]
            + u["audio_output_tokens"] * rate["audio_output"]
        )
        exact = total / Decimal(1_000_000)
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- the formula, against the reference (pure: no database) -----------------------------------

_prices = st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False)
_optional = st.none() | _prices


@st.composite
def _usage(draw: st.DrawFn) -> dict[str, int]:
    big = 10**12
    prompt = draw(st.integers(0, big))
    cached = draw(st.integers(0, prompt))
    write = draw(st.integers(0, prompt - cached))
    audio_in = draw(st.integers(0, prompt - cached - write))
    completion = draw(st.integers(0, big))
    reasoning = draw(st.integers(0, completion))
    audio_out = draw(st.integers(0, completion - reasoning))
    return dict(
        zip(
            COUNTS, (prompt, completion, cached, write, reasoning, audio_in, audio_out), strict=True
        )
    )


def _price(prices: Mapping[str, Decimal | None], tiers: list[dict[str, Any]]) -> Price:
    now = dt.datetime.now(dt.UTC)
    given: dict[str, Any] = dict.fromkeys((*AS_INPUT, *AS_OUTPUT))
    given.update(prices)
    return Price(
        id=uuid.uuid4(),
        provider="p",
        model="m",
        valid_from=None,
        source="manual",
        tiers=tuple(PriceTier(**tier) for tier in sorted(tiers, key=lambda t: t["above"])),
        created_at=now,
        updated_at=now,
        **given,
    )


@settings(max_examples=300, deadline=None)
@given(
    base=st.fixed_dictionaries(
        {"input": _prices, "output": _prices, **dict.fromkeys((*AS_INPUT, *AS_OUTPUT), _optional)}
    ),
    tiers=st.lists(
        st.fixed_dictionaries(
            {"above": st.integers(0, 10**12), "input": _optional, "cached_input": _optional},
            optional={"output": _optional, "reasoning": _optional},
        ),
        max_size=3,
        unique_by=lambda t: t["above"],
    ),
    usage=_usage(),
)
def test_cost_is_the_exact_sum_rounded_once_half_up(
    base: dict[str, Decimal | None], tiers: list[dict[str, Any]], usage: dict[str, int]
) -> None:
    assert cost_of(_price(base, tiers), TokenCounts(**usage)) == reference(base, tiers, usage)


def test_rounding_is_once_at_the_end_and_half_up() -> None:
    price = _price({"input": Decimal("0.5"), "output": Decimal("1.5")}, [])
    # 1 token at 0.5 per million is 0.0000005: rounded alone it is 0; so is each part of
    # a sum, which must still be rounded once at the end.
    assert cost_of(price, TokenCounts(prompt_tokens=1)) == 0
    assert cost_of(price, TokenCounts(prompt_tokens=1_000_000)) == 1  # 0.5: half up
    assert cost_of(price, TokenCounts(prompt_tokens=999_999)) == 0  # 0.4999995
    assert cost_of(price, TokenCounts(prompt_tokens=1_000_000, completion_tokens=1)) == 1
    # Half and half again: 0.5 + 1.5 = 2, not round(0.5) + round(1.5) = 3 (or banker's 2).
    assert cost_of(price, TokenCounts(prompt_tokens=1_000_000, completion_tokens=1_000_000)) == 2
    price = _price({"input": Decimal("2.5"), "output": Decimal(0)}, [])
    assert cost_of(price, TokenCounts(prompt_tokens=1_000_000)) == 3  # 2.5 up, not to even


def test_a_tier_applies_to_every_token_above_its_threshold_only() -> None:
    tiers = [{"above": 200_000, "input": Decimal(6), "output": Decimal(20)}]
    base = {"input": Decimal(3), "output": Decimal(15), "cached_input": Decimal("0.3")}
    price = _price(base, tiers)
    at = {"prompt_tokens": 200_000, "completion_tokens": 100_000, "cached_tokens": 100_000}
    # At the threshold, base prices: 0.3 + 0.03 + 1.5 = 1.83.
    assert cost_of(price, TokenCounts(**at)) == 2
    # Above it, the tier's input and output for every token; cache reads keep the base's
    # own price: 100,001 * 6 + 100,000 * 0.3 + 100,000 * 20 = 2.630006 (per million).
    above = {**at, "prompt_tokens": 200_001}
    assert cost_of(price, TokenCounts(**above)) == 3
    big = {**above, "completion_tokens": 1_000_000}
    assert cost_of(price, TokenCounts(**big)) == 21  # 0.600006 + 0.03 + 20


# --- through the store --------------------------------------------------------------------------


async def test_prices_cost_reads_the_price_in_force(store: Store) -> None:
    await store.prices.set("openai", "gpt-4o", input="2.5", output="10", cached_input="1.25")
    await store.prices.set("openai", "gpt-4o", input="5", output="20", valid_from=T0)
    usage = {"prompt_tokens": 1_000_000, "cached_tokens": 400_000, "completion_tokens": 100_000}
    assert await store.prices.cost("openai", "gpt-4o", usage, at=T0 - dt.timedelta(1)) == 3
    assert await store.prices.cost("openai", "gpt-4o", usage, at=T0) == 7  # 6.0 + 0.4 + ... (5,5)
    record = UsageRecord(created_at=T0 - dt.timedelta(1), **usage)
    assert await store.prices.cost("openai", "gpt-4o", record) == 3  # at its created_at
    with pytest.raises(NotFoundError):
        await store.prices.cost("openai", "gpt-5", usage)


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ({"prompt_tokens": 1, "cached_tokens": 2}, "prompt_tokens includes"),
        ({"completion_tokens": 1, "reasoning_tokens": 2}, "completion_tokens includes"),
        ({"input_tokens": 1}, "unknown count"),
        ({"prompt_tokens": -1}, "from 0"),
        ({"prompt_tokens": 1.0}, "integer"),
        ({"prompt_tokens": 2**63}, "from 0"),
        ("prompt_tokens", "UsageRecord or a mapping"),
    ],
)
async def test_bad_usage_is_refused(store: Store, usage: Any, message: str) -> None:
    await store.prices.set("p", "m", input=1, output=1)
    with pytest.raises(ValidationError, match=message):
        await store.prices.cost("p", "m", usage)


async def test_rows_without_a_cost_take_it_from_the_price_table(store: Store) -> None:
    await store.prices.set("openai", "gpt-4o", input="2.5", output="10")
    await store.prices.set("openai", "gpt-4o", input="5", output="20", valid_from=T0)
    million = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}
    records = [
        UsageRecord(created_at=T0 - dt.timedelta(1), provider="openai", model="gpt-4o", **million),
        UsageRecord(created_at=T0, provider="openai", model="gpt-4o", **million),
        UsageRecord(created_at=T0, provider="openai", model="gpt-4o", cost=7, **million),
        UsageRecord(created_at=T0, provider="openai", model="unpriced", **million),
        UsageRecord(created_at=T0, model="gpt-4o", **million),  # no provider
    ]
    result = await store.usage.record_many(records)
    rows = [await store.usage.get(i) for i in result.ids if i is not None]
    assert [(r.cost, r.cost_source) for r in rows if r is not None] == [
        (13, "price_table"),  # 2.5 + 10 = 12.5, half up
        (25, "price_table"),  # 5 + 20
        (7, "given"),
        (0, "none"),
        (0, "none"),
    ]
    # A later price change rewrites no stored cost.
    await store.prices.set("openai", "gpt-4o", input="100", output="100", valid_from=T0)
    again = await store.usage.get(result.ids[1])  # type: ignore[arg-type]
    assert again is not None and again.cost == 25
    single = await store.usage.record(
        UsageRecord(created_at=T0, provider="openai", model="gpt-4o", **million)
    )
    stored = await store.usage.get(single.ids[0])  # type: ignore[arg-type]
    assert stored is not None and (stored.cost, stored.cost_source) == (200, "price_table")


async def test_the_writer_prices_its_rows(store: Store) -> None:
    await store.prices.set("p", "m", input="1", output="3")
    async with store.usage.writer(max_batch=3, flush_interval=0.01) as writer:
        for _ in range(7):
            await writer.put(UsageRecord(provider="p", model="m", prompt_tokens=10**6))
    rows = await store.usage.list(limit=10)
    assert [(r.cost, r.cost_source) for r in rows] == [(1, "price_table")] * 7


async def test_a_cost_too_large_refuses_the_batch(store: Store) -> None:
    await store.prices.set("p", "m", input="1" + "0" * 30, output="0")
    with pytest.raises(ValidationError, match="more than 2\\*\\*63 - 1"):
        await store.usage.record_many(
            [UsageRecord(provider="p", model="m", prompt_tokens=10**6), UsageRecord(cost=1)]
        )
    assert await store.usage.list() == []
