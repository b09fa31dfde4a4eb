"""One backend per driver, chosen by the configuration: the only place that names them.

``open_runner`` turns a ``StoreConfig`` (or a host application's ``AsyncEngine``) into a
started runner: a ``SQLiteRunner`` (one writer thread, pooled readers; an in-memory
database filled from the head schema) or an ``AsyncEngineRunner`` (an asyncpg or aiosqlite
engine, with the lean-path lane on a Postgres pool of our own). What the store needs from
migrations comes in as callables, since ``_db`` imports only ``_core``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from llmstore._core.config import StoreConfig, ensure_parent
from llmstore._core.errors import ConfigError, SchemaOutOfDateError

from .engine_runner import AsyncEngineRunner
from .engines import postgres_engine, sqlite_engine, with_schema
from .lean import PostgresLane
from .sqlite_runner import SQLiteRunner
from .translate import translated

StoreRunner: TypeAlias = SQLiteRunner | AsyncEngineRunner
# Migrates a database to head before the runner opens: the host's engine, or (None) the
# database of the configuration.
Upgrade: TypeAlias = Callable[[AsyncEngine | None], Awaitable[None]]

_MAX_SQLITE_READERS = 8
# Postgres connections held for the lean path (tokens.use): at most half the pool.
_MAX_LANE = 4


async def open_runner(
    config: StoreConfig,
    *,
    engine: AsyncEngine | None,
    upgrade: Upgrade | None,
    head_schema: Callable[[Connection], None],
) -> StoreRunner:
    """A started runner for ``config`` (on ``engine`` if given), migrated by ``upgrade``.

    ``head_schema`` fills a new in-memory SQLite database. A SQLite file that does not
    exist raises SchemaOutOfDateError unless ``upgrade`` creates it.
    """
    if engine is not None:
        engine = with_schema(engine, config.schema_name)
        if upgrade is not None:
            await upgrade(engine)
        return AsyncEngineRunner(engine, owned=False)
    if config.driver == "postgresql":
        if upgrade is not None:
            await upgrade(None)
        return _postgres_runner(config)
    path = config.sqlite_path or ":memory:"
    if config.is_memory:
        runner = SQLiteRunner(
            sqlite_engine(path, busy_timeout=config.busy_timeout), readers=1, shared_reads=True
        )
        await _started(runner, head_schema)
        return runner
    if upgrade is not None:
        await upgrade(None)
    elif not await _exists(path):
        raise SchemaOutOfDateError(
            f"no database at {path}: run `python -m llmstore upgrade` to create it"
        )
    readers = min(config.pool_size, _MAX_SQLITE_READERS)
    runner = SQLiteRunner(
        sqlite_engine(path, busy_timeout=config.busy_timeout, pool_size=readers + 1),
        readers=readers,
        shared_reads=False,
    )
    await _started(runner, None)
    return runner


def _postgres_runner(config: StoreConfig) -> AsyncEngineRunner:
    engine = postgres_engine(config)
    lane_size = min(_MAX_LANE, (config.pool_size + config.max_overflow) // 2)
    lane = None
    if lane_size > 0:
        lane = PostgresLane(
            engine, size=lane_size, schema=config.schema_name, max_lifetime=config.conn_max_lifetime
        )
    return AsyncEngineRunner(engine, owned=True, lane=lane)


async def create_database(config: StoreConfig) -> bool:
    """Create the database of ``config`` if it is missing; whether it was created.

    SQLite: the file (and its folder). Postgres: the database named in the URL, created
    from the server's ``postgres`` database.
    """
    if config.driver == "postgresql":
        return await _create_postgres_database(config)
    if config.is_memory:
        raise ConfigError("create-db needs a file, not sqlite:///:memory:")
    path = config.sqlite_path or ""
    if await _exists(path):
        return False
    with translated():  # a folder that cannot be made is an OSError
        ensure_parent(path)
    engine = sqlite_engine(path, busy_timeout=config.busy_timeout, pool_size=0)
    try:
        with translated(), engine.connect():
            pass
    finally:
        engine.dispose()
    return True


async def _create_postgres_database(config: StoreConfig) -> bool:
    url = sa.make_url(config.url.get_secret_value())
    admin = create_async_engine(
        url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with translated():
            async with admin.connect() as conn:
                exists = await conn.scalar(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                    {"name": url.database},
                )
                if exists:
                    return False
                quoted = conn.dialect.identifier_preparer.quote(url.database or "")
                await conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
                return True
    finally:
        await admin.dispose()


async def _started(runner: SQLiteRunner, prepare: Callable[[Connection], None] | None) -> None:
    try:
        await runner.start(prepare)
    except BaseException:
        await runner.close()  # stops the threads a failed start would otherwise leave
        raise


async def _exists(path: str) -> bool:
    with translated():  # a name too long for the file system is an OSError
        return await asyncio.to_thread(Path(path).exists)
