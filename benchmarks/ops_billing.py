"""The billing operations: ``api_keys.charge`` and ``api_keys.reserve_settle``, each
through llmstore, the raw driver and the ORM, on a key funded untimed."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .billing_sql import (
    RAW_CHARGE_CTE,
    RAW_DEBIT,
    RAW_FINISH,
    RAW_HOLD,
    RAW_INSERT_ENTRY,
    RAW_INSERT_RESERVATION,
    RAW_KEY_FOR_SETTLE,
    RAW_RESERVE_CTE,
    RAW_SETTLE_CTE,
    RAW_SETTLE_KEY,
    RAW_SETTLED_AMOUNT,
    entry_values,
)
from .common import Context, OpCall, new_id, secret_digest, utcnow
from .orm_models import OrmApiKey, OrmLedgerEntry, OrmReservation
from .raw_driver import RawDB, RawSteps

#: A funded key never runs dry here: 10**15 units outlast any run by far.
OPENING_BALANCE: Final = 10**15
CHARGE_AMOUNT: Final = 1
HOLD_AMOUNT: Final = 5
SETTLED_AMOUNT: Final = 3
HOLD_TTL: Final = dt.timedelta(minutes=15)  # llmstore's default ttl


class LedgerRefused(Exception):
    """The raw and ORM variants' refusal; never raised while benchmarking a funded key."""


def new_api_key_secret() -> str:
    """A secret shaped like llmstore's API keys: ``lsk_`` and 256 random bits."""
    return "lsk_" + secrets.token_urlsafe(32)


async def raw_create_api_key(
    db: RawDB, balance: int, *, secret: str | None = None, project_id: object = None
) -> object:
    """A key holding ``balance`` (of ``project_id``, as stored), with its opening deposit
    entry; its id as stored."""
    key_id = db.encode_id(new_id())
    secret = new_api_key_secret() if secret is None else secret
    insert_key = db.sql(
        "INSERT INTO raw_api_keys (id, secret_digest, prefix, project_id, balance, reserved,"
        " total_deposited, total_spent, created_at, last_used_at, expires_at, key_metadata)"
        " VALUES (:id, :digest, :prefix, :project_id, :balance, 0, :balance, 0, :now, NULL,"
        " NULL, NULL)"
    )
    insert_entry = db.sql(RAW_INSERT_ENTRY)

    def steps() -> RawSteps[object]:
        now = db.encode_time(utcnow())
        values = {
            "id": key_id,
            "digest": secret_digest(secret),
            "prefix": secret[:12],
            "project_id": project_id,
        }
        yield insert_key.text, insert_key.args({**values, "balance": balance, "now": now})
        yield (
            insert_entry.text,
            insert_entry.args(
                entry_values(key_id, "deposit", balance, balance, now, description="opening")
            ),
        )
        return key_id

    return await db.transaction(steps)


async def orm_key_with_available(
    session: AsyncSession, key_id: uuid.UUID, amount: int
) -> OrmApiKey:
    """The key, locked until the session ends, if ``amount`` of its balance is available."""
    key = await session.get(OrmApiKey, key_id, with_for_update=True)
    if key is None:
        raise LedgerRefused("unknown key")
    if key.balance - key.reserved < amount:
        raise LedgerRefused("insufficient balance")
    return key


async def orm_create_api_key(
    sessions: async_sessionmaker[AsyncSession],
    balance: int,
    *,
    secret: str | None = None,
    project_id: uuid.UUID | None = None,
) -> uuid.UUID:
    secret = new_api_key_secret() if secret is None else secret
    key = OrmApiKey(
        secret_digest=secret_digest(secret),
        prefix=secret[:12],
        project_id=project_id,
        balance=balance,
        total_deposited=balance,
    )
    async with sessions() as session:
        session.add(key)
        await session.flush()
        session.add(
            OrmLedgerEntry(
                api_key_id=key.id,
                kind="deposit",
                amount=balance,
                balance_after=balance,
                description="opening",
            )
        )
        await session.commit()
    return key.id


class ApiKeysCharge:
    description = f"charge {CHARGE_AMOUNT} to a funded key: a checked debit and its ledger entry"

    async def llmstore(self, ctx: Context) -> OpCall:
        api_keys = ctx.store.api_keys
        key_id = (await api_keys.create(balance=OPENING_BALANCE)).key.id

        async def call() -> object:
            return await api_keys.charge(key_id, CHARGE_AMOUNT)

        return call

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        key_id = await raw_create_api_key(db, OPENING_BALANCE)
        if ctx.driver == "postgres":
            # One statement, autocommit: what llmstore sends outside a transaction.
            cte = db.sql(RAW_CHARGE_CTE)

            async def one_statement() -> object:
                values = {
                    "key_id": key_id,
                    "amount": CHARGE_AMOUNT,
                    "now": utcnow(),
                    "idempotency_key": None,
                    "description": "",
                    "params_digest": None,
                    "request_data": None,
                }
                row = await db.fetchrow(cte.text, *cte.args(values))
                if row is None:
                    raise LedgerRefused("the debit was refused")
                return row

            return one_statement

        # SQLite: BEGIN IMMEDIATE, the debit, the entry, COMMIT, in one thread hop.
        debit = db.sql(RAW_DEBIT)
        insert_entry = db.sql(RAW_INSERT_ENTRY)

        def steps() -> RawSteps[Sequence[Any]]:
            now = db.encode_time(utcnow())
            changed = yield (
                debit.text,
                debit.args({"key_id": key_id, "amount": CHARGE_AMOUNT, "now": now}),
            )
            if changed is None:
                raise LedgerRefused("the debit was refused")
            values = entry_values(key_id, "charge", -CHARGE_AMOUNT, changed[0], now)
            written = yield insert_entry.text, insert_entry.args(values)
            assert written is not None
            return written

        async def call() -> object:
            return await db.transaction(steps)

        return call

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        key_id = await orm_create_api_key(sessions, OPENING_BALANCE)

        async def call() -> object:
            async with sessions() as session:
                key = await orm_key_with_available(session, key_id, CHARGE_AMOUNT)
                now = utcnow()
                key.balance -= CHARGE_AMOUNT
                key.total_spent += CHARGE_AMOUNT
                key.last_used_at = now
                entry = OrmLedgerEntry(
                    api_key_id=key.id,
                    kind="charge",
                    amount=-CHARGE_AMOUNT,
                    balance_after=key.balance,
                    created_at=now,
                )
                session.add(entry)
                await session.commit()
            return entry

        return call


class ApiKeysReserveSettle:
    description = (
        f"reserve {HOLD_AMOUNT} on a funded key, then settle it at {SETTLED_AMOUNT}: "
        "two units of work"
    )

    async def llmstore(self, ctx: Context) -> OpCall:
        api_keys = ctx.store.api_keys
        key_id = (await api_keys.create(balance=OPENING_BALANCE)).key.id

        async def call() -> object:
            reservation = await api_keys.reserve(key_id, HOLD_AMOUNT)
            return await api_keys.settle(reservation.id, SETTLED_AMOUNT)

        return call

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        key_id = await raw_create_api_key(db, OPENING_BALANCE)
        if ctx.driver == "postgres":
            # One statement each, autocommit: what llmstore sends outside a transaction.
            reserve_cte = db.sql(RAW_RESERVE_CTE)
            settle_cte = db.sql(RAW_SETTLE_CTE)

            async def two_statements() -> object:
                now = utcnow()
                values = {
                    "id": new_id(),
                    "key_id": key_id,
                    "amount": HOLD_AMOUNT,
                    "now": now,
                    "expires_at": now + HOLD_TTL,
                }
                reservation = await db.fetchrow(reserve_cte.text, *reserve_cte.args(values))
                if reservation is None:
                    raise LedgerRefused("insufficient balance")
                values = {"id": reservation[0], "actual": SETTLED_AMOUNT, "now": utcnow()}
                written = await db.fetchrow(settle_cte.text, *settle_cte.args(values))
                if written is None:
                    raise LedgerRefused("the reservation is not active")
                return written

            return two_statements

        # SQLite: each a BEGIN IMMEDIATE transaction in one thread hop, as llmstore runs them.
        hold = db.sql(RAW_HOLD)
        insert_reservation = db.sql(RAW_INSERT_RESERVATION)
        finish = db.sql(RAW_FINISH)
        lock_key = db.sql(RAW_KEY_FOR_SETTLE + db.for_update)
        settle_key = db.sql(RAW_SETTLE_KEY)
        settled_amount = db.sql(RAW_SETTLED_AMOUNT)
        insert_entry = db.sql(RAW_INSERT_ENTRY)

        def reserve() -> RawSteps[Sequence[Any]]:
            moment = utcnow()
            now = db.encode_time(moment)
            held = yield (
                hold.text,
                hold.args({"key_id": key_id, "amount": HOLD_AMOUNT, "now": now}),
            )
            if held is None:
                raise LedgerRefused("insufficient balance")
            values = {
                "id": db.encode_id(new_id()),
                "api_key_id": key_id,
                "amount": HOLD_AMOUNT,
                "status": "active",
                "created_at": now,
                "expires_at": db.encode_time(moment + HOLD_TTL),
                "settled_amount": None,
                "finished_at": None,
            }
            reservation = yield insert_reservation.text, insert_reservation.args(values)
            assert reservation is not None
            return reservation

        def settle(reservation_id: object, actual: int) -> RawSteps[Sequence[Any]]:
            now = db.encode_time(utcnow())
            finished = yield (
                finish.text,
                finish.args(
                    {"id": reservation_id, "status": "settled", "now": now, "active": "active"}
                ),
            )
            if finished is None:
                raise LedgerRefused("the reservation is not active")
            account_id, held_amount = finished[1], finished[2]
            account = yield lock_key.text, lock_key.args({"key_id": account_id})
            assert account is not None
            balance, reserved = account
            charged = min(actual, balance - reserved + held_amount)
            changed = yield (
                settle_key.text,
                settle_key.args(
                    {"key_id": account_id, "hold": held_amount, "charged": charged, "now": now}
                ),
            )
            assert changed is not None
            yield (
                settled_amount.text,
                settled_amount.args({"id": reservation_id, "charged": charged}),
            )
            values = entry_values(
                account_id,
                "settlement",
                -charged,
                changed[0],
                now,
                shortfall=actual - charged,
                reservation_id=reservation_id,
            )
            written = yield insert_entry.text, insert_entry.args(values)
            assert written is not None
            return written

        async def call() -> object:
            reservation = await db.transaction(reserve)
            return await db.transaction(lambda: settle(reservation[0], SETTLED_AMOUNT))

        return call

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        key_id = await orm_create_api_key(sessions, OPENING_BALANCE)

        async def reserve() -> OrmReservation:
            async with sessions() as session:
                key = await orm_key_with_available(session, key_id, HOLD_AMOUNT)
                now = utcnow()
                key.reserved += HOLD_AMOUNT
                key.last_used_at = now
                reservation = OrmReservation(
                    api_key_id=key.id,
                    amount=HOLD_AMOUNT,
                    status="active",
                    created_at=now,
                    expires_at=now + HOLD_TTL,
                )
                session.add(reservation)
                await session.commit()
            return reservation

        async def settle(reservation_id: uuid.UUID, actual: int) -> OrmLedgerEntry:
            async with sessions() as session:
                reservation = await session.get(
                    OrmReservation, reservation_id, with_for_update=True
                )
                if reservation is None or reservation.status != "active":
                    raise LedgerRefused("the reservation is not active")
                key = await session.get(OrmApiKey, reservation.api_key_id, with_for_update=True)
                assert key is not None
                now = utcnow()
                charged = min(actual, key.balance - key.reserved + reservation.amount)
                key.reserved -= reservation.amount
                key.balance -= charged
                key.total_spent += charged
                key.last_used_at = now
                reservation.status = "settled"
                reservation.finished_at = now
                reservation.settled_amount = charged
                entry = OrmLedgerEntry(
                    api_key_id=key.id,
                    kind="settlement",
                    amount=-charged,
                    balance_after=key.balance,
                    shortfall=actual - charged,
                    reservation_id=reservation.id,
                    created_at=now,
                )
                session.add(entry)
                await session.commit()
            return entry

        async def call() -> object:
            reservation = await reserve()
            return await settle(reservation.id, SETTLED_AMOUNT)

        return call
