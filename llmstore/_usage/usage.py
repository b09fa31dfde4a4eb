"""``store.usage``: usage rows, metrics, retention, receipts and the buffered writer.

Rows are checked (``records``), written in bulk (``repository``), summed (``metrics``),
purged (``purge``), signed (``receipts``) and buffered (``writer``) by modules of their
own; this one holds the public operations.
"""

from __future__ import annotations

import builtins
import datetime as dt
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConflictError, ValidationError
from llmstore._core.validate import (
    check_id,
    check_limit,
    check_name,
    check_optional_bool,
    check_positive_int,
)
from llmstore._db.operations import Repository, reads, writes
from llmstore._db.queries import in_period
from llmstore._db.runner import Runner
from llmstore._db.schema import usage_logs

from .metrics import UsageMetrics, check_metrics_query, read_metrics
from .purge import Progress as PurgeProgress
from .purge import purge_usage
from .receipts import Receipt, ReceiptSigner, issue_receipt, receipt_by_id
from .records import RecordResult, UsageLog, UsageRecord, check_records, log_from_row
from .repository import LOG_COLUMNS, get_log, insert_records
from .writer import UsageWriter

U = usage_logs
MAX_LIST = 10_000
_RACE_ATTEMPTS = 3


class Usage(Repository):
    """``store.usage`` and ``tx.usage``: usage rows, metrics, retention and receipts."""

    def __init__(self, runner: Runner, signer: ReceiptSigner) -> None:
        super().__init__(runner)
        self._signer = signer

    async def record(self, record: UsageRecord) -> RecordResult:
        """Write one row durably before returning (unless its request id is known)."""
        if not isinstance(record, UsageRecord):
            raise ValidationError(f"record must be a UsageRecord, not {type(record).__name__}")
        return await self.record_many([record])

    async def record_many(self, records: Iterable[UsageRecord | Mapping[str, Any]]) -> RecordResult:
        """Write a batch in one transaction: all of it, or (on any error) none of it.

        Each item is a UsageRecord or a mapping of its fields (checked as one); a bad item
        raises ValidationError naming its index before anything is written.
        """
        checked = check_records(records)
        if not checked:
            return RecordResult(written=0, duplicate_request_ids=[], ids=[])
        for attempt in range(_RACE_ATTEMPTS):
            try:
                return await self._runner.write(lambda conn: insert_records(conn, checked))
            except ConflictError:
                # Another batch wrote one of these request ids first; look again.
                if attempt == _RACE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    @reads()
    def get(self, conn: Connection, usage_id: int) -> UsageLog | None:
        """The usage row with this id, or None if there is none."""
        return get_log(conn, check_positive_int(usage_id, "usage id"))

    @reads()
    def list(
        self,
        conn: Connection,
        api_key_id: uuid.UUID | str | None = None,
        project_id: uuid.UUID | str | None = None,
        model: str | None = None,
        success: bool | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
        after: int | None = None,
    ) -> builtins.list[UsageLog]:
        """Rows newest first; pass the last row's id as ``after`` for the next page.

        Ordered by (created_at, id); ``since`` is inclusive and ``until`` exclusive.
        """
        statement = sa.select(*LOG_COLUMNS)
        if api_key_id is not None:
            statement = statement.where(U.c.api_key_id == check_id(api_key_id, "api_key_id"))
        if project_id is not None:
            statement = statement.where(U.c.project_id == check_id(project_id, "project_id"))
        if model is not None:
            statement = statement.where(U.c.model == check_name(model, "model"))
        if check_optional_bool(success, "success") is not None:
            statement = statement.where(U.c.success == success)
        statement = in_period(statement, U.c.created_at, since, until)
        if after is not None:
            last = check_positive_int(after, "after")
            boundary = sa.select(U.c.created_at).where(U.c.id == last).scalar_subquery()
            statement = statement.where(
                sa.or_(
                    U.c.created_at < boundary,
                    sa.and_(U.c.created_at == boundary, U.c.id < last),
                )
            )
        statement = statement.order_by(U.c.created_at.desc(), U.c.id.desc()).limit(
            check_limit(limit, maximum=MAX_LIST)
        )
        return [log_from_row(row) for row in conn.execute(statement)]

    async def metrics(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        group_by: str | Sequence[str] = (),
        bucket: str | None = None,
        **filters: Any,
    ) -> builtins.list[UsageMetrics]:
        """Requests, tokens, cost and latency per bucket and group, in one statement.

        ``since`` is inclusive and ``until`` exclusive, on ``created_at``. ``group_by``
        names columns among model, provider, project_id, api_key_id, origin, alias,
        profile, end_user, service_tier and tag (a row counts under each of its tags);
        ``bucket`` is None, "minute", "hour" or "day" (UTC). ``filters`` are equality
        filters on api_key_id, project_id, token_id, model, provider, origin, alias,
        profile, end_user, service_tier, success and is_streaming, and ``tag=`` (rows
        carrying it); None: not filtered.
        """
        query = check_metrics_query(
            since=since, until=until, group_by=group_by, bucket=bucket, filters=filters
        )
        # Checked before the unit: a bad query is refused even by a closed store.
        return await self._runner.read(lambda conn: read_metrics(conn, query), single=True)

    async def purge(
        self,
        older_than: dt.datetime | dt.timedelta,
        batch_size: int = 10_000,
        export_to: str | os.PathLike[str] | None = None,
        progress: PurgeProgress | None = None,
    ) -> int:
        """Delete the rows created before a cutoff, one short transaction per batch.

        ``older_than`` is the cutoff (an aware datetime) or its age (a timedelta before
        now); a row created exactly at the cutoff is kept. With ``export_to`` (a new
        ``.jsonl`` or ``.csv`` file) each batch is written there and fsynced before it is
        deleted. ``progress(deleted, batches)`` is called after each batch. Returns the
        number of rows deleted.
        """
        return await purge_usage(
            self._runner,
            older_than,
            batch_size=batch_size,
            export_to=export_to,
            progress=progress,
        )

    @writes()
    def issue_receipt(self, conn: Connection, usage_id: int) -> Receipt:
        """The row's signed receipt: issued and stored now, or the one issued before.

        Raises NotFoundError for an unknown row (unless it had a receipt before it was
        deleted) and ConfigError when ``LLMSTORE_RECEIPT_SIGNING_KEY`` is not set.
        """
        checked = check_positive_int(usage_id, "usage id")
        signer = self._signer.require()
        return issue_receipt(conn, checked, signer, get_log)

    @reads()
    def get_receipt(self, conn: Connection, receipt_id: uuid.UUID | str) -> Receipt | None:
        """The stored receipt with that id, or None; needs no signing key."""
        return receipt_by_id(conn, check_id(receipt_id, "receipt id"))

    def writer(
        self, max_batch: int = 500, flush_interval: float = 0.5, max_pending: int = 10_000
    ) -> UsageWriter:
        """A buffered writer for logging off the request path: ``async with`` it, ``put`` rows.

        Rows are written in batches of up to ``max_batch``, at least every
        ``flush_interval`` seconds; ``put`` waits while ``max_pending`` rows are held.
        Failed batches are retried until written; closing drains. See ``UsageWriter``.
        """
        return UsageWriter(
            self._runner,
            max_batch=max_batch,
            flush_interval=flush_interval,
            max_pending=max_pending,
        )
