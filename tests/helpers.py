"""Helpers shared by several test modules: Postgres for a test, refusals, keyset pages, SQL
on a store's tables, the command line in a subprocess, a terminal, and the server side of
Postgres connections."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from llmstore import DatabaseUnavailableError, Project, Store
from llmstore.pytest_plugin import postgres_test_url, run_sql

E = TypeVar("E", bound=BaseException)


class _Keyed(Protocol):
    @property
    def id(self) -> Any: ...


R = TypeVar("R", bound=_Keyed)


def require_postgres() -> str:
    """The test database's URL; the test is skipped without one (and fails in CI)."""
    url = postgres_test_url()
    if url is None:
        if os.environ.get("CI"):
            pytest.fail("LLMSTORE_TEST_POSTGRES_URL must be set in CI: Postgres tests never skip")
        pytest.skip("LLMSTORE_TEST_POSTGRES_URL is not set")
    return url


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def new_project(store: Store, name: str | None = None) -> Project:
    """A project with a fresh name (or ``name``)."""
    return await store.projects.create(name or f"p-{uuid.uuid4().hex[:12]}")


async def refused(error: type[E], call: Callable[..., Awaitable[object]], case: object) -> E:
    """Await ``call()``, which must raise ``error``; the error, for further checks.

    ``call`` is typed loosely: it is usually ``lambda kw=case: method(**kw)``, which binds
    the loop's hostile value (deliberately of a wrong type) as an untyped default.
    """
    try:
        await call()
    except error as exc:
        return exc
    pytest.fail(f"{case!r} was accepted")


async def every_page(list_page: Callable[[Any], Awaitable[Sequence[R]]], limit: int) -> list[R]:
    """Every row, by keyset pages of at most ``limit``: ``list_page(None)``, then
    ``list_page(the last id seen)`` until a page is empty."""
    rows: list[R] = []
    after = None
    while page := await list_page(after):
        assert len(page) <= limit
        rows.extend(page)
        after = page[-1].id
    return rows


# --- SQL on a store's tables ---------------------------------------------------------------


def qualified(store: Store, name: str) -> str:
    """``name`` (a table or function) in the store's schema, for raw SQL."""
    schema = store.config.schema_name
    return name if schema is None else f'"{schema}".{name}'


async def execute(store: Store, *statements: str) -> None:
    """Run raw SQL ``statements`` on the store, one unit that writes."""

    def run(conn: Connection) -> None:
        for sql in statements:
            conn.exec_driver_sql(sql)

    await run_sql(store, run, write=True)


async def count_rows(store: Store, table: sa.Table) -> int:
    def count(conn: Connection) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())

    return await run_sql(store, count)


async def column_value(store: Store, column: sa.Column[Any], row_id: uuid.UUID) -> Any:
    """The stored value of ``column`` in the row whose ``id`` is ``row_id``."""
    table = column.table
    return await run_sql(
        store,
        lambda conn: conn.execute(sa.select(column).where(table.c.id == row_id)).scalar_one(),
    )


def async_url(url: str) -> str:
    """``url`` (with its password) for SQLAlchemy's async drivers: aiosqlite or asyncpg."""
    parsed = sa.make_url(url)
    driver = "sqlite+aiosqlite" if parsed.get_backend_name() == "sqlite" else "postgresql+asyncpg"
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


# --- the command line ----------------------------------------------------------------------


def run_llmstore(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m llmstore *args`` in a subprocess, with ``env`` on top of this one's."""
    return run_module("llmstore", *args, env=env, cwd=cwd)


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` in a subprocess, with ``env`` on top of this one's."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=120,
        check=False,
    )


class Terminal(io.StringIO):
    """Output that says it is a terminal (progress is drawn as on one)."""

    def isatty(self) -> bool:
        return True


# --- the server side of Postgres connections -----------------------------------------------


class CheckedOut:
    """Server pids of the Postgres connections checked out of any SQLAlchemy pool in this
    process, followed through the pools' ``checkout`` and ``checkin`` events while
    :meth:`following` is open. A store holds its lean path's connections checked out, so
    while no call is in flight a store's checked-out connections are exactly those."""

    def __init__(self) -> None:
        self._pids: dict[ConnectionPoolEntry, int] = {}

    def pids(self) -> list[int]:
        return sorted(self._pids.values())

    def _checkout(self, dbapi_connection: Any, entry: ConnectionPoolEntry, proxy: Any) -> None:
        self._pids[entry] = dbapi_connection.driver_connection.get_server_pid()

    def _checkin(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:
        self._pids.pop(entry, None)

    @contextlib.contextmanager
    def following(self) -> Iterator[CheckedOut]:
        """Follow every pool (open it before the store it watches opens)."""
        event.listen(Pool, "checkout", self._checkout)
        event.listen(Pool, "checkin", self._checkin)
        try:
            yield self
        finally:
            event.remove(Pool, "checkout", self._checkout)
            event.remove(Pool, "checkin", self._checkin)


async def terminate_backends(pids: Iterable[int]) -> int:
    """Terminate these Postgres backends and wait until they are gone, as after a restart
    or a failover; how many were terminated."""
    pids = list(pids)
    conn = await asyncpg.connect(require_postgres())
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids
        )
        for _ in range(500):
            alive = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1::int[])", pids
            )
            if alive == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"backends {pids} are still there")
    finally:
        await conn.close()
    return sum(1 for (terminated,) in rows if terminated)


async def store_pids(checked_out: CheckedOut, schema: str, admin: Any) -> list[int]:
    """Server pids of a store's connections: those checked out of its pool (its lane's
    idle ones among them), and any running a statement on its ``schema``. ``admin``: an
    ``AsyncEngine`` of its own on the same server."""
    pids = set(checked_out.pids())
    async with admin.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND position(:schema in query) > 0"
            ),
            {"schema": schema},
        )
        pids.update(int(pid) for pid in rows.scalars())
    return sorted(pids)


async def until_it_answers(call: Callable[[], Awaitable[Any]], attempts: int = 20) -> Any:
    """``call()``, tried again while the database is unavailable (just after a kill)."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except DatabaseUnavailableError:
            await asyncio.sleep(0.05)
    return await call()
