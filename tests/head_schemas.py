"""New databases at the head schema for the ``store`` fixtures, without running every
revision each time (about a second per test on Postgres, most of a test's time).

* SQLite file: a copy of a file migrated once per process by ``llmstore.migrations``.
* Postgres: a new schema made from the one ``MetaData`` (with the rows a new database
  starts with) and stamped at the head revision.
  ``tests/migrations/test_migrations.py::test_upgrade_from_empty_to_head_matches_the_models``
  proves the two agree, and the migration tests keep running every revision themselves.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import StoreConfig
from llmstore._db.schema import INITIAL_ROWS, metadata
from llmstore.migrations import upgrade
from llmstore.migrations._schema import scripts, version_context

# Tests run one at a time in a process: no lock needed around the template's making.
_template: Path | None = None


async def sqlite_file_at_head(path: Path) -> None:
    """Make ``path`` a SQLite database at the head schema (a copy of a migrated one)."""
    global _template
    if _template is None:
        template = Path(tempfile.mkdtemp(prefix="llmstore-head-")) / "head.db"
        await upgrade(StoreConfig.from_url(f"sqlite:///{template}"))
        _template = template
    # Closed cleanly by the upgrade: everything is in the main file, none in a -wal file.
    shutil.copyfile(_template, path)


def _create(conn: Connection, schema: str) -> None:
    conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    translated = conn.execution_options(schema_translate_map={None: schema})
    metadata.create_all(translated)
    for table_name, rows in INITIAL_ROWS.items():
        translated.execute(metadata.tables[table_name].insert(), rows)
    version_context(conn, schema).stamp(scripts(), "head")


async def postgres_schema_at_head(url: str, schema: str) -> None:
    """Create ``schema`` at the head schema on the Postgres server of ``url``."""
    engine = create_async_engine(
        StoreConfig.from_url(url).url.get_secret_value(), poolclass=NullPool
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_create, schema)
    finally:
        await engine.dispose()
