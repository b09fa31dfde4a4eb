"""The tokens repository, on every driver (single process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmstore import (
    ConflictError,
    IssuedToken,
    NotFoundError,
    Store,
    Token,
    TokenRejectedError,
    TransactionError,
    ValidationError,
    generate_key,
)
from llmstore._db.schema import tokens as tokens_table
from llmstore.pytest_plugin import run_sql
from tests.helpers import column_value, every_page, new_project, now, refused

SHAPE = re.compile(r"lst_[A-Za-z0-9_-]{43}")
HYPOTHESIS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _random_secret() -> str:
    """A well-shaped secret that no store ever issued."""
    return "lst_" + secrets.token_urlsafe(32)


async def _rejected(store: Store, secret: str, reason: str, *, cache_hit: bool = False) -> None:
    """use() refuses ``secret`` for ``reason`` and changes no token."""
    before = await store.tokens.list(limit=1000)
    with pytest.raises(TokenRejectedError) as info:
        await store.tokens.use(secret, cache_hit=cache_hit)
    assert info.value.reason == reason
    assert secret not in str(info.value)
    assert await store.tokens.list(limit=1000) == before


# --- create / get -------------------------------------------------------------------------


async def test_create_issues_a_secret_once_and_a_fresh_token(store: Store) -> None:
    project = await new_project(store)
    before = now()
    issued = await store.tokens.create(project.id)
    assert isinstance(issued, IssuedToken)
    token = issued.token
    assert isinstance(token, Token)
    assert SHAPE.fullmatch(issued.secret)
    assert token.prefix == issued.secret[:12]
    assert token.project_id == project.id
    assert token.name is None
    assert token.expires_at is None
    assert token.max_requests is None
    assert token.remaining_requests is None
    assert token.is_active is True
    assert token.deactivated_at is None
    assert (token.request_count, token.cache_hit_count) == (0, 0)
    assert token.last_used_at is None
    assert token.created_at.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=5) <= token.created_at <= now()
    assert await store.tokens.get(token.id) == token
    assert await store.tokens.get(str(token.id)) == token
    other = await store.tokens.create(project.id)
    assert other.secret != issued.secret
    assert other.token.id != token.id


async def test_create_with_every_field(store: Store) -> None:
    project = await new_project(store)
    expires = (now() + dt.timedelta(days=3)).astimezone(dt.timezone(dt.timedelta(hours=5)))
    issued = await store.tokens.create(
        str(project.id), expires_at=expires, max_requests=7, name="ci ☃"
    )
    token = await store.tokens.get(issued.token.id)
    assert token == issued.token
    assert token.expires_at == expires  # the same instant...
    assert token.expires_at is not None and token.expires_at.utcoffset() == dt.timedelta(0)
    assert token.max_requests == 7
    assert token.remaining_requests == 7
    assert token.name == "ci ☃"


async def test_create_accepts_the_boundaries(store: Store) -> None:
    project = await new_project(store)
    biggest = await store.tokens.create(project.id, max_requests=2**63 - 1, name="n" * 200)
    assert biggest.token.name == "n" * 200
    used = await store.tokens.use(biggest.secret)
    assert used.request_count == 1
    assert used.remaining_requests == 2**63 - 2
    assert (await store.tokens.get(biggest.token.id)).max_requests == 2**63 - 1
    one = await store.tokens.create(project.id, max_requests=1)
    assert (await store.tokens.use(one.secret)).remaining_requests == 0


async def test_create_for_an_unknown_project_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.tokens.create(uuid.uuid4())
    with pytest.raises(NotFoundError):
        await store.tokens.create(uuid.uuid4(), actor="admin")
    assert await store.tokens.list() == []
    assert await store.audit.list() == []


BAD_CREATE: list[dict[str, Any]] = [
    {"expires_at": dt.datetime(2100, 1, 1)},  # naive
    {"expires_at": "2100-01-01T00:00:00+00:00"},
    {"expires_at": 4102444800},
    {"max_requests": 0},
    {"max_requests": -1},
    {"max_requests": True},
    {"max_requests": False},
    {"max_requests": 1.5},
    {"max_requests": 3.0},
    {"max_requests": "3"},
    {"max_requests": 2**63},
    {"name": ""},
    {"name": "   "},
    {"name": "x" * 201},
    {"name": "tab\there"},
    {"name": "nul\x00"},
    {"name": 42},
    {"name": b"bytes"},
    {"actor": ""},
    {"actor": 7},
]


async def test_bad_create_arguments_write_nothing(store: Store) -> None:
    project = await new_project(store)
    for kwargs in BAD_CREATE:
        await refused(
            ValidationError, lambda kw=kwargs: store.tokens.create(project.id, **kw), kwargs
        )
    assert await store.tokens.list() == []
    assert await store.audit.list() == []


BAD_IDS: list[Any] = ["not-a-uuid", 123, None, "", b"\x00" * 16, 1.5]


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_malformed_ids_are_validation_errors(store: Store, bad_id: Any) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    with pytest.raises(ValidationError, match="token id"):
        await store.tokens.get(bad_id)
    with pytest.raises(ValidationError, match="token id"):
        await store.tokens.update(bad_id, name="x")
    for operation in ("deactivate", "activate", "delete"):
        with pytest.raises(ValidationError, match="token id"):
            await getattr(store.tokens, operation)(bad_id)
        with pytest.raises(ValidationError, match="token id"):
            await getattr(store.tokens, operation)(bad_id, actor="admin")
    with pytest.raises(ValidationError, match="project id"):
        await store.tokens.create(bad_id)
    if bad_id is not None:  # None means "no filter" for list()
        with pytest.raises(ValidationError, match="project id"):
            await store.tokens.list(project_id=bad_id)
        with pytest.raises(ValidationError, match="after"):
            await store.tokens.list(after=bad_id)
    assert await store.tokens.list() == [issued.token]
    assert await store.audit.list() == []


async def test_unknown_ids_are_not_found(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    missing = uuid.uuid4()
    with pytest.raises(NotFoundError):
        await store.tokens.get(missing)
    with pytest.raises(NotFoundError):
        await store.tokens.update(missing, name="x")
    with pytest.raises(NotFoundError):
        await store.tokens.update(missing, max_requests=None, actor="admin")
    for operation in ("deactivate", "activate", "delete"):
        with pytest.raises(NotFoundError):
            await getattr(store.tokens, operation)(missing)
        with pytest.raises(NotFoundError):
            await getattr(store.tokens, operation)(missing, actor="admin")
    assert await store.tokens.list() == [issued.token]
    assert await store.audit.list() == []


# --- names ----------------------------------------------------------------------------------


async def test_token_names_are_unique_per_project(store: Store) -> None:
    first = await new_project(store, "first")
    second = await new_project(store, "second")
    one = await store.tokens.create(first.id, name="ci")
    with pytest.raises(ConflictError):
        await store.tokens.create(first.id, name="ci")
    with pytest.raises(ConflictError):
        await store.tokens.create(first.id, name="ci", actor="admin")
    elsewhere = await store.tokens.create(second.id, name="ci")
    assert elsewhere.token.name == "ci"
    # Any number of unnamed tokens.
    unnamed = [await store.tokens.create(first.id) for _ in range(3)]
    listed = await store.tokens.list(limit=1000)
    assert {t.id for t in listed} == {one.token.id, elsewhere.token.id} | {
        u.token.id for u in unnamed
    }
    assert await store.audit.list() == []


async def test_renaming_onto_a_taken_name_is_a_conflict(store: Store) -> None:
    project = await new_project(store)
    await store.tokens.create(project.id, name="taken")
    other = await store.tokens.create(project.id, name="free")
    with pytest.raises(ConflictError):
        await store.tokens.update(other.token.id, name="taken")
    with pytest.raises(ConflictError):
        await store.tokens.update(other.token.id, name="taken", actor="admin")
    assert await store.tokens.get(other.token.id) == other.token
    assert await store.audit.list() == []
    # Freeing the name makes it available again.
    renamed = await store.tokens.update(other.token.id, name=None)
    again = await store.tokens.create(project.id, name="free")
    assert renamed.name is None and again.token.name == "free"


# --- list -----------------------------------------------------------------------------------


async def test_list_filters_and_pages(store: Store) -> None:
    alpha = await new_project(store, "alpha")
    beta = await new_project(store, "beta")
    made_alpha = [(await store.tokens.create(alpha.id)).token for _ in range(8)]
    made_beta = [(await store.tokens.create(beta.id)).token for _ in range(5)]
    for token in made_alpha[::3] + made_beta[:1]:
        await store.tokens.deactivate(token.id)
    everything = await store.tokens.list(limit=1000)
    assert [t.id for t in everything] == sorted(t.id for t in made_alpha + made_beta)
    only_alpha = await store.tokens.list(project_id=alpha.id)
    assert [t.id for t in only_alpha] == sorted(t.id for t in made_alpha)
    assert [t.id for t in await store.tokens.list(project_id=str(beta.id))] == sorted(
        t.id for t in made_beta
    )
    inactive = await store.tokens.list(active=False)
    assert {t.id for t in inactive} == {t.id for t in made_alpha[::3] + made_beta[:1]}
    assert not any(t.is_active for t in inactive)
    active_alpha = await store.tokens.list(project_id=alpha.id, active=True)
    assert {t.id for t in active_alpha} == {t.id for t in made_alpha} - {
        t.id for t in made_alpha[::3]
    }
    assert all(t.is_active and t.project_id == alpha.id for t in active_alpha)
    assert await store.tokens.list(project_id=uuid.uuid4()) == []
    assert await every_page(lambda after: store.tokens.list(limit=3, after=after), 3) == everything
    assert await store.tokens.list(limit=2, after=str(everything[1].id)) == everything[2:4]


async def test_list_is_in_creation_order_even_within_one_millisecond(store: Store) -> None:
    # The README promises creation order; ids are compared, so ids must be monotonic.
    project = await new_project(store)
    made = [(await store.tokens.create(project.id)).token.id for _ in range(60)]
    assert [t.id for t in await store.tokens.list(limit=1000)] == made


@pytest.mark.parametrize("limit", [0, -1, 1001, 2.5, True, "10", None])
async def test_list_refuses_bad_limits(store: Store, limit: Any) -> None:
    with pytest.raises(ValidationError, match="limit"):
        await store.tokens.list(limit=limit)


async def test_list_refuses_a_non_boolean_active(store: Store) -> None:
    with pytest.raises(ValidationError, match="active"):
        await store.tokens.list(active="yes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="active"):
        await store.tokens.list(active=1)  # type: ignore[arg-type]


@HYPOTHESIS
@given(count=st.integers(min_value=0, max_value=12), page=st.integers(min_value=1, max_value=6))
async def test_pages_cover_every_token_once(store: Store, count: int, page: int) -> None:
    for existing in await store.tokens.list(limit=1000):
        await store.tokens.delete(existing.id)
    project = await new_project(store)
    created = [(await store.tokens.create(project.id)).token for _ in range(count)]
    seen: list[uuid.UUID] = []
    after: uuid.UUID | None = None
    pages = 0
    while batch := await store.tokens.list(limit=page, after=after):
        assert 1 <= len(batch) <= page
        seen.extend(t.id for t in batch)
        after = batch[-1].id
        pages += 1
    assert seen == sorted(t.id for t in created)
    assert pages == -(-count // page)


# --- update ---------------------------------------------------------------------------------


async def test_update_each_field_and_none_semantics(store: Store) -> None:
    project = await new_project(store)
    issued = await store.tokens.create(project.id, name="orig")
    token_id = issued.token.id
    expires = now() + dt.timedelta(hours=1)

    with_expiry = await store.tokens.update(token_id, expires_at=expires)
    assert with_expiry.expires_at == expires
    assert (with_expiry.name, with_expiry.max_requests) == ("orig", None)

    with_quota = await store.tokens.update(token_id, max_requests=4)
    assert with_quota.max_requests == 4 and with_quota.remaining_requests == 4
    assert with_quota.expires_at == expires

    renamed = await store.tokens.update(token_id, name="renamed")
    assert renamed.name == "renamed"
    assert (renamed.expires_at, renamed.max_requests) == (expires, 4)
    assert await store.tokens.get(token_id) == renamed

    cleared = await store.tokens.update(token_id, expires_at=None, max_requests=None, name=None)
    assert (cleared.expires_at, cleared.max_requests, cleared.name) == (None, None, None)
    assert cleared.remaining_requests is None
    assert await store.tokens.get(token_id) == cleared
    # Untouched fields stay as they were.
    assert cleared.created_at == issued.token.created_at
    assert cleared.prefix == issued.token.prefix
    assert cleared.is_active is True


async def test_update_needs_a_change(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, name="stable")
    with pytest.raises(ValidationError, match="at least one"):
        await store.tokens.update(issued.token.id)
    with pytest.raises(ValidationError, match="at least one"):
        await store.tokens.update(issued.token.id, actor="admin")
    assert await store.tokens.get(issued.token.id) == issued.token
    assert await store.audit.list() == []


BAD_UPDATE: list[dict[str, Any]] = [
    {"expires_at": dt.datetime(2100, 1, 1)},
    {"expires_at": "tomorrow"},
    {"max_requests": 0},
    {"max_requests": -1},
    {"max_requests": True},
    {"max_requests": 1.5},
    {"max_requests": "3"},
    {"max_requests": 2**63},
    {"name": ""},
    {"name": "x" * 201},
    {"name": 42},
    # One bad field spoils the whole update.
    {"name": "fine", "max_requests": 0},
    {"name": "fine", "actor": ""},
]


async def test_bad_update_arguments_change_nothing(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, max_requests=3, name="keep")
    for kwargs in BAD_UPDATE:
        await refused(
            ValidationError,
            lambda kw=kwargs: store.tokens.update(issued.token.id, **kw),
            kwargs,
        )
    assert await store.tokens.get(issued.token.id) == issued.token
    assert await store.audit.list() == []


async def test_lowering_and_raising_the_quota(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    for _ in range(3):
        await store.tokens.use(issued.secret)
    lowered = await store.tokens.update(issued.token.id, max_requests=2)
    assert lowered.request_count == 3
    assert lowered.remaining_requests == 0
    await _rejected(store, issued.secret, "quota_exhausted")
    raised = await store.tokens.update(issued.token.id, max_requests=4)
    assert raised.remaining_requests == 1
    assert (await store.tokens.use(issued.secret)).request_count == 4
    await _rejected(store, issued.secret, "quota_exhausted")
    await store.tokens.update(issued.token.id, max_requests=None)
    assert (await store.tokens.use(issued.secret)).request_count == 5


# --- deactivate / activate / delete ---------------------------------------------------------


async def test_deactivate_keeps_the_first_date_and_activate_clears_it(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id)
    before = now()
    off = await store.tokens.deactivate(issued.token.id)
    assert off.is_active is False
    assert off.deactivated_at is not None
    assert before - dt.timedelta(seconds=5) <= off.deactivated_at <= now()
    await asyncio.sleep(0.01)
    again = await store.tokens.deactivate(issued.token.id)
    assert again.deactivated_at == off.deactivated_at
    assert await store.tokens.get(issued.token.id) == again
    await _rejected(store, issued.secret, "inactive")
    await _rejected(store, issued.secret, "inactive", cache_hit=True)
    on = await store.tokens.activate(issued.token.id)
    assert on.is_active is True and on.deactivated_at is None
    assert await store.tokens.activate(issued.token.id) == on  # idempotent
    assert (await store.tokens.use(issued.secret)).request_count == 1


async def test_delete(store: Store) -> None:
    project = await new_project(store)
    doomed = await store.tokens.create(project.id, name="doomed")
    kept = await store.tokens.create(project.id)
    await store.tokens.delete(doomed.token.id)
    with pytest.raises(NotFoundError):
        await store.tokens.get(doomed.token.id)
    with pytest.raises(NotFoundError):
        await store.tokens.delete(doomed.token.id)
    await _rejected(store, doomed.secret, "unknown")
    assert await store.tokens.list() == [kept.token]
    # Its name is free again.
    assert (await store.tokens.create(project.id, name="doomed")).token.name == "doomed"


async def test_deleting_the_project_deletes_its_tokens(store: Store) -> None:
    doomed = await new_project(store, "doomed")
    kept = await new_project(store, "kept")
    gone = [await store.tokens.create(doomed.id, name=f"t{i}") for i in range(3)]
    survivor = await store.tokens.create(kept.id)
    await store.projects.delete(doomed.id)
    for issued in gone:
        with pytest.raises(NotFoundError):
            await store.tokens.get(issued.token.id)
        await _rejected(store, issued.secret, "unknown")
    assert await store.tokens.list(project_id=doomed.id) == []
    assert await store.tokens.list() == [survivor.token]
    assert (await store.tokens.use(survivor.secret)).request_count == 1


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


# --- secrets at rest --------------------------------------------------------------------------


async def test_secret_is_never_in_records_or_reprs(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, name="visible")
    secret = issued.secret
    hidden = secret[12:]  # everything past the display prefix
    for text in (
        repr(issued),
        str(issued),
        repr(issued.token),
        str(issued.token),
        repr(issued.token.model_dump()),
        issued.token.model_dump_json(),
        repr(await store.tokens.get(issued.token.id)),
        repr(await store.tokens.use(issued.secret)),
    ):
        assert secret not in text
        assert hidden not in text
    assert "visible" in repr(issued)
    dump = await run_sql(store, lambda conn: repr(conn.execute(sa.select(tokens_table)).all()))
    assert issued.token.prefix in dump
    assert hidden not in dump


async def test_stored_digest_is_sha256_of_the_secret(store: Store) -> None:
    assert store.config.token_pepper is None
    issued = await store.tokens.create((await new_project(store)).id)
    digest = await column_value(store, tokens_table.c.secret_digest, issued.token.id)
    assert digest == hashlib.sha256(issued.secret.encode()).hexdigest()


async def test_a_peppered_store_stores_an_hmac(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pepper.db'}"
    pepper = "x" * 32
    key = generate_key()
    plain = Store.from_url(url, encryption_keys=key, token_pepper=None, auto_upgrade=True)
    async with plain:
        project = await plain.projects.create("p")
        unpeppered = await plain.tokens.create(project.id)
        assert await column_value(plain, tokens_table.c.secret_digest, unpeppered.token.id) == (
            hashlib.sha256(unpeppered.secret.encode()).hexdigest()
        )
    async with Store.from_url(url, encryption_keys=key, token_pepper=pepper) as peppered:
        issued = await peppered.tokens.create(project.id)
        digest = await column_value(peppered, tokens_table.c.secret_digest, issued.token.id)
        assert digest == hmac.new(pepper.encode(), issued.secret.encode(), "sha256").hexdigest()
        assert digest != hashlib.sha256(issued.secret.encode()).hexdigest()
        assert (await peppered.tokens.use(issued.secret)).request_count == 1
        # A token digested without the pepper cannot be found under it.
        with pytest.raises(TokenRejectedError) as info:
            await peppered.tokens.use(unpeppered.secret)
        assert info.value.reason == "unknown"
    async with Store.from_url(url, encryption_keys=key, token_pepper="y" * 32) as other:
        with pytest.raises(TokenRejectedError) as info:
            await other.tokens.use(issued.secret)
        assert info.value.reason == "unknown"
    async with Store.from_url(url, encryption_keys=key, token_pepper=None) as plain_again:
        assert (await plain_again.tokens.use(unpeppered.secret)).request_count == 1
        with pytest.raises(TokenRejectedError) as info:
            await plain_again.tokens.use(issued.secret)
        assert info.value.reason == "unknown"


# --- audit ----------------------------------------------------------------------------------


async def test_actor_writes_one_audit_event_per_mutation(store: Store) -> None:
    project = await new_project(store)
    issued = await store.tokens.create(project.id, name="audited", actor="alice")
    token_id = issued.token.id
    steps: list[tuple[str, Callable[[], Awaitable[object]] | None]] = [
        ("token.create", None),
        ("token.update", lambda: store.tokens.update(token_id, max_requests=9, actor="bob")),
        ("token.deactivate", lambda: store.tokens.deactivate(token_id, actor="carol")),
        ("token.activate", lambda: store.tokens.activate(token_id, actor="dave")),
        ("token.delete", lambda: store.tokens.delete(token_id, actor="erin")),
    ]
    actors = ["alice", "bob", "carol", "dave", "erin"]
    for count, ((action, call), actor) in enumerate(zip(steps, actors, strict=True), start=1):
        if call is not None:
            await call()
        events = await store.audit.list()
        assert len(events) == count
        newest = events[0]
        assert newest.seq == count
        assert (newest.action, newest.actor, newest.outcome) == (action, actor, "success")
        assert newest.project_id == project.id
        assert newest.token_id == token_id
    assert (await store.audit.verify()).ok


async def test_without_actor_nothing_is_audited(store: Store) -> None:
    project = await new_project(store)
    issued = await store.tokens.create(project.id)
    await store.tokens.update(issued.token.id, name="n")
    await store.tokens.deactivate(issued.token.id)
    await store.tokens.activate(issued.token.id)
    await store.tokens.use(issued.secret)
    await store.tokens.use(issued.secret, cache_hit=True)
    await store.tokens.delete(issued.token.id)
    assert await store.audit.list() == []


async def test_a_failed_mutation_with_actor_writes_no_event(store: Store) -> None:
    issued = await store.tokens.create((await new_project(store)).id, name="one", actor="alice")
    taken = await store.tokens.create(issued.token.project_id, name="two")
    assert len(await store.audit.list()) == 1
    missing = uuid.uuid4()
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: store.tokens.update(missing, name="x", actor="mallory"),
        lambda: store.tokens.deactivate(missing, actor="mallory"),
        lambda: store.tokens.activate(missing, actor="mallory"),
        lambda: store.tokens.delete(missing, actor="mallory"),
        lambda: store.tokens.create(uuid.uuid4(), actor="mallory"),
    ]
    for attempt in attempts:
        with pytest.raises(NotFoundError):
            await attempt()
    with pytest.raises(ConflictError):
        await store.tokens.update(taken.token.id, name="one", actor="mallory")
    events = await store.audit.list()
    assert [e.action for e in events] == ["token.create"]
    assert await store.audit.list(actor="mallory") == []
    assert (await store.tokens.get(taken.token.id)).name == "two"


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
