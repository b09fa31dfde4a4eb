"""An admission's end, exactly once: settled at its cost, released, or expired.

Each is a conditional ``UPDATE ... WHERE status = 'active'`` of the admission's row
first (whoever changes it owns the transition; everyone else finds it finished), then
its windows, its budget periods (each in id order), its key's hold and the key: the same
order as an admission locks them.

A settlement is retry-safe: its arguments' digest is stored with it, so the same call
again returns the same :class:`Settlement` and another call is a ``ConflictError``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._billing import extend_hold, finish_holds, settle_hold, settle_unheld
from llmstore._core.errors import ConflictError, NotFoundError, ValidationError
from llmstore._db.admission_schema import (
    admission_budgets,
    admission_windows,
    budget_periods,
    rate_windows,
)
from llmstore._prices import costs_for
from llmstore._usage import UsageRecord, insert_records

from .admit import crossings_of, load, record_crossings
from .records import ADMISSION_COLUMNS, A, Admission, Settlement, budget
from .statements import (
    BUDGETS_SETTLED,
    CORRECT_COUNTED,
    CORRECT_WINDOW,
    HELD,
    SETTLED,
    SETTLING,
    SPEND_IN_PERIOD,
    WINDOWS_COUNTED,
)

AB = admission_budgets
AW = admission_windows
BP = budget_periods
RW = rate_windows
EXPIRY_BATCH = 500


@dataclasses.dataclass(frozen=True)
class SettleRequest:
    admission_id: uuid.UUID
    cost: int | None  # None: the usage's own, or its price table cost
    tokens: int | None
    usage: UsageRecord | None
    digest: str


def _not_active(conn: Connection, admission_id: uuid.UUID) -> tuple[str, ...] | None:
    row = conn.execute(
        sa.select(A.c.status, A.c.settle_digest).where(A.c.id == admission_id)
    ).first()
    if row is None:
        raise NotFoundError(f"no admission with id {admission_id}")
    return tuple(row)


def _actual_cost(conn: Connection, request: SettleRequest) -> tuple[int, UsageRecord | None]:
    """The cost to charge, and the usage row to write (holding the cost charged when the
    caller gave one and the usage did not)."""
    usage = request.usage
    if request.cost is not None:
        if usage is not None and usage.cost is None:
            usage = usage.model_copy(update={"cost": request.cost})
        return request.cost, usage
    assert usage is not None  # checked by admissions.settle
    if usage.cost is not None:
        return usage.cost, usage
    [cost], [source] = costs_for(conn, [usage])
    if source != "price_table":
        raise NotFoundError(
            f"no price for {usage.provider}/{usage.model} at {usage.created_at.isoformat()}: "
            "settle needs a cost, the usage's cost, or a price (store.prices.set)"
        )
    return cost, usage


def settle(conn: Connection, request: SettleRequest, now: dt.datetime) -> Settlement:
    """Charge the admission's actual cost to its budgets and key, once."""
    admission_id = request.admission_id
    actual, usage = _actual_cost(conn, request)
    row = SETTLING.first_any(
        conn,
        {
            "p_admission_id": admission_id,
            "p_now": now,
            "p_cost": actual,
            "p_tokens": request.tokens,
            "p_digest": request.digest,
        },
    )
    if row is None:
        status, digest = _not_active(conn, request.admission_id) or ("", "")
        if status == "settled" and digest == request.digest:
            return settlement(conn, request.admission_id)
        if status == "settled":
            raise ConflictError(
                f"admission {request.admission_id} was settled already, with other arguments"
            )
        raise ConflictError(f"admission {request.admission_id} is {status}, not active")
    api_key_id, reservation_id, estimate = row
    if request.tokens is not None:
        _correct_tokens(conn, admission_id, request.tokens - estimate)
    crossed = []
    held = HELD.all_any(conn, {"p_admission_id": admission_id})
    for period_start, hold, *budget_row in held:
        record = budget(tuple(budget_row))
        level = SPEND_IN_PERIOD.first_any(
            conn,
            {
                "p_budget_id": record.id,
                "p_period_start": period_start,
                "p_cost": actual,
                "p_hold": hold,
            },
        )
        if level is None:  # the whole unit is undone: nothing of the settlement is written
            raise ValidationError(f"a cost of {actual} would overflow budget {record.id}'s spend")
        after = level[0] + level[1]
        before = after - actual + hold
        crossed += record_crossings(
            conn, record, period_start, before, after, admission_id, now, at_settle=True
        )
    if held:
        BUDGETS_SETTLED.first_any(conn, {"p_admission_id": admission_id, "p_cost": actual})
    charged = shortfall = 0
    if reservation_id is not None:
        entry = settle_hold(conn, reservation_id, actual, now)
        charged, shortfall = -entry.amount, entry.shortfall
    elif api_key_id is not None and actual > 0:
        entry = settle_unheld(conn, api_key_id, actual, now)
        charged, shortfall = -entry.amount, entry.shortfall
    usage_id = None
    if usage is not None:
        usage_id = insert_records(conn, [usage]).ids[0]
    SETTLED.first_any(
        conn,
        {
            "p_admission_id": admission_id,
            "p_charged": charged,
            "p_shortfall": shortfall,
            "p_usage_id": usage_id,
        },
    )
    return Settlement(
        admission_id=admission_id,
        cost=actual,
        tokens=estimate if request.tokens is None else request.tokens,
        charged=charged,
        shortfall=shortfall,
        usage_id=usage_id,
        settled_at=now,
        crossed=tuple(crossed),
    )


def settlement(conn: Connection, admission_id: uuid.UUID) -> Settlement:
    """A settled admission's settlement, as it was first returned."""
    row = conn.execute(
        sa.select(
            A.c.settled_cost,
            A.c.settled_tokens,
            A.c.tokens,
            A.c.charged,
            A.c.shortfall,
            A.c.usage_id,
            A.c.finished_at,
        ).where(A.c.id == admission_id)
    ).one()
    return Settlement(
        admission_id=admission_id,
        cost=row.settled_cost,
        tokens=row.tokens if row.settled_tokens is None else row.settled_tokens,
        charged=row.charged,
        shortfall=row.shortfall,
        usage_id=row.usage_id,
        settled_at=row.finished_at,
        crossed=crossings_of(conn, admission_id, at_settle=True),
    )


def _correct_tokens(conn: Connection, admission_id: uuid.UUID, delta: int) -> None:
    """Replace the admission's token estimate by ``estimate + delta`` in its windows."""
    if delta == 0:
        return
    counted = WINDOWS_COUNTED.all_any(conn, {"p_admission_id": admission_id})
    for rate_limit_id, window_start in counted:  # in id order, as admissions lock them
        # Never below zero (a window swept and made again by a later request starts at 0),
        # never past 2**63 - 1.
        CORRECT_WINDOW.first_any(
            conn,
            {"p_rate_limit_id": rate_limit_id, "p_window_start": window_start, "p_delta": delta},
        )
    if counted:
        CORRECT_COUNTED.first_any(conn, {"p_admission_id": admission_id, "p_delta": delta})


def release(conn: Connection, admission_id: uuid.UUID, now: dt.datetime) -> Admission:
    """Free the admission's holds and its token estimate without charging anything; the
    request stays counted in its windows."""
    row = conn.execute(
        A.update()
        .where(A.c.id == admission_id, A.c.status == "active")
        .values(status="released", finished_at=now)
        .returning(A.c.tokens)
    ).first()
    if row is None:
        status = (_not_active(conn, admission_id) or ("",))[0]
        raise ConflictError(f"admission {admission_id} is {status}, not active")
    _correct_tokens(conn, admission_id, -row.tokens)
    _finish(conn, [admission_id], "released", now)
    return _loaded(conn, admission_id)


def extend(
    conn: Connection, admission_id: uuid.UUID, ttl: dt.timedelta, now: dt.datetime
) -> Admission:
    """Give an active admission (and its hold on the key) ``ttl`` more from now."""
    row = conn.execute(
        A.update()
        .where(A.c.id == admission_id, A.c.status == "active")
        .values(expires_at=now + ttl)
        .returning(A.c.reservation_id)
    ).first()
    if row is None:
        status = (_not_active(conn, admission_id) or ("",))[0]
        raise ConflictError(f"admission {admission_id} is {status}, not active")
    if row.reservation_id is not None:
        extend_hold(conn, row.reservation_id, now + ttl)
    return _loaded(conn, admission_id)


def _loaded(conn: Connection, admission_id: uuid.UUID) -> Admission:
    row = conn.execute(sa.select(*ADMISSION_COLUMNS).where(A.c.id == admission_id)).one()
    return load(conn, tuple(row))


def _finish(
    conn: Connection, admission_ids: Sequence[uuid.UUID], status: str, now: dt.datetime
) -> None:
    """Free the budget holds and key holds of admissions just moved to ``status``."""
    sums = conn.execute(
        sa.select(AB.c.budget_id, AB.c.period_start, sa.func.sum(AB.c.amount).label("amount"))
        .where(AB.c.admission_id.in_(list(admission_ids)))
        .group_by(AB.c.budget_id, AB.c.period_start)
        .order_by(AB.c.budget_id, AB.c.period_start)
    ).all()
    for held in sums:
        conn.execute(
            BP.update()
            .where(BP.c.budget_id == held.budget_id, BP.c.period_start == held.period_start)
            .values(reserved=BP.c.reserved - held.amount)
        )
    reservations = conn.execute(
        sa.select(A.c.reservation_id).where(
            A.c.id.in_(list(admission_ids)), A.c.reservation_id.is_not(None)
        )
    ).scalars()
    finish_holds(conn, list(reservations), status, now)


def expire_due(
    conn: Connection,
    now: dt.datetime,
    *,
    budget_id: uuid.UUID | None = None,
    period_start: dt.datetime | None = None,
) -> int:
    """Expire one batch of active admissions past their time (optionally only those
    holding part of one budget period); how many."""
    due = (
        sa.select(A.c.id)
        .where(A.c.status == "active", A.c.expires_at <= now)
        .order_by(A.c.id)
        .limit(EXPIRY_BATCH)
        # SKIP LOCKED (Postgres): replicas sweeping at once take different rows.
        .with_for_update(skip_locked=True)
    )
    if budget_id is not None:
        due = due.where(
            A.c.id.in_(
                sa.select(AB.c.admission_id).where(
                    AB.c.budget_id == budget_id, AB.c.period_start == period_start
                )
            )
        )
    ids = list(conn.execute(due).scalars())
    if not ids:
        return 0
    expired = list(
        conn.execute(
            A.update()
            .where(A.c.id.in_(ids), A.c.status == "active")
            .values(status="expired", finished_at=now)
            .returning(A.c.id)
        ).scalars()
    )
    if expired:
        _finish(conn, expired, "expired", now)
    return len(expired)
