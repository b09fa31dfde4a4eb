"""Errors for web frameworks: ``http_status`` on every class, ``public_message`` on every
instance, safe to show a client (no secret, digest, SQL, table or driver text)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

import llmstore
from llmstore import (
    ApiKeyRejectedError,
    BudgetExceededError,
    ConflictError,
    InsufficientBalanceError,
    LlmstoreError,
    NotFoundError,
    RateLimitedError,
    Store,
    TokenRejectedError,
    TokenRejectionReason,
    ValidationError,
)

STATUS = {
    "LlmstoreError": 500,
    "ConfigError": 500,
    "ValidationError": 400,
    "NotFoundError": 404,
    "TokenRejectedError": 401,
    "ApiKeyRejectedError": 401,
    "InsufficientBalanceError": 402,
    "RateLimitedError": 429,
    "BudgetExceededError": 429,
    "ConflictError": 409,
    "IdempotencyConflictError": 409,
    "DatabaseUnavailableError": 503,
}
# What a client must never read.
LEAKS = ("UNIQUE", "duplicate key", "constraint", "llmstore_", "INSERT", "SELECT", "sqlite")


def _error_classes() -> list[type[LlmstoreError]]:
    return [
        value
        for name in llmstore.__all__
        if isinstance(value := getattr(llmstore, name), type) and issubclass(value, LlmstoreError)
    ]


def test_every_error_class_has_an_int_http_status() -> None:
    classes = _error_classes()
    assert len(classes) >= 20
    for error in classes:
        assert type(error.http_status) is int, error
        assert error.http_status == STATUS.get(error.__name__, 500), error


def test_limits_answer_429_with_what_a_retry_after_header_needs() -> None:
    limit_id, budget_id = uuid.uuid4(), uuid.uuid4()
    limited = RateLimitedError(limit_id, 17)
    assert (limited.http_status, limited.public_message, limited.retry_after) == (
        429,
        "rate limit exceeded",
        17,
    )
    assert limited.rate_limit_id == limit_id
    resets = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    exceeded = BudgetExceededError(budget_id, 5, resets, 3600)
    assert (exceeded.http_status, exceeded.public_message) == (429, "budget exceeded")
    assert (exceeded.budget_id, exceeded.remaining, exceeded.resets_at, exceeded.retry_after) == (
        budget_id,
        5,
        resets,
        3600,
    )
    assert "never resets" in str(BudgetExceededError(budget_id, 0, None, None))
    for error in (limited, exceeded):
        assert str(limit_id) not in error.public_message
        assert str(budget_id) not in error.public_message


def test_key_rejections_say_why_publicly() -> None:
    assert {
        reason: ApiKeyRejectedError(reason).public_message
        for reason in ("unknown", "inactive", "expired")
    } == {
        "unknown": "invalid API key",
        "inactive": "API key inactive",
        "expired": "API key expired",
    }


def test_token_rejections_answer_401_and_an_exhausted_quota_429() -> None:
    reasons: list[TokenRejectionReason] = [
        "unknown",
        "inactive",
        "project_inactive",
        "expired",
        "quota_exhausted",
    ]
    answers = {}
    for reason in reasons:
        error = TokenRejectedError(reason)
        answers[reason] = (error.http_status, error.public_message)
    assert answers == {
        "unknown": (401, "invalid token"),
        "inactive": (401, "token inactive"),
        "project_inactive": (401, "project inactive"),
        "expired": (401, "token expired"),
        "quota_exhausted": (429, "token quota exhausted"),
    }
    assert TokenRejectedError.http_status == 401


async def test_real_errors_carry_their_status_and_a_safe_message(store: Store) -> None:
    project = await store.projects.create("taken", api_key="sk-upstream-SECRET")
    with pytest.raises(ConflictError) as conflict:
        await store.projects.create("taken")
    assert (conflict.value.http_status, conflict.value.public_message) == (
        409,
        "conflict with existing data",
    )
    with pytest.raises(NotFoundError) as missing:
        await store.projects.get(uuid.uuid4())
    assert (missing.value.http_status, missing.value.public_message) == (404, "not found")
    with pytest.raises(ValidationError) as invalid:
        await store.projects.create("x" * 201)
    assert (invalid.value.http_status, invalid.value.public_message) == (400, "invalid request")

    issued = await store.api_keys.create(balance=5, project_id=project.id)
    with pytest.raises(InsufficientBalanceError) as poor:
        await store.api_keys.charge(issued.key.id, 6)
    assert (poor.value.http_status, poor.value.public_message) == (402, "insufficient balance")

    token = await store.tokens.create(project.id, max_requests=1)
    await store.tokens.use(token.secret)
    with pytest.raises(TokenRejectedError) as spent:
        await store.tokens.use(token.secret)
    assert (spent.value.reason, spent.value.http_status) == ("quota_exhausted", 429)

    for error in (conflict.value, missing.value, invalid.value, poor.value, spent.value):
        text = error.public_message
        assert not any(leak.lower() in text.lower() for leak in LEAKS), text
        assert token.secret not in text and "SECRET" not in text


@pytest.mark.parametrize(
    "secret", ["sk-proj-abc", "", "lsk_", "Bearer lsk_x", None, 42, b"lsk_", "lst_" + "A" * 43]
)
async def test_a_key_of_the_wrong_shape_is_a_rejection(store: Store, secret: object) -> None:
    with pytest.raises(ApiKeyRejectedError) as rejected:
        await store.api_keys.authenticate(secret)  # type: ignore[arg-type]
    assert rejected.value.reason == "unknown"
    assert (rejected.value.http_status, rejected.value.public_message) == (401, "invalid API key")


def test_key_rejections_name_their_reason_only() -> None:
    assert ApiKeyRejectedError("unknown").public_message == "invalid API key"
    assert ApiKeyRejectedError("expired").public_message == "API key expired"
    assert ApiKeyRejectedError("expired").http_status == 401
