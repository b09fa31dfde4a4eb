"""Alembic, driven from the library: upgrade, downgrade, revision checks and drift checks.

Every command runs on one connection in one transaction that llmstore opens itself:
``BEGIN IMMEDIATE`` on SQLite (foreign keys off while tables are rebuilt, then checked),
a transaction-level advisory lock on Postgres so that replicas migrate one at a time.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection

from ._config import StoreConfig, ensure_parent
from ._engines import postgres_engine, sqlite_engine
from ._errors import ConfigError, MigrationError, translated
from ._schema import metadata

T = TypeVar("T")

# Any constant will do: it names the lock that migrators of one database share.
_MIGRATION_LOCK_ID = 0x6C6C6D73746F7265  # "llmstore"


def script_location() -> Path:
    """The Alembic scripts: inside the installed package, or the source tree's ``alembic/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_alembic", here.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigError(f"llmstore's migration scripts are missing (looked in {here})")


def alembic_config(
    *, connection: Connection | None = None, schema: str | None = None, url: str | None = None
) -> Config:
    """An Alembic config for llmstore's scripts; env.py reads these attributes."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes.update(connection=connection, llmstore_schema=schema, llmstore_url=url)
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    heads = scripts().get_heads()
    if len(heads) != 1:
        raise MigrationError(f"the migration scripts have {len(heads)} heads, expected one")
    return heads[0]


def is_known(revision: str) -> bool:
    try:
        return scripts().get_revision(revision) is not None
    except CommandError:
        return False


def read_revision(conn: Connection, schema: str | None) -> str | None:
    """The database's revision, or None when it was never migrated."""
    context = MigrationContext.configure(conn, opts={"version_table_schema": schema})
    heads = context.get_current_heads()
    if len(heads) > 1:
        raise MigrationError(f"the database has several revisions: {', '.join(heads)}")
    return heads[0] if heads else None


def _prepare(conn: Connection, schema: str | None) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        if schema is not None:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')


def _finish_sqlite(conn: Connection) -> None:
    problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise MigrationError(f"the migration broke {len(problems)} foreign key reference(s)")


def migrate_on(conn: Connection, schema: str | None, step: Callable[[Config], None]) -> None:
    """Run an Alembic command on ``conn``, which is in a transaction the caller commits."""
    _prepare(conn, schema)
    step(alembic_config(connection=conn, schema=schema))
    if conn.dialect.name == "sqlite":
        _finish_sqlite(conn)


def upgrade_connection(conn: Connection, schema: str | None) -> None:
    """Upgrade to head on a connection that is not in a transaction (a host engine's)."""
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        migrate_on(conn, schema, lambda cfg: command.upgrade(cfg, "head"))
    except CommandError as exc:
        conn.rollback()
        raise _alembic_failure(exc) from exc
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    if sqlite:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.commit()


async def with_migration_connection(
    config: StoreConfig, fn: Callable[[Connection], T], *, write: bool = True
) -> T:
    """Run ``fn`` on a fresh connection in one transaction, committed if it returns."""
    if config.driver == "sqlite":
        return await asyncio.to_thread(_sqlite_migration_unit, config, fn, write)
    engine = postgres_engine(config, pooled=False)
    try:
        with translated():
            async with engine.connect() as conn:
                result = await conn.run_sync(fn)
                await (conn.commit() if write else conn.rollback())
                return result
    finally:
        await engine.dispose()


def _sqlite_migration_unit(config: StoreConfig, fn: Callable[[Connection], T], write: bool) -> T:
    path = config.sqlite_path or ":memory:"
    if write and path != ":memory:":
        ensure_parent(path)
    engine = sqlite_engine(path, busy_timeout=config.busy_timeout, pool_size=0, foreign_keys=False)
    try:
        with translated(), engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = fn(conn)
            except BaseException:
                conn.rollback()
                raise
            (conn.commit if write else conn.rollback)()
            return result
    finally:
        engine.dispose()


def _alembic_failure(exc: Exception) -> MigrationError:
    return MigrationError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


async def upgrade(config: StoreConfig, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to ``revision``; returns the revisions before and after."""
    return await _move(config, revision, command.upgrade)


async def downgrade(config: StoreConfig, revision: str) -> tuple[str | None, str | None]:
    return await _move(config, revision, command.downgrade)


async def _move(
    config: StoreConfig, revision: str, step: Callable[[Config, str], None]
) -> tuple[str | None, str | None]:
    schema = config.schema_name

    def run(conn: Connection) -> tuple[str | None, str | None]:
        before = read_revision(conn, schema) if _schema_exists(conn, schema) else None
        try:
            migrate_on(conn, schema, lambda cfg: step(cfg, revision))
        except CommandError as exc:
            raise _alembic_failure(exc) from exc
        return before, read_revision(conn, schema)

    return await with_migration_connection(config, run)


def _schema_exists(conn: Connection, schema: str | None) -> bool:
    return schema is None or sa.inspect(conn).has_schema(schema)


async def current(config: StoreConfig) -> str | None:
    schema = config.schema_name
    if (
        config.driver == "sqlite"
        and not config.is_memory
        and not await asyncio.to_thread(Path(config.sqlite_path or "").exists)
    ):
        return None
    return await with_migration_connection(
        config,
        lambda conn: read_revision(conn, schema) if _schema_exists(conn, schema) else None,
        write=False,
    )


@dataclass(frozen=True)
class SchemaDiff:
    """One difference between the database and the models, as Alembic reports it."""

    description: str


def diff_schema(conn: Connection, schema: str | None) -> list[SchemaDiff]:
    if conn.dialect.name == "postgresql" and schema is not None:
        conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
    # search_path makes the schema the default one, where Alembic skips its version table.
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return [SchemaDiff(_describe(entry)) for entry in compare_metadata(context, metadata)]


def _describe(entry: Any) -> str:
    if isinstance(entry, list):
        return "; ".join(_describe(item) for item in entry)
    if isinstance(entry, tuple) and entry:
        action, *rest = entry
        names = [getattr(item, "name", None) or str(item) for item in rest if item is not None]
        return f"{action}: {', '.join(str(name) for name in names)}"
    return str(entry)


async def check(config: StoreConfig) -> list[SchemaDiff]:
    return await with_migration_connection(
        config, lambda conn: diff_schema(conn, config.schema_name), write=False
    )


_template_lock = threading.Lock()
_template: sqlite3.Connection | None = None


def copy_head_schema(target: sqlite3.Connection) -> None:
    """Fill an empty in-memory database with the head schema, from a per-process template.

    The template is migrated once per process; each new store copies it with SQLite's
    backup API, which takes well under a millisecond.
    """
    global _template
    with _template_lock:
        if _template is None:
            template = sqlite3.connect(":memory:", check_same_thread=False)
            engine = sqlite_engine(":memory:", busy_timeout=5)
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("BEGIN")
                    migrate_on(conn, None, lambda cfg: command.upgrade(cfg, "head"))
                    conn.commit()
                    source = conn.connection.dbapi_connection
                    assert isinstance(source, sqlite3.Connection)
                    source.backup(template)
            finally:
                engine.dispose()
            _template = template
        _template.backup(target)
