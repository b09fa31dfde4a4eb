"""The raw way's billing statements: those of llmstore's ledger and holds
(``llmstore/_billing/ledger.py``, ``llmstore/_billing/holds.py``) on the raw tables, with
``:name`` markers that ``RawDB.sql()`` turns into the dialect's parameters."""

from __future__ import annotations

from typing import Final

MAX_INT64: Final = 2**63 - 1


#: The columns that a ledger write returns, in the order of llmstore's ``LedgerEntry``.
ENTRY_COLUMNS: Final = (
    "id, api_key_id, kind, amount, balance_after, description, idempotency_key, "
    "request_data, shortfall, reservation_id, withdrawal_id, transfer_id, created_at"
)
RESERVATION_COLUMNS: Final = (
    "id, api_key_id, amount, status, created_at, expires_at, settled_amount, finished_at"
)

RAW_INSERT_ENTRY: Final = (
    "INSERT INTO raw_ledger_entries (api_key_id, kind, amount, balance_after, description,"
    " idempotency_key, params_digest, request_data, shortfall, reservation_id, withdrawal_id,"
    " transfer_id, created_at)"
    " VALUES (:api_key_id, :kind, :amount, :balance_after, :description, :idempotency_key,"
    " :params_digest, :request_data, :shortfall, :reservation_id, :withdrawal_id, :transfer_id,"
    " :created_at)"
    f" RETURNING {ENTRY_COLUMNS}"
)
# A charge's debit without an idempotency key: enough available, and total_spent cannot
# overflow. (A keyed charge also checks that no entry has its key yet.)
RAW_DEBIT_WHERE: Final = (
    " WHERE id = :key_id AND balance - reserved >= :amount"
    f" AND total_spent <= {MAX_INT64} - :amount"
)
RAW_DEBIT: Final = (
    "UPDATE raw_api_keys SET balance = balance - :amount, total_spent = total_spent + :amount,"
    " last_used_at = :now" + RAW_DEBIT_WHERE + " RETURNING balance"
)
# Postgres: the debit feeding its entry's INSERT, one statement (llmstore's CHARGE_CTE).
RAW_CHARGE_CTE: Final = (
    "WITH changed AS ("
    "UPDATE raw_api_keys SET balance = balance - :amount::BIGINT,"
    " total_spent = total_spent + :amount::BIGINT, last_used_at = :now::TIMESTAMPTZ"
    + RAW_DEBIT_WHERE
    + " RETURNING id, balance)"
    " INSERT INTO raw_ledger_entries (api_key_id, kind, amount, balance_after, description,"
    " idempotency_key, params_digest, request_data, shortfall, created_at)"
    " SELECT changed.id, 'charge', -:amount::BIGINT, changed.balance, :description::VARCHAR,"
    " :idempotency_key::VARCHAR, :params_digest::VARCHAR, :request_data::JSON, 0,"
    " :now::TIMESTAMPTZ FROM changed"
    f" RETURNING {ENTRY_COLUMNS}"
)
RAW_HOLD: Final = (
    "UPDATE raw_api_keys SET reserved = reserved + :amount, last_used_at = :now"
    " WHERE id = :key_id AND balance - reserved >= :amount RETURNING id"
)
RAW_INSERT_RESERVATION: Final = (
    "INSERT INTO raw_reservations (id, api_key_id, amount, status, created_at, expires_at,"
    " settled_amount, finished_at)"
    " VALUES (:id, :api_key_id, :amount, :status, :created_at, :expires_at, :settled_amount,"
    " :finished_at)"
    f" RETURNING {RESERVATION_COLUMNS}"
)
RAW_FINISH: Final = (
    "UPDATE raw_reservations SET status = :status, finished_at = :now"
    f" WHERE id = :id AND status = :active RETURNING {RESERVATION_COLUMNS}"
)
# Postgres: the hold feeding its reservation's INSERT, one statement (llmstore's RESERVE_CTE).
RAW_RESERVE_CTE: Final = (
    "WITH holding AS ("
    "UPDATE raw_api_keys SET reserved = reserved + :amount::BIGINT,"
    " last_used_at = :now::TIMESTAMPTZ"
    " WHERE id = :key_id::UUID AND balance - reserved >= :amount::BIGINT RETURNING id)"
    " INSERT INTO raw_reservations (id, api_key_id, amount, status, created_at, expires_at)"
    " SELECT :id::UUID, holding.id, :amount::BIGINT, 'active', :now::TIMESTAMPTZ,"
    " :expires_at::TIMESTAMPTZ FROM holding"
    f" RETURNING {RESERVATION_COLUMNS}"
)
# Postgres: lock the hold, lock its key, charge, finish the hold and write the entry, one
# statement (llmstore's SETTLE_CTE).
RAW_SETTLE_CTE: Final = (
    "WITH pending AS ("
    "SELECT id, api_key_id, amount FROM raw_reservations"
    " WHERE id = :id::UUID AND status = 'active' FOR UPDATE),"
    " account AS ("
    "SELECT raw_api_keys.id, pending.id AS reservation_id, pending.amount AS hold,"
    " LEAST(:actual::BIGINT, raw_api_keys.balance - raw_api_keys.reserved + pending.amount)"
    " AS charged"
    " FROM raw_api_keys JOIN pending ON raw_api_keys.id = pending.api_key_id"
    " FOR UPDATE OF raw_api_keys),"
    " changed AS ("
    "UPDATE raw_api_keys SET reserved = raw_api_keys.reserved - account.hold,"
    " balance = raw_api_keys.balance - account.charged,"
    " total_spent = raw_api_keys.total_spent + account.charged,"
    " last_used_at = :now::TIMESTAMPTZ"
    " FROM account WHERE raw_api_keys.id = account.id"
    " RETURNING raw_api_keys.id, raw_api_keys.balance, account.charged),"
    " finished AS ("
    "UPDATE raw_reservations SET status = 'settled', finished_at = :now::TIMESTAMPTZ,"
    " settled_amount = account.charged"
    " FROM account WHERE raw_reservations.id = account.reservation_id"
    " RETURNING raw_reservations.id)"
    " INSERT INTO raw_ledger_entries (api_key_id, kind, amount, balance_after, description,"
    " shortfall, reservation_id, created_at)"
    " SELECT changed.id, 'settlement', -changed.charged, changed.balance, '',"
    " :actual::BIGINT - changed.charged, finished.id, :now::TIMESTAMPTZ"
    " FROM changed JOIN finished ON true"
    f" RETURNING {ENTRY_COLUMNS}"
)
RAW_KEY_FOR_SETTLE: Final = "SELECT balance, reserved FROM raw_api_keys WHERE id = :key_id"
RAW_SETTLE_KEY: Final = (
    "UPDATE raw_api_keys SET reserved = reserved - :hold, balance = balance - :charged,"
    " total_spent = total_spent + :charged, last_used_at = :now"
    " WHERE id = :key_id RETURNING balance"
)
RAW_SETTLED_AMOUNT: Final = "UPDATE raw_reservations SET settled_amount = :charged WHERE id = :id"


def entry_values(
    api_key_id: object,
    kind: str,
    amount: int,
    balance_after: object,
    now: object,
    *,
    description: str = "",
    shortfall: int = 0,
    reservation_id: object = None,
) -> dict[str, object]:
    """A ledger row's parameters, as llmstore's INSERT_ENTRY binds them."""
    return {
        "api_key_id": api_key_id,
        "kind": kind,
        "amount": amount,
        "balance_after": balance_after,
        "description": description,
        "idempotency_key": None,
        "params_digest": None,
        "request_data": None,
        "shortfall": shortfall,
        "reservation_id": reservation_id,
        "withdrawal_id": None,
        "transfer_id": None,
        "created_at": now,
    }
