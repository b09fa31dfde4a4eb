"""Usage rows: validation, durable writes, request-id duplicates, keyset pages."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmstore import (
    RecordResult,
    Store,
    UsageLog,
    UsageRecord,
    ValidationError,
)
from llmstore._db.schema import usage_logs
from tests.helpers import count_rows
from tests.usage.usage_support import refuse_usage_rows

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


# -- UsageRecord ------------------------------------------------------------------------------


def test_a_record_has_defaults_and_derives_total_tokens() -> None:
    before = dt.datetime.now(dt.UTC)
    record = UsageRecord(prompt_tokens=3, completion_tokens=4)
    assert record.total_tokens == 7
    assert record.created_at.tzinfo is not None and record.created_at >= before
    assert (record.success, record.is_streaming, record.cost) == (True, False, None)
    assert UsageRecord(prompt_tokens=3, total_tokens=10).total_tokens == 10


def test_created_at_is_kept_in_utc() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    record = UsageRecord(created_at=dt.datetime(2026, 1, 1, 13, 0, tzinfo=paris))
    assert record.created_at == dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert record.created_at.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_tokens": -1},
        {"completion_tokens": -5},
        {"cached_tokens": 1.5},
        {"total_tokens": True},
        {"cost": -1},
        {"cost": "10"},
        {"cost": 2**63},
        {"response_time_ms": -1},
        {"time_to_first_token_ms": 2.5},
        {"tokens_per_second": float("nan")},
        {"tokens_per_second": -1.0},
        {"top_p": 1.5},
        {"temperature": float("inf")},
        {"status_code": 99},
        {"status_code": 600},
        {"success": "yes"},
        {"is_streaming": 1},
        {"created_at": dt.datetime(2026, 1, 1)},
        {"created_at": dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))},
        {"created_at": dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(-dt.timedelta(hours=5)))},
        {"request_id": ""},
        {"request_id": "x" * 201},
        {"model": "\ud800"},
        {"model": "gpt\x00"},
        {"error_message": "bad\x00byte"},
        {"finish_reason": "\x00"},
        {"api_key_id": "not-a-uuid"},
        {"metadata": {"x": object()}},
        {"metadata": {"x": "y" * 20_000}},
        {"metadata": [1, 2]},
        {"unknown_field": 1},
        {"prompt_tokens": 2**62, "completion_tokens": 2**62},
        {"cache_write_tokens": -1},
        {"reasoning_tokens": 1.0},
        {"audio_input_tokens": True},
        {"audio_output_tokens": 2**63},
        {"end_user": ""},
        {"session_id": "x" * 201},
        {"service_tier": "\x00"},
        {"tags": "chat"},
        {"tags": ["a", 1]},
        {"tags": [""]},
        {"tags": ["  "]},
        {"tags": ["x" * 201]},
        {"tags": [f"t{i}" for i in range(21)]},
        {"tags": {"a": 1}},
        {"usage_source": "guessed"},
        {"usage_source": None},
        {"cost_source": "given"},
    ],
)
def test_bad_records_raise_validation_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="invalid usage record"):
        UsageRecord(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt_tokens": 10, "cached_tokens": 11}, "prompt_tokens includes"),
        ({"prompt_tokens": 10, "cached_tokens": 6, "cache_write_tokens": 5}, "sum \\(11\\)"),
        ({"prompt_tokens": 10, "cached_tokens": 5, "audio_input_tokens": 6}, "prompt_tokens"),
        ({"completion_tokens": 3, "reasoning_tokens": 4}, "completion_tokens includes"),
        ({"completion_tokens": 3, "reasoning_tokens": 2, "audio_output_tokens": 2}, "sum"),
    ],
)
def test_parts_larger_than_their_whole_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        UsageRecord(**fields)


def test_parts_up_to_their_whole_are_taken() -> None:
    record = UsageRecord(
        prompt_tokens=10,
        cached_tokens=5,
        cache_write_tokens=3,
        audio_input_tokens=2,
        completion_tokens=4,
        reasoning_tokens=3,
        audio_output_tokens=1,
        tags=("b", "a", "b"),
    )
    assert record.total_tokens == 14 and record.tags == ("b", "a")
    assert (record.usage_source, record.cost) == ("reported", None)
    assert UsageRecord(tags=[f"t{i % 20}" for i in range(40)]).tags == tuple(
        f"t{i}" for i in range(20)
    )


def test_validating_from_a_mapping_or_json_raises_validation_error_too() -> None:
    assert UsageRecord.model_validate({"cost": 3}).cost == 3
    assert UsageRecord.model_validate_json('{"model": "m"}').model == "m"
    with pytest.raises(ValidationError, match="invalid usage record"):
        UsageRecord.model_validate({"cost": -3})
    with pytest.raises(ValidationError, match="invalid usage record"):
        UsageRecord.model_validate_json('{"created_at": "2026-01-01T00:00:00"}')


def test_an_oversized_error_message_is_truncated_and_marked() -> None:
    record = UsageRecord(success=False, error_message="e" * 10_000)
    assert record.error_message is not None
    assert len(record.error_message) == 4000
    assert record.error_message.endswith("... [truncated from 10000 characters]")
    assert UsageRecord(error_message="e" * 4000).error_message == "e" * 4000


def test_records_are_frozen() -> None:
    record = UsageRecord()
    with pytest.raises(Exception, match="frozen"):
        record.cost = 5  # type: ignore[misc]


# -- record / record_many ---------------------------------------------------------------------


async def test_record_writes_every_field_and_reads_it_back(store: Store) -> None:
    key, project, token = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    record = UsageRecord(
        created_at=T0,
        api_key_id=key,
        project_id=project,
        token_id=token,
        request_id="req-1",
        alias="fast",
        profile="default",
        provider="openai",
        model="gpt-4o",
        origin="web",
        is_streaming=True,
        success=False,
        status_code=429,
        response_time_ms=1234,
        time_to_first_token_ms=200,
        time_to_last_token_ms=1200,
        tokens_per_second=41.5,
        prompt_tokens=100,
        completion_tokens=50,
        cached_tokens=20,
        cost=12_345,
        finish_reason="length",
        max_tokens=256,
        temperature=0.7,
        top_p=0.9,
        message_count=3,
        error_type="rate_limited",
        error_message="slow down",
        metadata={"tier": "gold", "tags": ["a", "b"], "n": 1},
        cache_write_tokens=30,
        reasoning_tokens=10,
        audio_input_tokens=5,
        audio_output_tokens=7,
        end_user="user-42",
        session_id="session-9",
        service_tier="flex",
        tags=["b", "a", "b", "ü" * 200],
        usage_source="estimated",
    )
    result = await store.usage.record(record)
    assert isinstance(result, RecordResult)
    assert (result.written, result.duplicate_request_ids) == (1, [])
    assert len(result.ids) == 1 and result.ids[0] is not None
    stored = await store.usage.get(result.ids[0])
    assert isinstance(stored, UsageLog)
    expected = record.model_dump()
    assert record.tags == ("b", "a", "ü" * 200)
    assert stored.model_dump() == {"id": result.ids[0], **expected, "cost_source": "given"}
    assert stored.created_at.tzinfo is not None


async def test_record_many_writes_in_order_and_returns_ids(store: Store) -> None:
    records = [UsageRecord(created_at=T0, model=f"m{i}", cost=i) for i in range(50)]
    result = await store.usage.record_many(records)
    assert result.written == 50 and result.duplicate_request_ids == []
    ids = [i for i in result.ids if i is not None]
    assert len(ids) == 50 and ids == sorted(ids) and len(set(ids)) == 50
    for row_id, record in zip(ids, records, strict=True):
        stored = await store.usage.get(row_id)
        assert stored is not None and (stored.model, stored.cost) == (record.model, record.cost)
    assert await count_rows(store, usage_logs) == 50


async def test_record_many_accepts_mappings_and_an_empty_batch(store: Store) -> None:
    # record_many takes mappings too (each is validated as a UsageRecord); its signature
    # names only UsageRecord.
    mixed: list[Any] = [{"model": "a", "cost": 3}, UsageRecord(model="b")]
    result = await store.usage.record_many(mixed)
    assert result.written == 2
    empty = await store.usage.record_many([])
    assert (empty.written, empty.ids, empty.duplicate_request_ids) == (0, [], [])


async def test_duplicate_request_ids_are_reported_not_written(store: Store) -> None:
    first = await store.usage.record_many(
        [UsageRecord(request_id="a", cost=1), UsageRecord(request_id="b", cost=2)]
    )
    assert first.written == 2
    again = await store.usage.record_many(
        [
            UsageRecord(request_id="a", cost=100),  # stored before
            UsageRecord(request_id="c", cost=3),
            UsageRecord(request_id="c", cost=300),  # repeated within the batch
            UsageRecord(cost=4),  # no request id: never a duplicate
            UsageRecord(cost=4),
        ]
    )
    assert again.written == 3
    assert again.duplicate_request_ids == ["a", "c"]
    assert [i is None for i in again.ids] == [True, False, True, False, False]
    assert await count_rows(store, usage_logs) == 5
    # The first write of each request id is the one kept.
    rows = await store.usage.list(limit=100)
    assert sorted((r.request_id or "", r.cost) for r in rows) == [
        ("", 4),
        ("", 4),
        ("a", 1),
        ("b", 2),
        ("c", 3),
    ]
    single = await store.usage.record(UsageRecord(request_id="b"))
    assert (single.written, single.duplicate_request_ids, single.ids) == (0, ["b"], [None])


async def test_a_batch_with_one_bad_row_writes_nothing_and_names_it(store: Store) -> None:
    batch: list[Any] = [{"cost": 1}, {"cost": 2}, {"cost": -3}, {"cost": 4}]
    with pytest.raises(ValidationError, match=r"record 2: .*cost"):
        await store.usage.record_many(batch)
    with pytest.raises(ValidationError, match="record 1 must be a UsageRecord"):
        await store.usage.record_many([UsageRecord(), 42])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match="sequence of UsageRecord"):
        await store.usage.record_many(UsageRecord())  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="must be a UsageRecord"):
        await store.usage.record({"cost": 1})  # type: ignore[arg-type]
    assert await count_rows(store, usage_logs) == 0


async def test_a_row_the_database_refuses_is_a_validation_error_and_writes_nothing(
    store: Store,
) -> None:
    # A constraint of the operator's own, met by the bulk path (raw sqlite3 or COPY).
    await refuse_usage_rows(
        store, "no_free_rows", check="cost > 0", when="NEW.cost = 0", message="no free rows"
    )
    for request_id in (None, "with-id"):
        batch = [UsageRecord(cost=1), UsageRecord(cost=0, request_id=request_id)]
        with pytest.raises(ValidationError, match="constraint"):
            await store.usage.record_many(batch)
    assert await count_rows(store, usage_logs) == 0


async def test_record_many_inside_a_transaction_commits_or_rolls_back_with_it(
    store: Store,
) -> None:
    async with store.transaction() as tx:
        await tx.usage.record_many([UsageRecord(request_id="kept")])
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.usage.record_many([UsageRecord(request_id="gone")])
            raise RuntimeError("abort")
    rows = await store.usage.list()
    assert [row.request_id for row in rows] == ["kept"]


async def test_a_large_batch_is_written_whole(store: Store) -> None:
    records = [
        UsageRecord(created_at=T0 + dt.timedelta(seconds=i), request_id=f"r{i}", cost=i)
        for i in range(3000)
    ]
    result = await store.usage.record_many(records)
    assert result.written == 3000
    again = await store.usage.record_many([*records[2990:], UsageRecord(request_id="new")])
    assert again.written == 1 and len(again.duplicate_request_ids) == 10
    assert await count_rows(store, usage_logs) == 3001


# -- list and get -----------------------------------------------------------------------------


async def _seed(store: Store) -> tuple[uuid.UUID, uuid.UUID, list[int]]:
    key, project = uuid.uuid4(), uuid.uuid4()
    records = []
    for i in range(30):
        records.append(
            UsageRecord(
                created_at=T0 + dt.timedelta(minutes=i // 2),  # pairs share a timestamp
                api_key_id=key if i % 2 == 0 else None,
                project_id=project if i % 3 == 0 else None,
                model="a" if i % 5 else "b",
                success=i % 4 != 0,
                cost=i,
            )
        )
    result = await store.usage.record_many(records)
    return key, project, [i for i in result.ids if i is not None]


async def test_list_is_newest_first_and_filters(store: Store) -> None:
    key, project, _ids = await _seed(store)
    rows = await store.usage.list(limit=100)
    assert [r.cost for r in rows] == list(range(29, -1, -1))
    assert all((a.created_at, a.id) > (b.created_at, b.id) for a, b in itertools.pairwise(rows))
    assert {r.cost for r in await store.usage.list(api_key_id=key)} == set(range(0, 30, 2))
    assert {r.cost for r in await store.usage.list(project_id=str(project))} == set(range(0, 30, 3))
    assert {r.cost for r in await store.usage.list(model="b")} == {0, 5, 10, 15, 20, 25}
    assert {r.cost for r in await store.usage.list(success=False)} == set(range(0, 30, 4))
    window = await store.usage.list(
        since=T0 + dt.timedelta(minutes=3), until=T0 + dt.timedelta(minutes=5)
    )
    assert sorted(r.cost for r in window) == [6, 7, 8, 9]  # since inclusive, until exclusive
    both = await store.usage.list(api_key_id=key, model="a", success=True)
    assert sorted(r.cost for r in both) == [2, 6, 14, 18, 22, 26]
    assert await store.usage.list(api_key_id=uuid.uuid4()) == []


async def test_pages_follow_each_other_without_gaps_or_repeats(store: Store) -> None:
    key, _, _ = await _seed(store)
    for filters in ({}, {"api_key_id": key}, {"model": "a"}):
        everything = await store.usage.list(limit=100, **filters)
        seen: list[int] = []
        after = None
        while True:
            page = await store.usage.list(limit=4, after=after, **filters)
            if not page:
                break
            seen += [r.id for r in page]
            after = page[-1].id
        assert seen == [r.id for r in everything]


async def test_get_unknown_row_is_none(store: Store) -> None:
    assert await store.usage.get(123456) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0},
        {"limit": 10_001},
        {"limit": True},
        {"limit": "5"},
        {"after": 0},
        {"after": "3"},
        {"api_key_id": "nope"},
        {"project_id": 5},
        {"since": dt.datetime(2026, 1, 1)},
        {"until": "2026-01-01"},
        {"success": 1},
        {"model": ""},
    ],
)
async def test_bad_list_arguments_raise_validation_error(
    store: Store, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        await store.usage.list(**kwargs)


async def test_limit_bounds_are_inclusive(store: Store) -> None:
    await store.usage.record_many([UsageRecord() for _ in range(3)])
    assert len(await store.usage.list(limit=1)) == 1
    assert len(await store.usage.list(limit=10_000)) == 3
    with pytest.raises(ValidationError):
        await store.usage.get(0)


# -- pagination property ----------------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    offsets=st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=25),
    page=st.integers(min_value=1, max_value=7),
)
async def test_any_page_size_walks_every_row_once_newest_first(
    store: Store, offsets: list[int], page: int
) -> None:
    marker = uuid.uuid4()  # this example's rows only
    records = [
        UsageRecord(created_at=T0 + dt.timedelta(seconds=o), project_id=marker, cost=i)
        for i, o in enumerate(offsets)
    ]
    await store.usage.record_many(records)
    walked: list[UsageLog] = []
    after = None
    while True:
        rows = await store.usage.list(project_id=marker, limit=page, after=after)
        if not rows:
            break
        walked += rows
        after = rows[-1].id
    expected = sorted(
        ((r.created_at, i) for i, r in enumerate(records)), key=lambda pair: pair, reverse=True
    )
    assert [row.cost for row in walked] == [i for _, i in expected]


# -- the bulk path's encoding -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    moment=st.datetimes(
        min_value=dt.datetime(1, 1, 1),
        max_value=dt.datetime(9999, 12, 31),
        timezones=st.just(dt.UTC),
    ),
    ident=st.uuids(),
    flag=st.booleans(),
    rate=st.one_of(st.integers(0, 2**53), st.floats(0, 1e300)),
)
def test_sqlite_shortcuts_store_what_the_column_types_store(
    moment: dt.datetime, ident: uuid.UUID, flag: bool, rate: float
) -> None:
    from sqlalchemy.dialects import sqlite

    from llmstore._usage.records import FIELD_OF_COLUMN
    from llmstore._usage.repository import BULK

    dialect = sqlite.dialect()
    record = UsageRecord(
        created_at=moment, api_key_id=ident, is_streaming=flag, tokens_per_second=rate
    )
    # The columns a write computes are given to the encoder, as insert_records does.
    computed = {"cost": 7, "cost_source": "given", "tags": ["a"]}
    fast = BULK.encoder(dialect).rows([record], [1], {k: [v] for k, v in computed.items()})[0]
    columns = ["id", *(c.name for c in usage_logs.c if c.name != "id")]
    for index, name in enumerate(columns[1:], start=1):
        process = usage_logs.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        value = computed[name] if name in computed else getattr(record, FIELD_OF_COLUMN[name])
        expected = value if process is None or value is None else process(value)
        assert fast[index] == expected, name
        assert type(fast[index]) is type(expected) or isinstance(value, bool), name


async def test_ids_of_purged_rows_are_never_reused(store: Store) -> None:
    first = await store.usage.record_many([UsageRecord(created_at=T0) for _ in range(3)])
    top = max(i for i in first.ids if i is not None)
    assert await store.usage.purge(T0 + dt.timedelta(days=1)) == 3
    again = await store.usage.record(UsageRecord())
    assert again.ids[0] is not None and again.ids[0] > top
