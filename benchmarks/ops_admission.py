"""The admission operation: ``admissions.admit_settle``, through llmstore, the raw driver
and the ORM: a request admitted against one rate limit and two budgets (its key's and its
project's) and a funded key, then settled, in two units of work.

The limits are far out of reach (10**12 requests a minute, budgets and a balance of
10**15), so every call is admitted and nothing is crossed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .admission_sql import (
    BUDGET_ANCHOR,
    BUDGET_LIMIT,
    BUDGET_PERIOD,
    BUDGET_SOFT_LIMITS,
    KEY_EXPIRES_AT,
    KEY_IS_ACTIVE,
    KEY_PROJECT,
    LIMIT_MAX_REQUESTS,
    LIMIT_MAX_TOKENS,
    LIMIT_PER,
    RAW_ADMISSION_CHARGED,
    RAW_BUDGETS_OF,
    RAW_CHARGEABLE,
    RAW_CORRECT_ADMISSION_WINDOWS,
    RAW_CORRECT_WINDOW,
    RAW_COUNTED_WINDOWS,
    RAW_HELD_BUDGETS,
    RAW_HOLD_PERIOD,
    RAW_INSERT_ADMISSION,
    RAW_INSERT_ADMISSION_BUDGET,
    RAW_INSERT_ADMISSION_WINDOW,
    RAW_INSERT_BUDGET,
    RAW_INSERT_CROSSING,
    RAW_INSERT_RATE_LIMIT,
    RAW_KEY_BY_DIGEST,
    RAW_KEY_BY_ID,
    RAW_LOCK_RESERVATION,
    RAW_RATE_LIMITS_OF,
    RAW_SETTLE_ADMISSION,
    RAW_SETTLE_PERIOD,
    RAW_SETTLED_BUDGETS,
    RAW_SETTLED_RESERVATION,
    AdmissionRefused,
    crossed,
    raw_count_window,
    settle_digest,
    window_start,
)
from .billing_sql import (
    RAW_FINISH,
    RAW_HOLD,
    RAW_INSERT_ENTRY,
    RAW_INSERT_RESERVATION,
    RAW_SETTLE_KEY,
    entry_values,
)
from .common import Context, OpCall, new_id, secret_digest, utcnow
from .ops_access import raw_create_project, raw_insert_project
from .ops_admission_cte import RawAdmissionsInOneStatement
from .ops_billing import (
    HOLD_TTL,
    OPENING_BALANCE,
    new_api_key_secret,
    orm_create_api_key,
    raw_create_api_key,
)
from .orm_admission import orm_admit, orm_settle
from .orm_models import OrmBudget, OrmProject, OrmRateLimit
from .raw_driver import Many, RawDB, RawSteps, Rows

ADMIT_COST: Final = 5
ADMIT_TOKENS: Final = 100
SETTLED_COST: Final = 3
SETTLED_TOKENS: Final = 80
#: Requests per minute of the rate limit, and each budget's limit: never reached.
RATE_REQUESTS: Final = 10**12
BUDGET_LIMIT_AMOUNT: Final = 10**15
RATE_PER: Final = "minute"


def one_or_many(rows: list[tuple[object, ...]]) -> tuple[object, ...] | Many:
    """One row's parameters as one execution, several as an ``executemany`` (as
    SQLAlchemy sends a list of parameter sets)."""
    return rows[0] if len(rows) == 1 else Many(rows)


class RawAdmissions:
    """llmstore's admit and settle on the raw tables: the same statements in the same
    order, each unit a :data:`RawSteps` body for ``RawDB.transaction``."""

    def __init__(self, db: RawDB) -> None:
        self.db = db
        sql = db.sql
        self.key_by_digest = sql(RAW_KEY_BY_DIGEST)
        self.key_by_id = sql(RAW_KEY_BY_ID)
        self.limits_of = sql(RAW_RATE_LIMITS_OF)
        self.budgets_of = sql(RAW_BUDGETS_OF)
        self.count_window = {
            (requests, tokens): sql(raw_count_window(requests=requests, tokens=tokens))
            for requests in (True, False)
            for tokens in (True, False)
            if requests or tokens
        }
        self.hold_period = sql(RAW_HOLD_PERIOD)
        self.hold_key = sql(RAW_HOLD)
        self.insert_reservation = sql(RAW_INSERT_RESERVATION)
        self.insert_admission = sql(RAW_INSERT_ADMISSION)
        self.insert_budget = sql(RAW_INSERT_ADMISSION_BUDGET)
        self.insert_window = sql(RAW_INSERT_ADMISSION_WINDOW)
        self.insert_crossing = sql(RAW_INSERT_CROSSING)
        self.settle_admission = sql(RAW_SETTLE_ADMISSION)
        self.counted_windows = sql(RAW_COUNTED_WINDOWS)
        self.correct_window = sql(RAW_CORRECT_WINDOW)
        self.correct_admission_windows = sql(RAW_CORRECT_ADMISSION_WINDOWS)
        self.held_budgets = sql(RAW_HELD_BUDGETS)
        self.settle_period = sql(RAW_SETTLE_PERIOD)
        self.settled_budgets = sql(RAW_SETTLED_BUDGETS)
        self.lock_reservation = sql(RAW_LOCK_RESERVATION + db.for_update)
        self.finish = sql(RAW_FINISH)
        self.chargeable = sql(RAW_CHARGEABLE + db.for_update)
        self.settle_key = sql(RAW_SETTLE_KEY)
        self.settled_reservation = sql(RAW_SETTLED_RESERVATION)
        self.insert_entry = sql(RAW_INSERT_ENTRY)
        self.admission_charged = sql(RAW_ADMISSION_CHARGED)

    def admit(self, secret: str, cost: int, tokens: int) -> RawSteps[Sequence[Any]]:
        """Identify the key, count the request in every rate limit's window, hold the cost
        in every budget's period and on the key, write the admission and its rows."""
        db = self.db
        moment = utcnow()
        now = db.encode_time(moment)
        key = yield (
            self.key_by_digest.text,
            self.key_by_digest.args({"digest": secret_digest(secret)}),
        )
        if key is None:
            raise AdmissionRefused("unknown key")
        expires_at = key[KEY_EXPIRES_AT]
        if not key[KEY_IS_ACTIVE] or (expires_at is not None and expires_at <= now):
            raise AdmissionRefused("inactive or expired key")
        key_id, project_id = key[0], key[KEY_PROJECT]
        if project_id is None:
            raise NotImplementedError("the raw statements select the limits of a key's project")
        scope = {"project_id": project_id, "key_id": key_id}
        limits = yield self.limits_of.text, Rows(self.limits_of.args(scope))
        budgets = yield self.budgets_of.text, Rows(self.budgets_of.args(scope))
        assert limits is not None
        assert budgets is not None
        windows = []
        for limit in limits:
            start = db.encode_time(window_start(limit[LIMIT_PER], moment))
            max_requests, max_tokens = limit[LIMIT_MAX_REQUESTS], limit[LIMIT_MAX_TOKENS]
            if max_tokens is not None and tokens > max_tokens:
                raise AdmissionRefused("rate limited")
            count = self.count_window[(max_requests is not None, max_tokens is not None)]
            values = {
                "rate_limit_id": limit[0],
                "window_start": start,
                "tokens": tokens,
                "max_requests": max_requests,
                "tokens_room": None if max_tokens is None else max_tokens - tokens,
            }
            counted = yield count.text, count.args(values)
            if counted is None:
                raise AdmissionRefused("rate limited")
            windows.append((limit[0], start))
        held = []
        for record in budgets:
            if record[BUDGET_PERIOD] is not None:
                raise NotImplementedError("only lifetime budgets: their period starts at anchor_at")
            start, limit_amount = record[BUDGET_ANCHOR], record[BUDGET_LIMIT]
            if cost > limit_amount:
                raise AdmissionRefused("budget exceeded")
            values = {
                "budget_id": record[0],
                "period_start": start,
                "cost": cost,
                "room": limit_amount - cost,
                "limit": limit_amount,
            }
            level = yield self.hold_period.text, self.hold_period.args(values)
            if level is None:
                raise AdmissionRefused("budget exceeded")
            after = level[0] + level[1]
            held.append((record, start, after - cost, after))
        reservation_id = None
        hold_expires_at = db.encode_time(moment + HOLD_TTL)
        if cost > 0:
            hold = {"key_id": key_id, "amount": cost, "now": now}
            if (yield self.hold_key.text, self.hold_key.args(hold)) is None:
                raise AdmissionRefused("insufficient balance")
            reservation_id = db.encode_id(new_id())
            values = {
                "id": reservation_id,
                "api_key_id": key_id,
                "amount": cost,
                "status": "active",
                "created_at": now,
                "expires_at": hold_expires_at,
                "settled_amount": None,
                "finished_at": None,
            }
            yield self.insert_reservation.text, self.insert_reservation.args(values)
            key = yield self.key_by_id.text, self.key_by_id.args({"key_id": key_id})
        admission_id = db.encode_id(new_id())
        values = dict.fromkeys(self.insert_admission.names)
        values.update(
            id=admission_id,
            api_key_id=key_id,
            project_id=project_id,
            reservation_id=reservation_id,
            cost=cost,
            tokens=tokens,
            status="active",
            created_at=now,
            expires_at=hold_expires_at,
        )
        row = yield self.insert_admission.text, self.insert_admission.args(values)
        assert row is not None
        if held:
            rows = [
                self.insert_budget.args(
                    {
                        "admission_id": admission_id,
                        "budget_id": record[0],
                        "period_start": start,
                        "amount": cost,
                    }
                )
                for record, start, _, _ in held
            ]
            yield self.insert_budget.text, one_or_many(rows)
        if windows:
            rows = [
                self.insert_window.args(
                    {
                        "admission_id": admission_id,
                        "rate_limit_id": limit_id,
                        "window_start": start,
                        "tokens": tokens,
                    }
                )
                for limit_id, start in windows
            ]
            yield self.insert_window.text, one_or_many(rows)
        for record, start, before, after in held:
            yield from self.crossings(record, start, before, after, admission_id, now, False)
        return row

    def crossings(
        self,
        record: Sequence[Any],
        start: object,
        before: int,
        after: int,
        admission_id: object,
        now: object,
        at_settle: bool,
    ) -> RawSteps[list[int]]:
        """Record the thresholds the period's level passed, once per budget and period."""
        reported = []
        soft_limits: list[int] = json.loads(record[BUDGET_SOFT_LIMITS])
        for threshold in crossed(soft_limits, record[BUDGET_LIMIT], before, after):
            values = {
                "budget_id": record[0],
                "period_start": start,
                "threshold": threshold,
                "admission_id": admission_id,
                "at_settle": at_settle,
                "now": now,
            }
            if (yield self.insert_crossing.text, self.insert_crossing.args(values)) is not None:
                reported.append(threshold)
        return reported

    def settle(self, admission_id: object, cost: int, tokens: int) -> RawSteps[Sequence[Any]]:
        """Finish the admission, correct its windows' tokens, charge its budgets' periods,
        settle the key's hold, note what the key paid."""
        db = self.db
        now = db.encode_time(utcnow())
        values: dict[str, object] = {
            "status": "settled",
            "now": now,
            "cost": cost,
            "tokens": tokens,
            "digest": settle_digest(cost, tokens),
            "id": admission_id,
            "active": "active",
        }
        row = yield self.settle_admission.text, self.settle_admission.args(values)
        if row is None:
            raise AdmissionRefused("the admission is not active")
        key_id, reservation_id, estimate = row
        delta = tokens - estimate
        if delta != 0:
            counted = yield (
                self.counted_windows.text,
                Rows(self.counted_windows.args({"id": admission_id})),
            )
            assert counted is not None
            for limit_id, start in counted:
                window = {"delta": delta, "rate_limit_id": limit_id, "window_start": start}
                yield self.correct_window.text, self.correct_window.args(window)
            correct = self.correct_admission_windows
            yield correct.text, correct.args({"delta": delta, "id": admission_id})
        held = yield self.held_budgets.text, Rows(self.held_budgets.args({"id": admission_id}))
        assert held is not None
        for hold in held:
            start, amount, record = hold[0], hold[1], hold[2:]
            change = {"cost": cost, "amount": amount, "budget_id": record[0], "period_start": start}
            level = yield self.settle_period.text, self.settle_period.args(change)
            assert level is not None
            after = level[0] + level[1]
            before = after - cost + amount
            yield from self.crossings(record, start, before, after, admission_id, now, True)
        if held:
            settled = {"cost": cost, "id": admission_id}
            yield self.settled_budgets.text, self.settled_budgets.args(settled)
        charged = shortfall = 0
        entry: Sequence[Any] | None = None
        if reservation_id is not None:
            entry = yield from self.settle_hold(reservation_id, cost, now)
            charged, shortfall = -entry[3], entry[8]
        elif key_id is not None and cost > 0:
            raise NotImplementedError("a settlement without a hold on the key")
        values = {"charged": charged, "shortfall": shortfall, "usage_id": None, "id": admission_id}
        yield self.admission_charged.text, self.admission_charged.args(values)
        return row if entry is None else entry

    def settle_hold(
        self, reservation_id: object, actual: int, now: object
    ) -> RawSteps[Sequence[Any]]:
        """The key's part: llmstore's ``settle_hold``, then ``money.settle``."""
        locked = yield (
            self.lock_reservation.text,
            self.lock_reservation.args({"id": reservation_id}),
        )
        if locked is None or locked[0] == "expired":
            raise NotImplementedError("a hold that expired before its settlement")
        finished = yield (
            self.finish.text,
            self.finish.args(
                {"id": reservation_id, "status": "settled", "now": now, "active": "active"}
            ),
        )
        if finished is None:
            raise AdmissionRefused("the hold is not active")
        account_id, hold = finished[1], finished[2]
        account = {"actual": actual, "hold": hold, "key_id": account_id}
        chargeable = yield self.chargeable.text, self.chargeable.args(account)
        assert chargeable is not None
        charged = chargeable[0]
        change = {"key_id": account_id, "hold": hold, "charged": charged, "now": now}
        changed = yield self.settle_key.text, self.settle_key.args(change)
        assert changed is not None
        noted = {"charged": charged, "id": reservation_id}
        yield self.settled_reservation.text, self.settled_reservation.args(noted)
        values = entry_values(
            account_id,
            "settlement",
            -charged,
            changed[0],
            now,
            shortfall=actual - charged,
            reservation_id=reservation_id,
        )
        written = yield self.insert_entry.text, self.insert_entry.args(values)
        assert written is not None
        return written


async def raw_setup(db: RawDB) -> str:
    """A project, its funded key, a budget of each, a rate limit of the key; its secret."""
    project_id = (await raw_create_project(db, raw_insert_project(db), "admission-raw"))[0]
    secret = new_api_key_secret()
    key_id = await raw_create_api_key(db, OPENING_BALANCE, secret=secret, project_id=project_id)
    budget = db.sql(RAW_INSERT_BUDGET)
    for scope in ({"api_key_id": key_id}, {"project_id": project_id}):
        values = {
            "id": db.encode_id(new_id()),
            "project_id": None,
            "api_key_id": None,
            **scope,
            "limit": BUDGET_LIMIT_AMOUNT,
            "soft_limits": "[]",
            "now": db.encode_time(utcnow()),
        }
        await db.fetchrow(budget.text, *budget.args(values))
    limit = db.sql(RAW_INSERT_RATE_LIMIT)
    values = {
        "id": db.encode_id(new_id()),
        "project_id": None,
        "api_key_id": key_id,
        "max_requests": RATE_REQUESTS,
        "per": RATE_PER,
        "now": db.encode_time(utcnow()),
    }
    await db.fetchrow(limit.text, *limit.args(values))
    return secret


async def orm_setup(sessions: async_sessionmaker[AsyncSession]) -> str:
    """The same as :func:`raw_setup`, through the ORM; the key's secret."""
    project = OrmProject(name="admission-orm")
    async with sessions() as session:
        session.add(project)
        await session.commit()
    secret = new_api_key_secret()
    key_id = await orm_create_api_key(
        sessions, OPENING_BALANCE, secret=secret, project_id=project.id
    )
    async with sessions() as session:
        session.add_all(
            [
                OrmBudget(api_key_id=key_id, limit_amount=BUDGET_LIMIT_AMOUNT),
                OrmBudget(project_id=project.id, limit_amount=BUDGET_LIMIT_AMOUNT),
                OrmRateLimit(api_key_id=key_id, max_requests=RATE_REQUESTS, per=RATE_PER),
            ]
        )
        await session.commit()
    return secret


class AdmissionsAdmitSettle:
    description = (
        f"admit a request (cost {ADMIT_COST}, {ADMIT_TOKENS} tokens) against a rate limit and "
        f"two budgets, then settle it at {SETTLED_COST} with {SETTLED_TOKENS} tokens: "
        "two units of work"
    )

    async def llmstore(self, ctx: Context) -> OpCall:
        store = ctx.store
        project = await store.projects.create("admission-llmstore")
        issued = await store.api_keys.create(balance=OPENING_BALANCE, project_id=project.id)
        key_id = issued.key.id
        await store.budgets.create(BUDGET_LIMIT_AMOUNT, api_key_id=key_id)
        await store.budgets.create(BUDGET_LIMIT_AMOUNT, project_id=project.id)
        await store.rate_limits.create(requests=RATE_REQUESTS, per=RATE_PER, api_key_id=key_id)
        admissions, secret = store.admissions, issued.secret

        async def call() -> object:
            admission = await admissions.admit(secret, cost=ADMIT_COST, tokens=ADMIT_TOKENS)
            return await admissions.settle(admission.id, SETTLED_COST, tokens=SETTLED_TOKENS)

        return call

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        secret = await raw_setup(db)
        flow = RawAdmissions(db)
        if ctx.driver == "postgres":
            # One statement each, autocommit: what llmstore sends outside a transaction.
            fast = RawAdmissionsInOneStatement(db, flow, RATE_PER)

            async def one_statement_each() -> object:
                admission_id = await fast.admit(secret, ADMIT_COST, ADMIT_TOKENS)
                return await fast.settle(admission_id, SETTLED_COST, SETTLED_TOKENS)

            return one_statement_each

        async def call() -> object:
            admission = await db.transaction(lambda: flow.admit(secret, ADMIT_COST, ADMIT_TOKENS))
            admission_id = admission[0]
            return await db.transaction(
                lambda: flow.settle(admission_id, SETTLED_COST, SETTLED_TOKENS)
            )

        return call

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        secret = await orm_setup(sessions)

        async def call() -> object:
            admission_id = await orm_admit(sessions, secret, ADMIT_COST, ADMIT_TOKENS)
            return await orm_settle(sessions, admission_id, SETTLED_COST, SETTLED_TOKENS)

        return call
