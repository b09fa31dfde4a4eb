"""The statements of an admission and its settlement, built once (``LeanStatement``).

Building a statement costs more than running a cached one: on SQLite, where a statement
runs in-process, an admission built statement by statement spent nine tenths of its time
in SQLAlchemy's construction and caching. These are compiled once per dialect and run on
the bare driver where there is one (``_db.lean``), as the money statements are.

Parameters are never named after a column of the table an ``UPDATE`` changes
(SQLAlchemy would add such a parameter to the ``SET`` on the generic path).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import sqlalchemy as sa

from llmstore._core.validate import MAX_INT64
from llmstore._db.admission_schema import (
    admission_budgets,
    admission_windows,
    budget_periods,
    rate_windows,
)
from llmstore._db.dialects import LeanUpsert
from llmstore._db.lean import LeanStatement
from llmstore._db.schema import UTCDateTime

from .records import ADMISSION_COLUMNS, BUDGET_COLUMNS, RATE_LIMIT_COLUMNS, RL, A, B

AB = admission_budgets
AW = admission_windows
BP = budget_periods
RW = rate_windows
MAX_TAGS = 20

_P = sa.bindparam
_UUID = sa.Uuid()
_BIG = sa.BigInteger()
_TIME = UTCDateTime()


def add_saturating(column: sa.ColumnElement[int], delta: Any) -> sa.ColumnElement[int]:
    """``column + delta`` kept within 0 and 2**63 - 1, never computed past them (SQLite
    would make a float of it, Postgres refuse it)."""
    return sa.case(
        (sa.and_(delta >= 0, column > MAX_INT64 - delta), MAX_INT64),
        (sa.and_(delta < 0, column < -delta), 0),
        else_=column + delta,
    )


def _returning(statement: Any, *columns: sa.ColumnElement[Any]) -> LeanStatement:
    return LeanStatement(statement.returning(*columns), columns)


# -- the limits of a request's scopes: one statement per number of tags -----------------


@lru_cache(maxsize=2 * (MAX_TAGS + 1))
def limits_of(kind: str, tags: int) -> LeanStatement:
    """The rate limits (``kind="rate"``) or budgets of a request's scopes, in id order.

    Parameters ``project_id``, ``api_key_id``, ``token_id``, ``end_user`` (None matches
    nothing) and ``tag_0`` ... ``tag_<tags - 1>``."""
    table, columns = (RL, RATE_LIMIT_COLUMNS) if kind == "rate" else (B, BUDGET_COLUMNS)
    conditions: list[sa.ColumnElement[bool]] = [
        table.c.project_id == _P("project_id", type_=_UUID),
        table.c.api_key_id == _P("api_key_id", type_=_UUID),
        table.c.token_id == _P("token_id", type_=_UUID),
        table.c.end_user == _P("end_user", type_=sa.String(200)),
    ]
    if tags:
        conditions.append(
            table.c.tag.in_([_P(f"tag_{i}", type_=sa.String(200)) for i in range(tags)])
        )
    statement = sa.select(*columns).where(sa.or_(*conditions)).order_by(table.c.id)
    return LeanStatement(statement, columns)


# -- admit ------------------------------------------------------------------------------

_TOKENS = _P("tokens", type_=_BIG)
_MAX_REQUESTS = _P("max_requests", type_=_BIG)
_MAX_TOKENS = _P("max_tokens", type_=_BIG)
#: One more request and ``tokens`` in a window, if it has room (a new window always has:
#: the caller refuses an estimate above ``max_tokens`` first).
COUNT_REQUEST = LeanUpsert(
    RW,
    {
        "rate_limit_id": _P("rate_limit_id", type_=_UUID),
        "window_start": _P("window_start", type_=_TIME),
        "requests": 1,
        "tokens": _TOKENS,
    },
    [RW.c.rate_limit_id, RW.c.window_start],
    {"requests": RW.c.requests + 1, "tokens": add_saturating(RW.c.tokens, _TOKENS)},
    sa.and_(
        sa.or_(_MAX_REQUESTS.is_(None), RW.c.requests < _MAX_REQUESTS),
        sa.or_(_MAX_TOKENS.is_(None), RW.c.tokens <= _MAX_TOKENS - _TOKENS),
    ),
    [RW.c.requests],
)

_COST = _P("cost", type_=_BIG)
_LIMIT = _P("limit", type_=_BIG)
_LEVEL = BP.c.spent + BP.c.reserved
_PERIOD_END = _P("period_end", type_=_TIME)
#: ``cost`` held in a budget period, if it has room (the caller refuses a cost above the
#: limit first); an exhausted period refuses even a request estimated at nothing. The
#: period's end is written too (a row from before revision 0007 has none yet).
HOLD_IN_PERIOD = LeanUpsert(
    BP,
    {
        "budget_id": _P("budget_id", type_=_UUID),
        "period_start": _P("period_start", type_=_TIME),
        "spent": 0,
        "reserved": _COST,
        "period_end": _PERIOD_END,
    },
    [BP.c.budget_id, BP.c.period_start],
    {"reserved": BP.c.reserved + _COST, "period_end": _PERIOD_END},
    sa.and_(_LEVEL <= _LIMIT - _COST, _LEVEL < _LIMIT),
    [BP.c.spent, BP.c.reserved],
)

_BY_PERIOD = sa.and_(
    BP.c.budget_id == _P("budget_id", type_=_UUID),
    BP.c.period_start == _P("period_start", type_=_TIME),
)
PERIOD = LeanStatement(
    sa.select(BP.c.spent, BP.c.reserved).where(_BY_PERIOD), (BP.c.spent, BP.c.reserved)
)
LAPSED = LeanStatement(
    sa.select(AB.c.admission_id)
    .join(A, A.c.id == AB.c.admission_id)
    .where(
        AB.c.budget_id == _P("budget_id", type_=_UUID),
        AB.c.period_start == _P("period_start", type_=_TIME),
        A.c.status == "active",
        A.c.expires_at <= _P("now", type_=_TIME),
    )
    .limit(1),
    (AB.c.admission_id,),
)
BY_IDEMPOTENCY_KEY = LeanStatement(
    sa.select(*ADMISSION_COLUMNS, A.c.params_digest).where(
        A.c.idempotency_key == _P("idempotency_key", type_=sa.String(200))
    ),
    (*ADMISSION_COLUMNS, A.c.params_digest),
)
INSERT_ADMISSION = _returning(
    A.insert().values({column.name: _P(column.name) for column in A.c}), *ADMISSION_COLUMNS
)
INSERT_BUDGET_HOLD = _returning(
    AB.insert().values({column.name: _P(column.name) for column in AB.c}), AB.c.budget_id
)
INSERT_WINDOW_COUNT = _returning(
    AW.insert().values({column.name: _P(column.name) for column in AW.c}), AW.c.rate_limit_id
)

# -- settle -----------------------------------------------------------------------------

_ADMISSION_ID = _P("p_admission_id", type_=_UUID)
_SETTLED_COST = _P("p_cost", type_=_BIG)
SETTLING = _returning(
    A.update()
    .where(A.c.id == _ADMISSION_ID, A.c.status == "active")
    .values(
        status="settled",
        finished_at=_P("p_now", type_=_TIME),
        settled_cost=_SETTLED_COST,
        settled_tokens=_P("p_tokens", type_=_BIG),
        settle_digest=_P("p_digest", type_=sa.String(64)),
    ),
    A.c.api_key_id,
    A.c.reservation_id,
    A.c.tokens,
)
_HELD_COLUMNS = (AB.c.period_start, AB.c.amount, *BUDGET_COLUMNS)
HELD = LeanStatement(
    sa.select(*_HELD_COLUMNS)
    .join(B, B.c.id == AB.c.budget_id)
    .where(AB.c.admission_id == _ADMISSION_ID)
    .order_by(AB.c.budget_id),
    _HELD_COLUMNS,
)
SPEND_IN_PERIOD = _returning(
    BP.update()
    .where(
        BP.c.budget_id == _P("p_budget_id", type_=_UUID),
        BP.c.period_start == _P("p_period_start", type_=_TIME),
        BP.c.spent <= MAX_INT64 - _SETTLED_COST,
    )
    .values(reserved=BP.c.reserved - _P("p_hold", type_=_BIG), spent=BP.c.spent + _SETTLED_COST),
    BP.c.spent,
    BP.c.reserved,
)
BUDGETS_SETTLED = _returning(
    AB.update().where(AB.c.admission_id == _ADMISSION_ID).values(settled_amount=_SETTLED_COST),
    AB.c.budget_id,
)
SETTLED = _returning(
    A.update()
    .where(A.c.id == _ADMISSION_ID)
    .values(
        charged=_P("p_charged", type_=_BIG),
        shortfall=_P("p_shortfall", type_=_BIG),
        usage_id=_P("p_usage_id", type_=_BIG),
    ),
    A.c.id,
)
_DELTA = _P("p_delta", type_=_BIG)
WINDOWS_COUNTED = LeanStatement(
    sa.select(AW.c.rate_limit_id, AW.c.window_start)
    .where(AW.c.admission_id == _ADMISSION_ID)
    .order_by(AW.c.rate_limit_id),
    (AW.c.rate_limit_id, AW.c.window_start),
)
CORRECT_WINDOW = _returning(
    RW.update()
    .where(
        RW.c.rate_limit_id == _P("p_rate_limit_id", type_=_UUID),
        RW.c.window_start == _P("p_window_start", type_=_TIME),
    )
    .values(tokens=add_saturating(RW.c.tokens, _DELTA)),
    RW.c.tokens,
)
CORRECT_COUNTED = _returning(
    AW.update()
    .where(AW.c.admission_id == _ADMISSION_ID)
    .values(tokens=add_saturating(AW.c.tokens, _DELTA)),
    AW.c.rate_limit_id,
)
