"""The provider credentials repository, on every driver (single process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import (
    ConflictError,
    NotFoundError,
    ProviderCredential,
    Store,
    TransactionError,
    ValidationError,
)
from llmstore._db.schema import provider_credentials as table
from llmstore.pytest_plugin import run_sql
from tests.helpers import column_value, every_page, new_project, refused

GLOBAL = None


async def _everything(store: Store) -> list[ProviderCredential]:
    return await store.providers.list(limit=1000)


async def _active(store: Store, project_id: uuid.UUID | None) -> list[uuid.UUID]:
    """Ids of the active credentials in one scope (a project, or global for None)."""
    return [c.id for c in await _everything(store) if c.project_id == project_id and c.is_active]


# --- create / get / list ----------------------------------------------------------------------


async def test_create_returns_a_frozen_record(store: Store) -> None:
    before = dt.datetime.now(dt.UTC)
    made = await store.providers.create(
        "openai", "gpt-4o", base_url="https://api.openai.com/v1", api_key="sk-one"
    )
    assert isinstance(made, ProviderCredential)
    assert (made.provider, made.model, made.base_url) == (
        "openai",
        "gpt-4o",
        "https://api.openai.com/v1",
    )
    assert made.project_id is None
    assert made.has_api_key is True
    assert made.is_active is True  # the first of its scope
    assert made.created_at == made.updated_at
    assert made.created_at.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=5) <= made.created_at <= dt.datetime.now(dt.UTC)
    assert await store.providers.get(made.id) == made
    assert await store.providers.get(str(made.id)) == made
    with pytest.raises(Exception, match="frozen"):
        made.model = "other"  # type: ignore[misc]
    keyless = await store.providers.create("ollama", "llama3")
    assert keyless.has_api_key is False and keyless.base_url is None


async def test_active_none_activates_only_the_first_of_a_scope(store: Store) -> None:
    first = await store.providers.create("openai", "gpt-4o")
    second = await store.providers.create("anthropic", "claude")
    assert first.is_active is True
    assert second.is_active is False
    assert await _active(store, GLOBAL) == [first.id]
    # An explicitly inactive first credential leaves the scope empty...
    project = await new_project(store)
    idle = await store.providers.create("openai", "gpt-4o", project_id=project.id, active=False)
    assert idle.is_active is False
    assert await _active(store, project.id) == []
    # ...so the next one with active=None becomes active.
    chosen = await store.providers.create("gemini", "flash", project_id=project.id)
    assert chosen.is_active is True
    assert await _active(store, project.id) == [chosen.id]
    assert await _active(store, GLOBAL) == [first.id]


async def test_active_true_switches_the_scope(store: Store) -> None:
    first = await store.providers.create("openai", "gpt-4o")
    second = await store.providers.create("anthropic", "claude", active=True)
    assert second.is_active is True
    assert await _active(store, GLOBAL) == [second.id]
    old = await store.providers.get(first.id)
    assert old.is_active is False
    assert old.updated_at >= first.updated_at
    third = await store.providers.create("gemini", "flash", active=False)
    assert third.is_active is False
    assert await _active(store, GLOBAL) == [second.id]


async def test_scopes_are_separate(store: Store) -> None:
    alpha = await new_project(store, "alpha")
    beta = await new_project(store, "beta")
    global_ = await store.providers.create("openai", "gpt-4o")
    in_alpha = await store.providers.create("anthropic", "claude", project_id=alpha.id)
    in_beta = await store.providers.create("anthropic", "claude", project_id=str(beta.id))
    assert (in_alpha.is_active, in_beta.is_active) == (True, True)
    assert in_alpha.project_id == alpha.id and in_beta.project_id == beta.id
    switched = await store.providers.create("gemini", "pro", project_id=alpha.id, active=True)
    assert await _active(store, alpha.id) == [switched.id]
    assert await _active(store, beta.id) == [in_beta.id]
    assert await _active(store, GLOBAL) == [global_.id]
    assert [c.id for c in await store.providers.list(project_id=alpha.id)] == sorted(
        [in_alpha.id, switched.id]
    )
    assert [c.id for c in await store.providers.list(project_id=beta.id)] == [in_beta.id]


async def test_list_pages_by_keyset(store: Store) -> None:
    project = await new_project(store)
    made = [await store.providers.create("openai", f"m{i}") for i in range(5)]
    for i in range(4):
        made.append(await store.providers.create("openai", f"p{i}", project_id=project.id))
    everything = await _everything(store)
    assert [c.id for c in everything] == sorted(c.id for c in made)
    assert await every_page(lambda after: store.providers.list(limit=2, after=after), 2) == (
        everything
    )
    assert await store.providers.list(limit=3, after=str(everything[2].id)) == everything[3:6]
    assert await store.providers.list(project_id=uuid.uuid4()) == []
    for limit in (0, -1, 1001, 2.5, True, "10"):
        await refused(ValidationError, lambda li=limit: store.providers.list(limit=li), limit)


async def test_create_for_an_unknown_project_is_not_found(store: Store) -> None:
    existing = await store.providers.create("openai", "gpt-4o")
    with pytest.raises(NotFoundError):
        await store.providers.create("openai", "gpt-4o", project_id=uuid.uuid4())
    with pytest.raises(NotFoundError):
        await store.providers.create(
            "openai", "gpt-4o", project_id=uuid.uuid4(), active=True, actor="admin"
        )
    assert await _everything(store) == [existing]
    assert await store.audit.list() == []


# --- resolve --------------------------------------------------------------------------------


async def test_resolve_prefers_the_project_then_the_global_default(store: Store) -> None:
    project = await new_project(store)
    other = await new_project(store)
    with pytest.raises(NotFoundError):
        await store.providers.resolve(project.id)
    idle_global = await store.providers.create("openai", "gpt-4o", active=False)
    with pytest.raises(NotFoundError):
        await store.providers.resolve(project.id)
    global_ = await store.providers.activate(idle_global.id)
    assert await store.providers.resolve(project.id) == global_
    own = await store.providers.create("anthropic", "claude", project_id=project.id)
    assert await store.providers.resolve(project.id) == own
    assert await store.providers.resolve(str(project.id)) == own
    assert await store.providers.resolve(other.id) == global_
    # Resolution does not look at other projects, nor need the project to exist.
    assert await store.providers.resolve(uuid.uuid4()) == global_
    await store.providers.deactivate(own.id)
    assert await store.providers.resolve(project.id) == global_
    await store.providers.deactivate(global_.id)
    with pytest.raises(NotFoundError):
        await store.providers.resolve(project.id)
    await store.providers.activate(own.id)
    assert (await store.providers.resolve(project.id)).id == own.id


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


# --- update / delete / reveal ---------------------------------------------------------------


async def test_update_each_field(store: Store) -> None:
    made = await store.providers.create(
        "openai", "gpt-4o", base_url="https://a.example/v1", api_key="sk-one"
    )
    renamed = await store.providers.update(made.id, provider="azure")
    assert (renamed.provider, renamed.model) == ("azure", "gpt-4o")
    remodelled = await store.providers.update(made.id, model="gpt-5")
    assert remodelled.model == "gpt-5"
    moved = await store.providers.update(made.id, base_url="http://b.example:8080/v1")
    assert moved.base_url == "http://b.example:8080/v1"
    rekeyed = await store.providers.update(made.id, api_key="sk-two")
    assert rekeyed.has_api_key is True
    assert await store.providers.reveal_api_key(made.id) == "sk-two"
    cleared = await store.providers.update(made.id, base_url=None, api_key=None)
    assert (cleared.base_url, cleared.has_api_key) == (None, False)
    assert await store.providers.reveal_api_key(made.id) is None
    assert await column_value(store, table.c.api_key_encrypted, made.id) is None
    assert cleared.is_active is True  # update never switches
    assert cleared.created_at == made.created_at
    assert cleared.updated_at >= made.updated_at
    assert await store.providers.get(made.id) == cleared


async def test_update_needs_a_change_and_validates_it(store: Store) -> None:
    made = await store.providers.create("openai", "gpt-4o", api_key="sk-keep")
    with pytest.raises(ValidationError, match="at least one"):
        await store.providers.update(made.id)
    with pytest.raises(ValidationError, match="at least one"):
        await store.providers.update(made.id, actor="admin")
    cases: list[dict[str, Any]] = [
        {"provider": "Open AI"},
        {"provider": None},
        {"model": ""},
        {"model": None},
        {"base_url": "not a url"},
        {"api_key": ""},
        {"api_key": "sk-x\n"},
        {"model": "fine", "base_url": "javascript:alert(1)"},
        {"model": "fine", "actor": ""},
    ]
    for kwargs in cases:
        await refused(
            ValidationError, lambda kw=kwargs: store.providers.update(made.id, **kw), kwargs
        )
    assert await store.providers.get(made.id) == made
    assert await store.providers.reveal_api_key(made.id) == "sk-keep"
    assert await store.audit.list() == []


async def test_delete(store: Store) -> None:
    project = await new_project(store)
    global_ = await store.providers.create("openai", "gpt-4o")
    local = await store.providers.create("anthropic", "claude", project_id=project.id)
    assert await store.providers.resolve(project.id) == local
    await store.providers.delete(local.id)
    with pytest.raises(NotFoundError):
        await store.providers.get(local.id)
    with pytest.raises(NotFoundError):
        await store.providers.delete(local.id)
    assert await store.providers.resolve(project.id) == global_
    assert await _everything(store) == [global_]
    # The scope is empty again: the next credential becomes active.
    assert (await store.providers.create("gemini", "pro", project_id=project.id)).is_active


async def test_unknown_ids_are_not_found(store: Store) -> None:
    existing = await store.providers.create("openai", "gpt-4o")
    missing = uuid.uuid4()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.providers.get(missing),
        lambda: store.providers.update(missing, model="x"),
        lambda: store.providers.activate(missing),
        lambda: store.providers.deactivate(missing),
        lambda: store.providers.delete(missing),
        lambda: store.providers.reveal_api_key(missing),
        lambda: store.providers.update(missing, model="x", actor="admin"),
        lambda: store.providers.activate(missing, actor="admin"),
        lambda: store.providers.deactivate(missing, actor="admin"),
        lambda: store.providers.delete(missing, actor="admin"),
    ]
    for number, call in enumerate(calls):
        await refused(NotFoundError, call, number)
    assert await _everything(store) == [existing]
    assert await store.audit.list() == []


@pytest.mark.parametrize("bad_id", ["not-a-uuid", 123, "", b"\x00" * 16])
async def test_malformed_ids_are_validation_errors(store: Store, bad_id: Any) -> None:
    existing = await store.providers.create("openai", "gpt-4o")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.providers.get(bad_id),
        lambda: store.providers.update(bad_id, model="x"),
        lambda: store.providers.activate(bad_id),
        lambda: store.providers.deactivate(bad_id),
        lambda: store.providers.delete(bad_id),
        lambda: store.providers.reveal_api_key(bad_id),
        lambda: store.providers.resolve(bad_id),
        lambda: store.providers.list(project_id=bad_id),
        lambda: store.providers.list(after=bad_id),
        lambda: store.providers.create("openai", "m", project_id=bad_id),
        lambda: store.providers.activate(bad_id, actor="admin"),
    ]
    for number, call in enumerate(calls):
        await refused(ValidationError, call, number)
    with pytest.raises(ValidationError):
        await store.providers.get(None)  # type: ignore[arg-type]
    assert await _everything(store) == [existing]
    assert await store.audit.list() == []


async def test_reveal_api_key_and_encryption_at_rest(store: Store) -> None:
    secret = "sk-provider-" + uuid.uuid4().hex
    made = await store.providers.create("openai", "gpt-4o", api_key=secret)
    assert secret not in repr(made)
    assert secret not in made.model_dump_json()
    stored = await column_value(store, table.c.api_key_encrypted, made.id)
    assert stored is not None
    assert secret not in stored
    assert stored.startswith("gAAAAA")  # a Fernet token
    assert await store.providers.reveal_api_key(made.id) == secret
    assert await store.providers.reveal_api_key(str(made.id)) == secret
    keyless = await store.providers.create("ollama", "llama3")
    assert await store.providers.reveal_api_key(keyless.id) is None
    defaulted = await store.providers.ensure_default("azure", "gpt-4o", secret + "-2")
    default_stored = await column_value(store, table.c.api_key_encrypted, defaulted.id)
    assert default_stored is not None and secret not in default_stored
    assert await store.providers.reveal_api_key(defaulted.id) == secret + "-2"
    dump = await run_sql(store, lambda conn: repr(conn.execute(sa.select(table)).all()))
    assert "gpt-4o" in dump
    assert secret not in dump


# --- validation -----------------------------------------------------------------------------


BAD_PROVIDERS: list[Any] = [
    "OpenAI",
    "",
    " openai",
    "openai ",
    "1openai",
    "_openai",
    "-openai",
    "open ai",
    "open/ai",
    "ü",
    "a" * 51,
    "openai\n",
    None,
    42,
    b"openai",
]
BAD_URLS: list[Any] = [
    "",
    "   ",
    "ftp://example.com",
    "example.com",
    "localhost:8080",
    "http://",
    "https://",
    "http:// example.com",
    "https://exa mple.com/v1",
    "HTTPS//example.com",
    "file:///etc/passwd",
    "https://example.com/\n",
    "https://" + "a" * 2000,
    42,
]
BAD_MODELS: list[Any] = ["", "   ", "m" * 201, "tab\tmodel", None, 42]


async def test_bad_create_arguments_write_nothing(store: Store) -> None:
    cases: list[dict[str, Any]] = [
        *({"provider": bad, "model": "m"} for bad in BAD_PROVIDERS),
        *({"provider": "openai", "model": bad} for bad in BAD_MODELS),
        *({"provider": "openai", "model": "m", "base_url": bad} for bad in BAD_URLS),
        {"provider": "openai", "model": "m", "api_key": ""},
        {"provider": "openai", "model": "m", "api_key": " sk-padded "},
        {"provider": "openai", "model": "m", "api_key": 42},
        {"provider": "openai", "model": "m", "active": "yes"},
        {"provider": "openai", "model": "m", "active": 1},
        {"provider": "openai", "model": "m", "actor": ""},
    ]
    for kwargs in cases:
        await refused(ValidationError, lambda kw=kwargs: store.providers.create(**kw), kwargs)
    assert await _everything(store) == []
    assert await store.audit.list() == []


async def test_good_names_and_urls_are_accepted(store: Store) -> None:
    for provider in ("a", "a" * 50, "open.ai-v2_x", "x9"):
        assert (await store.providers.create(provider, "m")).provider == provider
    for url in (
        "http://localhost:11434/v1",
        "https://api.openai.com/v1",
        "https://user@host.example:8443/path?q=1#f",
        "http://[::1]:8080",
        "https://" + "a" * 1992,
    ):
        assert (await store.providers.create("openai", "m", base_url=url)).base_url == url
    made = await store.providers.create("openai", "m" * 200)
    assert (await store.providers.get(made.id)).model == "m" * 200


# --- cascade, audit, transactions ---------------------------------------------------------------


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
