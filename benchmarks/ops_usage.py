"""The usage operation: ``usage.record_many``, a batch of 10,000 realistic usage rows
(``benchmarks/usage_data.py``) written in one transaction through llmstore, the raw
driver's bulk path and the ORM. One call is one batch, built untimed."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any, Final

from llmstore import UsageRecord

from .common import Context, OpCall, PreparedCall, utcnow
from .orm_models import OrmUsageLog
from .raw_driver import RawDB
from .raw_schema import USAGE_COLUMN_NAMES
from .usage_data import UsageRows

#: Rows per ``usage.record_many`` call, and its calls per round (at most: see
#: ``measure.calls_per_round``).
USAGE_BATCH: Final = 10_000
USAGE_CALLS: Final = 20
USAGE_SPAN: Final = dt.timedelta(seconds=10)


def usage_batch(source: UsageRows) -> list[dict[str, Any]]:
    """The next batch of realistic rows: a proxy's buffer of the last 10 s, in time order."""
    rows = list(source.rows(USAGE_BATCH, utcnow() - USAGE_SPAN, USAGE_SPAN))
    rows.sort(key=lambda row: row["created_at"])
    return rows


#: What llmstore writes for the fields a row leaves unset that are NOT NULL.
ROW_DEFAULTS: dict[str, object] = {
    "cache_write_tokens": 0,
    "reasoning_tokens": 0,
    "audio_input_tokens": 0,
    "audio_output_tokens": 0,
    "usage_source": "reported",
}


def raw_usage_row(db: RawDB, row: Mapping[str, Any]) -> tuple[object, ...]:
    """A row as raw_usage_logs stores it, in USAGE_COLUMN_NAMES order (encoded untimed)."""
    values = {
        **ROW_DEFAULTS,
        **row,
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        "cost_source": "given",
    }
    out: list[object] = []
    for name in USAGE_COLUMN_NAMES:
        value = values.get(name)
        if isinstance(value, uuid.UUID):
            value = db.encode_id(value)
        elif isinstance(value, dt.datetime):
            value = db.encode_time(value)
        out.append(value)
    return tuple(out)


class UsageRecordMany:
    description = (
        f"write {USAGE_BATCH:,} pre-built usage rows in one transaction (ops/s = batches/s)"
    )
    #: Calls per round: a call writes 10,000 rows, so --ops is capped at this.
    max_ops = USAGE_CALLS
    rows_per_call = USAGE_BATCH

    async def llmstore(self, ctx: Context) -> OpCall:
        usage = ctx.store.usage
        source = UsageRows()

        def build() -> list[UsageRecord]:
            return [UsageRecord(**row) for row in usage_batch(source)]

        async def call(batch: list[UsageRecord]) -> object:
            result = await usage.record_many(batch)
            assert result.written == len(batch)
            return result

        return PreparedCall(build, call)

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        source = UsageRows()

        def build() -> list[tuple[object, ...]]:
            return [raw_usage_row(db, row) for row in usage_batch(source)]

        async def call(rows: list[tuple[object, ...]]) -> object:
            await db.insert_many("raw_usage_logs", USAGE_COLUMN_NAMES, rows)
            return None

        return PreparedCall(build, call)

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        source = UsageRows()

        def build() -> list[OrmUsageLog]:
            return [
                OrmUsageLog(**row, total_tokens=row["prompt_tokens"] + row["completion_tokens"])
                for row in usage_batch(source)
            ]

        async def call(objects: list[OrmUsageLog]) -> object:
            async with sessions() as session:
                session.add_all(objects)
                await session.commit()
            return None

        return PreparedCall(build, call)
