"""API keys after issue: deactivate, activate, update, delete; what an inactive key still
does; settle(0) and a repeated settle, on every driver, in a single process."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from llmstore import (
    ApiKeyRejectedError,
    ConflictError,
    NotFoundError,
    Store,
    ValidationError,
)
from tests.billing.api_keys_support import MINT, TOKEN, _everything, _key, _ledger
from tests.helpers import new_project, now, refused

# --- deactivate and activate -----------------------------------------------------------


async def test_deactivate_keeps_the_first_date_and_activate_clears_it(store: Store) -> None:
    issued = await store.api_keys.create(10)
    before = now()
    first = await store.api_keys.deactivate(issued.key.id)
    assert first.is_active is False
    assert first.deactivated_at is not None
    assert before - dt.timedelta(seconds=5) <= first.deactivated_at <= now()
    again = await store.api_keys.deactivate(str(issued.key.id))
    assert again.deactivated_at == first.deactivated_at
    assert await store.api_keys.get(issued.key.id) == again
    with pytest.raises(ApiKeyRejectedError) as rejected:
        await store.api_keys.authenticate(issued.secret)
    assert rejected.value.reason == "inactive"
    active = await store.api_keys.activate(issued.key.id)
    assert (active.is_active, active.deactivated_at) == (True, None)
    assert (await store.api_keys.authenticate(issued.secret)).id == issued.key.id
    # Everything else about the key is as it was.
    assert active.model_dump(exclude={"is_active", "deactivated_at"}) == issued.key.model_dump(
        exclude={"is_active", "deactivated_at"}
    )


async def test_lifecycle_calls_refuse_a_missing_key_and_a_bad_id(store: Store) -> None:
    missing = uuid.uuid4()
    api = store.api_keys
    for call in [
        lambda: api.deactivate(missing),
        lambda: api.activate(missing),
        lambda: api.update(missing, metadata={"a": 1}),
        lambda: api.delete(missing),
    ]:
        await refused(NotFoundError, call, "missing")
    for call in [
        lambda: api.deactivate("nope"),
        lambda: api.activate(5),  # type: ignore[arg-type]
        lambda: api.update("nope", expires_at=None),
        lambda: api.delete(None),  # type: ignore[arg-type]
    ]:
        await refused(ValidationError, call, "bad id")


# --- what an inactive key still does ----------------------------------------------------


async def test_an_inactive_key_refuses_new_spending(store: Store) -> None:
    key = await _key(store, 100)
    other = await _key(store, 100)
    failed = await store.api_keys.withdraw(key.id, 5, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(failed.id, "mint offline")
    await store.api_keys.deactivate(key.id)
    before = await _everything(store)
    api = store.api_keys
    for call in [
        lambda: api.charge(key.id, 1),
        lambda: api.charge(key.id, 1, idempotency_key="c"),
        lambda: api.charge(key.id, 1, actor="alice"),
        lambda: api.reserve(key.id, 1),
        lambda: api.reserve(key.id, 1, actor="alice"),
        lambda: api.transfer(key.id, other.id, 1),
        lambda: api.withdraw(key.id, 1, TOKEN, MINT),
        lambda: api.retry_withdrawal(failed.id),
    ]:
        error = await refused(ApiKeyRejectedError, call, "inactive")
        assert error.reason == "inactive"
    # Even for more than it has: the key's state is the first reason.
    error = await refused(ApiKeyRejectedError, lambda: api.charge(key.id, 10_000), "inactive")
    assert error.reason == "inactive"
    assert await _everything(store) == before
    async with store.transaction() as tx:
        with pytest.raises(ApiKeyRejectedError):
            await tx.api_keys.charge(key.id, 1)
    assert await _everything(store) == before


async def test_an_inactive_key_takes_money_in_and_finishes_what_it_started(store: Store) -> None:
    key = await _key(store, 100)
    other = await _key(store, 100)
    settled_hold = await store.api_keys.reserve(key.id, 30)
    released_hold = await store.api_keys.reserve(key.id, 20)
    pending = await store.api_keys.withdraw(key.id, 10, TOKEN, MINT)
    refunded = await store.api_keys.withdraw(key.id, 5, TOKEN, MINT)
    await store.api_keys.deactivate(key.id)

    deposit = await store.api_keys.deposit(key.id, 50)
    assert deposit.balance_after == 135
    debit, credit = await store.api_keys.transfer(other.id, key.id, 15)
    assert (debit.api_key_id, credit.api_key_id, credit.balance_after) == (other.id, key.id, 150)
    settlement = await store.api_keys.settle(settled_hold.id, 25)
    assert (settlement.amount, settlement.shortfall) == (-25, 0)
    released = await store.api_keys.release(released_hold.id)
    assert released.status == "released"
    assert (await store.api_keys.complete_withdrawal(pending.id)).status == "completed"
    assert (await store.api_keys.fail_withdrawal(refunded.id, "mint offline")).status == "failed"

    state = await store.api_keys.get(key.id)
    assert (state.is_active, state.balance, state.reserved) == (False, 130, 0)
    assert (await store.api_keys.verify()).ok
    # Active again, it spends.
    await store.api_keys.activate(key.id)
    assert (await store.api_keys.charge(key.id, 30)).balance_after == 100


# --- update ------------------------------------------------------------------------------


async def test_update_changes_expiry_and_metadata_and_none_clears(store: Store) -> None:
    later = now() + dt.timedelta(days=3)
    key = await _key(store, 5, expires_at=later, metadata={"owner": "a"})
    soon = now() + dt.timedelta(days=1)
    updated = await store.api_keys.update(key.id, expires_at=soon)
    assert (updated.expires_at, updated.metadata) == (soon, {"owner": "a"})
    updated = await store.api_keys.update(key.id, metadata={"owner": "b", "tags": ("x",)})
    assert (updated.expires_at, updated.metadata) == (soon, {"owner": "b", "tags": ["x"]})
    cleared = await store.api_keys.update(key.id, expires_at=None, metadata=None)
    assert (cleared.expires_at, cleared.metadata) == (None, None)
    assert await store.api_keys.get(key.id) == cleared
    assert cleared.balance == 5


async def test_update_of_the_expiry_decides_authentication(store: Store) -> None:
    issued = await store.api_keys.create(5)
    await store.api_keys.update(issued.key.id, expires_at=now() - dt.timedelta(seconds=1))
    with pytest.raises(ApiKeyRejectedError) as rejected:
        await store.api_keys.authenticate(issued.secret)
    assert rejected.value.reason == "expired"
    await store.api_keys.update(issued.key.id, expires_at=None)
    assert (await store.api_keys.authenticate(issued.secret)).expires_at is None


async def test_update_refuses_nothing_and_bad_values(store: Store) -> None:
    key = await _key(store)
    before = await _everything(store)
    api = store.api_keys
    for call in [
        lambda: api.update(key.id),
        lambda: api.update(key.id, actor="alice"),
        lambda: api.update(key.id, expires_at=dt.datetime(2030, 1, 1)),  # naive
        lambda: api.update(key.id, expires_at="2030-01-01"),  # type: ignore[arg-type]
        lambda: api.update(key.id, metadata=["not", "a", "mapping"]),  # type: ignore[arg-type]
        lambda: api.update(key.id, metadata={1: "x"}),  # type: ignore[dict-item]
        lambda: api.update(key.id, metadata={"a": 1}, actor=""),
    ]:
        await refused(ValidationError, call, "bad update")
    assert await _everything(store) == before


# --- delete ------------------------------------------------------------------------------


async def test_delete_removes_an_empty_key_and_its_history(store: Store) -> None:
    project = await new_project(store)
    issued = await store.api_keys.create(40, project_id=project.id)
    key = issued.key
    hold = await store.api_keys.reserve(key.id, 10)
    await store.api_keys.settle(hold.id, 10)
    paid = await store.api_keys.withdraw(key.id, 30, TOKEN, MINT)
    await store.api_keys.complete_withdrawal(paid.id)
    await store.api_keys.delete(key.id)
    with pytest.raises(NotFoundError):
        await store.api_keys.get(key.id)
    with pytest.raises(NotFoundError):
        await store.api_keys.ledger(key.id)
    with pytest.raises(NotFoundError):
        await store.api_keys.get_reservation(hold.id)
    with pytest.raises(ApiKeyRejectedError) as rejected:
        await store.api_keys.authenticate(issued.secret)
    assert rejected.value.reason == "unknown"
    with pytest.raises(NotFoundError):
        await store.api_keys.delete(key.id)
    assert (await store.api_keys.verify()).ok


async def test_delete_refuses_a_key_with_something_left_and_says_what(store: Store) -> None:
    key = await _key(store, 50)
    with pytest.raises(ConflictError, match="a balance of 50"):
        await store.api_keys.delete(key.id)
    hold = await store.api_keys.reserve(key.id, 20)
    await store.api_keys.reserve(key.id, 5)
    with pytest.raises(ConflictError, match=r"a balance of 50, 2 active holds of 25"):
        await store.api_keys.delete(key.id)
    await store.api_keys.settle(hold.id, 20)
    await store.api_keys.expire_reservations()  # the other one is not due: still active
    with pytest.raises(ConflictError, match="1 active hold of 5"):
        await store.api_keys.delete(key.id)
    assert (await store.api_keys.get_reservation(hold.id)).status == "settled"


async def test_delete_waits_for_payouts_that_are_not_done(store: Store) -> None:
    key = await _key(store, 30)
    pending = await store.api_keys.withdraw(key.id, 20, TOKEN, MINT)
    failed = await store.api_keys.withdraw(key.id, 10, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(failed.id, "mint offline")
    await store.api_keys.retry_withdrawal(failed.id)
    await store.api_keys.fail_withdrawal(failed.id, "mint offline")
    await store.api_keys.charge(key.id, 10)
    # Balance 0 now; a pending payout and a failed one (still retryable) are left.
    with pytest.raises(ConflictError, match="1 pending withdrawal, 1 failed withdrawal"):
        await store.api_keys.delete(key.id)
    await store.api_keys.complete_withdrawal(pending.id)
    with pytest.raises(ConflictError, match="1 failed withdrawal"):
        await store.api_keys.delete(key.id)
    assert (await store.api_keys.get(key.id)).balance == 0


async def test_delete_in_a_transaction_is_undone_with_it(store: Store) -> None:
    key = await _key(store)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.api_keys.delete(key.id)
            raise RuntimeError("roll back")
    assert (await store.api_keys.get(key.id)).id == key.id


# --- settle(0) and a repeated settle ------------------------------------------------------


async def test_settle_zero_frees_the_hold_and_writes_an_entry_of_zero(store: Store) -> None:
    key = await _key(store, 100)
    hold = await store.api_keys.reserve(key.id, 40)
    entry = await store.api_keys.settle(hold.id, 0)
    assert (entry.kind, entry.amount, entry.shortfall, entry.balance_after) == (
        "settlement",
        0,
        0,
        100,
    )
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.reserved, state.total_spent) == (100, 0, 0)
    settled = await store.api_keys.get_reservation(hold.id)
    assert (settled.status, settled.settled_amount) == ("settled", 0)
    assert await store.api_keys.settle(hold.id, 0) == entry
    with pytest.raises(ConflictError):
        await store.api_keys.settle(hold.id, 1)
    assert (await store.api_keys.verify()).ok


async def test_a_repeated_settle_returns_the_one_settlement(store: Store) -> None:
    key = await _key(store, 30)
    hold = await store.api_keys.reserve(key.id, 20)
    # More than the key can pay: the replay matches on the actual amount, shortfall included.
    entry = await store.api_keys.settle(hold.id, 45)
    assert (entry.amount, entry.shortfall) == (-30, 15)
    assert await store.api_keys.settle(hold.id, 45) == entry
    assert await store.api_keys.settle(str(hold.id), 45, actor="alice") == entry
    async with store.transaction() as tx:
        assert await tx.api_keys.settle(hold.id, 45) == entry
    for other in (30, 44, 46, 0):
        with pytest.raises(ConflictError, match="already settled with actual_amount 45"):
            await store.api_keys.settle(hold.id, other)
    settlements = [e for e in await _ledger(store, key.id) if e.kind == "settlement"]
    assert settlements == [entry]
    assert await store.audit.list() == []  # a replay is not a change: nothing audited


async def test_settling_a_released_or_expired_hold_stays_a_conflict(store: Store) -> None:
    key = await _key(store, 100)
    released = await store.api_keys.reserve(key.id, 10)
    await store.api_keys.release(released.id)
    expired = await store.api_keys.reserve(key.id, 10, ttl=dt.timedelta(microseconds=1))
    # Settling a lapsed hold charges it; a swept one stays expired.
    await store.api_keys.expire_reservations()
    assert (await store.api_keys.get_reservation(expired.id)).status == "expired"
    before = await _everything(store)
    for hold, status in ((released, "released"), (expired, "expired")):
        for amount in (0, 10):
            with pytest.raises(ConflictError, match=f"is {status}, not active"):
                await store.api_keys.settle(hold.id, amount)
            with pytest.raises(ConflictError, match=f"is {status}, not active"):
                await store.api_keys.settle(hold.id, amount, actor="alice")
    with pytest.raises(NotFoundError):
        await store.api_keys.settle(uuid.uuid4(), 0)
    assert await _everything(store) == before
