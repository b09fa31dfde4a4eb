"""An admission as one statement, for runners that send statements over a network
(``runner.one_statement_writes``: Postgres outside ``store.transaction()``).

The Python form (``admit.py``) sends a dozen statements in a transaction. This form sends
one data-modifying CTE that takes the same locks in the same order (the token; the
windows, then the budget periods, each in id order; the key), decides on the rows as
locked, and writes only if every limit has room: the windows' counts, the periods' and
the key's holds, the token's quota, the admission and its rows, the crossings.

It decides only the plain case, which is nearly every request: each rate limit's current
window and each budget's current period already has its row (the first admission in a
window or a period makes it), every limit has room, the caller is usable, and the
idempotency key (if any) is new. Otherwise it writes nothing and says so; the caller then
runs the Python form, which makes the missing rows, expires lapsed holds in the way, and
raises the exact refusal.

Budget periods are found by the times on their rows (``period_start <= now <
period_end``), so calendar periods are computed in Python only (``periods.py``); rate
windows, aligned to the epoch, are given as parameters, one start per window length.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from llmstore._access import TOKEN_COLUMNS, token_record, token_usable
from llmstore._billing import KEY_COLUMNS, api_key, reservation_values
from llmstore._core.ids import new_id
from llmstore._db.admission_schema import (
    admission_budgets,
    admission_windows,
    budget_crossings,
    budget_periods,
    rate_windows,
)
from llmstore._db.ctes import after_all_of, array_of, as_insert_values, count_of, exists_in
from llmstore._db.lean import LeanStatement, Row
from llmstore._db.schema import UTCDateTime, api_keys, reservations, tokens

from .admit import AdmitRequest
from .crossing_ctes import crossings_made
from .periods import WINDOW, rate_window
from .records import (
    ADMISSION_COLUMNS,
    RL,
    A,
    Admission,
    B,
    BudgetCrossing,
    BudgetRemaining,
    admission,
)
from .statements import add_saturating

AB = admission_budgets
AW = admission_windows
BC = budget_crossings
BP = budget_periods
RW = rate_windows
K = api_keys
T = tokens

_P = sa.bindparam
_UUID = sa.Uuid()
_BIG = sa.BigInteger()
_TIME = UTCDateTime()
_TEXT = sa.String(200)

_NOW = _P("p_now", type_=_TIME)
_COST = _P("p_cost", type_=_BIG)
_TOKENS = _P("p_tokens", type_=_BIG)
_KEY_DIGEST = _P("p_key_digest", type_=sa.String(64))
_KEY_ID = _P("p_key_id", type_=_UUID)
_TOKEN_DIGEST = _P("p_token_digest", type_=sa.String(64))
_TOKEN_ID = _P("p_token_id", type_=_UUID)
_PROJECT_ID = _P("p_project_id", type_=_UUID)
_END_USER = _P("p_end_user", type_=_TEXT)
_TAGS = _P("p_tags", type_=postgresql.ARRAY(_TEXT))
_IDEMPOTENCY_KEY = _P("p_idempotency_key", type_=_TEXT)
_WINDOW_STARTS = {per: _P(f"p_{per}_start", type_=_TIME) for per in WINDOW}

#: How far before ``now`` a current calendar period can have begun (with room for DST
#: and for zones that moved their clocks): no older row of a budget is looked at.
_LONGEST = {"day": 3, "week": 9, "month": 33, "year": 368}


def _statement() -> LeanStatement:
    # 1. The token, locked first (use_token's conditions, on its newest version).
    token_locked = (
        sa.select(T.c.id, T.c.project_id)
        .where(
            sa.or_(T.c.secret_digest == _TOKEN_DIGEST, T.c.id == _TOKEN_ID),
            *token_usable(_NOW, spends_quota=True),
        )
        .with_for_update(of=T)
        .cte("token_locked")
        .prefix_with("MATERIALIZED")
    )
    # 2. The key, read (it is locked last).
    caller_key = (
        sa.select(K.c.id, K.c.project_id)
        .where(sa.or_(K.c.secret_digest == _KEY_DIGEST, K.c.id == _KEY_ID))
        .cte("caller_key")
    )
    key_id = sa.select(caller_key.c.id).scalar_subquery()
    token_id = sa.select(token_locked.c.id).scalar_subquery()
    own_project = sa.case(
        (exists_in(caller_key), sa.select(caller_key.c.project_id).scalar_subquery()),
        else_=sa.select(token_locked.c.project_id).scalar_subquery(),
    )
    scope = sa.select(
        sa.func.coalesce(own_project, _PROJECT_ID).label("project_id"),
        sa.and_(
            _PROJECT_ID.is_not(None), own_project.is_not(None), own_project != _PROJECT_ID
        ).label("mismatch"),
    ).cte("scope")

    def of_scope(table: sa.Table) -> sa.ColumnElement[bool]:
        return sa.or_(
            table.c.project_id == sa.select(scope.c.project_id).scalar_subquery(),
            table.c.api_key_id == key_id,
            table.c.token_id == token_id,
            table.c.end_user == _END_USER,
            table.c.tag == sa.any_(_TAGS),
        )

    # 3. The rate limits and their current windows, locked in limit id order.
    window_start = sa.case(
        *((RL.c.per == per, start) for per, start in _WINDOW_STARTS.items()),
    )
    limits = (
        sa.select(
            RL.c.id,
            RL.c.max_requests,
            RL.c.max_tokens,
            window_start.label("window_start"),
        )
        .where(of_scope(RL))
        .cte("limits")
    )
    windows_locked = (
        sa.select(
            RW.c.rate_limit_id,
            RW.c.window_start,
            RW.c.requests,
            RW.c.tokens,
            limits.c.max_requests,
            limits.c.max_tokens,
        )
        .join_from(
            RW,
            limits,
            sa.and_(RW.c.rate_limit_id == limits.c.id, RW.c.window_start == limits.c.window_start),
        )
        .where(after_all_of(token_locked))
        .order_by(RW.c.rate_limit_id)
        .with_for_update(of=RW)
        .cte("windows_locked")
        .prefix_with("MATERIALIZED")
    )
    # 4. The budgets and their current periods, locked in budget id order.
    floor = sa.case(
        *(
            (B.c.period == kind, _NOW - sa.literal(dt.timedelta(days=days), sa.Interval()))
            for kind, days in _LONGEST.items()
        ),
        else_=_NOW
        - sa.func.make_interval(0, 0, 0, 0, 0, 0, B.c.period_seconds, type_=sa.Interval()),
    )
    found_budgets = (
        sa.select(
            B.c.id,
            B.c.limit_amount,
            B.c.soft_limits,
            B.c.period,
            B.c.anchor_at,
            floor.label("floor"),
        )
        .where(of_scope(B))
        .cte("found_budgets")
    )
    periods_locked = (
        sa.select(
            BP.c.budget_id,
            BP.c.period_start,
            BP.c.spent,
            BP.c.reserved,
            found_budgets.c.limit_amount,
        )
        .join_from(BP, found_budgets, BP.c.budget_id == found_budgets.c.id)
        .where(
            sa.or_(
                sa.and_(
                    found_budgets.c.period.is_(None),
                    BP.c.period_start == found_budgets.c.anchor_at,
                ),
                sa.and_(
                    found_budgets.c.period.is_not(None),
                    BP.c.period_start > found_budgets.c.floor,
                    BP.c.period_start <= _NOW,
                    BP.c.period_end > _NOW,
                ),
            ),
            after_all_of(windows_locked),
        )
        .order_by(BP.c.budget_id)
        .with_for_update(of=BP)
        .cte("periods_locked")
        .prefix_with("MATERIALIZED")
    )
    # 5. The key, locked last, as it now is.
    key_locked = (
        sa.select(*KEY_COLUMNS)
        .where(
            K.c.id == key_id,
            K.c.is_active,
            sa.or_(K.c.expires_at.is_(None), K.c.expires_at > _NOW),
            after_all_of(periods_locked),
        )
        .with_for_update(of=K)
        .cte("key_locked")
        .prefix_with("MATERIALIZED")
    )
    # 6. The decision, on the rows as locked.
    level = periods_locked.c.spent + periods_locked.c.reserved
    window_room = sa.and_(
        sa.or_(
            windows_locked.c.max_requests.is_(None),
            windows_locked.c.requests < windows_locked.c.max_requests,
        ),
        sa.or_(
            windows_locked.c.max_tokens.is_(None),
            sa.and_(
                windows_locked.c.max_tokens >= _TOKENS,
                windows_locked.c.tokens <= windows_locked.c.max_tokens - _TOKENS,
            ),
        ),
    )
    decided = sa.and_(
        sa.or_(sa.and_(_KEY_DIGEST.is_(None), _KEY_ID.is_(None)), exists_in(key_locked)),
        sa.or_(sa.and_(_TOKEN_DIGEST.is_(None), _TOKEN_ID.is_(None)), exists_in(token_locked)),
        sa.not_(sa.select(scope.c.mismatch).scalar_subquery()),
        sa.or_(
            _IDEMPOTENCY_KEY.is_(None),
            sa.not_(sa.exists().where(A.c.idempotency_key == _IDEMPOTENCY_KEY)),
        ),
        count_of(limits) == count_of(windows_locked),
        sa.not_(exists_in(windows_locked, sa.not_(window_room))),
        count_of(found_budgets) == count_of(periods_locked),
        sa.not_(
            exists_in(
                periods_locked,
                sa.not_(
                    sa.and_(
                        level <= periods_locked.c.limit_amount - _COST,
                        level < periods_locked.c.limit_amount,
                    )
                ),
            )
        ),
        sa.or_(
            _COST == 0,
            sa.not_(exists_in(key_locked)),
            exists_in(key_locked, key_locked.c.balance - key_locked.c.reserved >= _COST),
        ),
    )
    verdict = sa.select(decided.label("admitted")).cte("verdict")
    admitted = sa.select(verdict.c.admitted).scalar_subquery()
    # 7. The writes, each only if admitted.
    token_used = (
        T.update()
        .where(T.c.id == token_id, admitted)
        .values(request_count=T.c.request_count + 1, last_used_at=_NOW)
        .returning(*TOKEN_COLUMNS)
        .cte("token_used")
    )
    windows_counted = (
        RW.update()
        .where(
            RW.c.rate_limit_id == windows_locked.c.rate_limit_id,
            RW.c.window_start == windows_locked.c.window_start,
            admitted,
        )
        .values(requests=RW.c.requests + 1, tokens=add_saturating(RW.c.tokens, _TOKENS))
        .returning(RW.c.rate_limit_id, RW.c.window_start)
        .cte("windows_counted")
    )
    periods_held = (
        BP.update()
        .where(
            BP.c.budget_id == periods_locked.c.budget_id,
            BP.c.period_start == periods_locked.c.period_start,
            admitted,
        )
        .values(reserved=BP.c.reserved + _COST)
        .returning(BP.c.budget_id, BP.c.period_start, BP.c.spent, BP.c.reserved)
        .cte("periods_held")
    )
    key_held = (
        K.update()
        .where(K.c.id == sa.select(key_locked.c.id).scalar_subquery(), _COST > 0, admitted)
        .values(reserved=K.c.reserved + _COST, last_used_at=_NOW)
        .returning(*KEY_COLUMNS)
        .cte("key_held")
    )
    hold_values = reservation_values(
        reservation_id=_P("p_reservation_id", type_=_UUID),
        key_id=key_held.c.id,
        amount=_COST,
        now=_NOW,
        expires_at=_P("p_expires_at", type_=_TIME),
    )
    hold = as_insert_values(reservations, hold_values)
    reservation_made = (
        reservations.insert()
        .from_select(list(hold), sa.select(*hold.values()).select_from(key_held))
        .returning(reservations.c.id)
        .cte("reservation_made")
    )
    admission_id = _P("p_admission_id", type_=_UUID)
    row = as_insert_values(
        A,
        {
            "id": admission_id,
            "api_key_id": key_id,
            "token_id": token_id,
            "project_id": sa.select(scope.c.project_id).scalar_subquery(),
            "end_user": _END_USER,
            "tags": _P("p_tags_json", type_=A.c.tags.type),
            "reservation_id": sa.select(reservation_made.c.id).scalar_subquery(),
            "cost": _COST,
            "tokens": _TOKENS,
            "status": "active",
            "idempotency_key": _IDEMPOTENCY_KEY,
            "params_digest": _P("p_params_digest", type_=sa.String(64)),
            "created_at": _NOW,
            "expires_at": _P("p_expires_at", type_=_TIME),
        },
    )
    admission_made = (
        A.insert()
        .from_select(list(row), sa.select(*row.values()).where(admitted))
        .returning(*ADMISSION_COLUMNS)
        .cte("admission_made")
    )
    holds_made = (
        AB.insert()
        .from_select(
            ["admission_id", "budget_id", "period_start", "amount"],
            sa.select(admission_id, periods_held.c.budget_id, periods_held.c.period_start, _COST),
        )
        .returning(AB.c.budget_id)
        .cte("holds_made")
    )
    counts_made = (
        AW.insert()
        .from_select(
            ["admission_id", "rate_limit_id", "window_start", "tokens"],
            sa.select(
                admission_id,
                windows_counted.c.rate_limit_id,
                windows_counted.c.window_start,
                _TOKENS,
            ),
        )
        .returning(AW.c.rate_limit_id)
        .cte("counts_made")
    )
    # 8. The thresholds the held periods passed, each recorded once per period.
    after = periods_held.c.spent + periods_held.c.reserved
    crossed = crossings_made(
        found_budgets.c.id,
        found_budgets.c.soft_limits,
        found_budgets.c.limit_amount,
        periods_held,
        before=after - _COST,
        after=after,
        admission_id=admission_id,
        now=_NOW,
        at_settle=False,
    )
    # 9. One row: the decision, the records, and what each budget has left.
    rooms = (
        sa.select(
            periods_held.c.budget_id,
            periods_held.c.period_start,
            sa.func.greatest(found_budgets.c.limit_amount - after, 0).label("remaining"),
        )
        .join_from(periods_held, found_budgets, found_budgets.c.id == periods_held.c.budget_id)
        .cte("rooms")
    )
    columns: list[sa.ColumnElement[Any]] = [
        verdict.c.admitted,
        *admission_made.c,
        *token_used.c,
        *key_held.c,
        *key_locked.c,
        *(
            array_of(rooms.c[name], rooms, (rooms.c.budget_id,), item)
            for name, item in (("budget_id", _UUID), ("period_start", _TIME), ("remaining", _BIG))
        ),
        *crossed,
    ]
    labelled = [column.label(f"c{i}") for i, column in enumerate(columns)]
    statement = (
        sa.select(*labelled)
        # Writes no column reads: SQLAlchemy renders only the CTEs a statement refers to.
        .add_cte(holds_made, counts_made)
        .select_from(verdict)
        .outerjoin(admission_made, sa.true())
        .outerjoin(token_used, sa.true())
        .outerjoin(key_held, sa.true())
        .outerjoin(key_locked, sa.true())
    )
    return LeanStatement(statement, columns)


ADMIT_IN_ONE_STATEMENT = _statement()

_ADMISSION = slice(1, 1 + len(ADMISSION_COLUMNS))
_TOKEN = slice(_ADMISSION.stop, _ADMISSION.stop + len(TOKEN_COLUMNS))
_KEY_HELD = slice(_TOKEN.stop, _TOKEN.stop + len(KEY_COLUMNS))
_KEY_LOCKED = slice(_KEY_HELD.stop, _KEY_HELD.stop + len(KEY_COLUMNS))
_ROOMS = _KEY_LOCKED.stop


def admit_params(request: AdmitRequest, now: dt.datetime) -> dict[str, Any]:
    """The statement's parameters for ``request`` at ``now`` (fresh ids each time)."""
    key_digest = token_digest = None
    if request.secret_kind == "key":
        key_digest = request.secret_digest
    elif request.secret_kind == "token":
        token_digest = request.secret_digest
    return {
        "p_now": now,
        "p_cost": request.cost,
        "p_tokens": request.tokens,
        "p_key_digest": key_digest,
        "p_key_id": request.api_key_id,
        "p_token_digest": token_digest,
        "p_token_id": request.token_id,
        "p_project_id": request.project_id,
        "p_end_user": request.end_user,
        "p_tags": list(request.tags),
        "p_tags_json": list(request.tags) or None,
        "p_idempotency_key": request.idempotency_key,
        "p_params_digest": request.params_digest,
        "p_admission_id": new_id(),
        "p_reservation_id": new_id(),
        "p_expires_at": now + request.ttl,
        **{f"p_{per}_start": rate_window(per, now)[0] for per in WINDOW},
    }


def admitted(row: Row | None) -> Admission | None:
    """The admission the statement made, or None if it decided nothing (and wrote
    nothing): the Python form decides instead."""
    if row is None or not row[0]:
        return None
    key = row[_KEY_HELD] if row[_KEY_HELD][0] is not None else row[_KEY_LOCKED]
    token = row[_TOKEN]
    budget_ids, starts, rooms, *crossed = (value or () for value in row[_ROOMS:])
    return admission(
        row[_ADMISSION],
        api_key=None if key[0] is None else api_key(key),
        token=None if token[0] is None else token_record(token),
        budgets=tuple(
            BudgetRemaining(budget_id=budget_id, period_start=start, remaining=room)
            for budget_id, start, room in zip(budget_ids, starts, rooms, strict=True)
        ),
        crossed=tuple(
            BudgetCrossing(budget_id=budget_id, period_start=start, threshold=threshold, hard=hard)
            for budget_id, start, threshold, hard in zip(*crossed, strict=True)
        ),
    )
