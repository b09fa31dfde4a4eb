"""Reservations: holds on a key's balance, settled, released or expired exactly once.

A hold's row is locked first and its key's row second, the same order everywhere, and
its state moves only along fixed edges with a conditional ``UPDATE ... WHERE status =
'active'``, so each transition happens once however many callers race for it.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.ids import new_id
from llmstore._core.validate import check_actor, check_id
from llmstore._db.lean import LeanStatement
from llmstore._db.operations import Repository, first_or_explain, reads, writes
from llmstore._db.queries import found

from . import money, refusals, settlement
from .events import key_event, lock_key
from .records import (
    RESERVATION_COLUMNS,
    K,
    LedgerEntry,
    R,
    Reservation,
    check_actual,
    check_amount,
    check_ttl,
    entry,
    reservation,
)

_EXPIRY_BATCH = 500


class Holds(Repository):
    """The reservation operations of ``store.api_keys``: reserve first, settle after."""

    async def reserve(
        self,
        key_id: uuid.UUID | str,
        amount: int,
        ttl: dt.timedelta = dt.timedelta(minutes=15),
        *,
        actor: str | None = None,
    ) -> Reservation:
        """Hold ``amount`` of the available balance until settled, released or expired.

        An inactive key places no new hold (``ApiKeyRejectedError("inactive")``).
        """
        key = check_id(key_id, "API key id")
        checked = check_amount(amount)
        lifetime = check_ttl(ttl)
        if actor is not None:
            params = money.reserve_params(key, checked, lifetime, self.now())
            return await self._runner.write(
                functools.partial(_reserve_audited, params=params, actor=check_actor(actor))
            )
        if not self._runner.one_statement_writes:
            now = self.now()
            return await self._runner.write(
                lambda conn: money.reserve(conn, money.reserve_params(key, checked, lifetime, now))
            )
        return await first_or_explain(
            self._runner,
            money.RESERVE_IN_ONE_STATEMENT,
            lambda: money.reserve_params(key, checked, lifetime, self.now()),
            reservation,
            functools.partial(refusals.explain_hold, key_id=key, amount=checked, now=self.now()),
            conflict="the balance kept changing while the hold was checked; try again",
            explain_writes=True,
        )

    @reads()
    def get_reservation(self, conn: Connection, reservation_id: uuid.UUID | str) -> Reservation:
        """The hold with this id; NotFoundError if there is none."""
        key = check_id(reservation_id, "reservation id")
        row = found(conn, sa.select(*RESERVATION_COLUMNS).where(R.c.id == key), "reservation", key)
        return reservation(tuple(row))

    @writes(single="unless_audited")
    def extend(
        self,
        conn: Connection,
        reservation_id: uuid.UUID | str,
        ttl: dt.timedelta,
        *,
        actor: str | None = None,
    ) -> Reservation:
        """Give an active hold ``ttl`` more from now; ConflictError once it is no longer active."""
        key = check_id(reservation_id, "reservation id")
        lifetime = check_ttl(ttl)
        actor = check_actor(actor)
        row = conn.execute(
            R.update()
            .where(R.c.id == key, R.c.status == "active")
            .values(expires_at=self.now() + lifetime)
            .returning(*RESERVATION_COLUMNS)
        ).first()
        if row is None:
            raise refusals.not_active(conn, key)
        extended = reservation(tuple(row))
        key_event(
            conn,
            actor,
            "extend",
            extended.api_key_id,
            reservation_id=key,
            amount=extended.amount,
            expires_at=extended.expires_at,
        )
        return extended

    async def settle(
        self,
        reservation_id: uuid.UUID | str,
        actual_amount: int,
        *,
        actor: str | None = None,
    ) -> LedgerEntry:
        """Charge the actual cost once and free the hold; what cannot be paid is a shortfall.

        ``actual_amount`` may be 0 (nothing was used: the hold is freed, an entry of 0
        written). Retry-safe: the same call again (same hold, same actual amount) returns
        the same entry; another amount, or a hold released or expired, is a
        ``ConflictError``. A key deactivated since the hold was placed is still charged.
        """
        key = check_id(reservation_id, "reservation id")
        actual = check_actual(actual_amount)
        if actor is not None:
            params = settlement.settle_params(key, actual, self.now())
            return await self._runner.write(
                functools.partial(_settle_audited, params=params, actor=check_actor(actor))
            )
        if not self._runner.one_statement_writes:
            now = self.now()
            return await self._runner.write(
                lambda conn: settlement.settle(
                    conn, settlement.settle_params(key, actual, now), replays=True
                )
            )
        return await first_or_explain(
            self._runner,
            settlement.SETTLE_IN_ONE_STATEMENT,
            lambda: settlement.settle_params(key, actual, self.now()),
            entry,
            functools.partial(refusals.explain_settle, key=key, actual=actual),
            conflict="unreachable: a hold that is not settled is not active",
        )

    @writes()
    def release(
        self, conn: Connection, reservation_id: uuid.UUID | str, *, actor: str | None = None
    ) -> Reservation:
        """Free an active hold without charging anything."""
        key = check_id(reservation_id, "reservation id")
        actor = check_actor(actor)
        finished = settlement.finish(conn, key, "released", self.now())
        _unhold(conn, {finished.api_key_id: finished.amount})
        key_event(
            conn, actor, "release", finished.api_key_id, reservation_id=key, amount=finished.amount
        )
        return finished

    async def expire_reservations(self) -> int:
        """Release every hold whose time has passed, in batches; returns how many."""
        now = self.now()
        total = 0
        while True:
            released = await self._runner.write(functools.partial(_expire_batch, now=now))
            total += released
            if released == 0 or self._runner.in_transaction:
                return total


def _reserve_audited(conn: Connection, params: dict[str, Any], actor: str | None) -> Reservation:
    project_id = lock_key(conn, params["key_id"])
    hold = money.reserve(conn, params)
    key_event(
        conn,
        actor,
        "reserve",
        hold.api_key_id,
        project_id=project_id,
        reservation_id=hold.id,
        amount=hold.amount,
        expires_at=hold.expires_at,
    )
    return hold


def _settle_audited(conn: Connection, params: dict[str, Any], actor: str | None) -> LedgerEntry:
    """A settle and its event; a repeated settle returns the entry and records nothing."""
    key = params["reservation_id"]
    # The hold's row first, as every transaction locks them: a racing settle is seen.
    status = conn.execute(sa.select(R.c.status).where(R.c.id == key).with_for_update()).scalar()
    if status == "settled":
        replayed = refusals.settled_before(conn, key, params["actual"])
        if replayed is not None:
            return replayed
    settled = settlement.settle(conn, params)
    key_event(
        conn,
        actor,
        "settle",
        settled.api_key_id,
        reservation_id=key,
        amount=-settled.amount,
        actual_amount=params["actual"],
        shortfall=settled.shortfall,
    )
    return settled


def place_hold(
    conn: Connection, key_id: uuid.UUID, amount: int, *, now: dt.datetime, expires_at: dt.datetime
) -> Reservation:
    """Inside a unit: hold ``amount`` of the key until ``expires_at`` (lapsed holds in the
    way are expired first), or raise ``InsufficientBalanceError`` / ``NotFoundError``."""
    params = {
        "reservation_id": new_id(),
        "key_id": key_id,
        "amount": amount,
        "now": now,
        "hold_expires_at": expires_at,
    }
    return money.reserve(conn, params)


_HOLD_STATE = LeanStatement(
    sa.select(R.c.status, R.c.api_key_id)
    .where(R.c.id == sa.bindparam("reservation_id", type_=sa.Uuid()))
    .with_for_update(),
    (R.c.status, R.c.api_key_id),
)


def settle_hold(
    conn: Connection, reservation_id: uuid.UUID, actual: int, now: dt.datetime
) -> LedgerEntry:
    """Inside a unit: charge ``actual`` for the hold and free it, once.

    A hold that a sweep expired first is charged all the same (the cost was incurred), as
    a key without the hold can pay; a settled or released one is a ``ConflictError``.
    """
    row = _HOLD_STATE.first_any(conn, {"reservation_id": reservation_id})
    if row is not None and row[0] == "expired":
        return settlement.settle_unheld(conn, row[1], actual, now, reservation_id)
    return settlement.settle(conn, {"reservation_id": reservation_id, "actual": actual, "now": now})


def extend_hold(conn: Connection, reservation_id: uuid.UUID, expires_at: dt.datetime) -> None:
    """Inside a unit: move an active hold's expiry to ``expires_at`` (a finished one stays)."""
    conn.execute(
        R.update()
        .where(R.c.id == reservation_id, R.c.status == "active")
        .values(expires_at=expires_at)
    )


def finish_holds(
    conn: Connection, reservation_ids: Sequence[uuid.UUID], status: str, now: dt.datetime
) -> int:
    """Inside a unit: release or expire those of the holds still active; how many."""
    if not reservation_ids:
        return 0
    rows = conn.execute(
        R.update()
        .where(R.c.id.in_(sorted(reservation_ids)), R.c.status == "active")
        .values(status=status, finished_at=now)
        .returning(R.c.api_key_id, R.c.amount)
    ).all()
    held: dict[uuid.UUID, int] = defaultdict(int)
    for row in rows:
        held[row.api_key_id] += row.amount
    _unhold(conn, held)
    return len(rows)


def _expire_batch(conn: Connection, now: dt.datetime) -> int:
    """Release one batch of holds whose time has passed; returns how many."""
    # SKIP LOCKED (Postgres): replicas sweeping at once take different rows.
    due = conn.execute(
        sa.select(R.c.id, R.c.api_key_id, R.c.amount)
        .where(R.c.status == "active", R.c.expires_at <= now)
        .order_by(R.c.id)
        .limit(_EXPIRY_BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    if not due:
        return 0
    conn.execute(
        R.update()
        .where(R.c.id.in_([row.id for row in due]), R.c.status == "active")
        .values(status="expired", finished_at=now)
    )
    held: dict[uuid.UUID, int] = defaultdict(int)
    for row in due:
        held[row.api_key_id] += row.amount
    _unhold(conn, held)
    return len(due)


def _unhold(conn: Connection, held: dict[uuid.UUID, int]) -> None:
    for key_id in sorted(held):  # id order, as everywhere a transaction locks keys
        conn.execute(
            K.update().where(K.c.id == key_id).values(reserved=K.c.reserved - held[key_id])
        )
