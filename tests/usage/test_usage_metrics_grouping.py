"""``store.usage.metrics()`` on every driver: grouping, UTC buckets, filters, the time
window, and the index a time window uses."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from llmstore import Store
from llmstore._usage.metrics import check_metrics_query, metrics_statement
from llmstore.pytest_plugin import run_sql
from tests.usage.metrics_support import (
    DAY,
    GROUP_COLUMNS,
    ID_COLUMNS,
    KEY_A,
    KEY_B,
    PROJECT_A,
    PROJECT_B,
    T0,
    TOKEN_A,
    TOKEN_B,
    _check,
    _record,
)

# --- grouping, buckets, filters, the window ------------------------------------------


def _value(column: str, which: int) -> Any:
    if column == "project_id":
        return (PROJECT_A, PROJECT_B)[which]
    if column == "api_key_id":
        return (KEY_A, KEY_B)[which]
    return f"{column}-{'ab'[which]}"


@pytest.mark.parametrize("column", [c for c in GROUP_COLUMNS if c != "tag"])
async def test_group_by_each_column(store: Store, column: str) -> None:
    records = [
        _record(**{column: _value(column, 1)}, cost=1, response_time_ms=10),
        _record(**{column: _value(column, 0)}, cost=2, response_time_ms=20),
        _record(**{column: _value(column, 1)}, cost=4, response_time_ms=30),
        _record(cost=8),
    ]
    await store.usage.record_many(records)
    rows = await _check(store, records, group_by=[column])
    # NULL first, then the values in order; ids come back as UUIDs.
    assert [row.group for row in rows] == [
        {column: None},
        {column: _value(column, 0)},
        {column: _value(column, 1)},
    ]
    assert [(row.requests, row.cost) for row in rows] == [(1, 8), (1, 2), (2, 5)]
    assert [row.p95_response_time_ms for row in rows] == [None, 20, 30]
    if column in ID_COLUMNS:
        assert isinstance(rows[1].group[column], uuid.UUID)


async def test_a_row_counts_once_under_each_of_its_tags(store: Store) -> None:
    records = [
        _record(tags=["b", "a"], cost=1, response_time_ms=10, end_user="u1"),
        _record(tags=["a"], cost=2, response_time_ms=20, end_user="u2"),
        _record(cost=4, response_time_ms=30, end_user="u1"),
        _record(tags=["c", "b"], cost=8, end_user="u2"),
    ]
    await store.usage.record_many(records)
    rows = await _check(store, records, group_by="tag")
    assert [(row.group["tag"], row.requests, row.cost) for row in rows] == [
        (None, 1, 4),
        ("a", 2, 3),
        ("b", 2, 9),
        ("c", 1, 8),
    ]
    assert [row.p95_response_time_ms for row in rows] == [30, 20, 10, None]
    tagged = await _check(store, records, tag="b")
    assert [(row.requests, row.cost) for row in tagged] == [(2, 9)]
    # The filter picks rows; grouping by tag then shows each of their tags.
    both = await _check(store, records, group_by=["end_user", "tag"], tag="a")
    assert [(row.group, row.cost) for row in both] == [
        ({"end_user": "u1", "tag": "a"}, 1),
        ({"end_user": "u1", "tag": "b"}, 1),
        ({"end_user": "u2", "tag": "a"}, 2),
    ]
    assert await _check(store, records, tag="none of them") == []


async def test_group_by_several_columns_orders_by_each_in_turn(store: Store) -> None:
    records = [
        _record(model=model, api_key_id=key, origin=origin)
        for model in ("b", None, "a")
        for key in (KEY_B, None, KEY_A)
        for origin in ("z", "é", "Z")  # code-point order on both drivers, not a collation's
    ]
    await store.usage.record_many(records)
    rows = await _check(store, records, group_by=("origin", "model", "api_key_id"))
    assert len(rows) == 27
    assert [tuple(row.group) for row in rows] == [("origin", "model", "api_key_id")] * 27
    assert [row.group["origin"] for row in rows[::9]] == ["Z", "z", "é"]
    assert [row.group["model"] for row in rows[:9:3]] == [None, "a", "b"]
    assert [row.group["api_key_id"] for row in rows[:3]] == [None, KEY_A, KEY_B]


@pytest.mark.parametrize(
    ("bucket", "expected"),
    [
        (
            "minute",
            [
                ("05-01 09:59", 1),
                ("05-01 10:00", 2),
                ("05-01 10:01", 1),
                ("05-01 23:59", 1),
                ("05-02 00:00", 1),
            ],
        ),
        ("hour", [("05-01 09:00", 1), ("05-01 10:00", 3), ("05-01 23:00", 1), ("05-02 00:00", 1)]),
        ("day", [("05-01 00:00", 5), ("05-02 00:00", 1)]),
        (None, [(None, 6)]),
    ],
)
async def test_buckets_are_utc(
    store: Store, bucket: str | None, expected: list[tuple[str | None, int]]
) -> None:
    plus_five = dt.timezone(dt.timedelta(hours=5))
    times = [
        dt.datetime(2024, 5, 1, 9, 59, 59, 999999, tzinfo=dt.UTC),
        dt.datetime(2024, 5, 1, 15, 0, tzinfo=plus_five),  # 10:00 UTC
        dt.datetime(2024, 5, 1, 10, 0, 59, 999999, tzinfo=dt.UTC),
        dt.datetime(2024, 5, 1, 10, 1, tzinfo=dt.UTC),
        dt.datetime(2024, 5, 2, 4, 59, 59, tzinfo=plus_five),  # 23:59:59 UTC on May 1st
        dt.datetime(2024, 5, 2, 5, 0, tzinfo=plus_five),  # midnight UTC
    ]
    records = [_record(created_at=when, cost=i) for i, when in enumerate(times)]
    await store.usage.record_many(records)
    rows = await _check(store, records, bucket=bucket)
    assert [(row.bucket, row.requests) for row in rows] == [
        (None if start is None else dt.datetime.fromisoformat(f"2024-{start}+00:00"), count)
        for start, count in expected
    ]
    for row in rows:
        assert row.bucket is None or row.bucket.tzinfo == dt.UTC


async def test_buckets_and_groups_together(store: Store) -> None:
    records = [
        _record(created_at=T0 + dt.timedelta(minutes=m), model=model, response_time_ms=m)
        for m in range(0, 180, 7)
        for model in ("x", "y")
    ]
    await store.usage.record_many(records)
    rows = await _check(store, records, bucket="hour", group_by=["model"])
    assert [(row.bucket, row.group["model"]) for row in rows] == [
        (T0 + dt.timedelta(hours=h), model) for h in range(3) for model in ("x", "y")
    ]


FILTER_CASES: list[tuple[str, Any, Any]] = [
    ("api_key_id", KEY_A, KEY_B),
    ("project_id", PROJECT_A, PROJECT_B),
    ("token_id", TOKEN_A, TOKEN_B),
    ("model", "m-a", "m-b"),
    ("provider", "p-a", "p-b"),
    ("origin", "o-a", "o-b"),
    ("alias", "al-a", "al-b"),
    ("profile", "pr-a", "pr-b"),
    ("success", True, False),
    ("is_streaming", True, False),
]


@pytest.mark.parametrize(("column", "wanted", "other"), FILTER_CASES)
async def test_each_filter(store: Store, column: str, wanted: Any, other: Any) -> None:
    records = [_record(**{column: wanted}, cost=1) for _ in range(3)]
    records += [_record(**{column: other}, cost=10) for _ in range(2)]
    if column not in ("success", "is_streaming"):
        records.append(_record(cost=100))
    await store.usage.record_many(records)
    [row] = await _check(store, records, **{column: wanted})
    assert (row.requests, row.cost) == (3, 3)
    # An id given as text is the same filter; None is no filter.
    # One filter, named by the parameter: any of metrics()' keyword arguments.
    as_text: dict[str, Any] = {column: str(wanted)}
    no_filter: dict[str, Any] = {column: None}
    if column in ID_COLUMNS:
        assert await store.usage.metrics(**as_text) == [row]
    [everything] = await store.usage.metrics(**no_filter)
    assert everything.requests == len(records)


async def test_filters_combine(store: Store) -> None:
    records = [
        _record(model=model, api_key_id=key, success=ok, cost=1)
        for model in ("a", "b")
        for key in (KEY_A, KEY_B)
        for ok in (True, False)
    ]
    await store.usage.record_many(records)
    [row] = await _check(store, records, model="a", api_key_id=KEY_B, success=False)
    assert (row.requests, row.errors) == (1, 1)


async def test_since_is_inclusive_and_until_exclusive(store: Store) -> None:
    tick = dt.timedelta(microseconds=1)
    times = [T0 - tick, T0, T0 + tick, T0 + DAY - tick, T0 + DAY]
    records = [_record(created_at=when, cost=2**i) for i, when in enumerate(times)]
    await store.usage.record_many(records)
    [row] = await _check(store, records, since=T0, until=T0 + DAY)
    assert row.cost == 2 + 4 + 8
    [row] = await _check(store, records, since=T0)
    assert row.cost == 2 + 4 + 8 + 16
    [row] = await _check(store, records, until=T0)
    assert row.cost == 1
    # The same instants in another time zone.
    tokyo = dt.timezone(dt.timedelta(hours=9))
    [row] = await store.usage.metrics(
        since=T0.astimezone(tokyo), until=(T0 + DAY).astimezone(tokyo)
    )
    assert row.cost == 2 + 4 + 8


# --- the query plan ----------------------------------------------------------------


async def test_a_time_window_uses_an_index(store: Store) -> None:
    rng = random.Random(3)
    records = [
        _record(
            created_at=T0 + dt.timedelta(seconds=rng.randrange(100 * 86400)),
            model=f"m{rng.randrange(5)}",
            api_key_id=rng.choice([KEY_A, KEY_B, None]),
            response_time_ms=rng.randrange(1000),
        )
        for _ in range(5000)
    ]
    await store.usage.record_many(records)
    postgres = store.driver == "postgresql"

    def plan(conn: Connection, **filters: Any) -> str:
        query = check_metrics_query(
            since=T0 + 50 * DAY,
            until=T0 + 51 * DAY,
            group_by=["model"],
            bucket=None,
            filters=filters,
        )
        sql = metrics_statement(query).compile(conn, compile_kwargs={"literal_binds": True})
        explain = "EXPLAIN QUERY PLAN "
        if postgres:
            # The text is run as it is, so the store's schema comes from the search path.
            schema = conn.get_execution_options()["schema_translate_map"][None]
            conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
            conn.exec_driver_sql("ANALYZE llmstore_usage_logs")
            explain = "EXPLAIN "
        return "\n".join(str(row[-1]) for row in conn.exec_driver_sql(explain + str(sql)))

    assert "llmstore_usage_logs_created_at_id_idx" in await run_sql(store, plan)
    assert "llmstore_usage_logs_model_created_at_idx" in await run_sql(
        store, lambda conn: plan(conn, model="m1")
    )
    assert "llmstore_usage_logs_api_key_id_created_at_id_idx" in await run_sql(
        store, lambda conn: plan(conn, api_key_id=KEY_A)
    )
