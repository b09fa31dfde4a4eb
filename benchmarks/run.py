"""Benchmark harness: llmstore next to the raw driver and the SQLAlchemy ORM, per operation.

Run ``python -m benchmarks.run --help``; ``benchmarks/README.md`` explains the output.

Each operation is measured three ways in one process, on the same database:

* ``llmstore``: the public ``Store`` API, on the tables that the migrations create
  (``llmstore_projects``, ``llmstore_tokens``, ``llmstore_api_keys``,
  ``llmstore_ledger_entries``, ``llmstore_reservations``, ``llmstore_usage_logs``);
* ``raw``: the bare driver (stdlib ``sqlite3`` behind a one-thread executor, or ``asyncpg``)
  sending the same statements as llmstore (a multi-statement unit in one transaction: one
  thread hop on SQLite, BEGIN ... COMMIT on Postgres), on ``raw_*`` tables with the same DDL;
* ``orm``: the SQLAlchemy ORM written the usual way (``AsyncSession`` per operation), on
  ``orm_*`` tables with the same columns.

Operations run one at a time, awaited, so the figures are latency-bound throughput.

To add an operation, write a class with three async methods ``llmstore``, ``raw`` and
``orm``: each takes the :class:`Context`, does its untimed setup (seeding rows, ...) and
returns the zero-argument coroutine function that is timed (or a :class:`PreparedCall`, whose
input is built untimed before each call). Then add an instance to :data:`OPERATIONS` under
the operation's name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import itertools
import os
import re
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship

import llmstore
from llmstore import Store, StoreConfig, UsageRecord
from llmstore._core.ids import new_id, utcnow
from llmstore._db.schema import NAMING_CONVENTION
from llmstore.migrations._commands import upgrade

from .usage_data import UsageRows

Driver = Literal["sqlite", "postgres"]
Variant = Literal["llmstore", "raw", "orm"]

DRIVERS: Final[tuple[Driver, ...]] = ("sqlite", "postgres")
VARIANTS: Final[tuple[Variant, ...]] = ("llmstore", "raw", "orm")
POSTGRES_URL_VARIABLE: Final = "LLMSTORE_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_URL: Final = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_OPS: Final = 2000
DEFAULT_ROUNDS: Final = 5
SEED_ROWS: Final = 300

#: What an operation's variant hands back: one call is one timed operation.
OpCall = Callable[[], Awaitable[object]]

In = TypeVar("In")


class PreparedCall(Generic[In]):
    """A timed call that takes fresh input each time (a batch of new rows, say).

    The harness calls ``prepare()`` before each call and times only the call itself.
    """

    def __init__(self, build: Callable[[], In], call: Callable[[In], Awaitable[object]]) -> None:
        self._build = build
        self._call = call
        self._input: list[In] = []

    def prepare(self) -> None:
        self._input.append(self._build())

    async def __call__(self) -> object:
        return await self._call(self._input.pop())


# --------------------------------------------------------------------------------------
# The raw drivers: one statement, one round trip (Postgres) or one thread hop (SQLite).
# --------------------------------------------------------------------------------------


T = TypeVar("T")

#: A raw transaction's body: yields ``(sql, args)``, is sent each statement's first row.
RawSteps = Generator[tuple[str, tuple[object, ...]], Sequence[Any] | None, T]

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
        statement's first row (or None); its return value is returned. An exception
        raised in it rolls the transaction back.
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


#: ``usage_logs`` after its id, as migration 0004_usage_logs_receipts creates it:
#: (column, SQLite type, Postgres type, NOT NULL).
USAGE_COLUMNS: Final = (
    ("created_at", "DATETIME", "TIMESTAMP WITH TIME ZONE", True),
    ("api_key_id", "CHAR(32)", "UUID", False),
    ("project_id", "CHAR(32)", "UUID", False),
    ("token_id", "CHAR(32)", "UUID", False),
    ("request_id", "VARCHAR(200)", "VARCHAR(200)", False),
    ("alias", "VARCHAR(200)", "VARCHAR(200)", False),
    ("profile", "VARCHAR(200)", "VARCHAR(200)", False),
    ("provider", "VARCHAR(200)", "VARCHAR(200)", False),
    ("model", "VARCHAR(200)", "VARCHAR(200)", False),
    ("origin", "VARCHAR(200)", "VARCHAR(200)", False),
    ("is_streaming", "BOOLEAN", "BOOLEAN", True),
    ("success", "BOOLEAN", "BOOLEAN", True),
    ("status_code", "INTEGER", "INTEGER", False),
    ("response_time_ms", "BIGINT", "BIGINT", False),
    ("time_to_first_token_ms", "BIGINT", "BIGINT", False),
    ("time_to_last_token_ms", "BIGINT", "BIGINT", False),
    ("tokens_per_second", "FLOAT", "FLOAT", False),
    ("prompt_tokens", "BIGINT", "BIGINT", True),
    ("completion_tokens", "BIGINT", "BIGINT", True),
    ("cached_tokens", "BIGINT", "BIGINT", True),
    ("total_tokens", "BIGINT", "BIGINT", True),
    ("cost", "BIGINT", "BIGINT", True),
    ("finish_reason", "VARCHAR(100)", "VARCHAR(100)", False),
    ("max_tokens", "BIGINT", "BIGINT", False),
    ("temperature", "FLOAT", "FLOAT", False),
    ("top_p", "FLOAT", "FLOAT", False),
    ("message_count", "INTEGER", "INTEGER", False),
    ("error_type", "VARCHAR(200)", "VARCHAR(200)", False),
    ("error_message", "VARCHAR(4000)", "VARCHAR(4000)", False),
    ("usage_metadata", "JSON", "JSON", False),
)
USAGE_COLUMN_NAMES: Final = tuple(name for name, _, _, _ in USAGE_COLUMNS)


def raw_usage_ddl(driver: Driver) -> tuple[str, ...]:
    """``raw_usage_logs``: llmstore_usage_logs's columns, keys and indexes, other names."""
    id_type = "INTEGER" if driver == "sqlite" else "BIGSERIAL"
    columns = [f"id {id_type} NOT NULL"] + [
        f"{name} {sqlite if driver == 'sqlite' else postgres}{' NOT NULL' if required else ''}"
        for name, sqlite, postgres, required in USAGE_COLUMNS
    ]
    table = (
        "CREATE TABLE raw_usage_logs ("
        + ", ".join(columns)
        + ", CONSTRAINT pk_raw_usage_logs PRIMARY KEY (id)"
        + ", CONSTRAINT uq_raw_usage_logs_request_id UNIQUE (request_id))"
    )
    indexes = (("created_at", "id"), ("api_key_id", "created_at", "id"))
    indexes += (("project_id", "created_at", "id"), ("model", "created_at"))
    return (
        table,
        *(
            f"CREATE INDEX ix_raw_usage_logs_{'_'.join(index)} ON raw_usage_logs"
            f" ({', '.join(index)})"
            for index in indexes
        ),
    )


# The DDL of migrations 0001_projects (projects), 0002_tokens_audit_providers (tokens) and
# 0003_api_keys_ledger (api_keys, ledger_entries, reservations, with their indexes), and
# 0004_usage_logs_receipts (usage_logs, from raw_usage_ddl) as each dialect receives it, under
# other names; one statement per string, run in order.
RAW_DDL: Final[dict[Driver, tuple[str, ...]]] = {
    "sqlite": (
        """
        CREATE TABLE raw_projects (
            id CHAR(32) NOT NULL,
            name VARCHAR(200) NOT NULL,
            api_key_encrypted TEXT,
            is_active BOOLEAN NOT NULL,
            created_at DATETIME NOT NULL,
            updated_at DATETIME NOT NULL,
            deactivated_at DATETIME,
            CONSTRAINT pk_raw_projects PRIMARY KEY (id),
            CONSTRAINT uq_raw_projects_name UNIQUE (name)
        )
        """,
        """
        CREATE TABLE raw_tokens (
            id CHAR(32) NOT NULL,
            project_id CHAR(32) NOT NULL,
            secret_digest VARCHAR(64) NOT NULL,
            prefix VARCHAR(16) NOT NULL,
            name VARCHAR(200),
            expires_at DATETIME,
            is_active BOOLEAN NOT NULL,
            deactivated_at DATETIME,
            request_count BIGINT NOT NULL,
            max_requests BIGINT,
            cache_hit_count BIGINT NOT NULL,
            created_at DATETIME NOT NULL,
            last_used_at DATETIME,
            CONSTRAINT pk_raw_tokens PRIMARY KEY (id),
            CONSTRAINT uq_raw_tokens_secret_digest UNIQUE (secret_digest),
            CONSTRAINT uq_raw_tokens_project_id_name UNIQUE (project_id, name),
            CONSTRAINT ck_raw_tokens_request_count_not_negative CHECK (request_count >= 0),
            CONSTRAINT ck_raw_tokens_max_requests_positive
                CHECK (max_requests IS NULL OR max_requests > 0),
            CONSTRAINT fk_raw_tokens_project_id_raw_projects FOREIGN KEY (project_id)
                REFERENCES raw_projects (id) ON DELETE CASCADE
        )
        """,
        """
        CREATE TABLE raw_api_keys (
            id CHAR(32) NOT NULL,
            secret_digest VARCHAR(64) NOT NULL,
            prefix VARCHAR(16) NOT NULL,
            project_id CHAR(32),
            balance BIGINT NOT NULL,
            reserved BIGINT NOT NULL,
            total_deposited BIGINT NOT NULL,
            total_spent BIGINT NOT NULL,
            created_at DATETIME NOT NULL,
            last_used_at DATETIME,
            expires_at DATETIME,
            key_metadata JSON,
            CONSTRAINT pk_raw_api_keys PRIMARY KEY (id),
            CONSTRAINT uq_raw_api_keys_secret_digest UNIQUE (secret_digest),
            CONSTRAINT ck_raw_api_keys_balance_not_negative CHECK (balance >= 0),
            CONSTRAINT ck_raw_api_keys_reserved_within_balance
                CHECK (reserved >= 0 AND reserved <= balance),
            CONSTRAINT ck_raw_api_keys_totals_not_negative
                CHECK (total_deposited >= 0 AND total_spent >= 0),
            CONSTRAINT fk_raw_api_keys_project_id_raw_projects
                FOREIGN KEY (project_id) REFERENCES raw_projects (id) ON DELETE SET NULL
        )
        """,
        "CREATE INDEX ix_raw_api_keys_expires_at ON raw_api_keys (expires_at)",
        "CREATE INDEX ix_raw_api_keys_project_id ON raw_api_keys (project_id)",
        """
        CREATE TABLE raw_ledger_entries (
            id INTEGER NOT NULL,
            api_key_id CHAR(32) NOT NULL,
            kind VARCHAR(20) NOT NULL,
            amount BIGINT NOT NULL,
            balance_after BIGINT NOT NULL,
            description VARCHAR(500) NOT NULL,
            idempotency_key VARCHAR(200),
            params_digest VARCHAR(64),
            request_data JSON,
            shortfall BIGINT NOT NULL,
            reservation_id CHAR(32),
            withdrawal_id CHAR(32),
            transfer_id CHAR(32),
            created_at DATETIME NOT NULL,
            CONSTRAINT pk_raw_ledger_entries PRIMARY KEY (id),
            CONSTRAINT uq_raw_ledger_entries_api_key_id_idempotency_key
                UNIQUE (api_key_id, idempotency_key),
            CONSTRAINT ck_raw_ledger_entries_kind CHECK (
                kind IN ('deposit', 'charge', 'settlement', 'transfer_in', 'transfer_out',
                         'withdrawal', 'withdrawal_refund')
            ),
            CONSTRAINT ck_raw_ledger_entries_balance_after_not_negative CHECK (balance_after >= 0),
            CONSTRAINT ck_raw_ledger_entries_shortfall_not_negative CHECK (shortfall >= 0),
            CONSTRAINT fk_raw_ledger_entries_api_key_id_raw_api_keys
                FOREIGN KEY (api_key_id) REFERENCES raw_api_keys (id) ON DELETE CASCADE
        )
        """,
        "CREATE INDEX ix_raw_ledger_entries_api_key_id_id ON raw_ledger_entries (api_key_id, id)",
        """
        CREATE TABLE raw_reservations (
            id CHAR(32) NOT NULL,
            api_key_id CHAR(32) NOT NULL,
            amount BIGINT NOT NULL,
            status VARCHAR(10) NOT NULL,
            created_at DATETIME NOT NULL,
            expires_at DATETIME NOT NULL,
            settled_amount BIGINT,
            finished_at DATETIME,
            CONSTRAINT pk_raw_reservations PRIMARY KEY (id),
            CONSTRAINT ck_raw_reservations_amount_positive CHECK (amount > 0),
            CONSTRAINT ck_raw_reservations_status
                CHECK (status IN ('active', 'settled', 'released', 'expired')),
            CONSTRAINT fk_raw_reservations_api_key_id_raw_api_keys
                FOREIGN KEY (api_key_id) REFERENCES raw_api_keys (id) ON DELETE CASCADE
        )
        """,
        "CREATE INDEX ix_raw_reservations_api_key_id_status"
        " ON raw_reservations (api_key_id, status)",
        "CREATE INDEX ix_raw_reservations_status_expires_at"
        " ON raw_reservations (status, expires_at)",
        *raw_usage_ddl("sqlite"),
    ),
    "postgres": (
        """
        CREATE TABLE raw_projects (
            id UUID NOT NULL,
            name VARCHAR(200) NOT NULL,
            api_key_encrypted TEXT,
            is_active BOOLEAN NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
            deactivated_at TIMESTAMP WITH TIME ZONE,
            CONSTRAINT pk_raw_projects PRIMARY KEY (id),
            CONSTRAINT uq_raw_projects_name UNIQUE (name)
        )
        """,
        """
        CREATE TABLE raw_tokens (
            id UUID NOT NULL,
            project_id UUID NOT NULL,
            secret_digest VARCHAR(64) NOT NULL,
            prefix VARCHAR(16) NOT NULL,
            name VARCHAR(200),
            expires_at TIMESTAMP WITH TIME ZONE,
            is_active BOOLEAN NOT NULL,
            deactivated_at TIMESTAMP WITH TIME ZONE,
            request_count BIGINT NOT NULL,
            max_requests BIGINT,
            cache_hit_count BIGINT NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            last_used_at TIMESTAMP WITH TIME ZONE,
            CONSTRAINT pk_raw_tokens PRIMARY KEY (id),
            CONSTRAINT uq_raw_tokens_secret_digest UNIQUE (secret_digest),
            CONSTRAINT uq_raw_tokens_project_id_name UNIQUE (project_id, name),
            CONSTRAINT ck_raw_tokens_request_count_not_negative CHECK (request_count >= 0),
            CONSTRAINT ck_raw_tokens_max_requests_positive
                CHECK (max_requests IS NULL OR max_requests > 0),
            CONSTRAINT fk_raw_tokens_project_id_raw_projects FOREIGN KEY (project_id)
                REFERENCES raw_projects (id) ON DELETE CASCADE
        )
        """,
        """
        CREATE TABLE raw_api_keys (
            id UUID NOT NULL,
            secret_digest VARCHAR(64) NOT NULL,
            prefix VARCHAR(16) NOT NULL,
            project_id UUID,
            balance BIGINT NOT NULL,
            reserved BIGINT NOT NULL,
            total_deposited BIGINT NOT NULL,
            total_spent BIGINT NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            last_used_at TIMESTAMP WITH TIME ZONE,
            expires_at TIMESTAMP WITH TIME ZONE,
            key_metadata JSON,
            CONSTRAINT pk_raw_api_keys PRIMARY KEY (id),
            CONSTRAINT uq_raw_api_keys_secret_digest UNIQUE (secret_digest),
            CONSTRAINT ck_raw_api_keys_balance_not_negative CHECK (balance >= 0),
            CONSTRAINT ck_raw_api_keys_reserved_within_balance
                CHECK (reserved >= 0 AND reserved <= balance),
            CONSTRAINT ck_raw_api_keys_totals_not_negative
                CHECK (total_deposited >= 0 AND total_spent >= 0),
            CONSTRAINT fk_raw_api_keys_project_id_raw_projects
                FOREIGN KEY (project_id) REFERENCES raw_projects (id) ON DELETE SET NULL
        )
        """,
        "CREATE INDEX ix_raw_api_keys_expires_at ON raw_api_keys (expires_at)",
        "CREATE INDEX ix_raw_api_keys_project_id ON raw_api_keys (project_id)",
        """
        CREATE TABLE raw_ledger_entries (
            id BIGSERIAL NOT NULL,
            api_key_id UUID NOT NULL,
            kind VARCHAR(20) NOT NULL,
            amount BIGINT NOT NULL,
            balance_after BIGINT NOT NULL,
            description VARCHAR(500) NOT NULL,
            idempotency_key VARCHAR(200),
            params_digest VARCHAR(64),
            request_data JSON,
            shortfall BIGINT NOT NULL,
            reservation_id UUID,
            withdrawal_id UUID,
            transfer_id UUID,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            CONSTRAINT pk_raw_ledger_entries PRIMARY KEY (id),
            CONSTRAINT uq_raw_ledger_entries_api_key_id_idempotency_key
                UNIQUE (api_key_id, idempotency_key),
            CONSTRAINT ck_raw_ledger_entries_kind CHECK (
                kind IN ('deposit', 'charge', 'settlement', 'transfer_in', 'transfer_out',
                         'withdrawal', 'withdrawal_refund')
            ),
            CONSTRAINT ck_raw_ledger_entries_balance_after_not_negative CHECK (balance_after >= 0),
            CONSTRAINT ck_raw_ledger_entries_shortfall_not_negative CHECK (shortfall >= 0),
            CONSTRAINT fk_raw_ledger_entries_api_key_id_raw_api_keys
                FOREIGN KEY (api_key_id) REFERENCES raw_api_keys (id) ON DELETE CASCADE
        )
        """,
        "CREATE INDEX ix_raw_ledger_entries_api_key_id_id ON raw_ledger_entries (api_key_id, id)",
        """
        CREATE TABLE raw_reservations (
            id UUID NOT NULL,
            api_key_id UUID NOT NULL,
            amount BIGINT NOT NULL,
            status VARCHAR(10) NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
            settled_amount BIGINT,
            finished_at TIMESTAMP WITH TIME ZONE,
            CONSTRAINT pk_raw_reservations PRIMARY KEY (id),
            CONSTRAINT ck_raw_reservations_amount_positive CHECK (amount > 0),
            CONSTRAINT ck_raw_reservations_status
                CHECK (status IN ('active', 'settled', 'released', 'expired')),
            CONSTRAINT fk_raw_reservations_api_key_id_raw_api_keys
                FOREIGN KEY (api_key_id) REFERENCES raw_api_keys (id) ON DELETE CASCADE
        )
        """,
        "CREATE INDEX ix_raw_reservations_api_key_id_status"
        " ON raw_reservations (api_key_id, status)",
        "CREATE INDEX ix_raw_reservations_status_expires_at"
        " ON raw_reservations (status, expires_at)",
        *raw_usage_ddl("postgres"),
    ),
}


# --------------------------------------------------------------------------------------
# The ORM: a declarative model, as an application would write it.
# --------------------------------------------------------------------------------------


class OrmBase(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class OrmProject(OrmBase):
    __tablename__ = "orm_projects"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    api_key_encrypted: Mapped[str | None] = mapped_column(sa.Text())
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))


class OrmToken(OrmBase):
    __tablename__ = "orm_tokens"
    __table_args__ = (
        sa.UniqueConstraint("project_id", "name"),
        sa.CheckConstraint("request_count >= 0", name="request_count_not_negative"),
        sa.CheckConstraint(
            "max_requests IS NULL OR max_requests > 0", name="max_requests_positive"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    project_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_projects.id", ondelete="CASCADE")
    )
    secret_digest: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    expires_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    is_active: Mapped[bool] = mapped_column(default=True)
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    request_count: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    max_requests: Mapped[int | None] = mapped_column(sa.BigInteger())
    cache_hit_count: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))

    project: Mapped[OrmProject] = relationship()


#: ``ledger_entries.id``: BIGSERIAL on Postgres, the rowid (INTEGER PRIMARY KEY) on SQLite.
LEDGER_ID_TYPE: Final = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class OrmApiKey(OrmBase):
    __tablename__ = "orm_api_keys"
    __table_args__ = (
        sa.CheckConstraint("balance >= 0", name="balance_not_negative"),
        sa.CheckConstraint("reserved >= 0 AND reserved <= balance", name="reserved_within_balance"),
        sa.CheckConstraint("total_deposited >= 0 AND total_spent >= 0", name="totals_not_negative"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    secret_digest: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("orm_projects.id", ondelete="SET NULL"), index=True
    )
    balance: Mapped[int] = mapped_column(sa.BigInteger())
    reserved: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    total_deposited: Mapped[int] = mapped_column(sa.BigInteger())
    total_spent: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    expires_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True), index=True)
    key_metadata: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())


class OrmLedgerEntry(OrmBase):
    __tablename__ = "orm_ledger_entries"
    __table_args__ = (
        sa.UniqueConstraint("api_key_id", "idempotency_key"),
        sa.CheckConstraint(
            "kind IN ('deposit', 'charge', 'settlement', 'transfer_in', 'transfer_out', "
            "'withdrawal', 'withdrawal_refund')",
            name="kind",
        ),
        sa.CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
        sa.CheckConstraint("shortfall >= 0", name="shortfall_not_negative"),
        sa.Index(None, "api_key_id", "id"),
    )

    id: Mapped[int] = mapped_column(LEDGER_ID_TYPE, primary_key=True)
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_api_keys.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(sa.String(20))
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    balance_after: Mapped[int] = mapped_column(sa.BigInteger())
    description: Mapped[str] = mapped_column(sa.String(500), default="")
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200))
    params_digest: Mapped[str | None] = mapped_column(sa.String(64))
    request_data: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    shortfall: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    reservation_id: Mapped[uuid.UUID | None]
    withdrawal_id: Mapped[uuid.UUID | None]
    transfer_id: Mapped[uuid.UUID | None]
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class OrmReservation(OrmBase):
    __tablename__ = "orm_reservations"
    __table_args__ = (
        sa.CheckConstraint("amount > 0", name="amount_positive"),
        sa.CheckConstraint("status IN ('active', 'settled', 'released', 'expired')", name="status"),
        sa.Index(None, "api_key_id", "status"),
        sa.Index(None, "status", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_api_keys.id", ondelete="CASCADE")
    )
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    status: Mapped[str] = mapped_column(sa.String(10))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    settled_amount: Mapped[int | None] = mapped_column(sa.BigInteger())
    finished_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))


class OrmUsageLog(OrmBase):
    __tablename__ = "orm_usage_logs"
    __table_args__ = (
        sa.Index(None, "created_at", "id"),
        sa.Index(None, "api_key_id", "created_at", "id"),
        sa.Index(None, "project_id", "created_at", "id"),
        sa.Index(None, "model", "created_at"),
    )

    id: Mapped[int] = mapped_column(LEDGER_ID_TYPE, primary_key=True)  # as ledger_entries.id
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    api_key_id: Mapped[uuid.UUID | None]
    project_id: Mapped[uuid.UUID | None]
    token_id: Mapped[uuid.UUID | None]
    request_id: Mapped[str | None] = mapped_column(sa.String(200), unique=True)
    alias: Mapped[str | None] = mapped_column(sa.String(200))
    profile: Mapped[str | None] = mapped_column(sa.String(200))
    provider: Mapped[str | None] = mapped_column(sa.String(200))
    model: Mapped[str | None] = mapped_column(sa.String(200))
    origin: Mapped[str | None] = mapped_column(sa.String(200))
    is_streaming: Mapped[bool] = mapped_column(default=False)
    success: Mapped[bool] = mapped_column(default=True)
    status_code: Mapped[int | None]
    response_time_ms: Mapped[int | None] = mapped_column(sa.BigInteger())
    time_to_first_token_ms: Mapped[int | None] = mapped_column(sa.BigInteger())
    time_to_last_token_ms: Mapped[int | None] = mapped_column(sa.BigInteger())
    tokens_per_second: Mapped[float | None]
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    cached_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    total_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    cost: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    finish_reason: Mapped[str | None] = mapped_column(sa.String(100))
    max_tokens: Mapped[int | None] = mapped_column(sa.BigInteger())
    temperature: Mapped[float | None]
    top_p: Mapped[float | None]
    message_count: Mapped[int | None]
    error_type: Mapped[str | None] = mapped_column(sa.String(200))
    error_message: Mapped[str | None] = mapped_column(sa.String(4000))
    usage_metadata: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())


def orm_sqlite_engine(path: Path) -> AsyncEngine:
    """aiosqlite, with the per-connection pragmas that llmstore and the raw variant use.

    WAL is a property of the file (already set); ``synchronous`` is per connection, and
    left at its default (FULL) it would add an fsync per commit that the others skip.
    """
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


# --------------------------------------------------------------------------------------
# The per-driver context: one database, three ways in.
# --------------------------------------------------------------------------------------


@dataclass
class Context:
    driver: Driver
    store: Store
    raw: RawDB
    orm: async_sessionmaker[AsyncSession]


def postgres_url() -> str:
    return os.environ.get(POSTGRES_URL_VARIABLE, "").strip() or DEFAULT_POSTGRES_URL


def masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@contextlib.asynccontextmanager
async def sqlite_context() -> AsyncIterator[Context]:
    with tempfile.TemporaryDirectory(prefix="llmstore-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        url = f"sqlite:///{path}"
        await upgrade(StoreConfig.from_url(url))
        raw = RawSQLite(path)
        await raw.open()
        engine = orm_sqlite_engine(path)
        try:
            for ddl in RAW_DDL["sqlite"]:
                await raw.execute(ddl)
            async with engine.begin() as conn:
                await conn.run_sync(OrmBase.metadata.create_all)
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            async with Store.from_url(
                url, allow_plaintext_secrets=True, token_pepper=None
            ) as store:
                yield Context("sqlite", store, raw, sessions)
        finally:
            await engine.dispose()
            await raw.close()


@contextlib.asynccontextmanager
async def postgres_context(url: str) -> AsyncIterator[Context]:
    schema = f"bench_{secrets.token_hex(6)}"
    orm_url = StoreConfig.from_url(url).url.get_secret_value()  # postgresql+asyncpg://
    dsn = make_url(orm_url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        await upgrade(StoreConfig.from_url(url, schema_name=schema))
        raw = await RawPostgres.connect(dsn, schema)
        engine = create_async_engine(
            orm_url, connect_args={"server_settings": {"search_path": schema}}
        )
        try:
            for ddl in RAW_DDL["postgres"]:
                await raw.execute(ddl)
            async with engine.begin() as conn:
                await conn.run_sync(OrmBase.metadata.create_all)
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            store = Store.from_url(
                url, schema_name=schema, allow_plaintext_secrets=True, token_pepper=None
            )
            async with store:
                yield Context("postgres", store, raw, sessions)
        finally:
            await engine.dispose()
            await raw.close()
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def postgres_reachable(url: str) -> str | None:
    """``None`` if the server answers, else why not."""
    orm_url = StoreConfig.from_url(url).url.get_secret_value()
    dsn = make_url(orm_url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


# --------------------------------------------------------------------------------------
# Operations.
# --------------------------------------------------------------------------------------


class Operation(Protocol):
    """One benchmarked operation; each method sets up (untimed) and returns the timed call."""

    description: str

    async def llmstore(self, ctx: Context) -> OpCall: ...

    async def raw(self, ctx: Context) -> OpCall: ...

    async def orm(self, ctx: Context) -> OpCall: ...


def unique_names(prefix: str) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in itertools.count())


def raw_insert_project(db: RawDB) -> str:
    columns = "id, name, api_key_encrypted, is_active, created_at, updated_at, deactivated_at"
    return f"INSERT INTO raw_projects ({columns}) VALUES ({db.placeholders(7)}) RETURNING *"


async def raw_create_project(db: RawDB, sql: str, name: str) -> Sequence[Any]:
    now = db.encode_time(utcnow())
    row = await db.fetchrow(sql, db.encode_id(new_id()), name, None, True, now, now, None)
    assert row is not None
    return row


class ProjectsCreate:
    description = "insert one project and return it"

    async def llmstore(self, ctx: Context) -> OpCall:
        names = unique_names("create-llmstore")
        projects = ctx.store.projects

        async def call() -> object:
            return await projects.create(next(names))

        return call

    async def raw(self, ctx: Context) -> OpCall:
        names = unique_names("create-raw")
        db = ctx.raw
        sql = raw_insert_project(db)

        async def call() -> object:
            return await raw_create_project(db, sql, next(names))

        return call

    async def orm(self, ctx: Context) -> OpCall:
        names = unique_names("create-orm")
        sessions = ctx.orm

        async def call() -> object:
            project = OrmProject(name=next(names))
            async with sessions() as session:
                session.add(project)
                await session.commit()
            return project

        return call


class ProjectsGet:
    description = f"fetch one project by id, cycling through {SEED_ROWS} seeded rows"

    async def llmstore(self, ctx: Context) -> OpCall:
        names = unique_names("get-llmstore")
        projects = ctx.store.projects
        ids = itertools.cycle([(await projects.create(next(names))).id for _ in range(SEED_ROWS)])

        async def call() -> object:
            return await projects.get(next(ids))

        return call

    async def raw(self, ctx: Context) -> OpCall:
        names = unique_names("get-raw")
        db = ctx.raw
        insert = raw_insert_project(db)
        seeded = [(await raw_create_project(db, insert, next(names)))[0] for _ in range(SEED_ROWS)]
        ids = itertools.cycle(seeded)
        sql = f"SELECT * FROM raw_projects WHERE id = {db.placeholder(1)}"

        async def call() -> object:
            row = await db.fetchrow(sql, next(ids))
            assert row is not None
            return row

        return call

    async def orm(self, ctx: Context) -> OpCall:
        names = unique_names("get-orm")
        sessions = ctx.orm
        seeded = [OrmProject(name=next(names)) for _ in range(SEED_ROWS)]
        async with sessions() as session:
            session.add_all(seeded)
            await session.commit()
        ids = itertools.cycle([project.id for project in seeded])

        async def call() -> object:
            async with sessions() as session:
                project = await session.get(OrmProject, next(ids))
            assert project is not None
            return project

        return call


def new_token_secret() -> str:
    """A secret shaped like llmstore's: ``lst_`` and 256 random bits, URL-safe base64."""
    return "lst_" + secrets.token_urlsafe(32)


def secret_digest(secret: str) -> str:
    """What llmstore stores and looks up (without ``LLMSTORE_TOKEN_PEPPER``): SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class TokenRefused(Exception):
    """The ORM variant's refusal; never raised while benchmarking a usable token."""


def as_utc(value: dt.datetime) -> dt.datetime:
    # aiosqlite hands DateTime(timezone=True) back naive (stored as UTC); asyncpg, aware.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


#: The columns that ``tokens.use`` returns, in the order of llmstore's ``Token``.
TOKEN_COLUMNS: Final = (
    "id, project_id, name, prefix, expires_at, is_active, deactivated_at, "
    "request_count, max_requests, cache_hit_count, created_at, last_used_at"
)


class TokensUse:
    description = "spend one request of an unlimited token (checks and increment) and return it"

    async def llmstore(self, ctx: Context) -> OpCall:
        store = ctx.store
        project = await store.projects.create("tokens-use-llmstore")
        secret = (await store.tokens.create(project.id, max_requests=None)).secret
        tokens = store.tokens

        async def call() -> object:
            return await tokens.use(secret)

        return call

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        project = await raw_create_project(db, raw_insert_project(db), "tokens-use-raw")
        secret = new_token_secret()
        now = db.encode_time(utcnow())
        values = {
            "id": db.encode_id(new_id()),
            "project_id": project[0],
            "secret_digest": secret_digest(secret),
            "prefix": secret[:12],
            "name": None,
            "expires_at": None,
            "is_active": True,
            "deactivated_at": None,
            "request_count": 0,
            "max_requests": None,  # unlimited
            "cache_hit_count": 0,
            "created_at": now,
            "last_used_at": None,
        }
        insert = (
            f"INSERT INTO raw_tokens ({', '.join(values)})"
            f" VALUES ({db.placeholders(len(values))}) RETURNING id"
        )
        assert await db.fetchrow(insert, *values.values()) is not None
        # $1 is now (used twice), $2 the digest; SQLite's "?" are positional, so now is sent
        # twice there, as llmstore's compiled statement sends it.
        now_mark, digest_mark = db.placeholder(1), db.placeholder(2)
        sql = (
            f"UPDATE raw_tokens SET request_count = request_count + 1, last_used_at = {now_mark}"
            f" WHERE secret_digest = {digest_mark} AND {db.is_true('is_active')}"
            f" AND (expires_at IS NULL OR expires_at > {now_mark})"
            " AND (max_requests IS NULL OR request_count < max_requests)"
            " AND EXISTS (SELECT 1 FROM raw_projects WHERE raw_projects.id = raw_tokens.project_id"
            f" AND {db.is_true('raw_projects.is_active')})"
            f" RETURNING {TOKEN_COLUMNS}"
        )
        positional = ctx.driver == "sqlite"

        async def call() -> object:
            digest = secret_digest(secret)
            now = db.encode_time(utcnow())
            args = (now, digest, now) if positional else (now, digest)
            row = await db.fetchrow(sql, *args)
            assert row is not None
            return row

        return call

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        secret = new_token_secret()
        async with sessions() as session:
            project = OrmProject(name="tokens-use-orm")
            session.add(project)
            session.add(
                OrmToken(project=project, secret_digest=secret_digest(secret), prefix=secret[:12])
            )
            await session.commit()

        async def call() -> object:
            digest = secret_digest(secret)
            async with sessions() as session:
                token = await session.scalar(
                    sa.select(OrmToken)
                    .options(joinedload(OrmToken.project))
                    .where(OrmToken.secret_digest == digest)
                )
                now = utcnow()
                if token is None:
                    raise TokenRefused("unknown")
                if not token.is_active:
                    raise TokenRefused("inactive")
                if not token.project.is_active:
                    raise TokenRefused("project_inactive")
                if token.expires_at is not None and as_utc(token.expires_at) <= now:
                    raise TokenRefused("expired")
                if token.max_requests is not None and token.request_count >= token.max_requests:
                    raise TokenRefused("quota_exhausted")
                token.request_count += 1
                token.last_used_at = now
                await session.commit()
            return token

        return call


#: A funded key never runs dry here: 10**15 units outlast any run by far.
OPENING_BALANCE: Final = 10**15
CHARGE_AMOUNT: Final = 1
HOLD_AMOUNT: Final = 5
SETTLED_AMOUNT: Final = 3
HOLD_TTL: Final = dt.timedelta(minutes=15)  # llmstore's default ttl
MAX_INT64: Final = 2**63 - 1


class LedgerRefused(Exception):
    """The raw and ORM variants' refusal; never raised while benchmarking a funded key."""


#: The columns that a ledger write returns, in the order of llmstore's ``LedgerEntry``.
ENTRY_COLUMNS: Final = (
    "id, api_key_id, kind, amount, balance_after, description, idempotency_key, "
    "request_data, shortfall, reservation_id, withdrawal_id, transfer_id, created_at"
)
RESERVATION_COLUMNS: Final = (
    "id, api_key_id, amount, status, created_at, expires_at, settled_amount, finished_at"
)

# The statements of llmstore's Ledger and ReservationRepository (llmstore/_ledger.py,
# llmstore/_holds.py), on the raw tables, with ":name" markers that RawDB.sql() turns into
# the dialect's parameters.
RAW_INSERT_ENTRY: Final = (
    "INSERT INTO raw_ledger_entries (api_key_id, kind, amount, balance_after, description,"
    " idempotency_key, params_digest, request_data, shortfall, reservation_id, withdrawal_id,"
    " transfer_id, created_at)"
    " VALUES (:api_key_id, :kind, :amount, :balance_after, :description, :idempotency_key,"
    " :params_digest, :request_data, :shortfall, :reservation_id, :withdrawal_id, :transfer_id,"
    " :created_at)"
    f" RETURNING {ENTRY_COLUMNS}"
)
# A charge's debit without an idempotency key: enough available, and total_spent cannot
# overflow. (A keyed charge also checks that no entry has its key yet.)
RAW_DEBIT_WHERE: Final = (
    " WHERE id = :key_id AND balance - reserved >= :amount"
    f" AND total_spent <= {MAX_INT64} - :amount"
)
RAW_DEBIT: Final = (
    "UPDATE raw_api_keys SET balance = balance - :amount, total_spent = total_spent + :amount,"
    " last_used_at = :now" + RAW_DEBIT_WHERE + " RETURNING balance"
)
# Postgres: the debit feeding its entry's INSERT, one statement (llmstore's CHARGE_CTE).
RAW_CHARGE_CTE: Final = (
    "WITH changed AS ("
    "UPDATE raw_api_keys SET balance = balance - :amount::BIGINT,"
    " total_spent = total_spent + :amount::BIGINT, last_used_at = :now::TIMESTAMPTZ"
    + RAW_DEBIT_WHERE
    + " RETURNING id, balance)"
    " INSERT INTO raw_ledger_entries (api_key_id, kind, amount, balance_after, description,"
    " idempotency_key, params_digest, request_data, shortfall, created_at)"
    " SELECT changed.id, 'charge', -:amount::BIGINT, changed.balance, :description::VARCHAR,"
    " :idempotency_key::VARCHAR, :params_digest::VARCHAR, :request_data::JSON, 0,"
    " :now::TIMESTAMPTZ FROM changed"
    f" RETURNING {ENTRY_COLUMNS}"
)
RAW_HOLD: Final = (
    "UPDATE raw_api_keys SET reserved = reserved + :amount, last_used_at = :now"
    " WHERE id = :key_id AND balance - reserved >= :amount RETURNING id"
)
RAW_INSERT_RESERVATION: Final = (
    "INSERT INTO raw_reservations (id, api_key_id, amount, status, created_at, expires_at,"
    " settled_amount, finished_at)"
    " VALUES (:id, :api_key_id, :amount, :status, :created_at, :expires_at, :settled_amount,"
    " :finished_at)"
    f" RETURNING {RESERVATION_COLUMNS}"
)
RAW_FINISH: Final = (
    "UPDATE raw_reservations SET status = :status, finished_at = :now"
    f" WHERE id = :id AND status = :active RETURNING {RESERVATION_COLUMNS}"
)
# Postgres: the hold feeding its reservation's INSERT, one statement (llmstore's RESERVE_CTE).
RAW_RESERVE_CTE: Final = (
    "WITH holding AS ("
    "UPDATE raw_api_keys SET reserved = reserved + :amount::BIGINT,"
    " last_used_at = :now::TIMESTAMPTZ"
    " WHERE id = :key_id::UUID AND balance - reserved >= :amount::BIGINT RETURNING id)"
    " INSERT INTO raw_reservations (id, api_key_id, amount, status, created_at, expires_at)"
    " SELECT :id::UUID, holding.id, :amount::BIGINT, 'active', :now::TIMESTAMPTZ,"
    " :expires_at::TIMESTAMPTZ FROM holding"
    f" RETURNING {RESERVATION_COLUMNS}"
)
# Postgres: lock the hold, lock its key, charge, finish the hold and write the entry, one
# statement (llmstore's SETTLE_CTE).
RAW_SETTLE_CTE: Final = (
    "WITH pending AS ("
    "SELECT id, api_key_id, amount FROM raw_reservations"
    " WHERE id = :id::UUID AND status = 'active' FOR UPDATE),"
    " account AS ("
    "SELECT raw_api_keys.id, pending.id AS reservation_id, pending.amount AS hold,"
    " LEAST(:actual::BIGINT, raw_api_keys.balance - raw_api_keys.reserved + pending.amount)"
    " AS charged"
    " FROM raw_api_keys JOIN pending ON raw_api_keys.id = pending.api_key_id"
    " FOR UPDATE OF raw_api_keys),"
    " changed AS ("
    "UPDATE raw_api_keys SET reserved = raw_api_keys.reserved - account.hold,"
    " balance = raw_api_keys.balance - account.charged,"
    " total_spent = raw_api_keys.total_spent + account.charged,"
    " last_used_at = :now::TIMESTAMPTZ"
    " FROM account WHERE raw_api_keys.id = account.id"
    " RETURNING raw_api_keys.id, raw_api_keys.balance, account.charged),"
    " finished AS ("
    "UPDATE raw_reservations SET status = 'settled', finished_at = :now::TIMESTAMPTZ,"
    " settled_amount = account.charged"
    " FROM account WHERE raw_reservations.id = account.reservation_id"
    " RETURNING raw_reservations.id)"
    " INSERT INTO raw_ledger_entries (api_key_id, kind, amount, balance_after, description,"
    " shortfall, reservation_id, created_at)"
    " SELECT changed.id, 'settlement', -changed.charged, changed.balance, '',"
    " :actual::BIGINT - changed.charged, finished.id, :now::TIMESTAMPTZ"
    " FROM changed JOIN finished ON true"
    f" RETURNING {ENTRY_COLUMNS}"
)
RAW_KEY_FOR_SETTLE: Final = "SELECT balance, reserved FROM raw_api_keys WHERE id = :key_id"
RAW_SETTLE_KEY: Final = (
    "UPDATE raw_api_keys SET reserved = reserved - :hold, balance = balance - :charged,"
    " total_spent = total_spent + :charged, last_used_at = :now"
    " WHERE id = :key_id RETURNING balance"
)
RAW_SETTLED_AMOUNT: Final = "UPDATE raw_reservations SET settled_amount = :charged WHERE id = :id"


def entry_values(
    api_key_id: object,
    kind: str,
    amount: int,
    balance_after: object,
    now: object,
    *,
    description: str = "",
    shortfall: int = 0,
    reservation_id: object = None,
) -> dict[str, object]:
    """A ledger row's parameters, as llmstore's INSERT_ENTRY binds them."""
    return {
        "api_key_id": api_key_id,
        "kind": kind,
        "amount": amount,
        "balance_after": balance_after,
        "description": description,
        "idempotency_key": None,
        "params_digest": None,
        "request_data": None,
        "shortfall": shortfall,
        "reservation_id": reservation_id,
        "withdrawal_id": None,
        "transfer_id": None,
        "created_at": now,
    }


def new_api_key_secret() -> str:
    """A secret shaped like llmstore's API keys: ``lsk_`` and 256 random bits."""
    return "lsk_" + secrets.token_urlsafe(32)


async def raw_create_api_key(db: RawDB, balance: int) -> object:
    """A key holding ``balance``, with its opening deposit entry; its id as stored."""
    key_id = db.encode_id(new_id())
    secret = new_api_key_secret()
    insert_key = db.sql(
        "INSERT INTO raw_api_keys (id, secret_digest, prefix, project_id, balance, reserved,"
        " total_deposited, total_spent, created_at, last_used_at, expires_at, key_metadata)"
        " VALUES (:id, :digest, :prefix, NULL, :balance, 0, :balance, 0, :now, NULL, NULL, NULL)"
    )
    insert_entry = db.sql(RAW_INSERT_ENTRY)

    def steps() -> RawSteps[object]:
        now = db.encode_time(utcnow())
        values = {"id": key_id, "digest": secret_digest(secret), "prefix": secret[:12]}
        yield insert_key.text, insert_key.args({**values, "balance": balance, "now": now})
        yield (
            insert_entry.text,
            insert_entry.args(
                entry_values(key_id, "deposit", balance, balance, now, description="opening")
            ),
        )
        return key_id

    return await db.transaction(steps)


async def orm_create_api_key(sessions: async_sessionmaker[AsyncSession], balance: int) -> uuid.UUID:
    secret = new_api_key_secret()
    key = OrmApiKey(
        secret_digest=secret_digest(secret),
        prefix=secret[:12],
        balance=balance,
        total_deposited=balance,
    )
    async with sessions() as session:
        session.add(key)
        await session.flush()
        session.add(
            OrmLedgerEntry(
                api_key_id=key.id,
                kind="deposit",
                amount=balance,
                balance_after=balance,
                description="opening",
            )
        )
        await session.commit()
    return key.id


class ApiKeysCharge:
    description = f"charge {CHARGE_AMOUNT} to a funded key: a checked debit and its ledger entry"

    async def llmstore(self, ctx: Context) -> OpCall:
        api_keys = ctx.store.api_keys
        key_id = (await api_keys.create(balance=OPENING_BALANCE)).key.id

        async def call() -> object:
            return await api_keys.charge(key_id, CHARGE_AMOUNT)

        return call

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        key_id = await raw_create_api_key(db, OPENING_BALANCE)
        if ctx.driver == "postgres":
            # One statement, autocommit: what llmstore sends outside a transaction.
            cte = db.sql(RAW_CHARGE_CTE)

            async def one_statement() -> object:
                values = {
                    "key_id": key_id,
                    "amount": CHARGE_AMOUNT,
                    "now": utcnow(),
                    "idempotency_key": None,
                    "description": "",
                    "params_digest": None,
                    "request_data": None,
                }
                row = await db.fetchrow(cte.text, *cte.args(values))
                if row is None:
                    raise LedgerRefused("the debit was refused")
                return row

            return one_statement

        # SQLite: BEGIN IMMEDIATE, the debit, the entry, COMMIT, in one thread hop.
        debit = db.sql(RAW_DEBIT)
        insert_entry = db.sql(RAW_INSERT_ENTRY)

        def steps() -> RawSteps[Sequence[Any]]:
            now = db.encode_time(utcnow())
            changed = yield (
                debit.text,
                debit.args({"key_id": key_id, "amount": CHARGE_AMOUNT, "now": now}),
            )
            if changed is None:
                raise LedgerRefused("the debit was refused")
            values = entry_values(key_id, "charge", -CHARGE_AMOUNT, changed[0], now)
            written = yield insert_entry.text, insert_entry.args(values)
            assert written is not None
            return written

        async def call() -> object:
            return await db.transaction(steps)

        return call

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        key_id = await orm_create_api_key(sessions, OPENING_BALANCE)

        async def call() -> object:
            async with sessions() as session:
                key = await session.get(OrmApiKey, key_id, with_for_update=True)
                if key is None:
                    raise LedgerRefused("unknown key")
                if key.balance - key.reserved < CHARGE_AMOUNT:
                    raise LedgerRefused("insufficient balance")
                now = utcnow()
                key.balance -= CHARGE_AMOUNT
                key.total_spent += CHARGE_AMOUNT
                key.last_used_at = now
                entry = OrmLedgerEntry(
                    api_key_id=key.id,
                    kind="charge",
                    amount=-CHARGE_AMOUNT,
                    balance_after=key.balance,
                    created_at=now,
                )
                session.add(entry)
                await session.commit()
            return entry

        return call


class ApiKeysReserveSettle:
    description = (
        f"reserve {HOLD_AMOUNT} on a funded key, then settle it at {SETTLED_AMOUNT}: "
        "two units of work"
    )

    async def llmstore(self, ctx: Context) -> OpCall:
        api_keys = ctx.store.api_keys
        key_id = (await api_keys.create(balance=OPENING_BALANCE)).key.id

        async def call() -> object:
            reservation = await api_keys.reserve(key_id, HOLD_AMOUNT)
            return await api_keys.settle(reservation.id, SETTLED_AMOUNT)

        return call

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        key_id = await raw_create_api_key(db, OPENING_BALANCE)
        if ctx.driver == "postgres":
            # One statement each, autocommit: what llmstore sends outside a transaction.
            reserve_cte = db.sql(RAW_RESERVE_CTE)
            settle_cte = db.sql(RAW_SETTLE_CTE)

            async def two_statements() -> object:
                now = utcnow()
                values = {
                    "id": new_id(),
                    "key_id": key_id,
                    "amount": HOLD_AMOUNT,
                    "now": now,
                    "expires_at": now + HOLD_TTL,
                }
                reservation = await db.fetchrow(reserve_cte.text, *reserve_cte.args(values))
                if reservation is None:
                    raise LedgerRefused("insufficient balance")
                values = {"id": reservation[0], "actual": SETTLED_AMOUNT, "now": utcnow()}
                written = await db.fetchrow(settle_cte.text, *settle_cte.args(values))
                if written is None:
                    raise LedgerRefused("the reservation is not active")
                return written

            return two_statements

        # SQLite: each a BEGIN IMMEDIATE transaction in one thread hop, as llmstore runs them.
        hold = db.sql(RAW_HOLD)
        insert_reservation = db.sql(RAW_INSERT_RESERVATION)
        finish = db.sql(RAW_FINISH)
        lock_key = db.sql(RAW_KEY_FOR_SETTLE + db.for_update)
        settle_key = db.sql(RAW_SETTLE_KEY)
        settled_amount = db.sql(RAW_SETTLED_AMOUNT)
        insert_entry = db.sql(RAW_INSERT_ENTRY)

        def reserve() -> RawSteps[Sequence[Any]]:
            moment = utcnow()
            now = db.encode_time(moment)
            held = yield (
                hold.text,
                hold.args({"key_id": key_id, "amount": HOLD_AMOUNT, "now": now}),
            )
            if held is None:
                raise LedgerRefused("insufficient balance")
            values = {
                "id": db.encode_id(new_id()),
                "api_key_id": key_id,
                "amount": HOLD_AMOUNT,
                "status": "active",
                "created_at": now,
                "expires_at": db.encode_time(moment + HOLD_TTL),
                "settled_amount": None,
                "finished_at": None,
            }
            reservation = yield insert_reservation.text, insert_reservation.args(values)
            assert reservation is not None
            return reservation

        def settle(reservation_id: object, actual: int) -> RawSteps[Sequence[Any]]:
            now = db.encode_time(utcnow())
            finished = yield (
                finish.text,
                finish.args(
                    {"id": reservation_id, "status": "settled", "now": now, "active": "active"}
                ),
            )
            if finished is None:
                raise LedgerRefused("the reservation is not active")
            account_id, held_amount = finished[1], finished[2]
            account = yield lock_key.text, lock_key.args({"key_id": account_id})
            assert account is not None
            balance, reserved = account
            charged = min(actual, balance - reserved + held_amount)
            changed = yield (
                settle_key.text,
                settle_key.args(
                    {"key_id": account_id, "hold": held_amount, "charged": charged, "now": now}
                ),
            )
            assert changed is not None
            yield (
                settled_amount.text,
                settled_amount.args({"id": reservation_id, "charged": charged}),
            )
            values = entry_values(
                account_id,
                "settlement",
                -charged,
                changed[0],
                now,
                shortfall=actual - charged,
                reservation_id=reservation_id,
            )
            written = yield insert_entry.text, insert_entry.args(values)
            assert written is not None
            return written

        async def call() -> object:
            reservation = await db.transaction(reserve)
            return await db.transaction(lambda: settle(reservation[0], SETTLED_AMOUNT))

        return call

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        key_id = await orm_create_api_key(sessions, OPENING_BALANCE)

        async def reserve() -> OrmReservation:
            async with sessions() as session:
                key = await session.get(OrmApiKey, key_id, with_for_update=True)
                if key is None:
                    raise LedgerRefused("unknown key")
                if key.balance - key.reserved < HOLD_AMOUNT:
                    raise LedgerRefused("insufficient balance")
                now = utcnow()
                key.reserved += HOLD_AMOUNT
                key.last_used_at = now
                reservation = OrmReservation(
                    api_key_id=key.id,
                    amount=HOLD_AMOUNT,
                    status="active",
                    created_at=now,
                    expires_at=now + HOLD_TTL,
                )
                session.add(reservation)
                await session.commit()
            return reservation

        async def settle(reservation_id: uuid.UUID, actual: int) -> OrmLedgerEntry:
            async with sessions() as session:
                reservation = await session.get(
                    OrmReservation, reservation_id, with_for_update=True
                )
                if reservation is None or reservation.status != "active":
                    raise LedgerRefused("the reservation is not active")
                key = await session.get(OrmApiKey, reservation.api_key_id, with_for_update=True)
                assert key is not None
                now = utcnow()
                charged = min(actual, key.balance - key.reserved + reservation.amount)
                key.reserved -= reservation.amount
                key.balance -= charged
                key.total_spent += charged
                key.last_used_at = now
                reservation.status = "settled"
                reservation.finished_at = now
                reservation.settled_amount = charged
                entry = OrmLedgerEntry(
                    api_key_id=key.id,
                    kind="settlement",
                    amount=-charged,
                    balance_after=key.balance,
                    shortfall=actual - charged,
                    reservation_id=reservation.id,
                    created_at=now,
                )
                session.add(entry)
                await session.commit()
            return entry

        async def call() -> object:
            reservation = await reserve()
            return await settle(reservation.id, SETTLED_AMOUNT)

        return call


#: Rows per ``usage.record_many`` call, and its calls per round (at most; see bench()).
USAGE_BATCH: Final = 10_000
USAGE_CALLS: Final = 20
USAGE_SPAN: Final = dt.timedelta(seconds=10)


def usage_batch(source: UsageRows) -> list[dict[str, Any]]:
    """The next batch of realistic rows: a proxy's buffer of the last 10 s, in time order."""
    rows = list(source.rows(USAGE_BATCH, utcnow() - USAGE_SPAN, USAGE_SPAN))
    rows.sort(key=lambda row: row["created_at"])
    return rows


def raw_usage_row(db: RawDB, row: Mapping[str, Any]) -> tuple[object, ...]:
    """A row as raw_usage_logs stores it, in USAGE_COLUMN_NAMES order (encoded untimed)."""
    values = {**row, "total_tokens": row["prompt_tokens"] + row["completion_tokens"]}
    out: list[object] = []
    for name in USAGE_COLUMN_NAMES:
        value = values.get(name)
        if isinstance(value, uuid.UUID):
            value = db.encode_id(value)
        elif isinstance(value, dt.datetime):
            value = db.encode_time(value)
        out.append(value)
    return tuple(out)


class UsageRecordMany:
    description = (
        f"write {USAGE_BATCH:,} pre-built usage rows in one transaction (ops/s = batches/s)"
    )
    #: Calls per round: a call writes 10,000 rows, so --ops is capped at this.
    max_ops = USAGE_CALLS
    rows_per_call = USAGE_BATCH

    async def llmstore(self, ctx: Context) -> OpCall:
        usage = ctx.store.usage
        source = UsageRows()

        def build() -> list[UsageRecord]:
            return [UsageRecord(**row) for row in usage_batch(source)]

        async def call(batch: list[UsageRecord]) -> object:
            result = await usage.record_many(batch)
            assert result.written == len(batch)
            return result

        return PreparedCall(build, call)

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        source = UsageRows()

        def build() -> list[tuple[object, ...]]:
            return [raw_usage_row(db, row) for row in usage_batch(source)]

        async def call(rows: list[tuple[object, ...]]) -> object:
            await db.insert_many("raw_usage_logs", USAGE_COLUMN_NAMES, rows)
            return None

        return PreparedCall(build, call)

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        source = UsageRows()

        def build() -> list[OrmUsageLog]:
            return [
                OrmUsageLog(**row, total_tokens=row["prompt_tokens"] + row["completion_tokens"])
                for row in usage_batch(source)
            ]

        async def call(objects: list[OrmUsageLog]) -> object:
            async with sessions() as session:
                session.add_all(objects)
                await session.commit()
            return None

        return PreparedCall(build, call)


#: Operation name -> operation, in the order they run.
OPERATIONS: Final[dict[str, Operation]] = {
    "projects.create": ProjectsCreate(),
    "projects.get": ProjectsGet(),
    "tokens.use": TokensUse(),
    "api_keys.charge": ApiKeysCharge(),
    "api_keys.reserve_settle": ApiKeysReserveSettle(),
    "usage.record_many": UsageRecordMany(),
}


# --------------------------------------------------------------------------------------
# Measuring and reporting.
# --------------------------------------------------------------------------------------


@dataclass
class Result:
    driver: Driver
    operation: str
    samples: dict[Variant, list[float]]  # ops/s, one per round

    def median(self, variant: Variant) -> float:
        return statistics.median(self.samples[variant])


async def timed(call: OpCall, ops: int) -> float:
    """Ops per second of ``ops`` sequential calls (a PreparedCall's input built untimed)."""
    gc.collect()
    if not isinstance(call, PreparedCall):
        start = time.perf_counter()
        for _ in range(ops):
            await call()
        return ops / (time.perf_counter() - start)
    busy = 0.0
    for _ in range(ops):
        call.prepare()
        gc.collect()
        start = time.perf_counter()
        await call()
        busy += time.perf_counter() - start
    return ops / busy


async def untimed(call: OpCall, ops: int) -> None:
    for _ in range(ops):
        if isinstance(call, PreparedCall):
            call.prepare()
        await call()


def calls_per_round(operation: Operation, ops: int) -> tuple[int, int]:
    """(timed calls per round, warm-up calls): a bulk operation's ``max_ops`` caps ``ops``."""
    cap: int | None = getattr(operation, "max_ops", None)
    if cap is None:
        return ops, min(ops, max(50, ops // 10))
    ops = min(ops, cap)
    return ops, max(1, ops // 10)


async def bench(ctx: Context, name: str, operation: Operation, ops: int, rounds: int) -> Result:
    calls: dict[Variant, OpCall] = {
        "llmstore": await operation.llmstore(ctx),
        "raw": await operation.raw(ctx),
        "orm": await operation.orm(ctx),
    }
    ops, warmup = calls_per_round(operation, ops)
    for call in calls.values():
        await untimed(call, warmup)
    samples: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(rounds):
        # Rotate the order so no variant always runs first (or after the same neighbour).
        shift = round_ % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            samples[variant].append(await timed(calls[variant], ops))
    return Result(ctx.driver, name, samples)


COLUMNS: Final = (
    ("driver", 9, "<"),
    ("operation", 23, "<"),
    ("llmstore ops/s", 15, ">"),
    ("raw ops/s", 11, ">"),
    ("orm ops/s", 11, ">"),
    ("llmstore/raw", 13, ">"),
    ("llmstore/orm", 13, ">"),
)


def rate(value: float) -> str:
    # Bulk operations run a few calls per second: whole numbers would hide their ratios.
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def table_line(cells: Sequence[str]) -> str:
    return " ".join(
        f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, COLUMNS, strict=True)
    ).rstrip()


def result_line(result: Result) -> str:
    ours, raw, orm = (result.median(variant) for variant in VARIANTS)
    return table_line(
        [
            result.driver,
            result.operation,
            rate(ours),
            rate(raw),
            rate(orm),
            f"{ours / raw:.2f}",
            f"{ours / orm:.2f}",
        ]
    )


def rows_line(result: Result, rows_per_call: int) -> str:
    parts = [f"{variant} {result.median(variant) * rows_per_call:,.0f}" for variant in VARIANTS]
    return f"    rows/s ({rows_per_call:,} per call): " + " | ".join(parts)


def rounds_line(result: Result) -> str:
    parts = [
        f"{variant} " + " ".join(rate(value) for value in result.samples[variant])
        for variant in VARIANTS
    ]
    return "    rounds: " + " | ".join(parts)


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="llmstore vs the raw driver vs the SQLAlchemy ORM, per operation "
        "(sequential ops/s, median of rounds).",
    )
    parser.add_argument(
        "--driver", choices=[*DRIVERS, "all"], default="all", help="database(s) to run on"
    )
    parser.add_argument(
        "--ops", type=positive, default=DEFAULT_OPS, help="operations per round and variant"
    )
    parser.add_argument(
        "--rounds", type=positive, default=DEFAULT_ROUNDS, help="timed rounds; medians are shown"
    )
    parser.add_argument(
        "--only", choices=list(OPERATIONS), metavar="OPNAME", help="run one operation only"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print every round's ops/s"
    )
    return parser.parse_args(argv)


def context_for(driver: Driver, url: str) -> contextlib.AbstractAsyncContextManager[Context]:
    return sqlite_context() if driver == "sqlite" else postgres_context(url)


async def main_async(args: argparse.Namespace) -> int:
    drivers: list[Driver] = list(DRIVERS) if args.driver == "all" else [args.driver]
    names = [args.only] if args.only else list(OPERATIONS)
    url = postgres_url()
    print(
        f"llmstore {llmstore.__version__}, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, SQLAlchemy {sa.__version__}, "
        f"asyncpg {asyncpg.__version__}"
    )
    if "postgres" in drivers:
        print(f"postgres: {masked(url)} (from {POSTGRES_URL_VARIABLE} or the default)")
    rounds = "1 round" if args.rounds == 1 else f"{args.rounds} rounds (medians shown)"
    print(f"{args.ops:,} sequential ops per round and variant, {rounds}")
    for name in names:
        calls, _ = calls_per_round(OPERATIONS[name], args.ops)
        if calls != args.ops:
            print(f"{name}: {calls} calls per round and variant (each a bulk write)")
    print()
    header_printed = False
    for driver in drivers:
        if driver == "postgres":
            problem = await postgres_reachable(url)
            if problem is not None:
                print(f"postgres: skipped, cannot connect to {masked(url)}: {problem}")
                if args.driver == "postgres":
                    return 1
                continue
        async with context_for(driver, url) as ctx:
            for name in names:
                result = await bench(ctx, name, OPERATIONS[name], args.ops, args.rounds)
                if not header_printed:
                    print(table_line([title for title, _, _ in COLUMNS]))
                    header_printed = True
                print(result_line(result), flush=True)
                rows_per_call: int | None = getattr(OPERATIONS[name], "rows_per_call", None)
                if rows_per_call is not None:
                    print(rows_line(result, rows_per_call), flush=True)
                if args.verbose:
                    print(rounds_line(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
