"""``store.usage.metrics()`` on every driver against the pure-Python reference
(``metrics_support.reference``), with hypothesis."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmstore import Store, UsageRecord
from tests.usage.metrics_support import (
    DAY,
    GROUP_COLUMNS,
    KEY_A,
    KEY_B,
    PROJECT_A,
    PROJECT_B,
    T0,
    reference,
)

EXTRA_FILTERS: list[dict[str, Any]] = [
    {},
    {"success": True},
    {"is_streaming": False},
    {"model": "a"},
]


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
