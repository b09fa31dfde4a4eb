"""Provider credentials: activate, deactivate and ensure_default (one active credential per
scope, also under races), on every driver (single process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import ConflictError, Store, ValidationError
from llmstore._db.schema import provider_credentials as table
from llmstore.pytest_plugin import run_sql
from tests.access.providers_support import GLOBAL, _active, _everything
from tests.helpers import new_project, refused

# --- activate / deactivate -----------------------------------------------------------------


async def test_activate_switches_atomically(store: Store) -> None:
    project = await new_project(store)
    made = [await store.providers.create("openai", f"m{i}") for i in range(4)]
    local = [await store.providers.create("openai", f"m{i}", project_id=project.id) for i in (0, 1)]
    for credential in [made[2], made[0], made[3], made[3], made[1]]:
        activated = await store.providers.activate(credential.id)
        assert activated.is_active is True
        assert await _active(store, GLOBAL) == [credential.id]
        assert await _active(store, project.id) == [local[0].id]  # the other scope is untouched
    switched = await store.providers.activate(local[1].id)
    assert await _active(store, project.id) == [switched.id]
    assert await _active(store, GLOBAL) == [made[1].id]


async def _waiting_on_locks(store: Store) -> int:
    """Postgres sessions waiting for a lock in a statement on this test's schema (or for
    an advisory lock, which names no table)."""
    schema = store.config.schema_name or table.name

    def count(conn: Any) -> int:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND (query LIKE :schema OR query LIKE '%pg_advisory_xact_lock%')"
                ),
                {"schema": f"%{schema}%"},
            ).scalar_one()
        )

    return await run_sql(store, count, single=True)


@pytest.mark.parametrize("racers", [3, 8])
async def test_concurrent_activations_leave_one_active(store: Store, racers: int) -> None:
    # activate() is documented as an atomic switch: racing switches in one scope must all
    # succeed (one of them ends up active), not leak the index's conflict to the caller.
    made = [await store.providers.create("openai", f"m{i}") for i in range(racers)]
    if store.driver != "postgresql":
        results = await asyncio.gather(
            *(store.providers.activate(c.id) for c in made[1:]), return_exceptions=True
        )
    else:
        # Hold the active row's lock until every switch is queued behind it, so that the
        # switches really race (otherwise they may simply run one after the other).
        # A connection of its own, in the store's schema: another replica's.
        engine = create_async_engine(
            store.config.url.get_secret_value(),
            poolclass=NullPool,
            execution_options={"schema_translate_map": {None: store.config.schema_name}},
        )
        async with engine.connect() as holder:
            await holder.execute(
                sa.select(table.c.id).where(table.c.id == made[0].id).with_for_update()
            )
            pending = asyncio.gather(
                *(store.providers.activate(c.id) for c in made[1:]), return_exceptions=True
            )
            for _ in range(300):
                if await _waiting_on_locks(store) >= racers - 1:
                    break
                await asyncio.sleep(0.01)
            await holder.rollback()
        await engine.dispose()
        results = await pending
    assert [r for r in results if isinstance(r, BaseException)] == []
    active = await _active(store, GLOBAL)
    assert len(active) == 1
    assert active[0] in {c.id for c in made[1:]}


async def test_concurrent_ensure_default_creates_one_credential(store: Store) -> None:
    results = await asyncio.gather(
        *(store.providers.ensure_default("openai", "gpt-4o", "sk-one") for _ in range(6))
    )
    assert len({r.id for r in results}) == 1
    assert len(await _everything(store)) == 1
    assert await _active(store, GLOBAL) == [results[0].id]


async def test_ensure_default_racing_a_commit_creates_no_duplicate(store: Store) -> None:
    """Another replica runs ensure_default while this one is between its look-up and its
    write.

    The window is forced: a listener on this store's engine stops before the statement
    that deactivates the scope and lets a second store (in another thread, as another
    replica would) run the same ensure_default, for up to a second. Without a lock the
    other replica finds nothing, creates the credential and commits inside the window,
    and this one then creates a second; with one, it waits for this one to commit.
    """
    if store.driver != "postgresql":
        # SQLite holds the write lock from BEGIN IMMEDIATE: the interleaving cannot happen.
        first = await store.providers.ensure_default("openai", "gpt-4o")
        assert await store.providers.ensure_default("openai", "gpt-4o") == first
        return
    other_ids: list[uuid.UUID] = []
    failures: list[BaseException] = []
    threads: list[threading.Thread] = []

    async def other_replica() -> None:
        async with Store(store.config) as other:
            other_ids.append((await other.providers.ensure_default("openai", "gpt-4o")).id)

    def run_other_replica() -> None:
        try:
            asyncio.run(other_replica())
        except BaseException as exc:
            failures.append(exc)

    def pause(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not threads and statement.lstrip().upper().startswith("UPDATE"):
            threads.append(threading.Thread(target=run_other_replica))
            threads[0].start()
            threads[0].join(timeout=1.0)

    # On every engine (SQLAlchemy's class-level event): only this store runs statements
    # until the window opens.
    event.listen(Engine, "before_cursor_execute", pause)
    try:
        mine = await store.providers.ensure_default("openai", "gpt-4o")
    finally:
        event.remove(Engine, "before_cursor_execute", pause)
    assert len(threads) == 1  # the window was opened
    await asyncio.to_thread(threads[0].join, 30)
    assert failures == []
    stored = [(c.provider, c.model) for c in await _everything(store)]
    assert stored == [("openai", "gpt-4o")], "ensure_default created a duplicate"
    assert other_ids == [mine.id]
    assert await _active(store, GLOBAL) == [mine.id]


async def test_deactivate(store: Store) -> None:
    made = await store.providers.create("openai", "gpt-4o")
    off = await store.providers.deactivate(made.id)
    assert off.is_active is False
    assert off.updated_at >= made.updated_at
    assert await store.providers.get(made.id) == off
    assert (await store.providers.deactivate(made.id)).is_active is False
    assert await _active(store, GLOBAL) == []
    # An empty scope makes the next active=None credential active.
    assert (await store.providers.create("anthropic", "claude")).is_active is True


async def test_the_database_enforces_one_active_credential_per_scope(store: Store) -> None:
    project = await new_project(store)
    globals_ = [await store.providers.create("openai", f"m{i}") for i in range(3)]
    local = [await store.providers.create("openai", f"m{i}", project_id=project.id) for i in (0, 1)]
    before = await _everything(store)

    def activate_all(scope: str) -> Callable[[Any], object]:
        return lambda conn: conn.execute(
            sa.update(table).where(table.c.scope == scope).values(is_active=True)
        )

    with pytest.raises(ConflictError):
        await run_sql(store, activate_all("global"), write=True)
    with pytest.raises(ConflictError):
        await run_sql(store, activate_all(str(project.id)), write=True)
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ConflictError):
        await run_sql(
            store,
            lambda conn: conn.execute(
                sa.insert(table).values(
                    id=uuid.uuid4(),
                    project_id=None,
                    scope="global",
                    provider="raw",
                    model="raw",
                    is_active=True,
                    created_at=now,
                    updated_at=now,
                )
            ),
            write=True,
        )
    assert await _everything(store) == before
    # Inactive rows are not covered by the index; active rows of different scopes coexist.
    await run_sql(
        store,
        lambda conn: conn.execute(
            sa.update(table).where(table.c.id == globals_[1].id).values(is_active=False)
        ),
        write=True,
    )
    assert await _active(store, GLOBAL) == [globals_[0].id]
    assert await _active(store, project.id) == [local[0].id]


async def test_the_partial_unique_index_exists(store: Store) -> None:
    def index_names(conn: Any) -> dict[str, bool]:
        schema = store.config.schema_name
        indexes = sa.inspect(conn).get_indexes(table.name, schema=schema)
        return {index["name"]: bool(index["unique"]) for index in indexes}

    names = await run_sql(store, index_names)
    assert names.get("llmstore_provider_credentials_active_scope_key") is True


# --- ensure_default ---------------------------------------------------------------------------


async def test_ensure_default_is_idempotent(store: Store) -> None:
    first = await store.providers.ensure_default("openai", "gpt-4o", "sk-one")
    assert first.is_active is True and first.project_id is None and first.has_api_key
    again = await store.providers.ensure_default("openai", "gpt-4o", "sk-one")
    assert again == first  # nothing changed, not even updated_at
    without_key = await store.providers.ensure_default("openai", "gpt-4o")
    assert without_key.id == first.id
    assert await store.providers.reveal_api_key(first.id) == "sk-one"  # kept
    assert len(await _everything(store)) == 1
    rotated = await store.providers.ensure_default("openai", "gpt-4o", "sk-two")
    assert rotated.id == first.id
    assert rotated.updated_at >= first.updated_at
    assert await store.providers.reveal_api_key(first.id) == "sk-two"
    assert len(await _everything(store)) == 1


async def test_ensure_default_switches_models_without_duplicates(store: Store) -> None:
    old = await store.providers.ensure_default("openai", "gpt-4o", "sk-one")
    new = await store.providers.ensure_default("openai", "gpt-5")
    assert new.id != old.id
    assert await _active(store, GLOBAL) == [new.id]
    assert (await store.providers.get(old.id)).is_active is False
    back = await store.providers.ensure_default("openai", "gpt-4o")
    assert back.id == old.id
    assert back.is_active is True
    assert await _active(store, GLOBAL) == [old.id]
    assert await store.providers.reveal_api_key(old.id) == "sk-one"
    assert {(c.provider, c.model) for c in await _everything(store)} == {
        ("openai", "gpt-4o"),
        ("openai", "gpt-5"),
    }
    assert len(await _everything(store)) == 2
    # Another provider with the same model is a different credential.
    other = await store.providers.ensure_default("azure", "gpt-4o")
    assert other.id not in {old.id, new.id}
    assert await _active(store, GLOBAL) == [other.id]


async def test_ensure_default_reactivates_a_deactivated_default(store: Store) -> None:
    made = await store.providers.ensure_default("openai", "gpt-4o")
    await store.providers.deactivate(made.id)
    assert await _active(store, GLOBAL) == []
    again = await store.providers.ensure_default("openai", "gpt-4o")
    assert again.id == made.id and again.is_active is True
    assert await _active(store, GLOBAL) == [made.id]


async def test_ensure_default_ignores_project_credentials(store: Store) -> None:
    project = await new_project(store)
    local = await store.providers.create("openai", "gpt-4o", project_id=project.id)
    default = await store.providers.ensure_default("openai", "gpt-4o")
    assert default.id != local.id
    assert default.project_id is None
    assert await _active(store, project.id) == [local.id]
    assert await store.providers.resolve(project.id) == await store.providers.get(local.id)


async def test_ensure_default_sets_the_base_url(store: Store) -> None:
    made = await store.providers.ensure_default("ollama", "llama3")
    moved = await store.providers.ensure_default(
        "ollama", "llama3", base_url="http://localhost:11434/v1"
    )
    assert moved.id == made.id
    assert moved.base_url == "http://localhost:11434/v1"
    kept = await store.providers.ensure_default("ollama", "llama3")
    assert kept.base_url == "http://localhost:11434/v1"


async def test_ensure_default_validates_before_writing(store: Store) -> None:
    cases: list[dict[str, Any]] = [
        {"provider": "OpenAI", "model": "m"},
        {"provider": "openai", "model": ""},
        {"provider": "openai", "model": "m", "api_key": ""},
        {"provider": "openai", "model": "m", "api_key": " sk "},
        {"provider": "openai", "model": "m", "base_url": "ftp://example.com"},
        {"provider": "openai", "model": "m", "actor": ""},
    ]
    for kwargs in cases:
        await refused(
            ValidationError, lambda kw=kwargs: store.providers.ensure_default(**kw), kwargs
        )
    assert await _everything(store) == []
    assert await store.audit.list() == []
