"""Bulk writes by the driver's own fast path: ``COPY`` on Postgres, ``executemany`` on SQLite.

Values go through the column types' own bind processors, so rows read back exactly as the
generic path would store them. Ids are taken before the write (the high-water mark under
SQLite's write lock, the sequence on Postgres), so the caller learns each new row's id.
The caller owns the transaction.
"""

from __future__ import annotations

import datetime as dt
import operator
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.util import await_only

from .dialects import is_postgres
from .schema import UTCDateTime

__all__ = ["BulkTable", "RowEncoder", "schema_of", "sqlite_utc_text"]


def sqlite_utc_text(value: dt.datetime) -> str:
    """A UTC datetime as UTCDateTime stores it on SQLite: naive, with microseconds."""
    return value.isoformat(" ", "microseconds")[:26]  # without "+00:00"


def schema_of(conn: Connection) -> str | None:
    """The schema llmstore's tables are in on this connection (None: the default)."""
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema


class RowEncoder:
    """Objects' attributes as the driver takes them, through each column's bind processor.

    ``fields`` maps each written column to the attribute it is read from (the id column,
    given separately, excluded), or to None for a column whose values are always given
    to :meth:`rows`.
    """

    def __init__(self, table: sa.Table, fields: Mapping[str, str | None], dialect: Dialect) -> None:
        processors: list[Callable[[Any], Any] | None] = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in fields
        ]
        if dialect.name == "sqlite":
            # The same values by a shorter road (tests compare them with the processors'):
            # a datetime is already UTC, sqlite3 stores bools as 1 and 0.
            shortcuts: dict[type, Callable[[Any], Any] | None] = {
                bool: None,
                float: None,  # pydantic's floats are floats already
                uuid.UUID: operator.attrgetter("hex"),
            }
            for index, name in enumerate(fields):
                column_type = table.c[name].type
                if isinstance(column_type, UTCDateTime):
                    processors[index] = sqlite_utc_text
                elif column_type.python_type in shortcuts:
                    processors[index] = shortcuts[column_type.python_type]
        # Most columns need no processing: take each object's values in one C call, turn
        # rows into columns (zip), process the few columns that need it, and turn them
        # back (a per-value Python loop cost more than the driver's insert).
        self._names = tuple(fields)
        self._read = {name for name, field in fields.items() if field is not None}
        self._always_given = tuple(name for name in fields if name not in self._read)
        self._values = operator.itemgetter(*(f for f in fields.values() if f is not None))
        self._processed = [(i, p) for i, p in enumerate(processors) if p is not None]

    def rows(
        self,
        objects: Sequence[Any],
        ids: Sequence[int],
        given: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[tuple[Any, ...]]:
        """One tuple per object: its id, then its fields in column order.

        ``given`` holds whole columns of values to write instead of the objects' own (one
        value per object), such as a value computed at write time.
        """
        if len(objects) != len(ids):
            raise ValueError("one id per object")
        if not objects:
            return []
        given = given or {}
        missing = [name for name in self._always_given if name not in given]
        if missing:
            raise ValueError(f"no values given for {', '.join(missing)}")
        dicts = map(operator.attrgetter("__dict__"), objects)
        read = iter(zip(*map(self._values, dicts), strict=True))
        columns: list[Sequence[Any]] = []
        for name in self._names:
            values: Sequence[Any] = next(read) if name in self._read else ()
            if name in given:
                values = given[name]
                if len(values) != len(objects):
                    raise ValueError(f"one {name} per object")
            columns.append(values)
        for index, process in self._processed:
            columns[index] = [None if v is None else process(v) for v in columns[index]]
        return list(zip(ids, *columns, strict=True))


class BulkTable:
    """Bulk inserts into ``table``, whose integer ``id`` is AUTOINCREMENT / a sequence."""

    def __init__(self, table: sa.Table, fields: Mapping[str, str | None]) -> None:
        self.table = table
        self.fields = dict(fields)
        self.columns = ("id", *self.fields)
        self._encoders: dict[str, RowEncoder] = {}
        self._sequences: dict[str | None, str] = {}
        self._sqlite_insert = (
            f"INSERT INTO {table.name} ({', '.join(self.columns)}) "
            f"VALUES ({', '.join('?' for _ in self.columns)})"
        )
        self._sqlite_top_id = sa.text(
            f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table.name}'),"
            f" 0), coalesce((SELECT max(id) FROM {table.name}), 0))"
        )

    def encoder(self, dialect: Dialect) -> RowEncoder:
        encoder = self._encoders.get(dialect.name)
        if encoder is None:
            encoder = self._encoders[dialect.name] = RowEncoder(self.table, self.fields, dialect)
        return encoder

    def new_ids(self, conn: Connection, count: int) -> list[int]:
        """``count`` ids that nobody else takes, in increasing order."""
        if count == 0:
            return []
        if is_postgres(conn):
            sequence = sa.cast(self._sequence(conn), postgresql.REGCLASS)
            statement = sa.select(sa.func.nextval(sequence)).select_from(
                sa.func.generate_series(1, count)
            )
            return list(conn.execute(statement).scalars())
        # SQLite: the write lock is held (BEGIN IMMEDIATE), so nobody else takes these.
        # AUTOINCREMENT's high-water mark keeps a purged row's id from coming back.
        top = conn.execute(self._sqlite_top_id).scalar() or 0
        return list(range(top + 1, top + 1 + count))

    def _sequence(self, conn: Connection) -> str:
        # Looked up once per schema: pg_get_serial_sequence per row cost 10 us each.
        schema = schema_of(conn)
        name = self._sequences.get(schema)
        if name is None:
            table = self.table.name if schema is None else f'"{schema}".{self.table.name}'
            found = conn.execute(sa.select(sa.func.pg_get_serial_sequence(table, "id")))
            name = self._sequences[schema] = str(found.scalar_one())
        return name

    def write(
        self,
        conn: Connection,
        objects: Sequence[Any],
        ids: Sequence[int],
        given: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Insert ``objects`` under ``ids`` (from :meth:`new_ids`) in one driver call;
        ``given`` as in :meth:`RowEncoder.rows`."""
        rows = self.encoder(conn.dialect).rows(objects, ids, given)
        driver = conn.connection.driver_connection
        if is_postgres(conn):
            # The COPY joins the transaction that SQLAlchemy began for the id query just
            # before it (the asyncpg dialect starts one at the first statement).
            await_only(
                driver.copy_records_to_table(  # type: ignore[union-attr]
                    self.table.name,
                    records=rows,
                    columns=self.columns,
                    schema_name=schema_of(conn),
                )
            )
            return
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(self._sqlite_insert, rows)
        finally:
            cursor.close()
