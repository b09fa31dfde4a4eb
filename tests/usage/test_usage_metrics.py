"""``store.usage.metrics()`` on every driver, and against a pure-Python reference."""

from __future__ import annotations

import datetime as dt
import math
import random
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Connection

from llmstore import (
    DatabaseError,
    Store,
    StoreClosedError,
    StoreConfig,
    UsageMetrics,
    UsageRecord,
    ValidationError,
)
from llmstore._usage.metrics import check_metrics_query, metrics_statement
from llmstore.pytest_plugin import run_sql

T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
GROUP_COLUMNS = ("model", "provider", "project_id", "api_key_id", "origin", "alias", "profile")
ID_COLUMNS = ("project_id", "api_key_id", "token_id")
EXTRA_FILTERS: list[dict[str, Any]] = [
    {},
    {"success": True},
    {"is_streaming": False},
    {"model": "a"},
]
KEY_A, KEY_B = uuid.UUID(int=0xA), uuid.UUID(int=0xB)
PROJECT_A, PROJECT_B = uuid.UUID(int=0x1A), uuid.UUID(int=0x1B)
TOKEN_A, TOKEN_B = uuid.UUID(int=0x2A), uuid.UUID(int=0x2B)


# --- the reference ---------------------------------------------------------------------


def _truncate(when: dt.datetime, bucket: str | None) -> dt.datetime | None:
    when = when.astimezone(dt.UTC)
    if bucket == "minute":
        return when.replace(second=0, microsecond=0)
    if bucket == "hour":
        return when.replace(minute=0, second=0, microsecond=0)
    if bucket == "day":
        return when.replace(hour=0, minute=0, second=0, microsecond=0)
    return None


def _nearest_rank(values: Sequence[int], percent: int) -> int | None:
    if not values:
        return None
    return sorted(values)[math.ceil(percent * len(values) / 100) - 1]


def _mean(values: Sequence[Any]) -> float | None:
    return sum(values) / len(values) if values else None


def reference(
    records: Sequence[UsageRecord],
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    group_by: str | Sequence[str] = (),
    bucket: str | None = None,
    **filters: Any,
) -> list[UsageMetrics]:
    """The documented definitions, one record at a time."""
    group_by = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    groups: dict[tuple[Any, ...], list[UsageRecord]] = {}
    for record in records:
        if since is not None and record.created_at < since:
            continue
        if until is not None and record.created_at >= until:
            continue
        if any(value is not None and getattr(record, k) != value for k, value in filters.items()):
            continue
        key = (_truncate(record.created_at, bucket), *(getattr(record, c) for c in group_by))
        groups.setdefault(key, []).append(record)
    out = []
    for (start, *values), rows in groups.items():
        times = [r.response_time_ms for r in rows if r.response_time_ms is not None]
        first = [r.time_to_first_token_ms for r in rows if r.time_to_first_token_ms is not None]
        rates = [r.tokens_per_second for r in rows if r.tokens_per_second is not None]
        successes = sum(r.success for r in rows)
        rate = _mean(rates)
        out.append(
            UsageMetrics(
                bucket=start,
                group=dict(zip(group_by, values, strict=True)),
                requests=len(rows),
                successes=successes,
                errors=len(rows) - successes,
                success_rate=successes / len(rows),
                prompt_tokens=sum(r.prompt_tokens for r in rows),
                completion_tokens=sum(r.completion_tokens for r in rows),
                total_tokens=sum(r.total_tokens or 0 for r in rows),
                cost=sum(r.cost for r in rows),
                avg_response_time_ms=_mean(times),
                p50_response_time_ms=_nearest_rank(times, 50),
                p95_response_time_ms=_nearest_rank(times, 95),
                avg_time_to_first_token_ms=_mean(first),
                avg_tokens_per_second=None if rate is None else round(rate, 3),
                streaming_share=sum(r.is_streaming for r in rows) / len(rows),
            )
        )

    def order(row: UsageMetrics) -> tuple[Any, ...]:
        nulls_first = [(False, "") if v is None else (True, v) for v in row.group.values()]
        return (row.bucket or dt.datetime.min.replace(tzinfo=dt.UTC), *nulls_first)

    return sorted(out, key=order)


def _record(**fields: Any) -> UsageRecord:
    fields.setdefault("created_at", T0 + dt.timedelta(hours=1))
    return UsageRecord(**fields)


async def _check(store: Store, records: Sequence[UsageRecord], **query: Any) -> list[UsageMetrics]:
    """metrics() on the stored records, which must equal the reference's answer."""
    got = await store.usage.metrics(**query)
    assert got == reference(records, **query)
    return got


# --- a hand-computed example ---------------------------------------------------------


async def test_hand_computed_example(store: Store) -> None:
    # Response times 5, 10, ..., 100 in a shuffled order, and three rows without one.
    times = [5 * i for i in range(1, 21)]
    random.Random(7).shuffle(times)
    records = [
        _record(
            model="gpt",
            response_time_ms=ms,
            time_to_first_token_ms=ms // 5,
            tokens_per_second=2.0 if index % 2 else 1.0,
            success=index % 4 != 0,
            is_streaming=index < 5,
            prompt_tokens=10,
            completion_tokens=index,
            cost=3,
        )
        for index, ms in enumerate(times)
    ]
    records += [_record(model="gpt", success=False, cost=1) for _ in range(3)]
    await store.usage.record_many(records)
    [row] = await store.usage.metrics(group_by=["model"])
    assert row == UsageMetrics(
        bucket=None,
        group={"model": "gpt"},
        requests=23,
        successes=15,
        errors=8,
        success_rate=15 / 23,
        prompt_tokens=200,
        completion_tokens=190,
        total_tokens=390,
        cost=63,
        avg_response_time_ms=52.5,  # 1050 / 20: the three NULLs are not zeros
        p50_response_time_ms=50,  # rank ceil(0.50 * 20) = 10
        p95_response_time_ms=95,  # rank ceil(0.95 * 20) = 19
        avg_time_to_first_token_ms=10.5,
        avg_tokens_per_second=1.5,
        streaming_share=5 / 23,
    )


@pytest.mark.parametrize(
    ("times", "p50", "p95"),
    [
        ([], None, None),
        ([7], 7, 7),
        ([9, 1], 1, 9),  # ranks ceil(1.0) = 1 and ceil(1.9) = 2
        ([3, 1, 2], 2, 3),
        ([4, 4, 4, 1], 4, 4),
        ([10 * i for i in range(11, 0, -1)], 60, 110),  # ranks ceil(5.5) = 6, ceil(10.45) = 11
        (list(range(1, 101)), 50, 95),
        (list(range(1, 102)), 51, 96),  # ranks ceil(50.5) = 51 and ceil(95.95) = 96
    ],
)
async def test_nearest_rank_percentiles(
    store: Store, times: list[int], p50: int | None, p95: int | None
) -> None:
    records = [_record(response_time_ms=ms) for ms in times] + [_record()]
    await store.usage.record_many(records)
    [row] = await _check(store, records)
    assert (row.p50_response_time_ms, row.p95_response_time_ms) == (p50, p95)


async def test_nulls_are_left_out_of_averages_and_percentiles(store: Store) -> None:
    records = [
        _record(model="none"),
        _record(model="none", success=False),
        _record(model="some", response_time_ms=100, tokens_per_second=1.0),
        _record(model="some", time_to_first_token_ms=40),
        _record(model="some", response_time_ms=300, time_to_first_token_ms=60),
    ]
    await store.usage.record_many(records)
    none, some = await _check(store, records, group_by="model")
    assert none.group == {"model": "none"}
    assert (none.avg_response_time_ms, none.p50_response_time_ms) == (None, None)
    assert (none.avg_time_to_first_token_ms, none.avg_tokens_per_second) == (None, None)
    assert (none.requests, none.successes, none.errors, none.success_rate) == (2, 1, 1, 0.5)
    assert some.avg_response_time_ms == 200.0
    assert (some.p50_response_time_ms, some.p95_response_time_ms) == (100, 300)
    assert some.avg_time_to_first_token_ms == 50.0
    assert some.avg_tokens_per_second == 1.0


async def test_tokens_per_second_is_rounded_to_three_decimals(store: Store) -> None:
    records = [_record(tokens_per_second=rate) for rate in (1.0, 1.0, 2.0, 0.1234)]
    await store.usage.record_many(records)
    [row] = await store.usage.metrics()
    assert row.avg_tokens_per_second == 1.031  # 4.1234 / 4 = 1.03085


async def test_empty(store: Store) -> None:
    assert await store.usage.metrics() == []
    assert await store.usage.metrics(group_by=GROUP_COLUMNS, bucket="minute") == []
    await store.usage.record_many([_record(model="a")])
    assert await store.usage.metrics(model="b") == []
    assert await store.usage.metrics(since=T0 + DAY) == []
    assert await store.usage.metrics(since=T0, until=T0) == []


# --- grouping, buckets, filters, the window ------------------------------------------


def _value(column: str, which: int) -> Any:
    if column == "project_id":
        return (PROJECT_A, PROJECT_B)[which]
    if column == "api_key_id":
        return (KEY_A, KEY_B)[which]
    return f"{column}-{'ab'[which]}"


@pytest.mark.parametrize("column", GROUP_COLUMNS)
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


async def test_large_sums_are_exact(store: Store) -> None:
    big = 2**61
    records = [
        _record(cost=big, prompt_tokens=big, completion_tokens=1, response_time_ms=big)
        for _ in range(3)
    ]
    await store.usage.record_many(records)
    [row] = await _check(store, records)
    assert row.cost == 3 * big and row.total_tokens == 3 * (big + 1)
    assert row.p95_response_time_ms == big


async def test_a_sum_past_int64(store: Store) -> None:
    await store.usage.record_many([_record(cost=2**62), _record(cost=2**62)])
    if store.driver == "sqlite":
        # SQLite's integers stop at 2**63 - 1, and it refuses rather than wraps.
        with pytest.raises(DatabaseError, match="integer overflow"):
            await store.usage.metrics()
    else:
        [row] = await store.usage.metrics()
        assert row.cost == 2**63


async def test_inside_a_transaction(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.usage.record_many([_record(model="m", cost=5)])
        [row] = await tx.usage.metrics(group_by=["model"])
        assert (row.group, row.cost) == ({"model": "m"}, 5)


# --- bad input -------------------------------------------------------------------------

BAD_QUERIES: list[dict[str, Any]] = [
    {"group_by": ["model", "token_id"]},
    {"group_by": ["created_at"]},
    {"group_by": ["model", "model"]},
    {"group_by": 3},
    {"group_by": [None]},
    {"bucket": "week"},
    {"bucket": "Hour"},
    {"bucket": 60},
    {"since": dt.datetime(2024, 5, 1)},
    {"until": dt.datetime(2024, 5, 1)},
    {"since": "2024-05-01T00:00:00Z"},
    {"until": dt.date(2024, 5, 1)},
    {"status_code": 200},
    {"request_id": "r-1"},
    {"limit": 10},
    {"api_key_id": "not-a-uuid"},
    {"project_id": 12},
    {"success": 1},
    {"is_streaming": "yes"},
    {"model": ""},
    {"model": 5},
    {"provider": "x" * 201},
    {"origin": "\ud800"},
]


async def test_bad_input_is_refused(store: Store) -> None:
    for query in BAD_QUERIES:
        with pytest.raises(ValidationError):
            await store.usage.metrics(**query)


async def test_unknown_filter_is_named(store: Store) -> None:
    with pytest.raises(ValidationError, match="status_code"):
        await store.usage.metrics(status_code=200)
    with pytest.raises(ValidationError, match="'week'"):
        await store.usage.metrics(bucket="week")
    with pytest.raises(ValidationError, match="'cost'"):
        await store.usage.metrics(group_by=["cost"])


async def test_bad_input_is_refused_before_the_database(db_config: StoreConfig) -> None:
    # Once the store is closed, anything that reaches its runner raises StoreClosedError.
    async with Store(db_config, auto_upgrade=True) as store:
        usage = store.usage
    with pytest.raises(StoreClosedError):
        await usage.metrics()
    for query in BAD_QUERIES:
        with pytest.raises(ValidationError):
            await usage.metrics(**query)


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


# --- against the reference, with hypothesis -------------------------------------------

_names = st.sampled_from(["a", "b", "B", "é"]) | st.none()
# Instants at and around bucket boundaries, and anywhere in three days.
_EDGES = [
    T0 + offset + nudge
    for offset in (dt.timedelta(0), dt.timedelta(hours=1), dt.timedelta(minutes=61), DAY)
    for nudge in (-dt.timedelta(microseconds=1), dt.timedelta(0), dt.timedelta(seconds=59))
]
_whens = st.sampled_from(_EDGES) | st.integers(min_value=0, max_value=3 * 86400).map(
    lambda s: T0 + dt.timedelta(seconds=s)
)
# Few distinct values, so that groups share them and percentiles meet ties.
_times = st.integers(min_value=0, max_value=40) | st.integers(min_value=0, max_value=10**9)
# Multiples of 1/8 add up exactly in any order, so the drivers' float sums agree.
_rates = st.integers(min_value=0, max_value=8000).map(lambda k: k / 8) | st.none()


@st.composite
def _records(draw: st.DrawFn, token: uuid.UUID) -> list[UsageRecord]:
    ids = st.sampled_from([KEY_A, KEY_B]) | st.none()
    times = _times | st.none()
    return draw(
        st.lists(
            st.builds(
                UsageRecord,
                created_at=_whens,
                token_id=st.just(token),
                api_key_id=ids,
                project_id=st.sampled_from([PROJECT_A, PROJECT_B]) | st.none(),
                model=_names,
                provider=_names,
                origin=_names,
                alias=_names,
                profile=_names,
                success=st.booleans(),
                is_streaming=st.booleans(),
                response_time_ms=times,
                time_to_first_token_ms=times,
                tokens_per_second=_rates,
                prompt_tokens=st.integers(min_value=0, max_value=10**6),
                completion_tokens=st.integers(min_value=0, max_value=10**6),
                cost=st.integers(min_value=0, max_value=10**12),
            ),
            max_size=60,
        )
    )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_matches_the_reference(store: Store, data: st.DataObject) -> None:
    # Each example writes under its own token id and asks only about it.
    token = uuid.uuid4()
    records = data.draw(_records(token))
    # Unbounded half the time; often exactly at a row, to meet the boundaries.
    instants = [record.created_at for record in records] or [T0]
    bound = st.one_of(st.none(), st.none(), st.sampled_from(instants), _whens)
    since, until = data.draw(bound), data.draw(bound)
    group_by = data.draw(st.lists(st.sampled_from(GROUP_COLUMNS), unique=True, max_size=2))
    bucket = data.draw(st.sampled_from([None, "minute", "hour", "day"]))
    extra = data.draw(st.sampled_from(EXTRA_FILTERS))
    await store.usage.record_many(records)
    got = await store.usage.metrics(
        since=since, until=until, group_by=group_by, bucket=bucket, token_id=token, **extra
    )
    assert got == reference(
        records, since=since, until=until, group_by=group_by, bucket=bucket, **extra
    )
    # All of the example's rows in one group too: the drawn query may have left few.
    assert await store.usage.metrics(token_id=token) == reference(records)
