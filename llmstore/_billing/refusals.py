"""Why a money statement wrote nothing, read after it: an error, or "try again".

The one-statement forms (``money.py``) write nothing when their condition fails; these
reads then say whether the key is missing or inactive, the money short, a finished hold
finished, an idempotent call (or a settlement) already answered, or the condition holds
again (a concurrent change came between), which ``first_or_explain`` tries again.

An inactive key refuses new spending: a debit (charge, transfer out, withdrawal) and a
new hold have ``K.c.is_active`` in their condition, and their refusal is
``ApiKeyRejectedError("inactive")``, the reason ``authenticate`` gives. Money coming in
(deposits, transfers in, refunds) and the end of what was started before (settling or
releasing a hold) do not look at it: a deactivated key can be topped up, and the holds
it placed while active are still settled or freed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import (
    ApiKeyRejectedError,
    ConflictError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    LlmstoreError,
    NotFoundError,
    ValidationError,
)
from llmstore._core.validate import MAX_INT64

from .expiry import expire_if_it_makes_room
from .records import CREDITS, ENTRY_COLUMNS, SPENT, K, L, LedgerEntry, Movement, R, entry

_P = sa.bindparam
_ENTRY_BY_IDEMPOTENCY_KEY = (
    sa.select(*ENTRY_COLUMNS, L.c.params_digest)
    .where(L.c.api_key_id == _P("key_id"))
    .where(L.c.idempotency_key == _P("idempotency_key"))
)


def replay(conn: Connection, move: Movement) -> LedgerEntry | None:
    """The entry an earlier call with this idempotency key wrote, if any."""
    if move.idempotency_key is None:
        return None
    row = conn.execute(
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


def refusal(conn: Connection, move: Movement) -> LlmstoreError:
    """Why ``move`` was not applied: no such key, an inactive key's debit, too little
    money, or an overflow."""
    row = _account(conn, move.key_id)
    if row is None:
        return NotFoundError(f"no API key with id {move.key_id}")
    if move.kind in CREDITS:
        return ValidationError(f"a credit of {move.amount} would overflow the balance")
    if not row.is_active:
        return ApiKeyRejectedError("inactive")
    available = row.balance - row.reserved
    if available < move.amount:
        return InsufficientBalanceError(available=available, requested=move.amount)
    if move.kind in SPENT and row.total_spent > MAX_INT64 - move.amount:
        return ValidationError(f"a debit of {move.amount} would overflow total_spent")
    return ConflictError("the balance changed while the debit was checked; try again")


def explain_movement(conn: Connection, move: Movement, now: dt.datetime) -> LedgerEntry | None:
    """After the one statement wrote nothing: the replayed entry, None to try again, or
    the refusal raised. Runs as a write: it may expire the key's lapsed holds."""
    replayed = replay(conn, move)
    if replayed is not None:
        return replayed
    error = refusal(conn, move)
    if isinstance(error, ConflictError):
        return None  # the money is there now
    if _lapsed_holds_make_room(conn, error, move.key_id, now):
        return None  # lapsed holds were in the way
    raise error


def _account(conn: Connection, key_id: uuid.UUID) -> Any:
    return conn.execute(
        sa.select(K.c.balance, K.c.reserved, K.c.total_spent, K.c.is_active).where(K.c.id == key_id)
    ).first()


def hold_refusal(conn: Connection, key_id: uuid.UUID, amount: int) -> LlmstoreError:
    """Why a hold of ``amount`` was not placed: no such key, an inactive key, or too
    little money."""
    row = _account(conn, key_id)
    if row is None:
        return NotFoundError(f"no API key with id {key_id}")
    if not row.is_active:
        return ApiKeyRejectedError("inactive")
    available = row.balance - row.reserved
    if available < amount:
        return InsufficientBalanceError(available=available, requested=amount)
    return ConflictError("the balance changed while the hold was checked; try again")


def _lapsed_holds_make_room(
    conn: Connection, error: LlmstoreError, key_id: uuid.UUID, now: dt.datetime
) -> bool:
    """Expire the key's lapsed holds if that makes room for the refused amount."""
    if not isinstance(error, InsufficientBalanceError):
        return False
    return expire_if_it_makes_room(conn, key_id, error.requested, now)


def explain_hold(conn: Connection, key_id: uuid.UUID, amount: int, now: dt.datetime) -> None:
    """After the one statement held nothing: None to try again, or the refusal raised.
    Runs as a write: it may expire the key's lapsed holds."""
    error = hold_refusal(conn, key_id, amount)
    if _lapsed_holds_make_room(conn, error, key_id, now):
        return  # lapsed holds were in the way
    if not isinstance(error, ConflictError):
        raise error


def not_active(conn: Connection, key: uuid.UUID) -> LlmstoreError:
    """The error for a hold found missing or finished (a hold never becomes active again)."""
    status = conn.execute(sa.select(R.c.status).where(R.c.id == key)).scalar()
    if status is None:
        return NotFoundError(f"no reservation with id {key}")
    return ConflictError(f"reservation {key} is {status}, not active")


def settled_before(conn: Connection, key: uuid.UUID, actual: int) -> LedgerEntry | None:
    """A settle repeated: the settlement of the hold if it was settled with ``actual``
    (``ConflictError`` for another amount), or None when the hold is not settled.

    The entry is the newest settlement of the hold's key naming the hold (a settlement
    charged ``-amount`` and could not collect ``shortfall``: its actual cost is their
    sum). A hold that a sweep expired and an admission charged all the same is not
    settled: settling it here stays a ``ConflictError``.
    """
    hold = conn.execute(sa.select(R.c.status, R.c.api_key_id).where(R.c.id == key)).first()
    if hold is None or hold.status != "settled":
        return None
    row = conn.execute(
        sa.select(*ENTRY_COLUMNS)
        .where(
            L.c.api_key_id == hold.api_key_id,
            L.c.reservation_id == key,
            L.c.kind == "settlement",
        )
        .order_by(L.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    found = entry(tuple(row))
    settled = found.shortfall - found.amount
    if settled != actual:
        raise ConflictError(
            f"reservation {key} was already settled with actual_amount {settled}, not {actual}"
        )
    return found


def explain_settle(conn: Connection, key: uuid.UUID, actual: int) -> LedgerEntry:
    """After the one statement settled nothing: the same settle's entry (a retry), or the
    hold was missing, finished otherwise, or settled with another amount."""
    replayed = settled_before(conn, key, actual)
    if replayed is not None:
        return replayed
    raise not_active(conn, key)
