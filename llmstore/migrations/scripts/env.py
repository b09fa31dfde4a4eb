"""Alembic environment for llmstore.

Three ways in:

* ``config.attributes["connection"]``, the convention of Alembic's cookbook and of
  pytest-alembic: a ``Connection`` is used as it is, inside whatever transaction its owner
  began (llmstore's own commands hand over one inside the transaction they will commit); a
  sync ``Engine`` or an ``AsyncEngine`` lends a connection for the command, which then
  holds the migration lock and runs in one transaction, as ``python -m llmstore upgrade``.
* ``--sql`` (offline): the SQL is printed for the URL llmstore would use.
* the plain ``alembic`` command line: llmstore opens the connection (asyncpg through
  ``run_sync`` on Postgres) exactly as ``python -m llmstore upgrade`` would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from logging.config import fileConfig
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.schema import CreateIndex, CreateTable

from llmstore._core.config import StoreConfig
from llmstore._core.errors import ConfigError
from llmstore._db.schema import INITIAL_ROWS, VERSION_TABLE, metadata
from llmstore._db.traits import traits
from llmstore.migrations._commands import (
    adopt_legacy_version,
    head_revision,
    is_own_object,
    migrate_on,
    migrating,
    migration_session,
    with_migration_connection,
)
from llmstore.migrations._ops import DEFAULT_LOCK_TIMEOUT, commits_alone

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _store_config() -> StoreConfig:
    url = config.attributes.get("llmstore_url") or config.get_main_option("sqlalchemy.url")
    return StoreConfig.from_env(url=url) if url else StoreConfig.from_env()


def _report_applied(
    ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]
) -> None:
    if commits_alone():
        # Its concurrent index work is done and it is stamped: commit, so that a later
        # revision's failure rolls back to this revision, not to a stamp without its index.
        with ctx.autocommit_block():
            pass
    applied = config.attributes.get("llmstore_applied")
    if applied is not None:
        applied(step.up_revision_id)  # the script's revision, in either direction


def _run_on(connection: Connection, schema: str | None, attributes: dict[str, Any]) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=traits(connection.dialect).alters_by_rebuilding,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_object=is_own_object,
        compare_type=True,
        transaction_per_migration=False,
        on_version_apply=_report_applied,
    )
    # SQLite: the caller's transaction, so this is a no-op. Postgres: the one transaction,
    # which an autocommit block in a revision commits and begins again.
    with context.begin_transaction():
        if schema is not None and traits(connection.dialect).named_schemas:
            connection.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        if not context.is_offline_mode():
            adopt_legacy_version(connection, schema)
        context.run_migrations()
        before_commit = attributes.get("llmstore_before_commit")
        if before_commit is not None:
            before_commit()


def run_offline() -> None:
    store_config = _store_config()
    schema = config.attributes.get("llmstore_schema") or store_config.schema_name
    context.configure(
        url=store_config.url.get_secret_value(),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=traits(store_config.driver).alters_by_rebuilding,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        if traits(store_config.driver).online_ddl:
            context.execute(f"SET lock_timeout = '{DEFAULT_LOCK_TIMEOUT}'")
        if schema is not None:
            context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            # Session-wide, not SET LOCAL: it must outlive an autocommit block's COMMIT.
            context.execute(f'SET search_path TO "{schema}"')
        if _from_empty_to_head():
            _render_head(schema)
        else:
            context.run_migrations()


def _from_empty_to_head() -> bool:
    """``upgrade head --sql`` from nothing: rendered from the models, as an online upgrade
    of an empty database is made (``install_head``), not through revisions 0001-0004."""
    start = context.get_starting_revision_argument()
    return start in (None, "base") and context.get_revision_argument() in (
        "head",
        "heads",
        head_revision(),
    )


def _render_head(schema: str | None) -> None:
    for table in metadata.sorted_tables:
        context.execute(CreateTable(table))
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            context.execute(CreateIndex(index))
    for name, rows in INITIAL_ROWS.items():
        for row in rows:
            context.execute(metadata.tables[name].insert().values(row))
    # Alembic's own version table, as its run_migrations() creates it in --sql mode.
    version = sa.Table(
        VERSION_TABLE,
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"),
        schema=schema,
    )
    context.execute(CreateTable(version))
    context.execute(version.insert().values(version_num=head_revision()))


def run_online() -> None:
    given = config.attributes.get("connection")
    schema = config.attributes.get("llmstore_schema")
    if isinstance(given, Connection):
        _run_on(given, schema, config.attributes)
    elif isinstance(given, Engine):
        with given.connect() as conn:
            _run_lent(conn, schema)
    elif isinstance(given, AsyncEngine):
        asyncio.run(_run_on_async(given, schema))
    elif given is not None:
        raise ConfigError(
            'config.attributes["connection"] must be a Connection, an Engine or an '
            f"AsyncEngine, not {type(given).__name__}"
        )
    else:
        _run_own()


def _run_lent(conn: Connection, schema: str | None) -> None:
    with migrating(conn, schema):
        _run_on(conn, schema, config.attributes)


async def _run_on_async(engine: AsyncEngine, schema: str | None) -> None:
    async with engine.connect() as conn:
        await conn.run_sync(_run_lent, schema)


def _run_own() -> None:
    store_config = _store_config()
    schema = store_config.schema_name

    def migrate(conn: Connection) -> None:
        with migration_session(conn, schema):
            migrate_on(conn, schema, lambda cfg: _run_on(conn, schema, cfg.attributes))
            conn.commit()

    asyncio.run(with_migration_connection(store_config, migrate))


if context.is_offline_mode():
    run_offline()
else:
    run_online()
