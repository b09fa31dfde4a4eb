"""How a unit of work reaches the database, per driver.

A unit is a synchronous function of a SQLAlchemy ``Connection``. It runs whole:

* SQLite (llmstore's own engine): in a thread, with one hop per unit. Writes go to one
  writer thread that owns one connection and starts with ``BEGIN IMMEDIATE``; reads go
  to reader threads, each with its own connection, as WAL allows.
* An ``AsyncEngine`` (asyncpg, or a host's aiosqlite): through ``AsyncConnection.run_sync``.

``single=True`` marks a unit that is exactly one statement: it runs without an explicit
transaction (autocommit), which on Postgres saves the BEGIN and COMMIT round trips.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import sqlalchemy.exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._errors import StoreClosedError, TransactionError, translated
from ._lean import LeanStatement, PostgresLane, Row

T = TypeVar("T")
Unit = Callable[[Connection], T]

# (runner, task) of the transaction the current task is inside, if any.
_current_transaction: contextvars.ContextVar[tuple[object, asyncio.Task[Any] | None] | None] = (
    contextvars.ContextVar("llmstore_transaction", default=None)
)


class Runner(Protocol):
    """Runs units of work; each call is one thread hop or one ``run_sync``."""

    #: The dialect whose single statements this runner runs in autocommit ("sqlite",
    #: "postgresql"), or None inside a transaction, where a failed statement dooms it.
    autocommit_dialect: str | None

    async def read(self, fn: Unit[T], *, single: bool = False) -> T: ...

    async def write(self, fn: Unit[T], *, single: bool = False) -> T: ...

    async def lean_first(self, statement: LeanStatement, params: Mapping[str, Any]) -> Row | None:
        """Run one hot write statement on the lean path; its first row, or None."""
        ...


def run_unit(conn: Connection, fn: Unit[T], begin: str | None) -> T:
    """Run ``fn`` in its own transaction on ``conn``: committed, or rolled back on error."""
    if begin is not None:
        conn.exec_driver_sql(begin)
    try:
        result = fn(conn)
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    return result


def _check_outside_transaction(runner: object) -> None:
    current = _current_transaction.get()
    if current is not None and current[0] is runner and current[1] is asyncio.current_task():
        raise TransactionError(
            "this task is inside store.transaction(): use the transaction's repositories "
            "(tx.projects, ...) or leave the transaction first"
        )


def _in_savepoint(fn: Unit[T], conn: Connection) -> T:
    """Run ``fn`` whole or not at all inside the caller's transaction."""
    savepoint = conn.begin_nested()
    try:
        result = fn(conn)
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    return result


class TransactionRunner:
    """Runs units inside one open transaction; a database failure dooms it.

    A unit of several statements runs in a savepoint, so an operation refused halfway
    (too little money for the second half of a transfer, say) leaves nothing behind
    when the caller catches the error and commits the rest.
    """

    def __init__(self, call: Callable[[Unit[Any]], Any]) -> None:
        self.autocommit_dialect: str | None = None
        self._call = call
        self.finished = False
        self.doomed = False

    async def read(self, fn: Unit[T], *, single: bool = False) -> T:
        return await self.write(fn, single=single)

    async def write(self, fn: Unit[T], *, single: bool = False) -> T:
        unit = fn if single else functools.partial(_in_savepoint, fn)
        if self.finished:
            raise TransactionError("this transaction has ended")
        if self.doomed:
            raise TransactionError(
                "an earlier operation in this transaction failed in the database; "
                "it will be rolled back"
            )
        try:
            with translated():
                result: T = await self._call(unit)
        except Exception as exc:
            if isinstance(exc.__cause__, sqlalchemy.exc.DBAPIError):
                self.doomed = True
            raise
        return result

    async def lean_first(self, statement: LeanStatement, params: Mapping[str, Any]) -> Row | None:
        return await self.write(lambda conn: statement.first(conn, params), single=True)


class SQLiteRunner:
    """llmstore's own SQLite engine: a writer thread, reader threads, one hop per unit."""

    autocommit_dialect: str | None = "sqlite"

    def __init__(self, engine: Engine, *, readers: int, shared_reads: bool) -> None:
        self._engine = engine
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="llmstore-writer")
        self._readers = None if shared_reads else ThreadPoolExecutor(readers, "llmstore-reader")
        self._lock = asyncio.Lock()
        self._writer_conn: Connection | None = None
        self._closed = False

    async def start(self, prepare: Unit[None] | None = None) -> None:
        def connect() -> None:
            with translated():
                self._writer_conn = self._engine.connect()
                if prepare is not None:
                    prepare(self._writer_conn)

        await self._hop(self._writer, connect)

    async def _hop(self, executor: ThreadPoolExecutor, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    def _guard(self) -> Connection:
        if self._closed or self._writer_conn is None:
            raise StoreClosedError("the store is closed")
        _check_outside_transaction(self)
        return self._writer_conn

    def _on_writer(self, fn: Unit[T], begin: str | None) -> Callable[[], T]:
        conn = self._guard()

        def call() -> T:
            with translated():
                return run_unit(conn, fn, begin)

        return call

    async def write(self, fn: Unit[T], *, single: bool = False) -> T:
        call = self._on_writer(fn, None if single else "BEGIN IMMEDIATE")
        async with self._lock:
            return await self._hop(self._writer, call)

    async def lean_first(self, statement: LeanStatement, params: Mapping[str, Any]) -> Row | None:
        return await self.write(lambda conn: statement.first_sqlite(conn, params), single=True)

    async def read(self, fn: Unit[T], *, single: bool = False) -> T:
        if self._readers is None:
            call = self._on_writer(fn, None if single else "BEGIN")
            async with self._lock:
                return await self._hop(self._writer, call)
        self._guard()
        begin = None if single else "BEGIN"

        def read_call() -> T:
            with translated(), self._engine.connect() as conn:
                return run_unit(conn, fn, begin)

        return await self._hop(self._readers, read_call)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[TransactionRunner]:
        conn = self._guard()

        def begin() -> None:
            with translated():
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        def finish(commit: bool) -> None:
            with translated():
                if commit:
                    try:
                        conn.commit()
                        return
                    except BaseException:
                        conn.rollback()
                        raise
                conn.rollback()

        async with self._lock:
            try:
                await self._hop(self._writer, begin)
            except BaseException:
                # Cancelled while BEGIN was queued or running in the writer thread: once
                # started it completes there, so roll it back before the next unit.
                await asyncio.shield(self._hop(self._writer, lambda: finish(False)))
                raise
            tx = TransactionRunner(lambda fn: self._hop(self._writer, functools.partial(fn, conn)))
            token = _current_transaction.set((self, asyncio.current_task()))
            try:
                yield tx
            except BaseException:
                tx.finished = True
                # The writer thread runs hops in order: this rollback follows any hop that
                # a cancellation left running, and precedes the next unit.
                await asyncio.shield(self._hop(self._writer, lambda: finish(False)))
                raise
            finally:
                _current_transaction.reset(token)
            tx.finished = True
            # Shielded: a cancelled hop that has not started yet never runs, and this one
            # must, or the writer connection would be left inside the transaction.
            if tx.doomed:
                await asyncio.shield(self._hop(self._writer, lambda: finish(False)))
                raise TransactionError("the transaction was rolled back: an operation failed")
            await asyncio.shield(self._hop(self._writer, lambda: finish(True)))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, True)

        def shutdown() -> None:
            if self._writer_conn is not None:
                self._writer_conn.close()
            self._engine.dispose()

        async with self._lock:
            await self._hop(self._writer, shutdown)
        self._writer.shutdown(wait=False)


class AsyncEngineRunner:
    """An ``AsyncEngine`` (asyncpg, or a host application's aiosqlite): one run_sync per unit."""

    def __init__(
        self, engine: AsyncEngine, *, owned: bool, lane: PostgresLane | None = None
    ) -> None:
        self._engine = engine
        self._lane = lane
        self.autocommit_dialect: str | None = engine.dialect.name
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sqlite = engine.dialect.name == "sqlite"
        self._owned = owned
        self._closed = False

    async def _unit(self, fn: Unit[T], *, write: bool, single: bool) -> T:
        if self._closed:
            raise StoreClosedError("the store is closed")
        _check_outside_transaction(self)
        engine = self._autocommit if single else self._engine
        with translated():
            async with engine.connect() as conn:
                if self._sqlite:
                    return await conn.run_sync(_sqlite_unit, fn, write, single)
                return await conn.run_sync(run_unit, fn, None)

    async def read(self, fn: Unit[T], *, single: bool = False) -> T:
        return await self._unit(fn, write=False, single=single)

    async def write(self, fn: Unit[T], *, single: bool = False) -> T:
        return await self._unit(fn, write=True, single=single)

    async def lean_first(self, statement: LeanStatement, params: Mapping[str, Any]) -> Row | None:
        if self._lane is None:
            return await self.write(lambda conn: statement.first(conn, params), single=True)
        if self._closed:
            raise StoreClosedError("the store is closed")
        _check_outside_transaction(self)
        return await self._lane.first(statement, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[TransactionRunner]:
        if self._closed:
            raise StoreClosedError("the store is closed")
        _check_outside_transaction(self)
        with translated():
            conn = await self._engine.connect()
        try:
            with translated():
                if self._sqlite:
                    await conn.run_sync(_sqlite_begin, "BEGIN IMMEDIATE")
                else:
                    await conn.begin()
            tx = TransactionRunner(conn.run_sync)
            token = _current_transaction.set((self, asyncio.current_task()))
            try:
                yield tx
            except BaseException:
                tx.finished = True
                await asyncio.shield(_rollback(conn))
                raise
            finally:
                _current_transaction.reset(token)
            tx.finished = True
            if tx.doomed:
                await _rollback(conn)
                raise TransactionError("the transaction was rolled back: an operation failed")
            with translated():
                await conn.commit()
        finally:
            await asyncio.shield(conn.close())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lane is not None:
            await self._lane.close()
        if self._owned:
            await self._engine.dispose()


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
