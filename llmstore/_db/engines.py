"""Engines as llmstore opens them: SQLite through the stdlib driver, Postgres through asyncpg."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, StaticPool

from llmstore._core.config import StoreConfig


def sqlite_engine(
    path: str,
    *,
    busy_timeout: float,
    pool_size: int = 1,
    foreign_keys: bool = True,
    creator: Any = None,
) -> Engine:
    """A synchronous engine whose connections never begin a transaction by themselves.

    pysqlite's own transaction handling is switched off (``isolation_level=None``) so that
    llmstore issues ``BEGIN IMMEDIATE`` for writes itself; a deferred transaction that
    reads and then writes can fail with "database is locked" whatever the busy timeout.
    """
    memory = path == ":memory:"
    options: dict[str, Any] = {
        "hide_parameters": True,
        "connect_args": {"check_same_thread": False, "timeout": busy_timeout},
    }
    if creator is not None:
        options["creator"] = creator
        options["poolclass"] = StaticPool
    elif memory:
        options["poolclass"] = StaticPool
    elif pool_size <= 0:
        options["poolclass"] = NullPool
    else:
        options.update(pool_size=pool_size, max_overflow=0, pool_timeout=busy_timeout)
    engine = sa.create_engine(sa.URL.create("sqlite", database=path), **options)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not memory:
            _switch_to_wal(cursor, busy_timeout)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.close()

    return engine


#: The longest statement (in bytes of SQL) asyncpg keeps prepared on a connection.
MAX_CACHEABLE_STATEMENT = 64 * 1024


def postgres_engine(config: StoreConfig, *, pooled: bool = True) -> AsyncEngine:
    options: dict[str, Any] = {"hide_parameters": True}
    if pooled:
        options.update(
            pool_size=config.pool_size,
            max_overflow=config.max_overflow,
            pool_recycle=config.conn_max_lifetime,
        )
    else:
        options["poolclass"] = NullPool
    url = make_url(config.url.get_secret_value())
    # asyncpg keeps the plan of a statement it has prepared, but not of one longer than
    # 15 KiB: the admission's one statement (16-20 KiB) would be parsed and planned on
    # every call, four times the cost of running it.
    connect_args: dict[str, Any] = {"max_cacheable_statement_size": MAX_CACHEABLE_STATEMENT}
    mode = url.query.get("sslmode")
    if isinstance(mode, str):  # libpq's name (kept for pg_dump); asyncpg calls it ssl
        url = url.difference_update_query(["sslmode"])
        if "ssl" not in url.query:
            connect_args["ssl"] = mode
    options["connect_args"] = connect_args
    engine = create_async_engine(url, **options)
    event.listen(engine.sync_engine, "checkout", _refuse_closed)
    return with_schema(engine, config.schema_name)


def _refuse_closed(_dbapi_connection: Any, _record: Any, proxy: Any) -> None:
    """Replace a pooled connection the server has closed before it is used.

    After a restart or a failover every pooled connection is dead; the pool would hand
    each out once and fail a request with it. asyncpg notes a closed socket without a
    round trip, so this costs nothing, unlike a ping per checkout.
    """
    if proxy.driver_connection.is_closed():
        raise sqlalchemy.exc.DisconnectionError("the server closed this pooled connection")


def with_schema(engine: AsyncEngine, schema: str | None) -> AsyncEngine:
    """Route every unqualified llmstore table to ``schema`` (compiled into the SQL, cached)."""
    if schema is None:
        return engine
    return engine.execution_options(schema_translate_map={None: schema})


def _switch_to_wal(cursor: sqlite3.Cursor, busy_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, waiting up to ``busy_timeout`` for the file's lock.

    On a new file, still in rollback-journal mode, processes that connect together each
    need an exclusive lock to switch it: SQLite then answers "database is locked" at once,
    without calling the busy handler (waiting could deadlock). Once one has switched it,
    the pragma changes nothing and takes no lock, so the others succeed on a retry.
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
