"""Every statement that moves money, in its two forms side by side.

A debit is a conditional ``UPDATE ... RETURNING`` (``balance - reserved >= amount``, on an
active key: ``refusals.py`` says why an inactive key refuses new spending): the
database checks and changes the balance in one step, so concurrent debits never
overspend (Postgres re-checks the condition on the locked row; SQLite writes one at a
time). What it writes next (the ledger entry, the reservation) comes in one of two forms,
built from the same column values:

* **in a transaction** (SQLite, and ``store.transaction()`` everywhere): the change and
  the row it feeds are separate statements on one connection, the Python form;
* **in one statement** (Postgres outside a transaction, a runner that has
  ``one_statement_writes``): a data-modifying CTE feeds the row's ``INSERT ... SELECT``,
  so one autocommit round trip does the whole unit.

``tests/billing/test_money_forms.py`` runs both on Postgres and compares what they wrote, and
compiles the one-statement forms on every run.

Idempotency: an entry's ``(api_key_id, idempotency_key)`` is unique. A repeated call
finds the first entry and returns it if its parameters (``params_digest``) match; two
racing calls cannot both insert, and the loser's whole statement is undone, its balance
change with it. The unique index is the only guard: a ``NOT EXISTS`` in the ``UPDATE``
cannot see a racing call's entry under READ COMMITTED, and on Postgres a generic plan
cached before the ledger's first ANALYZE ran it as a scan of all the key's entries, so
charges slowed down with every entry.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.ids import new_id
from llmstore._core.validate import MAX_INT64
from llmstore._db.ctes import as_insert_values
from llmstore._db.lean import LeanStatement
from llmstore._db.schema import UTCDateTime

from .expiry import expire_if_it_makes_room
from .records import (
    CREDITS,
    DESCRIPTION_MAX,
    ENTRY_COLUMNS,
    RESERVATION_COLUMNS,
    SPENT,
    EntryKind,
    K,
    L,
    LedgerEntry,
    Movement,
    R,
    Reservation,
    entry,
    reservation,
)
from .refusals import hold_refusal, refusal, replay

_P = sa.bindparam
_KEY = _P("key_id", type_=sa.Uuid())
_AMOUNT = _P("amount", type_=sa.BigInteger())
_NOW = _P("now", type_=UTCDateTime())


def _insert(
    table: sa.Table, returning: tuple[sa.Column[Any], ...], *, generated: str | None = None
) -> LeanStatement:
    """The Python form's INSERT: each column but the ``generated`` one a bound parameter."""
    values: dict[str, Any] = {
        column.name: _P(column.name) for column in table.c if column.name != generated
    }
    return LeanStatement(table.insert().values(values).returning(*returning), returning)


def _insert_from(
    table: sa.Table,
    values: dict[str, Any],
    source: sa.FromClause,
    returning: tuple[sa.Column[Any], ...],
) -> sa.Insert:
    """The one-statement form's ``INSERT ... SELECT`` from ``source``, a data-modifying CTE.

    ``values`` are the same column values as the Python form's, as SQL
    (``as_insert_values``).
    """
    columns = as_insert_values(table, values)
    rows = sa.select(*columns.values()).select_from(source)
    return table.insert().from_select(list(columns), rows).returning(*returning)


def entry_values(
    kind: EntryKind,
    *,
    key_id: Any,
    amount: Any,
    balance_after: Any,
    now: Any,
    description: Any = "",
    idempotency_key: Any = None,
    params_digest: Any = None,
    request_data: Any = None,
    shortfall: Any = 0,
    reservation_id: Any = None,
    withdrawal_id: Any = None,
    transfer_id: Any = None,
) -> dict[str, Any]:
    """A ledger entry's columns: Python values, or SQL expressions in one statement."""
    return {
        "api_key_id": key_id,
        "kind": kind,
        "amount": amount,
        "balance_after": balance_after,
        "description": description,
        "idempotency_key": idempotency_key,
        "params_digest": params_digest,
        "request_data": request_data,
        "shortfall": shortfall,
        "reservation_id": reservation_id,
        "withdrawal_id": withdrawal_id,
        "transfer_id": transfer_id,
        "created_at": now,
    }


INSERT_ENTRY = _insert(L, ENTRY_COLUMNS, generated="id")  # a BIGINT identity


def entry_insert_from(values: dict[str, Any], source: sa.FromClause) -> sa.Insert:
    """The entry's ``INSERT ... SELECT`` from ``source``, returning the entry's columns."""
    return _insert_from(L, values, source, ENTRY_COLUMNS)


def insert_entry_from(values: dict[str, Any], source: sa.FromClause) -> LeanStatement:
    return LeanStatement(entry_insert_from(values, source), ENTRY_COLUMNS)


# -- Deposits, charges, transfers and withdrawals: a balance change and its entry -----


def _debit(*, spent: bool) -> sa.Update:
    values: dict[str, Any] = {"balance": K.c.balance - _AMOUNT, "last_used_at": _NOW}
    conditions = [K.c.id == _KEY, K.c.is_active, K.c.balance - K.c.reserved >= _AMOUNT]
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


def _change(kind: EntryKind) -> sa.Update:
    if kind in CREDITS:
        return _credit(deposited=kind == "deposit")
    return _debit(spent=kind in SPENT)


_CHANGES = {
    kind: LeanStatement(_change(kind).returning(K.c.balance), (K.c.balance,))
    for kind in ("deposit", "charge", "transfer_in", "transfer_out", "withdrawal")
}
_CHANGES["withdrawal_refund"] = _CHANGES["transfer_in"]


def apply(conn: Connection, move: Movement, now: dt.datetime) -> LedgerEntry:
    """In a transaction: change the balance, then write the entry (or replay the first)."""
    replayed = replay(conn, move)
    if replayed is not None:
        return replayed
    change = _CHANGES[move.kind]
    row = change.first_any(conn, move.params(now))
    if (
        row is None
        and move.kind not in CREDITS
        and expire_if_it_makes_room(conn, move.key_id, move.amount, now)
    ):
        row = change.first_any(conn, move.params(now))
    if row is None:
        raise refusal(conn, move)
    values = entry_values(
        move.kind,
        key_id=move.key_id,
        amount=move.signed_amount,
        balance_after=row[0],
        now=now,
        description=move.description,
        idempotency_key=move.idempotency_key,
        params_digest=move.params_digest,
        request_data=move.request_data,
        shortfall=move.shortfall,
        reservation_id=move.reservation_id,
        withdrawal_id=move.withdrawal_id,
        transfer_id=move.transfer_id,
    )
    written = INSERT_ENTRY.first_any(conn, values)
    assert written is not None
    return entry(written)


def _movement_in_one_statement(kind: EntryKind) -> LeanStatement:
    """In one statement: the balance change feeding its entry's INSERT (``move.params``)."""
    changed = _change(kind).returning(K.c.id, K.c.balance).cte("changed")
    values = entry_values(
        kind,
        key_id=changed.c.id,
        amount=_AMOUNT if kind in CREDITS else -_AMOUNT,
        balance_after=changed.c.balance,
        now=_NOW,
        description=_P("description", type_=sa.String(DESCRIPTION_MAX)),
        idempotency_key=_P("idempotency_key", type_=sa.String(200)),
        params_digest=_P("params_digest", type_=sa.String(64)),
        request_data=_P("request_data", type_=L.c.request_data.type),
    )
    return insert_entry_from(values, changed)


MOVEMENT_IN_ONE_STATEMENT = {
    "charge": _movement_in_one_statement("charge"),
    "deposit": _movement_in_one_statement("deposit"),
}

# -- Reserve: a hold on the balance and its reservation -------------------------------

# Built once: constructing a statement costs more than running a cached one.
_HOLD = (
    K.update()
    .where(K.c.id == _KEY, K.c.is_active, K.c.balance - K.c.reserved >= _AMOUNT)
    .values(reserved=K.c.reserved + _AMOUNT, last_used_at=_NOW)
)
_HOLD_LEAN = LeanStatement(_HOLD.returning(K.c.id), (K.c.id,))
_INSERT_RESERVATION = _insert(R, RESERVATION_COLUMNS)


def reserve_params(
    key_id: uuid.UUID, amount: int, ttl: dt.timedelta, now: dt.datetime
) -> dict[str, Any]:
    """A new hold's parameters, for either form."""
    # Not "id" nor "expires_at": on the generic path SQLAlchemy adds a parameter named
    # after a column of the key to the UPDATE's SET (the key's own expiry, here).
    return {
        "reservation_id": new_id(),
        "key_id": key_id,
        "amount": amount,
        "now": now,
        "hold_expires_at": now + ttl,
    }


def reservation_values(
    *, reservation_id: Any, key_id: Any, amount: Any, now: Any, expires_at: Any
) -> dict[str, Any]:
    return {
        "id": reservation_id,
        "api_key_id": key_id,
        "amount": amount,
        "status": "active",
        "created_at": now,
        "expires_at": expires_at,
        "settled_amount": None,
        "finished_at": None,
    }


def reserve(conn: Connection, params: dict[str, Any]) -> Reservation:
    """In a transaction: hold the amount, then write the reservation."""
    held = _HOLD_LEAN.first_any(conn, params)
    if held is None and expire_if_it_makes_room(
        conn, params["key_id"], params["amount"], params["now"]
    ):
        held = _HOLD_LEAN.first_any(conn, params)
    if held is None:
        raise hold_refusal(conn, params["key_id"], params["amount"])
    values = reservation_values(
        reservation_id=params["reservation_id"],
        key_id=params["key_id"],
        amount=params["amount"],
        now=params["now"],
        expires_at=params["hold_expires_at"],
    )
    row = _INSERT_RESERVATION.first_any(conn, values)
    assert row is not None
    return reservation(row)


def _reserve_in_one_statement() -> LeanStatement:
    """In one statement: the hold feeding its reservation's INSERT (``reserve_params``)."""
    holding = _HOLD.returning(K.c.id).cte("holding")
    values = reservation_values(
        reservation_id=_P("reservation_id", type_=sa.Uuid()),
        key_id=holding.c.id,
        amount=_AMOUNT,
        now=_NOW,
        expires_at=_P("hold_expires_at", type_=UTCDateTime()),
    )
    return LeanStatement(_insert_from(R, values, holding, RESERVATION_COLUMNS), RESERVATION_COLUMNS)


RESERVE_IN_ONE_STATEMENT = _reserve_in_one_statement()
