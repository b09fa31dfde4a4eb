"""The lean path on Postgres: held connections the server closed are replaced before use,
one that dies mid-statement fails that call alone, and nothing is half-done."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from llmstore import DatabaseUnavailableError, Store
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import CheckedOut, require_postgres, terminate_backends

pytestmark = pytest.mark.postgres


@pytest.fixture
def lane() -> Iterator[CheckedOut]:
    """The connections checked out of the store's pool: between calls, its lane's."""
    with CheckedOut().following() as checked_out:
        yield checked_out


@pytest.fixture
async def pg_store(lane: CheckedOut) -> AsyncIterator[Store]:
    url = require_postgres()
    schema = fresh_schema_name()
    async with Store.from_url(url, schema_name=schema, auto_upgrade=True) as store:
        yield store
    await drop_schema(url, schema)


async def _kill_while_waiting(
    store: Store, lane: CheckedOut, table: str, call: Awaitable[object]
) -> None:
    """Run ``call`` while every row of ``table`` is locked elsewhere; once its statement
    waits for the lock, terminate its lane backend: the statement dies in flight, and
    ``call`` must fail with DatabaseUnavailableError."""
    url = require_postgres()
    pids = lane.pids()
    assert len(pids) == 1
    holder = await asyncpg.connect(url)
    watcher = await asyncpg.connect(url)
    try:
        locked = holder.transaction()
        await locked.start()
        await holder.execute(f'SELECT 1 FROM "{store.config.schema_name}".{table} FOR UPDATE')
        task = asyncio.ensure_future(call)
        for _ in range(500):
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                pids[0],
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the lane's statement never waited for the lock")
        assert await terminate_backends(pids) == 1
        await locked.rollback()
        with pytest.raises(DatabaseUnavailableError):
            await task
    finally:
        await holder.close()
        await watcher.close()


async def test_a_lane_connection_killed_while_idle_is_replaced_before_use(
    pg_store: Store, lane: CheckedOut
) -> None:
    project = await pg_store.projects.create("p")
    issued = await pg_store.tokens.create(project.id, max_requests=10)
    await pg_store.tokens.use(issued.secret)
    pids = lane.pids()
    assert len(pids) == 1
    assert await terminate_backends(pids) == len(pids)
    # Idle for a moment, as such a connection is: the event loop reads the server's goodbye
    # and the end of its socket (right after the kill, they may still be on the way).
    await asyncio.sleep(0.2)
    # A restart or a failover: the next call gets a new connection, and succeeds.
    token = await pg_store.tokens.use(issued.secret)
    assert token.request_count == 2
    assert lane.pids() != pids


async def test_a_lane_connection_killed_mid_statement_fails_that_call_only(
    pg_store: Store, lane: CheckedOut
) -> None:
    project = await pg_store.projects.create("p")
    issued = await pg_store.tokens.create(project.id, max_requests=10)
    await pg_store.tokens.use(issued.secret)
    pids = lane.pids()
    await _kill_while_waiting(pg_store, lane, "llmstore_tokens", pg_store.tokens.use(issued.secret))
    token = await pg_store.tokens.use(issued.secret)
    assert token.request_count == 2  # the failed call spent nothing
    assert lane.pids() != pids


async def test_a_cancelled_use_leaves_the_lane_usable(pg_store: Store) -> None:
    project = await pg_store.projects.create("p")
    issued = await pg_store.tokens.create(project.id)
    for _ in range(20):
        task = asyncio.create_task(pg_store.tokens.use(issued.secret))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    before = (await pg_store.tokens.get(issued.token.id)).request_count
    token = await pg_store.tokens.use(issued.secret)
    assert token.request_count == before + 1
    results = await asyncio.gather(*(pg_store.tokens.use(issued.secret) for _ in range(30)))
    assert sorted(t.request_count for t in results) == list(range(before + 2, before + 32))


async def test_a_killed_lane_connection_under_settle_leaves_the_hold_active(
    pg_store: Store, lane: CheckedOut
) -> None:
    key = (await pg_store.api_keys.create(balance=1000)).key
    hold = await pg_store.api_keys.reserve(key.id, 300)  # one statement, on the lane
    pids = lane.pids()
    await _kill_while_waiting(
        pg_store, lane, "llmstore_api_keys", pg_store.api_keys.settle(hold.id, 200)
    )
    assert (await pg_store.api_keys.get_reservation(hold.id)).status == "active"
    entry = await pg_store.api_keys.settle(hold.id, 200)
    assert (entry.kind, entry.amount, entry.balance_after, entry.shortfall) == (
        "settlement",
        -200,
        800,
        0,
    )
    after = await pg_store.api_keys.get(key.id)
    assert (after.balance, after.reserved, after.total_spent) == (800, 0, 200)
    assert lane.pids() != pids
    assert (await pg_store.api_keys.verify()).ok
