"""Admissions under faults: calls cancelled at random points, Postgres connections killed
mid-flight, a worker process killed mid-burst, and a write the database refuses inside
an admission's or a settlement's unit. Afterwards every admission is whole (its holds on
the budgets and the key, its count in the window, a settled one's ledger entry: see
``admission_faults_support._problems``), ``verify()`` of budgets and keys is ok, nothing
of a refused unit was kept, and the store goes on serving."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import multiprocessing
import os
import random
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import (
    ApiKeyRejectedError,
    BudgetExceededError,
    InsufficientBalanceError,
    LlmstoreError,
    RateLimitedError,
    Settlement,
    Store,
    StoreConfig,
    UsageRecord,
    generate_key,
)
from llmstore._db.admission_schema import budget_crossings
from llmstore._db.schema import usage_logs
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name, run_sql
from tests import processes
from tests.admission.admission_faults_support import (
    AB,
    AW,
    BURST_TTL,
    TAG,
    A,
    L,
    Limits,
    R,
    burst_worker,
    check_whole,
    keeps_working,
    limits,
)
from tests.admission.admission_support import START, Clock
from tests.helpers import (
    CheckedOut,
    execute,
    qualified,
    require_postgres,
    store_pids,
    terminate_backends,
    until_it_answers,
)

pytestmark = pytest.mark.slow

OPS = 240
BATCH = 12


@dataclasses.dataclass
class Chaos:
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    # Every settle begun (the admission and its arguments), and those that returned.
    settles: dict[uuid.UUID, tuple[int, int | None]] = dataclasses.field(default_factory=dict)
    settled: dict[uuid.UUID, Settlement] = dataclasses.field(default_factory=dict)


async def _chaos(
    store: Store,
    setup: Limits,
    rng: random.Random,
    *,
    timeouts: bool,
    allowed: tuple[type[BaseException], ...],
    ops: int = OPS,
) -> Chaos:
    """``ops`` random admit/settle/release sequences, ``BATCH`` at a time, each cut short
    at a random point when ``timeouts`` (``wait_for``; each ``sleep(0)`` is a point). One
    kind always gives its settle a timeout of at most 10 ms."""
    chaos = Chaos()
    calls = store.admissions

    async def settle(admission_id: uuid.UUID) -> Settlement:
        args = (rng.randint(1, 60), rng.choice([None, rng.randint(0, 30)]))
        chaos.settles[admission_id] = args
        done = await calls.settle(admission_id, args[0], tokens=args[1])
        chaos.settled[admission_id] = done
        return done

    def pick(n: int) -> Callable[[], Awaitable[Any]]:
        tags = [TAG] if rng.random() < 0.5 else ["other"]
        cost, tokens = rng.randint(1, 50), rng.randint(0, 20)

        async def admit(key: str | None = None) -> Any:
            return await calls.admit(
                setup.secret, tags=tags, cost=cost, tokens=tokens, idempotency_key=key
            )

        async def then_settle() -> None:
            admitted = await admit()
            await asyncio.sleep(0)
            await settle(admitted.id)

        async def then_release() -> None:
            admitted = await admit()
            await asyncio.sleep(0)
            await calls.release(admitted.id)

        async def settle_twice() -> None:
            admitted = await admit()
            first = await settle(admitted.id)
            await asyncio.sleep(0)
            cost, tokens = chaos.settles[admitted.id]
            assert await calls.settle(admitted.id, cost, tokens=tokens) == first

        async def settle_cut_short() -> None:
            admitted = await admit()
            await asyncio.wait_for(settle(admitted.id), rng.uniform(0, 0.01))

        async def replayed() -> None:
            admitted = await admit(f"idem-{n}")
            await asyncio.sleep(0)
            assert (await admit(f"idem-{n}")).id == admitted.id
            await settle(admitted.id)

        return rng.choice(
            [then_settle, then_release, admit, settle_twice, settle_cut_short, replayed]
        )

    async def one(n: int, call: Callable[[], Awaitable[Any]], limit: float | None) -> None:
        try:
            await asyncio.wait_for(call(), limit)
        except TimeoutError:
            chaos.outcomes["cancelled"] += 1
        except allowed as exc:
            chaos.outcomes[type(exc).__name__] += 1
        except BaseException as exc:
            chaos.failures.append(processes.failure(exc, f"op {n}"))
        else:
            chaos.outcomes["done"] += 1

    for first in range(0, ops, BATCH):
        batch = []
        for n in range(first, min(first + BATCH, ops)):
            limit = rng.choice([rng.uniform(0, 0.003), rng.uniform(0.003, 0.05), None])
            batch.append(one(n, pick(n), limit if timeouts else None))
        await asyncio.gather(*batch)
    return chaos


async def _retry_unfinished_settles(
    store: Store, chaos: Chaos, call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
) -> int:
    """Settle again, with the same arguments, each admission whose settle never returned:
    the one settlement; and each that did return gives the same again. How many retried."""
    retried = 0
    for admission_id, (cost, tokens) in chaos.settles.items():
        again = functools.partial(store.admissions.settle, admission_id, cost, tokens=tokens)
        settled = await call(again)
        assert settled.cost == cost
        if admission_id in chaos.settled:
            assert settled == chaos.settled[admission_id]
        else:
            retried += 1
            assert await again() == settled  # and once more: still the one settlement
    return retried


async def _direct(call: Callable[[], Awaitable[Any]]) -> Any:
    return await call()


# -- cancelled tasks -------------------------------------------------------------------------


async def test_cancelled_admissions_and_settlements_leave_everything_whole(store: Store) -> None:
    setup = await limits(store, tag_limit=300)  # the tag's budget runs out part-way
    chaos = await _chaos(
        store, setup, random.Random(3), timeouts=True, allowed=(BudgetExceededError,)
    )
    assert chaos.failures == []
    assert chaos.outcomes["cancelled"] > 0 and chaos.outcomes["done"] > 0, chaos.outcomes
    assert chaos.outcomes["BudgetExceededError"] > 0, chaos.outcomes
    await asyncio.sleep(0.05)  # let a write cancelled in a worker thread finish there
    # Some settles were cut short; retried, each returns its one settlement.
    assert await _retry_unfinished_settles(store, chaos, _direct) > 0
    by_status = await check_whole(store, setup)
    assert set(by_status) == {"active", "settled", "released"}, by_status
    # Each settled admission was charged once, to the key and to its budgets.
    key = await store.api_keys.get(setup.key_id)
    entries = await run_sql(
        store,
        lambda conn: conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(-L.c.amount), 0)).where(
                L.c.kind == "settlement"
            )
        ).one(),
    )
    assert tuple(entries) == (by_status["settled"], key.total_spent)
    await store.budgets.update(setup.tag_budget.id, limit=10**9)
    await keeps_working(store, setup)
    await check_whole(store, setup)


# -- killed connections ----------------------------------------------------------------------


@pytest.mark.postgres
async def test_killed_connections_leave_every_admission_whole() -> None:
    url = require_postgres()
    schema = fresh_schema_name()
    store = Store.from_url(
        url, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
    )
    admin = create_async_engine(store.config.url.get_secret_value(), poolclass=NullPool)
    try:
        with CheckedOut().following() as checked_out:
            async with store:
                setup = await limits(store)
                killed: list[int] = []

                async def killer() -> None:
                    for _ in range(10):
                        await asyncio.sleep(0.03)
                        pids = await store_pids(checked_out, schema, admin)
                        if pids:
                            killed.append(await terminate_backends(pids))

                run = _chaos(
                    store,
                    setup,
                    random.Random(11),
                    timeouts=False,
                    allowed=(LlmstoreError,),
                    ops=160,
                )
                chaos, _ = await asyncio.gather(run, killer())

                # Each call succeeded or raised an llmstore error, never another type.
                assert chaos.failures == []
                assert sum(killed) > 0
                assert chaos.outcomes["DatabaseUnavailableError"] > 0, chaos.outcomes
                assert chaos.outcomes["done"] > 0, chaos.outcomes
                await until_it_answers(store.budgets.verify)
                # A settle that died with its connection may have committed or not:
                # retried, it returns the one settlement either way.
                await _retry_unfinished_settles(store, chaos, until_it_answers)
                await check_whole(store, setup)
                await keeps_working(store, setup)
                await check_whole(store, setup)
    finally:
        await admin.dispose()
        await drop_schema(url, schema)


# -- a worker process killed mid-burst -------------------------------------------------------


async def _dead_transactions_rolled_back(schema: str) -> None:
    """Wait until the server has noticed the dead worker's connections and rolled back
    their transactions (until then a transaction's row locks make expire() skip rows)."""
    conn = await asyncpg.connect(require_postgres())
    try:
        for _ in range(500):
            open_transactions = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND xact_start IS NOT NULL AND position($1 in query) > 0",
                schema,
            )
            if open_transactions == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the dead worker's transactions are still open")
    finally:
        await conn.close()


async def test_a_worker_killed_mid_burst_leaves_holds_that_expire(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    clock = Clock(START)
    async with Store(db_config, clock=clock) as store:
        setup = await limits(store)
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    config_json = processes.config_json(db_config)
    worker = context.Process(
        target=burst_worker, args=(config_json, START.isoformat(), setup.secret, started, 5)
    )
    worker.start()
    try:
        assert await asyncio.to_thread(started.wait, processes.READY_TIMEOUT)
        await asyncio.sleep(0.2)  # in the middle of the burst
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        await asyncio.to_thread(worker.join, 30)
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert worker.exitcode == -signal.SIGKILL
    if db_config.schema_name is not None:
        await _dead_transactions_rolled_back(db_config.schema_name)

    async with Store(db_config, clock=clock) as store:
        by_status = await check_whole(store, setup)
        # The dead worker left admissions active, their holds in place.
        assert by_status["active"] > 0 and by_status["settled"] > 0, by_status
        assert await store.admissions.expire() == 0  # none is due yet
        clock.move(BURST_TTL)
        assert await store.admissions.expire() == by_status["active"]
        after = await check_whole(store, setup, frozenset({"expired", "settled", "released"}))
        assert after["expired"] == by_status["active"]
        key = await store.api_keys.get(setup.key_id)
        assert key.reserved == 0
        for budget in (setup.project_budget, setup.tag_budget):
            assert (await store.budgets.status(budget.id)).reserved == 0
        await keeps_working(store, setup)


# -- a write the database refuses inside the unit --------------------------------------------


def _refusals(store: Store, where: str) -> list[str]:
    """SQL that makes the database refuse an admission of end user 'doomed': its row's
    INSERT, its window's INSERT (the unit's last), or its COMMIT."""
    admissions = qualified(store, A.name)
    windows = qualified(store, AW.name)
    if store.driver == "sqlite":
        raise_it = "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        return {
            "admission": [
                f"CREATE TRIGGER refuse BEFORE INSERT ON {admissions} "
                f"WHEN NEW.end_user = 'doomed' {raise_it}"
            ],
            "window": [
                f"CREATE TRIGGER refuse BEFORE INSERT ON {windows} WHEN (SELECT end_user "
                f"FROM {admissions} WHERE id = NEW.admission_id) = 'doomed' {raise_it}"
            ],
            # A row that breaks a deferred foreign key: SQLite refuses it at COMMIT.
            "commit": [
                "CREATE TABLE refuse_at_commit (project_id REFERENCES llmstore_projects(id) "
                "DEFERRABLE INITIALLY DEFERRED)",
                f"CREATE TRIGGER refuse AFTER INSERT ON {admissions} WHEN NEW.end_user = "
                "'doomed' BEGIN INSERT INTO refuse_at_commit VALUES ('no such project'); END",
            ],
        }[where]
    function = qualified(store, "refuse")
    table, doomed = {
        "admission": (admissions, "NEW.end_user = 'doomed'"),
        "window": (
            windows,
            f"(SELECT end_user FROM {admissions} WHERE id = NEW.admission_id) = 'doomed'",
        ),
        # A deferred constraint trigger: Postgres runs it at COMMIT.
        "commit": (admissions, "NEW.end_user = 'doomed'"),
    }[where]
    trigger = (
        "CONSTRAINT TRIGGER refuse AFTER INSERT"
        if where == "commit"
        else "TRIGGER refuse BEFORE INSERT"
    )
    deferred = "DEFERRABLE INITIALLY DEFERRED" if where == "commit" else ""
    return [
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF {doomed} THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$",
        f"CREATE {trigger} ON {table} {deferred} FOR EACH ROW EXECUTE FUNCTION {function}()",
    ]


async def _footprint(store: Store, setup: Limits) -> tuple[Any, ...]:
    """What an admission or a settlement counts, holds, charges or writes."""
    key = await store.api_keys.get(setup.key_id)
    periods = [
        await store.budgets.status(budget.id) for budget in (setup.project_budget, setup.tag_budget)
    ]
    window = await store.rate_limits.status(setup.rate_limit.id)

    def count(conn: Connection) -> list[int]:
        return [
            conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (A, AB, AW, R, L, budget_crossings, usage_logs)
        ]

    return (
        (key.balance, key.reserved, key.total_spent),
        [(period.spent, period.reserved) for period in periods],
        (window.requests, window.tokens),
        await run_sql(store, count),
    )


REFUSALS = (BudgetExceededError, RateLimitedError, InsufficientBalanceError, ApiKeyRejectedError)


@pytest.mark.parametrize("where", ["admission", "window", "commit"])
async def test_an_admission_the_database_refuses_leaves_nothing_counted(
    store: Store, where: str
) -> None:
    setup = await limits(store, tag_limit=1000, soft=(50,))
    earlier = await store.admissions.admit(setup.secret, end_user="fine", tags=[TAG], cost=10)
    await execute(store, *_refusals(store, where))
    before = await _footprint(store, setup)
    for _ in range(2):  # the second finds no trace of the first (no replay, no hold)
        with pytest.raises(LlmstoreError) as refused:
            await store.admissions.admit(
                setup.secret,
                end_user="doomed",
                tags=[TAG],
                cost=100,  # would cross the soft limit at 50
                tokens=40,
                idempotency_key="doomed",
            )
        assert not isinstance(refused.value, REFUSALS), refused.value
        assert await _footprint(store, setup) == before
    # The soft limit the refused admission would have crossed is still there to cross.
    fine = await store.admissions.admit(setup.secret, end_user="fine", tags=[TAG], cost=45)
    assert [(c.budget_id, c.threshold) for c in fine.crossed] == [(setup.tag_budget.id, 50)]
    for admitted in (earlier, fine):
        await store.admissions.settle(admitted.id, 5)
    assert (await store.budgets.status(setup.tag_budget.id)).spent == 10
    await check_whole(store, setup)
    await keeps_working(store, setup)


async def test_a_settlement_the_database_refuses_leaves_the_admission_active(
    store: Store,
) -> None:
    setup = await limits(store)
    admitted = await store.admissions.admit(setup.secret, tags=[TAG], cost=100, tokens=10)
    model = qualified(store, usage_logs.name)
    if store.driver == "sqlite":
        refuse = [
            f"CREATE TRIGGER refuse BEFORE INSERT ON {model} WHEN NEW.model = 'doomed' "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ]
    else:
        function = qualified(store, "refuse")
        refuse = [
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.model = 'doomed' THEN RAISE EXCEPTION 'refused by the test'; END IF; "
            "RETURN NEW; END $$",
            f"CREATE TRIGGER refuse BEFORE INSERT ON {model} FOR EACH ROW "
            f"EXECUTE FUNCTION {function}()",
        ]
    await execute(store, *refuse)
    before = await _footprint(store, setup)
    # The usage row is the settlement's last write: refused, nothing of it is kept.
    with pytest.raises(LlmstoreError) as refused:
        await store.admissions.settle(
            admitted.id, 80, tokens=12, usage=UsageRecord(model="doomed", cost=80)
        )
    assert not isinstance(refused.value, REFUSALS), refused.value
    assert await _footprint(store, setup) == before
    assert (await store.admissions.get(admitted.id)).status == "active"
    # Never settled, so another settlement is no conflict.
    settled = await store.admissions.settle(
        admitted.id, 80, tokens=12, usage=UsageRecord(model="fine", cost=80)
    )
    assert (settled.charged, settled.tokens) == (80, 12) and settled.usage_id is not None
    await check_whole(store, setup)
    await keeps_working(store, setup)
