"""Rate limits: exactly one scope, requests and/or tokens per window; get, list, update,
delete; status counts the current window only."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from llmstore import NotFoundError, RateLimit, RateLimitedError, Store, ValidationError
from tests.admission.admission_support import START, Clock, tenant


async def test_create_get_list(store: Store) -> None:
    t = await tenant(store)
    limit = await store.rate_limits.create(requests=60, tokens=10_000, api_key_id=t.key.key.id)
    assert isinstance(limit, RateLimit)
    assert (limit.requests, limit.tokens, limit.per, limit.api_key_id) == (
        60,
        10_000,
        "minute",
        t.key.key.id,
    )
    assert await store.rate_limits.get(limit.id) == limit
    other = await store.rate_limits.create(requests=5, per="second", end_user="alice")
    assert [r.id for r in await store.rate_limits.list()] == [limit.id, other.id]
    assert [r.id for r in await store.rate_limits.list(end_user="alice")] == [other.id]
    assert [r.id for r in await store.rate_limits.list(limit=1, after=limit.id)] == [other.id]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "requests=, tokens="),
        ({"requests": 0}, "requests"),
        ({"tokens": -1}, "tokens"),
        ({"requests": 10, "per": "week"}, "per"),
        ({"requests": 10, "per": 60}, "per"),
        ({"requests": 2**63}, "requests"),
    ],
)
async def test_bad_limits_are_refused(
    store: Store, arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        await store.rate_limits.create(tag="t", **arguments)  # type: ignore[arg-type]
    assert await store.rate_limits.list() == []


async def test_one_scope_exactly(store: Store) -> None:
    with pytest.raises(ValidationError, match="exactly one scope"):
        await store.rate_limits.create(requests=1)
    with pytest.raises(ValidationError, match="exactly one scope"):
        await store.rate_limits.create(requests=1, tag="a", end_user="b")
    with pytest.raises(NotFoundError):
        await store.rate_limits.create(requests=1, token_id=uuid.uuid4())
    assert await store.rate_limits.list() == []


async def test_update_and_delete(store: Store) -> None:
    limit = await store.rate_limits.create(requests=10, tag="t")
    changed = await store.rate_limits.update(limit.id, tokens=500, per="hour")
    assert (changed.requests, changed.tokens, changed.per) == (10, 500, "hour")
    assert (await store.rate_limits.update(limit.id, requests=None)).requests is None
    with pytest.raises(ValidationError, match="requests=, tokens="):
        await store.rate_limits.update(limit.id, tokens=None)
    with pytest.raises(ValidationError, match="at least one"):
        await store.rate_limits.update(limit.id)
    assert (await store.rate_limits.get(limit.id)).tokens == 500
    await store.rate_limits.delete(limit.id)
    with pytest.raises(NotFoundError):
        await store.rate_limits.get(limit.id)
    with pytest.raises(NotFoundError):
        await store.rate_limits.delete(limit.id)


async def test_status_counts_the_current_window(store: Store, clock: Clock) -> None:
    limit = await store.rate_limits.create(requests=3, tokens=100, tag="t")
    for _ in range(2):
        await store.admissions.admit(tags=["t"], tokens=30)
    status = await store.rate_limits.status(limit.id)
    assert (status.requests, status.tokens) == (2, 60)
    assert (status.remaining_requests, status.remaining_tokens) == (1, 40)
    assert status.window_start == START and status.resets_at == START + dt.timedelta(minutes=1)
    clock.move(dt.timedelta(seconds=59))
    with pytest.raises(RateLimitedError) as refused:
        await store.admissions.admit(tags=["t"], tokens=41)
    assert refused.value.retry_after == 1 and refused.value.rate_limit_id == limit.id
    clock.move(dt.timedelta(seconds=1))
    status = await store.rate_limits.status(limit.id)
    assert (status.requests, status.tokens, status.remaining_requests) == (0, 0, 3)
