"""The API keys repository (balances, ledger, holds, transfers, withdrawals) on every driver,
in a single process."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import (
    ApiKey,
    ApiKeyRejectedError,
    ConflictError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    IssuedApiKey,
    LedgerEntry,
    LedgerMismatch,
    LedgerReport,
    LlmstoreError,
    NotFoundError,
    Reservation,
    Store,
    StoreConfig,
    TransactionError,
    ValidationError,
    Withdrawal,
)
from llmstore._cli.main import EXIT_OK, EXIT_TAMPERED, main
from llmstore._db.schema import api_keys, ledger_entries, reservations, withdrawals
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests.helpers import column_value, every_page, now, refused

SHAPE = re.compile(r"lsk_[A-Za-z0-9_-]{43}")
MAX = 2**63 - 1
TOKEN = "cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHBzOi8vbWludC5leGFtcGxlIn1dfQ"
MINT = "https://mint.example.com/v1"
TABLES = (api_keys, ledger_entries, reservations, withdrawals)


# --- helpers -------------------------------------------------------------------------------


async def _key(store: Store, balance: int = 0, **kwargs: Any) -> ApiKey:
    return (await store.api_keys.create(balance, **kwargs)).key


async def _ledger(store: Store, key_id: uuid.UUID) -> list[LedgerEntry]:
    return await store.api_keys.ledger(key_id, limit=1000)


def _dump(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table.name: [
            tuple(row)
            for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
        ]
        for table in TABLES
    }


async def _everything(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the four money tables, to show that a refusal wrote nothing."""
    return await run_sql(store, _dump)


def _chain_is_consistent(entries: list[LedgerEntry]) -> None:
    """Newest first: ids decrease and each balance_after follows from the one before it."""
    assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
    assert len({e.id for e in entries}) == len(entries)
    oldest_first = list(reversed(entries))
    assert oldest_first[0].balance_after == oldest_first[0].amount
    for older, newer in itertools.pairwise(oldest_first):
        assert newer.balance_after == older.balance_after + newer.amount, (older, newer)
    assert all(e.balance_after >= 0 for e in entries)


# --- create / authenticate / get / list ---------------------------------------------------


async def test_create_issues_a_secret_once_and_an_empty_key(store: Store) -> None:
    before = now()
    issued = await store.api_keys.create()
    assert isinstance(issued, IssuedApiKey)
    key = issued.key
    assert isinstance(key, ApiKey)
    assert SHAPE.fullmatch(issued.secret)
    assert key.prefix == issued.secret[:12]
    assert (key.balance, key.reserved, key.available) == (0, 0, 0)
    assert (key.total_deposited, key.total_spent) == (0, 0)
    assert key.project_id is None
    assert key.expires_at is None
    assert key.metadata is None
    assert key.last_used_at is None
    assert key.created_at.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=5) <= key.created_at <= now()
    assert await store.api_keys.get(key.id) == key
    assert await store.api_keys.get(str(key.id)) == key
    assert await store.api_keys.authenticate(issued.secret) == key
    assert await _ledger(store, key.id) == []  # no opening balance, no entry
    other = await store.api_keys.create()
    assert other.secret != issued.secret
    assert other.key.id > key.id


async def test_secrets_never_appear_in_reprs_or_rows(store: Store) -> None:
    issued = await store.api_keys.create(10)
    secret = issued.secret
    for text in (repr(issued), str(issued), repr(issued.key), str(issued.key)):
        assert secret not in text
        assert secret[12:] not in text
    assert secret not in repr(issued.key.model_dump())
    rows = await _everything(store)
    assert secret not in repr(rows)
    assert secret[12:] not in repr(rows)
    with pytest.raises(ApiKeyRejectedError) as info:
        await store.api_keys.authenticate("lsk_" + secrets.token_urlsafe(32))
    assert secret not in str(info.value)


async def test_create_with_an_opening_balance_writes_a_deposit(store: Store) -> None:
    key = await _key(store, 250)
    assert (key.balance, key.available, key.total_deposited, key.total_spent) == (250, 250, 250, 0)
    [entry] = await _ledger(store, key.id)
    assert isinstance(entry, LedgerEntry)
    assert entry.kind == "deposit"
    assert (entry.amount, entry.balance_after, entry.shortfall) == (250, 250, 0)
    assert entry.api_key_id == key.id
    assert entry.description == "opening balance"
    assert entry.idempotency_key is None
    assert (entry.reservation_id, entry.withdrawal_id, entry.transfer_id) == (None, None, None)
    assert entry.created_at.utcoffset() == dt.timedelta(0)
    biggest = await _key(store, MAX)
    assert biggest.balance == MAX
    assert (await store.api_keys.verify()).ok


async def test_create_for_a_project_with_metadata_and_expiry(store: Store) -> None:
    project = await store.projects.create("acme")
    metadata = {
        "owner": "ops ☃",
        "tags": ["a", "b"],
        "nested": {"n": 1, "x": 1.5, "flag": True, "none": None},
    }
    expires = (now() + dt.timedelta(days=2)).astimezone(dt.timezone(dt.timedelta(hours=-4)))
    issued = await store.api_keys.create(
        5, project_id=str(project.id), expires_at=expires, metadata=metadata
    )
    key = await store.api_keys.get(issued.key.id)
    assert key == issued.key
    assert key.project_id == project.id
    assert key.metadata == metadata
    assert key.expires_at == expires
    assert key.expires_at is not None and key.expires_at.utcoffset() == dt.timedelta(0)
    assert await store.api_keys.authenticate(issued.secret) == key
    tuple_metadata = await _key(store, metadata={"pair": (1, 2)})
    assert tuple_metadata.metadata == {"pair": [1, 2]}  # as it reads back


async def test_create_for_an_unknown_project_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.api_keys.create(100, project_id=uuid.uuid4())
    assert await store.api_keys.list() == []
    assert await _everything(store) == {table.name: [] for table in TABLES}


BAD_CREATE: list[dict[str, Any]] = [
    {"balance": -1},
    {"balance": True},
    {"balance": 1.5},
    {"balance": "5"},
    {"balance": 2**63},
    {"balance": None},
    {"project_id": "not-a-uuid"},
    {"project_id": 17},
    {"expires_at": dt.datetime(2100, 1, 1)},  # naive
    {"expires_at": "2100-01-01T00:00:00+00:00"},
    {"metadata": ["not", "a", "mapping"]},
    {"metadata": {1: "int key"}},
    {"metadata": {"x": float("nan")}},
    {"metadata": {"x": object()}},
    {"metadata": {"big": "x" * 20_000}},
]


async def test_bad_create_arguments_write_nothing(store: Store) -> None:
    for kwargs in BAD_CREATE:
        await refused(ValidationError, lambda kw=kwargs: store.api_keys.create(**kw), kwargs)
    assert await _everything(store) == {table.name: [] for table in TABLES}


async def test_authenticate_refusals(store: Store) -> None:
    unknown = "lsk_" + secrets.token_urlsafe(32)
    with pytest.raises(ApiKeyRejectedError) as info:
        await store.api_keys.authenticate(unknown)
    assert info.value.reason == "unknown"
    assert unknown not in str(info.value)

    expired = await store.api_keys.create(10, expires_at=now() - dt.timedelta(seconds=1))
    with pytest.raises(ApiKeyRejectedError) as info:
        await store.api_keys.authenticate(expired.secret)
    assert info.value.reason == "expired"
    assert expired.secret not in str(info.value)

    live = await store.api_keys.create(expires_at=now() + dt.timedelta(hours=1))
    assert (await store.api_keys.authenticate(live.secret)).id == live.key.id

    for malformed in [
        "",
        "lsk_",
        live.secret[:-1],
        live.secret + "A",
        "lst_" + live.secret[4:],  # a proxy token's prefix
        live.secret.replace("lsk_", "LSK_"),
        "lsk_" + "!" * 43,
        None,
        42,
        live.secret.encode(),
    ]:
        # Not shaped like a key: a rejection like any unknown key (one error per outcome).
        await refused(
            ApiKeyRejectedError, lambda m=malformed: store.api_keys.authenticate(m), malformed
        )


async def test_get_unknown_and_malformed_ids(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.api_keys.get(uuid.uuid4())
    for bad in ["nope", 12, None, b"\x00" * 16]:
        await refused(ValidationError, lambda b=bad: store.api_keys.get(b), bad)
        await refused(ValidationError, lambda b=bad: store.api_keys.deposit(b, 1), bad)
        await refused(ValidationError, lambda b=bad: store.api_keys.ledger(b), bad)


async def test_list_pages_in_creation_order_and_filters_by_project(store: Store) -> None:
    acme = await store.projects.create("acme")
    other = await store.projects.create("other")
    created = []
    for i in range(7):
        project_id = acme.id if i % 2 == 0 else None
        created.append(await _key(store, i, project_id=project_id))
    everything = await store.api_keys.list()
    assert everything == created
    pages: list[ApiKey] = []
    after: uuid.UUID | None = None
    while True:
        page = await store.api_keys.list(limit=3, after=after)
        assert len(page) <= 3
        if not page:
            break
        pages.extend(page)
        after = page[-1].id
    assert pages == created
    assert await store.api_keys.list(after=str(created[-1].id)) == []
    in_acme = await store.api_keys.list(project_id=acme.id)
    assert in_acme == [key for key in created if key.project_id == acme.id]
    assert len(in_acme) == 4
    assert (
        await store.api_keys.list(project_id=acme.id, limit=2, after=in_acme[1].id) == (in_acme[2:])
    )
    assert await store.api_keys.list(project_id=other.id) == []
    assert await store.api_keys.list(project_id=uuid.uuid4()) == []
    for bad in [0, 1001, True, "5"]:
        await refused(ValidationError, lambda b=bad: store.api_keys.list(limit=b), bad)
    await refused(ValidationError, lambda: store.api_keys.list(after="x"), "after")
    await refused(ValidationError, lambda: store.api_keys.list(project_id="x"), "project")


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
            lambda a=amount: api.settle(hold.id, a),
            lambda a=amount: api.transfer(key.id, other.id, a),
            lambda a=amount: api.withdraw(key.id, a, TOKEN, MINT),
        ]
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


# --- reservations --------------------------------------------------------------------------


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
    for call in [
        lambda: store.api_keys.settle(hold.id, 20),
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


# --- transfers -----------------------------------------------------------------------------


async def test_transfer_moves_money_between_keys_once(store: Store) -> None:
    source = await _key(store, 100)
    target = await _key(store, 5)
    debit, credit = await store.api_keys.transfer(
        source.id, str(target.id), 30, idempotency_key="t-1", description="share"
    )
    assert (debit.kind, debit.amount, debit.balance_after) == ("transfer_out", -30, 70)
    assert (credit.kind, credit.amount, credit.balance_after) == ("transfer_in", 30, 35)
    assert (debit.api_key_id, credit.api_key_id) == (source.id, target.id)
    assert debit.transfer_id is not None
    assert debit.transfer_id == credit.transfer_id
    assert debit.description == credit.description == "share"
    assert debit.idempotency_key == "t-1"
    replay = await store.api_keys.transfer(
        source.id, target.id, 30, idempotency_key="t-1", description="share"
    )
    assert replay == (debit, credit)
    src = await store.api_keys.get(source.id)
    dst = await store.api_keys.get(target.id)
    assert (src.balance, src.total_deposited, src.total_spent) == (70, 100, 0)
    assert (dst.balance, dst.total_deposited, dst.total_spent) == (35, 5, 0)
    assert len(await _ledger(store, source.id)) == 2
    assert len(await _ledger(store, target.id)) == 2
    third = await _key(store)
    snapshot = await _everything(store)
    for call in [
        lambda: store.api_keys.transfer(source.id, target.id, 31, idempotency_key="t-1"),
        lambda: store.api_keys.transfer(source.id, third.id, 30, idempotency_key="t-1"),
        lambda: store.api_keys.transfer(source.id, target.id, 30, idempotency_key="t-1"),
        lambda: store.api_keys.charge(source.id, 30, idempotency_key="t-1", description="share"),
    ]:
        await refused(IdempotencyConflictError, call, "conflict")
    assert await _everything(store) == snapshot
    # The replay answers even after the source has spent everything.
    await store.api_keys.charge(source.id, 70)
    assert (
        await store.api_keys.transfer(
            source.id, target.id, 30, idempotency_key="t-1", description="share"
        )
        == replay
    )
    assert (await store.api_keys.verify()).ok


async def test_transfer_refusals_write_nothing_on_either_key(store: Store) -> None:
    source = await _key(store, 100)
    target = await _key(store, 10)
    await store.api_keys.reserve(source.id, 30)
    before = await _everything(store)
    for same in [
        lambda: store.api_keys.transfer(source.id, source.id, 1),
        lambda: store.api_keys.transfer(source.id, str(source.id), 1),
        lambda: store.api_keys.transfer(str(source.id).upper(), source.id, 1),
    ]:
        await refused(ValidationError, same, "same key")
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.transfer(source.id, target.id, 71)
    assert (info.value.available, info.value.requested) == (70, 71)
    with pytest.raises(InsufficientBalanceError):
        await store.api_keys.transfer(source.id, target.id, 71, idempotency_key="x")
    with pytest.raises(InsufficientBalanceError):
        await store.api_keys.transfer(target.id, source.id, 11)
    await refused(ValidationError, lambda: store.api_keys.transfer("x", target.id, 1), "from")
    await refused(
        ValidationError,
        lambda: store.api_keys.transfer(source.id, None, 1),  # type: ignore[arg-type]
        "to",
    )
    assert await _everything(store) == before
    debit, credit = await store.api_keys.transfer(source.id, target.id, 70, idempotency_key="x")
    assert (debit.balance_after, credit.balance_after) == (30, 80)
    assert (await store.api_keys.get(source.id)).available == 0


# --- withdrawals ---------------------------------------------------------------------------


async def test_withdraw_debits_at_once_and_encrypts_the_token(store: Store) -> None:
    key = await _key(store, 100)
    before = now()
    withdrawal = await store.api_keys.withdraw(key.id, 40, TOKEN, MINT)
    assert isinstance(withdrawal, Withdrawal)
    assert (withdrawal.api_key_id, withdrawal.amount, withdrawal.mint_url) == (key.id, 40, MINT)
    assert withdrawal.status == "pending"
    assert (withdrawal.retry_count, withdrawal.error_message) == (0, None)
    assert withdrawal.completed_at is None
    assert before - dt.timedelta(seconds=5) <= withdrawal.created_at <= now()
    assert not hasattr(withdrawal, "token")
    assert TOKEN not in repr(withdrawal) and TOKEN not in repr(withdrawal.model_dump())
    assert await store.api_keys.get_withdrawal(withdrawal.id) == withdrawal
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.total_spent, state.total_deposited) == (60, 0, 100)
    debit = (await _ledger(store, key.id))[0]
    assert (debit.kind, debit.amount, debit.balance_after) == ("withdrawal", -40, 60)
    assert debit.withdrawal_id == withdrawal.id
    stored = await column_value(store, withdrawals.c.token_encrypted, withdrawal.id)
    assert stored and stored != TOKEN
    assert TOKEN not in stored
    assert TOKEN not in repr(await _everything(store))
    assert await store.api_keys.reveal_withdrawal_token(withdrawal.id) == TOKEN
    assert await store.api_keys.reveal_withdrawal_token(str(withdrawal.id)) == TOKEN
    with pytest.raises(NotFoundError):
        await store.api_keys.reveal_withdrawal_token(uuid.uuid4())


async def test_withdraw_refusals_write_nothing(store: Store) -> None:
    key = await _key(store, 100)
    await store.api_keys.reserve(key.id, 50)
    before = await _everything(store)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.withdraw(key.id, 51, TOKEN, MINT)
    assert (info.value.available, info.value.requested) == (50, 51)
    for token in ["", "  ", f" {TOKEN}", f"{TOKEN}\n", 5, None, "x" * 100_001]:
        await refused(
            ValidationError, lambda t=token: store.api_keys.withdraw(key.id, 1, t, MINT), "token"
        )
    for url in ["", "ftp://mint.example", "mint.example", "https://", "http://a b", 7]:
        await refused(
            ValidationError, lambda u=url: store.api_keys.withdraw(key.id, 1, TOKEN, u), url
        )
    assert await _everything(store) == before


async def test_withdrawal_state_machine(store: Store) -> None:
    key = await _key(store, 100)
    api = store.api_keys

    async def balance() -> int:
        return (await api.get(key.id)).balance

    # pending -> completed
    done = await api.withdraw(key.id, 30, TOKEN, MINT)
    completed = await api.complete_withdrawal(done.id)
    assert completed.status == "completed"
    assert completed.completed_at is not None
    assert (completed.retry_count, completed.error_message) == (0, None)
    assert await api.get_withdrawal(done.id) == completed
    assert await balance() == 70

    # pending -> failed: a refund entry, one more retry
    flaky = await api.withdraw(key.id, 20, TOKEN, MINT)
    assert await balance() == 50
    failed = await api.fail_withdrawal(flaky.id, "mint timed out")
    assert failed.status == "failed"
    assert (failed.error_message, failed.retry_count) == ("mint timed out", 1)
    assert failed.completed_at is None
    refund = (await _ledger(store, key.id))[0]
    assert (refund.kind, refund.amount, refund.balance_after) == ("withdrawal_refund", 20, 70)
    assert refund.withdrawal_id == flaky.id
    assert await balance() == 70

    # Every forbidden edge is a ConflictError and writes nothing.
    snapshot = await _everything(store)
    forbidden: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("complete a completed one", lambda: api.complete_withdrawal(done.id)),
        ("fail a completed one", lambda: api.fail_withdrawal(done.id, "late")),
        ("retry a completed one", lambda: api.retry_withdrawal(done.id)),
        ("complete a failed one", lambda: api.complete_withdrawal(flaky.id)),
        ("fail a failed one", lambda: api.fail_withdrawal(flaky.id, "again")),
    ]
    for name, call in forbidden:
        await refused(ConflictError, call, name)
    assert await _everything(store) == snapshot

    # failed -> pending: debited again; retry_count counts the failures
    retried = await api.retry_withdrawal(flaky.id)
    assert retried.status == "pending"
    assert retried.retry_count == 1
    debit = (await _ledger(store, key.id))[0]
    assert (debit.kind, debit.amount, debit.balance_after) == ("withdrawal", -20, 50)
    assert debit.withdrawal_id == flaky.id
    snapshot = await _everything(store)
    await refused(ConflictError, lambda: api.retry_withdrawal(flaky.id), "retry a pending one")
    assert await _everything(store) == snapshot

    # fail again, retry again, then complete
    assert (await api.fail_withdrawal(flaky.id, "still down")).retry_count == 2
    assert await balance() == 70
    await api.retry_withdrawal(flaky.id)
    assert await balance() == 50
    final = await api.complete_withdrawal(flaky.id)
    assert (final.status, final.retry_count, final.error_message) == (
        "completed",
        2,
        "still down",
    )
    assert await balance() == 50
    state = await api.get(key.id)
    assert (state.total_deposited, state.total_spent) == (100, 0)
    _chain_is_consistent(await _ledger(store, key.id))
    assert (await api.verify()).ok

    missing = uuid.uuid4()
    for call in [
        lambda: api.get_withdrawal(missing),
        lambda: api.complete_withdrawal(missing),
        lambda: api.fail_withdrawal(missing, "x"),
        lambda: api.retry_withdrawal(missing),
    ]:
        await refused(NotFoundError, call, "missing")
    pending = await api.withdraw(key.id, 1, TOKEN, MINT)
    for error in ["", "   ", "x" * 2001, None]:
        await refused(ValidationError, lambda e=error: api.fail_withdrawal(pending.id, e), "error")
    assert (await api.get_withdrawal(pending.id)).status == "pending"


async def test_retry_without_enough_balance_stays_failed(store: Store) -> None:
    key = await _key(store, 100)
    withdrawal = await store.api_keys.withdraw(key.id, 60, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "mint down")
    await store.api_keys.charge(key.id, 50)
    await store.api_keys.reserve(key.id, 5)
    before = await _everything(store)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.retry_withdrawal(withdrawal.id)
    assert (info.value.available, info.value.requested) == (45, 60)
    assert await _everything(store) == before
    still = await store.api_keys.get_withdrawal(withdrawal.id)
    assert (still.status, still.retry_count) == ("failed", 1)
    await store.api_keys.deposit(key.id, 15)
    assert (await store.api_keys.retry_withdrawal(withdrawal.id)).status == "pending"
    assert (await store.api_keys.get(key.id)).available == 0


async def test_list_withdrawals_filters_and_pages(store: Store) -> None:
    key = await _key(store, 100)
    other = await _key(store, 100)
    made = [await store.api_keys.withdraw(key.id, 1, TOKEN, MINT) for _ in range(4)]
    theirs = await store.api_keys.withdraw(other.id, 2, TOKEN, MINT)
    await store.api_keys.complete_withdrawal(made[1].id)
    await store.api_keys.fail_withdrawal(made[2].id, "x")
    everything = await store.api_keys.list_withdrawals()
    assert [w.id for w in everything] == [w.id for w in [*made, theirs]]
    assert [w.id for w in await store.api_keys.list_withdrawals(key_id=key.id)] == [
        w.id for w in made
    ]
    assert [w.id for w in await store.api_keys.list_withdrawals(status="pending")] == [
        made[0].id,
        made[3].id,
        theirs.id,
    ]
    assert [
        w.id for w in await store.api_keys.list_withdrawals(key_id=key.id, status="failed")
    ] == [made[2].id]
    assert [w.id for w in await store.api_keys.list_withdrawals(status="completed")] == [made[1].id]
    pages = await every_page(lambda after: store.api_keys.list_withdrawals(limit=2, after=after), 2)
    assert pages == everything
    assert await store.api_keys.list_withdrawals(key_id=uuid.uuid4()) == []
    for kwargs in [{"status": "done"}, {"limit": 0}, {"after": "x"}, {"key_id": 3}]:
        await refused(
            ValidationError, lambda kw=kwargs: store.api_keys.list_withdrawals(**kw), kwargs
        )


# --- cleanup_expired -----------------------------------------------------------------------


async def test_cleanup_expired_deletes_only_expired_keys_with_nothing_left(store: Store) -> None:
    past = now() - dt.timedelta(seconds=1)
    gone = await store.api_keys.create(expires_at=past)
    spent = await _key(store, 30, expires_at=past)
    await store.api_keys.charge(spent.id, 30)  # expired, spent to zero: also deleted
    paid_out = await _key(store, 20, expires_at=past)
    payout = await store.api_keys.withdraw(paid_out.id, 20, TOKEN, MINT)
    await store.api_keys.complete_withdrawal(payout.id)  # completed: deleted with the key

    with_balance = await _key(store, 1, expires_at=past)
    held = await _key(store, 10, expires_at=past)
    await store.api_keys.reserve(held.id, 10)
    pending = await _key(store, 10, expires_at=past)
    await store.api_keys.withdraw(pending.id, 10, TOKEN, MINT)  # balance 0, payout pending
    failed = await _key(store, 10, expires_at=past)
    refunded = await store.api_keys.withdraw(failed.id, 10, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(refunded.id, "x")
    unexpired = await _key(store, expires_at=now() + dt.timedelta(hours=1))
    forever = await _key(store)
    # An active hold on an expired key with no balance: only reachable with direct SQL,
    # since a hold needs money; the hold alone must keep the key.
    orphan_hold = await _key(store, expires_at=past)
    await run_sql(
        store,
        lambda conn: conn.execute(
            reservations.insert().values(
                id=uuid.uuid4(),
                api_key_id=orphan_hold.id,
                amount=5,
                status="active",
                created_at=now(),
                expires_at=now() + dt.timedelta(hours=1),
            )
        ),
        write=True,
    )

    assert await store.api_keys.cleanup_expired() == 3
    for deleted in (gone.key, spent, paid_out):
        with pytest.raises(NotFoundError):
            await store.api_keys.get(deleted.id)
    with pytest.raises(ApiKeyRejectedError) as info:
        await store.api_keys.authenticate(gone.secret)
    assert info.value.reason == "unknown"
    kept = {key.id for key in await store.api_keys.list()}
    assert kept == {
        with_balance.id,
        held.id,
        pending.id,
        failed.id,
        unexpired.id,
        forever.id,
        orphan_hold.id,
    }
    rows = await _everything(store)
    deleted_ids = {gone.key.id, spent.id, paid_out.id}
    for table in ("llmstore_ledger_entries", "llmstore_reservations", "llmstore_withdrawals"):
        columns = [c.name for c in next(t for t in TABLES if t.name == table).c]
        position = columns.index("api_key_id")
        assert not [row for row in rows[table] if row[position] in deleted_ids], table
    assert await store.api_keys.cleanup_expired() == 0
    assert (await store.api_keys.verify()).keys_checked == 7


# --- verify --------------------------------------------------------------------------------


async def _mix(store: Store) -> tuple[ApiKey, ApiKey, ApiKey]:
    a = await _key(store, 100)
    b = await _key(store, 50)
    c = await _key(store)
    await store.api_keys.charge(a.id, 10)
    await store.api_keys.deposit(c.id, 70)
    hold = await store.api_keys.reserve(b.id, 20)
    await store.api_keys.settle(hold.id, 25)
    await store.api_keys.reserve(c.id, 30)
    await store.api_keys.reserve(a.id, 5)
    await store.api_keys.transfer(a.id, b.id, 12)
    withdrawal = await store.api_keys.withdraw(b.id, 8, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "x")
    await store.api_keys.retry_withdrawal(withdrawal.id)
    gone = await store.api_keys.reserve(c.id, 1)
    await store.api_keys.release(gone.id)
    return a, b, c


async def test_verify_is_ok_after_a_mix(store: Store) -> None:
    empty = await store.api_keys.verify()
    assert empty == LedgerReport(ok=True, keys_checked=0, mismatches=[])
    await _mix(store)
    await _key(store)  # a key without any entry
    report = await store.api_keys.verify()
    assert isinstance(report, LedgerReport)
    assert report.ok is True
    assert report.keys_checked == 4
    assert report.mismatches == []


async def test_verify_names_each_tampered_key_and_field(store: Store) -> None:
    a, b, c = await _mix(store)
    a_state = await store.api_keys.get(a.id)
    b_state = await store.api_keys.get(b.id)
    c_state = await store.api_keys.get(c.id)
    charge = next(e for e in await _ledger(store, b.id) if e.kind == "settlement")

    def tamper(conn: Connection) -> None:
        # a: balance raised by hand
        conn.execute(
            sa.update(api_keys).where(api_keys.c.id == a.id).values(balance=api_keys.c.balance + 7)
        )
        # b: one ledger entry deleted (a settlement: balance and total_spent disagree)
        deleted = conn.execute(sa.delete(ledger_entries).where(ledger_entries.c.id == charge.id))
        assert deleted.rowcount == 1
        # c: reserved changed without a hold
        conn.execute(sa.update(api_keys).where(api_keys.c.id == c.id).values(reserved=3))

    await run_sql(store, tamper, write=True)
    report = await store.api_keys.verify()
    assert report.ok is False
    assert report.keys_checked == 3
    assert all(isinstance(m, LedgerMismatch) for m in report.mismatches)
    found = {(m.api_key_id, m.field, m.stored, m.expected) for m in report.mismatches}
    assert found == {
        (a.id, "balance", a_state.balance + 7, a_state.balance),
        (b.id, "balance", b_state.balance, b_state.balance - charge.amount),
        (b.id, "total_spent", b_state.total_spent, b_state.total_spent + charge.amount),
        (c.id, "reserved", 3, c_state.reserved),
    }
    assert len(report.mismatches) == 4


async def _cli_setup(config: StoreConfig) -> uuid.UUID:
    await upgrade(config)
    async with Store(config) as store:
        a, _, _ = await _mix(store)
        return a.id


async def _cli_tamper(config: StoreConfig, key_id: uuid.UUID) -> int:
    async with Store(config) as store:
        state = await store.api_keys.get(key_id)
        await run_sql(
            store,
            lambda conn: conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(total_deposited=api_keys.c.total_deposited + 1)
            ),
            write=True,
        )
        return state.total_deposited


def test_cli_verify_exit_codes(
    db_config: StoreConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if db_config.schema_name:
        monkeypatch.setenv("DATABASE_SCHEMA", db_config.schema_name)
    key_id = asyncio.run(_cli_setup(db_config))
    args = ["verify", "--url", db_config.url.get_secret_value()]
    assert main(args) == EXIT_OK
    captured = capsys.readouterr()
    assert "3 API key(s) agree with the ledger" in captured.out
    deposited = asyncio.run(_cli_tamper(db_config, key_id))
    assert main(args) == EXIT_TAMPERED == 5
    captured = capsys.readouterr()
    assert (
        f"api key {key_id}: total_deposited is {deposited + 1}, the ledger says {deposited}"
        in captured.out
    )
    assert "1 mismatch(es) in 3 API key(s)" in captured.err


# --- transactions --------------------------------------------------------------------------


async def test_operations_in_a_transaction_commit_together(store: Store) -> None:
    async with store.transaction() as tx:
        issued = await tx.api_keys.create(100)
        other = await tx.api_keys.create()
        await tx.api_keys.charge(issued.key.id, 10, idempotency_key="c")
        assert (
            await tx.api_keys.charge(issued.key.id, 10, idempotency_key="c")
            == (await tx.api_keys.ledger(issued.key.id))[0]
        )
        hold = await tx.api_keys.reserve(issued.key.id, 20)
        await tx.api_keys.settle(hold.id, 5)
        await tx.api_keys.transfer(issued.key.id, other.key.id, 15)
        withdrawal = await tx.api_keys.withdraw(other.key.id, 5, TOKEN, MINT)
        with pytest.raises(InsufficientBalanceError):  # refused, the transaction goes on
            await tx.api_keys.charge(other.key.id, 1000)
        with pytest.raises(TransactionError):
            await store.api_keys.get(issued.key.id)
    key = await store.api_keys.get(issued.key.id)
    assert (key.balance, key.reserved, key.total_spent) == (70, 0, 15)
    assert (await store.api_keys.get(other.key.id)).balance == 10
    assert (await store.api_keys.get_withdrawal(withdrawal.id)).status == "pending"
    assert await store.api_keys.authenticate(issued.secret) == key
    _chain_is_consistent(await _ledger(store, key.id))
    assert (await store.api_keys.verify()).ok


async def test_a_failed_transaction_writes_nothing(store: Store) -> None:
    payer = await _key(store, 100)
    payee = await _key(store, 10)
    withdrawal = await store.api_keys.withdraw(payee.id, 5, TOKEN, MINT)
    hold = await store.api_keys.reserve(payer.id, 20)
    before = await _everything(store)
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as tx:
            await tx.api_keys.charge(payer.id, 30, idempotency_key="c")
            await tx.api_keys.deposit(payee.id, 50)
            await tx.api_keys.create(40)
            await tx.api_keys.settle(hold.id, 10)
            await tx.api_keys.transfer(payer.id, payee.id, 5)
            await tx.api_keys.complete_withdrawal(withdrawal.id)
            assert (await tx.api_keys.get(payer.id)).balance == 55
            raise RuntimeError("boom")
    assert await _everything(store) == before
    # The idempotency key of the rolled-back charge is free again.
    entry = await store.api_keys.charge(payer.id, 30, idempotency_key="c")
    assert entry.balance_after == 70


async def test_a_refused_retry_inside_a_transaction_leaves_the_withdrawal_failed(
    store: Store,
) -> None:
    """retry_withdrawal() moves the row to pending before it debits; when the debit is
    refused inside store.transaction(), the caller catches the error and commits."""
    key = await _key(store, 100)
    withdrawal = await store.api_keys.withdraw(key.id, 60, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "mint down")
    await store.api_keys.charge(key.id, 50)
    before = await _everything(store)
    async with store.transaction() as tx:
        with pytest.raises(InsufficientBalanceError):
            await tx.api_keys.retry_withdrawal(withdrawal.id)
    assert (await store.api_keys.get_withdrawal(withdrawal.id)).status == "failed"
    assert await _everything(store) == before
    assert (await store.api_keys.verify()).ok


async def test_a_refused_transfer_inside_a_transaction_moves_nothing(store: Store) -> None:
    """transfer() debits the source before it credits the target; a refused credit (an
    overflow) inside store.transaction() must not leave the debit behind."""
    source = await _key(store, 100)
    full = await _key(store, MAX)
    before = await _everything(store)
    async with store.transaction() as tx:
        with pytest.raises(ValidationError):
            await tx.api_keys.transfer(source.id, full.id, 10)
    assert await _everything(store) == before
    assert (await store.api_keys.get(source.id)).balance == 100
