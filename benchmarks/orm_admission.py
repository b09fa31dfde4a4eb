"""The ORM way's admit and settle, written as an application would: one ``AsyncSession``
per unit, each row read (the limits' windows and periods, the key, the hold ``with
FOR UPDATE`` on Postgres), checked in Python, changed and written back on commit.

Unlike llmstore's conditional ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``, the read of a
window or period that does not exist yet locks nothing: two first requests of a window
at once would both insert it, and one would fail. The benchmark is sequential, so that does
not show here."""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .admission_sql import AdmissionRefused, crossed, settle_digest, window_start
from .common import new_id, secret_digest, utcnow
from .ops_billing import HOLD_TTL
from .orm_models import (
    OrmAdmission,
    OrmAdmissionBudget,
    OrmAdmissionWindow,
    OrmApiKey,
    OrmBudget,
    OrmBudgetCrossing,
    OrmBudgetPeriod,
    OrmLedgerEntry,
    OrmRateLimit,
    OrmRateWindow,
    OrmReservation,
    OrmScoped,
)


def aware(value: dt.datetime) -> dt.datetime:
    """SQLite gives timestamps back naive (UTC): marked UTC, to compare with ``now``."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def of_key(model: type[OrmScoped], key: OrmApiKey) -> sa.ColumnElement[bool]:
    """The limits of the key's scopes: the key's own and its project's."""
    conditions = [model.api_key_id == key.id]
    if key.project_id is not None:
        conditions.append(model.project_id == key.project_id)
    return sa.or_(*conditions)


async def record_crossings(
    session: AsyncSession,
    budget: OrmBudget,
    start: dt.datetime,
    before: int,
    after: int,
    admission_id: uuid.UUID,
    now: dt.datetime,
    *,
    at_settle: bool,
) -> list[int]:
    """Add a crossing for each threshold passed that no request has reported yet."""
    reported = []
    for threshold in crossed(list(budget.soft_limits), budget.limit_amount, before, after):
        if await session.get(OrmBudgetCrossing, (budget.id, start, threshold)) is None:
            session.add(
                OrmBudgetCrossing(
                    budget_id=budget.id,
                    period_start=start,
                    threshold=threshold,
                    admission_id=admission_id,
                    at_settle=at_settle,
                    crossed_at=now,
                )
            )
            reported.append(threshold)
    return reported


async def orm_admit(
    sessions: async_sessionmaker[AsyncSession], secret: str, cost: int, tokens: int
) -> uuid.UUID:
    """Admit a request of the key with this secret; the admission's id."""
    digest = secret_digest(secret)
    async with sessions() as session:
        key = await session.scalar(
            sa.select(OrmApiKey).where(OrmApiKey.secret_digest == digest).with_for_update()
        )
        now = utcnow()
        if key is None:
            raise AdmissionRefused("unknown key")
        if not key.is_active or (key.expires_at is not None and aware(key.expires_at) <= now):
            raise AdmissionRefused("inactive or expired key")
        limits = await session.scalars(
            sa.select(OrmRateLimit).where(of_key(OrmRateLimit, key)).order_by(OrmRateLimit.id)
        )
        budgets = await session.scalars(
            sa.select(OrmBudget).where(of_key(OrmBudget, key)).order_by(OrmBudget.id)
        )
        counted: list[tuple[uuid.UUID, dt.datetime]] = []
        for limit in limits.all():
            start = window_start(limit.per, now)
            window = await session.get(OrmRateWindow, (limit.id, start), with_for_update=True)
            if window is None:
                window = OrmRateWindow(
                    rate_limit_id=limit.id, window_start=start, requests=0, tokens=0
                )
                session.add(window)
            if limit.max_requests is not None and window.requests >= limit.max_requests:
                raise AdmissionRefused("rate limited")
            if limit.max_tokens is not None and window.tokens + tokens > limit.max_tokens:
                raise AdmissionRefused("rate limited")
            window.requests += 1
            window.tokens += tokens
            counted.append((limit.id, start))
        held: list[tuple[OrmBudget, dt.datetime, int]] = []
        for budget in budgets.all():
            if budget.period is not None:
                raise NotImplementedError("only lifetime budgets: their period starts at anchor_at")
            start = budget.anchor_at
            period = await session.get(OrmBudgetPeriod, (budget.id, start), with_for_update=True)
            if period is None:
                period = OrmBudgetPeriod(
                    budget_id=budget.id, period_start=start, spent=0, reserved=0
                )
                session.add(period)
            level = period.spent + period.reserved
            if level + cost > budget.limit_amount or level >= budget.limit_amount:
                raise AdmissionRefused("budget exceeded")
            period.reserved += cost
            held.append((budget, start, level))
        reservation_id = None
        if cost > 0:
            if key.balance - key.reserved < cost:
                raise AdmissionRefused("insufficient balance")
            key.reserved += cost
            key.last_used_at = now
            reservation = OrmReservation(
                id=new_id(),
                api_key_id=key.id,
                amount=cost,
                status="active",
                created_at=now,
                expires_at=now + HOLD_TTL,
            )
            session.add(reservation)
            reservation_id = reservation.id
        admission = OrmAdmission(
            id=new_id(),
            api_key_id=key.id,
            project_id=key.project_id,
            reservation_id=reservation_id,
            cost=cost,
            tokens=tokens,
            status="active",
            created_at=now,
            expires_at=now + HOLD_TTL,
        )
        session.add(admission)
        session.add_all(
            OrmAdmissionBudget(
                admission_id=admission.id, budget_id=budget.id, period_start=start, amount=cost
            )
            for budget, start, _ in held
        )
        session.add_all(
            OrmAdmissionWindow(
                admission_id=admission.id, rate_limit_id=limit_id, window_start=start, tokens=tokens
            )
            for limit_id, start in counted
        )
        for budget, start, level in held:
            await record_crossings(
                session, budget, start, level, level + cost, admission.id, now, at_settle=False
            )
        await session.commit()
    return admission.id


async def orm_settle(
    sessions: async_sessionmaker[AsyncSession], admission_id: uuid.UUID, cost: int, tokens: int
) -> OrmAdmission:
    """Settle the admission at ``cost`` and ``tokens``: its windows, budgets and key."""
    async with sessions() as session:
        admission = await session.get(OrmAdmission, admission_id, with_for_update=True)
        if admission is None or admission.status != "active":
            raise AdmissionRefused("the admission is not active")
        now = utcnow()
        admission.status = "settled"
        admission.finished_at = now
        admission.settled_cost = cost
        admission.settled_tokens = tokens
        admission.settle_digest = settle_digest(cost, tokens)
        delta = tokens - admission.tokens
        if delta != 0:
            counted = await session.scalars(
                sa.select(OrmAdmissionWindow)
                .where(OrmAdmissionWindow.admission_id == admission_id)
                .order_by(OrmAdmissionWindow.rate_limit_id)
            )
            for counted_window in counted.all():
                window = await session.get(
                    OrmRateWindow,
                    (counted_window.rate_limit_id, counted_window.window_start),
                    with_for_update=True,
                )
                if window is not None:
                    window.tokens = max(window.tokens + delta, 0)
                counted_window.tokens += delta
        held = await session.execute(
            sa.select(OrmAdmissionBudget, OrmBudget)
            .join(OrmBudget, OrmBudget.id == OrmAdmissionBudget.budget_id)
            .where(OrmAdmissionBudget.admission_id == admission_id)
            .order_by(OrmAdmissionBudget.budget_id)
        )
        for hold, budget in held.tuples().all():
            period = await session.get(
                OrmBudgetPeriod, (hold.budget_id, hold.period_start), with_for_update=True
            )
            assert period is not None
            before = period.spent + period.reserved
            period.reserved -= hold.amount
            period.spent += cost
            hold.settled_amount = cost
            await record_crossings(
                session,
                budget,
                hold.period_start,
                before,
                before - hold.amount + cost,
                admission_id,
                now,
                at_settle=True,
            )
        charged = shortfall = 0
        if admission.reservation_id is not None:
            reservation = await session.get(
                OrmReservation, admission.reservation_id, with_for_update=True
            )
            if reservation is None or reservation.status != "active":
                raise NotImplementedError("a hold that expired before its settlement")
            key = await session.get(OrmApiKey, reservation.api_key_id, with_for_update=True)
            assert key is not None
            charged = min(cost, key.balance - key.reserved + reservation.amount)
            key.reserved -= reservation.amount
            key.balance -= charged
            key.total_spent += charged
            key.last_used_at = now
            shortfall = cost - charged
            reservation.status = "settled"
            reservation.finished_at = now
            reservation.settled_amount = charged
            session.add(
                OrmLedgerEntry(
                    api_key_id=key.id,
                    kind="settlement",
                    amount=-charged,
                    balance_after=key.balance,
                    shortfall=shortfall,
                    reservation_id=reservation.id,
                    created_at=now,
                )
            )
        elif admission.api_key_id is not None and cost > 0:
            raise NotImplementedError("a settlement without a hold on the key")
        admission.charged = charged
        admission.shortfall = shortfall
        await session.commit()
    return admission
