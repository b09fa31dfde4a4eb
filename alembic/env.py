"""Alembic environment for llmstore.

Three ways in:

* llmstore's own commands hand over a connection already inside the transaction they
  will commit (``config.attributes["connection"]``): SQLite uses batch mode.
* ``--sql`` (offline): the SQL is printed for the URL llmstore would use.
* the plain ``alembic`` command line: llmstore opens the connection (asyncpg through
  ``run_sync`` on Postgres) exactly as ``python -m llmstore upgrade`` would.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from llmstore._config import StoreConfig
from llmstore._migration_ops import DEFAULT_LOCK_TIMEOUT, commits_alone
from llmstore._migrations import migrate_on, migration_session, with_migration_connection
from llmstore._schema import metadata

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _store_config() -> StoreConfig:
    url = config.attributes.get("llmstore_url") or config.get_main_option("sqlalchemy.url")
    return StoreConfig.from_env(url=url) if url else StoreConfig.from_env()


def _report_applied(*, ctx: MigrationContext, step: Any, **_: Any) -> None:
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
        render_as_batch=connection.dialect.name == "sqlite",
        version_table_schema=schema,
        compare_type=True,
        transaction_per_migration=False,
        on_version_apply=_report_applied,
    )
    # SQLite: the caller's transaction, so this is a no-op. Postgres: the one transaction,
    # which an autocommit block in a revision commits and begins again.
    with context.begin_transaction():
        if schema is not None and connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
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
        render_as_batch=store_config.driver == "sqlite",
        version_table_schema=schema,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        if store_config.driver == "postgresql":
            context.execute(f"SET lock_timeout = '{DEFAULT_LOCK_TIMEOUT}'")
        if schema is not None:
            context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            # Session-wide, not SET LOCAL: it must outlive an autocommit block's COMMIT.
            context.execute(f'SET search_path TO "{schema}"')
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection, config.attributes.get("llmstore_schema"), config.attributes)
        return
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
