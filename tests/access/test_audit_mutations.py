"""The audit log: the events of audited project mutations (in and out of transactions),
and ``audit verify``, on every driver."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from llmstore import AuditEvent, ConflictError, NotFoundError, Store, StoreConfig, ValidationError
from llmstore._cli.main import EXIT_OK, EXIT_TAMPERED, main
from llmstore._db.schema import audit_events
from llmstore.migrations._commands import upgrade
from tests.access.audit_support import GENESIS, _delete, _record_n, _tamper
from tests.helpers import count_rows

# --- audited mutations ---------------------------------------------------------------


async def test_project_create_with_actor_writes_an_event(store: Store) -> None:
    project = await store.projects.create("acme", actor="alice")
    (event,) = await store.audit.list()
    assert event.action == "project.create"
    assert event.actor == "alice"
    assert event.outcome == "success"
    assert event.project_id == project.id
    assert event.seq == 1
    assert await store.audit.list(project_id=project.id) == [event]
    assert (await store.audit.verify()).ok


async def test_every_project_mutation_is_audited(store: Store) -> None:
    project = await store.projects.create("acme", actor="alice")
    await store.projects.update(project.id, name="acme-2", actor="bob")
    await store.projects.deactivate(project.id, actor="carol")
    await store.projects.activate(project.id, actor="dave")
    await store.projects.delete(project.id, actor="erin")
    events = (await store.audit.list())[::-1]
    assert [(e.action, e.actor) for e in events] == [
        ("project.create", "alice"),
        ("project.update", "bob"),
        ("project.deactivate", "carol"),
        ("project.activate", "dave"),
        ("project.delete", "erin"),
    ]
    assert all(e.project_id == project.id and e.outcome == "success" for e in events)
    report = await store.audit.verify()
    assert report.ok and report.events_checked == 5


async def test_mutations_without_actor_are_not_audited(store: Store) -> None:
    project = await store.projects.create("quiet")
    await store.projects.update(project.id, name="quieter")
    await store.projects.delete(project.id)
    assert await count_rows(store, audit_events) == 0


async def test_failed_mutations_write_no_event(store: Store) -> None:
    await store.projects.create("taken", actor="alice")
    with pytest.raises(ConflictError):
        await store.projects.create("taken", actor="bob")
    with pytest.raises(NotFoundError):
        await store.projects.delete(uuid.uuid4(), actor="bob")
    with pytest.raises(ValidationError):
        await store.projects.create("fresh", actor="")
    assert [p.name for p in await store.projects.list()] == ["taken"]
    assert [e.actor for e in await store.audit.list()] == ["alice"]
    report = await store.audit.verify()
    assert report.ok and report.head_seq == 1


async def test_rolled_back_transaction_leaves_neither_project_nor_event(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as tx:
            project = await tx.projects.create("doomed", actor="alice")
            await tx.audit.record("extra", "alice", "success", project_id=project.id)
            assert len(await tx.audit.list()) == 2
            raise RuntimeError("boom")
    with pytest.raises(NotFoundError):
        await store.projects.get(project.id)
    assert await store.projects.list() == []
    assert await store.audit.list() == []
    assert await count_rows(store, audit_events) == 0
    report = await store.audit.verify()
    assert report.ok and report.head_seq == 0
    event = await store.audit.record("after", "alice", "success")
    assert event.seq == 1 and event.prev_hash == GENESIS
    assert (await store.audit.verify()).ok


async def test_committed_transaction_keeps_project_and_events_together(store: Store) -> None:
    async with store.transaction() as tx:
        project = await tx.projects.create("kept", actor="alice")
        note = await tx.audit.record("note", "alice", "success", project_id=project.id)
    assert (await store.projects.get(project.id)).name == "kept"
    listed = await store.audit.list(project_id=project.id)
    assert [e.action for e in listed] == ["note", "project.create"]
    assert listed[0] == note
    assert (await store.audit.verify()).ok


# --- command line --------------------------------------------------------------------


async def _seed(config: StoreConfig, n: int) -> list[AuditEvent]:
    async with Store(config) as store:
        return await _record_n(store, n)


async def _tamper_config(config: StoreConfig, seq: int, **values: Any) -> None:
    async with Store(config) as store:
        await _tamper(store, seq, **values)


async def _delete_config(config: StoreConfig, seq: int) -> None:
    async with Store(config) as store:
        await _delete(store, seq)


def test_cli_audit_verify(schema_env: StoreConfig, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(upgrade(schema_env))
    args = ["audit", "verify", "--url", schema_env.url.get_secret_value()]
    assert main(args) == EXIT_OK
    assert "intact" in capsys.readouterr().out

    events = asyncio.run(_seed(schema_env, 3))
    assert main(args) == EXIT_OK
    out = capsys.readouterr()
    assert "intact" in out.out and "3 event" in out.out
    assert out.err == ""

    asyncio.run(_tamper_config(schema_env, 2, actor="mallory"))
    assert main(args) == EXIT_TAMPERED
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert "event 2" in out.err
    assert str(events[1].id) in out.err
    assert "content_altered" in out.err


def test_cli_audit_verify_detects_a_missing_tail(
    schema_env: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(upgrade(schema_env))
    asyncio.run(_seed(schema_env, 3))
    asyncio.run(_delete_config(schema_env, 3))
    assert main(["audit", "verify", "--url", schema_env.url.get_secret_value()]) == EXIT_TAMPERED
    out = capsys.readouterr()
    assert out.err.count("\n") == 1
    assert "event 3" in out.err and "events_missing" in out.err
