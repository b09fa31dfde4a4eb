"""The statements of ``_db.dialects``, ``_db.functions`` and ``_db.bulk``: both forms of
each give the same answers (run on every driver, and compiled for both on every run)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from llmstore import Store, UsageRecord
from llmstore._db.dialects import (
    IN_LIST_CHUNK,
    MAX_PARAMETERS,
    delete_where_in,
    insert_ignoring_conflicts,
    lock_until_commit,
    transaction_id,
    transaction_status,
    upsert_rows,
    values_in,
)
from llmstore._db.functions import BUCKETS, bucket_start
from llmstore._db.prices_schema import prices
from llmstore._db.schema import usage_logs, usage_receipts
from llmstore.pytest_plugin import run_sql

T0 = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)
U = usage_logs

# SQLAlchemy's Postgres dialect classes carry no annotations.
POSTGRES = postgresql.dialect()  # type: ignore[no-untyped-call]


async def _stored(store: Store, count: int) -> list[int]:
    records = [UsageRecord(created_at=T0, request_id=f"r{i}") for i in range(count)]
    result = await store.usage.record_many(records)
    return [i for i in result.ids if i is not None]


async def test_values_in_finds_the_stored_values_past_one_in_list(store: Store) -> None:
    await _stored(store, IN_LIST_CHUNK + 7)
    wanted = [f"r{i}" for i in range(0, IN_LIST_CHUNK + 20, 3)]
    found = await run_sql(store, lambda conn: values_in(conn, U.c.request_id, wanted))
    assert found == {w for w in wanted if int(w[1:]) < IN_LIST_CHUNK + 7}
    assert await run_sql(store, lambda conn: values_in(conn, U.c.request_id, [])) == set()


async def test_delete_where_in_deletes_exactly_those_rows(store: Store) -> None:
    ids = await _stored(store, IN_LIST_CHUNK + 3)
    doomed = ids[::2]
    deleted = await run_sql(store, lambda conn: delete_where_in(conn, U.c.id, doomed), write=True)
    assert deleted == len(doomed)
    left = await run_sql(store, lambda conn: set(conn.execute(sa.select(U.c.id)).scalars()))
    assert left == set(ids) - set(doomed)


async def test_insert_ignoring_conflicts_inserts_once(store: Store) -> None:
    (usage_id,) = await _stored(store, 1)
    row = {
        "id": uuid.UUID(int=1),
        "usage_id": usage_id,
        "payload": "{}",
        "signature": "s",
        "public_key": "k",
        "issued_at": T0,
    }

    def twice(conn: Connection) -> tuple[bool, bool]:
        first = insert_ignoring_conflicts(conn, usage_receipts, row, [usage_receipts.c.usage_id])
        again = {**row, "id": uuid.UUID(int=2)}
        second = insert_ignoring_conflicts(conn, usage_receipts, again, [usage_receipts.c.usage_id])
        return first, second

    assert await run_sql(store, twice, write=True) == (True, False)


def _price_row(model: str, price: str, source: str = "manual") -> dict[str, object]:
    return {
        "id": uuid.uuid4(),
        "provider": "p",
        "model": model,
        "valid_from": T0,
        "source": source,
        "input": price,
        "output": price,
        "cached_input": None,
        "cache_write": None,
        "reasoning": None,
        "audio_input": None,
        "audio_output": None,
        "tiers": None,
        "created_at": T0,
        "updated_at": T0,
    }


async def test_upsert_rows_inserts_changes_and_keeps_what_where_excludes(store: Store) -> None:
    # More rows than one statement's parameters hold: several statements, one result.
    count = MAX_PARAMETERS // len(prices.c) + 10
    key = [prices.c.provider, prices.c.model, prices.c.valid_from]

    def set_input(
        excluded: sa.ColumnCollection[str, sa.ColumnElement[object]],
    ) -> dict[str, object]:
        return {"input": excluded.input}

    def first(conn: Connection) -> int:
        rows = [
            _price_row(f"m{i}", "1", "genai-prices" if i % 2 else "manual") for i in range(count)
        ]
        return len(upsert_rows(conn, prices, rows, key, set_input, returning=[prices.c.id]))

    assert await run_sql(store, first, write=True) == count

    def second(conn: Connection) -> dict[str, str]:
        rows = [_price_row(f"m{i}", "2") for i in range(count + 1)]
        upsert_rows(conn, prices, rows, key, set_input, where=prices.c.source == "genai-prices")
        stored = conn.execute(sa.select(prices.c.model, prices.c.input, prices.c.id)).all()
        return {model: price for model, price, _ in stored}

    stored = await run_sql(store, second, write=True)
    assert len(stored) == count + 1
    # The rows the condition excluded kept their price; the others and the new one changed.
    assert all(stored[f"m{i}"] == ("2" if i % 2 or i == count else "1") for i in range(count + 1))
    assert await run_sql(store, lambda conn: upsert_rows(conn, prices, [], key, set_input)) == []


async def test_lock_until_commit_and_the_transaction_id(store: Store) -> None:
    def locked(conn: Connection) -> tuple[int | None, int]:
        lock_until_commit(conn, 42, "scope")
        lock_until_commit(conn, 42, "scope")  # the same transaction takes it again
        advisory = conn.execute(
            sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
            if conn.dialect.name == "postgresql"
            else sa.text("SELECT 1")
        ).scalar_one()
        return transaction_id(conn), int(advisory)

    xid, advisory = await run_sql(store, locked, write=True)
    if store.driver == "postgresql":
        assert xid is not None and advisory >= 1
        status = await run_sql(store, lambda conn: transaction_status(conn, xid))
        assert status == "committed"
    else:
        assert xid is None


@pytest.mark.parametrize("unit", BUCKETS)
async def test_bucket_start_is_the_same_instant_on_every_driver(store: Store, unit: str) -> None:
    await _stored(store, 1)
    start = await run_sql(
        store, lambda conn: conn.execute(sa.select(bucket_start(unit, U.c.created_at))).scalar()
    )
    expected = {
        "minute": T0.replace(second=0, microsecond=0),
        "hour": T0.replace(minute=0, second=0, microsecond=0),
        "day": T0.replace(hour=0, minute=0, second=0, microsecond=0),
    }[unit]
    assert start == expected


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [
        (POSTGRES, "date_trunc('hour', llmstore_usage_logs.created_at AT TIME ZONE"),
        (sqlite.dialect(), "(substr(llmstore_usage_logs.created_at, 1, 13) || ':00:00')"),
    ],
)
def test_bucket_start_compiles_for_both_drivers(dialect: sa.Dialect, expected: str) -> None:
    compiled = str(sa.select(bucket_start("hour", U.c.created_at)).compile(dialect=dialect))
    assert expected in compiled
