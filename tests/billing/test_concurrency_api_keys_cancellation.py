"""Prepaid API keys under cancellation and killed connections: operations cancelled
mid-flight, a transaction cancelled while it begins, and killed Postgres connections
leave the ledger consistent."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import DatabaseUnavailableError, InsufficientBalanceError, Store, generate_key
from llmstore.pytest_plugin import drop_schema, fresh_schema_name, run_sql
from tests import processes
from tests.billing.concurrency_api_keys_support import MINT, TOKEN, L, _check_ledger
from tests.helpers import (
    CheckedOut,
    require_postgres,
    store_pids,
    terminate_backends,
    until_it_answers,
)

pytestmark = pytest.mark.slow


CANCEL_OPS = 240
CANCEL_BATCH = 12


async def _chaos(
    store: Store,
    key_ids: list[uuid.UUID],
    rng: random.Random,
    *,
    timeouts: bool,
    allowed: tuple[type[BaseException], ...],
    ops: int = CANCEL_OPS,
    tag: str = "",
) -> tuple[Counter[str], list[str], list[str]]:
    """Run ``ops`` random operations in batches; each may be cancelled at a random point."""
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    attempted_tx: list[str] = []
    keys = store.api_keys
    a, b, c = key_ids

    async def hold_then(settle: bool) -> None:
        hold = await keys.reserve(rng.choice(key_ids), rng.randint(1, 50))
        await asyncio.sleep(0)
        if settle:
            await keys.settle(hold.id, rng.randint(1, 100))
        else:
            await keys.release(hold.id)

    async def payout() -> None:
        made = await keys.withdraw(rng.choice(key_ids), rng.randint(1, 50), TOKEN, MINT)
        await keys.fail_withdrawal(made.id, "mint offline")
        await keys.retry_withdrawal(made.id)
        await keys.complete_withdrawal(made.id)

    async def in_transaction(n: int) -> None:
        name = f"tx-{tag}{n}"
        attempted_tx.append(name)
        async with store.transaction() as tx:
            await tx.api_keys.transfer(a, c, rng.randint(1, 20), idempotency_key=name)
            await tx.api_keys.charge(c, rng.randint(1, 20), idempotency_key=name)

    def pick(n: int) -> Callable[[], Awaitable[Any]]:
        choice = rng.randrange(8)
        amount = rng.randint(1, 60)
        src, dst = (a, b) if rng.random() < 0.5 else (b, a)
        return [
            lambda: keys.charge(rng.choice(key_ids), amount),
            lambda: keys.charge(src, amount, idempotency_key=f"c-{tag}{n}"),
            lambda: keys.deposit(rng.choice(key_ids), amount),
            lambda: keys.transfer(src, dst, amount),
            lambda: hold_then(True),
            lambda: hold_then(False),
            payout,
            lambda: in_transaction(n),
        ][choice]

    async def one(n: int, call: Callable[[], Awaitable[Any]], limit: float | None) -> None:
        try:
            await asyncio.wait_for(call(), limit)
        except TimeoutError:
            outcomes["cancelled"] += 1
        except allowed as exc:
            outcomes[type(exc).__name__] += 1
        except Exception as exc:
            failures.append(processes.failure(exc, f"op {n}"))
        else:
            outcomes["done"] += 1

    for first in range(0, ops, CANCEL_BATCH):
        batch = []
        for n in range(first, min(first + CANCEL_BATCH, ops)):
            timeout = _timeout(rng) if timeouts else None
            batch.append(one(n, pick(n), timeout))
        await asyncio.gather(*batch)
    return outcomes, failures, attempted_tx


def _timeout(rng: random.Random) -> float | None:
    """A third cut short at once, a third part-way, a third left to finish."""
    return rng.choice([rng.uniform(0.0, 0.003), rng.uniform(0.003, 0.05), None])


def _tx_halves(conn: Connection) -> Counter[str | None]:
    rows = conn.execute(
        sa.select(L.c.idempotency_key).where(L.c.idempotency_key.like("tx-%"))
    ).scalars()
    return Counter(rows)


async def _check_after_chaos(store: Store, key_ids: list[uuid.UUID], attempted: list[str]) -> None:
    await _check_ledger(store)
    # A transaction's transfer and charge committed together or not at all.
    halves = await run_sql(store, _tx_halves)
    assert set(halves.values()) <= {2}, halves
    assert set(halves) <= set(attempted)
    # The store still serves every kind of call.
    before = await store.api_keys.get(key_ids[0])
    entry = await store.api_keys.charge(key_ids[0], 1, idempotency_key=uuid.uuid4().hex)
    assert entry.balance_after == before.balance - 1
    async with store.transaction() as tx:
        await tx.api_keys.transfer(key_ids[1], key_ids[0], 1)
    assert (await store.api_keys.get(key_ids[0])).balance == before.balance
    await _check_ledger(store)


async def test_cancelled_operations_leave_the_ledger_consistent(store: Store) -> None:
    key_ids = [(await store.api_keys.create(balance=20_000)).key.id for _ in range(3)]
    rng = random.Random(7)

    outcomes, failures, attempted = await _chaos(
        store, key_ids, rng, timeouts=True, allowed=(InsufficientBalanceError,)
    )

    assert failures == []
    # Both happened: calls cancelled part-way, and calls that finished.
    assert outcomes["cancelled"] > 0 and outcomes["done"] > 0, outcomes
    await asyncio.sleep(0.05)  # let a write cancelled in a worker thread finish there
    await _check_after_chaos(store, key_ids, attempted)


async def test_transaction_cancelled_while_it_begins_does_not_wedge_sqlite(
    tmp_path: Path,
) -> None:
    """A cancellation that lands while BEGIN IMMEDIATE waits for another writer's lock.

    The BEGIN still completes in the writer thread after the task is gone; the store must
    not be left with its writer connection inside that orphaned transaction.
    """
    path = tmp_path / "wedge.db"
    async with Store.from_url(
        f"sqlite:///{path}", encryption_keys=generate_key(), auto_upgrade=True
    ) as store:
        key = (await store.api_keys.create(balance=100)).key
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

            async def charge_in_transaction() -> None:
                async with store.transaction() as tx:
                    await tx.api_keys.charge(key.id, 1)

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(charge_in_transaction(), 0.2)
            other.execute("COMMIT")
            await asyncio.sleep(0.2)  # the orphaned BEGIN has its lock by now
        finally:
            other.close()

        hold = await store.api_keys.reserve(key.id, 5)
        assert hold.status == "active"
        async with store.transaction() as tx:
            await tx.api_keys.charge(key.id, 7)
        after = await store.api_keys.get(key.id)
        assert (after.balance, after.reserved) == (93, 5)
        await _check_ledger(store)


@pytest.mark.postgres
async def test_killed_connections_leave_the_ledger_consistent() -> None:
    url = require_postgres()
    schema = fresh_schema_name()
    store = Store.from_url(
        url, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
    )
    admin = create_async_engine(store.config.url.get_secret_value(), poolclass=NullPool)
    try:
        with CheckedOut().following() as checked_out:
            async with store:
                key_ids = [(await store.api_keys.create(balance=20_000)).key.id for _ in range(3)]
                killed: list[int] = []

                async def killer() -> None:
                    for _ in range(8):
                        await asyncio.sleep(0.03)
                        pids = await store_pids(checked_out, schema, admin)
                        if pids:
                            killed.append(await terminate_backends(pids))

                chaos = _chaos(
                    store,
                    key_ids,
                    random.Random(11),
                    timeouts=False,
                    allowed=(InsufficientBalanceError, DatabaseUnavailableError),
                    ops=360,
                )
                (outcomes, failures, attempted), _ = await asyncio.gather(chaos, killer())

                assert failures == []
                assert sum(killed) > 0
                # Connections died under the store, and it went on serving the other calls.
                assert outcomes["DatabaseUnavailableError"] > 0, outcomes
                assert outcomes["done"] > 0, outcomes
                await until_it_answers(store.api_keys.verify)
                await _check_after_chaos(store, key_ids, attempted)
                # And a timed-out round on top of that.
                outcomes, failures, attempted_more = await _chaos(
                    store,
                    key_ids,
                    random.Random(12),
                    timeouts=True,
                    allowed=(InsufficientBalanceError,),
                    tag="again-",
                )
                assert failures == []
                await _check_after_chaos(store, key_ids, attempted + attempted_more)
    finally:
        await admin.dispose()
        await drop_schema(url, schema)
