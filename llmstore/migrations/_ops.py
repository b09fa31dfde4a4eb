"""Operations for revision scripts that touch tables which may already be large.

Every revision after the first four begins ``upgrade()`` and ``downgrade()`` with
:func:`set_lock_timeout`, and indexes a table it did not create itself with
:func:`create_index_concurrently` (and drops such an index with
:func:`drop_index_concurrently`); ``tests/migrations/test_migration_rules.py`` refuses a
revision that does otherwise.

Why: on Postgres, ``ALTER TABLE`` or a plain ``CREATE INDEX`` waits for its lock behind a
long query, and every query of the proxy then queues behind the migration. With a lock
timeout the migration fails (and rolls back) instead of stalling the proxy. A plain
``CREATE INDEX`` blocks writes to the table for as long as the build takes, which on a
table of millions of rows is minutes; ``CREATE INDEX CONCURRENTLY`` does not, but cannot
run inside a transaction. It runs in Alembic's autocommit block, which commits the
revisions before it: such a revision does nothing else, so that the database is never
left between two revisions (it stays at the previous revision, perhaps with the index
built or half built, until the revision is stamped). A failed concurrent build leaves an
INVALID index behind; the next run finds it, drops it and builds it again.

On SQLite these are the plain operations, inside the one migration transaction.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from alembic.runtime.migration import MigrationContext

from llmstore._core.errors import MigrationError
from llmstore._db.traits import traits

logger = logging.getLogger("llmstore")

#: The lock timeout every migration run starts with on Postgres, and the default of
#: :func:`set_lock_timeout`.
DEFAULT_LOCK_TIMEOUT = "5s"
_TIMEOUT = re.compile(r"[1-9][0-9]{0,8}(ms|s|min)")


def set_lock_timeout(timeout: str = DEFAULT_LOCK_TIMEOUT) -> None:
    """Fail, rather than wait longer than ``timeout``, for any lock this revision takes.

    Session-wide (not ``SET LOCAL``) so that it outlives an autocommit block; the
    migration command resets it when it ends.
    """
    if _TIMEOUT.fullmatch(timeout) is None:
        raise MigrationError(f"lock timeout must look like 500ms, 5s or 2min, not {timeout!r}")
    if traits(op.get_context().dialect).online_ddl:
        op.execute(f"SET lock_timeout = '{timeout}'")


def create_index_concurrently(
    index_name: str, table_name: str, columns: Sequence[str], **kw: Any
) -> None:
    """``CREATE INDEX CONCURRENTLY`` on Postgres, rebuilding an invalid index of that name."""
    context = op.get_context()
    if not traits(context.dialect).online_ddl:
        op.create_index(index_name, table_name, list(columns), **kw)
        return
    with _concurrently(context):
        if not context.as_sql and index_is_valid(index_name) is False:
            logger.warning("index %s was left invalid by a failed build: rebuilding it", index_name)
            _drop(index_name, table_name)
        try:
            op.create_index(
                index_name,
                table_name,
                list(columns),
                postgresql_concurrently=True,
                if_not_exists=True,
                **kw,
            )
        except Exception:
            # A failed build leaves an INVALID index that writes still maintain (a unique
            # one still refuses duplicates): gone at once if possible, else the next run.
            with contextlib.suppress(Exception):
                _drop(index_name, table_name)
            raise
        if not context.as_sql and index_is_valid(index_name) is not True:
            raise MigrationError(f"index {index_name} is not valid after its concurrent build")


def drop_index_concurrently(index_name: str, table_name: str) -> None:
    """``DROP INDEX CONCURRENTLY IF EXISTS`` on Postgres; a plain drop elsewhere."""
    context = op.get_context()
    if not traits(context.dialect).online_ddl:
        op.drop_index(index_name, table_name=table_name)
        return
    with _concurrently(context):
        _drop(index_name, table_name)


def _drop(index_name: str, table_name: str) -> None:
    op.drop_index(index_name, table_name=table_name, postgresql_concurrently=True, if_exists=True)


_committed_alone: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "llmstore_committed_alone", default=False
)


@contextlib.contextmanager
def _concurrently(context: MigrationContext) -> Iterator[None]:
    """Alembic's autocommit block, with no lock timeout inside it.

    A concurrent build waits for every older transaction in the database, on locks that
    the timeout would cut short; it takes no lock that blocks reads or writes meanwhile.
    """
    with context.autocommit_block():
        if context.as_sql:
            yield
            return
        # Read by env.py once the revision is stamped (offline, nothing is there to read it).
        _committed_alone.set(True)
        previous = op.get_bind().execute(sa.text("SHOW lock_timeout")).scalar()
        op.execute("SET lock_timeout = 0")
        try:
            yield
        finally:
            op.get_bind().execute(
                sa.text("SELECT set_config('lock_timeout', :value, false)"), {"value": previous}
            )


def commits_alone() -> bool:
    """Whether the revision just run used an autocommit block (then cleared).

    Such a revision is committed as soon as it is stamped, so that a later revision's
    failure cannot leave the database stamped at one revision with the index of another.
    """
    used = _committed_alone.get()
    _committed_alone.set(False)
    return used


_INDEX_VALIDITY = sa.text(
    "SELECT i.indisvalid FROM pg_index i "
    "JOIN pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relname = :name AND n.nspname = current_schema()"
)


def index_is_valid(index_name: str) -> bool | None:
    """Whether the index of that name in the current schema is valid; None if there is none."""
    value = op.get_bind().execute(_INDEX_VALIDITY, {"name": index_name}).scalar()
    return None if value is None else bool(value)
