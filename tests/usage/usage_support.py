"""Setup shared by the usage tests of several modules (``test_usage.py`` and the buffered
writer's ``test_usage_writer_*.py``)."""

from __future__ import annotations

from llmstore import Store
from llmstore._db.schema import usage_logs
from tests.helpers import execute, qualified


async def refuse_usage_rows(
    store: Store, name: str, *, check: str, when: str, message: str
) -> None:
    """Make the real database refuse some usage rows with a constraint of the operator's
    own, called ``name``, which the bulk path (raw sqlite3 or COPY) meets too: on Postgres
    a ``CHECK (check)`` added ``NOT VALID``; on SQLite a trigger that aborts with
    ``message`` the inserts ``when`` holds for."""
    if store.driver == "postgresql":
        sql = (
            f"ALTER TABLE {qualified(store, usage_logs.name)} ADD CONSTRAINT {name} "
            f"CHECK ({check}) NOT VALID"
        )
    else:
        sql = (
            f"CREATE TRIGGER {name} BEFORE INSERT ON {usage_logs.name} WHEN {when} "
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )
    await execute(store, sql)
