"""An ``AsyncEngine`` (asyncpg, or a host application's aiosqlite): one ``run_sync`` per unit.

On Postgres the hottest single statements take the lean lane (``_db.lean``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmstore._core.errors import DatabaseUnavailableError, StoreClosedError, TransactionError
from llmstore._db.translate import translated

from .lean import LeanStatement, PostgresLane, Row
from .runner import (
    REPEATABLE_READ,
    TransactionRunner,
    Unit,
    check_loop,
    check_outside_transaction,
    current_transaction,
    inside_own_transaction,
    run_unit,
)
from .sqlite_runner import _sqlite_probe

T = TypeVar("T")


class AsyncEngineRunner:
    """An ``AsyncEngine`` (asyncpg, or a host application's aiosqlite): one run_sync per unit."""

    def __init__(
        self, engine: AsyncEngine, *, owned: bool, lane: PostgresLane | None = None
    ) -> None:
        self._engine = engine
        self._lane = lane
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sqlite = engine.dialect.name == "sqlite"
        self.in_transaction = False
        self.one_statement_writes = not self._sqlite
        self.commit_status = not self._sqlite
        self._owned = owned
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._closing: set[asyncio.Task[None]] = set()  # connections closed after a cancel

    def _guard(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")
        check_loop(self._loop)
        check_outside_transaction(self)

    @asynccontextmanager
    async def _connection(self, engine: AsyncEngine) -> AsyncIterator[_Lease]:
        """A connection of ``engine``, closed (back to its pool) when the block ends.

        After a cancellation the close is left to a task of its own, so that the
        cancellation takes effect now even when the close has to wait (see
        :meth:`_Lease.run_to_end`); closing the store waits for those tasks.
        """
        with translated():
            lease = _Lease(await engine.connect())
        try:
            yield lease
        except asyncio.CancelledError:
            task = asyncio.get_running_loop().create_task(lease.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            raise
        except BaseException:
            await asyncio.shield(lease.close())
            raise
        with translated():
            await asyncio.shield(lease.conn.close())

    async def _unit(self, fn: Unit[T], *, write: bool, single: bool, begin: str | None = None) -> T:
        self._guard()
        engine = self._autocommit if single else self._engine
        async with self._connection(engine) as lease:
            with translated():
                if self._sqlite:
                    return await lease.run_to_end(_sqlite_unit, fn, write, single)
                return await lease.conn.run_sync(run_unit, fn, begin)

    def holds_write_lock(self) -> bool:
        return self._sqlite and inside_own_transaction(self)

    async def read(self, fn: Unit[T], *, single: bool = False, snapshot: bool = False) -> T:
        # Postgres reads at READ COMMITTED: a snapshot unit asks for one snapshot first.
        # (SQLAlchemy begins the transaction at the first statement, so this is its first.)
        begin = REPEATABLE_READ if snapshot and not single and not self._sqlite else None
        return await self._unit(fn, write=False, single=single, begin=begin)

    async def write(self, fn: Unit[T], *, single: bool = False) -> T:
        return await self._unit(fn, write=True, single=single)

    async def lean_first(self, statement: LeanStatement, params: Mapping[str, Any]) -> Row | None:
        if self._lane is None:
            return await self.write(lambda conn: statement.first(conn, params), single=True)
        self._guard()
        return await self._lane.first(statement, params)

    async def probe(self) -> None:
        """Raise unless the database answers and can be written."""
        if self._sqlite:
            await self.write(_sqlite_probe, single=True)
        else:
            await self.read(_postgres_probe, single=True)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[TransactionRunner]:
        self._guard()
        async with self._connection(self._engine) as lease:
            conn = lease.conn
            with translated():
                if self._sqlite:
                    await lease.run_to_end(_sqlite_begin, "BEGIN IMMEDIATE")
                else:
                    await conn.begin()
            tx = TransactionRunner(conn.run_sync, holds_write_lock=self._sqlite)
            token = current_transaction.set((self, asyncio.current_task()))
            try:
                yield tx
            except BaseException:
                tx.finished = True
                await asyncio.shield(_rollback(conn))
                raise
            finally:
                current_transaction.reset(token)
            tx.finished = True
            if tx.doomed:
                await _rollback(conn)
                raise TransactionError("the transaction was rolled back: an operation failed")
            with translated():
                await conn.commit()

    async def close(self) -> None:
        if self._closed:
            return
        check_loop(self._loop)
        self._closed = True
        if self._closing:  # units cancelled mid-way end first (SQLite: the busy timeout)
            await asyncio.wait(set(self._closing))
        if self._lane is not None:
            await self._lane.close()
        if self._owned:
            await self._engine.dispose()


class _Lease:
    """A connection checked out for one unit or transaction."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.running: asyncio.Task[Any] | None = None

    async def run_to_end(self, fn: Callable[..., T], *args: Any) -> T:
        """``run_sync`` in a task of its own, that a cancellation of the caller leaves running.

        For SQLite through aiosqlite: cancelling the statement itself would not stop it
        waiting in aiosqlite's thread (up to the busy timeout, for another process's write
        lock), and SQLAlchemy, invalidating the connection, would wait for it in the
        cancelled task. So the caller is let go at once, as llmstore's own SQLite runner
        lets it go; the unit ends in the background, and the connection is closed after it.
        """
        self.running = asyncio.ensure_future(self.conn.run_sync(fn, *args))
        return await asyncio.shield(self.running)

    async def close(self) -> None:
        # Keeps the error that ended the block: a close that fails too loses the connection.
        if self.running is not None:
            await asyncio.wait({self.running})
            if not self.running.cancelled():
                self.running.exception()  # retrieved: asyncio would log it otherwise
        with contextlib.suppress(Exception):
            await self.conn.close()


async def _rollback(conn: AsyncConnection) -> None:
    with translated():
        await conn.rollback()


def _sqlite_begin(conn: Connection, begin: str) -> None:
    conn.exec_driver_sql("PRAGMA foreign_keys=ON")
    conn.exec_driver_sql(begin)


def _sqlite_unit(conn: Connection, fn: Unit[T], write: bool, single: bool) -> T:
    conn.exec_driver_sql("PRAGMA foreign_keys=ON")
    if single:
        return run_unit(conn, fn, None)
    return run_unit(conn, fn, "BEGIN IMMEDIATE" if write else "BEGIN")


def _postgres_probe(conn: Connection) -> None:
    """One round trip; a standby, or a database set read-only, cannot take writes."""
    read_only = conn.exec_driver_sql("SELECT current_setting('transaction_read_only')").scalar()
    if read_only == "on":
        raise DatabaseUnavailableError(
            "the database is read-only (a standby, or default_transaction_read_only is on)"
        )
