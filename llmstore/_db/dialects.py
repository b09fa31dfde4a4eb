"""The statements whose form depends on the database, each written once for both.

Domain code calls these with its connection and never asks which database it is on; the
two forms of each stand side by side here (tests/db/test_dialects.py runs both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .lean import LeanStatement, Row

__all__ = [
    "IN_LIST_CHUNK",
    "LeanUpsert",
    "delete_where_in",
    "insert_ignoring_conflicts",
    "is_postgres",
    "lock_until_commit",
    "transaction_id",
    "transaction_status",
    "upsert_rows",
    "values_in",
]

# Values per IN list on SQLite: below every build's limit on bound parameters.
IN_LIST_CHUNK = 500
# Bound parameters per statement: below SQLite's limit (32,766 since 3.32) and the
# 32,767 of Postgres's protocol.
MAX_PARAMETERS = 30_000


def is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def lock_until_commit(conn: Connection, namespace: int, key: str) -> None:
    """Serialise the transactions that take the same ``(namespace, key)`` until they end.

    Postgres: a transaction-scoped advisory lock. SQLite: nothing to do, the transaction
    already holds the database's one write lock (``BEGIN IMMEDIATE``).
    """
    if is_postgres(conn):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(namespace, sa.func.hashtext(key))))


def insert_ignoring_conflicts(
    conn: Connection,
    table: sa.Table,
    values: Mapping[str, Any],
    index_elements: Sequence[sa.Column[Any]],
) -> bool:
    """Insert one row unless it conflicts on ``index_elements``; whether it was inserted."""
    insert = postgresql.insert if is_postgres(conn) else sqlite.insert
    statement = (
        insert(table)
        .values(dict(values))
        .on_conflict_do_nothing(index_elements=list(index_elements))
    )
    return int(conn.execute(statement).rowcount) == 1


def upsert_rows(
    conn: Connection,
    table: sa.Table,
    rows: Sequence[Mapping[str, Any]],
    index_elements: Sequence[sa.Column[Any]],
    set_: Callable[[Any], Mapping[str, Any]],
    returning: Sequence[sa.ColumnElement[Any]] = (),
    where: sa.ColumnElement[bool] | None = None,
) -> list[Row]:
    """Insert ``rows`` (each with the same keys), or change the stored row each conflicts
    with on ``index_elements`` by ``set_(excluded)`` (the proposed row's columns as
    ``excluded.c``) where the stored row meets ``where``. One multi-row ``INSERT ... ON
    CONFLICT DO UPDATE`` per ``MAX_PARAMETERS`` values, the rows in the order given
    (which is the order Postgres locks them in). The rows ``returning`` asks for, in no
    particular order."""
    if not rows:
        return []
    insert = postgresql.insert if is_postgres(conn) else sqlite.insert
    per_statement = max(1, MAX_PARAMETERS // max(1, len(rows[0])))
    written: list[Row] = []
    for start in range(0, len(rows), per_statement):
        statement = insert(table).values([dict(row) for row in rows[start : start + per_statement]])
        statement = statement.on_conflict_do_update(
            index_elements=list(index_elements), set_=dict(set_(statement.excluded)), where=where
        )
        if returning:
            written.extend(tuple(row) for row in conn.execute(statement.returning(*returning)))
        else:
            conn.execute(statement)
    return written


class LeanUpsert:
    """Insert a row, or change the one it conflicts with by ``set_`` where ``where`` holds
    (both see the stored row's columns as ``table.c``); ``first_any`` returns the row
    written, or None when the stored row did not meet ``where``. One statement on both
    databases (``INSERT ... ON CONFLICT DO UPDATE ... WHERE``, which locks the stored row
    on Postgres), built once in both forms for the lean path: the values, the change and
    its condition are bound parameters."""

    def __init__(
        self,
        table: sa.Table,
        values: Mapping[str, Any],
        index_elements: Sequence[sa.Column[Any]],
        set_: Mapping[str, Any],
        where: sa.ColumnElement[bool],
        returning: Sequence[sa.ColumnElement[Any]],
    ) -> None:
        self._forms = {
            name: LeanStatement(
                insert(table)
                .values(dict(values))
                .on_conflict_do_update(
                    index_elements=list(index_elements), set_=dict(set_), where=where
                )
                .returning(*returning),
                returning,
            )
            for name, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
        }

    def first_any(self, conn: Connection, params: Mapping[str, Any]) -> Row | None:
        """The row written, or None when the stored row did not meet the condition."""
        return self._forms[conn.dialect.name].first_any(conn, params)


def values_in(conn: Connection, column: sa.Column[Any], values: Sequence[Any]) -> set[Any]:
    """Which of ``values`` the table holds in ``column``: one array parameter on Postgres,
    IN lists of ``IN_LIST_CHUNK`` on SQLite."""
    if not values:
        return set()
    select = sa.select(column)
    if is_postgres(conn):
        listed = sa.bindparam("values", list(values), type_=postgresql.ARRAY(column.type))
        return set(conn.execute(select.where(column == sa.any_(listed))).scalars())
    found: set[Any] = set()
    for start in range(0, len(values), IN_LIST_CHUNK):
        chunk = list(values[start : start + IN_LIST_CHUNK])
        found.update(conn.execute(select.where(column.in_(chunk))).scalars())
    return found


def delete_where_in(conn: Connection, column: sa.Column[Any], values: Sequence[Any]) -> int:
    """Delete the rows whose ``column`` is one of ``values``; how many were deleted."""
    table = column.table
    if is_postgres(conn):
        listed = sa.bindparam("values", list(values), type_=postgresql.ARRAY(column.type))
        return int(conn.execute(sa.delete(table).where(column == sa.any_(listed))).rowcount)
    deleted = 0
    for start in range(0, len(values), IN_LIST_CHUNK):
        chunk = list(values[start : start + IN_LIST_CHUNK])
        deleted += int(conn.execute(sa.delete(table).where(column.in_(chunk))).rowcount)
    return deleted


def transaction_id(conn: Connection) -> int | None:
    """The current transaction's id where the database can later say whether it committed
    (Postgres: ``txid_current()``); None where a commit cannot be lost on the way (SQLite
    commits in-process)."""
    if not is_postgres(conn):
        return None
    return int(conn.execute(sa.select(sa.func.txid_current())).scalar_one())


def transaction_status(conn: Connection, xid: int) -> str | None:
    """``"committed"``, ``"aborted"``, ``"in progress"``, or None once it is forgotten."""
    status: str | None = conn.execute(sa.select(sa.func.txid_status(xid))).scalar()
    return status
