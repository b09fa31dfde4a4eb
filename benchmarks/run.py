"""Benchmark harness: llmstore next to the raw driver and the SQLAlchemy ORM, per operation.

Run ``python -m benchmarks.run --help``; ``benchmarks/README.md`` explains the output.

Each operation is measured three ways in one process, on the same database:

* ``llmstore``: the public ``Store`` API, on the ``projects`` and ``tokens`` tables that the
  migrations create;
* ``raw``: the bare driver (stdlib ``sqlite3`` behind a one-thread executor, or ``asyncpg``)
  sending the same single statement, on ``raw_projects`` and ``raw_tokens`` tables with the
  same DDL;
* ``orm``: the SQLAlchemy ORM written the usual way (``AsyncSession`` per operation), on
  ``orm_projects`` and ``orm_tokens`` tables with the same columns.

Operations run one at a time, awaited, so the figures are latency-bound throughput.

To add an operation, write a class with three async methods ``llmstore``, ``raw`` and
``orm``: each takes the :class:`Context`, does its untimed setup (seeding rows, ...) and
returns the zero-argument coroutine function that is timed. Then add an instance to
:data:`OPERATIONS` under the operation's name.
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
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

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
from llmstore import Store, StoreConfig
from llmstore._ids import new_id, utcnow
from llmstore._migrations import upgrade
from llmstore._schema import NAMING_CONVENTION

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


# --------------------------------------------------------------------------------------
# The raw drivers: one statement, one round trip (Postgres) or one thread hop (SQLite).
# --------------------------------------------------------------------------------------


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

    async def close(self) -> None:
        await self._conn.close()


# The DDL of migrations 0001_projects (projects) and 0002_tokens_audit_providers (tokens) as
# each dialect receives it, under other names; one statement per string, run in order.
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


#: Operation name -> operation, in the order they run.
OPERATIONS: Final[dict[str, Operation]] = {
    "projects.create": ProjectsCreate(),
    "projects.get": ProjectsGet(),
    "tokens.use": TokensUse(),
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
    """Ops per second of ``ops`` sequential calls."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(ops):
        await call()
    return ops / (time.perf_counter() - start)


async def bench(ctx: Context, name: str, operation: Operation, ops: int, rounds: int) -> Result:
    calls: dict[Variant, OpCall] = {
        "llmstore": await operation.llmstore(ctx),
        "raw": await operation.raw(ctx),
        "orm": await operation.orm(ctx),
    }
    warmup = min(ops, max(50, ops // 10))
    for call in calls.values():
        for _ in range(warmup):
            await call()
    samples: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(rounds):
        # Rotate the order so no variant always runs first (or after the same neighbour).
        shift = round_ % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            samples[variant].append(await timed(calls[variant], ops))
    return Result(ctx.driver, name, samples)


COLUMNS: Final = (
    ("driver", 9, "<"),
    ("operation", 17, "<"),
    ("llmstore ops/s", 15, ">"),
    ("raw ops/s", 11, ">"),
    ("orm ops/s", 11, ">"),
    ("llmstore/raw", 13, ">"),
    ("llmstore/orm", 13, ">"),
)


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
            f"{ours:,.0f}",
            f"{raw:,.0f}",
            f"{orm:,.0f}",
            f"{ours / raw:.2f}",
            f"{ours / orm:.2f}",
        ]
    )


def rounds_line(result: Result) -> str:
    parts = [
        f"{variant} " + " ".join(f"{value:,.0f}" for value in result.samples[variant])
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
                if args.verbose:
                    print(rounds_line(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
