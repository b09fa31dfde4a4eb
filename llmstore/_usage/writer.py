"""Buffered usage logging off the request path: ``store.usage.writer()``.

``put`` queues a checked record and returns at once while fewer than ``max_pending`` rows
are held; otherwise it waits until a flush makes room (back-pressure: a row is never
dropped). One background task takes up to ``max_batch`` rows as soon as that many are
queued, or once the oldest has waited ``flush_interval`` seconds, and writes them in one
transaction with ``record_many``'s bulk path (a known ``request_id`` is reported, not an
error). Closing drains the queue first. What happens to a batch that fails depends on why:

* The database could not take it (connection lost, locked, disk full, a failed COMMIT, a
  racing duplicate): the batch keeps its rows and is retried, as the same batch, with
  capped exponential backoff, for as long as it takes.
* The database refused the rows themselves (a constraint, a trigger; or a row the driver
  cannot encode): the batch is split in halves and each half written on its own, so the
  rows it takes are written and a refused row ends up alone. A row refused alone is set
  aside, never dropped: ``close()`` hands it back in UnwrittenUsageError.
* The writer cannot go on (the store was closed, the schema or the configuration is
  wrong): it stops; ``put`` raises WriterClosedError and ``close()`` hands the rows back.

Exactly once, for every row not handed back: how an attempt whose COMMIT may have been
lost is settled is told in ``attempts.py``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from functools import partial
from types import TracebackType
from typing import Self

from llmstore._core.errors import (
    DatabaseUnavailableError,
    LlmstoreError,
    StoreClosedError,
    TransactionError,
    UnwrittenUsageError,
    ValidationError,
    WriterClosedError,
)
from llmstore._core.validate import MAX_INT64, check_int, check_seconds
from llmstore._db.runner import Runner

from .attempts import Attempt, Failure, backoff, classify, settle, spawn, why_held, write_batch
from .records import MAX_BATCH, RecordResult, UsageRecord, WriterStats

logger = logging.getLogger("llmstore")


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # takes no new rows; drains what it holds
    DONE = "done"  # drained, or stopped with rows that close() hands over


class UsageWriter:
    """Buffered, exactly-once usage logging; from ``store.usage.writer()``.

    ``async with store.usage.writer() as w: await w.put(record)``; or ``put`` (the first
    starts the background flusher) and ``await w.close()`` yourself. Leaving the block,
    ``close()``, and cancelling the task inside the block all write every row held before
    they return (a cancellation propagates once they have). Rows the database cannot take
    stay queued and are retried until it takes them; only ``close(timeout=...)`` gives up,
    and it hands the rows back. Rows the database refuses on their own are set aside and
    handed back by ``close()`` (UnwrittenUsageError), once everything else is written.
    Close the writer before the store: once the store is closed, ``put`` raises
    WriterClosedError and ``close()`` hands the rows back.
    """

    def __init__(
        self, runner: Runner, *, max_batch: int, flush_interval: float, max_pending: int
    ) -> None:
        if runner.in_transaction:
            raise TransactionError(
                "a usage writer runs its own transactions: use store.usage.writer(), "
                "not tx.usage.writer()"
            )
        self._max_batch = check_int(max_batch, "max_batch", minimum=1, maximum=MAX_BATCH)
        self._interval = check_seconds(flush_interval, "flush_interval", zero=False)
        self._max_pending = check_int(max_pending, "max_pending", minimum=1, maximum=MAX_INT64)
        if self._max_batch > self._max_pending:
            raise ValidationError("max_batch must not be more than max_pending")
        self._runner = runner
        # Where a COMMIT can be lost on the way, an ambiguous write is settled by asking
        # the database; where it cannot, by looking for the batch's first row.
        self._commit_status = runner.commit_status
        self._state = _State.OPEN
        # Rows go from the queue into the batch being written. A batch the database
        # refused is split: its other half waits in _parts, ahead of the queue, and a row
        # refused alone goes to _rejected, for close() to hand back.
        self._queue: deque[tuple[float, UsageRecord]] = deque()
        self._batch: list[UsageRecord] = []
        self._parts: deque[list[UsageRecord]] = deque()
        self._rejected: list[UsageRecord] = []
        self._held = 0  # rows queued, in parts or in the batch, plus room promised to puts
        self._putters: deque[asyncio.Future[None]] = deque()
        self._wake = asyncio.Event()  # a row, a full batch, a put gave up, or close
        self._stop = asyncio.Event()  # close's timeout passed, or the store is gone
        self._flusher: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None  # the write in progress
        self._unsettled: Attempt | None = None  # a write whose outcome is not known yet
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None  # why the writer stopped, if it did
        self._handed_over = False  # close() has raised UnwrittenUsageError once
        self._streak = 0  # transient failures in a row, for the backoff
        self._batch_failed = False  # the batch's rows have failed before (stats.retried)
        self._cancelled = False  # the flusher was cancelled from outside once already
        self._written = self._duplicates = self._retried = 0
        self._failed_attempts = self._batches = self._rejected_count = 0

    @property
    def stats(self) -> WriterStats:
        """Rows pending, written, refused and retried so far, and the last error."""
        return WriterStats(
            pending=self._pending(),
            written=self._written,
            duplicates=self._duplicates,
            retried=self._retried,
            failed_attempts=self._failed_attempts,
            batches=self._batches,
            rejected=self._rejected_count,
        )

    def _pending(self) -> int:
        return len(self._queue) + len(self._batch) + sum(map(len, self._parts))

    async def __aenter__(self) -> Self:
        if self._state is not _State.OPEN:
            raise WriterClosedError("this usage writer is closed")
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Drain even when the owner is cancelled (again and again): the rows come first.
        cancelled = False
        while True:
            try:
                await self.close()
            except asyncio.CancelledError:
                cancelled = True
                continue
            break
        if cancelled and not isinstance(exc, asyncio.CancelledError):
            raise asyncio.CancelledError

    async def put(self, record: UsageRecord) -> None:
        """Queue ``record``: at once while fewer than ``max_pending`` rows are held, else
        after a flush makes room (waiting puts are let in in order).

        Raises ValidationError for anything but a UsageRecord, WriterClosedError once
        ``close()`` has begun, and TransactionError rather than wait forever inside
        ``store.transaction()`` on SQLite (the flush needs the write lock it holds). A put
        cancelled while it waits queues nothing.
        """
        if not isinstance(record, UsageRecord):
            raise ValidationError(f"record must be a UsageRecord, not {type(record).__name__}")
        if self._state is not _State.OPEN:
            raise WriterClosedError(self._closed_message())
        self._start()
        if self._putters or self._held >= self._max_pending:
            await self._wait_for_room()
        else:
            self._held += 1
        self._queue.append((time.monotonic(), record))
        if len(self._queue) == 1 or len(self._queue) >= self._max_batch:
            self._wake.set()

    # Not asyncio.timeout: cancelling close() would lose track of the rows; the timeout
    # only ends the retrying, and the rows left are handed back in the error.
    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Write every row held, then stop; put() raises WriterClosedError from now on.

        Raises UnwrittenUsageError carrying the rows not written, if any: rows the
        database refused on their own, and, with ``timeout`` (seconds), the rows still
        held once it has passed (after the write in progress, if any, ends) and retrying
        stops. The error is raised once; later calls return at once.
        """
        limit = None if timeout is None else check_seconds(timeout, "timeout", zero=True)
        if self._state is _State.OPEN:
            self._state = _State.CLOSING if self._flusher is not None else _State.DONE
            self._wake.set()
        flusher = self._flusher
        if flusher is not None:
            if limit is not None and not flusher.done():
                done, _ = await asyncio.wait({flusher}, timeout=limit)
                if not done:
                    self._stop.set()
            await asyncio.wait({flusher})
            if not flusher.cancelled() and flusher.exception() is not None:
                self._last_error = flusher.exception()
        inflight = self._inflight  # left running if the flusher was cancelled twice
        if inflight is not None and not inflight.done():
            await asyncio.wait({inflight})
        await self._settle_before_hand_over()
        self._hand_over()

    def _start(self) -> None:
        if self._flusher is None:
            self._flusher = spawn(self._run())

    def _closed_message(self) -> str:
        if self._fatal is not None:
            return f"this usage writer stopped: {self._fatal}"
        return "this usage writer is closed"

    # --- back-pressure -------------------------------------------------------------------

    async def _wait_for_room(self) -> None:
        if self._runner.holds_write_lock():
            raise TransactionError(
                "the usage writer is full and cannot flush while this task holds SQLite's "
                "write lock in store.transaction(): put rows after the transaction"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._putters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                if waiter in self._putters:
                    self._putters.remove(waiter)
            else:
                self._held -= 1  # the room promised to this put goes to the next one
            self._admit_waiting()
            raise
        finally:
            self._wake.set()  # the flusher may be waiting for this put to end
        if self._state is _State.DONE:
            raise WriterClosedError(self._closed_message())

    def _admit_waiting(self) -> None:
        while self._putters and self._held < self._max_pending:
            waiter = self._putters.popleft()
            if not waiter.done():  # a cancelled put not yet woken to remove itself
                self._held += 1
                waiter.set_result(None)

    # --- the flusher ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                try:
                    await self._flush_until_drained()
                    return
                except asyncio.CancelledError:
                    # Only a cancellation from outside reaches here, such as asyncio.run
                    # cancelling every task of a writer that was never closed. The first
                    # one is taken as close(); a second one abandons the drain.
                    held = self._pending()
                    if self._cancelled:
                        logger.error(
                            "usage writer cancelled twice: %d rows not written; "
                            "close() hands them over",
                            held,
                        )
                        raise
                    self._cancelled = True
                    task = asyncio.current_task()
                    assert task is not None
                    task.uncancel()
                    logger.warning("usage writer cancelled: writing its %d rows first", held)
                    if self._state is _State.OPEN:
                        self._state = _State.CLOSING
        finally:
            self._state = _State.DONE
            for waiter in self._putters:
                if not waiter.done():
                    waiter.set_result(None)  # the put raises WriterClosedError
            self._putters.clear()

    async def _flush_until_drained(self) -> None:
        while not self._stop.is_set():
            inflight = self._inflight
            if inflight is None:
                if not self._batch and not await self._next_batch():
                    return
                inflight = self._inflight = spawn(self._attempt())
            try:
                # Shielded: cancelling the flusher must not leave a write's outcome unknown.
                ok = await asyncio.shield(inflight)
            except asyncio.CancelledError:
                if inflight.done():
                    self._inflight = None  # the write itself was cancelled: now unsettled
                task = asyncio.current_task()
                if task is not None and task.cancelling() == 0:
                    continue
                raise
            self._inflight = None
            if not ok:
                await self._sleep(backoff(self._streak), wake=False)

    async def _next_batch(self) -> bool:
        """Move the next batch from the queue; False when no more rows will come."""
        while not self._stop.is_set():
            if self._parts:
                self._batch = self._parts.popleft()
                self._batch_failed = True
                return True
            if self._queue:
                due = self._queue[0][0] + self._interval
                wait = due - time.monotonic()
                if self._state is not _State.OPEN or len(self._queue) >= self._max_batch:
                    wait = 0
                if wait <= 0:
                    count = min(len(self._queue), self._max_batch)
                    self._batch = [self._queue.popleft()[1] for _ in range(count)]
                    self._batch_failed = False
                    return True
                await self._sleep(wait, wake=True)
            elif self._state is not _State.OPEN and self._held == 0 and not self._putters:
                return False
            else:
                await self._sleep(None, wake=True)
        return False

    async def _sleep(self, seconds: float | None, *, wake: bool) -> None:
        """Sleep until ``seconds`` pass or close() stops retrying (or, if ``wake``, a row)."""
        waits = [asyncio.ensure_future(self._stop.wait())]
        if wake:
            self._wake.clear()
            waits.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    # --- one attempt ---------------------------------------------------------------------

    async def _attempt(self) -> bool:
        """Settle an earlier write whose outcome is unknown, or write the batch.

        Returns False when the next attempt should wait (a backoff), True otherwise.
        Runs as its own task, so that a cancelled flusher can wait for its outcome.
        """
        attempt = Attempt(self._batch)
        try:
            if self._unsettled is not None:
                previous = self._unsettled
                if await settle(self._runner, previous):
                    assert previous.result is not None
                    self._settled(previous.result)
                    return True
                self._unsettled = None
            result = await self._runner.write(partial(write_batch, attempt=attempt))
        except asyncio.CancelledError:
            # On SQLite the interrupted write may still run in the writer thread; on
            # Postgres it may have reached COMMIT. Settle it before writing again.
            if self._unsettled is None and (attempt.xid is not None or not self._commit_status):
                self._unsettled = attempt
            raise
        except Exception as exc:
            done = attempt.result
            if self._commit_status and done is not None and done.written:
                self._unsettled = attempt  # COMMIT was sent; did it happen?
            failure = classify(exc)
            if failure is Failure.REFUSED and self._unsettled is not None:
                failure = Failure.TRANSIENT  # the rows were taken; only COMMIT failed
            self._failed(exc, failure)
            return failure is not Failure.TRANSIENT  # only then back off

        self._settled(result)
        return True

    async def _settle_before_hand_over(self) -> None:
        attempt = self._unsettled
        if attempt is None or self._handed_over:
            return
        try:
            if self._fatal is not None:
                # The store may be gone, or unusable: it cannot be asked.
                raise DatabaseUnavailableError("the writer stopped")
            committed = await settle(self._runner, attempt)
        except LlmstoreError:
            logger.warning(
                "usage writer: %d rows handed back may already be stored "
                "(their last write's outcome is unknown)",
                len(attempt.batch),
            )
            return
        self._unsettled = None
        if committed and attempt.result is not None:
            self._settled(attempt.result)

    def _settled(self, result: RecordResult) -> None:
        count = len(self._batch)
        self._written += result.written
        self._duplicates += len(result.duplicate_request_ids)
        self._batches += 1
        if self._batch_failed:
            self._retried += count
        self._unsettled = None
        self._batch = []
        self._held -= count
        self._streak = 0
        self._admit_waiting()

    def _failed(self, exc: Exception, failure: Failure) -> None:
        self._failed_attempts += 1
        self._batch_failed = True
        self._last_error = exc
        # Never the rows: an llmstore error's message quotes no parameters; others may.
        reason = type(exc).__name__
        if isinstance(exc, LlmstoreError):
            reason = f"{reason}: {exc}"
        if failure is Failure.FATAL:
            self._fatal = exc
            self._stop.set()
            logger.error(
                "usage writer stopped: %s; %d rows not written (close() hands them over%s)",
                reason,
                self._pending(),
                "; close the writer before the store" if isinstance(exc, StoreClosedError) else "",
            )
        elif failure is Failure.REFUSED:
            self._split(reason)
        else:
            self._streak += 1
            logger.warning(
                "usage writer: writing a batch of %d rows failed (%d in a row), retrying: %s",
                len(self._batch),
                self._streak,
                reason,
            )

    def _split(self, reason: str) -> None:
        """Write a refused batch in halves, or set a refused row aside."""
        batch = self._batch
        if len(batch) > 1:
            middle = len(batch) // 2
            self._parts.appendleft(batch[middle:])
            self._batch = batch[:middle]
            logger.warning(
                "usage writer: the database refused a batch of %d rows; writing it in "
                "halves to find the rows it refuses: %s",
                len(batch),
                reason,
            )
            return
        self._rejected.extend(batch)
        self._rejected_count += len(batch)
        self._batch = []
        self._held -= len(batch)
        self._admit_waiting()
        logger.error(
            "usage writer: the database refused a row (request_id %r); set aside for "
            "close() to hand back: %s",
            batch[0].request_id,
            reason,
        )

    def _hand_over(self) -> None:
        held = [
            *self._batch,
            *(record for part in self._parts for record in part),
            *(record for _, record in self._queue),
        ]
        refused = self._rejected
        self._state = _State.DONE
        if self._handed_over or not (held or refused):
            return
        self._handed_over = True
        self._batch = []
        self._parts.clear()
        self._queue.clear()
        self._rejected = []
        self._held = 0
        reasons = []
        if refused:
            reasons.append(f"{len(refused)} refused by the database")
        if held:
            why = why_held(self._fatal, timed_out=self._stop.is_set())
            reasons.append(f"{len(held)} held when {why}")
        records = [*refused, *held]
        raise UnwrittenUsageError(
            f"{len(records)} usage records were not written ({', '.join(reasons)}): "
            "they are in .records",
            records,
        ) from self._last_error
