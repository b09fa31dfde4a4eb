"""Admissions inside ``store.transaction()``: they join the caller's transaction, commit
with it, and a refusal leaves the transaction usable."""

from __future__ import annotations

import datetime as dt

import pytest

from llmstore import BudgetExceededError, ConfigError, Store
from tests.admission.admission_support import Clock, tenant


async def test_admit_and_settle_commit_with_the_transaction(store: Store) -> None:
    t = await tenant(store, balance=1000)
    budget = await store.budgets.create(500, project_id=t.project.id)
    async with store.transaction() as tx:
        admitted = await tx.admissions.admit(t.key.secret, cost=200)
        with pytest.raises(BudgetExceededError):  # refused: the transaction goes on
            await tx.admissions.admit(t.key.secret, cost=301)
        settled = await tx.admissions.settle(admitted.id, 150)
        await tx.api_keys.deposit(t.key.key.id, 10)
    assert settled.charged == 150
    assert (await store.budgets.status(budget.id)).spent == 150
    assert (await store.api_keys.get(t.key.key.id)).balance == 860
    assert (await store.budgets.verify()).ok and (await store.api_keys.verify()).ok


async def test_a_rolled_back_transaction_leaves_nothing_admitted(store: Store) -> None:
    t = await tenant(store, balance=1000)
    budget = await store.budgets.create(500, project_id=t.project.id)
    limit = await store.rate_limits.create(requests=5, project_id=t.project.id)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.admissions.admit(t.key.secret, cost=200)
            raise RuntimeError("the caller changed its mind")
    assert (await store.budgets.status(budget.id)).reserved == 0
    assert (await store.rate_limits.status(limit.id)).requests == 0
    assert (await store.api_keys.get(t.key.key.id)).reserved == 0


async def test_lapsed_holds_are_expired_inside_the_transaction(store: Store, clock: Clock) -> None:
    t = await tenant(store, balance=1000)
    await store.budgets.create(500, project_id=t.project.id)
    stale = await store.admissions.admit(t.key.secret, cost=500, ttl=dt.timedelta(minutes=1))
    clock.move(dt.timedelta(minutes=1))
    async with store.transaction() as tx:
        fresh = await tx.admissions.admit(t.key.secret, cost=500)
        assert (await tx.admissions.get(stale.id)).status == "expired"
        await tx.admissions.release(fresh.id)
    assert (await store.budgets.verify()).ok and (await store.api_keys.verify()).ok


async def test_a_clock_that_fails_or_is_naive_is_a_config_error() -> None:
    def broken() -> dt.datetime:
        raise RuntimeError("no time")

    for clock in (broken, lambda: dt.datetime(2026, 1, 1), lambda: "noon"):
        async with Store.from_url("sqlite:///:memory:", clock=clock) as store:  # type: ignore[arg-type]
            with pytest.raises(ConfigError, match="clock"):
                await store.budgets.create(10, tag="t")
            assert await store.budgets.list() == []
    with pytest.raises(ConfigError, match="callable"):
        Store.from_url("sqlite:///:memory:", clock=5)  # type: ignore[arg-type]
