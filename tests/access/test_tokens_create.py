"""Tokens: create, get and unique names, on every driver (single process)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

import pytest

from llmstore import ConflictError, IssuedToken, NotFoundError, Store, Token, ValidationError
from tests.helpers import new_project, now, refused

SHAPE = re.compile(r"lst_[A-Za-z0-9_-]{43}")


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
