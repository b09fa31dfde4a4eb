"""The tables of admission (revision 0006): budgets and their periods and crossings, rate
limits and their windows, admissions and their holds. On the one ``MetaData`` of
``schema.py``, which imports this module so that the tables are always registered."""

from __future__ import annotations

from typing import Any, Literal, get_args

import sqlalchemy as sa

from .schema import Json, UTCDateTime, metadata, reference

#: The scope columns of a budget or a rate limit: exactly one is set.
SCOPE_COLUMNS = ("project_id", "api_key_id", "token_id", "end_user", "tag")
_ONE_SCOPE = (
    " + ".join(f"(CASE WHEN {name} IS NULL THEN 0 ELSE 1 END)" for name in SCOPE_COLUMNS) + " = 1"
)
#: The calendar periods of a budget (``fixed``: windows of ``period_seconds`` from its start).
BudgetPeriodKind = Literal["day", "week", "month", "year", "fixed"]
BUDGET_PERIODS: tuple[BudgetPeriodKind, ...] = get_args(BudgetPeriodKind)
#: A rate limit's window.
RatePer = Literal["second", "minute", "hour", "day"]
RATE_PERS: tuple[RatePer, ...] = get_args(RatePer)
AdmissionStatus = Literal["active", "settled", "released", "expired"]


def _owner(name: str, table: str) -> sa.Column[Any]:
    """A primary-key column referencing ``table``'s id: the row goes with its owner."""
    return sa.Column(
        name, sa.Uuid(), sa.ForeignKey(f"{table}.id", ondelete="CASCADE"), primary_key=True
    )


def _scope_columns() -> list[sa.Column[Any]]:
    # A limit goes with what it limits: deleting a project, key or token deletes its limits.
    return [
        reference("project_id", "llmstore_projects", ondelete="CASCADE", nullable=True),
        reference("api_key_id", "llmstore_api_keys", ondelete="CASCADE", nullable=True),
        reference("token_id", "llmstore_tokens", ondelete="CASCADE", nullable=True),
        sa.Column("end_user", sa.String(200), nullable=True),
        sa.Column("tag", sa.String(200), nullable=True),
    ]


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{value}'" for value in values) + ")"


budgets = sa.Table(
    "llmstore_budgets",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("name", sa.String(200), nullable=True),
    *_scope_columns(),
    # Integer units, as costs are.
    sa.Column("limit_amount", sa.BigInteger(), nullable=False),
    sa.Column("period", sa.String(8), nullable=True),
    sa.Column("period_seconds", sa.BigInteger(), nullable=True),
    # The IANA zone whose midnights the calendar periods start at.
    sa.Column("timezone", sa.String(64), nullable=False),
    # Ascending integers below limit_amount.
    sa.Column("soft_limits", Json, nullable=False),
    # Where fixed windows are counted from (and the one period of a lifetime budget).
    sa.Column("anchor_at", UTCDateTime(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint(_ONE_SCOPE, name="one_scope"),
    sa.CheckConstraint("limit_amount > 0", name="limit_positive"),
    sa.CheckConstraint(f"period IS NULL OR period IN {_in(BUDGET_PERIODS)}", name="period"),
    sa.CheckConstraint(
        "(period = 'fixed' AND period_seconds > 0) "
        "OR ((period IS NULL OR period <> 'fixed') AND period_seconds IS NULL)",
        name="fixed_period_seconds",
    ),
    *(sa.Index(None, name) for name in SCOPE_COLUMNS),
)

# One row per budget and period, made by the first admission in it: what is spent
# (settled) and held (admitted, not yet settled), and when the period ends (NULL for a
# lifetime budget's one period, and on rows written before revision 0007 until their next
# admission), so that the current period is found by comparing times, in any form.
budget_periods = sa.Table(
    "llmstore_budget_periods",
    metadata,
    _owner("budget_id", "llmstore_budgets"),
    sa.Column("period_start", UTCDateTime(), primary_key=True),
    sa.Column("spent", sa.BigInteger(), nullable=False),
    sa.Column("reserved", sa.BigInteger(), nullable=False),
    sa.Column("period_end", UTCDateTime(), nullable=True),
    sa.CheckConstraint("spent >= 0 AND reserved >= 0", name="not_negative"),
)

# The soft limits (and the limit) each period has reached: one row each, so that one
# request of all the replicas' reports each crossing.
budget_crossings = sa.Table(
    "llmstore_budget_crossings",
    metadata,
    _owner("budget_id", "llmstore_budgets"),
    sa.Column("period_start", UTCDateTime(), primary_key=True),
    sa.Column("threshold", sa.BigInteger(), primary_key=True),
    # No foreign key: the crossing outlives the admission's purge.
    sa.Column("admission_id", sa.Uuid(), nullable=False),
    # Crossed by the admission's settlement (its actual cost), not by its admission.
    sa.Column("at_settle", sa.Boolean(), nullable=False),
    sa.Column("crossed_at", UTCDateTime(), nullable=False),
)

rate_limits = sa.Table(
    "llmstore_rate_limits",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("name", sa.String(200), nullable=True),
    *_scope_columns(),
    sa.Column("max_requests", sa.BigInteger(), nullable=True),
    sa.Column("max_tokens", sa.BigInteger(), nullable=True),
    sa.Column("per", sa.String(8), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint(_ONE_SCOPE, name="one_scope"),
    sa.CheckConstraint(f"per IN {_in(RATE_PERS)}", name="per"),
    sa.CheckConstraint(
        "(max_requests IS NOT NULL OR max_tokens IS NOT NULL) "
        "AND (max_requests IS NULL OR max_requests > 0) "
        "AND (max_tokens IS NULL OR max_tokens > 0)",
        name="some_limit",
    ),
    *(sa.Index(None, name) for name in SCOPE_COLUMNS),
)

# Fixed windows aligned to the epoch, made by the first admission in each.
rate_windows = sa.Table(
    "llmstore_rate_windows",
    metadata,
    _owner("rate_limit_id", "llmstore_rate_limits"),
    sa.Column("window_start", UTCDateTime(), primary_key=True),
    sa.Column("requests", sa.BigInteger(), nullable=False),
    sa.Column("tokens", sa.BigInteger(), nullable=False),
    sa.CheckConstraint("requests >= 0 AND tokens >= 0", name="not_negative"),
)

admissions = sa.Table(
    "llmstore_admissions",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    # No foreign keys: an admission is a record of a request, as a usage row is.
    sa.Column("api_key_id", sa.Uuid(), nullable=True),
    sa.Column("token_id", sa.Uuid(), nullable=True),
    sa.Column("project_id", sa.Uuid(), nullable=True),
    sa.Column("end_user", sa.String(200), nullable=True),
    sa.Column("tags", Json, nullable=True),
    # The hold on the key's balance (a reservation of api_keys), when there is one.
    sa.Column("reservation_id", sa.Uuid(), nullable=True),
    sa.Column("cost", sa.BigInteger(), nullable=False),
    sa.Column("tokens", sa.BigInteger(), nullable=False),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    # SHA-256 of the admission's parameters, to tell a replay from a reused key.
    sa.Column("params_digest", sa.String(64), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    # The settlement: what it was called with (its digest tells a retry from another call)
    # and what the key was charged.
    sa.Column("settled_cost", sa.BigInteger(), nullable=True),
    sa.Column("settled_tokens", sa.BigInteger(), nullable=True),
    sa.Column("charged", sa.BigInteger(), nullable=True),
    sa.Column("shortfall", sa.BigInteger(), nullable=True),
    sa.Column("settle_digest", sa.String(64), nullable=True),
    sa.Column("usage_id", sa.BigInteger(), nullable=True),
    sa.UniqueConstraint("idempotency_key"),
    sa.CheckConstraint("status IN ('active', 'settled', 'released', 'expired')", name="status"),
    sa.CheckConstraint("cost >= 0 AND tokens >= 0", name="estimates_not_negative"),
    sa.Index(None, "status", "expires_at"),
)

# Each admission's hold on each budget, in the period it was admitted in.
admission_budgets = sa.Table(
    "llmstore_admission_budgets",
    metadata,
    _owner("admission_id", "llmstore_admissions"),
    _owner("budget_id", "llmstore_budgets"),
    sa.Column("period_start", UTCDateTime(), nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    # What was charged to the budget when the admission settled (None until then).
    sa.Column("settled_amount", sa.BigInteger(), nullable=True),
    sa.Index(None, "budget_id", "period_start"),
)

# Each admission's request and token estimate in each rate limit's window.
admission_windows = sa.Table(
    "llmstore_admission_windows",
    metadata,
    _owner("admission_id", "llmstore_admissions"),
    _owner("rate_limit_id", "llmstore_rate_limits"),
    sa.Column("window_start", UTCDateTime(), nullable=False),
    sa.Column("tokens", sa.BigInteger(), nullable=False),
    sa.Index(None, "rate_limit_id"),
)
