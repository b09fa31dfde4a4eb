"""llmstore's own SQLite engine: one writer thread, reader threads, one hop per unit.

Writes go to the writer thread, which owns one connection and begins each write with
``BEGIN IMMEDIATE``; reads go to reader threads, each with its own connection, as WAL
allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import sqlalchemy.exc
from sqlalchemy.engine import Connection, Engine

from llmstore._core.errors import StoreClosedError, TransactionError
from llmstore._db.translate import translated

from .lean import LeanStatement, Row
from .runner import (
    TransactionRunner,
    Unit,
    check_loop,
    check_outside_transaction,
    current_transaction,
    inside_own_transaction,
    rollback_quietly,
    run_unit,
)

T = TypeVar("T")


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
        check_loop(self._loop)
        check_outside_transaction(self)
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
        return inside_own_transaction(self)

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
            token = current_transaction.set((self, asyncio.current_task()))
            try:
                yield tx
            except BaseException:
                tx.finished = True
                # The writer thread runs hops in order: this rollback follows any hop that
                # a cancellation left running, and precedes the next unit.
                await asyncio.shield(self._hop(self._writer, lambda: finish(False)))
                raise
            finally:
                current_transaction.reset(token)
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
        check_loop(self._loop)
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
