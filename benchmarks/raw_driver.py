"""The raw way in: a bare driver connection (stdlib ``sqlite3`` behind a one-thread
executor, or ``asyncpg``) driven from async code, with each dialect's spellings.

One statement is one round trip (Postgres) or one thread hop (SQLite); a unit of several
statements is one transaction (one thread hop on SQLite, BEGIN ... COMMIT on Postgres).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import sqlite3
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped]

T = TypeVar("T")


@dataclass(frozen=True)
class Rows:
    """A statement's arguments, asking for all its rows: the transaction's body is sent
    the list of them instead of the first."""

    args: tuple[object, ...]


@dataclass(frozen=True)
class Many:
    """One statement run once per parameter row (the driver's ``executemany``); the
    transaction's body is sent None."""

    rows: Sequence[tuple[object, ...]]


#: A raw transaction's body: yields ``(sql, args)`` and is sent each statement's first
#: row; with :class:`Rows`, all its rows; with :class:`Many`, None.
RawSteps = Generator[tuple[str, tuple[object, ...] | Rows | Many], Sequence[Any] | None, T]

_MARKER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True)
class RawSQL:
    """A statement with its parameter names in the order the driver takes them."""

    text: str
    names: tuple[str, ...]

    def args(self, values: Mapping[str, object]) -> tuple[object, ...]:
        return tuple([values[name] for name in self.names])


def sqlite_sql(template: str) -> RawSQL:
    """``?`` per marker: a name used twice is sent twice."""
    names = tuple(_MARKER.findall(template))
    return RawSQL(_MARKER.sub("?", template), names)


def postgres_sql(template: str) -> RawSQL:
    """``$n`` per distinct name, numbered by first use."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return RawSQL(_MARKER.sub(number, template), tuple(names))


class RawDB(Protocol):
    """A bare driver connection, driven from async code, with the dialect's spellings."""

    async def fetchrow(self, sql: str, *args: object) -> Sequence[Any] | None:
        """Run one statement and return its first row."""
        ...

    async def execute(self, sql: str) -> None:
        """Run one statement without parameters (DDL)."""
        ...

    def placeholder(self, position: int) -> str:
        """The parameter marker for the 1-based ``position``."""
        ...

    def placeholders(self, count: int) -> str:
        """``count`` comma-separated parameter markers."""
        ...

    def encode_id(self, value: uuid.UUID) -> object:
        """A UUID as the column stores it (32 hex characters on SQLite)."""
        ...

    def encode_time(self, value: dt.datetime) -> object:
        """An aware datetime as the column stores it (naive UTC text on SQLite)."""
        ...

    def is_true(self, column: str) -> str:
        """A condition that the boolean ``column`` is true, as the dialect spells it."""
        ...

    def sql(self, template: str) -> RawSQL:
        """``template`` with ``:name`` markers, in the dialect's parameter style."""
        ...

    #: `` FOR UPDATE`` where the dialect locks selected rows (Postgres), else empty.
    for_update: str

    async def transaction(self, steps: Callable[[], RawSteps[T]]) -> T:
        """Run ``steps`` as one transaction: one thread hop (SQLite), or BEGIN ... COMMIT.

        ``steps()`` is a generator that yields ``(sql, args)`` and is sent each
        statement's first row (or None); its return value is returned. ``args`` may be
        :class:`Rows` (it is sent the list of all rows) or :class:`Many` (one
        ``executemany``; it is sent None). An exception raised in it rolls the
        transaction back.
        """
        ...

    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[object, ...]]
    ) -> None:
        """Insert pre-encoded rows in one transaction by the driver's fastest bulk path:
        ``executemany`` inside BEGIN IMMEDIATE ... COMMIT in one thread hop (SQLite), or
        ``COPY`` (``copy_records_to_table``, Postgres)."""
        ...

    async def close(self) -> None: ...


class RawSQLite:
    """Stdlib ``sqlite3``: one autocommit connection on a dedicated one-thread executor."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bench-raw-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _hop(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> None:
        def connect() -> None:
            conn = sqlite3.connect(self._path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn = conn

        await self._hop(connect)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the raw SQLite connection is not open")
        return self._conn

    async def fetchrow(self, sql: str, *args: object) -> Sequence[Any] | None:
        conn = self._connection()

        def run() -> Sequence[Any] | None:
            # fetchall() steps the statement to its end, so an autocommit write is committed.
            rows = conn.execute(sql, args).fetchall()
            return rows[0] if rows else None

        result: Sequence[Any] | None = await self._hop(run)
        return result

    async def execute(self, sql: str) -> None:
        conn = self._connection()
        await self._hop(lambda: conn.execute(sql).close())

    def placeholder(self, position: int) -> str:
        return "?"

    def placeholders(self, count: int) -> str:
        return ", ".join("?" * count)

    def encode_id(self, value: uuid.UUID) -> object:
        return value.hex

    def encode_time(self, value: dt.datetime) -> object:
        # What SQLAlchemy's SQLite DateTime stores: naive UTC, always with microseconds.
        return f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S.%f}"

    def is_true(self, column: str) -> str:
        return f"{column} = 1"

    def sql(self, template: str) -> RawSQL:
        return sqlite_sql(template)

    for_update = ""  # SQLite has no row locks: BEGIN IMMEDIATE takes the write lock

    async def transaction(self, steps: Callable[[], RawSteps[T]]) -> T:
        conn = self._connection()

        def run() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                body = steps()
                row: Sequence[Any] | None = None
                try:
                    while True:
                        sql, args = body.send(row)
                        if isinstance(args, Many):
                            conn.executemany(sql, args.rows)
                            row = None
                        elif isinstance(args, Rows):
                            row = conn.execute(sql, args.args).fetchall()
                        else:
                            rows = conn.execute(sql, args).fetchall()
                            row = rows[0] if rows else None
                except StopIteration as stop:
                    result: T = stop.value
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        done: T = await self._hop(run)
        return done

    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[object, ...]]
    ) -> None:
        conn = self._connection()
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({self.placeholders(len(columns))})"
        )

        def run() -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._hop(run)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._hop(conn.close)
        self._executor.shutdown(wait=True)


class RawPostgres:
    """``asyncpg`` on one connection, its ``search_path`` set to the benchmark schema."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, dsn: str, schema: str) -> RawPostgres:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        return cls(conn)

    async def fetchrow(self, sql: str, *args: object) -> Sequence[Any] | None:
        row: Sequence[Any] | None = await self._conn.fetchrow(sql, *args)
        return row

    async def execute(self, sql: str) -> None:
        await self._conn.execute(sql)

    def placeholder(self, position: int) -> str:
        return f"${position}"

    def placeholders(self, count: int) -> str:
        return ", ".join(f"${i}" for i in range(1, count + 1))

    def encode_id(self, value: uuid.UUID) -> object:
        return value

    def encode_time(self, value: dt.datetime) -> object:
        return value

    def is_true(self, column: str) -> str:
        return column

    def sql(self, template: str) -> RawSQL:
        return postgres_sql(template)

    for_update = " FOR UPDATE"

    async def transaction(self, steps: Callable[[], RawSteps[T]]) -> T:
        conn = self._conn
        async with conn.transaction():
            body = steps()
            row: Sequence[Any] | None = None
            try:
                while True:
                    sql, args = body.send(row)
                    if isinstance(args, Many):
                        await conn.executemany(sql, args.rows)
                        row = None
                    elif isinstance(args, Rows):
                        row = await conn.fetch(sql, *args.args)
                    else:
                        row = await conn.fetchrow(sql, *args)
            except StopIteration as stop:
                result: T = stop.value
        return result

    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[object, ...]]
    ) -> None:
        # COPY is one statement: all rows or none, without BEGIN ... COMMIT.
        await self._conn.copy_records_to_table(table, records=rows, columns=list(columns))

    async def close(self) -> None:
        await self._conn.close()
