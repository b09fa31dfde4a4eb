"""Withdrawals: payouts out of a key's balance, their eCash token stored encrypted."""

from __future__ import annotations

import builtins
import datetime as dt
import uuid
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConflictError, NotFoundError
from llmstore._core.ids import new_id
from llmstore._core.secrets import SecretBox
from llmstore._core.validate import (
    check_actor,
    check_choice,
    check_http_url,
    check_id,
    check_optional_id,
    check_secret,
    check_text,
)
from llmstore._db.operations import Clock, Repository, reads, writes
from llmstore._db.queries import found, id_page
from llmstore._db.runner import Runner
from llmstore._db.schema import withdrawals

from . import money
from .events import key_event
from .records import Movement, check_amount

WithdrawalStatus = Literal["pending", "completed", "failed"]
STATUSES: tuple[WithdrawalStatus, ...] = ("pending", "completed", "failed")
W = withdrawals
_WITHDRAWAL_COLUMNS = tuple(column for column in W.c if column.name != "token_encrypted")


class Withdrawal(BaseModel):
    """A payout; its eCash token is stored encrypted and only read by ``reveal``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    api_key_id: uuid.UUID
    amount: int
    mint_url: str
    status: WithdrawalStatus
    created_at: dt.datetime
    completed_at: dt.datetime | None
    error_message: str | None
    retry_count: int


def _withdrawal(row: Any) -> Withdrawal:
    return Withdrawal.model_validate(dict(row._mapping))


class Withdrawals(Repository):
    """The withdrawal operations of ``store.api_keys``: payouts out of a key's balance.

    A withdrawal debits the balance at once and waits, pending, for the payout; a failed
    payout refunds it, and a retry debits it again. An inactive key withdraws nothing,
    nor retries a failed payout (``ApiKeyRejectedError("inactive")``); a pending one is
    still completed or failed (its refund credited).
    """

    def __init__(self, runner: Runner, secrets: SecretBox, clock: Clock | None = None) -> None:
        super().__init__(runner, clock)
        self._secrets = secrets

    @writes()
    def withdraw(
        self,
        conn: Connection,
        key_id: uuid.UUID | str,
        amount: int,
        token: str,
        mint_url: str,
        *,
        actor: str | None = None,
    ) -> Withdrawal:
        """Debit at once and record a pending withdrawal; the token is stored encrypted."""
        actor = check_actor(actor)
        key = check_id(key_id, "API key id")
        checked = check_amount(amount)
        encrypted = self._secrets.encrypt(check_secret(token, "token", max_length=100_000))
        url = check_http_url(mint_url, "mint_url")
        withdrawal_id = new_id()
        now = self.now()
        money.apply(conn, Movement(key, "withdrawal", checked, withdrawal_id=withdrawal_id), now)
        row = conn.execute(
            W.insert().returning(*_WITHDRAWAL_COLUMNS),
            {
                "id": withdrawal_id,
                "api_key_id": key,
                "amount": checked,
                "token_encrypted": encrypted,
                "mint_url": url,
                "status": "pending",
                "created_at": now,
                "completed_at": None,
                "error_message": None,
                "retry_count": 0,
            },
        ).one()
        made = _withdrawal(row)
        _audit(conn, actor, "withdraw", made)
        return made

    @reads()
    def get_withdrawal(self, conn: Connection, withdrawal_id: uuid.UUID | str) -> Withdrawal:
        """The withdrawal with this id (never its token); NotFoundError if there is none."""
        key = check_id(withdrawal_id, "withdrawal id")
        row = found(conn, sa.select(*_WITHDRAWAL_COLUMNS).where(W.c.id == key), "withdrawal", key)
        return _withdrawal(row)

    @reads()
    def list_withdrawals(
        self,
        conn: Connection,
        key_id: uuid.UUID | str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[Withdrawal]:
        """Withdrawals in creation order, optionally of one key and one status."""
        equal = [
            (W.c.api_key_id, check_optional_id(key_id, "API key id")),
            (W.c.status, None if status is None else check_choice(status, "status", STATUSES)),
        ]
        select = sa.select(*_WITHDRAWAL_COLUMNS)
        statement = id_page(select, W.c.id, limit=limit, after=after, equal=equal)
        return [_withdrawal(row) for row in conn.execute(statement)]

    @reads()
    def reveal_withdrawal_token(self, conn: Connection, withdrawal_id: uuid.UUID | str) -> str:
        """The decrypted token of a withdrawal, for paying it out."""
        key = check_id(withdrawal_id, "withdrawal id")
        stored = conn.execute(sa.select(W.c.token_encrypted).where(W.c.id == key)).scalar()
        if stored is None:
            raise NotFoundError(f"no withdrawal with id {key}")
        return self._secrets.decrypt(stored)

    @writes(single="unless_audited")
    def complete_withdrawal(
        self, conn: Connection, withdrawal_id: uuid.UUID | str, *, actor: str | None = None
    ) -> Withdrawal:
        """Mark a pending withdrawal paid out."""
        key = check_id(withdrawal_id, "withdrawal id")
        actor = check_actor(actor)
        done = self._move(conn, key, "pending", status="completed", completed_at=self.now())
        _audit(conn, actor, "complete_withdrawal", done)
        return done

    @writes()
    def fail_withdrawal(
        self,
        conn: Connection,
        withdrawal_id: uuid.UUID | str,
        error: str,
        *,
        actor: str | None = None,
    ) -> Withdrawal:
        """Mark it failed, count the attempt, and refund the amount with a ledger entry."""
        key = check_id(withdrawal_id, "withdrawal id")
        message = check_text(error, "error", max_length=2000)
        actor = check_actor(actor)
        failed = self._move(
            conn,
            key,
            "pending",
            status="failed",
            error_message=message,
            retry_count=W.c.retry_count + 1,
        )
        money.apply(
            conn,
            Movement(failed.api_key_id, "withdrawal_refund", failed.amount, withdrawal_id=key),
            self.now(),
        )
        _audit(conn, actor, "fail_withdrawal", failed)
        return failed

    @writes()
    def retry_withdrawal(
        self, conn: Connection, withdrawal_id: uuid.UUID | str, *, actor: str | None = None
    ) -> Withdrawal:
        """Debit again and return it to pending (``InsufficientBalanceError`` if spent)."""
        key = check_id(withdrawal_id, "withdrawal id")
        actor = check_actor(actor)
        pending = self._move(conn, key, "failed", status="pending")
        money.apply(
            conn,
            Movement(pending.api_key_id, "withdrawal", pending.amount, withdrawal_id=key),
            self.now(),
        )
        _audit(conn, actor, "retry_withdrawal", pending)
        return pending

    def _move(self, conn: Connection, key: uuid.UUID, current: str, **values: Any) -> Withdrawal:
        row = conn.execute(
            W.update()
            .where(W.c.id == key, W.c.status == current)
            .values(**values)
            .returning(*_WITHDRAWAL_COLUMNS)
        ).first()
        if row is None:
            status = conn.execute(sa.select(W.c.status).where(W.c.id == key)).scalar()
            if status is None:
                raise NotFoundError(f"no withdrawal with id {key}")
            raise ConflictError(f"withdrawal {key} is {status}; this needs it {current}")
        return _withdrawal(row)


def _audit(conn: Connection, actor: str | None, operation: str, made: Withdrawal) -> None:
    # The mint's URL and the amount, never the token.
    key_event(
        conn,
        actor,
        operation,
        made.api_key_id,
        withdrawal_id=made.id,
        amount=made.amount,
        mint_url=made.mint_url,
    )
