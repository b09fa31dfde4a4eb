"""What each database can do that the other cannot, decided here once by its name.

Migrations and operations (backup, restore) ask these questions; they never compare a
driver or dialect name themselves (``tests/test_architecture.py`` checks it). Domains ask
their runner instead (``llmstore._db.runner``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from llmstore._core.errors import ConfigError

__all__ = ["DriverTraits", "traits"]


@dataclass(frozen=True)
class DriverTraits:
    """The differences between the drivers that migrations and operations depend on."""

    #: ``"sqlite"`` or ``"postgresql"``: the name of its SQLAlchemy dialect.
    driver: str

    #: The database is one file (or memory) whose single write lock is the transaction
    #: (``BEGIN IMMEDIATE``): a migration runs in the caller's one transaction, which the
    #: caller commits; no session lock is needed; backups copy the file and
    #: ``PRAGMA integrity_check`` checks it. Otherwise (Postgres) a migration holds a
    #: session lock, owns its transactions, and backups go through ``pg_dump``.
    single_file: bool
    #: ``ALTER TABLE`` beyond adding a column rebuilds the table (Alembic's batch mode).
    alters_by_rebuilding: bool
    #: Named schemas (``CREATE SCHEMA``, ``search_path``) hold llmstore's tables.
    named_schemas: bool
    #: DDL that waits politely: ``lock_timeout``, ``CREATE INDEX CONCURRENTLY`` (outside a
    #: transaction, leaving an invalid index when it fails).
    online_ddl: bool


# A table, one database a row:  single_file, alters_by_rebuilding, named_schemas, online_ddl
_SQLITE = DriverTraits("sqlite", True, True, False, False)
_POSTGRES = DriverTraits("postgresql", False, False, True, True)
_BY_NAME = {found.driver: found for found in (_SQLITE, _POSTGRES)}


def traits(database: str | sa.Dialect) -> DriverTraits:
    """The traits of a driver (``StoreConfig.driver``) or of a SQLAlchemy dialect.

    Raises ConfigError for a database llmstore does not support.
    """
    name = database if isinstance(database, str) else database.name
    found = _BY_NAME.get(name)
    if found is None:
        raise ConfigError(f"llmstore works on SQLite and PostgreSQL, not {name}")
    return found
