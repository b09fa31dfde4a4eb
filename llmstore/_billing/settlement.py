"""A hold's settlement in its two forms side by side (as ``money.py`` has the other money
statements): charge what the hold's key can pay, free the hold, write the entry.

``settlement_ctes`` builds the one-statement form's CTEs from any source of holds, so a
larger statement (an admission's settlement) settles its key hold the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._db.lean import LeanStatement
from llmstore._db.schema import UTCDateTime

from .money import INSERT_ENTRY, entry_insert_from, entry_values
from .records import (
    ENTRY_COLUMNS,
    RESERVATION_COLUMNS,
    K,
    LedgerEntry,
    R,
    Reservation,
    entry,
    reservation,
)
from .refusals import not_active, settled_before

_P = sa.bindparam
_KEY = _P("key_id", type_=sa.Uuid())
_NOW = _P("now", type_=UTCDateTime())

# -- Settle: charge what the hold's key can pay, free the hold, write the entry --------


def _charged(actual: Any, hold: Any) -> sa.ColumnElement[int]:
    """What a settlement charges: the actual cost, at most what the key has with the hold."""
    can_pay = K.c.balance - K.c.reserved + hold
    return sa.case((actual <= can_pay, actual), else_=can_pay)


def _settle_key_values(hold: Any, charged: Any, now: Any = _NOW) -> dict[str, Any]:
    return {
        "reserved": K.c.reserved - hold,
        "balance": K.c.balance - charged,
        "total_spent": K.c.total_spent + charged,
        "last_used_at": now,
    }


def _settlement_values(
    *, key_id: Any, actual: Any, charged: Any, balance_after: Any, reservation_id: Any, now: Any
) -> dict[str, Any]:
    return entry_values(
        "settlement",
        key_id=key_id,
        amount=-charged,
        balance_after=balance_after,
        now=now,
        shortfall=actual - charged,
        reservation_id=reservation_id,
    )


_ACTUAL = _P("actual", type_=sa.BigInteger())
_HOLD_AMOUNT = _P("hold", type_=sa.BigInteger())
_FINISH = LeanStatement(
    R.update()
    .where(R.c.id == _P("reservation_id", type_=sa.Uuid()), R.c.status == "active")
    .values(status=_P("new_status"), finished_at=_NOW)
    .returning(*RESERVATION_COLUMNS),
    RESERVATION_COLUMNS,
)
_CHARGED = _charged(_ACTUAL, _HOLD_AMOUNT)
_CHARGEABLE = LeanStatement(
    sa.select(_CHARGED).where(K.c.id == _KEY).with_for_update(), (_CHARGED,)
)
_SETTLE_KEY = LeanStatement(
    K.update()
    .where(K.c.id == _KEY)
    .values(_settle_key_values(_HOLD_AMOUNT, _P("charged", type_=sa.BigInteger())))
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


def finish(conn: Connection, key: uuid.UUID, status: str, now: dt.datetime) -> Reservation:
    """Move an active hold to ``status``, once; ``not_active`` raised otherwise."""
    row = _FINISH.first_any(conn, {"reservation_id": key, "new_status": status, "now": now})
    if row is None:
        raise not_active(conn, key)
    return reservation(row)


def settle(conn: Connection, params: dict[str, Any], *, replays: bool = False) -> LedgerEntry:
    """In a transaction: finish the hold, lock its key, charge it and write the entry.

    ``replays``: a hold already settled with the same actual amount returns its entry
    (``refusals.settled_before``), as the one-statement form's ``explain_settle`` does.
    """
    key = params["reservation_id"]
    row = _FINISH.first_any(
        conn, {"reservation_id": key, "new_status": "settled", "now": params["now"]}
    )
    if row is None:
        replayed = settled_before(conn, key, params["actual"]) if replays else None
        if replayed is not None:
            return replayed
        raise not_active(conn, key)
    finished = reservation(row)
    account = {**params, "key_id": finished.api_key_id, "hold": finished.amount}
    chargeable = _CHARGEABLE.first_any(conn, account)
    assert chargeable is not None
    charged = chargeable[0]
    changed = _SETTLE_KEY.first_any(conn, {**account, "charged": charged})
    assert changed is not None
    _SETTLED_AMOUNT.first_any(conn, {"reservation_id": finished.id, "charged": charged})
    values = _settlement_values(
        key_id=finished.api_key_id,
        actual=params["actual"],
        charged=charged,
        balance_after=changed[0],
        reservation_id=finished.id,
        now=params["now"],
    )
    written = INSERT_ENTRY.first_any(conn, values)
    assert written is not None
    return entry(written)


def settle_unheld(
    conn: Connection,
    key_id: uuid.UUID,
    actual: int,
    now: dt.datetime,
    reservation_id: uuid.UUID | None = None,
) -> LedgerEntry:
    """In a transaction: a settlement with nothing held (a hold that expired before it
    was settled, or none placed): the key pays what it has (``balance - reserved``) and
    the rest is the entry's shortfall."""
    account = {"key_id": key_id, "hold": 0, "actual": actual, "now": now}
    chargeable = _CHARGEABLE.first_any(conn, account)
    assert chargeable is not None
    charged = chargeable[0]
    changed = _SETTLE_KEY.first_any(conn, {**account, "charged": charged})
    assert changed is not None
    values = _settlement_values(
        key_id=key_id,
        actual=actual,
        charged=charged,
        balance_after=changed[0],
        reservation_id=reservation_id,
        now=now,
    )
    written = INSERT_ENTRY.first_any(conn, values)
    assert written is not None
    return entry(written)


@dataclasses.dataclass(frozen=True)
class SettlementCtes:
    """A hold's settlement as CTEs of a larger statement."""

    #: The key as changed: ``id``, ``balance`` and ``charged`` (what the key paid).
    changed: sa.CTE
    #: The ledger entry's ``INSERT ... SELECT``, returning its ``ENTRY_COLUMNS``: the
    #: statement itself, or a CTE of a larger one.
    entry: sa.Insert


def settlement_ctes(
    pending: sa.CTE,
    actual: sa.ColumnElement[int],
    now: sa.ColumnElement[dt.datetime],
    *,
    only_if: sa.ColumnElement[bool] | None = None,
    name: str = "",
) -> SettlementCtes:
    """Settle the hold ``pending`` (a locked active reservation: ``id``, ``api_key_id``,
    ``amount``) at ``actual``: lock its key, charge what it can pay, finish the hold,
    write the entry; nothing at all unless ``only_if`` holds.

    Locked rows are re-read at their newest version under READ COMMITTED, so ``charged``
    is computed from the balance the UPDATE then changes.
    """
    account = (
        sa.select(
            K.c.id,
            pending.c.id.label("reservation_id"),
            pending.c.amount.label("hold"),
            _charged(actual, pending.c.amount).label("charged"),
        )
        .join_from(K, pending, K.c.id == pending.c.api_key_id)
        .where(sa.true() if only_if is None else only_if)
        .with_for_update(of=K)
        .cte(f"{name}account")
    )
    finished = (
        R.update()
        .where(R.c.id == account.c.reservation_id)
        .values(status="settled", finished_at=now, settled_amount=account.c.charged)
        .returning(R.c.id)
        .cte(f"{name}finished")
    )
    changed = (
        K.update()
        .where(K.c.id == account.c.id)
        .values(_settle_key_values(account.c.hold, account.c.charged, now))
        .returning(K.c.id, K.c.balance, account.c.charged)
        .cte(f"{name}changed")
    )
    values = _settlement_values(
        key_id=changed.c.id,
        actual=actual,
        charged=changed.c.charged,
        balance_after=changed.c.balance,
        reservation_id=finished.c.id,
        now=now,
    )
    return SettlementCtes(changed, entry_insert_from(values, changed.join(finished, sa.true())))


def _settle_in_one_statement() -> LeanStatement:
    """In one statement: lock the hold, then its key; charge, finish the hold, write the entry."""
    pending = (
        sa.select(R.c.id, R.c.api_key_id, R.c.amount)
        .where(R.c.id == _P("reservation_id", type_=sa.Uuid()), R.c.status == "active")
        .with_for_update()
        .cte("pending")
    )
    settled = settlement_ctes(pending, _ACTUAL, _NOW)
    return LeanStatement(settled.entry, ENTRY_COLUMNS)


SETTLE_IN_ONE_STATEMENT = _settle_in_one_statement()


def settle_params(reservation_id: uuid.UUID, actual: int, now: dt.datetime) -> dict[str, Any]:
    """A settlement's parameters, for either form."""
    return {"reservation_id": reservation_id, "actual": actual, "now": now}
