"""API keys: ``actor=`` on every mutation writes its ``api_key.*`` event with the change,
in one transaction; without an actor nothing is audited, on every driver."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest

from llmstore import (
    ApiKeyRejectedError,
    AuditEvent,
    InsufficientBalanceError,
    NotFoundError,
    Store,
    ValidationError,
)
from tests.billing.api_keys_support import MINT, TOKEN, _everything
from tests.helpers import new_project, now, refused


async def _events(store: Store) -> list[AuditEvent]:
    """Every event, oldest first."""
    return (await store.audit.list(limit=1000))[::-1]


async def test_every_mutation_with_an_actor_writes_its_event(store: Store) -> None:
    project = await new_project(store)
    api = store.api_keys
    issued = await api.create(100, project_id=project.id, metadata={"m": 1}, actor="alice")
    key = issued.key.id
    other = (await api.create(0, actor="alice")).key.id  # no project
    deposit = await api.deposit(key, 50, idempotency_key="d", actor="bob")
    charge = await api.charge(key, 20, request_data={"model": "m"}, actor="bob")
    debit, _ = await api.transfer(key, other, 5, actor="bob")
    hold = await api.reserve(key, 30, actor="bob")
    await api.extend(hold.id, dt.timedelta(minutes=30), actor="bob")
    settlement = await api.settle(hold.id, 10, actor="bob")
    freed = await api.reserve(key, 5)
    await api.release(freed.id, actor="bob")
    paid = await api.withdraw(key, 7, TOKEN, MINT, actor="carol")
    await api.fail_withdrawal(paid.id, "mint offline", actor="carol")
    await api.retry_withdrawal(paid.id, actor="carol")
    await api.complete_withdrawal(paid.id, actor="carol")
    await api.update(key, expires_at=None, metadata={"m": 2}, actor="dave")
    await api.deactivate(key, actor="dave")
    await api.activate(key, actor="dave")
    expiring = (await api.create(0, expires_at=now() - dt.timedelta(seconds=1))).key.id
    assert await api.cleanup_expired(actor="erin") == 1
    await api.transfer(other, key, 5)  # no actor: no event
    await api.deactivate(other)
    await api.delete(other, actor="erin")

    events = await _events(store)
    assert [(e.action, e.actor) for e in events] == [
        ("api_key.create", "alice"),
        ("api_key.create", "alice"),
        ("api_key.deposit", "bob"),
        ("api_key.charge", "bob"),
        ("api_key.transfer", "bob"),
        ("api_key.reserve", "bob"),
        ("api_key.extend", "bob"),
        ("api_key.settle", "bob"),
        ("api_key.release", "bob"),
        ("api_key.withdraw", "carol"),
        ("api_key.fail_withdrawal", "carol"),
        ("api_key.retry_withdrawal", "carol"),
        ("api_key.complete_withdrawal", "carol"),
        ("api_key.update", "dave"),
        ("api_key.deactivate", "dave"),
        ("api_key.activate", "dave"),
        ("api_key.cleanup_expired", "erin"),
        ("api_key.delete", "erin"),
    ]
    assert all(e.outcome == "success" and e.token_id is None for e in events)
    by_key = {e.action: e for e in events if e.metadata and e.metadata["api_key_id"] == str(key)}
    # Each event names the key's project (None for a key without one) and the key.
    assert {e.project_id for e in by_key.values()} == {project.id}
    assert [e.project_id for e in events if e.action == "api_key.create"] == [project.id, None]
    assert events[-2].metadata == {"api_key_id": str(expiring)}
    assert events[-1].metadata == {"api_key_id": str(other)}
    assert events[-1].project_id is None
    meta = {action: event.metadata or {} for action, event in by_key.items()}
    assert meta["api_key.create"] == {"api_key_id": str(key), "amount": 100}
    assert meta["api_key.deposit"] == {
        "api_key_id": str(key),
        "amount": 50,
        "entry_id": deposit.id,
        "idempotency_key": "d",
    }
    assert meta["api_key.charge"] == {"api_key_id": str(key), "amount": 20, "entry_id": charge.id}
    assert meta["api_key.transfer"] == {
        "api_key_id": str(key),
        "amount": 5,
        "to_api_key_id": str(other),
        "transfer_id": str(debit.transfer_id),
    }
    assert meta["api_key.reserve"]["amount"] == 30
    assert meta["api_key.reserve"]["reservation_id"] == str(hold.id)
    assert meta["api_key.extend"]["amount"] == 30
    assert meta["api_key.settle"] == {
        "api_key_id": str(key),
        "reservation_id": str(hold.id),
        "amount": -settlement.amount,
        "actual_amount": 10,
        "shortfall": 0,
    }
    assert meta["api_key.release"] == {
        "api_key_id": str(key),
        "reservation_id": str(freed.id),
        "amount": 5,
    }
    for action in ("withdraw", "fail_withdrawal", "retry_withdrawal", "complete_withdrawal"):
        assert meta[f"api_key.{action}"] == {
            "api_key_id": str(key),
            "withdrawal_id": str(paid.id),
            "amount": 7,
            "mint_url": MINT,
        }
    assert meta["api_key.update"] == {"api_key_id": str(key), "changed": ["expires_at", "metadata"]}
    assert meta["api_key.deactivate"] == {"api_key_id": str(key)}
    # Never a secret: not the key's, not the withdrawal's token.
    text = json.dumps([e.model_dump(mode="json") for e in events])
    assert issued.secret not in text and issued.secret[4:] not in text
    assert TOKEN not in text
    assert (await store.audit.verify()).ok
    assert (await store.api_keys.verify()).ok


async def test_without_an_actor_nothing_is_audited(store: Store) -> None:
    api = store.api_keys
    key = (await api.create(100)).key.id
    await api.deposit(key, 5)
    await api.charge(key, 5)
    hold = await api.reserve(key, 5)
    await api.extend(hold.id, dt.timedelta(minutes=1))
    await api.settle(hold.id, 5)
    paid = await api.withdraw(key, 5, TOKEN, MINT)
    await api.complete_withdrawal(paid.id)
    await api.update(key, metadata={"a": 1})
    await api.deactivate(key)
    await api.activate(key)
    assert await api.cleanup_expired() == 0
    assert await store.audit.list() == []


async def test_a_refused_audited_call_writes_neither_change_nor_event(store: Store) -> None:
    api = store.api_keys
    key = (await api.create(10)).key.id
    hold = await api.reserve(key, 5)
    await api.settle(hold.id, 5)
    before = await _everything(store)
    for error, call in [
        (InsufficientBalanceError, lambda: api.charge(key, 50, actor="alice")),
        (InsufficientBalanceError, lambda: api.reserve(key, 50, actor="alice")),
        (InsufficientBalanceError, lambda: api.withdraw(key, 50, TOKEN, MINT, actor="alice")),
        (NotFoundError, lambda: api.deposit(uuid.uuid4(), 5, actor="alice")),
        (NotFoundError, lambda: api.charge(uuid.uuid4(), 5, actor="alice")),
        (NotFoundError, lambda: api.reserve(uuid.uuid4(), 5, actor="alice")),
        (NotFoundError, lambda: api.deactivate(uuid.uuid4(), actor="alice")),
        (NotFoundError, lambda: api.create(project_id=uuid.uuid4(), actor="alice")),
        (ValidationError, lambda: api.charge(key, 1, actor="")),
        (ValidationError, lambda: api.deposit(key, 1, actor="x" * 201)),
        (ValidationError, lambda: api.settle(hold.id, 5, actor=5)),  # type: ignore[arg-type]
        (ValidationError, lambda: api.update(key, actor="alice")),
    ]:
        await refused(error, call, "refused")
    await api.deactivate(key)
    before = await _everything(store)
    await refused(ApiKeyRejectedError, lambda: api.charge(key, 1, actor="alice"), "inactive")
    assert await _everything(store) == before
    assert await store.audit.list() == []


async def test_a_replayed_call_is_not_audited_twice(store: Store) -> None:
    api = store.api_keys
    key = (await api.create(100)).key.id
    other = (await api.create(0)).key.id
    first = await api.charge(key, 10, idempotency_key="c", actor="alice")
    assert await api.charge(key, 10, idempotency_key="c", actor="alice") == first
    assert await api.charge(key, 10, idempotency_key="c") == first
    pair = await api.transfer(key, other, 5, idempotency_key="t", actor="alice")
    assert await api.transfer(key, other, 5, idempotency_key="t", actor="alice") == pair
    hold = await api.reserve(key, 5)
    settled = await api.settle(hold.id, 5, actor="alice")
    assert await api.settle(hold.id, 5, actor="alice") == settled
    actions = [e.action for e in await _events(store)]
    assert actions == ["api_key.charge", "api_key.transfer", "api_key.settle"]


async def test_an_audited_call_in_a_transaction_is_undone_with_it(store: Store) -> None:
    key = (await store.api_keys.create(100)).key.id
    before = await _everything(store)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.api_keys.charge(key, 10, actor="alice")
            await tx.api_keys.deactivate(key, actor="alice")
            assert len(await tx.audit.list()) == 2
            raise RuntimeError("roll back")
    assert await _everything(store) == before
    assert await store.audit.list() == []
    async with store.transaction() as tx:
        await tx.api_keys.charge(key, 10, actor="alice")
        hold = await tx.api_keys.reserve(key, 10, actor="alice")
        await tx.api_keys.settle(hold.id, 3, actor="alice")
    actions = [e.action for e in await _events(store)]
    assert actions == ["api_key.charge", "api_key.reserve", "api_key.settle"]
    assert (await store.api_keys.get(key)).balance == 87


@pytest.mark.parametrize("actor", ["a", "a" * 200, "svc:billing/worker-1"])
async def test_an_actor_is_any_label_up_to_200_characters(store: Store, actor: str) -> None:
    key = (await store.api_keys.create(5)).key.id
    await store.api_keys.charge(key, 1, actor=actor)
    (event,) = await store.audit.list(actor=actor)
    assert event.action == "api_key.charge"
    extra: dict[str, Any] = {"api_key_id": str(key), "amount": 1}
    assert {k: event.metadata[k] for k in extra} == extra if event.metadata else False
