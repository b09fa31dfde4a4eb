"""``store.prices.import_genai_prices`` on every driver: the package's bundled prices,
converted exactly, their costs equal to the package's own, hand-set prices kept, and a
second import that changes nothing."""

from __future__ import annotations

import datetime as dt
import random
import sys
from decimal import ROUND_HALF_UP, Decimal

import pytest
from genai_prices import Usage, calc_price
from genai_prices.data import providers

from llmstore import ConfigError, PriceImport, Store, ValidationError
from llmstore._prices.genai import PRICE_KEYS

OUR_KEYS = set(PRICE_KEYS.values())
MICRO = 1_000_000


def _plain_models() -> list[tuple[str, str]]:
    """(provider, model id) of the package's models priced only by keys the table holds,
    with one price (no history, no time of day)."""
    found = []
    for provider in providers:
        for model in provider.models:
            price = model.prices
            if isinstance(price, list):
                continue
            keys = {k for k, v in vars(price).items() if v is not None and not k.startswith("_")}
            if keys and keys <= OUR_KEYS and {"input_mtok", "output_mtok"} & keys:
                found.append((provider.id, model.id))
    return found


async def test_imported_prices_cost_what_the_package_says(store: Store) -> None:
    result = await store.prices.import_genai_prices(MICRO)
    assert isinstance(result, PriceImport)
    assert result.written > 1000 and result.unchanged == result.removed == result.kept_manual == 0
    stored = {(p.provider, p.model) for p in await store.prices.list(source="genai-prices")}
    plain = _plain_models()
    rng = random.Random(17)
    checked = 0
    for provider, model in rng.sample(plain, 60):
        if (provider, model) not in stored:  # an earlier model of the provider took the name
            continue
        for prompt, cached, written, completion in [
            (1_000_000, 0, 0, 1_000_000),
            (250_000, 100_000, 50_000, 3_333),
            (1_234_567, 234_567, 0, 7),
        ]:
            usage = {
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "cache_write_tokens": written,
                "completion_tokens": completion,
            }
            ours = await store.prices.cost(provider, model, usage)
            try:
                theirs = calc_price(
                    Usage(
                        input_tokens=prompt,
                        cache_read_tokens=cached,
                        cache_write_tokens=written,
                        output_tokens=completion,
                    ),
                    model,
                    provider_id=provider,
                ).total_price
            except LookupError:  # a model whose own match rule does not list its id
                break
            expected = int((theirs * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))
            assert ours == expected, (provider, model, usage)
            checked += 1
    assert checked >= 100


async def test_a_second_import_changes_nothing(store: Store) -> None:
    first = await store.prices.import_genai_prices("100")
    before = await store.prices.list()
    second = await store.prices.import_genai_prices(100)
    assert (second.written, second.removed) == (0, 0)
    assert second.unchanged == first.written
    assert await store.prices.list() == before
    # At another rate every price is rewritten, exactly: a cent is a hundredth of a dollar.
    third = await store.prices.import_genai_prices(Decimal("0.01"))
    assert third.written == first.written
    after = {(p.provider, p.model, p.valid_from): p for p in await store.prices.list()}
    for price in before:
        again = after[(price.provider, price.model, price.valid_from)]
        assert again.input * 10_000 == price.input and again.output * 10_000 == price.output


async def test_dated_prices_keep_the_package_history(store: Store) -> None:
    await store.prices.import_genai_prices(MICRO)
    dated = [p for p in await store.prices.list() if p.valid_from is not None]
    assert dated, "the package has dated prices"
    price = dated[0]
    assert price.valid_from is not None and price.valid_from.time() == dt.time(0)
    undated = await store.prices.get(
        price.provider, price.model, at=price.valid_from - dt.timedelta(1)
    )
    assert undated.valid_from is None or undated.valid_from < price.valid_from
    assert await store.prices.get(price.provider, price.model, at=price.valid_from) == price


async def test_prices_set_by_hand_are_never_overwritten(store: Store) -> None:
    mine = await store.prices.set("openai", "gpt-4o", input="1", output="2")
    result = await store.prices.import_genai_prices(MICRO)
    assert result.kept_manual == 1
    assert await store.prices.list(provider="openai", model="gpt-4o") == [mine]
    # A price set by hand after an import: the next import removes its own rows of that
    # model, so the hand-set price alone is in force.
    imported = await store.prices.list(provider="anthropic")
    model = imported[0].model
    dated = await store.prices.set(
        "anthropic", model, input="7", output="7", valid_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    )
    again = await store.prices.import_genai_prices(MICRO)
    assert again.kept_manual == 2 and again.removed >= 1
    assert await store.prices.list(provider="anthropic", model=model) == [dated]


@pytest.mark.parametrize("rate", [0, -1, 1.5, "x", None])
async def test_a_bad_rate_is_refused(store: Store, rate: object) -> None:
    with pytest.raises(ValidationError, match="units_per_usd"):
        await store.prices.import_genai_prices(rate)  # type: ignore[arg-type]
    assert await store.prices.list() == []


async def test_without_the_package_the_import_says_what_to_install(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "genai_prices.data", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"llmstore\[prices\]"):
        await store.prices.import_genai_prices(MICRO)
