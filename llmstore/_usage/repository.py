"""Usage rows on one connection: bulk insert with request-id checks, and get.

A batch is written with the driver's bulk path (``_db.bulk``): one ``executemany`` on
SQLite, ``COPY`` on Postgres, with each new row's id known before the write.

A ``request_id`` is unique: rows whose request id is stored already (or repeated earlier
in the batch) are reported, not written. Two batches racing with the same new
``request_id`` cannot both insert; the loser's whole transaction is undone.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._db.bulk import BulkTable
from llmstore._db.dialects import values_in
from llmstore._db.schema import usage_logs
from llmstore._db.translate import is_unique_violation
from llmstore._prices import costs_for

from .records import FIELD_OF_COLUMN, RecordResult, UsageLog, UsageRecord, log_from_row

U = usage_logs
# Column name -> record field, for every column written from a record; None for the
# columns written from what the write computes (the cost, where it came from, the tags
# as stored).
_COMPUTED = ("cost", "cost_source", "tags")
_FIELDS = {
    column: None if column in _COMPUTED else field
    for column, field in FIELD_OF_COLUMN.items()
    if column != "id"
}
LOG_COLUMNS = tuple(U.c)


# Bulk writes by the driver's own path (COPY on Postgres, executemany on SQLite).
BULK = BulkTable(U, _FIELDS)


def insert_records(conn: Connection, records: Sequence[UsageRecord]) -> RecordResult:
    """Write the records whose request id is new; report the others."""
    if all(record.request_id is None for record in records):
        return _insert(conn, records, stored=set())
    # Most batches repeat no stored request id: try them as they are, and look the ids
    # up only when the unique index says one is taken. (Looking them up first cost
    # more than the COPY on Postgres, and a tenth of the whole write on SQLite.)
    try:
        with conn.begin_nested():
            return _insert(conn, records, stored=set())
    except Exception as exc:
        if not is_unique_violation(exc):
            raise
    return _insert(conn, records, stored=_stored_request_ids(conn, records))


def _insert(conn: Connection, records: Sequence[UsageRecord], stored: set[str]) -> RecordResult:
    seen = set(stored)
    fresh: list[UsageRecord] = []
    duplicates: list[str] = []
    positions: list[int | None] = []
    for record in records:
        request_id = record.request_id
        if request_id is not None and request_id in seen:
            duplicates.append(request_id)
            positions.append(None)
            continue
        if request_id is not None:
            seen.add(request_id)
        positions.append(len(fresh))
        fresh.append(record)
    ids = BULK.new_ids(conn, len(fresh))
    if fresh:
        costs, sources = costs_for(conn, fresh)
        tags = [list(record.tags) if record.tags else None for record in fresh]
        BULK.write(conn, fresh, ids, {"cost": costs, "cost_source": sources, "tags": tags})
    return RecordResult(
        written=len(fresh),
        duplicate_request_ids=duplicates,
        ids=[None if position is None else ids[position] for position in positions],
    )


def _stored_request_ids(conn: Connection, records: Sequence[UsageRecord]) -> set[str]:
    wanted = sorted({r.request_id for r in records if r.request_id is not None})
    return values_in(conn, U.c.request_id, wanted)


def get_log(conn: Connection, usage_id: int) -> UsageLog | None:
    """The usage row with this id, or None."""
    row = conn.execute(sa.select(*LOG_COLUMNS).where(U.c.id == usage_id)).first()
    return None if row is None else log_from_row(row)
