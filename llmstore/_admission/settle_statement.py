"""A settlement as one statement, for runners that send statements over a network
(``runner.one_statement_writes``), beside the Python form (``finish.settle``).

One data-modifying CTE locks what the Python form locks, in its order (the admission;
its windows, then its budget periods, each in id order; its key hold; the key), and
writes all of it or nothing: the windows' token counts corrected, the periods' holds
turned into spend, the crossings, the key charged as ``api_keys.settle`` charges it
(``_billing.settlement_ctes``: never below zero, the rest the shortfall), the ledger
entry, and the admission settled with its digest.

It decides the plain case only: the admission is active, its key hold (if any) is still
active, no spend would pass 2**63 - 1, and there is no usage row to write. Otherwise it
writes nothing and the Python form settles (a replay, a conflict, a hold a sweep
expired, a settlement with usage) with the same result.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from llmstore._billing import settlement_ctes
from llmstore._core.validate import MAX_INT64
from llmstore._db.admission_schema import (
    admission_budgets,
    admission_windows,
    budget_crossings,
    budget_periods,
    rate_windows,
)
from llmstore._db.ctes import after_all_of, exists_in
from llmstore._db.lean import LeanStatement, Row
from llmstore._db.schema import UTCDateTime, reservations

from .crossing_ctes import crossings_made
from .records import A, B, BudgetCrossing, Settlement
from .statements import add_saturating

AB = admission_budgets
AW = admission_windows
BC = budget_crossings
BP = budget_periods
RW = rate_windows
R = reservations

_P = sa.bindparam
_UUID = sa.Uuid()
_BIG = sa.BigInteger()
_TIME = UTCDateTime()

_ID = _P("p_admission_id", type_=_UUID)
_COST = _P("p_cost", type_=_BIG)
_TOKENS = _P("p_tokens", type_=_BIG)
_NOW = _P("p_now", type_=_TIME)


def _statement() -> LeanStatement:
    # 1. The admission, locked first: only an active one is settled here.
    pending = (
        sa.select(A.c.id, A.c.api_key_id, A.c.reservation_id, A.c.tokens)
        .where(A.c.id == _ID, A.c.status == "active")
        .with_for_update(of=A)
        .cte("pending")
        .prefix_with("MATERIALIZED")
    )
    # What replaces the token estimate in its windows (0: nothing to correct).
    estimate = sa.func.coalesce(sa.select(pending.c.tokens).scalar_subquery(), 0)
    delta = sa.select(
        sa.type_coerce(sa.case((_TOKENS.is_(None), 0), else_=_TOKENS - estimate), _BIG).label(
            "delta"
        )
    ).cte("correction")
    tokens_delta = sa.select(delta.c.delta).scalar_subquery()
    # 2. Its windows, locked in id order, only when their token counts change.
    windows_locked = (
        sa.select(RW.c.rate_limit_id, RW.c.window_start)
        .join_from(
            RW,
            AW,
            sa.and_(
                AW.c.rate_limit_id == RW.c.rate_limit_id, AW.c.window_start == RW.c.window_start
            ),
        )
        .where(AW.c.admission_id == _ID, tokens_delta != 0, after_all_of(pending))
        .order_by(RW.c.rate_limit_id)
        .with_for_update(of=RW)
        .cte("windows_locked")
        .prefix_with("MATERIALIZED")
    )
    # 3. Its budget periods, locked in budget id order.
    periods_locked = (
        sa.select(
            BP.c.budget_id,
            BP.c.period_start,
            BP.c.spent,
            AB.c.amount.label("hold"),
            B.c.limit_amount,
            B.c.soft_limits,
        )
        .join_from(
            BP,
            AB,
            sa.and_(AB.c.budget_id == BP.c.budget_id, AB.c.period_start == BP.c.period_start),
        )
        .join(B, B.c.id == AB.c.budget_id)
        .where(AB.c.admission_id == _ID, exists_in(pending), after_all_of(windows_locked))
        .order_by(BP.c.budget_id)
        .with_for_update(of=BP)
        .cte("periods_locked")
        .prefix_with("MATERIALIZED")
    )
    # 4. Its key hold, still active (the key is locked by the settlement's CTEs, last).
    hold_locked = (
        sa.select(R.c.id, R.c.api_key_id, R.c.amount)
        .where(
            R.c.id == sa.select(pending.c.reservation_id).scalar_subquery(),
            R.c.status == "active",
            after_all_of(periods_locked),
        )
        .with_for_update(of=R)
        .cte("hold_locked")
        .prefix_with("MATERIALIZED")
    )
    unheld = sa.select(pending.c.reservation_id.is_(None)).scalar_subquery()
    keyless = sa.select(pending.c.api_key_id.is_(None)).scalar_subquery()
    decided = sa.and_(
        exists_in(pending),
        sa.or_(
            sa.and_(unheld, sa.or_(keyless, _COST == 0)),  # nothing for the key to pay
            exists_in(hold_locked),
        ),
        sa.not_(exists_in(periods_locked, periods_locked.c.spent > MAX_INT64 - _COST)),
    )
    verdict = sa.select(decided.label("settleable")).cte("verdict")
    settleable = sa.select(verdict.c.settleable).scalar_subquery()
    # 5. The writes, each only if settleable.
    key = settlement_ctes(hold_locked, _COST, _NOW, only_if=settleable, name="key_")
    key_entry = key.entry.cte("key_entry")
    charged = sa.func.coalesce(sa.select(key.changed.c.charged).scalar_subquery(), 0)
    windows_corrected = (
        RW.update()
        .where(
            RW.c.rate_limit_id == windows_locked.c.rate_limit_id,
            RW.c.window_start == windows_locked.c.window_start,
            settleable,
        )
        .values(tokens=add_saturating(RW.c.tokens, tokens_delta))
        .returning(RW.c.rate_limit_id)
        .cte("windows_corrected")
    )
    counts_corrected = (
        AW.update()
        .where(AW.c.admission_id == _ID, tokens_delta != 0, settleable)
        .values(tokens=add_saturating(AW.c.tokens, tokens_delta))
        .returning(AW.c.rate_limit_id)
        .cte("counts_corrected")
    )
    periods_spent = (
        BP.update()
        .where(
            BP.c.budget_id == periods_locked.c.budget_id,
            BP.c.period_start == periods_locked.c.period_start,
            settleable,
        )
        .values(reserved=BP.c.reserved - periods_locked.c.hold, spent=BP.c.spent + _COST)
        .returning(
            BP.c.budget_id,
            BP.c.period_start,
            (BP.c.spent + BP.c.reserved).label("level"),
            periods_locked.c.hold,
        )
        .cte("periods_spent")
    )
    holds_settled = (
        AB.update()
        .where(AB.c.admission_id == _ID, settleable)
        .values(settled_amount=_COST)
        .returning(AB.c.budget_id)
        .cte("holds_settled")
    )
    # 6. The thresholds the settlement took the periods past, each recorded once.
    level = periods_spent.c.level
    crossed = crossings_made(
        periods_locked.c.budget_id,
        periods_locked.c.soft_limits,
        periods_locked.c.limit_amount,
        periods_spent,
        before=level - _COST + periods_spent.c.hold,
        after=level,
        admission_id=_ID,
        now=_NOW,
        at_settle=True,
    )
    # 7. The admission settled last (one UPDATE of its row: everything it records).
    admission_settled = (
        A.update()
        .where(A.c.id == sa.select(pending.c.id).scalar_subquery(), settleable)
        .values(
            status="settled",
            finished_at=_NOW,
            settled_cost=_COST,
            settled_tokens=_TOKENS,
            settle_digest=_P("p_digest", type_=sa.String(64)),
            charged=charged,
            shortfall=sa.func.coalesce(sa.select(key_entry.c.shortfall).scalar_subquery(), 0),
        )
        .returning(A.c.tokens, A.c.charged, A.c.shortfall)
        .cte("admission_settled")
    )
    columns: list[sa.ColumnElement[Any]] = [
        verdict.c.settleable,
        *admission_settled.c,
        *crossed,
    ]
    labelled = [column.label(f"c{i}") for i, column in enumerate(columns)]
    statement = (
        sa.select(*labelled)
        # Writes no column reads: SQLAlchemy renders only the CTEs a statement refers to.
        .add_cte(windows_corrected, counts_corrected, holds_settled)
        .select_from(verdict)
        .outerjoin(admission_settled, sa.true())
    )
    return LeanStatement(statement, columns)


SETTLE_IN_ONE_STATEMENT = _statement()


def settle_params(
    admission_id: Any, cost: int, tokens: int | None, digest: str, now: dt.datetime
) -> dict[str, Any]:
    """The statement's parameters (the same as the Python form's first statement)."""
    return {
        "p_admission_id": admission_id,
        "p_cost": cost,
        "p_tokens": tokens,
        "p_digest": digest,
        "p_now": now,
    }


def settled(row: Row | None, params: dict[str, Any]) -> Settlement | None:
    """The settlement the statement made, or None if it wrote nothing (the Python form
    settles instead)."""
    if row is None or not row[0]:
        return None
    estimate, charged, shortfall = row[1:4]
    budget_ids, starts, thresholds, hard = (value or () for value in row[4:])
    return Settlement(
        admission_id=params["p_admission_id"],
        cost=params["p_cost"],
        tokens=estimate if params["p_tokens"] is None else params["p_tokens"],
        charged=charged,
        shortfall=shortfall,
        usage_id=None,
        settled_at=params["p_now"],
        crossed=tuple(
            BudgetCrossing(budget_id=budget_id, period_start=start, threshold=value, hard=is_hard)
            for budget_id, start, value, is_hard in zip(
                budget_ids, starts, thresholds, hard, strict=True
            )
        ),
    )
