"""Tokens: use() (counting, quotas, rejections) and use inside transactions, on every
driver (single process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmstore import Store, Token, TokenRejectedError, TransactionError, ValidationError
from tests.access.tokens_support import HYPOTHESIS, _rejected
from tests.helpers import new_project, now, refused


def _random_secret() -> str:
    """A well-shaped secret that no store ever issued."""
    return "lst_" + secrets.token_urlsafe(32)


# --- use ------------------------------------------------------------------------------------


async def test_use_counts_a_request_and_sets_last_used_at(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, max_requests=5)
    before = now()
    first = await store.tokens.use(issued.secret)
    assert first.request_count == 1
    assert first.cache_hit_count == 0
    assert first.remaining_requests == 4
    assert first.last_used_at is not None
    assert before - dt.timedelta(seconds=5) <= first.last_used_at <= now()
    assert first == await store.tokens.get(issued.token.id)  # same values, same types
    assert isinstance(first.id, uuid.UUID) and isinstance(first.is_active, bool)
    assert first.model_dump_json() == (await store.tokens.get(issued.token.id)).model_dump_json()
    await asyncio.sleep(0.01)
    second = await store.tokens.use(issued.secret)
    assert second.request_count == 2
    assert second.last_used_at is not None and second.last_used_at > first.last_used_at
    unchanged = {"name", "prefix", "max_requests", "created_at", "is_active", "project_id"}
    assert {k: v for k, v in second.model_dump().items() if k in unchanged} == {
        k: v for k, v in issued.token.model_dump().items() if k in unchanged
    }


async def test_cache_hits_count_separately_and_spend_no_quota(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, max_requests=1)
    hit = await store.tokens.use(issued.secret, cache_hit=True)
    assert (hit.request_count, hit.cache_hit_count) == (0, 1)
    assert hit.last_used_at is not None
    spent = await store.tokens.use(issued.secret)
    assert (spent.request_count, spent.cache_hit_count) == (1, 1)
    await _rejected(store, issued.secret, "quota_exhausted")
    # An exhausted token still serves cache hits.
    for expected in (2, 3):
        again = await store.tokens.use(issued.secret, cache_hit=True)
        assert (again.request_count, again.cache_hit_count) == (1, expected)
        assert again.remaining_requests == 0
    assert (await store.tokens.get(issued.token.id)).cache_hit_count == 3


async def test_unknown_secret_is_rejected(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    await _rejected(store, _random_secret(), "unknown")
    await _rejected(store, _random_secret(), "unknown", cache_hit=True)
    # One character off is another secret.
    flipped = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    await _rejected(store, flipped, "unknown")
    assert (await store.tokens.get(issued.token.id)).request_count == 0


async def test_inactive_project_rejects_its_tokens(store: Store) -> None:
    project = await new_project(store)
    issued = await store.tokens.create(project.id)
    await store.projects.deactivate(project.id)
    await _rejected(store, issued.secret, "project_inactive")
    await _rejected(store, issued.secret, "project_inactive", cache_hit=True)
    await store.projects.activate(project.id)
    assert (await store.tokens.use(issued.secret)).request_count == 1


async def test_expired_tokens_are_rejected(store: Store) -> None:
    project = await new_project(store)
    past = await store.tokens.create(project.id, expires_at=now() - dt.timedelta(seconds=1))
    await _rejected(store, past.secret, "expired")
    await _rejected(store, past.secret, "expired", cache_hit=True)
    # Expiring a live token by update, and reviving it.
    live = await store.tokens.create(project.id, expires_at=now() + dt.timedelta(hours=1))
    assert (await store.tokens.use(live.secret)).request_count == 1
    await store.tokens.update(live.token.id, expires_at=now() - dt.timedelta(milliseconds=1))
    await _rejected(store, live.secret, "expired")
    await store.tokens.update(live.token.id, expires_at=None)
    assert (await store.tokens.use(live.secret)).request_count == 2
    await store.tokens.update(past.token.id, expires_at=now() + dt.timedelta(minutes=5))
    assert (await store.tokens.use(past.secret)).request_count == 1


async def test_a_token_expires_on_time(store: Store) -> None:
    expires = now() + dt.timedelta(milliseconds=600)
    issued = await store.tokens.create((await new_project(store)).id, expires_at=expires)
    assert (await store.tokens.use(issued.secret)).request_count == 1
    await asyncio.sleep(max((expires - now()).total_seconds(), 0) + 0.02)
    await _rejected(store, issued.secret, "expired")
    assert (await store.tokens.get(issued.token.id)).request_count == 1


async def test_rejection_precedence(store: Store) -> None:
    project = await new_project(store)
    past = now() - dt.timedelta(minutes=1)

    everything_wrong = await store.tokens.create(project.id, expires_at=past, max_requests=1)
    await store.tokens.update(everything_wrong.token.id, expires_at=None)
    await store.tokens.use(everything_wrong.secret)  # spend the quota
    await store.tokens.update(everything_wrong.token.id, expires_at=past)
    await store.tokens.deactivate(everything_wrong.token.id)

    expired_and_exhausted = await store.tokens.create(project.id, max_requests=1)
    await store.tokens.use(expired_and_exhausted.secret)
    await store.tokens.update(expired_and_exhausted.token.id, expires_at=past)

    inactive_and_expired = await store.tokens.create(project.id, expires_at=past)
    await store.tokens.deactivate(inactive_and_expired.token.id)

    await _rejected(store, inactive_and_expired.secret, "inactive")
    await _rejected(store, expired_and_exhausted.secret, "expired")
    await _rejected(store, everything_wrong.secret, "inactive")
    await store.projects.deactivate(project.id)
    # The token's own state comes first, then its project's, then time, then quota.
    await _rejected(store, everything_wrong.secret, "inactive")
    await _rejected(store, expired_and_exhausted.secret, "project_inactive")
    await store.tokens.activate(everything_wrong.token.id)
    await _rejected(store, everything_wrong.secret, "project_inactive")
    await store.projects.activate(project.id)
    await _rejected(store, everything_wrong.secret, "expired")
    await _rejected(store, everything_wrong.secret, "expired", cache_hit=True)
    await store.tokens.update(everything_wrong.token.id, expires_at=None)
    await _rejected(store, everything_wrong.secret, "quota_exhausted")
    assert (await store.tokens.use(everything_wrong.secret, cache_hit=True)).cache_hit_count == 1


MALFORMED_SECRETS = [
    "lsx_" + "A" * 43,  # wrong prefix
    "LST_" + "A" * 43,
    "sk-" + "A" * 44,
    "lst_" + "A" * 42,  # too short
    "lst_" + "A" * 44,  # too long
    "lst_" + "A" * 42 + "+",  # not URL-safe base64
    "lst_" + "A" * 42 + "=",
    "lst_" + "A" * 43 + "\n",
    " lst_" + "A" * 43,
    "lst_" + "Ä" * 43,
    "",
    "lst_",
]


async def test_malformed_secrets_are_rejected_as_unknown(store: Store) -> None:
    # A proxy catches one error per outcome: a string of the wrong shape is no token.
    issued = await store.tokens.create((await new_project(store)).id)
    for secret in MALFORMED_SECRETS:
        for cache_hit in (False, True):
            error = await refused(
                TokenRejectedError,
                lambda s=secret, c=cache_hit: store.tokens.use(s, cache_hit=c),
                secret,
            )
            message = str(error)
            if len(secret.strip()) > len("lst_"):
                assert secret.strip() not in message
    assert await store.tokens.get(issued.token.id) == issued.token


async def test_non_string_secrets_are_rejected_as_unknown(store: Store) -> None:
    for secret in (None, 123, ["lst_" + "A" * 43], b"lst_" + b"A" * 43, bytearray(b"lst_")):
        error = await refused(
            TokenRejectedError,
            lambda s=secret: store.tokens.use(s),
            secret,
        )
        message = str(error)
        assert "A" * 43 not in message
        if secret is not None:
            assert repr(secret) not in message


async def test_issued_secret_is_never_quoted(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    # A real secret with a wrong prefix: the message must not leak the rest of it.
    wrong = "lsx_" + issued.secret[4:]
    with pytest.raises(TokenRejectedError) as info:
        await store.tokens.use(wrong)
    assert info.value.reason == "unknown"
    assert issued.secret[4:] not in str(info.value) + info.value.public_message
    with pytest.raises(TokenRejectedError) as info:
        await store.tokens.use(issued.secret.encode())  # type: ignore[arg-type]
    assert issued.secret[4:] not in str(info.value) + info.value.public_message


async def test_cache_hit_must_be_a_boolean(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    for bad in (1, "yes", None):
        with pytest.raises(ValidationError, match="cache_hit"):
            await store.tokens.use(issued.secret, cache_hit=bad)  # type: ignore[arg-type]
    assert await store.tokens.get(issued.token.id) == issued.token


@HYPOTHESIS
@given(
    quota=st.integers(min_value=1, max_value=20),
    attempts=st.integers(min_value=0, max_value=30),
    cache_hits=st.integers(min_value=0, max_value=3),
)
async def test_quota_is_exact_sequentially(
    store: Store, quota: int, attempts: int, cache_hits: int
) -> None:
    issued = await store.tokens.create((await new_project(store)).id, max_requests=quota)
    succeeded = 0
    for attempt in range(attempts):
        if attempt == quota:  # cache hits at the moment the quota runs out
            for _ in range(cache_hits):
                await store.tokens.use(issued.secret, cache_hit=True)
        if attempt >= quota:
            with pytest.raises(TokenRejectedError) as info:
                await store.tokens.use(issued.secret)
            assert info.value.reason == "quota_exhausted"
            continue
        used = await store.tokens.use(issued.secret)
        succeeded += 1
        assert used.request_count == succeeded
        assert used.remaining_requests == quota - succeeded
    token = await store.tokens.get(issued.token.id)
    assert succeeded == min(attempts, quota)
    assert token.request_count == min(attempts, quota)
    assert token.cache_hit_count == (cache_hits if attempts > quota else 0)


@pytest.mark.parametrize("quota", [1, 7])
async def test_concurrent_uses_never_overspend(store: Store, quota: int) -> None:
    issued = await store.tokens.create((await new_project(store)).id, max_requests=quota)
    results = await asyncio.gather(
        *(store.tokens.use(issued.secret) for _ in range(3 * quota)), return_exceptions=True
    )
    successes = [r for r in results if isinstance(r, Token)]
    refusals = [r for r in results if isinstance(r, TokenRejectedError)]
    assert len(successes) == quota
    assert len(refusals) == 2 * quota
    assert {r.reason for r in refusals} == {"quota_exhausted"}
    assert sorted(t.request_count for t in successes) == list(range(1, quota + 1))
    assert (await store.tokens.get(issued.token.id)).request_count == quota


async def test_concurrent_unlimited_uses_lose_no_update(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    calls = [store.tokens.use(issued.secret, cache_hit=i % 3 == 0) for i in range(30)]
    results = await asyncio.gather(*calls)
    assert all(isinstance(r, Token) for r in results)
    token = await store.tokens.get(issued.token.id)
    assert (token.request_count, token.cache_hit_count) == (20, 10)


# --- transactions -----------------------------------------------------------------------------


async def test_use_inside_a_transaction_commits(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, max_requests=2)
    async with store.transaction() as tx:
        used = await tx.tokens.use(issued.secret)
        assert used.request_count == 1
        assert (await tx.tokens.get(issued.token.id)).request_count == 1
    token = await store.tokens.get(issued.token.id)
    assert token.request_count == 1 and token.last_used_at == used.last_used_at


async def test_use_inside_a_failed_transaction_is_rolled_back(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, max_requests=1)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with store.transaction() as tx:
            assert (await tx.tokens.use(issued.secret)).request_count == 1
            assert (await tx.tokens.use(issued.secret, cache_hit=True)).cache_hit_count == 1
            with pytest.raises(TokenRejectedError) as info:
                await tx.tokens.use(issued.secret)
            assert info.value.reason == "quota_exhausted"
            raise Boom
    assert await store.tokens.get(issued.token.id) == issued.token
    assert (await store.tokens.use(issued.secret)).request_count == 1


async def test_a_refusal_does_not_doom_the_transaction(store: Store) -> None:
    project = await new_project(store)
    async with store.transaction() as tx:
        issued = await tx.tokens.create(project.id, max_requests=1, name="tx", actor="alice")
        await tx.tokens.use(issued.secret)
        with pytest.raises(TokenRejectedError):
            await tx.tokens.use(issued.secret)
        with pytest.raises(TokenRejectedError):
            await tx.tokens.use(_random_secret())
        await tx.tokens.update(issued.token.id, max_requests=5)
        assert (await tx.tokens.use(issued.secret)).request_count == 2
    token = await store.tokens.get(issued.token.id)
    assert (token.request_count, token.max_requests, token.name) == (2, 5, "tx")
    assert [e.action for e in await store.audit.list()] == ["token.create"]


async def test_store_tokens_inside_its_own_transaction_is_refused(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    async with store.transaction() as tx:
        with pytest.raises(TransactionError):
            await store.tokens.use(issued.secret)
        with pytest.raises(TransactionError):
            await store.tokens.get(issued.token.id)
        assert (await tx.tokens.get(issued.token.id)).request_count == 0
    assert (await store.tokens.get(issued.token.id)).request_count == 0
