"""What the reads of every domain share: a row by its id, pages in id order, periods.

Ids are UUIDv7 (time-ordered), so the id order is the creation order and a page's last id
is the cursor of the next page (``after``): no OFFSET, and a page costs the same at any
depth.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from llmstore._core.errors import NotFoundError
from llmstore._core.validate import check_aware, check_id, check_limit

Q = TypeVar("Q", bound="sa.Select[Any]")


def found(
    conn: Connection,
    statement: sa.Executable,
    what: str,
    key: object,
    params: Mapping[str, Any] | None = None,
) -> Row[Any]:
    """The first row of ``statement``, or NotFoundError ("no {what} with id {key}")."""
    row = conn.execute(statement, params).first()
    if row is None:
        raise NotFoundError(f"no {what} with id {key}")
    return row


def id_page(
    statement: sa.Select[Any],
    id_column: sa.ColumnElement[Any],
    *,
    limit: object,
    after: object,
    equal: Iterable[tuple[sa.ColumnElement[Any], object]] = (),
) -> sa.Select[Any]:
    """``statement`` in id order: ``limit`` rows after the id ``after`` (None: the first).

    ``equal`` holds (column, checked value) pairs; a pair whose value is None is no filter.
    """
    statement = statement.order_by(id_column).limit(check_limit(limit))
    for column, value in equal:
        if value is not None:
            statement = statement.where(column == value)
    if after is not None:
        statement = statement.where(id_column > check_id(after, "after"))
    return statement


def in_period(statement: Q, column: sa.ColumnElement[Any], since: object, until: object) -> Q:
    """``statement`` limited to ``since <= column < until`` (either bound may be None)."""
    if since is not None:
        statement = statement.where(column >= check_aware(since, "since"))
    if until is not None:
        statement = statement.where(column < check_aware(until, "until"))
    return statement
