"""Usage rows on one connection: bulk insert with request-id checks, get and keyset lists.

A batch is written with the driver's bulk path: one ``executemany`` on SQLite, ``COPY``
(``copy_records_to_table``) on Postgres. Values go through the column types' own bind
processors, so rows read back exactly as the generic path would store them. Ids are taken
before the write (the high-water mark under SQLite's write lock, the sequence on
Postgres), so the caller learns each new row's id.

A ``request_id`` is unique: rows whose request id is stored already (or repeated earlier
in the batch) are reported, not written. Two batches racing with the same new
``request_id`` cannot both insert; the loser's whole transaction is undone.
"""

from __future__ import annotations

import builtins
import datetime as dt
import operator
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.util import await_only

from llmstore._db.schema import usage_logs

from .records import FIELD_OF_COLUMN, RecordResult, UsageLog, UsageRecord, log_from_row

U = usage_logs
_CHECK_CHUNK = 500
# Column name -> record field, for every column written from a record.
_FIELDS = {column: field for column, field in FIELD_OF_COLUMN.items() if column != "id"}
_WRITE_COLUMNS = ("id", *_FIELDS)
_LOG_COLUMNS = tuple(U.c)


def sqlite_utc_text(value: dt.datetime) -> str:
    """A UTC datetime as UTCDateTime stores it on SQLite: naive, with microseconds."""
    return value.isoformat(" ", "microseconds")[:26]  # without "+00:00"


class _Encoder:
    """Rows as the driver takes them, through each column type's bind processor."""

    def __init__(self, dialect: Dialect) -> None:
        processors: list[Callable[[Any], Any] | None] = [
            U.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in _FIELDS
        ]
        if dialect.name == "sqlite":
            # The same values by a shorter road (tests compare them with the processors'):
            # a record's created_at is already UTC, sqlite3 stores bools as 1 and 0.
            shortcuts: dict[type, Callable[[Any], Any] | None] = {
                bool: None,
                float: None,  # a record's floats are floats already
                uuid.UUID: operator.attrgetter("hex"),
            }
            for index, name in enumerate(_FIELDS):
                python_type = U.c[name].type.python_type
                if name == "created_at":
                    processors[index] = sqlite_utc_text
                elif python_type in shortcuts:
                    processors[index] = shortcuts[python_type]
        # Most columns need no processing: take each record's values in one C call, turn
        # rows into columns (zip), process the few columns that need it, and turn them
        # back (a per-value Python loop cost more than the driver's insert).
        self._values = operator.itemgetter(*_FIELDS.values())
        self._processed = [(i, p) for i, p in enumerate(processors) if p is not None]

    def rows(self, records: Sequence[UsageRecord], ids: Sequence[int]) -> list[tuple[Any, ...]]:
        if len(records) != len(ids):
            raise ValueError("one id per record")
        if not records:
            return []
        dicts = map(operator.attrgetter("__dict__"), records)
        columns: list[Sequence[Any]] = list(zip(*map(self._values, dicts), strict=True))
        for index, process in self._processed:
            columns[index] = [None if v is None else process(v) for v in columns[index]]
        return list(zip(ids, *columns, strict=True))


_ENCODERS: dict[str, _Encoder] = {}
_SQLITE_INSERT = (
    f"INSERT INTO {U.name} ({', '.join(_WRITE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _WRITE_COLUMNS)})"
)


def _encoder(dialect: Dialect) -> _Encoder:
    encoder = _ENCODERS.get(dialect.name)
    if encoder is None:
        encoder = _ENCODERS[dialect.name] = _Encoder(dialect)
    return encoder


# A unique index refused a row: Postgres's SQLSTATE, SQLite's extended result code.
_UNIQUE_VIOLATIONS = {"23505", "SQLITE_CONSTRAINT_UNIQUE"}
_SQLITE_TOP_ID = sa.text(
    f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{U.name}'), 0),"
    f" coalesce((SELECT max(id) FROM {U.name}), 0))"
)
_SEQUENCES: dict[str | None, str] = {}


def _is_unique_violation(exc: BaseException) -> bool:
    """Whether a driver error, raised by the driver itself or wrapped by SQLAlchemy, is a
    unique index refusing a row."""
    for candidate in (exc, getattr(exc, "orig", None)):
        for attribute in ("sqlstate", "sqlite_errorname"):
            if getattr(candidate, attribute, None) in _UNIQUE_VIOLATIONS:
                return True
    return False


def _schema(conn: Connection) -> str | None:
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema


class UsageRepository:
    """Usage rows on one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def insert(self, records: Sequence[UsageRecord]) -> RecordResult:
        """Write the records whose request id is new; report the others."""
        if all(record.request_id is None for record in records):
            return self._insert(records, stored=set())
        # Most batches repeat no stored request id: try them as they are, and look the ids
        # up only when the unique index says one is taken. (Looking them up first cost
        # more than the COPY on Postgres, and a tenth of the whole write on SQLite.)
        try:
            with self._conn.begin_nested():
                return self._insert(records, stored=set())
        except Exception as exc:
            if not _is_unique_violation(exc):
                raise
        return self._insert(records, stored=self._stored_request_ids(records))

    def _insert(self, records: Sequence[UsageRecord], stored: set[str]) -> RecordResult:
        seen = set(stored)
        fresh: list[UsageRecord] = []
        duplicates: list[str] = []
        positions: list[int | None] = []
        for record in records:
            request_id = record.request_id
            if request_id is not None and request_id in seen:
                duplicates.append(request_id)
                positions.append(None)
                continue
            if request_id is not None:
                seen.add(request_id)
            positions.append(len(fresh))
            fresh.append(record)
        ids = self._new_ids(len(fresh))
        if fresh:
            self._write(fresh, ids)
        return RecordResult(
            written=len(fresh),
            duplicate_request_ids=duplicates,
            ids=[None if position is None else ids[position] for position in positions],
        )

    def _stored_request_ids(self, records: Sequence[UsageRecord]) -> set[str]:
        wanted = sorted({r.request_id for r in records if r.request_id is not None})
        if self._conn.dialect.name == "postgresql":
            listed = sa.bindparam("wanted", wanted, type_=postgresql.ARRAY(sa.String()))
            statement = sa.select(U.c.request_id).where(U.c.request_id == sa.any_(listed))
            return set(self._conn.execute(statement).scalars())
        found: set[str] = set()
        for start in range(0, len(wanted), _CHECK_CHUNK):
            chunk = wanted[start : start + _CHECK_CHUNK]
            found.update(
                self._conn.execute(sa.select(U.c.request_id).where(U.c.request_id.in_(chunk)))
                .scalars()
                .all()
            )
        return found

    def _new_ids(self, count: int) -> list[int]:
        if count == 0:
            return []
        if self._conn.dialect.name == "postgresql":
            sequence = sa.cast(self._sequence(), postgresql.REGCLASS)
            statement = sa.select(sa.func.nextval(sequence)).select_from(
                sa.func.generate_series(1, count)
            )
            return list(self._conn.execute(statement).scalars())
        # SQLite: the write lock is held (BEGIN IMMEDIATE), so nobody else takes these.
        # AUTOINCREMENT's high-water mark keeps a purged row's id from coming back.
        top = self._conn.execute(_SQLITE_TOP_ID).scalar() or 0
        return list(range(top + 1, top + 1 + count))

    def _sequence(self) -> str:
        # Looked up once per schema: pg_get_serial_sequence per row cost 10 us each.
        schema = _schema(self._conn)
        name = _SEQUENCES.get(schema)
        if name is None:
            table = U.name if schema is None else f'"{schema}".{U.name}'
            found = self._conn.execute(sa.select(sa.func.pg_get_serial_sequence(table, "id")))
            name = _SEQUENCES[schema] = str(found.scalar_one())
        return name

    def _write(self, records: Sequence[UsageRecord], ids: Sequence[int]) -> None:
        dialect = self._conn.dialect
        rows = _encoder(dialect).rows(records, ids)
        driver = self._conn.connection.driver_connection
        if dialect.name == "postgresql":
            # The COPY joins the transaction that SQLAlchemy began for the id query just
            # before it (the asyncpg dialect starts one at the first statement).
            await_only(
                driver.copy_records_to_table(  # type: ignore[union-attr]
                    U.name,
                    records=rows,
                    columns=_WRITE_COLUMNS,
                    schema_name=_schema(self._conn),
                )
            )
            return
        cursor = self._conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(_SQLITE_INSERT, rows)
        finally:
            cursor.close()

    def get(self, usage_id: int) -> UsageLog | None:
        row = self._conn.execute(sa.select(*_LOG_COLUMNS).where(U.c.id == usage_id)).first()
        return None if row is None else log_from_row(row)

    def list(
        self,
        *,
        api_key_id: uuid.UUID | None,
        project_id: uuid.UUID | None,
        model: str | None,
        success: bool | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        limit: int,
        after: int | None,
    ) -> builtins.list[UsageLog]:
        """Newest first by (created_at, id); ``after`` is the last id of the previous page."""
        statement = sa.select(*_LOG_COLUMNS)
        if api_key_id is not None:
            statement = statement.where(U.c.api_key_id == api_key_id)
        if project_id is not None:
            statement = statement.where(U.c.project_id == project_id)
        if model is not None:
            statement = statement.where(U.c.model == model)
        if success is not None:
            statement = statement.where(U.c.success == success)
        if since is not None:
            statement = statement.where(U.c.created_at >= since)
        if until is not None:
            statement = statement.where(U.c.created_at < until)
        if after is not None:
            boundary = sa.select(U.c.created_at).where(U.c.id == after).scalar_subquery()
            statement = statement.where(
                sa.or_(
                    U.c.created_at < boundary,
                    sa.and_(U.c.created_at == boundary, U.c.id < after),
                )
            )
        statement = statement.order_by(U.c.created_at.desc(), U.c.id.desc()).limit(limit)
        return [log_from_row(row) for row in self._conn.execute(statement)]
