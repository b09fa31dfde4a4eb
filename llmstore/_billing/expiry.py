"""Holds past their expiry that nobody has swept yet: they never block a debit or a hold.

A key's ``reserved`` counts its active holds until ``expire_reservations()`` (or an
admission's settle, release or expiry) frees them. When a debit or a new hold is refused
for want of money, the key's holds whose time has passed are expired first, in the same
transaction, and the refused statement is tried again: a proxy that never sweeps still
never refuses a request because of a hold that has lapsed.

Lapsed holds are expired only when that makes room for the refused amount: in a
transaction a refusal rolls back the expiry with everything else, and the one-statement
forms (which explain a refusal in a unit of its own) decide the same way, so both forms
leave the same holds behind.
"""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .records import K, R


def expire_if_it_makes_room(
    conn: Connection, key_id: uuid.UUID, amount: int, now: dt.datetime
) -> bool:
    """Expire the key's lapsed holds if with them ``amount`` is available; whether it did."""
    lapsed = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(R.c.amount), 0)).where(
            R.c.api_key_id == key_id, R.c.status == "active", R.c.expires_at <= now
        )
    ).scalar_one()
    if not lapsed:
        return False
    available = conn.execute(sa.select(K.c.balance - K.c.reserved).where(K.c.id == key_id)).scalar()
    if available is None or available + int(lapsed) < amount:
        return False
    return expire_key_holds(conn, key_id, now) > 0


def expire_key_holds(conn: Connection, key_id: uuid.UUID, now: dt.datetime) -> int:
    """Expire the key's active holds whose time has passed; returns how many."""
    # The holds' rows first and the key's second, as every transaction locks them.
    rows = conn.execute(
        R.update()
        .where(R.c.api_key_id == key_id, R.c.status == "active", R.c.expires_at <= now)
        .values(status="expired", finished_at=now)
        .returning(R.c.amount)
    ).all()
    if rows:
        freed = sum(row.amount for row in rows)
        conn.execute(K.update().where(K.c.id == key_id).values(reserved=K.c.reserved - freed))
    return len(rows)
