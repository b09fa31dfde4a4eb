"""The raw way's admission statements: those of llmstore's admit and settle
(``llmstore/_admission/admit.py``, ``finish.py``, and the key's hold in
``llmstore/_billing/money.py``) on the raw tables, with ``:name`` markers that
``RawDB.sql()`` turns into the dialect's parameters.

llmstore binds the constants of its statements (the ``1`` of ``requests + 1``) as
parameters; here they are literals, as in the other raw statements. The key's hold, its
reservation and the settlement's ledger entry are in :mod:`benchmarks.billing_sql`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Final

#: The columns of llmstore's key lookup (``find_key``), in its order.
KEY_COLUMNS: Final = (
    "id, project_id, prefix, balance, reserved, total_deposited, total_spent, created_at,"
    " last_used_at, expires_at, key_metadata, is_active, deactivated_at"
)
KEY_PROJECT, KEY_EXPIRES_AT, KEY_IS_ACTIVE = 1, 9, 11

RATE_LIMIT_COLUMNS: Final = (
    "id, name, project_id, api_key_id, token_id, end_user, tag, max_requests, max_tokens, per,"
    " created_at, updated_at"
)
LIMIT_MAX_REQUESTS, LIMIT_MAX_TOKENS, LIMIT_PER = 7, 8, 9

BUDGET_NAMES: Final = (
    "id",
    "name",
    "project_id",
    "api_key_id",
    "token_id",
    "end_user",
    "tag",
    "limit_amount",
    "period",
    "period_seconds",
    "timezone",
    "soft_limits",
    "anchor_at",
    "created_at",
    "updated_at",
)
BUDGET_COLUMNS: Final = ", ".join(BUDGET_NAMES)
BUDGET_LIMIT, BUDGET_PERIOD, BUDGET_SOFT_LIMITS, BUDGET_ANCHOR = 7, 8, 11, 12

#: What an admission's INSERT returns (llmstore's ``ADMISSION_COLUMNS``).
ADMISSION_COLUMNS: Final = (
    "id, status, api_key_id, token_id, project_id, end_user, tags, cost, tokens,"
    " reservation_id, created_at, expires_at"
)

# -- admit --------------------------------------------------------------------------------

RAW_KEY_BY_DIGEST: Final = f"SELECT {KEY_COLUMNS} FROM raw_api_keys WHERE secret_digest = :digest"
RAW_KEY_BY_ID: Final = f"SELECT {KEY_COLUMNS} FROM raw_api_keys WHERE id = :key_id"
# The limits of the request's scopes: a key of a project has two (llmstore's scope_filter).
RAW_RATE_LIMITS_OF: Final = (
    f"SELECT {RATE_LIMIT_COLUMNS} FROM raw_rate_limits"
    " WHERE project_id = :project_id OR api_key_id = :key_id ORDER BY id"
)
RAW_BUDGETS_OF: Final = (
    f"SELECT {BUDGET_COLUMNS} FROM raw_budgets"
    " WHERE project_id = :project_id OR api_key_id = :key_id ORDER BY id"
)


def raw_count_window(*, requests: bool, tokens: bool) -> str:
    """One request and ``:tokens`` more in the window, if it has room: the room checked is
    that of the limit's ``max_requests`` and ``max_tokens`` that are set."""
    room = []
    if requests:
        room.append("raw_rate_windows.requests < :max_requests")
    if tokens:
        room.append("raw_rate_windows.tokens <= :tokens_room")
    return (
        "INSERT INTO raw_rate_windows (rate_limit_id, window_start, requests, tokens)"
        " VALUES (:rate_limit_id, :window_start, 1, :tokens)"
        " ON CONFLICT (rate_limit_id, window_start) DO UPDATE"
        " SET requests = raw_rate_windows.requests + 1,"
        " tokens = raw_rate_windows.tokens + :tokens"
        f" WHERE {' AND '.join(room)} RETURNING requests"
    )


# The cost held in the budget's period if it has room (an exhausted period refuses even a
# request estimated at nothing): ``:room`` is ``limit - cost``.
RAW_HOLD_PERIOD: Final = (
    "INSERT INTO raw_budget_periods (budget_id, period_start, spent, reserved)"
    " VALUES (:budget_id, :period_start, 0, :cost)"
    " ON CONFLICT (budget_id, period_start) DO UPDATE"
    " SET reserved = raw_budget_periods.reserved + :cost"
    " WHERE raw_budget_periods.spent + raw_budget_periods.reserved <= :room"
    " AND raw_budget_periods.spent + raw_budget_periods.reserved < :limit"
    " RETURNING spent, reserved"
)
ADMISSION_NAMES: Final = (
    "id",
    "api_key_id",
    "token_id",
    "project_id",
    "end_user",
    "tags",
    "reservation_id",
    "cost",
    "tokens",
    "status",
    "idempotency_key",
    "params_digest",
    "created_at",
    "expires_at",
    "finished_at",
    "settled_cost",
    "settled_tokens",
    "charged",
    "shortfall",
    "settle_digest",
    "usage_id",
)
RAW_INSERT_ADMISSION: Final = (
    f"INSERT INTO raw_admissions ({', '.join(ADMISSION_NAMES)})"
    f" VALUES ({', '.join(':' + name for name in ADMISSION_NAMES)})"
    f" RETURNING {ADMISSION_COLUMNS}"
)
RAW_INSERT_ADMISSION_BUDGET: Final = (
    "INSERT INTO raw_admission_budgets (admission_id, budget_id, period_start, amount,"
    " settled_amount) VALUES (:admission_id, :budget_id, :period_start, :amount, NULL)"
)
RAW_INSERT_ADMISSION_WINDOW: Final = (
    "INSERT INTO raw_admission_windows (admission_id, rate_limit_id, window_start, tokens)"
    " VALUES (:admission_id, :rate_limit_id, :window_start, :tokens)"
)
# A crossing, reported once per budget, period and threshold. llmstore reads the row
# count; the raw way asks for the row back (never reached here: the limits are far).
RAW_INSERT_CROSSING: Final = (
    "INSERT INTO raw_budget_crossings (budget_id, period_start, threshold, admission_id,"
    " at_settle, crossed_at)"
    " VALUES (:budget_id, :period_start, :threshold, :admission_id, :at_settle, :now)"
    " ON CONFLICT (budget_id, period_start, threshold) DO NOTHING RETURNING threshold"
)

# -- settle -------------------------------------------------------------------------------

RAW_SETTLE_ADMISSION: Final = (
    "UPDATE raw_admissions SET status = :status, finished_at = :now, settled_cost = :cost,"
    " settled_tokens = :tokens, settle_digest = :digest"
    " WHERE id = :id AND status = :active RETURNING api_key_id, reservation_id, tokens"
)
RAW_COUNTED_WINDOWS: Final = (
    "SELECT rate_limit_id, window_start FROM raw_admission_windows"
    " WHERE admission_id = :id ORDER BY rate_limit_id"
)
# Never below zero: a window swept and made again by a later request starts at 0.
RAW_CORRECT_WINDOW: Final = (
    "UPDATE raw_rate_windows"
    " SET tokens = CASE WHEN tokens + :delta >= 0 THEN tokens + :delta ELSE 0 END"
    " WHERE rate_limit_id = :rate_limit_id AND window_start = :window_start"
)
RAW_CORRECT_ADMISSION_WINDOWS: Final = (
    "UPDATE raw_admission_windows SET tokens = tokens + :delta WHERE admission_id = :id"
)
RAW_HELD_BUDGETS: Final = (
    "SELECT raw_admission_budgets.period_start, raw_admission_budgets.amount, "
    + ", ".join(f"raw_budgets.{name}" for name in BUDGET_NAMES)
    + " FROM raw_admission_budgets"
    " JOIN raw_budgets ON raw_budgets.id = raw_admission_budgets.budget_id"
    " WHERE raw_admission_budgets.admission_id = :id ORDER BY raw_admission_budgets.budget_id"
)
RAW_SETTLE_PERIOD: Final = (
    "UPDATE raw_budget_periods SET spent = spent + :cost, reserved = reserved - :amount"
    " WHERE budget_id = :budget_id AND period_start = :period_start RETURNING spent, reserved"
)
RAW_SETTLED_BUDGETS: Final = (
    "UPDATE raw_admission_budgets SET settled_amount = :cost WHERE admission_id = :id"
)
# The key's settlement (llmstore's settle_hold, then money.settle): lock the hold (an
# expired one takes another path), finish it, lock the key and compute what it pays, charge
# it, note the amount on the hold, write the entry (RAW_FINISH, RAW_SETTLE_KEY and
# RAW_INSERT_ENTRY are billing's).
RAW_LOCK_RESERVATION: Final = "SELECT status, api_key_id FROM raw_reservations WHERE id = :id"
RAW_CHARGEABLE: Final = (
    "SELECT CASE WHEN :actual <= balance - reserved + :hold THEN :actual"
    " ELSE balance - reserved + :hold END FROM raw_api_keys WHERE id = :key_id"
)
RAW_SETTLED_RESERVATION: Final = (
    "UPDATE raw_reservations SET settled_amount = :charged WHERE id = :id RETURNING id"
)
RAW_ADMISSION_CHARGED: Final = (
    "UPDATE raw_admissions SET charged = :charged, shortfall = :shortfall, usage_id = :usage_id"
    " WHERE id = :id"
)

# -- what llmstore computes in Python (the raw and ORM ways' copies) ------------------------


class AdmissionRefused(Exception):
    """The raw and ORM variants' refusal; never raised while benchmarking."""


EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
WINDOWS: Final = {
    "second": dt.timedelta(seconds=1),
    "minute": dt.timedelta(minutes=1),
    "hour": dt.timedelta(hours=1),
    "day": dt.timedelta(days=1),
}


def window_start(per: str, at: dt.datetime) -> dt.datetime:
    """The start of the rate window of ``per`` that holds ``at``: windows are aligned to
    the Unix epoch."""
    length = WINDOWS[per]
    return EPOCH + ((at - EPOCH) // length) * length


def settle_digest(cost: int, tokens: int | None) -> str:
    """What llmstore stores to tell a settlement's retry from another call (no usage row)."""
    canonical = json.dumps(
        ("settle", cost, tokens, None), sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def crossed(soft_limits: list[int], limit: int, before: int, after: int) -> list[int]:
    """The thresholds (soft limits, then the limit) that a level passed from ``before`` to
    ``after``."""
    return [threshold for threshold in (*soft_limits, limit) if before < threshold <= after]


# -- the untimed setup --------------------------------------------------------------------

# A lifetime budget (period NULL) of one scope, in UTC, without soft limits.
RAW_INSERT_BUDGET: Final = (
    f"INSERT INTO raw_budgets ({BUDGET_COLUMNS})"
    " VALUES (:id, NULL, :project_id, :api_key_id, NULL, NULL, NULL, :limit, NULL, NULL, 'UTC',"
    " :soft_limits, :now, :now, :now)"
)
RAW_INSERT_RATE_LIMIT: Final = (
    f"INSERT INTO raw_rate_limits ({RATE_LIMIT_COLUMNS})"
    " VALUES (:id, NULL, :project_id, :api_key_id, NULL, NULL, NULL, :max_requests, NULL, :per,"
    " :now, :now)"
)
