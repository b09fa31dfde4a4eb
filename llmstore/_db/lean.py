"""The lean path: one hot Core statement, compiled once per dialect, run on the bare driver.

The benchmark harness measured SQLAlchemy's per-execution and pool-checkout overhead at
about as much as the statement itself for ``tokens.use``. Here the statement is still
written once as SQLAlchemy Core; only its execution skips the engine: bind and result
processing use the column types' own processors, so values match the generic path.

* SQLite: the writer thread runs the SQL on its ``sqlite3`` connection (one thread hop).
* Postgres: a few asyncpg connections are held out of the pool (:class:`PostgresLane`)
  and the statement is sent on one of them: one round trip, autocommit.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmstore._core.errors import StoreClosedError
from llmstore._db.translate import translated

Row = tuple[Any, ...]
_Processor = Callable[[Any], Any] | None


class CompiledLean:
    """A statement's SQL for one dialect and schema, with its parameter and value processing."""

    def __init__(
        self,
        statement: sa.Executable,
        columns: Sequence[sa.ColumnElement[Any]],
        dialect: Dialect,
        schema: str | None,
    ) -> None:
        options: dict[str, Any] = {}
        if schema is not None:
            options = {"schema_translate_map": {None: schema}, "render_schema_translate": True}
        compiled = statement.compile(dialect=dialect, **options)  # type: ignore[attr-defined]
        self.sql: str = compiled.string
        names: Sequence[str] = compiled.positiontup or ()
        # Per position: the parameter's name, its encoder, and whether it is a literal of
        # the statement (the 1 of "count + 1" is a bound parameter too) with its value,
        # encoded once here.
        self._positions: list[tuple[str, _Processor, bool, Any]] = []
        for name in names:
            bind = compiled.binds[name]
            encode = bind.type.dialect_impl(dialect).bind_processor(dialect)
            fixed = None
            if not bind.required:
                value = bind.effective_value
                fixed = value if encode is None else encode(value)
            self._positions.append((name, encode, not bind.required, fixed))
        self._width = len(columns)
        # Only the columns whose values the driver's form does not give as they are.
        self._decoders: list[tuple[int, Callable[[Any], Any]]] = []
        for index, column in enumerate(columns):
            decode = _decoder(column, dialect)
            if decode is not None:
                self._decoders.append((index, decode))

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        args = []
        for name, encode, literal, fixed in self._positions:
            if literal and name not in params:
                args.append(fixed)
            else:
                value = params[name]
                args.append(value if encode is None else encode(value))
        return tuple(args)

    def row(self, raw: Sequence[Any]) -> Row:
        if len(raw) != self._width:
            raise ValueError(f"a row of {len(raw)} values for {self._width} columns")
        values = list(raw)
        for index, decode in self._decoders:
            value = values[index]
            if value is not None:
                values[index] = decode(value)
        return tuple(values)


def _decoder(column: sa.ColumnElement[Any], dialect: Dialect) -> _Processor:
    decode: _Processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
    if decode is not None and isinstance(column.type, sa.Uuid):
        # SQLite stores a UUID as text, parsed again on every read; the ids a hot path
        # reads (its key's, its budgets', its project's) are few and repeat.
        decode = functools.lru_cache(maxsize=4096)(decode)
    return decode


class LeanStatement:
    """A Core statement returning ``columns``, runnable on the lean path or the generic one."""

    def __init__(self, statement: sa.Executable, columns: Sequence[sa.ColumnElement[Any]]) -> None:
        self.statement = statement
        self._columns = tuple(columns)
        self._compiled: dict[tuple[str, str | None], CompiledLean] = {}

    def compiled(self, dialect: Dialect, schema: str | None) -> CompiledLean:
        key = (dialect.name, schema)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = CompiledLean(
                self.statement, self._columns, dialect, schema
            )
        return compiled

    def first(self, conn: Connection, params: Mapping[str, Any]) -> Row | None:
        """The first row, through SQLAlchemy (inside transactions and on host engines)."""
        row = conn.execute(self.statement, dict(params)).first()
        return None if row is None else tuple(row)

    def first_any(self, conn: Connection, params: Mapping[str, Any]) -> Row | None:
        """The first row, on the bare ``sqlite3`` connection when there is one."""
        if conn.dialect.driver == "pysqlite":
            return self.first_sqlite(conn, params)
        return self.first(conn, params)

    def all_any(self, conn: Connection, params: Mapping[str, Any]) -> list[Row]:
        """Every row, on the bare ``sqlite3`` connection when there is one."""
        if conn.dialect.driver == "pysqlite":
            compiled = self.compiled(conn.dialect, None)
            dbapi_connection: Any = conn.connection.dbapi_connection
            rows = dbapi_connection.execute(compiled.sql, compiled.args(params)).fetchall()
            return [compiled.row(row) for row in rows]
        return [tuple(row) for row in conn.execute(self.statement, dict(params))]

    def first_sqlite(self, conn: Connection, params: Mapping[str, Any]) -> Row | None:
        """The first row, through the ``sqlite3`` connection under ``conn``."""
        compiled = self.compiled(conn.dialect, None)
        dbapi_connection: Any = conn.connection.dbapi_connection
        # fetchall() steps the statement to its end, so an autocommit write is committed.
        rows = dbapi_connection.execute(compiled.sql, compiled.args(params)).fetchall()
        return compiled.row(rows[0]) if rows else None


class PostgresLane:
    """Up to ``size`` asyncpg connections held out of the engine's pool, for lean statements.

    A connection that fails or is cancelled mid-statement is discarded, never reused;
    one older than ``max_lifetime`` seconds is replaced.
    """

    def __init__(
        self, engine: AsyncEngine, *, size: int, schema: str | None, max_lifetime: float
    ) -> None:
        self._engine = engine
        self._dialect = engine.dialect
        self._schema = schema
        self._max_lifetime = max_lifetime
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Held] = []
        self._closed = False

    async def first(self, statement: LeanStatement, params: Mapping[str, Any]) -> Row | None:
        compiled = statement.compiled(self._dialect, self._schema)
        args = compiled.args(params)
        async with self._slots:
            held = await self._take()
            try:
                with translated():
                    rows = await held.driver.fetch(compiled.sql, *args)
            except BaseException:
                await asyncio.shield(held.discard())
                raise
            if self._closed:
                await held.conn.close()
            else:
                self._idle.append(held)
        return compiled.row(rows[0]) if rows else None

    async def _take(self) -> _Held:
        while self._idle:
            held = self._idle.pop()
            # A connection the server closed (a restart, a failover) is replaced before
            # use: asyncpg tells without a round trip.
            if time.monotonic() - held.since < self._max_lifetime and not held.driver.is_closed():
                return held
            await held.discard()
        if self._closed:
            raise StoreClosedError("the store is closed")
        with translated():
            conn = await self._engine.connect()
            try:
                raw = await conn.get_raw_connection()
            except BaseException:
                await conn.close()
                raise
        return _Held(conn, raw.driver_connection, time.monotonic())

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for held in idle:
            await held.conn.close()


class _Held:
    __slots__ = ("conn", "driver", "since")

    def __init__(self, conn: AsyncConnection, driver: Any, since: float) -> None:
        self.conn = conn
        self.driver = driver
        self.since = since

    async def discard(self) -> None:
        try:
            await self.conn.invalidate()
            await self.conn.close()
        except Exception:
            pass
