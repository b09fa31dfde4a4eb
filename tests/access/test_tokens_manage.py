"""Tokens: list, update, deactivate, activate and delete, on every driver (single process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmstore import NotFoundError, Store, ValidationError
from tests.access.tokens_support import HYPOTHESIS, _rejected
from tests.helpers import every_page, new_project, now, refused

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
