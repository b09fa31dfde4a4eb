"""What llmstore's schema is: its revision scripts, its version table and its objects.

The revision a database is at lives in ``llmstore_alembic_version`` (``VERSION_TABLE``);
before revision 0005 it lived in Alembic's default ``alembic_version``, which a host
application may share for its own history, and is moved from there by the first upgrade.
llmstore's objects are the ``llmstore_*`` ones: a host's tables, views and indexes in the
same database or schema are never compared, reported or changed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConfigError, MigrationError, ValidationError
from llmstore._db.schema import (
    INITIAL_ROWS,
    LEGACY_VERSION_TABLE,
    TABLE_PREFIX,
    VERSION_TABLE,
    metadata,
)
from llmstore._db.traits import traits


def script_location() -> Path:
    """The Alembic scripts, inside the package: one location for the source tree and the wheel."""
    scripts = Path(__file__).resolve().parent / "scripts"
    if not (scripts / "env.py").is_file():
        raise ConfigError(f"llmstore's migration scripts are missing (looked in {scripts})")
    return scripts


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


def version_context(conn: Connection, schema: str | None, **opts: Any) -> MigrationContext:
    """A migration context on llmstore's own version table."""
    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE, "version_table_schema": schema, **opts}
    )


def read_revision(conn: Connection, schema: str | None) -> str | None:
    """The database's revision, or None when it was never migrated.

    A database last migrated before revision 0005 keeps it in ``alembic_version``
    (perhaps next to a host's own rows): it is read from there until ``upgrade`` moves it.
    """
    heads = version_context(conn, schema).get_current_heads()
    if not heads:
        heads = tuple(_legacy_revisions(conn, schema))
    if len(heads) > 1:
        raise MigrationError(f"the database has several revisions: {', '.join(heads)}")
    return heads[0] if heads else None


def _legacy_table(schema: str | None) -> sa.TableClause:
    return sa.table(LEGACY_VERSION_TABLE, sa.column("version_num", sa.String), schema=schema)


def _legacy_revisions(conn: Connection, schema: str | None) -> list[str]:
    """llmstore's revisions in ``alembic_version``; a host's own rows there are not."""
    if not sa.inspect(conn).has_table(LEGACY_VERSION_TABLE, schema=schema):
        return []
    rows = conn.execute(sa.select(_legacy_table(schema).c.version_num)).scalars()
    return [revision for revision in rows if is_known(revision)]


def adopt_legacy_version(conn: Connection, schema: str | None) -> None:
    """Move llmstore's row from ``alembic_version`` to ``llmstore_alembic_version``.

    Only llmstore's row is removed, and the table is dropped only when that leaves it
    empty: a host application may keep its own history there. Runs inside the migration's
    transaction, so a failed upgrade leaves the row where it was.
    """
    legacy = _legacy_revisions(conn, schema)
    if not legacy:
        return
    context = version_context(conn, schema)
    if context.get_current_heads():
        raise MigrationError(
            f"llmstore's revision is in both {VERSION_TABLE} and {LEGACY_VERSION_TABLE} "
            f"({', '.join(legacy)}); remove the stale row from {LEGACY_VERSION_TABLE}"
        )
    if len(legacy) > 1:
        raise MigrationError(f"the database has several revisions: {', '.join(legacy)}")
    context.stamp(scripts(), legacy[0])
    table = _legacy_table(schema)
    conn.execute(table.delete().where(table.c.version_num.in_(legacy)))
    if conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0:
        conn.execute(sa.text(f"DROP TABLE {_quoted(conn, schema, LEGACY_VERSION_TABLE)}"))


def _quoted(conn: Connection, schema: str | None, name: str) -> str:
    quote = conn.dialect.identifier_preparer.quote
    return quote(name) if schema is None else f"{quote(schema)}.{quote(name)}"


def is_own_object(
    object_: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's ``include_object`` for llmstore's own comparisons: its objects only.

    A host's tables, views and their indexes in the same database or schema are neither
    drift nor ever dropped; llmstore's version table is Alembic's business.
    """
    table = name if type_ == "table" else getattr(getattr(object_, "table", None), "name", None)
    return table is not None and table.startswith(TABLE_PREFIX) and table != VERSION_TABLE


def install_head(conn: Connection, schema: str | None) -> None:
    """Create the head schema in a database that holds none of llmstore's, and stamp it.

    Straight from the models (Alembic's cookbook, "building an up to date database from
    scratch"), not through the revisions: revisions 0001-0004 create the unprefixed names
    (``api_keys``, ...) that a host's own tables may have. ``tests/migrations/test_migrations.py``
    proves that both ways give the same schema. Postgres: in a transaction of its own,
    after what was read under the lock; the caller commits it.
    """
    if not traits(conn.dialect).single_file:
        if conn.in_transaction():
            conn.commit()
        if schema is not None and traits(conn.dialect).named_schemas:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    # checkfirst=False: a table of that name that is not llmstore's is an error, not reused.
    metadata.create_all(conn, checkfirst=False)
    for name, rows in INITIAL_ROWS.items():
        conn.execute(metadata.tables[name].insert(), rows)
    version_context(conn, schema).stamp(scripts(), "head")


_RELATIVE = re.compile(r"(?P<base>.*?)(?P<steps>[+-]\d+)?")
_REVISION_MAX = 200


def check_target(revision: str) -> None:
    """Refuse a target revision this code does not know, before anything is locked or
    backed up (a typo must not push a real backup out of the retention window).

    The revision named before a relative step (``0003+1``, ``head-1``) is checked here;
    the step itself, which depends on the database's revision, is Alembic's to resolve.
    """
    if not isinstance(revision, str) or not 0 < len(revision) <= _REVISION_MAX:
        raise ValidationError(
            f"a target revision is a string of 1 to {_REVISION_MAX} characters, "
            f"not {type(revision).__name__}"
        )
    base = _RELATIVE.fullmatch(revision)
    name = base.group("base") if base is not None else revision
    if not name:
        return
    try:
        scripts().get_revisions(name)
    except CommandError as exc:
        known = ", ".join(script.revision for script in scripts().walk_revisions())
        raise MigrationError(
            f"unknown revision {revision!r}: nothing was changed and no backup was made "
            f"(the revisions are head, base, {known})"
        ) from exc


def schema_exists(conn: Connection, schema: str | None) -> bool:
    return schema is None or sa.inspect(conn).has_schema(schema)


@dataclass(frozen=True)
class SchemaDiff:
    """One difference between the database and the models, as Alembic reports it."""

    description: str


def diff_schema(conn: Connection, schema: str | None) -> list[SchemaDiff]:
    if traits(conn.dialect).named_schemas and schema is not None:
        conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
    context = version_context(conn, schema, compare_type=True, include_object=is_own_object)
    diffs = [SchemaDiff(_describe(entry)) for entry in compare_metadata(context, metadata)]
    if traits(conn.dialect).online_ddl:
        diffs += [
            SchemaDiff(f"invalid index: {name} (a concurrent build failed; `upgrade` rebuilds it)")
            for name in conn.execute(_INVALID_INDEXES).scalars()
        ]
    return diffs


# Compare_metadata sees an index a failed CREATE INDEX CONCURRENTLY left as present.
# Only llmstore's tables: a host's own tables may share the schema (public).
_INVALID_INDEXES = sa.text(
    "SELECT c.relname FROM pg_index i "
    "JOIN pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_class t ON t.oid = i.indrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE NOT i.indisvalid AND n.nspname = current_schema() AND t.relname IN :tables "
    "ORDER BY c.relname"
).bindparams(sa.bindparam("tables", value=sorted(metadata.tables), expanding=True))


def _describe(entry: Any) -> str:
    if isinstance(entry, list):
        return "; ".join(_describe(item) for item in entry)
    if isinstance(entry, tuple) and entry:
        action, *rest = entry
        names = [getattr(item, "name", None) or str(item) for item in rest if item is not None]
        return f"{action}: {', '.join(str(name) for name in names)}"
    return str(entry)
