"""Alembic, driven from the library: upgrade, downgrade, revision checks and drift checks.

Every command holds the migration lock for its whole length (``migration_session``):
``BEGIN IMMEDIATE`` on SQLite (foreign keys off while tables are rebuilt, then checked),
a session-level advisory lock on Postgres, so that replicas migrate one at a time. The
revisions then run in one transaction: the caller's on SQLite, Alembic's own on Postgres
(so that a revision can build an index concurrently in an autocommit block, see
``_migration_ops``). ``migrate`` backs the database up under the lock first
(``_backup``) and checks the result before COMMIT, so a failure leaves the database at
the revision it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from llmstore._core.config import StoreConfig, ensure_parent
from llmstore._core.errors import BackupError, MigrationError
from llmstore._db.engines import postgres_engine, sqlite_engine
from llmstore._db.traits import traits
from llmstore._db.translate import translate, translated
from llmstore._ops.backup import BackupFile, Progress, backup_database, pg_dump_path

from ._ops import DEFAULT_LOCK_TIMEOUT

# Re-exported: the rest of the package and the tests know them as _migrations.NAME.
from ._schema import (  # isort: skip
    SchemaDiff as SchemaDiff,
    adopt_legacy_version as adopt_legacy_version,
    alembic_config as alembic_config,
    check_target as check_target,
    diff_schema as diff_schema,
    head_revision as head_revision,
    install_head as install_head,
    is_known as is_known,
    is_own_object as is_own_object,
    read_revision as read_revision,
    schema_exists as schema_exists,
    script_location as script_location,
    scripts as scripts,
    version_context as version_context,
)

T = TypeVar("T")
logger = logging.getLogger("llmstore")

# Any constant will do: it names the lock that migrators of one database share.
MIGRATION_LOCK_ID = 0x6C6C6D73746F7265  # "llmstore"


@contextlib.contextmanager
def migration_session(conn: Connection, schema: str | None) -> Iterator[None]:
    """Hold what one migration command needs on ``conn``, for as long as it runs.

    Postgres: the advisory lock that makes replicas migrate one at a time, the schema as
    ``search_path`` and the default lock timeout. All three are session-wide, so they
    outlive the commit of an autocommit block (a transaction-level lock would be released
    there, letting a second migrator in). The settings are put back as they were at the
    end, and a connection that cannot be put back is invalidated, never returned to a
    host's pool holding the lock. SQLite: nothing, the caller's ``BEGIN IMMEDIATE`` holds
    the write lock.
    """
    if traits(conn.dialect).single_file:
        yield
        return
    _wait_for_lock(conn)
    saved = None
    try:
        path, timeout = conn.execute(_SAVE_SETTINGS).one()
        saved = (str(path), str(timeout))
        conn.exec_driver_sql(f"SET lock_timeout = '{DEFAULT_LOCK_TIMEOUT}'")
        if schema is not None:
            conn.exec_driver_sql(f'SET search_path TO "{schema}"')
        conn.commit()
        yield
    finally:
        _end_session(conn, saved)


# Polled, never waited for inside a statement: a session waiting in pg_advisory_lock()
# holds a snapshot, and CREATE INDEX CONCURRENTLY in the session holding the lock waits
# for every older snapshot to go away: a deadlock. The pause is pg_sleep, not time.sleep,
# so that the event loop of a store opening with auto_upgrade is never blocked.
_TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(:id)").bindparams(id=MIGRATION_LOCK_ID)
_PAUSE = sa.text("SELECT pg_sleep(0.2)")
_SAVE_SETTINGS = sa.text("SELECT current_setting('search_path'), current_setting('lock_timeout')")


def _wait_for_lock(conn: Connection) -> None:
    while not conn.execute(_TRY_LOCK).scalar():
        conn.commit()
        conn.execute(_PAUSE)
        conn.commit()
    conn.commit()


def _end_session(conn: Connection, saved: tuple[str, str] | None) -> None:
    try:
        if conn.in_transaction():
            conn.rollback()
        if saved is not None:
            conn.execute(
                sa.text(
                    "SELECT set_config('search_path', :path, false), "
                    "set_config('lock_timeout', :timeout, false)"
                ),
                {"path": saved[0], "timeout": saved[1]},
            )
        conn.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        conn.commit()
    except Exception as exc:
        # Whatever state it is in (the lock, the settings), it must not be used again.
        logger.warning("closing the migration connection: %s", type(exc).__name__)
        conn.invalidate()


def _finish_sqlite(conn: Connection) -> None:
    problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise MigrationError(f"the migration broke {len(problems)} foreign key reference(s)")


def migrate_on(
    conn: Connection,
    schema: str | None,
    step: Callable[[Config], None],
    applied: Callable[[str], object] | None = None,
    before_commit: Callable[[], object] | None = None,
) -> None:
    """Run an Alembic command on ``conn``, inside ``migration_session``.

    SQLite: in the caller's transaction, which the caller commits. Postgres: in one
    transaction that Alembic begins and commits; what the caller read before is committed
    first (nothing may have been written). ``applied`` is called with each revision once
    its step has run; ``before_commit`` runs last, inside the transaction.
    """
    sqlite = traits(conn.dialect).single_file
    if not sqlite and conn.in_transaction():
        conn.commit()
    cfg = alembic_config(connection=conn, schema=schema)
    cfg.attributes["llmstore_applied"] = applied

    def checks() -> None:
        if sqlite:
            _finish_sqlite(conn)
        if before_commit is not None:
            before_commit()

    cfg.attributes["llmstore_before_commit"] = checks
    step(cfg)


@contextlib.contextmanager
def migrating(conn: Connection, schema: str | None) -> Iterator[None]:
    """Hold the migration lock on a connection that is not in a transaction (a host's).

    SQLite: foreign keys off while tables are rebuilt and ``BEGIN IMMEDIATE``, then the
    references checked and committed; the pooled connection gets its foreign keys back,
    failure or not. Postgres: ``migration_session``, its settings put back at the end.
    Anything raised rolls the whole command back.
    """
    sqlite = traits(conn.dialect).single_file
    foreign_keys = 1
    if sqlite:
        if conn.in_transaction():
            conn.commit()
        foreign_keys = int(conn.exec_driver_sql("PRAGMA foreign_keys").scalar() or 0)
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        with migration_session(conn, schema):
            yield
            if sqlite:  # (also for a command run through env.py, which has no checks)
                _finish_sqlite(conn)
            conn.commit()
    except CommandError as exc:
        conn.rollback()
        raise _alembic_failure(exc) from exc
    except BaseException:
        conn.rollback()
        raise
    finally:
        if sqlite:  # as the host's pooled connection had it
            conn.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            conn.commit()


def _migrating_call(conn: Connection, schema: str | None, fn: Callable[[Connection], T]) -> T:
    with migrating(conn, schema):
        return fn(conn)


async def with_engine_connection(
    engine: AsyncEngine, schema: str | None, fn: Callable[[Connection], T], *, write: bool
) -> T:
    """Run ``fn`` on a connection lent by a host's engine, which is never disposed.

    Writing: under the migration lock, in one transaction (``migrating``). Reading: in a
    transaction rolled back at the end. Either way the connection goes back to the
    host's pool with the settings it came with.
    """
    with translated():
        async with engine.connect() as conn:
            if write:
                return await conn.run_sync(_migrating_call, schema, fn)
            try:
                return await conn.run_sync(fn)
            finally:
                await conn.rollback()


def upgrade_connection(conn: Connection, schema: str | None) -> None:
    """Upgrade to head on a connection that is not in a transaction (a host engine's)."""
    with migrating(conn, schema):
        if schema_exists(conn, schema) and read_revision(conn, schema) is not None:
            migrate_on(conn, schema, lambda cfg: command.upgrade(cfg, "head"))
        else:
            install_head(conn, schema)


async def with_migration_connection(
    config: StoreConfig, fn: Callable[[Connection], T], *, write: bool = True
) -> T:
    """Run ``fn`` on a fresh connection in one transaction, committed if it returns."""
    if traits(config.driver).single_file:
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
        with translated():  # a folder that cannot be made is an OSError
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
    done = await migrate(config, revision, downgrading=False, backup=False)
    return done.before, done.after


async def downgrade(config: StoreConfig, revision: str) -> tuple[str | None, str | None]:
    done = await migrate(config, revision, downgrading=True, backup=False)
    return done.before, done.after


@dataclass(frozen=True)
class Migration:
    """What ``migrate`` did: the revisions before and after, and the backup it made."""

    before: str | None
    after: str | None
    backup: BackupFile | None
    backup_skipped: str | None  # why no backup was made, when none was


async def migrate(
    config: StoreConfig,
    revision: str,
    *,
    downgrading: bool,
    backup: bool,
    progress: Progress | None = None,
    engine: AsyncEngine | None = None,
) -> Migration:
    """Move the schema to ``revision`` in one transaction, under the migration lock.

    With ``backup``, the database is backed up first, under the lock, once there is work
    to do. Before COMMIT the result is checked: the schema against the models (at head)
    and, on SQLite, ``integrity_check`` and ``foreign_key_check``. Any failure rolls the
    whole command back and raises MigrationError naming the failing revision and the
    backup. (A revision that builds an index concurrently commits the ones before it.)
    """

    check_target(revision)
    schema = config.schema_name
    if engine is not None:
        return await with_engine_connection(
            engine,
            schema,
            lambda conn: _migrate_locked(conn, config, revision, downgrading, backup, progress),
            write=True,
        )

    def run(conn: Connection) -> Migration:
        with migration_session(conn, schema):
            return _migrate_locked(conn, config, revision, downgrading, backup, progress)

    return await with_migration_connection(config, run)


def _migrate_locked(
    conn: Connection,
    config: StoreConfig,
    revision: str,
    downgrading: bool,
    backup: bool,
    progress: Progress | None,
) -> Migration:
    schema = config.schema_name
    step = command.downgrade if downgrading else command.upgrade
    before = read_revision(conn, schema) if schema_exists(conn, schema) else None
    if not _work_to_do(before, revision, downgrading):
        return Migration(before, before, None, "nothing to do")
    made, skipped = _backup_first(config, before, backup, progress)
    applied: list[str] = []
    fresh = not downgrading and before is None and revision in ("head", "heads", head_revision())
    try:
        if fresh:
            install_head(conn, schema)
            _validate(conn, schema, read_revision(conn, schema))
            if not traits(conn.dialect).single_file:  # SQLite: the caller's one transaction
                conn.commit()
        else:
            migrate_on(
                conn,
                schema,
                lambda cfg: step(cfg, revision),
                applied.append,
                lambda: _validate(conn, schema, read_revision(conn, schema)),
            )
    except Exception as exc:
        failing = (
            f"{head_revision()} (created from the models)"
            if fresh
            else _failing_revision(before, revision, applied, downgrading)
        )
        known = _alembic_failure(exc) if isinstance(exc, CommandError) else translate(exc)
        reason = str(known or exc).splitlines()[0] if str(known or exc) else "(no message)"
        where = _where_after_failure(conn, schema, before)
        kept = "" if made is None else f"; the backup taken before it is {made.path}"
        raise MigrationError(
            f"{'downgrade' if downgrading else 'upgrade'} failed at revision {failing}: "
            f"{reason}; {where}{kept}"
        ) from exc
    return Migration(before, read_revision(conn, schema), made, skipped)


def _where_after_failure(conn: Connection, schema: str | None, before: str | None) -> str:
    still = f"the database is still at {before or 'empty'}"
    if traits(conn.dialect).single_file:
        return still  # the caller rolls its one transaction back
    try:
        conn.rollback()
        now = read_revision(conn, schema) if schema_exists(conn, schema) else None
        conn.rollback()
    except Exception:
        return (
            f"the database was at {before or 'empty'} before the command (its revision "
            "could not be read after the failure)"
        )
    if now == before:
        return still
    # Only an autocommit block (see _migration_ops) commits part of a command.
    return (
        f"the database is now at {now or 'empty'}: a revision that builds or drops an "
        "index concurrently is committed on its own"
    )


def _work_to_do(before: str | None, revision: str, downgrading: bool) -> bool:
    if downgrading:
        return before is not None and revision != before
    return not (before is not None and before == head_revision() and revision in ("head", before))


def _backup_first(
    config: StoreConfig, before: str | None, wanted: bool, progress: Progress | None
) -> tuple[BackupFile | None, str | None]:
    if not wanted:
        return None, "not asked for"
    if before is None:
        return None, "the database is empty"
    if config.is_memory:
        return None, "the database is in memory"
    try:
        return backup_database(config, progress=progress), None
    except BackupError as exc:
        no_dump = not traits(config.driver).single_file and pg_dump_path() is None
        if config.env == "prod" or no_dump:
            raise MigrationError(f"no backup could be made, so nothing was changed: {exc}") from exc
        logger.warning("going on without a backup (LLMSTORE_ENV=%s): %s", config.env, exc)
        return None, str(exc)


def _validate(conn: Connection, schema: str | None, after: str | None) -> None:
    if traits(conn.dialect).single_file:
        problems = [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise MigrationError(f"PRAGMA integrity_check: {problems[0]}")
    if after == head_revision():
        diffs = diff_schema(conn, schema)
        if diffs:
            raise MigrationError(
                f"the schema differs from the models in {len(diffs)} way(s), first: "
                f"{diffs[0].description}"
            )


def _failing_revision(
    before: str | None, revision: str, applied: list[str], downgrading: bool
) -> str:
    """The revision that was being applied: the one after the last that completed."""
    try:
        if downgrading:
            path = [s.revision for s in scripts().iterate_revisions(before or "base", revision)]
            path = [rev for rev in path if rev != revision]
        else:
            path = [s.revision for s in scripts().iterate_revisions(revision, before or "base")]
            path = [rev for rev in reversed(path) if rev != before]
    except Exception:  # an unknown target: the error says so already
        path = []
    pending = [rev for rev in path if rev not in applied]
    if pending:
        return pending[0]
    return "(after the last revision: the checks)" if applied else revision


def _read_current(conn: Connection, schema: str | None) -> str | None:
    return read_revision(conn, schema) if schema_exists(conn, schema) else None


async def current(config: StoreConfig, engine: AsyncEngine | None = None) -> str | None:
    schema = config.schema_name
    if engine is not None:
        return await with_engine_connection(
            engine, schema, lambda conn: _read_current(conn, schema), write=False
        )
    if (
        traits(config.driver).single_file
        and not config.is_memory
        and not await asyncio.to_thread(Path(config.sqlite_path or "").exists)
    ):
        return None
    return await with_migration_connection(
        config, lambda conn: _read_current(conn, schema), write=False
    )


async def check(config: StoreConfig, engine: AsyncEngine | None = None) -> list[SchemaDiff]:
    schema = config.schema_name
    if engine is not None:
        return await with_engine_connection(
            engine, schema, lambda conn: diff_schema(conn, schema), write=False
        )
    return await with_migration_connection(
        config, lambda conn: diff_schema(conn, schema), write=False
    )
