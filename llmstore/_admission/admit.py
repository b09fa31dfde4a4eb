"""The per-request decision as one unit: every limit checked and counted, or nothing.

In one transaction (one thread hop under ``BEGIN IMMEDIATE`` on SQLite):

1. the caller is identified: an API key (its rejections) or a token (one request of its
   quota spent, its rejections);
2. every rate limit and budget of the key, the token, their project, the end user and
   the tags is found;
3. each rate limit's current window counts one more request and the token estimate, if
   it has room (one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` per window);
4. each budget's current period holds the cost, if it has room (the same, per period);
5. the key holds the cost (a reservation of ``api_keys``);
6. the admission and its holds are written, and the soft limits it made a period reach
   are recorded, once each.

A refusal raises and the transaction is rolled back whole: nothing is held or counted.
Rows are locked in one order everywhere (the token; windows, then budget periods, each
in id order; then the key's holds and the key), so admissions over overlapping limits
from many replicas queue instead of deadlocking.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from collections.abc import Sequence
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._access import Token, find_token, use_token
from llmstore._billing import ApiKey, check_usable, find_key, place_hold
from llmstore._core.errors import (
    ApiKeyRejectedError,
    BudgetExceededError,
    IdempotencyConflictError,
    NotFoundError,
    RateLimitedError,
    ValidationError,
)
from llmstore._core.ids import new_id
from llmstore._db.admission_schema import (
    admission_budgets,
    admission_windows,
    budget_crossings,
    budget_periods,
    rate_windows,
)
from llmstore._db.dialects import insert_ignoring_conflicts

from .budgets import period_of, remaining
from .periods import rate_window
from .records import (
    ADMISSION_COLUMNS,
    Admission,
    B,
    Budget,
    BudgetCrossing,
    BudgetRemaining,
    RateLimit,
    admission,
    budget,
    rate_limit,
)
from .statements import (
    BY_IDEMPOTENCY_KEY,
    COUNT_REQUEST,
    HOLD_IN_PERIOD,
    INSERT_ADMISSION,
    INSERT_BUDGET_HOLD,
    INSERT_WINDOW_COUNT,
    LAPSED,
    PERIOD,
    limits_of,
)

AB = admission_budgets
AW = admission_windows
BC = budget_crossings
BP = budget_periods
RW = rate_windows


@dataclasses.dataclass(frozen=True)
class AdmitRequest:
    """An admission's checked arguments (a secret only as its digest)."""

    secret_kind: Literal["key", "token"] | None
    secret_digest: str | None
    api_key_id: uuid.UUID | None
    token_id: uuid.UUID | None
    project_id: uuid.UUID | None
    end_user: str | None
    tags: tuple[str, ...]
    cost: int
    tokens: int
    ttl: dt.timedelta
    idempotency_key: str | None
    params_digest: str | None


class LapsedHolds(Exception):
    """Internal: admissions past their expiry hold a budget's room; sweep and try again."""

    def __init__(self, budget_id: uuid.UUID, period_start: dt.datetime) -> None:
        super().__init__(f"lapsed holds on budget {budget_id}")
        self.budget_id = budget_id
        self.period_start = period_start


def seconds_until(end: dt.datetime, now: dt.datetime) -> int:
    """Whole seconds from ``now`` to ``end``, at least 1 (a ``Retry-After`` value)."""
    return max(math.ceil((end - now).total_seconds()), 1)


def admit(conn: Connection, request: AdmitRequest, now: dt.datetime) -> Admission:
    """The whole decision on ``conn``, inside a write unit; raises on any refusal."""
    if request.idempotency_key is not None:
        replayed = replay(conn, request.idempotency_key, request.params_digest, now)
        if replayed is not None:
            return replayed
    key, token = _identify(conn, request, now)
    project_id = _project_of(request, key, token)
    key_id = None if key is None else key.id
    token_id = None if token is None else token.id
    scopes: dict[str, object] = {
        "project_id": project_id,
        "api_key_id": key_id,
        "token_id": token_id,
        "end_user": request.end_user,
        **{f"tag_{i}": tag for i, tag in enumerate(request.tags)},
    }
    tags = len(request.tags)
    limits = [rate_limit(row) for row in limits_of("rate", tags).all_any(conn, scopes)]
    budgets = [budget(row) for row in limits_of("budget", tags).all_any(conn, scopes)]
    windows = [_count(conn, limit, request.tokens, now) for limit in limits]
    held = [_hold(conn, record, request.cost, now) for record in budgets]
    expires_at = now + request.ttl
    reservation_id = None
    if key is not None and request.cost > 0:
        reservation_id = place_hold(conn, key.id, request.cost, now=now, expires_at=expires_at).id
        key = find_key(conn, key_id=key.id)  # as the hold left it
    admission_id = new_id()
    row = INSERT_ADMISSION.first_any(
        conn,
        {
            "id": admission_id,
            "api_key_id": key_id,
            "token_id": token_id,
            "project_id": project_id,
            "end_user": request.end_user,
            "tags": list(request.tags) or None,
            "reservation_id": reservation_id,
            "cost": request.cost,
            "tokens": request.tokens,
            "status": "active",
            "idempotency_key": request.idempotency_key,
            "params_digest": request.params_digest,
            "created_at": now,
            "expires_at": expires_at,
            "finished_at": None,
            "settled_cost": None,
            "settled_tokens": None,
            "charged": None,
            "shortfall": None,
            "settle_digest": None,
            "usage_id": None,
        },
    )
    assert row is not None
    for record, (start, _, _) in zip(budgets, held, strict=True):
        INSERT_BUDGET_HOLD.first_any(
            conn,
            {
                "admission_id": admission_id,
                "budget_id": record.id,
                "period_start": start,
                "amount": request.cost,
                "settled_amount": None,
            },
        )
    for limit, start in zip(limits, windows, strict=True):
        INSERT_WINDOW_COUNT.first_any(
            conn,
            {
                "admission_id": admission_id,
                "rate_limit_id": limit.id,
                "window_start": start,
                "tokens": request.tokens,
            },
        )
    crossed: list[BudgetCrossing] = []
    for record, (start, before, after) in zip(budgets, held, strict=True):
        crossed += record_crossings(
            conn, record, start, before, after, admission_id, now, at_settle=False
        )
    return admission(
        row,
        api_key=key,
        token=token,
        budgets=tuple(
            BudgetRemaining(
                budget_id=record.id,
                period_start=start,
                remaining=max(record.limit - after, 0),
            )
            for record, (start, _, after) in zip(budgets, held, strict=True)
        ),
        crossed=tuple(crossed),
    )


def _identify(
    conn: Connection, request: AdmitRequest, now: dt.datetime
) -> tuple[ApiKey | None, Token | None]:
    key = token = None
    if request.secret_kind == "key" or request.api_key_id is not None:
        key = find_key(conn, digest=request.secret_digest, key_id=request.api_key_id)
        if key is None:
            if request.secret_kind == "key":
                raise ApiKeyRejectedError("unknown")
            raise NotFoundError(f"no API key with id {request.api_key_id}")
        check_usable(key, now)
    if request.secret_kind == "token":
        token = use_token(conn, request.secret_digest, now)
    elif request.token_id is not None:
        token = use_token(conn, None, now, token_id=request.token_id)
    return key, token


def _project_of(request: AdmitRequest, key: ApiKey | None, token: Token | None) -> uuid.UUID | None:
    own = key.project_id if key is not None else token.project_id if token is not None else None
    if request.project_id is not None and own is not None and own != request.project_id:
        raise ValidationError(f"project_id {request.project_id} is not the caller's project")
    return own if own is not None else request.project_id


def _count(conn: Connection, limit: RateLimit, tokens: int, now: dt.datetime) -> dt.datetime:
    """Count one request and ``tokens`` in the limit's current window, or refuse."""
    start, end = rate_window(limit.per, now)
    if limit.tokens is not None and tokens > limit.tokens:  # more than any window can take
        raise RateLimitedError(limit.id, seconds_until(end, now))
    row = COUNT_REQUEST.first_any(
        conn,
        {
            "rate_limit_id": limit.id,
            "window_start": start,
            "tokens": tokens,
            "max_requests": limit.requests,
            "max_tokens": limit.tokens,
        },
    )
    if row is None:
        raise RateLimitedError(limit.id, seconds_until(end, now))
    return start


def _hold(
    conn: Connection, record: Budget, cost: int, now: dt.datetime
) -> tuple[dt.datetime, int, int]:
    """Hold ``cost`` in the budget's current period, or refuse; (start, level before,
    level after), a level being ``spent + reserved``."""
    start, end = period_of(record, now)
    period = {"budget_id": record.id, "period_start": start}
    row = None
    if cost <= record.limit:
        row = HOLD_IN_PERIOD.first_any(
            conn, {**period, "period_end": end, "cost": cost, "limit": record.limit}
        )
    if row is not None:
        after = row[0] + row[1]
        return start, after - cost, after
    if LAPSED.first_any(conn, {**period, "now": now}) is not None:
        # Admissions past their expiry hold part of this period.
        raise LapsedHolds(record.id, start)
    stored = PERIOD.first_any(conn, period)
    spent, reserved = stored if stored is not None else (0, 0)
    raise BudgetExceededError(
        record.id,
        remaining(record.limit, spent, reserved),
        end,
        None if end is None else seconds_until(end, now),
    )


def record_crossings(
    conn: Connection,
    record: Budget,
    start: dt.datetime,
    before: int,
    after: int,
    admission_id: uuid.UUID,
    now: dt.datetime,
    *,
    at_settle: bool,
) -> list[BudgetCrossing]:
    """The thresholds the period's level passed from ``before`` to ``after`` that no other
    request has reported yet: each is recorded once per budget and period."""
    crossed = []
    for threshold in (*record.soft_limits, record.limit):
        if not before < threshold <= after:
            continue
        inserted = insert_ignoring_conflicts(
            conn,
            BC,
            {
                "budget_id": record.id,
                "period_start": start,
                "threshold": threshold,
                "admission_id": admission_id,
                "at_settle": at_settle,
                "crossed_at": now,
            },
            [BC.c.budget_id, BC.c.period_start, BC.c.threshold],
        )
        if inserted:
            crossed.append(
                BudgetCrossing(
                    budget_id=record.id,
                    period_start=start,
                    threshold=threshold,
                    hard=threshold == record.limit,
                )
            )
    return crossed


def crossings_of(
    conn: Connection, admission_id: uuid.UUID, *, at_settle: bool
) -> tuple[BudgetCrossing, ...]:
    """What an admission (or its settlement) reported crossing, as it reported it."""
    rows = conn.execute(
        sa.select(BC.c.budget_id, BC.c.period_start, BC.c.threshold, B.c.limit_amount)
        .join(B, B.c.id == BC.c.budget_id)
        .where(BC.c.admission_id == admission_id, BC.c.at_settle == at_settle)
        .order_by(BC.c.budget_id, BC.c.threshold)
    ).all()
    return tuple(
        BudgetCrossing(
            budget_id=row.budget_id,
            period_start=row.period_start,
            threshold=row.threshold,
            hard=row.threshold == row.limit_amount,
        )
        for row in rows
    )


def replay(
    conn: Connection, idempotency_key: str, digest: str | None, now: dt.datetime
) -> Admission | None:
    """The admission an earlier call with this idempotency key made, if any."""
    row = BY_IDEMPOTENCY_KEY.first_any(conn, {"idempotency_key": idempotency_key})
    if row is None:
        return None
    if row[-1] != digest:
        raise IdempotencyConflictError(
            f"idempotency key {idempotency_key!r} was already used with other parameters"
        )
    return load(conn, row[: len(ADMISSION_COLUMNS)])


def load(conn: Connection, row: Sequence[object]) -> Admission:
    """An admission with its key or token and its budgets' current room."""
    found = admission(tuple(row))
    key = None if found.api_key_id is None else find_key(conn, key_id=found.api_key_id)
    token = None if found.token_id is None else find_token(conn, found.token_id)
    rooms = conn.execute(
        sa.select(AB.c.budget_id, AB.c.period_start, B.c.limit_amount, BP.c.spent, BP.c.reserved)
        .join(B, B.c.id == AB.c.budget_id)
        .outerjoin(
            BP, sa.and_(BP.c.budget_id == AB.c.budget_id, BP.c.period_start == AB.c.period_start)
        )
        .where(AB.c.admission_id == found.id)
        .order_by(AB.c.budget_id)
    ).all()
    return found.model_copy(
        update={
            "api_key": key,
            "token": token,
            "budgets": tuple(
                BudgetRemaining(
                    budget_id=room.budget_id,
                    period_start=room.period_start,
                    remaining=remaining(room.limit_amount, room.spent or 0, room.reserved or 0),
                )
                for room in rooms
            ),
            "crossed": crossings_of(conn, found.id, at_settle=False),
        }
    )
