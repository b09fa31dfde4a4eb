"""The buffered usage writer (``store.usage.writer()``) on every driver: flushing by size
and by time, and back-pressure."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmstore import Store, WriterStats
from tests.usage.writer_support import (
    _assert_each_once,
    _markers,
    _markers_in_id_order,
    _rec,
    _recover,
    _recs,
    _refuse,
    _until,
    _writer,
)

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
