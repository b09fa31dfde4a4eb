"""``store.usage.metrics()`` on every driver, by its definitions: a hand-computed example,
nearest-rank percentiles, NULLs left out, rounding, exact sums and one past int64, an empty
answer, and metrics inside a transaction."""

from __future__ import annotations

import random

import pytest

from llmstore import DatabaseError, Store, UsageMetrics
from tests.usage.metrics_support import DAY, GROUP_COLUMNS, T0, _check, _record

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
            cached_tokens=index % 3,
            cache_write_tokens=1,
            audio_input_tokens=index % 2,
            reasoning_tokens=index // 2,
            audio_output_tokens=index % 2,
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
        cached_tokens=19,  # 0+1+2 six times, then 0+1
        cache_write_tokens=20,
        reasoning_tokens=90,  # 0+0+1+1+...+9+9
        audio_input_tokens=10,
        audio_output_tokens=10,
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
