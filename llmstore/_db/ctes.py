"""Building blocks of data-modifying CTEs (the one-statement forms of Postgres).

A one-statement form takes its locks in CTEs whose order the SQL must force (Postgres
runs a statement's CTEs in no promised order), decides on the rows as locked, writes in
CTEs gated on that decision, and returns one row: counts and arrays stand for the sets.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


def after_all_of(earlier: sa.CTE) -> sa.ColumnElement[bool]:
    """A condition that is always true and is evaluated, running all of ``earlier``
    (its locks taken), before the query it filters reads a row: a one-time filter. It
    is what makes locking CTEs lock in the order their form states."""
    return sa.select(sa.func.count()).select_from(earlier).scalar_subquery() >= 0


def exists_in(cte: sa.CTE, *where: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """Whether ``cte`` has a row meeting ``where``."""
    return sa.exists(sa.select(sa.literal(1)).select_from(cte).where(*where))


def count_of(cte: sa.CTE) -> sa.ScalarSelect[int]:
    """How many rows ``cte`` has."""
    return sa.select(sa.func.count()).select_from(cte).scalar_subquery()


def as_insert_values(table: sa.Table, values: dict[str, Any]) -> dict[str, sa.ColumnElement[Any]]:
    """A row's values for ``INSERT ... SELECT``: a constant becomes a literal of its
    column's type, None leaves the column NULL."""
    return {
        name: value
        if isinstance(value, sa.ColumnElement)
        else sa.literal(value, table.c[name].type)
        for name, value in values.items()
        if value is not None
    }


def array_of(
    column: sa.ColumnElement[Any],
    source: sa.CTE,
    order: tuple[sa.ColumnElement[Any], ...],
    item: Any,
) -> sa.ColumnElement[Any]:
    """Every value of ``column`` in ``source``, in ``order``, as one array (NULL if none)."""
    aggregated = sa.func.array_agg(
        postgresql.aggregate_order_by(column, *order), type_=postgresql.ARRAY(item)
    )
    return sa.select(aggregated).select_from(source).scalar_subquery()
