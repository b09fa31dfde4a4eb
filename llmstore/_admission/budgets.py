"""Budgets: a spending limit per period (calendar, fixed or lifetime) for one scope.

A period's row (``llmstore_budget_periods``) is made by the first admission in it and
holds what is ``spent`` (settled) and ``reserved`` (admitted, not yet settled); the
admissions move both (``admissions.py``). Here: the budgets themselves, their status,
their history and a check that the counters agree with the admissions.
"""

from __future__ import annotations

import builtins
import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ValidationError
from llmstore._core.ids import new_id
from llmstore._core.unset import UNSET, Unset
from llmstore._core.validate import check_id, check_limit, check_text
from llmstore._db.admission_schema import admission_budgets, admissions, budget_periods
from llmstore._db.operations import Repository, reads, writes
from llmstore._db.queries import found, id_page

from .limits import check_referenced, scope_filters
from .periods import budget_period, check_timezone, previous_period
from .records import (
    BUDGET_COLUMNS,
    B,
    Budget,
    BudgetMismatch,
    BudgetPeriodSpend,
    BudgetReport,
    BudgetStatus,
    budget,
    check_limit_amount,
    check_period,
    check_scope,
    check_soft_limits,
)

BP = budget_periods
AB = admission_budgets
_SELECT = sa.select(*BUDGET_COLUMNS)
NAME_MAX = 200


def period_of(record: Budget, at: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """The budget's period containing ``at``: its start and its end (None: never)."""
    if isinstance(record.period, dt.timedelta):
        return budget_period(
            "fixed", int(record.period.total_seconds()), record.timezone, record.anchor_at, at
        )
    return budget_period(record.period, None, record.timezone, record.anchor_at, at)


def remaining(limit: int, spent: int, reserved: int) -> int:
    return max(limit - spent - reserved, 0)


def _optional_name(value: object) -> str | None:
    return None if value is None else check_text(value, "budget name", max_length=NAME_MAX)


class Budgets(Repository):
    """``store.budgets`` and ``tx.budgets``: each call is one unit of work."""

    @writes()
    def create(
        self,
        conn: Connection,
        limit: int,
        *,
        project_id: uuid.UUID | str | None = None,
        api_key_id: uuid.UUID | str | None = None,
        token_id: uuid.UUID | str | None = None,
        end_user: str | None = None,
        tag: str | None = None,
        period: str | dt.timedelta | None = None,
        timezone: str = "UTC",
        soft_limits: tuple[int, ...] | builtins.list[int] = (),
        name: str | None = None,
    ) -> Budget:
        """A budget of ``limit`` (positive, in the units of costs) per ``period`` for exactly
        one scope: a project, an API key, a token, an end user or a tag.

        ``period``: None (lifetime), ``"day"``, ``"week"`` (ISO, from Monday), ``"month"``,
        ``"year"`` (each from midnight in ``timezone``, an IANA name), or a ``timedelta``
        (fixed windows from now). ``soft_limits``: amounts below ``limit`` whose crossing
        an admission or a settlement reports once per period.
        """
        scope = check_scope(
            project_id=project_id,
            api_key_id=api_key_id,
            token_id=token_id,
            end_user=end_user,
            tag=tag,
        )
        amount = check_limit_amount(limit)
        kind, seconds = check_period(period)
        zone_name = check_timezone(timezone)
        soft = check_soft_limits(soft_limits, amount)
        label = _optional_name(name)
        check_referenced(conn, scope)
        now = self.now()
        values: dict[str, Any] = {
            "id": new_id(),
            "name": label,
            **scope,
            "limit_amount": amount,
            "period": kind,
            "period_seconds": seconds,
            "timezone": zone_name,
            "soft_limits": list(soft),
            "anchor_at": now,
            "created_at": now,
            "updated_at": now,
        }
        row = conn.execute(B.insert().returning(*BUDGET_COLUMNS), values).one()
        return budget(tuple(row))

    @reads()
    def get(self, conn: Connection, budget_id: uuid.UUID | str) -> Budget:
        """The budget with this id; NotFoundError if there is none."""
        key = check_id(budget_id, "budget id")
        return budget(tuple(found(conn, _SELECT.where(B.c.id == key), "budget", key)))

    @reads()
    def list(
        self,
        conn: Connection,
        *,
        project_id: uuid.UUID | str | None = None,
        api_key_id: uuid.UUID | str | None = None,
        token_id: uuid.UUID | str | None = None,
        end_user: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[Budget]:
        """Budgets in creation order, optionally of one scope; ``after``: a page's last id."""
        equal = scope_filters(
            B,
            project_id=project_id,
            api_key_id=api_key_id,
            token_id=token_id,
            end_user=end_user,
            tag=tag,
        )
        statement = id_page(_SELECT, B.c.id, limit=limit, after=after, equal=equal)
        return [budget(tuple(row)) for row in conn.execute(statement)]

    @writes()
    def update(
        self,
        conn: Connection,
        budget_id: uuid.UUID | str,
        *,
        limit: int | Unset = UNSET,
        soft_limits: tuple[int, ...] | builtins.list[int] | Unset = UNSET,
        name: str | Unset | None = UNSET,
    ) -> Budget:
        """Change the limit, the soft limits or the name; the current period keeps what it
        has spent and holds (a lower limit refuses admissions until there is room)."""
        key = check_id(budget_id, "budget id")
        if limit is UNSET and soft_limits is UNSET and name is UNSET:
            raise ValidationError("update() needs at least one of limit=, soft_limits=, name=")
        current = budget(
            tuple(found(conn, _SELECT.where(B.c.id == key).with_for_update(), "budget", key))
        )
        changes: dict[str, Any] = {"updated_at": self.now()}
        amount = current.limit if limit is UNSET else check_limit_amount(limit)
        changes["limit_amount"] = amount
        soft = current.soft_limits if soft_limits is UNSET else soft_limits
        changes["soft_limits"] = list(check_soft_limits(soft, amount))
        if name is not UNSET:
            changes["name"] = _optional_name(name)
        row = conn.execute(
            B.update().where(B.c.id == key).values(**changes).returning(*BUDGET_COLUMNS)
        ).one()
        return budget(tuple(row))

    @writes(single=True)
    def delete(self, conn: Connection, budget_id: uuid.UUID | str) -> None:
        """Delete the budget, its periods and its holds (admissions in flight go on
        without it)."""
        key = check_id(budget_id, "budget id")
        found(conn, B.delete().where(B.c.id == key).returning(B.c.id), "budget", key)

    @reads(single=False, snapshot=True)
    def status(self, conn: Connection, budget_id: uuid.UUID | str) -> BudgetStatus:
        """The current period: spent, reserved, remaining, when it started and resets."""
        key = check_id(budget_id, "budget id")
        record = budget(tuple(found(conn, _SELECT.where(B.c.id == key), "budget", key)))
        start, end = period_of(record, self.now())
        row = conn.execute(
            sa.select(BP.c.spent, BP.c.reserved).where(
                BP.c.budget_id == key, BP.c.period_start == start
            )
        ).first()
        spent, reserved = (row.spent, row.reserved) if row is not None else (0, 0)
        return BudgetStatus(
            budget_id=key,
            limit=record.limit,
            spent=spent,
            reserved=reserved,
            remaining=remaining(record.limit, spent, reserved),
            period_start=start,
            resets_at=end,
        )

    @reads(single=False, snapshot=True)
    def history(
        self, conn: Connection, budget_id: uuid.UUID | str, limit: int = 12
    ) -> builtins.list[BudgetPeriodSpend]:
        """Spend per period, the current one first and then back in time: ``limit``
        periods at most, none before the budget's first; a period without requests is 0."""
        key = check_id(budget_id, "budget id")
        count = check_limit(limit)
        record = budget(tuple(found(conn, _SELECT.where(B.c.id == key), "budget", key)))
        starts: builtins.list[tuple[dt.datetime, dt.datetime | None]] = []
        start: dt.datetime | None
        start, end = period_of(record, self.now())
        seconds = None
        if isinstance(record.period, dt.timedelta):
            kind: str | None = "fixed"
            seconds = int(record.period.total_seconds())
        else:
            kind = record.period
        while start is not None and len(starts) < count:
            starts.append((start, end))
            end = start
            start = previous_period(kind, seconds, record.timezone, record.anchor_at, start)
        rows = conn.execute(
            sa.select(BP.c.period_start, BP.c.spent, BP.c.reserved).where(
                BP.c.budget_id == key, BP.c.period_start >= starts[-1][0]
            )
        ).all()
        stored = {row.period_start: (row.spent, row.reserved) for row in rows}
        return [
            BudgetPeriodSpend(
                period_start=begin,
                period_end=finish,
                spent=stored.get(begin, (0, 0))[0],
                reserved=stored.get(begin, (0, 0))[1],
            )
            for begin, finish in starts
        ]

    @reads(single=False, snapshot=True)
    def verify(self, conn: Connection) -> BudgetReport:
        """Recompute every budget period from the admissions: ``spent`` is what the settled
        ones were charged, ``reserved`` what the active ones hold. One snapshot."""
        A = admissions
        sums = (
            sa.select(
                AB.c.budget_id,
                AB.c.period_start,
                sa.func.sum(sa.case((A.c.status == "settled", AB.c.settled_amount), else_=0)).label(
                    "spent"
                ),
                sa.func.sum(sa.case((A.c.status == "active", AB.c.amount), else_=0)).label(
                    "reserved"
                ),
            )
            .join(A, A.c.id == AB.c.admission_id)
            .group_by(AB.c.budget_id, AB.c.period_start)
            .subquery()
        )
        rows = conn.execute(
            sa.select(
                BP.c.budget_id,
                BP.c.period_start,
                BP.c.spent,
                BP.c.reserved,
                sums.c.spent.label("expected_spent"),
                sums.c.reserved.label("expected_reserved"),
            )
            .outerjoin(
                sums,
                sa.and_(
                    sums.c.budget_id == BP.c.budget_id, sums.c.period_start == BP.c.period_start
                ),
            )
            .order_by(BP.c.budget_id, BP.c.period_start)
        ).all()
        mismatches = [
            BudgetMismatch(
                budget_id=row.budget_id,
                period_start=row.period_start,
                field=field,
                stored=stored,
                expected=int(expected or 0),
            )
            for row in rows
            for field, stored, expected in (
                ("spent", row.spent, row.expected_spent),
                ("reserved", row.reserved, row.expected_reserved),
            )
            if stored != int(expected or 0)
        ]
        return BudgetReport(ok=not mismatches, periods_checked=len(rows), mismatches=mismatches)
