"""What the data tests (``test_migration_data_*.py``, ``test_migration_lock.py``) seed:
the rows of every table by the revision that creates it (``SEEDS``; the values are in
``data_values.py``, revision 0006's rows in ``data_seeds_0006.py``), and what revisions
add, drop, write themselves and rename.

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
from typing import Any

from tests.migrations.data_seeds_0006 import SEEDS_0006
from tests.migrations.data_values import (
    BIG,
    DOCUMENT,
    EPOCH,
    FERNET,
    FERNET_2,
    INT32,
    K1,
    K2,
    LAST,
    NOW,
    OFFSET,
    P1,
    P2,
    P3,
    SMALL,
    TRICKY,
    UNICODE_200,
    Y2038,
    Row,
    digest,
    uid,
)

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
                # Added by 0008 (ADDED_COLUMNS): set when seeded from 0008 on.
                "cache_write_tokens": BIG,
                "reasoning_tokens": BIG,
                "audio_input_tokens": BIG,
                "audio_output_tokens": BIG,
                "end_user": UNICODE_200,
                "session_id": "sess-" + "🦀" * 195,
                "service_tier": "priority",
                "tags": [UNICODE_200, "a", TRICKY[:200]],
                "usage_source": "estimated",
                "cost_source": "price_table",
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
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "audio_input_tokens": 0,
                "audio_output_tokens": 0,
                "end_user": None,
                "session_id": None,
                "service_tier": None,
                "tags": None,
                "usage_source": "missing",
                "cost_source": "none",
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
    "0006_admission": SEEDS_0006,
    # Adds a column (ADDED_COLUMNS) and creates no table.
    "0007_budget_period_end": {},
    # Adds columns to the usage rows (ADDED_COLUMNS) and creates no table.
    "0008_usage_details": {},
    "0009_prices": {
        "llmstore_prices": [
            {
                "id": uid(91),
                "provider": UNICODE_200,
                "model": "m-" + "🦀" * 198,
                # The undated price's start: the year 1.
                "valid_from": dt.datetime(1, 1, 1, tzinfo=dt.UTC),
                "source": "manual",
                "input": "0." + "0" * 60 + "1",
                "output": "9" * 63,
                "cached_input": "0",
                "cache_write": "3.75",
                "reasoning": "12",
                "audio_input": "40",
                "audio_output": "80.000000000000000001",
                "tiers": [{"above": 200_000, "input": "5", "output": "22.5"}],
                "created_at": EPOCH,
                "updated_at": LAST,
            },
            {
                "id": uid(92),
                "provider": "openai",
                "model": "gpt-4o",
                "valid_from": OFFSET,
                "source": "genai-prices",
                "input": "2.5",
                "output": "10",
                "cached_input": None,
                "cache_write": None,
                "reasoning": None,
                "audio_input": None,
                "audio_output": None,
                "tiers": None,
                "created_at": NOW,
                "updated_at": NOW,
            },
        ],
    },
}

# Columns a revision adds to a table that already exists: revision -> table (its name at
# that revision) -> column -> the value existing rows get (the revision's documented
# default). Seed rows may also set the column (it is used from that revision on).
ADDED_COLUMNS: dict[str, dict[str, dict[str, Any]]] = {
    "0006_admission": {"llmstore_api_keys": {"is_active": True, "deactivated_at": None}},
    "0007_budget_period_end": {"llmstore_budget_periods": {"period_end": None}},
    "0008_usage_details": {
        "llmstore_usage_logs": {
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "audio_input_tokens": 0,
            "audio_output_tokens": 0,
            "end_user": None,
            "session_id": None,
            "service_tier": None,
            "tags": None,
            "usage_source": "reported",
            "cost_source": "given",
        }
    },
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
