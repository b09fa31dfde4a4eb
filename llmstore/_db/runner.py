"""How a unit of work reaches the database: the runner protocol and what every runner shares.

The runners themselves are in ``sqlite_runner`` and ``engine_runner``.

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
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import sqlalchemy.exc
from sqlalchemy.engine import Connection

from llmstore._core.errors import (
    EventLoopError,
    TransactionError,
)
from llmstore._db.translate import translated

from .lean import LeanStatement, Row

T = TypeVar("T")
Unit = Callable[[Connection], T]
REPEATABLE_READ = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"

# (runner, task) of the transaction the current task is inside, if any.
current_transaction: contextvars.ContextVar[tuple[object, asyncio.Task[Any] | None] | None] = (
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


def check_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Refuse a call from another event loop than the one the store was opened in.

    Its connections, locks and pooled sockets belong to that loop; the drivers would
    fail with a bare RuntimeError, or hang.
    """
    if asyncio.get_running_loop() is not loop:
        raise EventLoopError(
            "this store was opened in another event loop: open one store per event loop"
        )


def inside_own_transaction(runner: object) -> bool:
    """Whether the current task is inside ``store.transaction()`` of ``runner``."""
    current = current_transaction.get()
    return current is not None and current[0] is runner and current[1] is asyncio.current_task()


def check_outside_transaction(runner: object) -> None:
    if inside_own_transaction(runner):
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
