"""The buffered usage writer (``store.usage.writer()``) on every driver: flushing by size
and by time, back-pressure, draining on exit, close() and cancellation, retrying through a
database that refuses writes, and exactly-once delivery when a COMMIT's reply is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import (
    ConfigError,
    ConflictError,
    DatabaseError,
    DatabaseUnavailableError,
    SchemaOutOfDateError,
    Store,
    StoreClosedError,
    TransactionError,
    UnwrittenUsageError,
    UsageRecord,
    UsageWriter,
    ValidationError,
    WriterClosedError,
    WriterStats,
    generate_key,
)
from llmstore._db.schema import usage_logs
from llmstore.pytest_plugin import drop_schema, fresh_schema_name, run_sql
from tests.helpers import count_rows, execute, qualified, require_postgres

# Row contents that must never reach the log.
SECRET = "row-content-never-logged"


# --- helpers -------------------------------------------------------------------------------


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
    if store.driver == "postgresql":
        sql = (
            f"ALTER TABLE {qualified(store, usage_logs.name)} ADD CONSTRAINT poison "
            f"CHECK (model IS DISTINCT FROM '{model}') NOT VALID"
        )
    else:
        sql = (
            "CREATE TRIGGER poison BEFORE INSERT ON llmstore_usage_logs "
            f"WHEN NEW.model = '{model}' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
        )
    await run_sql(store, lambda conn: conn.exec_driver_sql(sql), write=True)


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


# --- flushing ------------------------------------------------------------------------------


async def test_a_full_batch_is_flushed_without_waiting_for_the_interval(store: Store) -> None:
    records = _recs("size", 25)
    async with store.usage.writer(max_batch=10, flush_interval=3600, max_pending=100) as w:
        for record in records:
            await w.put(record)
        await _until(lambda: w.stats.written == 20)
        assert w.stats.batches == 2
        assert w.stats.pending == 5
        # The last five wait for the interval (an hour) or for the close.
        await asyncio.sleep(0.2)
        assert w.stats.pending == 5
        assert sum((await _markers(store)).values()) == 20
    assert w.stats == WriterStats(
        pending=0, written=25, duplicates=0, retried=0, failed_attempts=0, batches=3, rejected=0
    )
    await _assert_each_once(store, records)


async def test_rows_are_flushed_once_the_oldest_has_waited_the_interval(store: Store) -> None:
    interval = 0.3
    records = _recs("interval", 5)
    async with store.usage.writer(max_batch=1000, flush_interval=interval) as w:
        for round_ in (records[:3], records[3:]):
            started = time.monotonic()
            for record in round_:
                await w.put(record)
            before = w.stats.written
            await asyncio.sleep(interval / 3)
            if time.monotonic() - started < interval * 0.9:
                assert w.stats.written == before
            wanted = before + len(round_)
            # Awaited within this round: the late binding B023 warns of cannot bite.
            await _until(lambda: w.stats.written == wanted)  # noqa: B023
            # Never early; late only as much as a loaded machine makes it.
            assert time.monotonic() - started >= interval - 0.02
    assert w.stats.batches == 2
    await _assert_each_once(store, records)


# --- back-pressure -------------------------------------------------------------------------


async def test_put_waits_while_max_pending_rows_are_held_then_resumes(store: Store) -> None:
    records = _recs("pressure", 8)
    await _refuse(store)
    async with _writer(store, max_batch=2, flush_interval=0.01, max_pending=4) as w:
        started = time.monotonic()
        for record in records[:4]:
            await w.put(record)  # room: returns at once
        assert time.monotonic() - started < 5
        assert w.stats.pending == 4
        blocked = []
        for record in records[4:]:
            blocked.append(asyncio.create_task(w.put(record)))
            await asyncio.sleep(0)
        await _until(lambda: w.stats.failed_attempts >= 2)
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in blocked)
        assert w.stats.pending == 4
        assert w.stats.written == 0
        await _recover(store)
        await asyncio.wait_for(asyncio.gather(*blocked), 30)
    assert w.stats.written == 8
    assert w.stats.pending == 0
    await _assert_each_once(store, records)
    # The waiting puts were let in in the order they came.
    assert await _markers_in_id_order(store) == [f"pressure-{i}" for i in range(8)]


async def test_back_pressure_bounds_what_is_held_on_a_healthy_database(store: Store) -> None:
    records = _recs("bound", 1500)
    async with store.usage.writer(max_batch=40, flush_interval=0.01, max_pending=100) as w:
        most = 0
        for record in records:
            await w.put(record)
            most = max(most, w.stats.pending)
        assert most <= 100
    assert w.stats.written == 1500
    await _assert_each_once(store, records)


async def test_a_put_cancelled_while_waiting_queues_nothing(store: Store) -> None:
    records = _recs("cancelled-put", 3)
    await _refuse(store)
    async with _writer(store, max_batch=1, flush_interval=0.01, max_pending=1) as w:
        await w.put(records[0])
        waiting = asyncio.create_task(w.put(_rec("never")))
        behind = asyncio.create_task(w.put(records[1]))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await _recover(store)
        await asyncio.wait_for(behind, 30)
        await w.put(records[2])
    await _assert_each_once(store, records)


# --- draining ------------------------------------------------------------------------------


async def test_leaving_the_context_writes_every_row_held(store: Store) -> None:
    records = _recs("exit", 120, with_request_ids=True)
    async with store.usage.writer(max_batch=50, flush_interval=3600) as w:
        for record in records:
            await w.put(record)
    assert w.stats.pending == 0
    assert w.stats.written == 120
    await _assert_each_once(store, records)


async def test_close_drains_and_then_refuses_rows(store: Store) -> None:
    records = _recs("close", 30)
    w = store.usage.writer(flush_interval=3600)
    for record in records:
        await w.put(record)  # no `async with`: the first put starts the flusher
    await w.close()
    await _assert_each_once(store, records)
    with pytest.raises(WriterClosedError):
        await w.put(_rec("late"))
    await w.close()  # again: nothing to do
    with pytest.raises(WriterClosedError):
        async with w:
            pass
    assert w.stats.pending == 0
    await _assert_each_once(store, records)


async def test_a_writer_never_used_closes_at_once(store: Store) -> None:
    w = store.usage.writer()
    await w.close()
    with pytest.raises(WriterClosedError):
        await w.put(_rec("late"))
    assert w.stats == WriterStats(
        pending=0, written=0, duplicates=0, retried=0, failed_attempts=0, batches=0, rejected=0
    )


async def test_cancelling_the_owner_writes_every_row_before_the_cancellation(
    store: Store,
) -> None:
    records = _recs("owner", 40)
    writers: list[UsageWriter] = []
    ready = asyncio.Event()

    async def owner() -> None:
        async with store.usage.writer(flush_interval=3600) as w:
            writers.append(w)
            for record in records:
                await w.put(record)
            ready.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(owner())
    await ready.wait()
    assert await _markers(store) == Counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writers[0].stats.pending == 0
    await _assert_each_once(store, records)


async def test_a_cancelled_owner_keeps_draining_through_more_cancellations(store: Store) -> None:
    records = _recs("stubborn", 30)
    ready = asyncio.Event()

    async def owner() -> None:
        async with store.usage.writer(max_batch=10, flush_interval=0.01) as w:
            for record in records:
                await w.put(record)
            ready.set()
            await asyncio.sleep(3600)

    await _refuse(store)
    task = asyncio.create_task(owner())
    await ready.wait()
    for _ in range(3):
        task.cancel()
        await asyncio.sleep(0.1)
    assert not task.done()  # still retrying the refused rows
    await _recover(store)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    await _assert_each_once(store, records)


async def test_the_writers_own_tasks_cancelled_mid_write_still_write_every_row_once(
    store: Store,
) -> None:
    """As asyncio.run does to a writer never closed: every task is cancelled at once."""
    everything: list[UsageRecord] = []
    for round_, pause in enumerate((0, 0, 0.001, 0.003, 0.01, 0.03)):
        records = _recs(f"torn-{round_}", 1000)
        everything += records
        w = store.usage.writer(max_batch=1000, flush_interval=3600, max_pending=1000)
        for record in records:
            await w.put(record)  # a full batch: its write starts now
        await asyncio.sleep(0)
        await asyncio.sleep(pause)
        tasks = _writer_tasks()
        assert tasks
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        with pytest.raises(WriterClosedError):
            await w.put(_rec("after"))  # a cancelled writer is closing
        await w.close()
        assert w.stats.pending == 0
        assert w.stats.written == 1000
    await _assert_each_once(store, everything)


# --- stats and arguments -------------------------------------------------------------------


async def test_stats_count_rows_duplicates_and_batches(store: Store) -> None:
    await store.usage.record(_rec("stored-before", "seen"))
    async with store.usage.writer(flush_interval=3600) as w:
        await w.put(_rec("first", "a"))
        await w.put(_rec("again", "a"))
        await w.put(_rec("known", "seen"))
        await w.put(_rec("plain"))
        assert w.stats == WriterStats(
            pending=4, written=0, duplicates=0, retried=0, failed_attempts=0, batches=0, rejected=0
        )
    assert w.stats == WriterStats(
        pending=0, written=2, duplicates=2, retried=0, failed_attempts=0, batches=1, rejected=0
    )
    assert await _markers(store) == Counter({"stored-before": 1, "first": 1, "plain": 1})
    with pytest.raises(pydantic.ValidationError):
        w.stats.written = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch": 0},
        {"max_batch": -1},
        {"max_batch": True},
        {"max_batch": 1.5},
        {"max_batch": "10"},
        {"max_batch": 100_001, "max_pending": 200_000},
        {"max_pending": 0},
        {"max_pending": False},
        {"max_pending": None},
        {"max_batch": 11, "max_pending": 10},
        {"flush_interval": 0},
        {"flush_interval": -0.5},
        {"flush_interval": math.nan},
        {"flush_interval": math.inf},
        {"flush_interval": True},
        {"flush_interval": "0.5"},
        {"flush_interval": None},
    ],
)
async def test_bad_arguments_are_refused(options: dict[str, Any]) -> None:
    async with Store.from_url("sqlite:///:memory:", encryption_keys=generate_key()) as store:
        with pytest.raises(ValidationError):
            store.usage.writer(**options)


async def test_the_largest_batch_and_smallest_settings_are_accepted(store: Store) -> None:
    records = _recs("edge", 4)
    store.usage.writer(max_batch=100_000, max_pending=100_000)
    async with store.usage.writer(max_batch=1, flush_interval=1e-6, max_pending=1) as w:
        for record in records[:3]:
            await w.put(record)
    assert w.stats.batches == 3
    async with store.usage.writer(flush_interval=1e300) as w:
        await w.put(records[3])  # waits for the close, not for the interval
    await _assert_each_once(store, records)


async def test_put_takes_only_a_usage_record_and_queues_nothing_else(store: Store) -> None:
    async with store.usage.writer() as w:
        for bad in ({"model": "m"}, None, "row", [_rec("in-a-list")]):
            with pytest.raises(ValidationError):
                await w.put(bad)  # type: ignore[arg-type]
        assert w.stats.pending == 0
        for timeout in (-1, math.nan, math.inf, "1", True):
            with pytest.raises(ValidationError):
                await w.close(timeout=timeout)  # type: ignore[arg-type]
        await w.put(_rec("fine"))  # a refused close() did not close it
    assert await _markers(store) == Counter({"fine": 1})


async def test_a_transactions_usage_has_no_writer(store: Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(TransactionError):
            tx.usage.writer()


async def test_a_full_writer_refuses_to_wait_inside_a_sqlite_transaction(store: Store) -> None:
    """The flush it would wait for needs the write lock that the transaction holds."""
    await _refuse(store)
    async with _writer(store, max_batch=1, flush_interval=0.01, max_pending=1) as w:
        await w.put(_rec("held"))
        async with store.transaction():
            if store.driver == "sqlite":
                with pytest.raises(TransactionError):
                    await w.put(_rec("inside"))
            else:
                # Postgres flushes on another connection: the put just waits for room.
                recovery = asyncio.create_task(_recover(store))
                await asyncio.wait_for(w.put(_rec("inside")), 30)
                await recovery
        if store.driver == "sqlite":
            await _recover(store)
    expected = Counter({"held": 1}) if store.driver == "sqlite" else Counter(held=1, inside=1)
    assert await _markers(store) == expected


# --- a database that refuses writes --------------------------------------------------------


async def test_a_refusing_database_that_recovers_gets_every_row_exactly_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = _recs("before", 50, with_request_ids=True)
    refused = _recs("during", 100, with_request_ids=True)
    caplog.set_level(logging.WARNING, logger="llmstore")
    async with _writer(store, max_batch=20, flush_interval=0.02, max_pending=1000) as w:
        for record in healthy:
            await w.put(record)
        await _until(lambda: w.stats.written == 50)
        await _refuse(store)
        for record in refused:
            await w.put(record)
        await _until(lambda: w.stats.failed_attempts >= 3)
        assert w.stats.pending == 100
        assert w.stats.written == 50
        await _recover(store)
        await _until(lambda: w.stats.pending == 0)
    stats = w.stats
    assert stats.written == 150
    assert stats.duplicates == 0
    assert stats.failed_attempts >= 3
    assert stats.retried >= 20  # at least the batch that was refused
    await _assert_each_once(store, healthy + refused)
    warnings = [r for r in caplog.records if r.name == "llmstore" and r.levelname == "WARNING"]
    assert len(warnings) == stats.failed_attempts
    text = "\n".join(record.getMessage() for record in warnings)
    assert "Error" in text  # the error's class and message
    assert SECRET not in text
    assert "during-" not in text


async def test_close_with_a_timeout_hands_back_exactly_the_unwritten_records(
    store: Store,
) -> None:
    written = _recs("kept", 10)
    unwritten = _recs("handed-back", 25, with_request_ids=True)
    w = store.usage.writer(max_batch=10, flush_interval=0.01, max_pending=100)
    for record in written:
        await w.put(record)
    await _until(lambda: w.stats.written == 10)
    await _refuse(store)
    for record in unwritten:
        await w.put(record)
    await _until(lambda: w.stats.failed_attempts >= 1)
    started = time.monotonic()
    with pytest.raises(UnwrittenUsageError) as raised:
        await w.close(timeout=0.3)
    assert 0.29 <= time.monotonic() - started < 15
    assert raised.value.records == unwritten
    assert all(a is b for a, b in zip(raised.value.records, unwritten, strict=True))
    assert "25 usage records" in str(raised.value)
    assert raised.value.__cause__ is not None
    assert w.stats.pending == 0  # handed over: the writer no longer holds them
    with pytest.raises(WriterClosedError):
        await w.put(_rec("late"))
    await w.close()  # raised once; the records are the caller's now
    await _recover(store)
    await asyncio.sleep(0.2)
    await _assert_each_once(store, written)


async def test_close_with_a_timeout_on_a_healthy_database_returns(store: Store) -> None:
    records = _recs("in-time", 300)
    w = store.usage.writer(max_batch=50, flush_interval=3600, max_pending=300)
    for record in records:
        await w.put(record)
    await w.close(timeout=30)
    await _assert_each_once(store, records)


async def test_a_store_closed_under_the_writer_hands_the_rows_back(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    records = _recs("orphan", 5)
    caplog.set_level(logging.WARNING, logger="llmstore")
    w = store.usage.writer(max_batch=5, flush_interval=3600)
    await store.close()
    for record in records:
        await w.put(record)  # the fifth fills a batch, whose write finds the store closed
    await _until(lambda: w.stats.failed_attempts == 1)
    # Fatal: the writer stops at once, without retrying, and takes no more rows.
    with pytest.raises(WriterClosedError, match="stopped"):
        await w.put(_rec("late"))
    with pytest.raises(UnwrittenUsageError) as raised:
        await w.close()
    assert w.stats.failed_attempts == 1
    assert raised.value.records == records
    assert "store was closed" in str(raised.value)
    messages = [r.getMessage() for r in caplog.records if r.name == "llmstore"]
    assert len(messages) == 1
    assert "stopped" in messages[0]
    assert "close the writer before the store" in messages[0]


# --- rows the database refuses, and failures the writer cannot retry ------------------------


async def test_rows_the_database_refuses_are_set_aside_and_the_rest_are_written(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await _refuse_model(store, "poison")
    good = _recs("good", 97, with_request_ids=True)
    poisoned = [
        UsageRecord(request_id=f"poison-{i}", model="poison", metadata={"s": SECRET})
        for i in range(3)
    ]
    records = [*good[:10], poisoned[0], *good[10:60], *poisoned[1:], *good[60:]]
    caplog.set_level(logging.WARNING, logger="llmstore")
    w = store.usage.writer(max_batch=100, flush_interval=3600, max_pending=100)
    for record in records:
        await w.put(record)  # the 100th fills a batch: it is written, or split, at once
    await _until(lambda: w.stats.pending == 0)
    assert w.stats.written == 97
    assert w.stats.rejected == 3
    # Found by halving: a few failed attempts per refused row, not one per row.
    assert 3 < w.stats.failed_attempts <= 3 * 7
    with pytest.raises(UnwrittenUsageError) as raised:
        await w.close()
    assert raised.value.records == poisoned
    assert all(a is b for a, b in zip(raised.value.records, poisoned, strict=True))
    assert "3 refused by the database" in str(raised.value)
    assert raised.value.__cause__ is not None
    await _assert_each_once(store, good)
    assert await count_rows(store, usage_logs) == 97
    errors = [r for r in caplog.records if r.name == "llmstore" and r.levelname == "ERROR"]
    assert sorted(r.getMessage().split("'")[1] for r in errors) == [r.request_id for r in poisoned]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in text
    assert "good-" not in text
    await w.close()  # raised once; the records are the caller's now


async def test_a_record_the_driver_cannot_encode_is_set_aside(store: Store) -> None:
    # model_construct skips validation: the writer must not stall on what it lets through.
    broken = UsageRecord.model_construct(**{**_rec("broken").__dict__, "created_at": "soon"})
    fine = _recs("fine", 9)
    async with _writer(store, max_batch=10, flush_interval=0.01) as w:
        for record in [*fine[:4], broken, *fine[4:]]:
            await w.put(record)
        await _until(lambda: w.stats.pending == 0)
        assert w.stats.rejected == 1
        with pytest.raises(UnwrittenUsageError) as raised:
            await w.close()
    assert raised.value.records == [broken]
    await _assert_each_once(store, fine)


async def test_a_refused_row_does_not_hold_up_back_pressure(store: Store) -> None:
    await _refuse_model(store, "poison")
    w = store.usage.writer(max_batch=2, flush_interval=0.01, max_pending=2)
    poisoned = UsageRecord(model="poison")
    fine = _recs("after", 20)
    await w.put(poisoned)
    for record in fine:  # each put waits for room: the refused row must not keep it
        await asyncio.wait_for(w.put(record), 30)
    with pytest.raises(UnwrittenUsageError) as raised:
        await w.close()
    assert raised.value.records == [poisoned]
    await _assert_each_once(store, fine)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValidationError("refused by a constraint"), "refused"),
        (TypeError("cannot encode"), "refused"),
        (DatabaseUnavailableError("connection lost"), "transient"),
        (DatabaseError("disk full"), "transient"),
        (ConflictError("a racing batch took a request id"), "transient"),
        (StoreClosedError("closed"), "fatal"),
        (SchemaOutOfDateError("behind"), "fatal"),
        (ConfigError("no key"), "fatal"),
        (TransactionError("misused"), "fatal"),
    ],
)
def test_failures_are_told_apart_by_what_a_retry_can_change(
    error: Exception, expected: str
) -> None:
    from llmstore._usage.attempts import classify

    assert classify(error).value == expected


# --- Postgres: a COMMIT that fails, and a COMMIT whose reply is lost ------------------------


@pytest.fixture
async def pg_url_and_schema() -> AsyncIterator[tuple[str, str]]:
    url = require_postgres()
    schema = fresh_schema_name()
    yield url, schema
    await drop_schema(url, schema)


@pytest.mark.postgres
async def test_postgres_a_batch_refused_at_commit_is_retried_once_recovered(
    pg_url_and_schema: tuple[str, str],
) -> None:
    url, schema = pg_url_and_schema
    records = _recs("at-commit", 60)
    async with Store.from_url(
        url, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
    ) as store:
        # A deferred constraint trigger fails the COMMIT itself, after the rows went in.
        await run_sql(
            store,
            lambda conn: conn.exec_driver_sql(
                f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql '
                "AS $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$"
            ),
            write=True,
        )
        await run_sql(
            store,
            lambda conn: conn.exec_driver_sql(
                f'CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON "{schema}".llmstore_usage_logs '
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                f'EXECUTE FUNCTION "{schema}".refuse()'
            ),
            write=True,
        )
        async with _writer(store, max_batch=60, flush_interval=0.01) as w:
            for record in records:
                await w.put(record)
            await _until(lambda: w.stats.failed_attempts >= 2)
            assert await _markers(store) == Counter()
            await run_sql(
                store,
                lambda conn: conn.exec_driver_sql(
                    f'DROP TRIGGER refuse ON "{schema}".llmstore_usage_logs'
                ),
                write=True,
            )
        assert w.stats.written == 60
        assert w.stats.retried == 60
        await _assert_each_once(store, records)


class _LostCommitReply:
    """A TCP proxy to Postgres that, once armed, lets one COMMIT reach the server and then
    cuts the connection before its reply reaches the client: the rows are committed, but
    the client only sees the connection drop."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.armed = False
        self.cut = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        cutting = False

        async def upstream() -> None:
            nonlocal cutting
            while data := await client_r.read(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    cutting = True
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if cutting:  # the server has committed and replied: drop the reply
                    self.cut += 1
                    client_w.transport.abort()
                    server_w.close()
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            client_w.close()
            server_w.close()


@pytest.mark.postgres
async def test_postgres_a_lost_commit_reply_does_not_write_rows_twice(
    pg_url_and_schema: tuple[str, str],
) -> None:
    url, schema = pg_url_and_schema
    target = sa.make_url(url)
    proxy = _LostCommitReply(target.host or "127.0.0.1", target.port or 5432)
    port = await proxy.start()
    through_proxy = target.set(port=port).render_as_string(hide_password=False)
    # Rows without a request_id: nothing in the data itself would stop a second copy.
    records = [_rec(f"lost-ack-{i}") for i in range(40)]
    try:
        async with Store.from_url(
            through_proxy, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
        ) as store:
            async with store.usage.writer(max_batch=40, flush_interval=3600) as w:
                proxy.armed = True
                for record in records:
                    await w.put(record)
                await _until(lambda: w.stats.pending == 0)
            assert proxy.cut == 1
            assert w.stats == WriterStats(
                pending=0,
                written=40,
                duplicates=0,
                retried=40,
                failed_attempts=1,
                batches=1,
                rejected=0,
            )
            await _assert_each_once(store, records)
    finally:
        await proxy.stop()
