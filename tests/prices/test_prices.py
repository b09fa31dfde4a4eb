"""``store.prices`` on every driver: set, get, list, delete, dated history, tiers, and the
refusals both drivers share."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from llmstore import NotFoundError, Price, PriceTier, Store, ValidationError

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


async def test_set_stores_exact_prices_and_get_reads_them_back(store: Store) -> None:
    price = await store.prices.set(
        "openai",
        "gpt-4o",
        input="2.50",
        output=10,
        cached_input=Decimal("1.25"),
        cache_write="3.75",
        reasoning="12",
        audio_input="40.000000000000000000000000000000000001",
        audio_output="1E+2",
        tiers=[PriceTier(above=128_000, input=Decimal(5)), {"above": 200_000, "output": "20"}],
    )
    assert isinstance(price, Price)
    assert (price.provider, price.model, price.valid_from, price.source) == (
        "openai",
        "gpt-4o",
        None,
        "manual",
    )
    assert price.input == Decimal("2.5") and str(price.input) == "2.5"
    assert price.output == 10 and price.cached_input == Decimal("1.25")
    # 39 digits survive exactly on both drivers (SQLite's NUMERIC would make it a float).
    assert price.audio_input == Decimal("40.000000000000000000000000000000000001")
    assert str(price.audio_output) == "100"
    assert [tier.above for tier in price.tiers] == [128_000, 200_000]
    assert price.tiers[0].input == 5 and price.tiers[0].output is None
    assert price.tiers[1].output == 20
    assert await store.prices.get("openai", "gpt-4o") == price


async def test_setting_the_same_start_again_replaces_that_price(store: Store) -> None:
    first = await store.prices.set("p", "m", input=1, output=2, cached_input="0.5")
    second = await store.prices.set("p", "m", input=3, output=4)
    assert second.id == first.id and second.created_at == first.created_at
    assert (second.input, second.output, second.cached_input) == (Decimal(3), Decimal(4), None)
    assert await store.prices.list() == [second]


async def test_dated_prices_keep_a_history(store: Store) -> None:
    undated = await store.prices.set("p", "m", input=1, output=1)
    january = await store.prices.set("p", "m", input=2, output=2, valid_from=T0)
    february = await store.prices.set("p", "m", input=3, output=3, valid_from=T0 + 31 * DAY)
    assert await store.prices.get("p", "m", at=T0 - dt.timedelta(microseconds=1)) == undated
    assert await store.prices.get("p", "m", at=T0) == january
    assert await store.prices.get("p", "m", at=T0 + 30 * DAY) == january
    assert await store.prices.get("p", "m", at=T0 + 31 * DAY) == february
    assert await store.prices.get("p", "m") == february  # now
    assert await store.prices.list(provider="p", model="m") == [undated, january, february]


async def test_without_an_undated_price_nothing_is_in_force_before_the_first(
    store: Store,
) -> None:
    await store.prices.set("p", "m", input=2, output=2, valid_from=T0)
    with pytest.raises(NotFoundError, match="no price for p/m"):
        await store.prices.get("p", "m", at=T0 - DAY)
    with pytest.raises(NotFoundError):
        await store.prices.get("p", "other")


async def test_list_filters_and_orders_by_provider_model_and_start(store: Store) -> None:
    for provider, model in [("b", "x"), ("a", "y"), ("a", "x"), ("B", "x")]:
        await store.prices.set(provider, model, input=1, output=1)
    listed = await store.prices.list()
    assert [(p.provider, p.model) for p in listed] == [
        ("B", "x"),
        ("a", "x"),
        ("a", "y"),
        ("b", "x"),
    ]
    assert [p.model for p in await store.prices.list(provider="a")] == ["x", "y"]
    assert [p.provider for p in await store.prices.list(model="x")] == ["B", "a", "b"]
    assert len(await store.prices.list(source="manual")) == 4
    assert await store.prices.list(source="genai-prices") == []
    with pytest.raises(ValidationError):
        await store.prices.list(source="elsewhere")


async def test_delete_one_start_or_every_price_of_a_model(store: Store) -> None:
    await store.prices.set("p", "m", input=1, output=1)
    await store.prices.set("p", "m", input=2, output=2, valid_from=T0)
    await store.prices.set("p", "m", input=3, output=3, valid_from=T0 + DAY)
    assert await store.prices.delete("p", "m", valid_from=T0) == 1
    assert [p.input for p in await store.prices.list()] == [1, 3]
    assert await store.prices.delete("p", "m", valid_from=None) == 1
    assert await store.prices.delete("p", "m") == 1
    with pytest.raises(NotFoundError):
        await store.prices.delete("p", "m")
    assert await store.prices.list() == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"input": 0.1}, "exact"),
        ({"input": "abc"}, "not a decimal"),
        ({"input": "-1"}, "at least 0"),
        ({"input": "NaN"}, "finite"),
        ({"input": "Infinity"}, "finite"),
        ({"input": True}, "Decimal"),
        ({"input": None}, "Decimal"),
        ({"output": [1]}, "Decimal"),
        ({"cached_input": 2.5}, "exact"),
        ({"input": "1" * 41}, "digits"),
        ({"tiers": "above"}, "sequence"),
        ({"tiers": [{"input": 1}]}, "above"),
        ({"tiers": [{"above": 10}]}, "sets no price"),
        ({"tiers": [{"above": -1, "input": 1}]}, "above"),
        ({"tiers": [{"above": 1.5, "input": 1}]}, "integer"),
        ({"tiers": [{"above": 10, "input": 1}, {"above": 10, "output": 2}]}, "two tiers"),
        ({"tiers": [{"above": 10, "inptu": 1}]}, "unknown"),
        ({"tiers": [{"above": i, "input": 1} for i in range(11)]}, "at most 10"),
        ({"tiers": [3]}, "PriceTier or a mapping"),
        ({"valid_from": dt.datetime(2025, 1, 1)}, "timezone-aware"),
        ({"valid_from": "2025-01-01"}, "datetime"),
    ],
)
async def test_bad_prices_are_refused_before_anything_is_written(
    store: Store, arguments: dict[str, Any], message: str
) -> None:
    values: dict[str, Any] = {"input": 1, "output": 1, **arguments}
    with pytest.raises(ValidationError, match=message):
        await store.prices.set("p", "m", **values)
    assert await store.prices.list() == []


@pytest.mark.parametrize(("provider", "model"), [("", "m"), ("p", ""), ("p", "x" * 201), (1, "m")])
async def test_bad_names_are_refused(store: Store, provider: Any, model: Any) -> None:
    with pytest.raises(ValidationError):
        await store.prices.set(provider, model, input=1, output=1)
    with pytest.raises(ValidationError):
        await store.prices.get(provider, model)


async def test_prices_join_a_transaction(store: Store) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.prices.set("p", "m", input=1, output=1)
            assert len(await tx.prices.list()) == 1
            raise RuntimeError("undo")
    assert await store.prices.list() == []
