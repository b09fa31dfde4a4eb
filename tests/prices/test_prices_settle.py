"""``admissions.settle`` without a cost, on every driver: the usage's own cost, or its
price-table cost, charged once; refused, with nothing written, when neither is known."""

from __future__ import annotations

import pytest

from llmstore import NotFoundError, Store, UsageRecord, ValidationError
from tests.admission.admission_support import START, tenant

MILLION = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}


async def test_settle_charges_the_price_table_cost_of_its_usage(store: Store) -> None:
    t = await tenant(store, balance=1_000)
    budget = await store.budgets.create(5_000, project_id=t.project.id)
    await store.prices.set("openai", "gpt-4o", input="2.5", output="10")
    admitted = await store.admissions.admit(t.key.secret, cost=100)
    usage = UsageRecord(created_at=START, provider="openai", model="gpt-4o", **MILLION)
    settled = await store.admissions.settle(admitted.id, usage=usage)
    assert (settled.cost, settled.charged) == (13, 13)  # 12.5, half up
    assert settled.usage_id is not None
    row = await store.usage.get(settled.usage_id)
    assert row is not None and (row.cost, row.cost_source) == (13, "price_table")
    assert (await store.api_keys.get(t.key.key.id)).balance == 987
    assert (await store.budgets.status(budget.id)).spent == 13
    # A retry is the same settlement, even after the price changed.
    await store.prices.set("openai", "gpt-4o", input="100", output="100")
    assert await store.admissions.settle(admitted.id, usage=usage) == settled
    assert (await store.api_keys.get(t.key.key.id)).balance == 987


async def test_settle_charges_the_usage_s_own_cost(store: Store) -> None:
    t = await tenant(store, balance=1_000)
    admitted = await store.admissions.admit(t.key.secret, cost=100)
    usage = UsageRecord(created_at=START, provider="p", model="unpriced", cost=42, **MILLION)
    settled = await store.admissions.settle(admitted.id, usage=usage)
    assert settled.cost == 42
    row = await store.usage.get(settled.usage_id)  # type: ignore[arg-type]
    assert row is not None and (row.cost, row.cost_source) == (42, "given")


async def test_a_usage_row_without_a_cost_records_the_cost_charged(store: Store) -> None:
    t = await tenant(store, balance=1_000)
    await store.prices.set("openai", "gpt-4o", input="2.5", output="10")
    admitted = await store.admissions.admit(t.key.secret, cost=100)
    usage = UsageRecord(created_at=START, provider="openai", model="gpt-4o", **MILLION)
    settled = await store.admissions.settle(admitted.id, 30, usage=usage)
    row = await store.usage.get(settled.usage_id)  # type: ignore[arg-type]
    assert row is not None and (settled.cost, row.cost, row.cost_source) == (30, 30, "given")


async def test_without_a_cost_or_a_price_nothing_is_settled(store: Store) -> None:
    t = await tenant(store, balance=1_000)
    admitted = await store.admissions.admit(t.key.secret, cost=100)
    with pytest.raises(ValidationError, match="needs a cost"):
        await store.admissions.settle(admitted.id)
    usage = UsageRecord(created_at=START, provider="p", model="unpriced", **MILLION)
    with pytest.raises(NotFoundError, match="no price for p/unpriced"):
        await store.admissions.settle(admitted.id, usage=usage)
    assert (await store.admissions.get(admitted.id)).status == "active"
    assert await store.usage.list() == []
    key = await store.api_keys.get(t.key.key.id)
    assert (key.balance, key.reserved) == (1_000, 100)
    # Once priced, the same call settles.
    await store.prices.set("p", "unpriced", input="1", output="1")
    assert (await store.admissions.settle(admitted.id, usage=usage)).cost == 2
