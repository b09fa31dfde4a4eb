"""What the buffered usage writer's tests (``test_usage_writer_*.py``) share: records that
carry a marker, counting the stored markers, a database that refuses writes for a while or
refuses some rows, and a writer whose close is bounded when a test fails inside it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import Store, UnwrittenUsageError, UsageRecord, UsageWriter
from llmstore._db.schema import usage_logs
from llmstore.pytest_plugin import run_sql
from tests.helpers import execute, qualified
from tests.usage.usage_support import refuse_usage_rows

# Row contents that must never reach the log.
SECRET = "row-content-never-logged"


def _rec(marker: str, request_id: str | None = None) -> UsageRecord:
    return UsageRecord(request_id=request_id, model="m", metadata={"marker": marker, "s": SECRET})


def _recs(prefix: str, count: int, *, with_request_ids: bool = False) -> list[UsageRecord]:
    return [
        _rec(f"{prefix}-{i}", f"{prefix}-req-{i}" if with_request_ids and i % 2 else None)
        for i in range(count)
    ]


async def _markers(store: Store) -> Counter[str]:
    """How many stored rows carry each marker."""

    def read(conn: Connection) -> Counter[str]:
        rows = conn.execute(sa.select(usage_logs.c.usage_metadata)).scalars()
        return Counter(row["marker"] for row in rows if row is not None)

    result: Counter[str] = await run_sql(store, read, write=True)
    return result


async def _markers_in_id_order(store: Store) -> list[str]:
    def read(conn: Connection) -> list[str]:
        statement = sa.select(usage_logs.c.usage_metadata).order_by(usage_logs.c.id)
        return [row["marker"] for row in conn.execute(statement).scalars()]

    result: list[str] = await run_sql(store, read, write=True)
    return result


async def _assert_each_once(store: Store, records: list[UsageRecord]) -> None:
    """Every record is stored exactly once, and nothing else is."""
    expected = Counter(record.metadata["marker"] for record in records if record.metadata)
    stored = await _markers(store)
    # A short report: a failed comparison of thousands of markers takes pytest minutes.
    wrong = {m: stored[m] for m in expected.keys() | stored.keys() if stored[m] != expected[m]}
    assert not wrong, f"{len(wrong)} markers stored the wrong number of times: {wrong!r:.300}"


async def _refuse(store: Store) -> None:
    """Make the real database fail every new usage row with an error that is not about the
    row (as a lost connection or a full disk would): the writer retries the same batch."""
    if store.driver == "postgresql":
        function = qualified(store, "refuse")
        statements = [
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'refused for a while'; END $$",
            f"CREATE TRIGGER refuse BEFORE INSERT ON {qualified(store, usage_logs.name)} "
            f"FOR EACH ROW EXECUTE FUNCTION {function}()",
        ]
    else:
        statements = [
            "CREATE TRIGGER refuse BEFORE INSERT ON llmstore_usage_logs "
            "BEGIN INSERT INTO refused_for_a_while VALUES (1); END"
        ]
    await execute(store, *statements)


async def _recover(store: Store) -> None:
    if store.driver == "postgresql":
        statements = [
            f"DROP TRIGGER refuse ON {qualified(store, usage_logs.name)}",
            f"DROP FUNCTION {qualified(store, 'refuse')}()",
        ]
    else:
        statements = ["DROP TRIGGER refuse"]
    await execute(store, *statements)


async def _refuse_model(store: Store, model: str) -> None:
    """Make the real database refuse the rows of one model, with a constraint of its own."""
    await refuse_usage_rows(
        store,
        "poison",
        check=f"model IS DISTINCT FROM '{model}'",
        when=f"NEW.model = '{model}'",
        message="poisoned row",
    )


async def _until(condition: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def _writer(store: Store, **options: Any) -> AsyncIterator[UsageWriter]:
    """A writer drained on leaving the block, as ``async with`` does, but whose close is
    bounded when the test fails inside it: a database left refusing would otherwise keep
    the drain retrying, and a failing test would hang instead of failing."""
    w = store.usage.writer(**options)
    try:
        yield w
    except BaseException:
        with contextlib.suppress(UnwrittenUsageError):
            await w.close(timeout=5)
        raise
    await w.close()


def _writer_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "llmstore usage writer"]
