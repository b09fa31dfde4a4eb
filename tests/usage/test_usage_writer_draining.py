"""The buffered usage writer on every driver: draining on exit, close(), and cancellation
(of its owner, repeated, and of the writer's own tasks mid-write)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from llmstore import Store, UsageRecord, UsageWriter, WriterClosedError, WriterStats
from tests.usage.writer_support import (
    _assert_each_once,
    _markers,
    _rec,
    _recover,
    _recs,
    _refuse,
    _writer_tasks,
)

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
