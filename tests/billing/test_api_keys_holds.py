"""API keys: reservations (reserve, settle, release, extend, expire), on every driver, in
a single process."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from llmstore import (
    ConflictError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    LlmstoreError,
    NotFoundError,
    Reservation,
    Store,
    ValidationError,
)
from llmstore._db.schema import api_keys
from llmstore.pytest_plugin import run_sql
from tests.billing.api_keys_support import _everything, _key, _ledger
from tests.helpers import now, refused


async def test_reserve_holds_exactly_the_amount(store: Store) -> None:
    key = await _key(store, 100)
    ledger_before = await _ledger(store, key.id)
    before = now()
    hold = await store.api_keys.reserve(key.id, 30, ttl=dt.timedelta(minutes=5))
    assert isinstance(hold, Reservation)
    assert (hold.api_key_id, hold.amount, hold.status) == (key.id, 30, "active")
    assert hold.settled_amount is None and hold.finished_at is None
    assert before - dt.timedelta(seconds=5) <= hold.created_at <= now()
    assert hold.expires_at - hold.created_at == dt.timedelta(minutes=5)
    assert await store.api_keys.get_reservation(hold.id) == hold
    assert await store.api_keys.get_reservation(str(hold.id)) == hold
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.reserved, state.available) == (100, 30, 70)
    default = await store.api_keys.reserve(key.id, 20)
    assert default.expires_at - default.created_at == dt.timedelta(minutes=15)
    snapshot = await _everything(store)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.reserve(key.id, 51)
    assert (info.value.available, info.value.requested) == (50, 51)
    assert await _everything(store) == snapshot
    last = await store.api_keys.reserve(key.id, 50, ttl=dt.timedelta(days=7))
    assert last.expires_at - last.created_at == dt.timedelta(days=7)
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.reserved, state.available) == (100, 100, 0)
    assert await _ledger(store, key.id) == ledger_before  # holds are not ledger entries
    assert (await store.api_keys.verify()).ok


async def test_bad_ttls_are_refused(store: Store) -> None:
    key = await _key(store, 100)
    hold = await store.api_keys.reserve(key.id, 10)
    before = await _everything(store)
    for ttl in [
        dt.timedelta(0),
        dt.timedelta(seconds=-1),
        dt.timedelta(days=7, microseconds=1),
        60,
        None,
        "PT1M",
    ]:
        await refused(ValidationError, lambda t=ttl: store.api_keys.reserve(key.id, 1, t), ttl)
        await refused(ValidationError, lambda t=ttl: store.api_keys.extend(hold.id, t), ttl)
    assert await _everything(store) == before


async def test_settle_below_the_hold_charges_the_actual_amount_once(store: Store) -> None:
    key = await _key(store, 100)
    hold = await store.api_keys.reserve(key.id, 50)
    before = now()
    entry = await store.api_keys.settle(hold.id, 20)
    assert entry.kind == "settlement"
    assert (entry.amount, entry.balance_after, entry.shortfall) == (-20, 80, 0)
    assert entry.reservation_id == hold.id
    assert entry.api_key_id == key.id
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.reserved, state.total_spent) == (80, 0, 20)
    settled = await store.api_keys.get_reservation(hold.id)
    assert settled.status == "settled"
    assert settled.settled_amount == 20
    assert settled.finished_at is not None
    assert before - dt.timedelta(seconds=5) <= settled.finished_at <= now()
    snapshot = await _everything(store)
    # The same settle again is answered with the same entry (a retry); anything else that
    # would finish the hold again is a conflict.
    assert await store.api_keys.settle(hold.id, 20) == entry
    for call in [
        lambda: store.api_keys.settle(hold.id, 1),
        lambda: store.api_keys.release(hold.id),
        lambda: store.api_keys.extend(hold.id, dt.timedelta(minutes=1)),
    ]:
        error = await refused(ConflictError, call, "finished")
        assert not isinstance(error, IdempotencyConflictError)
    assert await _everything(store) == snapshot
    exact = await store.api_keys.reserve(key.id, 30)
    assert (await store.api_keys.settle(exact.id, 30)).balance_after == 50
    assert (await store.api_keys.verify()).ok


async def test_settle_above_the_hold_charges_up_to_the_available_balance(store: Store) -> None:
    key = await _key(store, 100)
    first = await store.api_keys.reserve(key.id, 30)
    other = await store.api_keys.reserve(key.id, 50)  # available now 20
    entry = await store.api_keys.settle(first.id, 100)
    assert (entry.amount, entry.shortfall, entry.balance_after) == (-50, 50, 50)
    assert (await store.api_keys.get_reservation(first.id)).settled_amount == 50
    state = await store.api_keys.get(key.id)
    # The other hold is untouched: the settlement took only what was free plus its own hold.
    assert (state.balance, state.reserved, state.available, state.total_spent) == (50, 50, 0, 50)
    assert (await store.api_keys.get_reservation(other.id)).status == "active"
    covered = await store.api_keys.settle(other.id, 45)
    assert (covered.amount, covered.shortfall, covered.balance_after) == (-45, 0, 5)
    assert (await store.api_keys.verify()).ok


async def test_settle_when_only_the_hold_is_left(store: Store) -> None:
    """The key has spent everything it did not hold: the settlement takes the hold, the
    rest is a shortfall, and the balance ends at zero, never below."""
    key = await _key(store, 60)
    hold = await store.api_keys.reserve(key.id, 25)
    await store.api_keys.charge(key.id, 35)  # available 0, balance == hold
    entry = await store.api_keys.settle(hold.id, 1000)
    assert (entry.amount, entry.shortfall, entry.balance_after) == (-25, 975, 0)
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.reserved, state.total_spent) == (0, 0, 60)
    assert all(e.balance_after >= 0 for e in await _ledger(store, key.id))
    assert (await store.api_keys.verify()).ok


async def test_settle_never_drives_a_balance_negative(store: Store) -> None:
    """Through the API a key always still holds a reservation's amount, so a settlement
    charges at least min(actual, hold) and "nothing left" cannot happen. Forced with direct
    SQL (the key's row claims nothing is owned or held), settling may refuse or charge,
    but the balance never goes below zero and a refusal writes nothing."""
    key = await _key(store, 40)
    hold = await store.api_keys.reserve(key.id, 40)
    await run_sql(
        store,
        lambda conn: conn.execute(
            sa.update(api_keys).where(api_keys.c.id == key.id).values(balance=0, reserved=0)
        ),
        write=True,
    )
    before = await _everything(store)
    try:
        entry = await store.api_keys.settle(hold.id, 30)
    except LlmstoreError:
        assert await _everything(store) == before
        assert (await store.api_keys.get_reservation(hold.id)).status == "active"
    else:
        assert entry.balance_after >= 0
        assert entry.shortfall == 30 + entry.amount
    assert (await store.api_keys.get(key.id)).balance >= 0


async def test_release_frees_the_hold_without_charging(store: Store) -> None:
    key = await _key(store, 100)
    hold = await store.api_keys.reserve(key.id, 40)
    ledger_before = await _ledger(store, key.id)
    released = await store.api_keys.release(hold.id)
    assert released.id == hold.id
    assert released.status == "released"
    assert released.settled_amount is None
    assert released.finished_at is not None
    assert await store.api_keys.get_reservation(hold.id) == released
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.reserved, state.available, state.total_spent) == (100, 0, 100, 0)
    assert await _ledger(store, key.id) == ledger_before
    snapshot = await _everything(store)
    for call in [
        lambda: store.api_keys.release(hold.id),
        lambda: store.api_keys.settle(hold.id, 5),
        lambda: store.api_keys.extend(hold.id, dt.timedelta(minutes=1)),
    ]:
        await refused(ConflictError, call, "released")
    assert await _everything(store) == snapshot


async def test_unknown_and_malformed_reservations(store: Store) -> None:
    missing = uuid.uuid4()
    for call in [
        lambda: store.api_keys.get_reservation(missing),
        lambda: store.api_keys.settle(missing, 1),
        lambda: store.api_keys.release(missing),
        lambda: store.api_keys.extend(missing, dt.timedelta(minutes=1)),
    ]:
        await refused(NotFoundError, call, "missing")
    for call in [
        lambda: store.api_keys.get_reservation("nope"),
        lambda: store.api_keys.settle("nope", 1),
        lambda: store.api_keys.release(None),  # type: ignore[arg-type]
        lambda: store.api_keys.extend(7, dt.timedelta(minutes=1)),  # type: ignore[arg-type]
    ]:
        await refused(ValidationError, call, "malformed")


async def test_extend_moves_the_expiry_of_an_active_hold(store: Store) -> None:
    key = await _key(store, 100)
    hold = await store.api_keys.reserve(key.id, 10, ttl=dt.timedelta(minutes=1))
    before = now()
    extended = await store.api_keys.extend(hold.id, dt.timedelta(hours=2))
    after = now()
    assert extended.status == "active"
    assert (extended.id, extended.amount, extended.created_at) == (
        hold.id,
        hold.amount,
        hold.created_at,
    )
    assert before + dt.timedelta(hours=2) <= extended.expires_at <= after + dt.timedelta(hours=2)
    assert await store.api_keys.get_reservation(hold.id) == extended
    shorter = await store.api_keys.extend(str(hold.id), dt.timedelta(seconds=30))
    assert shorter.expires_at < extended.expires_at  # "from now", whichever way it moves
    assert (await store.api_keys.get(key.id)).reserved == 10


async def test_expire_reservations_releases_holds_past_their_time(store: Store) -> None:
    key = await _key(store, 100)
    friend = await _key(store, 50)
    short = dt.timedelta(seconds=1)
    due_1 = await store.api_keys.reserve(key.id, 20, ttl=short)
    due_2 = await store.api_keys.reserve(key.id, 15, ttl=short)
    due_3 = await store.api_keys.reserve(friend.id, 50, ttl=short)
    lasting = await store.api_keys.reserve(key.id, 10)
    rescued = await store.api_keys.reserve(key.id, 5, ttl=short)
    await store.api_keys.extend(rescued.id, dt.timedelta(hours=1))
    settled = await store.api_keys.reserve(key.id, 7, ttl=short)
    await store.api_keys.settle(settled.id, 7)
    released = await store.api_keys.reserve(key.id, 8, ttl=short)
    await store.api_keys.release(released.id)
    assert await store.api_keys.expire_reservations() == 0  # nothing is due yet
    ledgers = (await _ledger(store, key.id), await _ledger(store, friend.id))
    await asyncio.sleep(1.1)
    started = now()
    assert await store.api_keys.expire_reservations() == 3
    for hold in (due_1, due_2, due_3):
        expired = await store.api_keys.get_reservation(hold.id)
        assert expired.status == "expired"
        assert expired.settled_amount is None
        assert expired.finished_at is not None
        assert started - dt.timedelta(seconds=5) <= expired.finished_at <= now()
    for hold, status in [(lasting, "active"), (rescued, "active"), (settled, "settled")]:
        assert (await store.api_keys.get_reservation(hold.id)).status == status
    assert (await store.api_keys.get_reservation(released.id)).status == "released"
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.reserved) == (93, 15)
    peer = await store.api_keys.get(friend.id)
    assert (peer.balance, peer.reserved, peer.available) == (50, 0, 50)
    assert (await _ledger(store, key.id), await _ledger(store, friend.id)) == ledgers
    assert await store.api_keys.expire_reservations() == 0
    await refused(ConflictError, lambda: store.api_keys.settle(due_1.id, 1), "expired")
    await refused(ConflictError, lambda: store.api_keys.release(due_2.id), "expired")
    await refused(
        ConflictError, lambda: store.api_keys.extend(due_3.id, dt.timedelta(hours=1)), "expired"
    )
    assert (await store.api_keys.verify()).ok
