"""Benchmark harness: llmstore next to the raw driver and the SQLAlchemy ORM, per operation.

Run ``python -m benchmarks.run --help``; ``benchmarks/README.md`` explains the output.

Each operation is measured three ways in one process, on the same database:

* ``llmstore``: the public ``Store`` API, on the ``projects`` table that the migrations create;
* ``raw``: the bare driver (stdlib ``sqlite3`` behind a one-thread executor, or ``asyncpg``)
  sending the same single statement, on a ``raw_projects`` table with the same DDL;
* ``orm``: the SQLAlchemy ORM written the usual way (``AsyncSession`` per operation), on an
  ``orm_projects`` table with the same columns.

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
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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

    async def close(self) -> None:
        await self._conn.close()


# The DDL of migration 0001_projects as each dialect receives it, under another name.
RAW_DDL: Final[dict[Driver, str]] = {
    "sqlite": """
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
    "postgres": """
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
            await raw.execute(RAW_DDL["sqlite"])
            async with engine.begin() as conn:
                await conn.run_sync(OrmBase.metadata.create_all)
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            async with Store.from_url(url, allow_plaintext_secrets=True) as store:
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
            await raw.execute(RAW_DDL["postgres"])
            async with engine.begin() as conn:
                await conn.run_sync(OrmBase.metadata.create_all)
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            store = Store.from_url(url, schema_name=schema, allow_plaintext_secrets=True)
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


#: Operation name -> operation, in the order they run.
OPERATIONS: Final[dict[str, Operation]] = {
    "projects.create": ProjectsCreate(),
    "projects.get": ProjectsGet(),
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
