"""Deposits, charges and transfers: each balance change and its ledger entry, together."""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError, ValidationError
from llmstore._core.ids import new_id
from llmstore._core.validate import check_actor, check_id, check_limit, check_positive_int
from llmstore._db.operations import Repository, first_or_explain, reads, writes

from . import money, refusals
from .events import key_event, lock_key
from .records import ENTRY_COLUMNS, K, L, LedgerEntry, Movement, entry, movement


class Ledger(Repository):
    """The ledger operations of ``store.api_keys``: money in, out and between keys."""

    async def deposit(
        self,
        key_id: uuid.UUID | str,
        amount: int,
        idempotency_key: str | None = None,
        description: str = "",
        *,
        actor: str | None = None,
    ) -> LedgerEntry:
        """Add ``amount`` to the balance; with an ``idempotency_key`` a retry is a no-op.

        An inactive key can still be topped up.
        """
        move = movement(
            check_id(key_id, "API key id"),
            "deposit",
            amount,
            description=description,
            idempotency_key=idempotency_key,
        )
        return await self._apply(move, actor)

    async def charge(
        self,
        key_id: uuid.UUID | str,
        amount: int,
        idempotency_key: str | None = None,
        description: str = "",
        request_data: dict[str, Any] | None = None,
        *,
        actor: str | None = None,
    ) -> LedgerEntry:
        """Take ``amount`` from the available balance, or raise ``InsufficientBalanceError``.

        An inactive key is refused: ``ApiKeyRejectedError("inactive")``.
        """
        move = movement(
            check_id(key_id, "API key id"),
            "charge",
            amount,
            description=description,
            idempotency_key=idempotency_key,
            request_data=request_data,
        )
        return await self._apply(move, actor)

    async def _apply(self, move: Movement, actor: str | None) -> LedgerEntry:
        if actor is not None:
            unit = functools.partial(
                _apply_audited, move=move, now=self.now(), actor=check_actor(actor)
            )
            return await self._runner.write(unit)
        if not self._runner.one_statement_writes:
            now = self.now()
            return await self._runner.write(lambda conn: money.apply(conn, move, now))
        return await first_or_explain(
            self._runner,
            money.MOVEMENT_IN_ONE_STATEMENT[move.kind],
            lambda: move.params(self.now()),
            entry,
            functools.partial(refusals.explain_movement, move=move, now=self.now()),
            conflict="the balance kept changing while the debit was checked; try again",
            explain_writes=True,
        )

    @writes()
    def transfer(
        self,
        conn: Connection,
        from_key_id: uuid.UUID | str,
        to_key_id: uuid.UUID | str,
        amount: int,
        idempotency_key: str | None = None,
        description: str = "",
        *,
        actor: str | None = None,
    ) -> tuple[LedgerEntry, LedgerEntry]:
        """Move money between keys in one transaction; returns (debit, credit) entries.

        An inactive key sends nothing (``ApiKeyRejectedError("inactive")``) but receives.
        """
        actor = check_actor(actor)
        source = check_id(from_key_id, "from_key_id")
        target = check_id(to_key_id, "to_key_id")
        if source == target:
            raise ValidationError("a transfer needs two different keys")
        out = movement(
            source,
            "transfer_out",
            amount,
            description=description,
            idempotency_key=idempotency_key,
            extra=(str(target),),
        )
        # Both rows locked in id order: opposing transfers queue instead of deadlocking,
        # and a racing call with the same idempotency key is seen once the lock is ours.
        locked = conn.execute(
            sa.select(K.c.id).where(K.c.id.in_([source, target])).order_by(K.c.id).with_for_update()
        ).all()
        if len(locked) < 2:
            missing = target if any(row.id == source for row in locked) else source
            raise NotFoundError(f"no API key with id {missing}")
        replayed = refusals.replay(conn, out)
        if replayed is not None:
            paired = conn.execute(
                sa.select(*ENTRY_COLUMNS).where(
                    L.c.transfer_id == replayed.transfer_id, L.c.kind == "transfer_in"
                )
            ).one()
            return replayed, entry(tuple(paired))
        now = self.now()
        transfer_id = new_id()
        debit = money.apply(
            conn,
            Movement(
                source,
                "transfer_out",
                out.amount,
                description=out.description,
                idempotency_key=out.idempotency_key,
                params_digest=out.params_digest,
                transfer_id=transfer_id,
            ),
            now,
        )
        credit = money.apply(
            conn,
            Movement(
                target,
                "transfer_in",
                out.amount,
                description=out.description,
                transfer_id=transfer_id,
            ),
            now,
        )
        key_event(
            conn,
            actor,
            "transfer",
            source,
            amount=out.amount,
            to_api_key_id=target,
            transfer_id=transfer_id,
            idempotency_key=out.idempotency_key,
        )
        return debit, credit

    @reads(single=False)
    def ledger(
        self, conn: Connection, key_id: uuid.UUID | str, limit: int = 100, after: int | None = None
    ) -> builtins.list[LedgerEntry]:
        """The key's ledger entries, newest first; ``after``: the last entry id of a page."""
        key = check_id(key_id, "API key id")
        statement = (
            sa.select(*ENTRY_COLUMNS)
            .where(L.c.api_key_id == key)
            .order_by(L.c.id.desc())
            .limit(check_limit(limit))
        )
        if after is not None:
            # An entry id is a positive BIGINT: a larger int would overflow the driver.
            statement = statement.where(L.c.id < check_positive_int(after, "after"))
        rows = conn.execute(statement).all()
        if not rows and conn.execute(sa.select(K.c.id).where(K.c.id == key)).first() is None:
            raise NotFoundError(f"no API key with id {key}")
        return [entry(tuple(row)) for row in rows]


def _apply_audited(
    conn: Connection, move: Movement, now: dt.datetime, actor: str | None
) -> LedgerEntry:
    """A deposit or charge and its event; a replay returns the first entry, unaudited."""
    project_id = lock_key(conn, move.key_id)
    replayed = refusals.replay(conn, move)
    if replayed is not None:
        return replayed
    written = money.apply(conn, move, now)
    key_event(
        conn,
        actor,
        move.kind,
        move.key_id,
        project_id=project_id,
        amount=move.amount,
        entry_id=written.id,
        idempotency_key=move.idempotency_key,
    )
    return written
