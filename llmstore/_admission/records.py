"""What budgets, rate limits and admissions return, and the checks of their arguments."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from llmstore._access import Token
from llmstore._billing import ApiKey
from llmstore._core.errors import ValidationError
from llmstore._core.validate import (
    MAX_INT64,
    check_choice,
    check_id,
    check_int,
    check_name,
    check_positive_int,
    check_timedelta,
    describe,
)
from llmstore._db.admission_schema import (
    BUDGET_PERIODS,
    RATE_PERS,
    SCOPE_COLUMNS,
    AdmissionStatus,
    RatePer,
    admissions,
    budgets,
    rate_limits,
)
from llmstore._db.lean import Row

B = budgets
RL = rate_limits
A = admissions

Period = Literal["day", "week", "month", "year"]
CALENDAR_PERIODS: tuple[str, ...] = tuple(kind for kind in BUDGET_PERIODS if kind != "fixed")
MAX_SOFT_LIMITS = 10
MAX_TAGS = 20
LABEL_MAX = 200
#: A fixed period is at least a second and at most about a century, in whole seconds.
MAX_FIXED_PERIOD = dt.timedelta(days=36_600)


class Scoped(BaseModel):
    """What budgets and rate limits have in common: an id, a name, and exactly one scope
    set of ``project_id``, ``api_key_id``, ``token_id``, ``end_user`` and ``tag``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    name: str | None
    project_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    token_id: uuid.UUID | None
    end_user: str | None
    tag: str | None


class Budget(Scoped):
    """A spending limit per period for one scope.

    ``period`` is None (lifetime), a calendar period (``"day"``, ``"week"``, ``"month"``,
    ``"year"``, from midnight in ``timezone``) or a ``timedelta`` (fixed windows from
    ``anchor_at``, the budget's creation).
    """

    limit: int
    period: Period | dt.timedelta | None
    timezone: str
    soft_limits: tuple[int, ...]
    anchor_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime


class BudgetStatus(BaseModel):
    """A budget's current period: ``remaining = max(limit - spent - reserved, 0)``."""

    model_config = ConfigDict(frozen=True)

    budget_id: uuid.UUID
    limit: int
    spent: int
    reserved: int
    remaining: int
    period_start: dt.datetime
    resets_at: dt.datetime | None


class BudgetPeriodSpend(BaseModel):
    """What one period of a budget spent (settled) and still holds."""

    model_config = ConfigDict(frozen=True)

    period_start: dt.datetime
    period_end: dt.datetime | None
    spent: int
    reserved: int


class BudgetCrossing(BaseModel):
    """A soft limit (or, with ``hard``, the limit) that this request made a period reach.

    Each is reported once per budget and period, by one request of all replicas'.
    """

    model_config = ConfigDict(frozen=True)

    budget_id: uuid.UUID
    period_start: dt.datetime
    threshold: int
    hard: bool


class BudgetMismatch(BaseModel):
    """One disagreement found by :meth:`Budgets.verify`."""

    model_config = ConfigDict(frozen=True)

    budget_id: uuid.UUID
    period_start: dt.datetime
    field: str
    stored: int
    expected: int


class BudgetReport(BaseModel):
    """What :meth:`Budgets.verify` found; ``ok`` when there is no mismatch."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    periods_checked: int
    mismatches: list[BudgetMismatch]


class RateLimit(Scoped):
    """At most ``requests`` requests and ``tokens`` tokens per window of ``per``."""

    requests: int | None
    tokens: int | None
    per: RatePer
    created_at: dt.datetime
    updated_at: dt.datetime


class RateLimitStatus(BaseModel):
    """A rate limit's current window: what it counted and what is left (None: no limit)."""

    model_config = ConfigDict(frozen=True)

    rate_limit_id: uuid.UUID
    window_start: dt.datetime
    resets_at: dt.datetime
    requests: int
    tokens: int
    remaining_requests: int | None
    remaining_tokens: int | None


class BudgetRemaining(BaseModel):
    """A budget's room after an admission's hold, in the period it was admitted in."""

    model_config = ConfigDict(frozen=True)

    budget_id: uuid.UUID
    period_start: dt.datetime
    remaining: int


class Admission(BaseModel):
    """One admitted request: its holds on the key and the budgets, its count in the
    rate limits. Settle it with its cost once the upstream call is done, or release it.

    ``api_key`` / ``token`` is the authenticated record (with ``secret=``), or the one
    the ids named; ``budgets`` each budget's room after this hold; ``crossed`` the soft
    limits this request made a period reach.
    """

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    status: AdmissionStatus
    api_key_id: uuid.UUID | None
    token_id: uuid.UUID | None
    project_id: uuid.UUID | None
    end_user: str | None
    tags: tuple[str, ...]
    cost: int
    tokens: int
    reservation_id: uuid.UUID | None
    created_at: dt.datetime
    expires_at: dt.datetime
    api_key: ApiKey | None = None
    token: Token | None = None
    budgets: tuple[BudgetRemaining, ...] = ()
    crossed: tuple[BudgetCrossing, ...] = ()


class Settlement(BaseModel):
    """What settling an admission did: ``cost`` charged to every budget; ``charged`` of it
    taken from the key (``shortfall`` what the key could not pay); ``crossed`` the soft
    limits (and limits) it made a period reach."""

    model_config = ConfigDict(frozen=True)

    admission_id: uuid.UUID
    cost: int
    tokens: int
    charged: int
    shortfall: int
    usage_id: int | None
    settled_at: dt.datetime
    crossed: tuple[BudgetCrossing, ...]


# --- checks ------------------------------------------------------------------------------


def check_label(value: object, what: str) -> str:
    """An end user or a tag: text of at most 200 characters, not blank."""
    text = check_name(value, what, max_length=LABEL_MAX)
    if not text.strip():
        raise ValidationError(f"{what} must not be blank")
    return text


def check_scope(
    *,
    project_id: object,
    api_key_id: object,
    token_id: object,
    end_user: object,
    tag: object,
) -> dict[str, Any]:
    """The one scope column's value, checked: ValidationError with none or several."""
    given = {
        name: value
        for name, value in zip(
            SCOPE_COLUMNS, (project_id, api_key_id, token_id, end_user, tag), strict=True
        )
        if value is not None
    }
    if len(given) != 1:
        names = ", ".join(f"{name}=" for name in SCOPE_COLUMNS)
        raise ValidationError(f"give exactly one scope of {names} (got {len(given)})")
    ((name, value),) = given.items()
    checked: Any
    if name.endswith("_id"):
        checked = check_id(value, name.replace("_", " "))
    else:
        checked = check_label(value, name.replace("_", " "))
    return {column: checked if column == name else None for column in SCOPE_COLUMNS}


def check_limit_amount(value: object) -> int:
    return check_positive_int(value, "limit")


def check_period(value: object) -> tuple[str | None, int | None]:
    """``(period, period_seconds)`` as stored."""
    if value is None:
        return None, None
    if isinstance(value, dt.timedelta):
        length = check_timedelta(value, "period")
        if length.microseconds or not dt.timedelta(seconds=1) <= length <= MAX_FIXED_PERIOD:
            raise ValidationError(
                "a fixed period must be whole seconds, from 1 second to 36,600 days"
            )
        return "fixed", int(length.total_seconds())
    if isinstance(value, str):
        return check_choice(value, "period", CALENDAR_PERIODS), None
    raise ValidationError(
        "period must be None, 'day', 'week', 'month', 'year' or a timedelta, not " + describe(value)
    )


def _plain_items(value: object, what: str) -> list[object]:
    """The items of a plain list, tuple or set (never a caller's iterable, whose code could
    raise anything)."""
    if type(value) not in (list, tuple, set, frozenset):
        raise ValidationError(f"{what} must be a list, not {describe(value)}")
    assert isinstance(value, list | tuple | set | frozenset)
    return list(value)


def check_soft_limits(value: object, limit: int) -> tuple[int, ...]:
    """Distinct positive integers below ``limit``, in ascending order."""
    items = _plain_items(value, "soft_limits")
    if len(items) > MAX_SOFT_LIMITS:
        raise ValidationError(f"soft_limits holds at most {MAX_SOFT_LIMITS} values")
    checked = sorted(
        {check_int(item, "a soft limit", minimum=1, maximum=MAX_INT64) for item in items}
    )
    if checked and checked[-1] >= limit:
        raise ValidationError(f"soft limits must be below the limit ({limit})")
    return tuple(checked)


def check_per(value: object) -> RatePer:
    per: Any = check_choice(value, "per", RATE_PERS)
    return per  # type: ignore[no-any-return]


def check_tags(value: object) -> tuple[str, ...]:
    """Up to 20 distinct tags, in the order given."""
    tags: list[str] = []
    for item in _plain_items(value, "tags"):
        tag = check_label(item, "a tag")
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise ValidationError(f"at most {MAX_TAGS} distinct tags")
    return tuple(tags)


# --- rows to records ---------------------------------------------------------------------

BUDGET_COLUMNS = tuple(B.c)
RATE_LIMIT_COLUMNS = tuple(RL.c)
ADMISSION_COLUMNS = (
    A.c.id,
    A.c.status,
    A.c.api_key_id,
    A.c.token_id,
    A.c.project_id,
    A.c.end_user,
    A.c.tags,
    A.c.cost,
    A.c.tokens,
    A.c.reservation_id,
    A.c.created_at,
    A.c.expires_at,
)
_BUDGET_NAMES = tuple(column.name for column in BUDGET_COLUMNS)
_RATE_NAMES = tuple(column.name for column in RATE_LIMIT_COLUMNS)
_ADMISSION_NAMES = tuple(column.name for column in ADMISSION_COLUMNS)


def budget(row: Row) -> Budget:
    values = dict(zip(_BUDGET_NAMES, row, strict=True))
    kind, seconds = values.pop("period"), values.pop("period_seconds")
    values["period"] = dt.timedelta(seconds=seconds) if kind == "fixed" else kind
    values["limit"] = values.pop("limit_amount")
    values["soft_limits"] = tuple(values["soft_limits"])
    return Budget.model_construct(**values)


def rate_limit(row: Row) -> RateLimit:
    values = dict(zip(_RATE_NAMES, row, strict=True))
    values["requests"] = values.pop("max_requests")
    values["tokens"] = values.pop("max_tokens")
    return RateLimit.model_construct(**values)


def admission(row: Row, **extra: Any) -> Admission:
    values = dict(zip(_ADMISSION_NAMES, row, strict=True))
    values["tags"] = tuple(values["tags"] or ())
    return Admission.model_construct(**values, **extra)
