"""What the data tests (``test_migration_data_*.py``, ``test_migration_lock.py``) seed:
the values, the rows of every table by the revision that creates it (``SEEDS``), and what
revisions add, drop, write themselves and rename.

A new revision adds one entry to ``SEEDS`` (rows for each table it creates: one with every
nullable column set, one with them unset), and, when it adds columns to an existing table
or drops some, to ``ADDED_COLUMNS`` / ``DROPPED_COLUMNS``. Rows a revision writes itself go
in ``REVISION_ROWS``. The tests fail, naming what is missing, until it does.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from typing import Any

Row = dict[str, Any]


# --- the values: near the limits, unicode, offsets, JSON, ciphertext-looking text -----------

BIG = 2**63 - 1  # BigInteger's largest
SMALL = -(2**63)  # ... and smallest
INT32 = 2**31 - 1  # Integer's largest on Postgres
UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
NOW = dt.datetime(2026, 11, 22, 12, 34, 56, 789012, tzinfo=UTC)
# Not UTC: the instant must survive (llmstore stores UTC; the offset itself is not kept).
OFFSET = dt.datetime(2027, 3, 4, 5, 6, 7, 1, tzinfo=dt.timezone(-dt.timedelta(hours=9, minutes=30)))
Y2038 = dt.datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC)
LAST = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

UNICODE_200 = ("名前🦀é\u0301שׁ" * 40)[:200]  # CJK, astral, combining, Hebrew: 200 characters
TRICKY = 'it\'s "quoted"\n\ttab \\ backslash; DROP TABLE projects;--'
FERNET = "gAAAAAB" + base64.urlsafe_b64encode(bytes(range(256)) * 3).decode()
FERNET_2 = "gAAAAAB" + base64.urlsafe_b64encode(hashlib.sha512(b"two").digest()).decode()
DOCUMENT = {
    "unicode": "ünïcödé 🦀 中文",
    "big": BIG,
    "small": SMALL,
    "float": 0.1,
    "nested": {"list": [1, "two", None, True, False, 2.5], "empty": {}, "none": []},
    "null": None,
    "escaped": TRICKY,
}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


P1, P2, P3 = uid(1), uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff"), uid(3)
K1, K2 = uuid.UUID("6c6c6d73-746f-7265-8000-000000000001"), uid(2**64)
B1, B2, B3 = uid(101), uuid.UUID("ffffffff-ffff-4fff-bfff-fffffffffffe"), uid(103)
R1, R2 = uid(201), uid(202)
A1, A2 = uid(301), uid(302)

# --- what every revision seeds, by the revision that creates the table ----------------------

SEEDS: dict[str, dict[str, list[Row]]] = {
    "0001_projects": {
        "projects": [
            {
                "id": P1,
                "name": UNICODE_200,
                "api_key_encrypted": FERNET,
                "is_active": False,
                "created_at": EPOCH,
                "updated_at": OFFSET,
                "deactivated_at": LAST,
            },
            {
                "id": P2,
                "name": "plain",
                "api_key_encrypted": None,
                "is_active": True,
                "created_at": NOW,
                "updated_at": NOW,
                "deactivated_at": None,
            },
            {
                "id": P3,
                "name": TRICKY,
                "api_key_encrypted": "",
                "is_active": True,
                "created_at": Y2038,
                "updated_at": LAST,
                "deactivated_at": None,
            },
        ],
    },
    "0002_tokens_audit_providers": {
        "tokens": [
            {
                "id": uid(11),
                "project_id": P1,
                "secret_digest": digest("token one"),
                "prefix": "lk_0123456789abc",
                "name": "",
                "expires_at": Y2038,
                "is_active": False,
                "deactivated_at": OFFSET,
                "request_count": BIG,
                "max_requests": BIG,
                "cache_hit_count": BIG,
                "created_at": NOW,
                "last_used_at": LAST,
            },
            {
                "id": uid(12),
                "project_id": P2,
                "secret_digest": digest("token two"),
                "prefix": "lk_",
                "name": None,
                "expires_at": None,
                "is_active": True,
                "deactivated_at": None,
                "request_count": 0,
                "max_requests": None,
                "cache_hit_count": 0,
                "created_at": EPOCH,
                "last_used_at": None,
            },
        ],
        "audit_events": [
            {
                "id": uid(21),
                "seq": BIG,
                "timestamp": OFFSET,
                "action": "project.create",
                "actor": UNICODE_200,
                "outcome": "success",
                "project_id": P1,
                "token_id": uid(11),
                "request_id": "req-ünï-" + "x" * 190,
                "client_ip": "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
                "event_metadata": DOCUMENT,
                "prev_hash": "0" * 64,
                "hash": digest("event one"),
            },
            {
                "id": uid(22),
                "seq": 1,
                "timestamp": EPOCH,
                "action": "token.revoke",
                "actor": "system",
                "outcome": "denied",
                "project_id": None,
                "token_id": None,
                "request_id": None,
                "client_ip": None,
                "event_metadata": None,
                "prev_hash": digest("event one"),
                "hash": digest("event two"),
            },
            {
                "id": uid(23),
                "seq": 2,
                "timestamp": LAST,
                "action": "x",
                "actor": TRICKY,
                "outcome": "failure",
                "project_id": uid(999),  # no foreign key: the log outlives its subjects
                "token_id": None,
                "request_id": "",
                "client_ip": "127.0.0.1",
                "event_metadata": [1, "two", None, True, {"k": []}],
                "prev_hash": digest("event two"),
                "hash": digest("event three"),
            },
        ],
        # One row only (CHECK id = 1): it replaces the genesis row of REVISION_ROWS.
        "audit_chain": [
            {
                "id": 1,
                "head_seq": BIG,
                "head_hash": digest("event three"),
                "head_timestamp": OFFSET,
                "anchor_seq": BIG - 1,
                "anchor_hash": digest("anchor"),
                "purged_at": LAST,
            },
        ],
        "provider_credentials": [
            {
                "id": uid(31),
                "project_id": P1,
                "scope": str(P1),
                "provider": "openai",
                "model": UNICODE_200,
                "base_url": "https://example.com/" + "ü" * 1980,
                "api_key_encrypted": FERNET_2,
                "is_active": True,
                "created_at": NOW,
                "updated_at": OFFSET,
            },
            {
                "id": uid(32),
                "project_id": None,
                "scope": "global",
                "provider": "anthropic",
                "model": "claude",
                "base_url": None,
                "api_key_encrypted": None,
                "is_active": True,
                "created_at": EPOCH,
                "updated_at": EPOCH,
            },
            {
                "id": uid(33),
                "project_id": P1,
                "scope": str(P1),
                "provider": "openai",
                "model": "old",
                "base_url": "",
                "api_key_encrypted": "",
                "is_active": False,
                "created_at": Y2038,
                "updated_at": LAST,
            },
        ],
    },
    "0003_api_keys_ledger": {
        "api_keys": [
            {
                "id": K1,
                "secret_digest": digest("key one"),
                "prefix": "sk-ünï🦀",
                "project_id": P1,
                "balance": BIG,
                "reserved": BIG,
                "total_deposited": BIG,
                "total_spent": BIG,
                "created_at": NOW,
                "last_used_at": LAST,
                "expires_at": Y2038,
                "key_metadata": DOCUMENT,
                # Added by 0006 (ADDED_COLUMNS): set when seeded from 0006 on.
                "is_active": False,
                "deactivated_at": OFFSET,
            },
            {
                "id": K2,
                "secret_digest": digest("key two"),
                "prefix": "sk-",
                "project_id": None,
                "balance": 0,
                "reserved": 0,
                "total_deposited": 0,
                "total_spent": 0,
                "created_at": EPOCH,
                "last_used_at": None,
                "expires_at": None,
                "key_metadata": None,
                "is_active": True,
                "deactivated_at": None,
            },
        ],
        "ledger_entries": [
            {
                "id": BIG,
                "api_key_id": K1,
                "kind": "withdrawal_refund",
                "amount": SMALL,
                "balance_after": BIG,
                "description": ("ledger ✓ " * 60)[:500],
                "idempotency_key": "idem-" + "ß" * 195,
                "params_digest": digest("params"),
                "request_data": {"model": "gpt-4o", "tokens": BIG, "doc": DOCUMENT},
                "shortfall": BIG,
                "reservation_id": uid(41),
                "withdrawal_id": uid(51),
                "transfer_id": uid(61),
                "created_at": OFFSET,
            },
            {
                "id": 1,
                "api_key_id": K2,
                "kind": "deposit",
                "amount": 1,
                "balance_after": 0,
                "description": "",
                "idempotency_key": None,
                "params_digest": None,
                "request_data": None,
                "shortfall": 0,
                "reservation_id": None,
                "withdrawal_id": None,
                "transfer_id": None,
                "created_at": EPOCH,
            },
        ],
        "reservations": [
            {
                "id": uid(41),
                "api_key_id": K1,
                "amount": BIG,
                "status": "settled",
                "created_at": NOW,
                "expires_at": LAST,
                "settled_amount": BIG,
                "finished_at": OFFSET,
            },
            {
                "id": uid(42),
                "api_key_id": K2,
                "amount": 1,
                "status": "active",
                "created_at": EPOCH,
                "expires_at": Y2038,
                "settled_amount": None,
                "finished_at": None,
            },
        ],
        "withdrawals": [
            {
                "id": uid(51),
                "api_key_id": K1,
                "amount": BIG,
                "token_encrypted": FERNET,
                "mint_url": "https://mint.example/ünï?q=" + "a" * 1900,
                "status": "failed",
                "created_at": NOW,
                "completed_at": OFFSET,
                "error_message": ("erreur ⚠ " * 250)[:2000],
                "retry_count": INT32,
            },
            {
                "id": uid(52),
                "api_key_id": K2,
                "amount": 1,
                "token_encrypted": FERNET_2,
                "mint_url": "https://mint.example",
                "status": "pending",
                "created_at": EPOCH,
                "completed_at": None,
                "error_message": None,
                "retry_count": 0,
            },
        ],
    },
    "0004_usage_logs_receipts": {
        "usage_logs": [
            {
                "id": BIG,
                "created_at": OFFSET,
                "api_key_id": K1,
                "project_id": P1,
                "token_id": uid(11),
                "request_id": "req-" + "🦀" * 196,
                "alias": UNICODE_200,
                "profile": "fast",
                "provider": "openai",
                "model": "gpt-4o-2024-08-06",
                "origin": "https://app.example",
                "is_streaming": True,
                "success": False,
                "status_code": INT32,
                "response_time_ms": BIG,
                "time_to_first_token_ms": BIG,
                "time_to_last_token_ms": BIG,
                "tokens_per_second": 1.7976931348623157e308,
                "prompt_tokens": BIG,
                "completion_tokens": BIG,
                "cached_tokens": BIG,
                "total_tokens": BIG,
                "cost": BIG,
                "finish_reason": "length",
                "max_tokens": BIG,
                "temperature": 0.1,
                "top_p": 2.2250738585072014e-308,
                "message_count": INT32,
                "error_type": "RateLimitError",
                "error_message": ("429 ✗ " * 700)[:4000],
                "usage_metadata": DOCUMENT,
            },
            {
                "id": 1,
                "created_at": EPOCH,
                "api_key_id": None,
                "project_id": None,
                "token_id": None,
                "request_id": None,
                "alias": None,
                "profile": None,
                "provider": None,
                "model": None,
                "origin": None,
                "is_streaming": False,
                "success": True,
                "status_code": None,
                "response_time_ms": None,
                "time_to_first_token_ms": None,
                "time_to_last_token_ms": None,
                "tokens_per_second": None,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "total_tokens": 0,
                "cost": 0,
                "finish_reason": None,
                "max_tokens": None,
                "temperature": None,
                "top_p": None,
                "message_count": None,
                "error_type": None,
                "error_message": None,
                "usage_metadata": None,
            },
        ],
        "usage_receipts": [
            {
                "id": uid(71),
                "usage_id": BIG,
                "payload": json.dumps(DOCUMENT, ensure_ascii=False, sort_keys=True),
                "signature": base64.b64encode(hashlib.sha512(b"sig").digest()).decode(),
                "public_key": base64.b64encode(hashlib.sha256(b"pub").digest()).decode(),
                "issued_at": OFFSET,
            },
            {
                "id": uid(72),
                "usage_id": 1,
                "payload": "{}",
                "signature": "",
                "public_key": "k",
                "issued_at": EPOCH,
            },
        ],
    },
    # Renames every table (RENAMED_TABLES) and creates none: the rows above, under the new
    # names, are its seeds.
    "0005_llmstore_prefix": {},
    # Referencing tables after the tables they reference (the seeds are inserted in order).
    # Exactly one scope column per budget and rate limit (CHECK): a row per scope.
    "0006_admission": {
        "llmstore_budgets": [
            {
                "id": B1,
                "name": UNICODE_200,
                "project_id": P1,
                "api_key_id": None,
                "token_id": None,
                "end_user": None,
                "tag": None,
                "limit_amount": BIG,
                "period": "fixed",
                "period_seconds": BIG,
                "timezone": "America/Argentina/ComodRivadavia",
                "soft_limits": [1, BIG - 1],
                "anchor_at": OFFSET,
                "created_at": EPOCH,
                "updated_at": LAST,
            },
            {
                "id": B2,
                "name": None,
                "project_id": None,
                "api_key_id": K1,
                "token_id": None,
                "end_user": None,
                "tag": None,
                "limit_amount": 1,
                "period": None,
                "period_seconds": None,
                "timezone": "UTC",
                "soft_limits": [],
                "anchor_at": EPOCH,
                "created_at": NOW,
                "updated_at": NOW,
            },
            {
                "id": B3,
                "name": "",
                "project_id": None,
                "api_key_id": None,
                "token_id": uid(11),
                "end_user": None,
                "tag": None,
                "limit_amount": 1_000,
                "period": "month",
                "period_seconds": None,
                "timezone": "Asia/Kathmandu",
                "soft_limits": [500, 900, 999],
                "anchor_at": LAST,
                "created_at": Y2038,
                "updated_at": OFFSET,
            },
            {
                "id": uid(104),
                "name": TRICKY,
                "project_id": None,
                "api_key_id": None,
                "token_id": None,
                "end_user": UNICODE_200,
                "tag": None,
                "limit_amount": 2,
                "period": "week",
                "period_seconds": None,
                "timezone": "Pacific/Chatham",
                "soft_limits": [1],
                "anchor_at": Y2038,
                "created_at": EPOCH,
                "updated_at": EPOCH,
            },
            {
                "id": uid(105),
                "name": "tagged",
                "project_id": None,
                "api_key_id": None,
                "token_id": None,
                "end_user": None,
                "tag": TRICKY,
                "limit_amount": BIG,
                "period": "year",
                "period_seconds": None,
                "timezone": "Europe/Berlin",
                "soft_limits": [BIG - 1],
                "anchor_at": NOW,
                "created_at": NOW,
                "updated_at": LAST,
            },
            {
                "id": uid(106),
                "name": None,
                "project_id": None,
                "api_key_id": K2,
                "token_id": None,
                "end_user": None,
                "tag": None,
                "limit_amount": 1,
                "period": "day",
                "period_seconds": None,
                "timezone": "America/Los_Angeles",
                "soft_limits": [],
                "anchor_at": EPOCH,
                "created_at": EPOCH,
                "updated_at": EPOCH,
            },
        ],
        # Period starts in UTC: they are part of the primary key, compared as text.
        "llmstore_budget_periods": [
            {"budget_id": B1, "period_start": LAST, "spent": BIG, "reserved": BIG},
            {"budget_id": B1, "period_start": EPOCH, "spent": 0, "reserved": 0},
            {"budget_id": B3, "period_start": Y2038, "spent": 1_000, "reserved": 1},
        ],
        "llmstore_budget_crossings": [
            {
                "budget_id": B1,
                "period_start": LAST,
                "threshold": BIG,
                "admission_id": A1,
                "at_settle": True,
                "crossed_at": OFFSET,
            },
            {
                "budget_id": B1,
                "period_start": LAST,
                "threshold": 1,
                # No foreign key: the crossing outlives the admission's purge.
                "admission_id": uid(999),
                "at_settle": False,
                "crossed_at": EPOCH,
            },
        ],
        "llmstore_rate_limits": [
            {
                "id": R1,
                "name": UNICODE_200,
                "project_id": P2,
                "api_key_id": None,
                "token_id": None,
                "end_user": None,
                "tag": None,
                "max_requests": BIG,
                "max_tokens": BIG,
                "per": "second",
                "created_at": OFFSET,
                "updated_at": LAST,
            },
            {
                "id": R2,
                "name": None,
                "project_id": None,
                "api_key_id": K2,
                "token_id": None,
                "end_user": None,
                "tag": None,
                "max_requests": 1,
                "max_tokens": None,
                "per": "minute",
                "created_at": EPOCH,
                "updated_at": EPOCH,
            },
            {
                "id": uid(203),
                "name": "",
                "project_id": None,
                "api_key_id": None,
                "token_id": uid(12),
                "end_user": None,
                "tag": None,
                "max_requests": None,
                "max_tokens": 1,
                "per": "hour",
                "created_at": NOW,
                "updated_at": OFFSET,
            },
            {
                "id": uid(204),
                "name": TRICKY,
                "project_id": None,
                "api_key_id": None,
                "token_id": None,
                "end_user": TRICKY,
                "tag": None,
                "max_requests": INT32,
                "max_tokens": None,
                "per": "day",
                "created_at": Y2038,
                "updated_at": Y2038,
            },
            {
                "id": uid(205),
                "name": None,
                "project_id": None,
                "api_key_id": None,
                "token_id": None,
                "end_user": None,
                "tag": UNICODE_200,
                "max_requests": None,
                "max_tokens": BIG,
                "per": "day",
                "created_at": EPOCH,
                "updated_at": NOW,
            },
        ],
        # Window starts in UTC: they are part of the primary key, compared as text.
        "llmstore_rate_windows": [
            {"rate_limit_id": R1, "window_start": LAST, "requests": BIG, "tokens": BIG},
            {"rate_limit_id": R1, "window_start": EPOCH, "requests": 0, "tokens": 0},
            {"rate_limit_id": R2, "window_start": NOW, "requests": 1, "tokens": 0},
        ],
        "llmstore_admissions": [
            {
                "id": A1,
                "api_key_id": K1,
                "token_id": uid(11),
                "project_id": P1,
                "end_user": UNICODE_200,
                "tags": ["ünï 🦀", TRICKY, "", "x" * 200],
                "reservation_id": uid(41),
                "cost": BIG,
                "tokens": BIG,
                "status": "settled",
                "idempotency_key": "adm-" + "ß" * 196,
                "params_digest": digest("admission params"),
                "created_at": NOW,
                "expires_at": LAST,
                "finished_at": OFFSET,
                "settled_cost": BIG,
                "settled_tokens": BIG,
                "charged": BIG,
                "shortfall": BIG,
                "settle_digest": digest("settle params"),
                "usage_id": BIG,
            },
            {
                "id": A2,
                "api_key_id": None,
                "token_id": None,
                "project_id": None,
                "end_user": None,
                "tags": None,
                "reservation_id": None,
                "cost": 0,
                "tokens": 0,
                "status": "active",
                "idempotency_key": None,
                "params_digest": None,
                "created_at": EPOCH,
                "expires_at": Y2038,
                "finished_at": None,
                "settled_cost": None,
                "settled_tokens": None,
                "charged": None,
                "shortfall": None,
                "settle_digest": None,
                "usage_id": None,
            },
            {
                # No foreign keys: an admission is a record of a request, as a usage row is.
                "id": uid(303),
                "api_key_id": uid(998),
                "token_id": uid(997),
                "project_id": uid(996),
                "end_user": "",
                "tags": [],
                "reservation_id": uid(995),
                "cost": 1,
                "tokens": 1,
                "status": "released",
                "idempotency_key": "",
                "params_digest": "0" * 64,
                "created_at": OFFSET,
                "expires_at": OFFSET,
                "finished_at": EPOCH,
                "settled_cost": 0,
                "settled_tokens": 0,
                "charged": 0,
                "shortfall": 0,
                "settle_digest": "f" * 64,
                "usage_id": SMALL,
            },
            {
                "id": uid(304),
                "api_key_id": K2,
                "token_id": None,
                "project_id": None,
                "end_user": None,
                "tags": None,
                "reservation_id": None,
                "cost": BIG,
                "tokens": 0,
                "status": "expired",
                "idempotency_key": None,
                "params_digest": None,
                "created_at": Y2038,
                "expires_at": Y2038,
                "finished_at": LAST,
                "settled_cost": None,
                "settled_tokens": None,
                "charged": None,
                "shortfall": None,
                "settle_digest": None,
                "usage_id": None,
            },
        ],
        "llmstore_admission_budgets": [
            {
                "admission_id": A1,
                "budget_id": B1,
                "period_start": LAST,
                "amount": BIG,
                "settled_amount": BIG,
            },
            {
                "admission_id": A1,
                "budget_id": B3,
                "period_start": OFFSET,
                "amount": 0,
                "settled_amount": 0,
            },
            {
                "admission_id": A2,
                "budget_id": B2,
                "period_start": EPOCH,
                "amount": 1,
                "settled_amount": None,
            },
        ],
        "llmstore_admission_windows": [
            {"admission_id": A1, "rate_limit_id": R1, "window_start": LAST, "tokens": BIG},
            {"admission_id": A2, "rate_limit_id": R1, "window_start": OFFSET, "tokens": 0},
            {"admission_id": A2, "rate_limit_id": R2, "window_start": EPOCH, "tokens": 1},
        ],
    },
}

# Columns a revision adds to a table that already exists: revision -> table (its name at
# that revision) -> column -> the value existing rows get (the revision's documented
# default). Seed rows may also set the column (it is used from that revision on).
ADDED_COLUMNS: dict[str, dict[str, dict[str, Any]]] = {
    "0006_admission": {"llmstore_api_keys": {"is_active": True, "deactivated_at": None}},
}


# Columns a revision drops: revision -> table -> column -> the value rows get back when
# the revision is downgraded (the seeded value is gone by then). Seeds keep the column for
# the revisions before.
DROPPED_COLUMNS: dict[str, dict[str, dict[str, Any]]] = {}

# Rows a revision writes itself when it creates a table (replaced by the seeds).
REVISION_ROWS: dict[str, dict[str, list[Row]]] = {
    "0002_tokens_audit_providers": {
        "audit_chain": [
            {
                "id": 1,
                "head_seq": 0,
                "head_hash": "0" * 64,
                "head_timestamp": None,
                "anchor_seq": 0,
                "anchor_hash": "0" * 64,
                "purged_at": None,
            }
        ],
    },
}

# Tables that hold at most one row: their nullable columns cannot be both set and unset.
SINGLE_ROW_TABLES = {"audit_chain", "llmstore_audit_chain"}

# Tables a revision renames, old name -> new name: seeds and documented rows keep the name
# of the revision that has them, and are looked for under the name of the revision checked.
RENAMED_TABLES: dict[str, dict[str, str]] = {
    "0005_llmstore_prefix": {
        name: f"llmstore_{name}"
        for name in (
            "projects",
            "tokens",
            "audit_events",
            "audit_chain",
            "provider_credentials",
            "api_keys",
            "ledger_entries",
            "reservations",
            "withdrawals",
            "usage_logs",
            "usage_receipts",
        )
    }
}


def _missing_seed_message(missing: list[str]) -> str:
    return (
        f"revision(s) {', '.join(missing)} have no entry in SEEDS of {__name__}: add rows for "
        "every table they create (and ADDED_COLUMNS / DROPPED_COLUMNS for columns they add "
        "or drop), so that the data tests cover them"
    )
