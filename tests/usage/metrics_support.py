"""What the ``store.usage.metrics()`` tests (``test_usage_metrics_*.py``) share: their
values, and the pure-Python reference that metrics() must agree with."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Sequence
from typing import Any

from llmstore import Store, UsageMetrics, UsageRecord

T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
GROUP_COLUMNS = (
    "model",
    "provider",
    "project_id",
    "api_key_id",
    "origin",
    "alias",
    "profile",
    "end_user",
    "service_tier",
    "tag",
)
SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
)
ID_COLUMNS = ("project_id", "api_key_id", "token_id")
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
        tag = filters.get("tag")
        others = {k: v for k, v in filters.items() if k != "tag"}
        if any(value is not None and getattr(record, k) != value for k, value in others.items()):
            continue
        if tag is not None and tag not in record.tags:
            continue
        # A row is counted once under each of its tags (under None if it has none).
        tags: tuple[str | None, ...] = (record.tags or (None,)) if "tag" in group_by else (None,)
        for each in tags:
            named = (each if c == "tag" else getattr(record, c) for c in group_by)
            key = (_truncate(record.created_at, bucket), *named)
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
                **{name: sum(getattr(r, name) for r in rows) for name in SUMMED},
                total_tokens=sum(r.total_tokens or 0 for r in rows),
                cost=sum(r.cost or 0 for r in rows),
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
