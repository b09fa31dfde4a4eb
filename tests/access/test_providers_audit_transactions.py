"""Provider credentials: the project cascade, audited mutations and transactions, on every
driver (single process)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

from llmstore import NotFoundError, Store, TransactionError
from tests.access.providers_support import _active, _everything
from tests.helpers import new_project, refused


async def test_deleting_the_project_deletes_its_credentials(store: Store) -> None:
    doomed = await new_project(store, "doomed")
    kept = await new_project(store, "kept")
    global_ = await store.providers.create("openai", "gpt-4o")
    gone = [
        await store.providers.create("anthropic", f"c{i}", project_id=doomed.id, api_key="sk")
        for i in range(3)
    ]
    survivor = await store.providers.create("gemini", "pro", project_id=kept.id)
    await store.projects.delete(doomed.id)
    for credential in gone:
        with pytest.raises(NotFoundError):
            await store.providers.get(credential.id)
    assert await store.providers.list(project_id=doomed.id) == []
    assert {c.id for c in await _everything(store)} == {global_.id, survivor.id}
    assert await store.providers.resolve(doomed.id) == global_
    assert await store.providers.resolve(kept.id) == survivor


async def test_actor_writes_one_audit_event_per_mutation(store: Store) -> None:
    project = await new_project(store)
    made = await store.providers.create("openai", "gpt-4o", project_id=project.id, actor="alice")
    spare = await store.providers.create("openai", "gpt-5", project_id=project.id)
    assert len(await store.audit.list()) == 1
    steps: list[tuple[str, str, uuid.UUID, Callable[[], Awaitable[object]] | None]] = [
        ("provider.create", "alice", made.id, None),
        (
            "provider.update",
            "bob",
            made.id,
            lambda: store.providers.update(made.id, api_key="sk-new", actor="bob"),
        ),
        (
            "provider.activate",
            "carol",
            spare.id,
            lambda: store.providers.activate(spare.id, actor="carol"),
        ),
        (
            "provider.deactivate",
            "dave",
            spare.id,
            lambda: store.providers.deactivate(spare.id, actor="dave"),
        ),
        ("provider.delete", "erin", made.id, lambda: store.providers.delete(made.id, actor="erin")),
    ]
    for count, (action, actor, credential_id, call) in enumerate(steps, start=1):
        if call is not None:
            await call()
        events = await store.audit.list()
        assert len(events) == count
        newest = events[0]
        assert (newest.action, newest.actor, newest.outcome) == (action, actor, "success")
        assert newest.project_id == project.id
        assert newest.token_id is None
        assert newest.metadata is not None
        assert newest.metadata["credential_id"] == str(credential_id)
        assert "sk-new" not in repr(newest)
    assert (await store.audit.verify()).ok


async def test_ensure_default_with_actor_is_audited(store: Store) -> None:
    created = await store.providers.ensure_default("openai", "gpt-4o", actor="ops")
    events = await store.audit.list(actor="ops")
    assert len(events) == 1
    assert events[0].project_id is None
    assert events[0].metadata == {
        "credential_id": str(created.id),
        "provider": "openai",
        "model": "gpt-4o",
    }
    switched = await store.providers.ensure_default("openai", "gpt-5", actor="ops")
    back = await store.providers.ensure_default("openai", "gpt-4o", actor="ops")
    assert back.id == created.id
    events = await store.audit.list(actor="ops")
    assert len(events) == 3
    assert events[1].metadata is not None
    assert events[1].metadata["credential_id"] == str(switched.id)
    assert events[0].metadata is not None
    assert events[0].metadata["credential_id"] == str(created.id)
    assert all(e.action.startswith("provider.") for e in events)


async def test_without_actor_nothing_is_audited(store: Store) -> None:
    made = await store.providers.create("openai", "gpt-4o")
    other = await store.providers.create("openai", "gpt-5")
    await store.providers.update(made.id, model="gpt-4.1")
    await store.providers.activate(other.id)
    await store.providers.deactivate(other.id)
    await store.providers.ensure_default("azure", "gpt-4o")
    await store.providers.delete(made.id)
    assert await store.audit.list() == []


async def test_a_failed_mutation_with_actor_writes_no_event(store: Store) -> None:
    project = await new_project(store)
    await store.providers.create("openai", "gpt-4o", actor="alice")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.providers.update(uuid.uuid4(), model="x", actor="mallory"),
        lambda: store.providers.activate(uuid.uuid4(), actor="mallory"),
        lambda: store.providers.deactivate(uuid.uuid4(), actor="mallory"),
        lambda: store.providers.delete(uuid.uuid4(), actor="mallory"),
        lambda: store.providers.create("x", "y", project_id=uuid.uuid4(), actor="mallory"),
    ]
    for number, call in enumerate(calls):
        await refused(NotFoundError, call, number)
    await store.projects.delete(project.id)
    assert [e.actor for e in await store.audit.list()] == ["alice"]
    assert await store.audit.list(actor="mallory") == []


async def test_changes_in_a_transaction_commit_together(store: Store) -> None:
    project = await new_project(store)
    async with store.transaction() as tx:
        first = await tx.providers.create("openai", "gpt-4o", project_id=project.id)
        second = await tx.providers.create("openai", "gpt-5", project_id=project.id)
        await tx.providers.activate(second.id, actor="alice")
        assert (await tx.providers.resolve(project.id)).id == second.id
        with pytest.raises(TransactionError):
            await store.providers.get(first.id)
    assert await _active(store, project.id) == [second.id]
    assert [e.action for e in await store.audit.list()] == ["provider.activate"]


async def test_a_failed_transaction_rolls_back_every_change(store: Store) -> None:
    project = await new_project(store)
    kept = await store.providers.create("openai", "gpt-4o", project_id=project.id)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with store.transaction() as tx:
            new = await tx.providers.create(
                "anthropic", "claude", project_id=project.id, active=True, actor="alice"
            )
            await tx.providers.ensure_default("openai", "gpt-4o", "sk-tx")
            await tx.providers.update(kept.id, model="changed")
            assert (await tx.providers.resolve(project.id)).id == new.id
            raise Boom
    assert await _everything(store) == [kept]
    assert await store.providers.resolve(project.id) == kept
    assert await store.audit.list() == []
