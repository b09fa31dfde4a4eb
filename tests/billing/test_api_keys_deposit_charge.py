"""API keys: deposits, charges, idempotency, refused amounts, totals and the ledger, on
every driver, in a single process."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from llmstore import (
    ConflictError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    NotFoundError,
    Store,
    ValidationError,
)
from tests.billing.api_keys_support import (
    MAX,
    MINT,
    TOKEN,
    _chain_is_consistent,
    _everything,
    _key,
    _ledger,
)
from tests.helpers import every_page, now, refused

# --- deposit / charge ----------------------------------------------------------------------


async def test_deposit_and_charge(store: Store) -> None:
    key = await _key(store)
    deposit = await store.api_keys.deposit(key.id, 100, description="top-up")
    assert deposit.kind == "deposit"
    assert (deposit.amount, deposit.balance_after) == (100, 100)
    assert deposit.description == "top-up"
    assert deposit.api_key_id == key.id
    data = {"model": "gpt-x", "tokens": {"in": 12, "out": 30}, "ok": True}
    before_charge = now()
    charge = await store.api_keys.charge(
        str(key.id), 30, description="completion", request_data=data
    )
    assert charge.kind == "charge"
    assert (charge.amount, charge.balance_after, charge.shortfall) == (-30, 70, 0)
    assert charge.request_data == data
    assert charge.description == "completion"
    assert charge.id > deposit.id
    after = await store.api_keys.get(key.id)
    assert (after.balance, after.reserved, after.available) == (70, 0, 70)
    assert (after.total_deposited, after.total_spent) == (100, 30)
    assert after.last_used_at is not None
    assert before_charge - dt.timedelta(seconds=5) <= after.last_used_at <= now()
    everything = await store.api_keys.charge(key.id, 70)
    assert everything.balance_after == 0
    assert (await store.api_keys.get(key.id)).total_spent == 100
    assert await _ledger(store, key.id) == [everything, charge, deposit]


async def test_insufficient_balance_writes_nothing(store: Store) -> None:
    empty = await _key(store)
    key = await _key(store, 50)
    await store.api_keys.charge(key.id, 20)  # last_used_at is set: it must not move again
    before = await _everything(store)
    key_before = await store.api_keys.get(key.id)
    ledger_before = await _ledger(store, key.id)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.charge(key.id, 31)
    assert (info.value.available, info.value.requested) == (30, 31)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.charge(key.id, MAX, idempotency_key="big")
    assert (info.value.available, info.value.requested) == (30, MAX)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.charge(empty.id, 1)
    assert (info.value.available, info.value.requested) == (0, 1)
    assert await store.api_keys.get(key.id) == key_before
    assert len(await _ledger(store, key.id)) == len(ledger_before)
    assert await _everything(store) == before
    # The refused idempotency key was not consumed: it works once the money is there.
    await store.api_keys.deposit(key.id, 1)
    assert (await store.api_keys.charge(key.id, 31, idempotency_key="big")).balance_after == 0


async def test_a_charge_takes_only_the_available_balance(store: Store) -> None:
    key = await _key(store, 100)
    await store.api_keys.reserve(key.id, 60)
    before = await _everything(store)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.charge(key.id, 41)
    assert (info.value.available, info.value.requested) == (40, 41)
    assert await _everything(store) == before
    taken = await store.api_keys.charge(key.id, 40)
    assert taken.balance_after == 60
    after = await store.api_keys.get(key.id)
    assert (after.balance, after.reserved, after.available) == (60, 60, 0)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.charge(key.id, 1)
    assert (info.value.available, info.value.requested) == (0, 1)


async def test_idempotent_replays_return_the_first_entry(store: Store) -> None:
    key = await _key(store)
    deposit = await store.api_keys.deposit(key.id, 100, idempotency_key="dep-1")
    assert deposit.idempotency_key == "dep-1"
    assert await store.api_keys.deposit(key.id, 100, idempotency_key="dep-1") == deposit
    data = {"b": 2, "a": [1, {"c": None}]}
    charge = await store.api_keys.charge(
        key.id, 30, idempotency_key="req-1", description="d", request_data=data
    )
    again = await store.api_keys.charge(
        str(key.id),
        30,
        idempotency_key="req-1",
        description="d",
        request_data=dict(reversed(list(data.items()))),
    )
    assert again == charge
    assert again.id == charge.id
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.total_deposited, state.total_spent) == (70, 100, 30)
    assert len(await _ledger(store, key.id)) == 2
    # A replay still answers after the money is gone, and writes nothing.
    await store.api_keys.charge(key.id, 70)
    before = await _everything(store)
    assert (
        await store.api_keys.charge(
            key.id, 30, idempotency_key="req-1", description="d", request_data=data
        )
        == charge
    )
    assert await _everything(store) == before


async def test_reused_idempotency_key_with_other_parameters_conflicts(store: Store) -> None:
    key = await _key(store, 1000)
    await store.api_keys.charge(key.id, 10, idempotency_key="k", request_data={"m": 1})
    await store.api_keys.deposit(key.id, 5, idempotency_key="d")
    other = await _key(store, 1000)
    before = await _everything(store)
    conflicting: list[Callable[[], Awaitable[object]]] = [
        lambda: store.api_keys.charge(key.id, 11, idempotency_key="k", request_data={"m": 1}),
        lambda: store.api_keys.charge(key.id, 10, idempotency_key="k"),
        lambda: store.api_keys.charge(key.id, 10, idempotency_key="k", request_data={"m": 2}),
        lambda: store.api_keys.charge(
            key.id, 10, idempotency_key="k", request_data={"m": 1}, description="x"
        ),
        lambda: store.api_keys.deposit(key.id, 10, idempotency_key="k"),
        lambda: store.api_keys.deposit(key.id, 6, idempotency_key="d"),
        lambda: store.api_keys.charge(key.id, 5, idempotency_key="d"),
        lambda: store.api_keys.transfer(key.id, other.id, 10, idempotency_key="k"),
        lambda: store.api_keys.charge(key.id, MAX, idempotency_key="k"),  # not insufficient
    ]
    for i, call in enumerate(conflicting):
        error = await refused(IdempotencyConflictError, call, i)
        assert isinstance(error, ConflictError)
    assert await _everything(store) == before


async def test_idempotency_keys_belong_to_one_api_key(store: Store) -> None:
    first = await _key(store, 100)
    second = await _key(store, 100)
    a = await store.api_keys.charge(first.id, 10, idempotency_key="shared")
    b = await store.api_keys.charge(second.id, 25, idempotency_key="shared")
    assert a.id != b.id
    assert (a.api_key_id, b.api_key_id) == (first.id, second.id)
    assert (await store.api_keys.get(first.id)).balance == 90
    assert (await store.api_keys.get(second.id)).balance == 75
    c = await store.api_keys.deposit(first.id, 7, idempotency_key="dep")
    d = await store.api_keys.deposit(second.id, 8, idempotency_key="dep")
    assert c.id != d.id
    assert await store.api_keys.charge(first.id, 10, idempotency_key="shared") == a
    assert await store.api_keys.charge(second.id, 25, idempotency_key="shared") == b


BAD_AMOUNTS: list[Any] = [0, -1, 1.5, 2.0, True, False, "5", 2**63, None]


async def test_bad_amounts_are_refused_before_anything_is_written(store: Store) -> None:
    key = await _key(store, 100)
    other = await _key(store, 100)
    hold = await store.api_keys.reserve(key.id, 10)
    before = await _everything(store)
    api = store.api_keys
    for amount in BAD_AMOUNTS:
        calls: list[Callable[..., Awaitable[object]]] = [
            lambda a=amount: api.deposit(key.id, a),
            lambda a=amount: api.deposit(key.id, a, idempotency_key="i"),
            lambda a=amount: api.charge(key.id, a),
            lambda a=amount: api.charge(key.id, a, idempotency_key="i"),
            lambda a=amount: api.reserve(key.id, a),
            lambda a=amount: api.transfer(key.id, other.id, a),
            lambda a=amount: api.withdraw(key.id, a, TOKEN, MINT),
        ]
        if not (type(amount) is int and amount == 0):  # settle(id, 0): nothing was used
            calls.append(lambda a=amount: api.settle(hold.id, a))
        for i, call in enumerate(calls):
            await refused(ValidationError, call, (amount, i))
    # Other malformed arguments of a movement.
    for kwargs in [
        {"idempotency_key": ""},
        {"idempotency_key": " "},
        {"idempotency_key": "k" * 201},
        {"idempotency_key": 5},
        {"description": "d" * 501},
        {"description": "line\nbreak"},
        {"description": None},
        {"request_data": ["x"]},
    ]:
        await refused(ValidationError, lambda kw=kwargs: api.charge(key.id, 1, **kw), kwargs)
    assert await _everything(store) == before
    assert (await api.get_reservation(hold.id)).status == "active"


async def test_a_deposit_that_would_overflow_is_refused(store: Store) -> None:
    key = await _key(store, MAX - 2)
    assert (await store.api_keys.deposit(key.id, 2)).balance_after == MAX
    before = await _everything(store)
    for call in [
        lambda: store.api_keys.deposit(key.id, 1),
        lambda: store.api_keys.deposit(key.id, MAX, idempotency_key="o"),
    ]:
        await refused(ValidationError, call, "overflow")
    assert await _everything(store) == before
    # total_deposited overflows too, even when the balance has room.
    await store.api_keys.charge(key.id, MAX)
    spent = await store.api_keys.get(key.id)
    assert (spent.balance, spent.total_deposited) == (0, MAX)
    before = await _everything(store)
    await refused(ValidationError, lambda: store.api_keys.deposit(key.id, 1), "total")
    assert await _everything(store) == before
    # A transfer into a full key is refused as a whole: the source keeps its money.
    full = await _key(store, MAX)
    source = await _key(store, 10)
    before = await _everything(store)
    await refused(ValidationError, lambda: store.api_keys.transfer(source.id, full.id, 1), "in")
    assert await _everything(store) == before


async def test_unknown_keys_are_not_found_and_nothing_is_written(store: Store) -> None:
    key = await _key(store, 100)
    missing = uuid.uuid4()
    before = await _everything(store)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.api_keys.deposit(missing, 1),
        lambda: store.api_keys.deposit(missing, 1, idempotency_key="x"),
        lambda: store.api_keys.charge(missing, 1),
        lambda: store.api_keys.charge(missing, 1, idempotency_key="x"),
        lambda: store.api_keys.reserve(missing, 1),
        lambda: store.api_keys.transfer(key.id, missing, 1),
        lambda: store.api_keys.transfer(missing, key.id, 1),
        lambda: store.api_keys.withdraw(missing, 1, TOKEN, MINT),
        lambda: store.api_keys.ledger(missing),
        lambda: store.api_keys.get(missing),
    ]
    for i, call in enumerate(calls):
        await refused(NotFoundError, call, i)
    assert await _everything(store) == before


async def test_totals_after_a_mix(store: Store) -> None:
    key = await _key(store, 100)  # deposit 100
    friend = await _key(store, 40)  # deposit 40
    await store.api_keys.deposit(key.id, 50)  # deposited 150
    await store.api_keys.charge(key.id, 20)  # spent 20
    hold = await store.api_keys.reserve(key.id, 30)
    await store.api_keys.settle(hold.id, 25)  # spent 45
    await store.api_keys.transfer(key.id, friend.id, 15)  # neither deposited nor spent
    await store.api_keys.transfer(friend.id, key.id, 5)
    withdrawal = await store.api_keys.withdraw(key.id, 10, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "mint offline")  # refund: not a deposit
    await store.api_keys.withdraw(key.id, 12, TOKEN, MINT)
    state = await store.api_keys.get(key.id)
    assert state.total_deposited == 150
    assert state.total_spent == 45
    assert state.balance == 150 - 20 - 25 - 15 + 5 - 10 + 10 - 12
    assert state.balance == sum(e.amount for e in await _ledger(store, key.id))
    peer = await store.api_keys.get(friend.id)
    assert (peer.balance, peer.total_deposited, peer.total_spent) == (50, 40, 0)
    report = await store.api_keys.verify()
    assert report.ok, report


# --- ledger --------------------------------------------------------------------------------


async def test_ledger_is_newest_first_chained_and_paged(store: Store) -> None:
    key = await _key(store, 100)
    friend = await _key(store, 100)
    await store.api_keys.charge(key.id, 7)
    await store.api_keys.deposit(key.id, 13)
    hold = await store.api_keys.reserve(key.id, 20)
    await store.api_keys.charge(friend.id, 3)  # interleaved: another key's entry
    await store.api_keys.settle(hold.id, 11)
    await store.api_keys.transfer(key.id, friend.id, 9)
    await store.api_keys.transfer(friend.id, key.id, 4)
    withdrawal = await store.api_keys.withdraw(key.id, 5, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "no route")
    await store.api_keys.retry_withdrawal(withdrawal.id)
    entries = await _ledger(store, key.id)
    assert [e.kind for e in entries] == [
        "withdrawal",
        "withdrawal_refund",
        "withdrawal",
        "transfer_in",
        "transfer_out",
        "settlement",
        "deposit",
        "charge",
        "deposit",
    ]
    assert all(e.api_key_id == key.id for e in entries)
    _chain_is_consistent(entries)
    _chain_is_consistent(await _ledger(store, friend.id))
    assert entries[0].balance_after == (await store.api_keys.get(key.id)).balance
    created = [e.created_at for e in entries]
    assert created == sorted(created, reverse=True)
    pages = await every_page(lambda after: store.api_keys.ledger(key.id, limit=4, after=after), 4)
    assert pages == entries
    assert await store.api_keys.ledger(key.id, after=entries[-1].id) == []
    assert await store.api_keys.ledger(key.id, limit=1) == entries[:1]
    assert await _ledger(store, (await _key(store)).id) == []  # a key without entries
    for bad_after in ["5", True, 1.0]:
        await refused(
            ValidationError, lambda b=bad_after: store.api_keys.ledger(key.id, after=b), bad_after
        )
    for bad_limit in [0, 1001, False]:
        await refused(
            ValidationError, lambda b=bad_limit: store.api_keys.ledger(key.id, limit=b), bad_limit
        )
