"""The buffered usage writer on every driver: its stats, the arguments it refuses and
accepts, and transactions (which have no writer, and in which a full one may not wait)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import pydantic
import pytest

from llmstore import Store, TransactionError, ValidationError, WriterStats, generate_key
from tests.usage.writer_support import (
    _assert_each_once,
    _markers,
    _rec,
    _recover,
    _recs,
    _refuse,
    _writer,
)

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
