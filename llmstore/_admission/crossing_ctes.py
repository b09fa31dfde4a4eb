"""The soft limits (and the limit) an admission or a settlement took a budget's period
past, in its one-statement form: recorded once per budget and period, as
``admit.record_crossings`` records them in the Python form."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from llmstore._db.admission_schema import budget_crossings
from llmstore._db.ctes import array_of
from llmstore._db.schema import UTCDateTime

BC = budget_crossings
_BIG = sa.BigInteger()


def crossings_made(
    budget_id: sa.ColumnElement[uuid.UUID],
    soft_limits: sa.ColumnElement[Any],
    limit: sa.ColumnElement[int],
    changed: sa.CTE,
    *,
    before: sa.ColumnElement[int],
    after: sa.ColumnElement[int],
    admission_id: sa.ColumnElement[uuid.UUID],
    now: sa.ColumnElement[dt.datetime],
    at_settle: bool,
) -> list[sa.ColumnElement[Any]]:
    """Record each threshold of the budgets (``budget_id``, ``soft_limits`` and ``limit``,
    columns of one CTE) that a ``changed`` period (``budget_id``, ``period_start``) passed
    from level ``before`` to ``after`` and no one has recorded yet; four arrays of those
    this statement recorded, in budget and threshold order: budget ids, period starts,
    thresholds, and whether each is the limit itself."""
    thresholds = (
        sa.select(
            budget_id.label("budget_id"),
            sa.cast(sa.func.json_array_elements_text(soft_limits), _BIG).label("threshold"),
            limit.label("limit_amount"),
        )
        .union_all(sa.select(budget_id, limit, limit))
        .cte("thresholds")
    )
    made = (
        postgresql.insert(BC)
        .from_select(
            ["budget_id", "period_start", "threshold", "admission_id", "at_settle", "crossed_at"],
            sa.select(
                changed.c.budget_id,
                changed.c.period_start,
                thresholds.c.threshold,
                admission_id,
                sa.literal(at_settle),
                now,
            ).join_from(
                changed,
                thresholds,
                sa.and_(
                    thresholds.c.budget_id == changed.c.budget_id,
                    before < thresholds.c.threshold,
                    thresholds.c.threshold <= after,
                ),
            ),
        )
        .on_conflict_do_nothing(index_elements=[BC.c.budget_id, BC.c.period_start, BC.c.threshold])
        .returning(BC.c.budget_id, BC.c.period_start, BC.c.threshold)
        .cte("crossings_made")
    )
    crossed = (
        sa.select(
            made.c.budget_id,
            made.c.period_start,
            made.c.threshold,
            (made.c.threshold == thresholds.c.limit_amount).label("hard"),
        )
        .join_from(
            made,
            thresholds,
            sa.and_(
                thresholds.c.budget_id == made.c.budget_id,
                thresholds.c.threshold == made.c.threshold,
            ),
        )
        .cte("crossed")
    )
    return [
        array_of(crossed.c[name], crossed, (crossed.c.budget_id, crossed.c.threshold), item)
        for name, item in (
            ("budget_id", sa.Uuid()),
            ("period_start", UTCDateTime()),
            ("threshold", _BIG),
            ("hard", sa.Boolean()),
        )
    ]
