"""admissions.admit: authenticate, find every limit of the request's scopes, check and
count them all in one step, or refuse with nothing held or counted."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from llmstore import (
    Admission,
    ApiKeyRejectedError,
    BudgetExceededError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    NotFoundError,
    RateLimitedError,
    Store,
    TokenRejectedError,
    ValidationError,
)
from llmstore._db.schema import api_keys
from llmstore.pytest_plugin import run_sql
from tests.admission.admission_support import START, Clock, tenant


async def _usage_of(
    store: Store, key_id: uuid.UUID, budget_id: uuid.UUID, limit_id: uuid.UUID
) -> tuple[int, int, int]:
    """(key reserved, budget reserved, window requests): what an admission holds and counts."""
    key = await store.api_keys.get(key_id)
    budget = await store.budgets.status(budget_id)
    window = await store.rate_limits.status(limit_id)
    return key.reserved, budget.reserved, window.requests


async def test_admit_with_an_api_key_holds_and_counts(store: Store) -> None:
    t = await tenant(store, balance=1000)
    budget = await store.budgets.create(500, project_id=t.project.id, period="day")
    limit = await store.rate_limits.create(requests=10, api_key_id=t.key.key.id)
    admitted = await store.admissions.admit(t.key.secret, cost=120, tokens=50)
    assert isinstance(admitted, Admission)
    assert (admitted.status, admitted.cost, admitted.tokens) == ("active", 120, 50)
    assert admitted.api_key is not None and admitted.api_key.id == t.key.key.id
    assert (admitted.api_key_id, admitted.project_id, admitted.token) == (
        t.key.key.id,
        t.project.id,
        None,
    )
    assert admitted.expires_at == START + dt.timedelta(minutes=15)
    assert [(b.budget_id, b.remaining) for b in admitted.budgets] == [(budget.id, 380)]
    assert await _usage_of(store, t.key.key.id, budget.id, limit.id) == (120, 120, 1)
    assert admitted.reservation_id is not None
    hold = await store.api_keys.get_reservation(admitted.reservation_id)
    assert (hold.amount, hold.status, hold.expires_at) == (120, "active", admitted.expires_at)
    assert await store.admissions.get(admitted.id) == admitted


async def test_admit_with_a_token_spends_its_quota(store: Store) -> None:
    project = await store.projects.create("p")
    issued = await store.tokens.create(project.id, max_requests=2)
    budget = await store.budgets.create(100, token_id=issued.token.id)
    first = await store.admissions.admit(issued.secret, cost=10)
    assert first.token is not None and first.token.request_count == 1
    assert (first.token_id, first.project_id, first.api_key) == (issued.token.id, project.id, None)
    await store.admissions.admit(token_id=issued.token.id, cost=10)
    with pytest.raises(TokenRejectedError) as rejected:
        await store.admissions.admit(issued.secret, cost=10)
    assert rejected.value.reason == "quota_exhausted"
    assert (await store.budgets.status(budget.id)).reserved == 20


async def test_a_refused_admission_holds_and_counts_nothing(store: Store) -> None:
    t = await tenant(store, balance=100)
    project = await store.projects.create("tokens")
    issued = await store.tokens.create(project.id)
    budget = await store.budgets.create(1000, project_id=t.project.id)
    limit = await store.rate_limits.create(requests=10, project_id=t.project.id)
    tight = await store.budgets.create(50, token_id=issued.token.id)
    token_limit = await store.rate_limits.create(requests=10, token_id=issued.token.id)
    # The key's balance is too small: the window and the budget stay as they were.
    with pytest.raises(InsufficientBalanceError) as poor:
        await store.admissions.admit(t.key.secret, cost=101)
    assert (poor.value.available, poor.value.requested, poor.value.http_status) == (100, 101, 402)
    assert await _usage_of(store, t.key.key.id, budget.id, limit.id) == (0, 0, 0)
    # The token's budget is too small: its request is not spent, its window not counted.
    with pytest.raises(BudgetExceededError):
        await store.admissions.admit(issued.secret, cost=51)
    assert (await store.tokens.get(issued.token.id)).request_count == 0
    assert (await store.rate_limits.status(token_limit.id)).requests == 0
    assert (await store.budgets.status(tight.id)).reserved == 0


async def test_budget_exceeded_says_what_is_left_and_when_it_resets(store: Store) -> None:
    budget = await store.budgets.create(1000, end_user="alice", period="month")
    await store.admissions.admit(end_user="alice", cost=700)
    with pytest.raises(BudgetExceededError) as refused:
        await store.admissions.admit(end_user="alice", cost=301)
    error = refused.value
    assert (error.budget_id, error.remaining, error.http_status) == (budget.id, 300, 429)
    assert error.resets_at == dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    assert error.retry_after == 12 * 3600
    assert error.public_message == "budget exceeded"
    # Exactly the rest fits; then the period is exhausted, even for a free request.
    await store.admissions.admit(end_user="alice", cost=300)
    with pytest.raises(BudgetExceededError):
        await store.admissions.admit(end_user="alice", cost=0)
    # Another end user has no budget.
    await store.admissions.admit(end_user="bob", cost=5000)
    lifetime = await store.budgets.create(10, tag="once")
    with pytest.raises(BudgetExceededError) as never:
        await store.admissions.admit(tags=["once"], cost=11)
    assert (never.value.budget_id, never.value.resets_at, never.value.retry_after) == (
        lifetime.id,
        None,
        None,
    )


async def test_rate_limited_says_when_to_retry(store: Store, clock: Clock) -> None:
    limit = await store.rate_limits.create(requests=2, per="hour", tag="t")
    clock.move(dt.timedelta(minutes=20, seconds=0.5))
    for _ in range(2):
        await store.admissions.admit(tags=["t"])
    with pytest.raises(RateLimitedError) as refused:
        await store.admissions.admit(tags=["t", "other"])
    assert (refused.value.rate_limit_id, refused.value.http_status) == (limit.id, 429)
    assert refused.value.retry_after == 40 * 60  # 39:59.5, rounded up
    clock.move(dt.timedelta(minutes=40))
    await store.admissions.admit(tags=["t"])


async def test_tokens_count_against_token_limits(store: Store) -> None:
    limit = await store.rate_limits.create(tokens=1000, tag="t")
    await store.admissions.admit(tags=["t"], tokens=600)
    with pytest.raises(RateLimitedError):
        await store.admissions.admit(tags=["t"], tokens=401)
    await store.admissions.admit(tags=["t"], tokens=400)
    with pytest.raises(RateLimitedError):  # more than any window can take
        await store.admissions.admit(tags=["u", "t"], tokens=1001)
    assert (await store.rate_limits.status(limit.id)).tokens == 1000


async def test_key_and_project_budgets_both_apply(store: Store) -> None:
    t = await tenant(store)
    sibling = await store.api_keys.create(balance=1_000_000, project_id=t.project.id)
    shared = await store.budgets.create(1000, project_id=t.project.id)
    own = await store.budgets.create(300, api_key_id=t.key.key.id)
    # The key's own budget is the tighter one.
    await store.admissions.admit(t.key.secret, cost=300)
    with pytest.raises(BudgetExceededError) as refused:
        await store.admissions.admit(t.key.secret, cost=1)
    assert refused.value.budget_id == own.id
    # The sibling key shares the project budget exactly: 700 left of it.
    await store.admissions.admit(sibling.secret, cost=700)
    with pytest.raises(BudgetExceededError) as shared_refused:
        await store.admissions.admit(sibling.secret, cost=1)
    assert shared_refused.value.budget_id == shared.id
    assert (await store.budgets.status(shared.id)).reserved == 1000


async def test_tag_and_project_scopes(store: Store) -> None:
    t = await tenant(store)
    tagged = await store.budgets.create(100, tag="batch")
    project = await store.budgets.create(1000, project_id=t.project.id)
    admitted = await store.admissions.admit(project_id=t.project.id, tags=["batch", "x"], cost=40)
    assert {b.budget_id for b in admitted.budgets} == {tagged.id, project.id}
    assert admitted.tags == ("batch", "x")
    with pytest.raises(ValidationError, match="caller's project"):
        await store.admissions.admit(t.key.secret, project_id=uuid.uuid4())


@pytest.mark.parametrize(
    ("secret", "error", "reason"),
    [
        ("lsk_" + "A" * 43, ApiKeyRejectedError, "unknown"),
        ("sk-openai-key", ApiKeyRejectedError, "unknown"),
        ("lst_" + "A" * 43, TokenRejectedError, "unknown"),
        ("lst_", TokenRejectedError, "unknown"),
        (12345, ApiKeyRejectedError, "unknown"),
    ],
)
async def test_unknown_secrets_are_rejected(
    store: Store, secret: object, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error) as rejected:
        await store.admissions.admit(secret, cost=1)  # type: ignore[arg-type]
    assert rejected.value.reason == reason  # type: ignore[attr-defined]


async def test_expired_and_inactive_keys_are_rejected(store: Store, clock: Clock) -> None:
    expiring = await store.api_keys.create(balance=10, expires_at=START + dt.timedelta(hours=1))
    await store.admissions.admit(expiring.secret, cost=1)
    clock.move(dt.timedelta(hours=1))
    with pytest.raises(ApiKeyRejectedError) as expired:
        await store.admissions.admit(expiring.secret, cost=1)
    assert expired.value.reason == "expired"
    with pytest.raises(ApiKeyRejectedError):
        await store.admissions.admit(api_key_id=expiring.key.id, cost=1)
    paused = await store.api_keys.create(balance=10)
    statement = sa.update(api_keys).where(api_keys.c.id == paused.key.id).values(is_active=False)
    await run_sql(store, lambda conn: conn.execute(statement), write=True)
    with pytest.raises(ApiKeyRejectedError) as inactive:
        await store.admissions.admit(paused.secret)
    assert (inactive.value.reason, inactive.value.public_message) == (
        "inactive",
        "API key inactive",
    )


@pytest.mark.parametrize(
    "arguments",
    [
        {"cost": -1},
        {"cost": 2**63},
        {"cost": 1.0},
        {"tokens": -1},
        {"ttl": dt.timedelta(0)},
        {"ttl": 60},
        {"tags": "one-tag"},
        {"tags": [""]},
        {"tags": [f"t{i}" for i in range(21)]},
        {"end_user": "   "},
        {"idempotency_key": ""},
        {"project_id": "not-a-uuid"},
        {"api_key_id": uuid.uuid4(), "token_id": uuid.uuid4()},
        {"secret": "lsk_x", "api_key_id": uuid.uuid4()},
    ],
)
async def test_bad_arguments_are_refused_before_anything_is_written(
    store: Store, arguments: dict[str, object]
) -> None:
    limit = await store.rate_limits.create(requests=5, tag="t")
    values: dict[str, object] = {"tags": ["t"], **arguments}
    with pytest.raises(ValidationError):
        await store.admissions.admit(**values)  # type: ignore[arg-type]
    assert (await store.rate_limits.status(limit.id)).requests == 0


async def test_missing_ids_are_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.admissions.admit(api_key_id=uuid.uuid4())
    with pytest.raises(NotFoundError):
        await store.admissions.admit(token_id=uuid.uuid4())
    with pytest.raises(NotFoundError):
        await store.admissions.get(uuid.uuid4())


async def test_an_idempotent_retry_returns_the_same_admission(store: Store) -> None:
    t = await tenant(store)
    budget = await store.budgets.create(1000, api_key_id=t.key.key.id)
    first = await store.admissions.admit(t.key.secret, cost=100, idempotency_key="req-1")
    again = await store.admissions.admit(t.key.secret, cost=100, idempotency_key="req-1")
    assert again.id == first.id and again.budgets == first.budgets
    assert (await store.budgets.status(budget.id)).reserved == 100
    with pytest.raises(IdempotencyConflictError):
        await store.admissions.admit(t.key.secret, cost=101, idempotency_key="req-1")
    other = await store.admissions.admit(t.key.secret, cost=100, idempotency_key="req-2")
    assert other.id != first.id


async def test_racing_retries_with_one_idempotency_key_admit_once(store: Store) -> None:
    t = await tenant(store)
    budget = await store.budgets.create(1000, api_key_id=t.key.key.id)
    limit = await store.rate_limits.create(requests=100, api_key_id=t.key.key.id)
    admitted = await asyncio.gather(
        *(
            store.admissions.admit(t.key.secret, cost=100, idempotency_key="req-race")
            for _ in range(6)
        )
    )
    assert len({admission.id for admission in admitted}) == 1
    assert (await store.budgets.status(budget.id)).reserved == 100
    assert (await store.rate_limits.status(limit.id)).requests == 1
    assert (await store.api_keys.get(t.key.key.id)).reserved == 100
