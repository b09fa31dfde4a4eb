"""The buffered usage writer on every driver when writes fail: retrying through a
database that refuses writes, close() with a timeout, a store closed under it, rows the
database refuses set aside, and which failures a retry can change."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

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
    ValidationError,
    WriterClosedError,
)
from llmstore._db.schema import usage_logs
from tests.helpers import count_rows
from tests.usage.writer_support import (
    SECRET,
    _assert_each_once,
    _rec,
    _recover,
    _recs,
    _refuse,
    _refuse_model,
    _until,
    _writer,
)

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
