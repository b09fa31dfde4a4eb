"""Reservations (holds on a key's balance) and withdrawals (eCash payouts).

Both lock their own row first and the key's row second, the same order everywhere, and
move state only along fixed edges with a conditional ``UPDATE ... WHERE status = ...``,
so each transition happens exactly once however many callers race for it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConflictError, LlmstoreError, NotFoundError, ValidationError
from llmstore._core.ids import new_id, utcnow
from llmstore._core.validate import (
    check_id,
    check_timedelta,
)
from llmstore._db.lean import LeanStatement
from llmstore._db.schema import UTCDateTime, reservations

from .ledger import (
    DESCRIPTION_MAX,
    INSERT_ENTRY,
    K,
    Ledger,
    LedgerEntry,
    check_amount,
    entry,
    insert_entry_from,
)

ReservationStatus = Literal["active", "settled", "released", "expired"]
MAX_TTL = dt.timedelta(days=7)
_EXPIRY_BATCH = 500


class Reservation(BaseModel):
    """A hold on part of a key's balance, until it is settled, released or expires."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    api_key_id: uuid.UUID
    amount: int
    status: ReservationStatus
    created_at: dt.datetime
    expires_at: dt.datetime
    settled_amount: int | None
    finished_at: dt.datetime | None


R = reservations
_RESERVATION_COLUMNS = tuple(R.c)


_P = sa.bindparam
# Built once: constructing a statement costs more than running a cached one.
_HOLD = LeanStatement(
    K.update()
    .where(K.c.id == _P("key_id"), K.c.balance - K.c.reserved >= _P("amount"))
    .values(reserved=K.c.reserved + _P("amount"), last_used_at=_P("now", type_=UTCDateTime()))
    .returning(K.c.id),
    (K.c.id,),
)
_INSERT_RESERVATION = LeanStatement(
    R.insert()
    .values({column.name: _P(column.name) for column in R.c})
    .returning(*_RESERVATION_COLUMNS),
    _RESERVATION_COLUMNS,
)
_FINISH = LeanStatement(
    R.update()
    .where(R.c.id == _P("reservation_id"), R.c.status == "active")
    .values(status=_P("new_status"), finished_at=_P("now", type_=UTCDateTime()))
    .returning(*_RESERVATION_COLUMNS),
    _RESERVATION_COLUMNS,
)
_ACCOUNT = LeanStatement(
    sa.select(K.c.balance, K.c.reserved).where(K.c.id == _P("key_id")).with_for_update(),
    (K.c.balance, K.c.reserved),
)
_SETTLE_KEY = LeanStatement(
    K.update()
    .where(K.c.id == _P("key_id"))
    .values(
        reserved=K.c.reserved - _P("hold"),
        balance=K.c.balance - _P("charged"),
        total_spent=K.c.total_spent + _P("charged"),
        last_used_at=_P("now", type_=UTCDateTime()),
    )
    .returning(K.c.balance),
    (K.c.balance,),
)
_SETTLED_AMOUNT = LeanStatement(
    R.update()
    .where(R.c.id == _P("reservation_id"))
    .values(settled_amount=_P("charged"))
    .returning(R.c.id),
    (R.c.id,),
)

_NOW = _P("now", type_=UTCDateTime())


def _reserve_in_one_statement() -> LeanStatement:
    """Postgres: the hold feeding its reservation's INSERT, in one statement."""
    held = _HOLD.statement
    assert isinstance(held, sa.Update)
    holding = held.cte("holding")
    rows = sa.select(
        _P("id", type_=sa.Uuid()),
        holding.c.id,
        _P("amount", type_=sa.BigInteger()),
        sa.literal("active", sa.String(10)),
        _NOW,
        _P("expires_at", type_=UTCDateTime()),
    )
    names = ["id", "api_key_id", "amount", "status", "created_at", "expires_at"]
    return LeanStatement(
        R.insert().from_select(names, rows).returning(*_RESERVATION_COLUMNS),
        _RESERVATION_COLUMNS,
    )


def _settle_in_one_statement() -> LeanStatement:
    """Postgres: lock the hold, then its key; charge, finish the hold, write the entry.

    Locked rows are re-read at their newest version under READ COMMITTED, so ``charged``
    is computed from the balance the UPDATE then changes.
    """
    pending = (
        sa.select(R.c.id, R.c.api_key_id, R.c.amount)
        .where(R.c.id == _P("reservation_id", type_=sa.Uuid()), R.c.status == "active")
        .with_for_update()
        .cte("pending")
    )
    actual = _P("actual", type_=sa.BigInteger())
    account = (
        sa.select(
            K.c.id,
            pending.c.id.label("reservation_id"),
            pending.c.amount.label("hold"),
            sa.func.least(actual, K.c.balance - K.c.reserved + pending.c.amount).label("charged"),
        )
        .join_from(K, pending, K.c.id == pending.c.api_key_id)
        .with_for_update(of=K)
        .cte("account")
    )
    finished = (
        R.update()
        .where(R.c.id == account.c.reservation_id)
        .values(status="settled", finished_at=_NOW, settled_amount=account.c.charged)
        .returning(R.c.id)
        .cte("finished")
    )
    changed = (
        K.update()
        .where(K.c.id == account.c.id)
        .values(
            reserved=K.c.reserved - account.c.hold,
            balance=K.c.balance - account.c.charged,
            total_spent=K.c.total_spent + account.c.charged,
            last_used_at=_NOW,
        )
        .returning(K.c.id, K.c.balance, account.c.charged)
        .cte("changed")
    )
    values = {
        "api_key_id": changed.c.id,
        "kind": sa.literal("settlement", sa.String(20)),
        "amount": -changed.c.charged,
        "balance_after": changed.c.balance,
        "description": sa.literal("", sa.String(DESCRIPTION_MAX)),
        "shortfall": actual - changed.c.charged,
        "reservation_id": finished.c.id,
        "created_at": _NOW,
    }
    return insert_entry_from(values, changed.join(finished, sa.true()))


RESERVE_CTE = _reserve_in_one_statement()
SETTLE_CTE = _settle_in_one_statement()


def reservation(row: Any) -> Reservation:
    values = dict(zip((column.name for column in _RESERVATION_COLUMNS), tuple(row), strict=True))
    return Reservation.model_construct(**values)


def check_ttl(value: object) -> dt.timedelta:
    ttl = check_timedelta(value, "ttl") if isinstance(value, dt.timedelta) else None
    if ttl is None or not dt.timedelta(0) < ttl <= MAX_TTL:
        raise ValidationError(f"ttl must be a timedelta above zero and at most {MAX_TTL}")
    return ttl


class ReservationRepository:
    """Reservations on one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._ledger = Ledger(conn)

    def reserve(self, key_id: uuid.UUID | str, amount: int, ttl: dt.timedelta) -> Reservation:
        key = check_id(key_id, "API key id")
        checked = check_amount(amount)
        lifetime = check_ttl(ttl)
        now = utcnow()
        held = _HOLD.first_any(self._conn, {"key_id": key, "amount": checked, "now": now})
        if held is None:
            raise self._ledger.hold_refusal(key, checked)
        row = _INSERT_RESERVATION.first_any(
            self._conn,
            {
                "id": new_id(),
                "api_key_id": key,
                "amount": checked,
                "status": "active",
                "created_at": now,
                "expires_at": now + lifetime,
                "settled_amount": None,
                "finished_at": None,
            },
        )
        return reservation(row)

    def get(self, reservation_id: uuid.UUID | str) -> Reservation:
        key = check_id(reservation_id, "reservation id")
        row = self._conn.execute(sa.select(*_RESERVATION_COLUMNS).where(R.c.id == key)).first()
        if row is None:
            raise NotFoundError(f"no reservation with id {key}")
        return reservation(row)

    def extend(self, reservation_id: uuid.UUID | str, ttl: dt.timedelta) -> Reservation:
        """Hold for ``ttl`` from now; a hold already settled, released or expired stays so."""
        key = check_id(reservation_id, "reservation id")
        lifetime = check_ttl(ttl)
        row = self._conn.execute(
            R.update()
            .where(R.c.id == key, R.c.status == "active")
            .values(expires_at=utcnow() + lifetime)
            .returning(*_RESERVATION_COLUMNS)
        ).first()
        if row is None:
            raise self.not_active(key)
        return reservation(row)

    def settle(self, reservation_id: uuid.UUID | str, actual_amount: int) -> LedgerEntry:
        """Charge the actual cost once and free the hold; what cannot be paid is a shortfall."""
        key = check_id(reservation_id, "reservation id")
        actual = check_amount(actual_amount, "actual_amount")
        now = utcnow()
        finished = self._finish(key, "settled", now)
        hold = finished.amount
        account = _ACCOUNT.first_any(self._conn, {"key_id": finished.api_key_id})
        assert account is not None
        balance, reserved = account
        charged = min(actual, balance - reserved + hold)
        changed = _SETTLE_KEY.first_any(
            self._conn,
            {"key_id": finished.api_key_id, "hold": hold, "charged": charged, "now": now},
        )
        assert changed is not None
        _SETTLED_AMOUNT.first_any(self._conn, {"reservation_id": key, "charged": charged})
        written = INSERT_ENTRY.first_any(
            self._conn,
            {
                "api_key_id": finished.api_key_id,
                "kind": "settlement",
                "amount": -charged,
                "balance_after": changed[0],
                "description": "",
                "idempotency_key": None,
                "params_digest": None,
                "request_data": None,
                "shortfall": actual - charged,
                "reservation_id": key,
                "withdrawal_id": None,
                "transfer_id": None,
                "created_at": now,
            },
        )
        assert written is not None
        return entry(written)

    def release(self, reservation_id: uuid.UUID | str) -> Reservation:
        """Free the hold without charging; exactly once."""
        key = check_id(reservation_id, "reservation id")
        finished = self._finish(key, "released", utcnow())
        self._unhold({finished.api_key_id: finished.amount})
        return finished

    def expire(self, now: dt.datetime) -> int:
        """Release one batch of holds whose time has passed; returns how many."""
        # SKIP LOCKED (Postgres): replicas sweeping at once take different rows.
        due = self._conn.execute(
            sa.select(R.c.id, R.c.api_key_id, R.c.amount)
            .where(R.c.status == "active", R.c.expires_at <= now)
            .order_by(R.c.id)
            .limit(_EXPIRY_BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        if not due:
            return 0
        self._conn.execute(
            R.update()
            .where(R.c.id.in_([row.id for row in due]), R.c.status == "active")
            .values(status="expired", finished_at=now)
        )
        held: dict[uuid.UUID, int] = defaultdict(int)
        for row in due:
            held[row.api_key_id] += row.amount
        self._unhold(held)
        return len(due)

    def _finish(self, key: uuid.UUID, status: str, now: dt.datetime) -> Reservation:
        row = _FINISH.first_any(
            self._conn, {"reservation_id": key, "new_status": status, "now": now}
        )
        if row is None:
            raise self.not_active(key)
        return reservation(row)

    def _unhold(self, held: dict[uuid.UUID, int]) -> None:
        for key_id in sorted(held):  # id order, as everywhere a transaction locks keys
            self._conn.execute(
                K.update().where(K.c.id == key_id).values(reserved=K.c.reserved - held[key_id])
            )

    def not_active(self, key: uuid.UUID) -> LlmstoreError:
        """The error for a hold found missing or finished (a hold never becomes active again)."""
        status = self._conn.execute(sa.select(R.c.status).where(R.c.id == key)).scalar()
        if status is None:
            return NotFoundError(f"no reservation with id {key}")
        return ConflictError(f"reservation {key} is {status}, not active")
