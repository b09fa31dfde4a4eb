"""One write of a usage writer's batch: what it did, how it failed, how it is settled.

The writer (``writer.py``) owns the queue and the flusher; this module holds what one
attempt needs and nothing of the writer's state: the attempt's record of how far it got,
the transaction that writes it, the classification of a failure, the backoff, the tasks
it runs in, and how a write whose COMMIT may or may not have happened is settled.

Exactly once, for every row not handed back. A failure before COMMIT leaves nothing
behind, so retrying is safe. The one ambiguous failure is a COMMIT whose reply never
arrives (the connection dropped): the rows may be stored, and a retry would store rows
without a ``request_id`` twice. On Postgres the transaction notes its own id
(``txid_current()``) and the writer asks ``txid_status()`` before retrying. SQLite commits
in-process, so an error there means nothing was stored. If the event loop cancels the
writer's own tasks mid-write (a writer never closed, torn down by ``asyncio.run``), the
batch is settled the same way; on SQLite by looking for its first row, from the writer
thread, which runs after the interrupted write.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import random
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from llmstore._core.errors import (
    ConflictError,
    DatabaseError,
    DatabaseUnavailableError,
    LlmstoreError,
    StoreClosedError,
    ValidationError,
)
from llmstore._db.dialects import transaction_id, transaction_status
from llmstore._db.runner import Runner

from .records import RecordResult, UsageRecord
from .repository import get_log, insert_records

_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 5.0
_TASK_NAME = "llmstore usage writer"
# The writer's tasks, so that a writer nobody references still finishes its work.
_RUNNING: set[asyncio.Task[Any]] = set()


def spawn(coro: Any) -> asyncio.Task[Any]:
    """Run one of a writer's tasks (its flusher, an attempt), held until it ends."""
    # A fresh context: the writer's work belongs to no request or transaction.
    task = asyncio.get_running_loop().create_task(
        coro, name=_TASK_NAME, context=contextvars.Context()
    )
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return task


@dataclass
class Attempt:
    """How far one write got, as seen from inside its transaction."""

    batch: list[UsageRecord]
    xid: int | None = None  # Postgres: the transaction's id, for txid_status()
    result: RecordResult | None = None  # set once only COMMIT remains


def write_batch(conn: Connection, attempt: Attempt) -> RecordResult:
    """The attempt's transaction: note its id, insert the batch."""
    attempt.xid = transaction_id(conn)
    attempt.result = insert_records(conn, attempt.batch)
    return attempt.result  # only COMMIT remains


def _stored_by_id(conn: Connection, attempt: Attempt) -> bool:
    """SQLite, after an interrupted write: is its batch stored? Runs after that write."""
    result = attempt.result
    if result is None or not result.written:
        return False  # it failed (rolled back) or never ran, or had nothing new to store
    index, row_id = next((i, rid) for i, rid in enumerate(result.ids) if rid is not None)
    record = attempt.batch[index]
    row = get_log(conn, row_id)
    return (
        row is not None
        and row.request_id == record.request_id
        and row.created_at == record.created_at
    )


async def settle(runner: Runner, attempt: Attempt) -> bool:
    """Whether an ambiguous write was committed; raises if that cannot be told yet.

    Where a COMMIT can be lost on the way (``runner.commit_status``), the database is
    asked about the attempt's transaction; where it cannot, the batch's first row is
    looked for.
    """
    if not runner.commit_status:
        return await runner.write(functools.partial(_stored_by_id, attempt=attempt), single=True)
    if attempt.xid is None:
        return False
    status = await runner.read(functools.partial(transaction_status, xid=attempt.xid), single=True)
    if status == "in progress":
        raise DatabaseUnavailableError("an interrupted usage write has not ended yet")
    return status == "committed"


class Failure(enum.Enum):
    """What a failed attempt means for its batch."""

    TRANSIENT = "transient"  # retry the same batch after a backoff
    REFUSED = "refused"  # the rows themselves: split the batch to find them
    FATAL = "fatal"  # stop the writer


def classify(exc: BaseException) -> Failure:
    """Why an attempt failed, from the exception it raised."""
    if isinstance(exc, ValidationError) or not isinstance(exc, LlmstoreError):
        # A constraint or trigger refused a row, or the driver could not encode one (a
        # record made with model_construct): other rows of the batch may well be fine.
        return Failure.REFUSED
    if isinstance(exc, DatabaseError | ConflictError):
        return Failure.TRANSIENT  # ConflictError: a racing batch took a request id first
    return Failure.FATAL  # the store closed; a wrong schema, configuration or usage


def backoff(streak: int) -> float:
    """Seconds to wait after ``streak`` transient failures in a row: capped, jittered."""
    ceiling = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2.0 ** min(streak - 1, 16))
    return ceiling * random.uniform(0.5, 1.0)


def why_held(fatal: BaseException | None, *, timed_out: bool) -> str:
    """Why a writer closed with rows still held, for UnwrittenUsageError's message."""
    if isinstance(fatal, StoreClosedError):
        return "the store was closed"
    if fatal is not None:
        return f"the writer stopped on {type(fatal).__name__}"
    return "close() timed out" if timed_out else "the writer was stopped"
