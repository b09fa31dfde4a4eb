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
import contextlib
import contextvars
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import sqlalchemy.exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmstore._core.errors import (
    DatabaseUnavailableError,
    EventLoopError,
    StoreClosedError,
    TransactionError,
)
from llmstore._db.translate import translated

from .lean import LeanStatement, PostgresLane, Row

T = TypeVar("T")
Unit = Callable[[Connection], T]
_REPEATABLE_READ = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"

# (runner, task) of the transaction the current task is inside, if any.
_current_transaction: contextvars.ContextVar[tuple[object, asyncio.Task[Any] | None] | None] = (
    contextvars.ContextVar("llmstore_transaction", default=None)
)


class Runner(Protocol):
    """Runs units of work; each call is one thread hop or one ``run_sync``.

    Domain code never asks which database it is on; it asks the runner what it can do.
    """

    #: Inside ``store.transaction()``: every unit joins the caller's transaction, where a
    #: failed statement dooms it, and nothing is committed until the block ends.
    in_transaction: bool
    #: A single statement that does a whole operation is cheaper here than the same work
    #: as several statements (each one a round trip to a server, outside a transaction):
    #: the money operations take their one-statement form.
    one_statement_writes: bool
    #: A COMMIT's reply can be lost on the way (a server), and the database can tell
    #: afterwards whether a transaction committed (``_db.dialects.transaction_status``).
    #: Where it is False, commits happen in-process: an error means nothing was stored.
    commit_status: bool

    def holds_write_lock(self) -> bool:
        """Whether the current task is inside a transaction of this runner that holds the
        database's one write lock (SQLite), so that a write waiting for it would wait for
        ever."""
        ...

    async def read(self, fn: Unit[T], *, single: bool = False, snapshot: bool = False) -> T:
        """Run a read-only unit. ``snapshot``: every statement of it sees one snapshot of
        the database (REPEATABLE READ on Postgres; a SQLite read transaction is one)."""
        ...

    async def write(self, fn: Unit[T], *, single: bool = False) -> T:
        """Run a unit that writes, whole or not at all (``single``: it is one statement)."""
        ...

    async def lean_first(self, statement: LeanStatement, params: Mapping[str, Any]) -> Row | None:
        """Run one hot write statement on the lean path; its first row, or None."""
        ...


def run_unit(conn: Connection, fn: Unit[T], begin: str | None) -> T:
    """Run ``fn`` in its own transaction on ``conn``: committed, or rolled back on error.

    BEGIN and COMMIT are inside the rollback's reach: a COMMIT that fails (a full disk) or
    a BEGIN that timed out leaves a transaction open on the connection, and SQLAlchemy
    would refuse every later statement on it until it is rolled back.
    """
    try:
        if begin is not None:
            conn.exec_driver_sql(begin)
        result = fn(conn)
        conn.commit()
    except BaseException:
        rollback_quietly(conn)
        raise
    return result


def rollback_quietly(conn: Connection) -> None:
    """Roll back after a failure, keeping the failure: the connection must end up usable.

    A rollback that fails too (the file or the server is gone) invalidates the
    connection, so that its next use reconnects instead of failing for good.
    """
    try:
        conn.rollback()
        # SQLite keeps a transaction open after some failed COMMITs (deferred foreign
        # keys), while SQLAlchemy has already let go of it: roll the driver's back too.
        dbapi_connection = conn.connection.dbapi_connection
        if getattr(dbapi_connection, "in_transaction", False):
            dbapi_connection.rollback()  # type: ignore[union-attr]
    except Exception:
        with contextlib.suppress(Exception):
            conn.invalidate()


def _check_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Refuse a call from another event loop than the one the store was opened in.

    Its connections, locks and pooled sockets belong to that loop; the drivers would
    fail with a bare RuntimeError, or hang.
    """
    if asyncio.get_running_loop() is not loop:
        raise EventLoopError(
            "this store was opened in another event loop: open one store per event loop"
        )


def _inside_own_transaction(runner: object) -> bool:
    """Whether the current task is inside ``store.transaction()`` of ``runner``."""
    current = _current_transaction.get()
    return current is not None and current[0] is runner and current[1] is asyncio.current_task()


def _check_outside_transaction(runner: object) -> None:
    if _inside_own_transaction(runner):
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

    in_transaction = True
    one_statement_writes = False
    commit_status = False  # the caller commits; its units never see a COMMIT

    def __init__(self, call: Callable[[Unit[Any]], Any], *, holds_write_lock: bool) -> None:
        self._call = call
        self._holds_write_lock = holds_write_lock
        self.finished = False
        self.doomed = False

    def holds_write_lock(self) -> bool:
        return self._holds_write_lock and not self.finished

    async def read(self, fn: Unit[T], *, single: bool = False, snapshot: bool = False) -> T:
        # The caller's transaction decides what its statements see.
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

    in_transaction = False
    one_statement_writes = False  # in-process: several statements cost no round trips
    commit_status = False

    def __init__(self, engine: Engine, *, readers: int, shared_reads: bool) -> None:
        self._engine = engine
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="llmstore-writer")
        self._readers = None if shared_reads else ThreadPoolExecutor(readers, "llmstore-reader")
        self._lock = asyncio.Lock()
        self._writer_conn: Connection | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()

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
        _check_loop(self._loop)
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

    async def probe(self) -> None:
        """Raise unless the database answers and can be written."""
        await self.write(_sqlite_probe, single=True)

    def holds_write_lock(self) -> bool:
        return _inside_own_transaction(self)

    async def read(self, fn: Unit[T], *, single: bool = False, snapshot: bool = False) -> T:
        # A read unit of several statements runs in BEGIN ... COMMIT: one WAL snapshot.
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
            if not commit:
                rollback_quietly(conn)
                return
            with translated():
                try:
                    conn.commit()
                except BaseException:
                    rollback_quietly(conn)
                    raise

        async with self._lock:
            try:
                await self._hop(self._writer, begin)
            except BaseException:
                # BEGIN failed, or was cancelled while it waits in the writer thread for
                # another process's write lock (up to the busy timeout): the cancellation
                # takes effect now. The writer thread runs its work in order, so this
                # rollback, queued and not awaited, follows the BEGIN and precedes the
                # next unit.
                with contextlib.suppress(RuntimeError):  # the store closed meanwhile
                    self._writer.submit(finish, False)
                raise
            tx = TransactionRunner(
                lambda fn: self._hop(self._writer, functools.partial(fn, conn)),
                holds_write_lock=True,
            )
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
        _check_loop(self._loop)
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
        _check_loop(self._loop)
        _check_outside_transaction(self)

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
        return self._sqlite and _inside_own_transaction(self)

    async def read(self, fn: Unit[T], *, single: bool = False, snapshot: bool = False) -> T:
        # Postgres reads at READ COMMITTED: a snapshot unit asks for one snapshot first.
        # (SQLAlchemy begins the transaction at the first statement, so this is its first.)
        begin = _REPEATABLE_READ if snapshot and not single and not self._sqlite else None
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

    async def close(self) -> None:
        if self._closed:
            return
        _check_loop(self._loop)
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


def _sqlite_probe(conn: Connection) -> None:
    """Write the header's ``user_version`` back unchanged and roll back: a read-only file,
    folder or disk fails (SQLite grants the write lock on such a file, and refuses only
    the first page written).

    With no busy timeout: a write lock held elsewhere shows the database takes writes,
    and a health probe must not wait for it.
    """
    busy_timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    conn.exec_driver_sql("PRAGMA busy_timeout=0")
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            version = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
            conn.exec_driver_sql(f"PRAGMA user_version={version}")
        finally:
            conn.exec_driver_sql("ROLLBACK")
    except sqlalchemy.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlite_errorname", "") != "SQLITE_BUSY":
            raise
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_timeout)}")


def _postgres_probe(conn: Connection) -> None:
    """One round trip; a standby, or a database set read-only, cannot take writes."""
    read_only = conn.exec_driver_sql("SELECT current_setting('transaction_read_only')").scalar()
    if read_only == "on":
        raise DatabaseUnavailableError(
            "the database is read-only (a standby, or default_transaction_read_only is on)"
        )
