"""The ledger's primitives: every balance change and its entry, written together.

A debit is a conditional ``UPDATE ... RETURNING`` (``balance - reserved >= amount``): the
database checks and changes the balance in one step, so concurrent debits never
overspend (Postgres re-checks the condition on the locked row; SQLite writes one at a
time). Its entry is inserted in the same transaction, or, on Postgres outside a
transaction, in the same statement: a data-modifying CTE (:data:`CHARGE_CTE`).

Idempotency: an entry's ``(api_key_id, idempotency_key)`` is unique. A repeated call
finds the first entry and returns it if its parameters (``params_digest``) match;
two racing calls cannot both insert, and the loser's whole statement is undone, its
balance change with it. The unique index is the only guard: a ``NOT EXISTS`` in the
``UPDATE`` cannot see a racing call's entry under READ COMMITTED, and on Postgres a
generic plan cached before the ledger's first ANALYZE ran it as a scan of all the key's
entries, so charges slowed down with every entry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import uuid
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from llmstore._core.errors import (
    ConflictError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    LlmstoreError,
    NotFoundError,
    ValidationError,
)
from llmstore._core.validate import (
    MAX_INT64,
    check_json_mapping,
    check_positive_int,
    check_text,
    plain_text,
)
from llmstore._db.lean import LeanStatement, Row
from llmstore._db.schema import UTCDateTime, api_keys, ledger_entries

EntryKind = Literal[
    "deposit",
    "charge",
    "settlement",
    "transfer_in",
    "transfer_out",
    "withdrawal",
    "withdrawal_refund",
]
DESCRIPTION_MAX = 500


class LedgerEntry(BaseModel):
    """One balance change. ``amount`` is signed: credits positive, debits negative."""

    model_config = ConfigDict(frozen=True)

    id: int
    api_key_id: uuid.UUID
    kind: EntryKind
    amount: int
    balance_after: int
    description: str
    idempotency_key: str | None
    request_data: dict[str, Any] | None
    shortfall: int
    reservation_id: uuid.UUID | None
    withdrawal_id: uuid.UUID | None
    transfer_id: uuid.UUID | None
    created_at: dt.datetime


K = api_keys
L = ledger_entries
ENTRY_COLUMNS = (
    L.c.id,
    L.c.api_key_id,
    L.c.kind,
    L.c.amount,
    L.c.balance_after,
    L.c.description,
    L.c.idempotency_key,
    L.c.request_data,
    L.c.shortfall,
    L.c.reservation_id,
    L.c.withdrawal_id,
    L.c.transfer_id,
    L.c.created_at,
)
_ENTRY_NAMES = tuple(column.name for column in ENTRY_COLUMNS)


def entry(row: Row) -> LedgerEntry:
    return LedgerEntry.model_construct(**dict(zip(_ENTRY_NAMES, row, strict=True)))


def check_amount(value: object, what: str = "amount") -> int:
    return check_positive_int(value, what)


def check_description(value: object) -> str:
    text = plain_text(value, "description")
    return text if text == "" else check_text(text, "description", max_length=DESCRIPTION_MAX)


def check_idempotency_key(value: object) -> str | None:
    return None if value is None else check_text(value, "idempotency_key", max_length=200)


@dataclasses.dataclass(frozen=True)
class Movement:
    """A checked balance change, ready to be written: ``amount`` is positive."""

    key_id: uuid.UUID
    kind: EntryKind
    amount: int
    description: str = ""
    idempotency_key: str | None = None
    request_data: dict[str, Any] | None = None
    reservation_id: uuid.UUID | None = None
    withdrawal_id: uuid.UUID | None = None
    transfer_id: uuid.UUID | None = None
    shortfall: int = 0
    params_digest: str | None = None

    @property
    def signed_amount(self) -> int:
        return self.amount if self.kind in _CREDITS else -self.amount

    def params(self, now: dt.datetime) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "amount": self.amount,
            "now": now,
            "idempotency_key": self.idempotency_key,
            "description": self.description,
            "params_digest": self.params_digest,
            "request_data": self.request_data,
        }


_CREDITS = frozenset({"deposit", "transfer_in", "withdrawal_refund"})
_SPENT = frozenset({"charge", "settlement"})


def params_digest(*parts: object) -> str:
    """What identifies an idempotent call's parameters."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def movement(
    key_id: uuid.UUID,
    kind: EntryKind,
    amount: object,
    *,
    description: object = "",
    idempotency_key: object = None,
    request_data: object = None,
    extra: tuple[object, ...] = (),
) -> Movement:
    """A checked movement; with an idempotency key, the digest of its parameters."""
    checked_amount = check_amount(amount)
    checked_description = check_description(description)
    checked_key = check_idempotency_key(idempotency_key)
    checked_data = check_json_mapping(request_data, "request_data")
    digest = None
    if checked_key is not None:
        digest = params_digest(
            kind, str(key_id), checked_amount, checked_description, checked_data, *extra
        )
    return Movement(
        key_id=key_id,
        kind=kind,
        amount=checked_amount,
        description=checked_description,
        idempotency_key=checked_key,
        request_data=checked_data,
        params_digest=digest,
    )


_KEY = sa.bindparam("key_id", type_=sa.Uuid())
_AMOUNT = sa.bindparam("amount", type_=sa.BigInteger())
_NOW = sa.bindparam("now", type_=UTCDateTime())
_IDEMPOTENCY_KEY = sa.bindparam("idempotency_key", type_=sa.String(200))


def _debit(*, spent: bool) -> sa.Update:
    values: dict[str, Any] = {"balance": K.c.balance - _AMOUNT, "last_used_at": _NOW}
    conditions = [K.c.id == _KEY, K.c.balance - K.c.reserved >= _AMOUNT]
    if spent:
        values["total_spent"] = K.c.total_spent + _AMOUNT
        conditions.append(K.c.total_spent <= MAX_INT64 - _AMOUNT)
    return K.update().where(*conditions).values(**values)


def _credit(*, deposited: bool) -> sa.Update:
    # SQLite turns an overflowing integer into a float: refuse it before it happens.
    values: dict[str, Any] = {"balance": K.c.balance + _AMOUNT}
    conditions = [K.c.id == _KEY, K.c.balance <= MAX_INT64 - _AMOUNT]
    if deposited:
        values["total_deposited"] = K.c.total_deposited + _AMOUNT
        conditions.append(K.c.total_deposited <= MAX_INT64 - _AMOUNT)
    return K.update().where(*conditions).values(**values)


def _change(kind: EntryKind) -> LeanStatement:
    if kind in _CREDITS:
        statement = _credit(deposited=kind == "deposit")
    else:
        statement = _debit(spent=kind in _SPENT)
    return LeanStatement(statement.returning(K.c.balance), (K.c.balance,))


_CHANGES: dict[str, LeanStatement] = {
    kind: _change(kind)
    for kind in ("deposit", "charge", "transfer_in", "transfer_out", "withdrawal")
}
_CHANGES["withdrawal_refund"] = _CHANGES["transfer_in"]
INSERT_ENTRY = LeanStatement(
    L.insert()
    .values({column.name: sa.bindparam(column.name) for column in L.c if column.name != "id"})
    .returning(*ENTRY_COLUMNS),
    ENTRY_COLUMNS,
)


def insert_entry_from(values: dict[str, Any], source: sa.FromClause) -> LeanStatement:
    """``INSERT INTO ledger_entries ... SELECT`` from ``source``, a data-modifying CTE.

    ``values`` maps the entry's columns to expressions on ``source``, so the entry is
    written by the statement that changes the balance.
    """
    rows = sa.select(*values.values()).select_from(source)
    return LeanStatement(
        L.insert().from_select(list(values), rows).returning(*ENTRY_COLUMNS), ENTRY_COLUMNS
    )


def _one_statement(kind: EntryKind) -> LeanStatement:
    """Postgres: the balance change feeding its entry's INSERT, in one statement."""
    change = _CHANGES[kind].statement
    assert isinstance(change, sa.Update)
    changed = change.returning(K.c.id).cte("changed")
    values = {
        "api_key_id": changed.c.id,
        "kind": sa.literal(kind, sa.String(20)),
        "amount": _AMOUNT if kind in _CREDITS else -_AMOUNT,
        "balance_after": changed.c.balance,
        "description": sa.bindparam("description", type_=sa.String(DESCRIPTION_MAX)),
        "idempotency_key": _IDEMPOTENCY_KEY,
        "params_digest": sa.bindparam("params_digest", type_=sa.String(64)),
        "request_data": sa.bindparam("request_data", type_=L.c.request_data.type),
        "shortfall": sa.literal(0, sa.BigInteger()),
        "created_at": _NOW,
    }
    return insert_entry_from(values, changed)


CHARGE_CTE = _one_statement("charge")
DEPOSIT_CTE = _one_statement("deposit")

_ENTRY_BY_IDEMPOTENCY_KEY = (
    sa.select(*ENTRY_COLUMNS, L.c.params_digest)
    .where(L.c.api_key_id == sa.bindparam("key_id"))
    .where(L.c.idempotency_key == sa.bindparam("idempotency_key"))
)


class Ledger:
    """Balance changes with their entries, on one connection inside one transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def replay(self, move: Movement) -> LedgerEntry | None:
        """The entry an earlier call with this idempotency key wrote, if any."""
        if move.idempotency_key is None:
            return None
        row = self._conn.execute(
            _ENTRY_BY_IDEMPOTENCY_KEY,
            {"key_id": move.key_id, "idempotency_key": move.idempotency_key},
        ).first()
        if row is None:
            return None
        if row.params_digest != move.params_digest:
            raise IdempotencyConflictError(
                f"idempotency key {move.idempotency_key!r} was already used with other "
                "parameters for this API key"
            )
        return entry(tuple(row)[: len(ENTRY_COLUMNS)])

    def apply(self, move: Movement, now: dt.datetime) -> LedgerEntry:
        """Change the balance and write the entry; refuses overdrafts and overflows."""
        replayed = self.replay(move)
        if replayed is not None:
            return replayed
        row = _CHANGES[move.kind].first_any(self._conn, move.params(now))
        if row is None:
            raise self.refusal(move)
        values = {
            "api_key_id": move.key_id,
            "kind": move.kind,
            "amount": move.signed_amount,
            "balance_after": row[0],
            "description": move.description,
            "idempotency_key": move.idempotency_key,
            "params_digest": move.params_digest,
            "request_data": move.request_data,
            "shortfall": move.shortfall,
            "reservation_id": move.reservation_id,
            "withdrawal_id": move.withdrawal_id,
            "transfer_id": move.transfer_id,
            "created_at": now,
        }
        written = INSERT_ENTRY.first_any(self._conn, values)
        assert written is not None
        return entry(written)

    def refusal(self, move: Movement) -> LlmstoreError:
        """Why ``move`` was not applied: no such key, too little money, or an overflow."""
        row = self._account(move.key_id)
        if row is None:
            return NotFoundError(f"no API key with id {move.key_id}")
        if move.kind in _CREDITS:
            return ValidationError(f"a credit of {move.amount} would overflow the balance")
        available = row.balance - row.reserved
        if available < move.amount:
            return InsufficientBalanceError(available=available, requested=move.amount)
        if move.kind in _SPENT and row.total_spent > MAX_INT64 - move.amount:
            return ValidationError(f"a debit of {move.amount} would overflow total_spent")
        return ConflictError("the balance changed while the debit was checked; try again")

    def hold_refusal(self, key_id: uuid.UUID, amount: int) -> LlmstoreError:
        """Why a hold of ``amount`` was not placed: no such key, or too little money."""
        row = self._account(key_id)
        if row is None:
            return NotFoundError(f"no API key with id {key_id}")
        available = row.balance - row.reserved
        if available < amount:
            return InsufficientBalanceError(available=available, requested=amount)
        return ConflictError("the balance changed while the hold was checked; try again")

    def _account(self, key_id: uuid.UUID) -> Any:
        return self._conn.execute(
            sa.select(K.c.balance, K.c.reserved, K.c.total_spent).where(K.c.id == key_id)
        ).first()
