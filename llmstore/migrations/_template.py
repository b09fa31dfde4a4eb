"""The head schema for in-memory SQLite stores, migrated once per process.

Running every revision for each new ``:memory:`` store (each unit test) would cost tens of
milliseconds; copying a migrated template with SQLite's backup API costs well under one.
"""

from __future__ import annotations

import sqlite3
import threading

from alembic import command

from llmstore._db.engines import sqlite_engine

from ._commands import migrate_on

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
