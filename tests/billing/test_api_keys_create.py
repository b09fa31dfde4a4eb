"""API keys: create, authenticate, get and list, on every driver, in a single process."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import uuid
from typing import Any

import pytest

from llmstore import (
    ApiKey,
    ApiKeyRejectedError,
    IssuedApiKey,
    LedgerEntry,
    NotFoundError,
    Store,
    ValidationError,
)
from tests.billing.api_keys_support import MAX, TABLES, _everything, _key, _ledger
from tests.helpers import now, refused

SHAPE = re.compile(r"lsk_[A-Za-z0-9_-]{43}")


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
