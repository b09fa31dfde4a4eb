"""Prepaid API keys: balances in integer minor units, changed only through the ledger."""

from __future__ import annotations

import builtins
import datetime as dt
import uuid
from typing import Any, Final

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection

from llmstore._core.errors import ApiKeyRejectedError, ConflictError, NotFoundError, ValidationError
from llmstore._core.ids import new_id, utcnow
from llmstore._core.secrets import (
    DISPLAY_LENGTH,
    SecretBox,
    SecretDigester,
    check_bearer_secret,
    new_bearer_secret,
)
from llmstore._core.validate import (
    MAX_INT64,
    check_aware,
    check_id,
    check_int,
    check_json_mapping,
    check_limit,
    check_positive_int,
)
from llmstore._db.lean import LeanStatement
from llmstore._db.runner import Runner
from llmstore._db.schema import projects, reservations, withdrawals

from .holds import (
    RESERVE_CTE,
    SETTLE_CTE,
    Reservation,
    ReservationRepository,
    check_ttl,
    reservation,
)
from .ledger import (
    CHARGE_CTE,
    DEPOSIT_CTE,
    ENTRY_COLUMNS,
    K,
    L,
    Ledger,
    LedgerEntry,
    Movement,
    check_amount,
    entry,
    movement,
)
from .withdrawals import Withdrawals

API_KEY_PREFIX: Final = "lsk_"
# A refused debit is re-checked; if the money is there by then, it is tried again.
_DEBIT_ATTEMPTS = 5


class ApiKey(BaseModel):
    """A prepaid key as stored: never its secret, only a short display ``prefix``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    project_id: uuid.UUID | None
    prefix: str
    balance: int
    reserved: int
    total_deposited: int
    total_spent: int
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    metadata: dict[str, Any] | None

    @property
    def available(self) -> int:
        """What a charge or a new reservation can take: ``balance - reserved``."""
        return self.balance - self.reserved


class IssuedApiKey(BaseModel):
    """A new key and its secret. The secret is shown here once and never stored."""

    model_config = ConfigDict(frozen=True)

    key: ApiKey
    secret: str = Field(repr=False)


class LedgerMismatch(BaseModel):
    """One disagreement found by :meth:`ApiKeys.verify`."""

    model_config = ConfigDict(frozen=True)

    api_key_id: uuid.UUID
    field: str
    stored: int
    expected: int


class LedgerReport(BaseModel):
    """What :meth:`ApiKeys.verify` found; ``ok`` when there is no mismatch."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    keys_checked: int
    mismatches: list[LedgerMismatch]


KEY_COLUMNS = (
    K.c.id,
    K.c.project_id,
    K.c.prefix,
    K.c.balance,
    K.c.reserved,
    K.c.total_deposited,
    K.c.total_spent,
    K.c.created_at,
    K.c.last_used_at,
    K.c.expires_at,
    K.c.key_metadata,
)
_SELECT = sa.select(*KEY_COLUMNS)


def api_key(row: Any) -> ApiKey:
    values = dict(zip((column.name for column in KEY_COLUMNS), tuple(row), strict=True))
    values["metadata"] = values.pop("key_metadata")
    return ApiKey.model_construct(**values)


def check_api_key_secret(secret: object) -> str:
    return check_bearer_secret(secret, API_KEY_PREFIX, "an API key")


def _check_balance(value: object) -> int:
    return check_int(value, "balance", minimum=0, maximum=MAX_INT64)


class ApiKeyRepository:
    """API key operations on one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection, digester: SecretDigester) -> None:
        self._conn = conn
        self._digester = digester
        self._ledger = Ledger(conn)

    def create(
        self,
        balance: int = 0,
        project_id: uuid.UUID | str | None = None,
        expires_at: dt.datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> IssuedApiKey:
        """A new key; an opening balance is written to the ledger as a deposit."""
        opening = _check_balance(balance)
        project = None if project_id is None else check_id(project_id, "project id")
        expiry = None if expires_at is None else check_aware(expires_at, "expires_at")
        checked_metadata = check_json_mapping(metadata, "metadata")
        if project is not None:
            found = self._conn.execute(sa.select(projects.c.id).where(projects.c.id == project))
            if found.first() is None:
                raise NotFoundError(f"no project with id {project}")
        secret = new_bearer_secret(API_KEY_PREFIX)
        now = utcnow()
        key_id = new_id()
        self._conn.execute(
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
            },
        )
        if opening:
            self._ledger.apply(
                Movement(key_id, "deposit", opening, description="opening balance"), now
            )
        return IssuedApiKey(key=self.get(key_id), secret=secret)

    def authenticate(self, digest: str, now: dt.datetime) -> ApiKey:
        row = self._conn.execute(_SELECT.where(K.c.secret_digest == digest)).first()
        if row is None:
            raise ApiKeyRejectedError("unknown")
        key = api_key(row)
        if key.expires_at is not None and key.expires_at <= now:
            raise ApiKeyRejectedError("expired")
        return key

    def get(self, key_id: uuid.UUID | str) -> ApiKey:
        key = check_id(key_id, "API key id")
        row = self._conn.execute(_SELECT.where(K.c.id == key)).first()
        if row is None:
            raise NotFoundError(f"no API key with id {key}")
        return api_key(row)

    def list(
        self,
        project_id: uuid.UUID | str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> list[ApiKey]:
        """Keys in creation order; pass the last id of a page as ``after`` for the next."""
        statement = _SELECT.order_by(K.c.id).limit(check_limit(limit))
        if project_id is not None:
            statement = statement.where(K.c.project_id == check_id(project_id, "project id"))
        if after is not None:
            statement = statement.where(K.c.id > check_id(after, "after"))
        return [api_key(row) for row in self._conn.execute(statement)]

    def apply(self, move: Movement) -> LedgerEntry:
        return self._ledger.apply(move, utcnow())

    def after_refusal(self, move: Movement) -> LedgerEntry | None:
        """After the one-statement form wrote nothing: the replayed entry, or the error."""
        replayed = self._ledger.replay(move)
        if replayed is not None:
            return replayed
        error = self._ledger.refusal(move)
        if isinstance(error, ConflictError):
            return None  # the money is there now: the caller tries again
        raise error

    def transfer(
        self, source: uuid.UUID, target: uuid.UUID, out: Movement
    ) -> tuple[LedgerEntry, LedgerEntry]:
        """Move ``out.amount`` between two keys; returns (debit entry, credit entry)."""
        # Both rows locked in id order: opposing transfers queue instead of deadlocking,
        # and a racing call with the same idempotency key is seen once the lock is ours.
        locked = self._conn.execute(
            sa.select(K.c.id).where(K.c.id.in_([source, target])).order_by(K.c.id).with_for_update()
        ).all()
        if len(locked) < 2:
            missing = target if any(row.id == source for row in locked) else source
            raise NotFoundError(f"no API key with id {missing}")
        replayed = self._ledger.replay(out)
        if replayed is not None:
            paired = self._conn.execute(
                sa.select(*ENTRY_COLUMNS).where(
                    L.c.transfer_id == replayed.transfer_id, L.c.kind == "transfer_in"
                )
            ).one()
            return replayed, entry(tuple(paired))
        now = utcnow()
        transfer_id = new_id()
        debit = self._ledger.apply(
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
        credit = self._ledger.apply(
            Movement(
                target,
                "transfer_in",
                out.amount,
                description=out.description,
                transfer_id=transfer_id,
            ),
            now,
        )
        return debit, credit

    def ledger(
        self, key_id: uuid.UUID | str, limit: int = 100, after: int | None = None
    ) -> builtins.list[LedgerEntry]:
        """A key's entries, newest first; pass the last id of a page as ``after``."""
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
        rows = self._conn.execute(statement).all()
        if not rows and self._conn.execute(sa.select(K.c.id).where(K.c.id == key)).first() is None:
            raise NotFoundError(f"no API key with id {key}")
        return [entry(tuple(row)) for row in rows]

    def verify(self) -> LedgerReport:
        """Every key's balance, hold and totals recomputed from the ledger and the holds."""
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
        rows = self._conn.execute(
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

    def cleanup_expired(self, now: dt.datetime) -> int:
        """Delete expired keys with nothing left on them; returns how many."""
        statement = K.delete().where(
            K.c.expires_at <= now,
            K.c.balance == 0,
            K.c.reserved == 0,
            ~sa.exists().where(
                reservations.c.api_key_id == K.c.id, reservations.c.status == "active"
            ),
            ~sa.exists().where(
                withdrawals.c.api_key_id == K.c.id, withdrawals.c.status != "completed"
            ),
        )
        return int(self._conn.execute(statement).rowcount)


async def run_movement(
    runner: Runner, digester: SecretDigester, move: Movement, one_statement: LeanStatement
) -> LedgerEntry:
    """Apply ``move``: one statement on Postgres outside a transaction, else one unit."""

    def repository(conn: Connection) -> ApiKeyRepository:
        return ApiKeyRepository(conn, digester)

    if not runner.one_statement_writes:
        return await runner.write(lambda conn: repository(conn).apply(move))
    for _ in range(_DEBIT_ATTEMPTS):
        try:
            row = await runner.lean_first(one_statement, move.params(utcnow()))
        except ConflictError:
            row = None  # its idempotency key has an entry: the statement was undone whole
        if row is not None:
            return entry(row)
        found = await runner.read(lambda conn: repository(conn).after_refusal(move))
        if found is not None:
            return found
    raise ConflictError("the balance kept changing while the debit was checked; try again")


class ApiKeys(Withdrawals):
    """``store.api_keys`` and ``tx.api_keys``: each call is one unit of work."""

    def __init__(self, runner: Runner, secrets: SecretBox, digester: SecretDigester) -> None:
        super().__init__(runner, secrets)
        self._digester = digester

    def _keys(self, conn: Connection) -> ApiKeyRepository:
        return ApiKeyRepository(conn, self._digester)

    def _holds(self, conn: Connection) -> ReservationRepository:
        return ReservationRepository(conn)

    async def create(
        self,
        balance: int = 0,
        project_id: uuid.UUID | str | None = None,
        expires_at: dt.datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> IssuedApiKey:
        """Issue a prepaid API key; its secret is in the result and nowhere else."""
        return await self._runner.write(
            lambda conn: self._keys(conn).create(balance, project_id, expires_at, metadata)
        )

    async def authenticate(self, secret: str) -> ApiKey:
        """The key, or ``ApiKeyRejectedError`` (``.reason``: unknown, expired).

        Anything not shaped like a key (another provider's ``sk-...``, not a string) is
        ``unknown`` too, not a ``ValidationError``: one error per outcome for a proxy.
        """
        try:
            text = check_api_key_secret(secret)
        except ValidationError:
            raise ApiKeyRejectedError("unknown") from None
        digest = self._digester.digest(text)
        now = utcnow()
        return await self._runner.read(
            lambda conn: self._keys(conn).authenticate(digest, now), single=True
        )

    async def get(self, key_id: uuid.UUID | str) -> ApiKey:
        """The key with this id (never its secret); NotFoundError if there is none."""
        return await self._runner.read(lambda conn: self._keys(conn).get(key_id), single=True)

    async def list(
        self,
        project_id: uuid.UUID | str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[ApiKey]:
        """Keys in creation order, optionally one project's; ``after``: a page's last id."""
        return await self._runner.read(
            lambda conn: self._keys(conn).list(project_id, limit, after), single=True
        )

    async def deposit(
        self,
        key_id: uuid.UUID | str,
        amount: int,
        idempotency_key: str | None = None,
        description: str = "",
    ) -> LedgerEntry:
        """Add ``amount`` to the balance; with an ``idempotency_key`` a retry is a no-op."""
        move = movement(
            check_id(key_id, "API key id"),
            "deposit",
            amount,
            description=description,
            idempotency_key=idempotency_key,
        )
        return await run_movement(self._runner, self._digester, move, DEPOSIT_CTE)

    async def charge(
        self,
        key_id: uuid.UUID | str,
        amount: int,
        idempotency_key: str | None = None,
        description: str = "",
        request_data: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Take ``amount`` from the available balance, or raise ``InsufficientBalanceError``."""
        move = movement(
            check_id(key_id, "API key id"),
            "charge",
            amount,
            description=description,
            idempotency_key=idempotency_key,
            request_data=request_data,
        )
        return await run_movement(self._runner, self._digester, move, CHARGE_CTE)

    async def transfer(
        self,
        from_key_id: uuid.UUID | str,
        to_key_id: uuid.UUID | str,
        amount: int,
        idempotency_key: str | None = None,
        description: str = "",
    ) -> tuple[LedgerEntry, LedgerEntry]:
        """Move money between keys in one transaction; returns (debit, credit) entries."""
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
        return await self._runner.write(lambda conn: self._keys(conn).transfer(source, target, out))

    async def ledger(
        self, key_id: uuid.UUID | str, limit: int = 100, after: int | None = None
    ) -> builtins.list[LedgerEntry]:
        """The key's ledger entries; ``after``: the last entry id of the previous page."""
        return await self._runner.read(lambda conn: self._keys(conn).ledger(key_id, limit, after))

    async def reserve(
        self,
        key_id: uuid.UUID | str,
        amount: int,
        ttl: dt.timedelta = dt.timedelta(minutes=15),
    ) -> Reservation:
        """Hold ``amount`` of the available balance until settled, released or expired."""
        key = check_id(key_id, "API key id")
        checked = check_amount(amount)
        lifetime = check_ttl(ttl)
        if not self._runner.one_statement_writes:
            return await self._runner.write(
                lambda conn: self._holds(conn).reserve(key, checked, lifetime)
            )
        for _ in range(_DEBIT_ATTEMPTS):
            now = utcnow()
            params = {
                "id": new_id(),
                "key_id": key,
                "amount": checked,
                "now": now,
                "expires_at": now + lifetime,
            }
            row = await self._runner.lean_first(RESERVE_CTE, params)
            if row is not None:
                return reservation(row)
            refused = await self._runner.read(
                lambda conn: Ledger(conn).hold_refusal(key, checked), single=True
            )
            if not isinstance(refused, ConflictError):
                raise refused
        raise ConflictError("the balance kept changing while the hold was checked; try again")

    async def get_reservation(self, reservation_id: uuid.UUID | str) -> Reservation:
        """The hold with this id; NotFoundError if there is none."""
        return await self._runner.read(
            lambda conn: self._holds(conn).get(reservation_id), single=True
        )

    async def extend(self, reservation_id: uuid.UUID | str, ttl: dt.timedelta) -> Reservation:
        """Give an active hold ``ttl`` more from now; ConflictError once it is no longer active."""
        return await self._runner.write(
            lambda conn: self._holds(conn).extend(reservation_id, ttl), single=True
        )

    async def settle(self, reservation_id: uuid.UUID | str, actual_amount: int) -> LedgerEntry:
        """Charge the actual cost once and free the hold; what cannot be paid is a shortfall."""
        key = check_id(reservation_id, "reservation id")
        actual = check_amount(actual_amount, "actual_amount")
        if not self._runner.one_statement_writes:
            return await self._runner.write(lambda conn: self._holds(conn).settle(key, actual))
        params = {"reservation_id": key, "actual": actual, "now": utcnow()}
        row = await self._runner.lean_first(SETTLE_CTE, params)
        if row is None:
            raise await self._runner.read(
                lambda conn: self._holds(conn).not_active(key), single=True
            )
        return entry(row)

    async def release(self, reservation_id: uuid.UUID | str) -> Reservation:
        """Free an active hold without charging anything."""
        return await self._runner.write(lambda conn: self._holds(conn).release(reservation_id))

    async def expire_reservations(self) -> int:
        """Release every hold whose time has passed, in batches; returns how many."""
        now = utcnow()
        total = 0
        while True:
            released = await self._runner.write(lambda conn: self._holds(conn).expire(now))
            total += released
            if released == 0 or self._runner.in_transaction:
                return total

    async def verify(self) -> LedgerReport:
        """Recompute every key from the ledger and the active holds; lists each mismatch."""

        # One snapshot for the keys, the entries and the holds.
        return await self._runner.read(lambda conn: self._keys(conn).verify(), snapshot=True)

    async def cleanup_expired(self) -> int:
        """Delete the keys whose expiry has passed; returns how many."""
        now = utcnow()
        return await self._runner.write(
            lambda conn: self._keys(conn).cleanup_expired(now), single=True
        )
