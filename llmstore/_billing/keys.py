"""Prepaid API keys: balances in integer minor units, changed only through the ledger.

``store.api_keys`` is one repository assembled from its concerns: the keys themselves
(here), the ledger (deposits, charges, transfers), holds (reserve and settle) and
withdrawals, each written once in its own module.
"""

from __future__ import annotations

import builtins
import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ApiKeyRejectedError, NotFoundError, ValidationError
from llmstore._core.ids import new_id
from llmstore._core.secrets import (
    DISPLAY_LENGTH,
    SecretBox,
    SecretDigester,
    check_bearer_secret,
    new_bearer_secret,
)
from llmstore._core.validate import (
    check_actor,
    check_aware,
    check_id,
    check_json_mapping,
    check_optional_id,
)
from llmstore._db.lean import LeanStatement
from llmstore._db.operations import Clock, reads, writes
from llmstore._db.queries import found, id_page
from llmstore._db.runner import Runner
from llmstore._db.schema import projects, reservations

from . import money
from .events import key_event
from .holds import Holds
from .ledger import Ledger
from .lifecycle import NOTHING_LEFT, KeyLifecycle
from .records import (
    API_KEY_PREFIX,
    KEY_COLUMNS,
    ApiKey,
    IssuedApiKey,
    K,
    L,
    LedgerMismatch,
    LedgerReport,
    Movement,
    api_key,
    check_balance,
)
from .withdrawals import Withdrawals

_SELECT = sa.select(*KEY_COLUMNS)
# Built once, for the admissions' lean path.
_BY_DIGEST = LeanStatement(
    _SELECT.where(K.c.secret_digest == sa.bindparam("digest", type_=sa.String(64))), KEY_COLUMNS
)
_BY_ID = LeanStatement(
    _SELECT.where(K.c.id == sa.bindparam("key_id", type_=sa.Uuid())), KEY_COLUMNS
)


def check_api_key_secret(secret: object) -> str:
    return check_bearer_secret(secret, API_KEY_PREFIX, "an API key")


def check_usable(key: ApiKey, now: dt.datetime) -> None:
    """ApiKeyRejectedError unless the key can be used at ``now``."""
    if not key.is_active:
        raise ApiKeyRejectedError("inactive")
    if key.expires_at is not None and key.expires_at <= now:
        raise ApiKeyRejectedError("expired")


def find_key(
    conn: Connection, *, digest: str | None = None, key_id: uuid.UUID | None = None
) -> ApiKey | None:
    """Inside a unit: the key with this secret digest (or id), or None."""
    if digest is not None:
        row = _BY_DIGEST.first_any(conn, {"digest": digest})
    else:
        row = _BY_ID.first_any(conn, {"key_id": key_id})
    return None if row is None else api_key(row)


class ApiKeys(KeyLifecycle, Holds, Ledger, Withdrawals):
    """``store.api_keys`` and ``tx.api_keys``: each call is one unit of work.

    Every mutation takes ``actor=``: with it, the change and its audit event
    (``api_key.<operation>``, naming the key's project and carrying the key's id and
    the amount, never a secret) are written in one transaction; without it nothing is
    audited and a money call keeps its one-statement form where the runner has it.
    """

    def __init__(
        self,
        runner: Runner,
        secrets: SecretBox,
        digester: SecretDigester,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(runner, secrets, clock)
        self._digester = digester

    @writes()
    def create(
        self,
        conn: Connection,
        balance: int = 0,
        project_id: uuid.UUID | str | None = None,
        expires_at: dt.datetime | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        actor: str | None = None,
    ) -> IssuedApiKey:
        """Issue a prepaid API key; its secret is in the result and nowhere else.

        An opening balance is written to the ledger as a deposit.
        """
        actor = check_actor(actor)
        opening = check_balance(balance)
        project = None if project_id is None else check_id(project_id, "project id")
        expiry = None if expires_at is None else check_aware(expires_at, "expires_at")
        checked_metadata = check_json_mapping(metadata, "metadata")
        if project is not None:
            found = conn.execute(sa.select(projects.c.id).where(projects.c.id == project))
            if found.first() is None:
                raise NotFoundError(f"no project with id {project}")
        secret = new_bearer_secret(API_KEY_PREFIX)
        now = self.now()
        key_id = new_id()
        conn.execute(
            K.insert(),
            {
                "id": key_id,
                "secret_digest": self._digester.digest(secret),
                "prefix": secret[:DISPLAY_LENGTH],
                "project_id": project,
                "balance": 0,
                "reserved": 0,
                "total_deposited": 0,
                "total_spent": 0,
                "created_at": now,
                "last_used_at": None,
                "expires_at": expiry,
                "key_metadata": checked_metadata,
                "is_active": True,
                "deactivated_at": None,
            },
        )
        if opening:
            money.apply(
                conn, Movement(key_id, "deposit", opening, description="opening balance"), now
            )
        issued = ApiKeys.get.run_in(self, conn, key_id)
        key_event(
            conn,
            actor,
            "create",
            key_id,
            project_id=project,
            amount=opening,
            expires_at=expiry,
        )
        return IssuedApiKey(key=issued, secret=secret)

    @reads()
    def authenticate(self, conn: Connection, secret: str) -> ApiKey:
        """The key, or ``ApiKeyRejectedError`` (``.reason``: unknown, inactive, expired).

        Anything not shaped like a key (another provider's ``sk-...``, not a string) is
        ``unknown`` too, not a ``ValidationError``: one error per outcome for a proxy.
        """
        try:
            text = check_api_key_secret(secret)
        except ValidationError:
            raise ApiKeyRejectedError("unknown") from None
        digest = self._digester.digest(text)
        row = conn.execute(_SELECT.where(K.c.secret_digest == digest)).first()
        if row is None:
            raise ApiKeyRejectedError("unknown")
        key = api_key(tuple(row))
        check_usable(key, self.now())
        return key

    @reads()
    def get(self, conn: Connection, key_id: uuid.UUID | str) -> ApiKey:
        """The key with this id (never its secret); NotFoundError if there is none."""
        key = check_id(key_id, "API key id")
        row = found(conn, _SELECT.where(K.c.id == key), "API key", key)
        return api_key(tuple(row))

    @reads()
    def list(
        self,
        conn: Connection,
        project_id: uuid.UUID | str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[ApiKey]:
        """Keys in creation order, optionally one project's; ``after``: a page's last id."""
        project = check_optional_id(project_id, "project id")
        statement = id_page(
            _SELECT, K.c.id, limit=limit, after=after, equal=[(K.c.project_id, project)]
        )
        return [api_key(tuple(row)) for row in conn.execute(statement)]

    @reads(single=False, snapshot=True)
    def verify(self, conn: Connection) -> LedgerReport:
        """Recompute every key from the ledger and the active holds; lists each mismatch.

        One snapshot for the keys, the entries and the holds.
        """
        sums = (
            sa.select(
                L.c.api_key_id,
                sa.func.sum(L.c.amount).label("balance"),
                sa.func.sum(sa.case((L.c.kind == "deposit", L.c.amount), else_=0)).label(
                    "total_deposited"
                ),
                sa.func.sum(
                    sa.case((L.c.kind.in_(["charge", "settlement"]), -L.c.amount), else_=0)
                ).label("total_spent"),
            )
            .group_by(L.c.api_key_id)
            .subquery()
        )
        held = (
            sa.select(
                reservations.c.api_key_id, sa.func.sum(reservations.c.amount).label("reserved")
            )
            .where(reservations.c.status == "active")
            .group_by(reservations.c.api_key_id)
            .subquery()
        )
        rows = conn.execute(
            sa.select(
                K.c.id,
                K.c.balance,
                K.c.reserved,
                K.c.total_deposited,
                K.c.total_spent,
                sums.c.balance.label("expected_balance"),
                sums.c.total_deposited.label("expected_deposited"),
                sums.c.total_spent.label("expected_spent"),
                held.c.reserved.label("expected_reserved"),
            )
            .outerjoin(sums, sums.c.api_key_id == K.c.id)
            .outerjoin(held, held.c.api_key_id == K.c.id)
            .order_by(K.c.id)
        ).all()
        mismatches = []
        for row in rows:
            for field, stored, expected in (
                ("balance", row.balance, row.expected_balance),
                ("reserved", row.reserved, row.expected_reserved),
                ("total_deposited", row.total_deposited, row.expected_deposited),
                ("total_spent", row.total_spent, row.expected_spent),
            ):
                if stored != int(expected or 0):
                    mismatches.append(
                        LedgerMismatch(
                            api_key_id=row.id,
                            field=field,
                            stored=stored,
                            expected=int(expected or 0),
                        )
                    )
        return LedgerReport(ok=not mismatches, keys_checked=len(rows), mismatches=mismatches)

    @writes(single="unless_audited")
    def cleanup_expired(self, conn: Connection, *, actor: str | None = None) -> int:
        """Delete the expired keys with nothing left on them; returns how many.

        With ``actor=``, one ``api_key.cleanup_expired`` event for each key deleted.
        """
        actor = check_actor(actor)
        statement = K.delete().where(K.c.expires_at <= self.now(), *NOTHING_LEFT)
        if actor is None:
            return int(conn.execute(statement).rowcount)
        deleted = conn.execute(statement.returning(K.c.id, K.c.project_id)).all()
        for row in sorted(deleted, key=lambda row: row.id):
            key_event(conn, actor, "cleanup_expired", row.id, project_id=row.project_id)
        return len(deleted)
