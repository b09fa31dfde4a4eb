"""One database per driver, with the three ways into it: llmstore's migrated tables, the
raw tables and the ORM's tables side by side, in a new SQLite file (removed at the end) or
a new Postgres schema ``bench_<random>`` (dropped at the end)."""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from llmstore import Store, StoreConfig
from llmstore.migrations import upgrade

from .common import Context, Driver, masked, postgres_dsn
from .orm_models import OrmBase, orm_sqlite_engine
from .raw_driver import RawDB, RawPostgres, RawSQLite
from .raw_schema import raw_ddl


async def create_tables(
    driver: Driver, raw: RawDB, engine: AsyncEngine
) -> async_sessionmaker[AsyncSession]:
    """The raw tables and the ORM's beside llmstore's (already migrated); the ORM's sessions."""
    for ddl in raw_ddl(driver):
        await raw.execute(ddl)
    async with engine.begin() as conn:
        await conn.run_sync(OrmBase.metadata.create_all)
    return async_sessionmaker(engine, expire_on_commit=False)


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop the Postgres ``schema`` and everything in it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def sqlite_context() -> AsyncIterator[Context]:
    with tempfile.TemporaryDirectory(prefix="llmstore-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        url = f"sqlite:///{path}"
        await upgrade(StoreConfig.from_url(url), backup=False)
        raw = RawSQLite(path)
        await raw.open()
        engine = orm_sqlite_engine(path)
        try:
            sessions = await create_tables("sqlite", raw, engine)
            async with Store.from_url(
                url, allow_plaintext_secrets=True, token_pepper=None
            ) as store:
                yield Context("sqlite", store, raw, sessions)
        finally:
            await engine.dispose()
            await raw.close()


@contextlib.asynccontextmanager
async def postgres_context(url: str) -> AsyncIterator[Context]:
    schema = f"bench_{secrets.token_hex(6)}"
    orm_url = StoreConfig.from_url(url).url.get_secret_value()  # postgresql+asyncpg://
    dsn = postgres_dsn(url)
    try:
        await upgrade(StoreConfig.from_url(url, schema_name=schema), backup=False)
        raw = await RawPostgres.connect(dsn, schema)
        engine = create_async_engine(
            orm_url, connect_args={"server_settings": {"search_path": schema}}
        )
        try:
            sessions = await create_tables("postgres", raw, engine)
            store = Store.from_url(
                url, schema_name=schema, allow_plaintext_secrets=True, token_pepper=None
            )
            async with store:
                yield Context("postgres", store, raw, sessions)
        finally:
            await engine.dispose()
            await raw.close()
    finally:
        await drop_schema(dsn, schema)


async def postgres_reachable(url: str) -> str | None:
    """``None`` if the server answers, else why not."""
    try:
        conn = await asyncpg.connect(postgres_dsn(url), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


async def postgres_unreachable(url: str) -> bool:
    """Whether the Postgres server at ``url`` does not answer (and the run skips it)."""
    problem = await postgres_reachable(url)
    if problem is not None:
        print(f"postgres: skipped, cannot connect to {masked(url)}: {problem}")
    return problem is not None


def context_for(driver: Driver, url: str) -> contextlib.AbstractAsyncContextManager[Context]:
    return sqlite_context() if driver == "sqlite" else postgres_context(url)
