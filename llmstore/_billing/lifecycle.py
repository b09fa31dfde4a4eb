"""A key's life after it is issued: deactivated, activated again, updated, deleted.

Each is one statement (``@writes(single="unless_audited")``); with ``actor=`` the change
and its audit event are written in one transaction, as ``store.projects`` and
``store.tokens`` do. A deactivated key is refused by ``authenticate`` and by every new
spending (charge, transfer out, reserve, withdraw; ``refusals.py``); what comes in and
what was started before still work, so it can be topped up, its holds settled or
released and its payouts finished. Only a key with nothing left on it can be deleted.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConflictError, NotFoundError, ValidationError
from llmstore._core.unset import UNSET, Unset
from llmstore._core.validate import check_actor, check_aware, check_id, check_json_mapping
from llmstore._db.operations import Repository, writes
from llmstore._db.queries import found
from llmstore._db.schema import UTCDateTime, reservations, withdrawals

from .events import key_event
from .records import KEY_COLUMNS, ApiKey, K, api_key

#: A key with nothing left on it: no balance, no active hold, no payout that is not done.
NOTHING_LEFT = (
    K.c.balance == 0,
    K.c.reserved == 0,
    ~sa.exists().where(reservations.c.api_key_id == K.c.id, reservations.c.status == "active"),
    ~sa.exists().where(withdrawals.c.api_key_id == K.c.id, withdrawals.c.status != "completed"),
)


class KeyLifecycle(Repository):
    """The lifecycle operations of ``store.api_keys``: deactivate, activate, update, delete."""

    @writes(single="unless_audited")
    def deactivate(
        self, conn: Connection, key_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ApiKey:
        """Mark the key inactive; an already inactive key keeps its first date.

        ``authenticate`` then refuses it, and so do its charges, transfers out, new holds
        and withdrawals (``ApiKeyRejectedError("inactive")``); deposits, transfers in, the
        settling or release of its holds and its pending payouts still go through.
        """
        key = check_id(key_id, "API key id")
        changes = {
            "is_active": False,
            "deactivated_at": sa.func.coalesce(
                K.c.deactivated_at, sa.literal(self.now(), UTCDateTime())
            ),
        }
        return _change(conn, key, check_actor(actor), "deactivate", changes)

    @writes(single="unless_audited")
    def activate(
        self, conn: Connection, key_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ApiKey:
        """Mark the key active again (its expiry still applies)."""
        key = check_id(key_id, "API key id")
        changes = {"is_active": True, "deactivated_at": None}
        return _change(conn, key, check_actor(actor), "activate", changes)

    @writes(single="unless_audited")
    def update(
        self,
        conn: Connection,
        key_id: uuid.UUID | str,
        *,
        expires_at: dt.datetime | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
        actor: str | None = None,
    ) -> ApiKey:
        """Change the expiry or replace the metadata; ``None`` means never, or none."""
        key = check_id(key_id, "API key id")
        changes: dict[str, Any] = {}
        if expires_at is not UNSET:
            changes["expires_at"] = (
                None if expires_at is None else check_aware(expires_at, "expires_at")
            )
        if metadata is not UNSET:
            changes["key_metadata"] = check_json_mapping(metadata, "metadata")
        if not changes:
            raise ValidationError("update() needs at least one of expires_at= or metadata=")
        return _change(conn, key, check_actor(actor), "update", changes)

    @writes(single="unless_audited")
    def delete(
        self, conn: Connection, key_id: uuid.UUID | str, *, actor: str | None = None
    ) -> None:
        """Delete a key with nothing left on it, and its ledger, holds and payouts.

        ``ConflictError`` (saying what is left) while it has a balance, an active hold
        (one past its time counts until ``expire_reservations()`` frees it) or a
        withdrawal pending or failed (a failed one can still be retried).
        """
        key = check_id(key_id, "API key id")
        actor = check_actor(actor)
        row = conn.execute(
            K.delete().where(K.c.id == key, *NOTHING_LEFT).returning(*KEY_COLUMNS)
        ).first()
        if row is None:
            raise _left_on(conn, key)
        deleted = api_key(tuple(row))
        key_event(conn, actor, "delete", key, project_id=deleted.project_id)


def _change(
    conn: Connection, key: uuid.UUID, actor: str | None, operation: str, changes: dict[str, Any]
) -> ApiKey:
    row = found(
        conn,
        K.update().where(K.c.id == key).values(**changes).returning(*KEY_COLUMNS),
        "API key",
        key,
    )
    changed = api_key(tuple(row))
    fields = sorted("metadata" if name == "key_metadata" else name for name in changes)
    key_event(
        conn,
        actor,
        operation,
        key,
        project_id=changed.project_id,
        changed=fields if operation == "update" else None,
        expires_at=changed.expires_at if "expires_at" in changes else None,
    )
    return changed


def _left_on(conn: Connection, key: uuid.UUID) -> Exception:
    """Why a key was not deleted: there is none, or what is still on it."""
    balance = conn.execute(sa.select(K.c.balance).where(K.c.id == key)).scalar()
    if balance is None:
        return NotFoundError(f"no API key with id {key}")
    holds = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(reservations.c.amount), 0)).where(
            reservations.c.api_key_id == key, reservations.c.status == "active"
        )
    ).one()
    payouts: dict[str, int] = dict(
        conn.execute(
            sa.select(withdrawals.c.status, sa.func.count())
            .where(withdrawals.c.api_key_id == key, withdrawals.c.status != "completed")
            .group_by(withdrawals.c.status)
        ).all()
    )
    left = []
    if balance:
        left.append(f"a balance of {balance}")
    if holds[0]:
        left.append(f"{_count(holds[0], 'active hold')} of {holds[1]}")
    for status in ("pending", "failed"):
        if payouts.get(status):
            left.append(_count(payouts[status], f"{status} withdrawal"))
    if not left:
        return ConflictError(f"API key {key} changed while it was deleted; try again")
    return ConflictError(f"API key {key} still has {', '.join(left)}; it cannot be deleted")


def _count(number: int, what: str) -> str:
    return f"{number} {what}" if number == 1 else f"{number} {what}s"
