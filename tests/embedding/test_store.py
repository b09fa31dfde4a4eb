"""The Store facade: lifecycle, health, revision checks and transactions, on every driver."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from llmstore import (
    ConflictError,
    DatabaseUnavailableError,
    HealthStatus,
    NotFoundError,
    SchemaOutOfDateError,
    Store,
    StoreClosedError,
    StoreConfig,
    TransactionError,
    UnknownRevisionError,
    ValidationError,
    generate_key,
)
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations._commands import downgrade, head_revision, upgrade
from llmstore.pytest_plugin import run_sql
from tests.helpers import require_postgres


async def test_driver_and_health_check(store: Store) -> None:
    health = await store.health_check()
    assert isinstance(health, HealthStatus)
    assert health.driver == store.driver
    assert store.driver in ("sqlite", "postgresql")
    assert health.revision == head_revision()
    assert 0 < health.latency_ms < 5000


async def test_unopened_and_closed_stores_raise(tmp_path: Path) -> None:
    store = Store.from_url("sqlite:///:memory:")
    with pytest.raises(StoreClosedError, match="not open"):
        store.projects  # noqa: B018
    async with store:
        projects = store.projects
        await projects.create("x")
    with pytest.raises(StoreClosedError, match="closed"):
        store.projects  # noqa: B018
    with pytest.raises(StoreClosedError):
        await projects.list()
    with pytest.raises(StoreClosedError):
        await store.health_check()
    with pytest.raises(StoreClosedError):
        await store.open()
    await store.close()  # closing twice is harmless


async def test_memory_stores_are_private(tmp_path: Path) -> None:
    async with Store.from_url("sqlite:///:memory:") as one, Store.from_url("sqlite://") as two:
        await one.projects.create("only in one")
        assert await two.projects.list() == []
        assert len(await one.projects.list()) == 1


async def test_memory_store_is_safe_under_concurrent_coroutines() -> None:
    async with Store.from_url("sqlite:///:memory:") as store:

        async def create(i: int) -> None:
            await store.projects.create(f"c{i}")
            await store.projects.get_by_name(f"c{i}")

        await asyncio.gather(*(create(i) for i in range(100)))
        assert len(await store.projects.list(limit=1000)) == 100


async def test_file_store_refuses_a_missing_database(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "llmstore.db"
    with pytest.raises(SchemaOutOfDateError, match="llmstore upgrade"):
        await Store.from_url(f"sqlite:///{path}").open()
    assert not path.exists()  # opening never creates tables or files silently


async def test_behind_head_raises_unless_auto_upgrade(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    await downgrade(db_config, "base")
    with pytest.raises(SchemaOutOfDateError, match="python -m llmstore upgrade"):
        await Store(db_config).open()
    async with Store(db_config, auto_upgrade=True) as store:
        assert (await store.health_check()).revision == head_revision()


async def test_never_migrated_database_raises(db_config: StoreConfig) -> None:
    if db_config.driver == "sqlite":
        Path(db_config.sqlite_path or "").touch()
    with pytest.raises(SchemaOutOfDateError):
        await Store(db_config).open()


async def test_unknown_revision_raises(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        table = sa.table(VERSION_TABLE, sa.column("version_num"), schema=db_config.schema_name)
        await run_sql(
            store,
            lambda conn: conn.execute(table.update().values(version_num="ffffffffffff")),
            write=True,
        )
    with pytest.raises(UnknownRevisionError, match="ffffffffffff"):
        await Store(db_config).open()


async def test_unreachable_postgres_raises_on_open() -> None:
    store = Store.from_url("postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailableError):
        await store.open()


async def test_missing_postgres_database_says_how_to_create_it() -> None:
    url = require_postgres()
    missing = sa.make_url(StoreConfig.from_url(url).url.get_secret_value()).set(
        database=f"llmstore_missing_{uuid.uuid4().hex[:8]}"
    )
    with pytest.raises(DatabaseUnavailableError, match="create-db"):
        await Store.from_url(missing.render_as_string(hide_password=False)).open()


async def test_transaction_commits_on_exit(store: Store) -> None:
    async with store.transaction() as tx:
        first = await tx.projects.create("t1")
        await tx.projects.update(first.id, name="t1-renamed")
        assert (await tx.projects.get(first.id)).name == "t1-renamed"
    assert (await store.projects.get(first.id)).name == "t1-renamed"


async def test_transaction_rolls_back_on_exception(store: Store) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await tx.projects.create("never")
            raise Boom
    assert await store.projects.list() == []


async def test_transaction_rolls_back_when_cancelled(store: Store) -> None:
    started = asyncio.Event()

    async def work() -> None:
        async with store.transaction() as tx:
            await tx.projects.create("cancelled")
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(work())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.projects.list() == []
    await store.projects.create("after")  # the store is usable afterwards
    assert [p.name for p in await store.projects.list()] == ["after"]


async def test_failed_statement_dooms_the_transaction(store: Store) -> None:
    await store.projects.create("taken")
    with pytest.raises(TransactionError, match="rolled back"):
        async with store.transaction() as tx:
            await tx.projects.create("kept?")
            with pytest.raises(ConflictError):
                await tx.projects.create("taken")
            with pytest.raises(TransactionError, match="earlier operation"):
                await tx.projects.create("more")
    assert [p.name for p in await store.projects.list()] == ["taken"]


async def test_validation_errors_do_not_doom_a_transaction(store: Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(ValidationError):
            await tx.projects.create("")
        with pytest.raises(NotFoundError):
            await tx.projects.get(uuid.uuid4())
        await tx.projects.create("fine")
    assert [p.name for p in await store.projects.list()] == ["fine"]


async def test_store_repositories_refuse_use_inside_own_transaction(store: Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(TransactionError, match=r"tx\.projects"):
            await store.projects.create("bypass")
        with pytest.raises(TransactionError):
            async with store.transaction():
                pass
        await tx.projects.create("inside")
    assert [p.name for p in await store.projects.list()] == ["inside"]


async def test_transaction_cannot_be_used_after_it_ends(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.projects.create("once")
    with pytest.raises(TransactionError, match="ended"):
        await tx.projects.create("twice")


async def test_a_conflicting_writer_waits_for_the_transaction(store: Store) -> None:
    project = await store.projects.create("contended")
    order: list[str] = []
    inside = asyncio.Event()

    async def transaction() -> None:
        async with store.transaction() as tx:
            await tx.projects.update(project.id, name="by tx")
            inside.set()
            await asyncio.sleep(0.2)
            order.append("tx done")

    async def writer() -> None:
        await inside.wait()
        await store.projects.update(project.id, name="by writer")
        order.append("writer done")

    await asyncio.gather(transaction(), writer())
    assert order == ["tx done", "writer done"]
    assert (await store.projects.get(project.id)).name == "by writer"


@pytest.mark.parametrize("driver", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_from_engine_uses_the_host_engine(driver: str, tmp_path: Path) -> None:
    schema = None
    if driver == "postgres":
        config = StoreConfig.from_url(require_postgres())
        url = config.url.get_secret_value()
        schema = f"llmstore_test_{uuid.uuid4().hex[:12]}"
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'host.db'}"
    engine = create_async_engine(url)
    try:
        store = Store.from_engine(
            engine, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
        )
        assert store.driver == ("postgresql" if driver == "postgres" else "sqlite")
        async with store:
            project = await store.projects.create("hosted", api_key="sk-host")
            async with store.transaction() as tx:
                await tx.projects.update(project.id, name="hosted-2")
            assert (await store.projects.get(project.id)).name == "hosted-2"
            assert await store.projects.reveal_api_key(project.id) == "sk-host"
            assert (await store.health_check()).revision == head_revision()
        async with engine.connect() as conn:  # the host's engine still works
            assert await conn.scalar(sa.text("SELECT 1")) == 1
    finally:
        if schema is not None:
            async with engine.begin() as conn:
                await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()


@pytest.mark.postgres
async def test_auto_upgrade_gives_the_host_connection_back_as_it_was() -> None:
    """The migration's lock, search_path and lock_timeout are session-wide: none of them
    may stay on the host's pooled connection."""
    url = StoreConfig.from_url(require_postgres()).url.get_secret_value()
    schema = f"llmstore_test_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    state = sa.text(
        "SELECT current_setting('search_path'), current_setting('lock_timeout'), "
        "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND pid = pg_backend_pid())"
    )
    try:
        async with engine.connect() as conn:  # the pool's one connection, set up by the host
            await conn.exec_driver_sql("SET search_path TO public, pg_catalog")
            await conn.exec_driver_sql("SET lock_timeout = '7s'")
            await conn.commit()
            host = tuple((await conn.execute(state)).one())
            await conn.commit()
        assert host == ("public, pg_catalog", "7s", 0)
        store = Store.from_engine(engine, schema_name=schema, auto_upgrade=True)
        async with store:
            assert (await store.health_check()).revision == head_revision()
        async with engine.connect() as conn:
            assert tuple((await conn.execute(state)).one()) == host
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


async def test_postgres_schema_keeps_tables_out_of_public() -> None:
    url = require_postgres()
    schema = f"llmstore_test_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(StoreConfig.from_url(url).url.get_secret_value())
    try:
        async with Store.from_url(url, schema_name=schema, auto_upgrade=True) as store:
            await store.projects.create("in schema")
        async with engine.connect() as conn:
            tables = await conn.scalars(
                sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema=:s"),
                {"s": schema},
            )
            assert set(tables) == set(metadata.tables) | {VERSION_TABLE}
            count = await conn.scalar(sa.text(f'SELECT count(*) FROM "{schema}".llmstore_projects'))
            assert count == 1
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()
