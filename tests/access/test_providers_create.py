"""Provider credentials: create, get, list, resolve, and refused arguments, on every driver
(single process)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from llmstore import NotFoundError, ProviderCredential, Store, ValidationError
from tests.access.providers_support import GLOBAL, _active, _everything
from tests.helpers import every_page, new_project, refused

# --- create / get / list ----------------------------------------------------------------------


async def test_create_returns_a_frozen_record(store: Store) -> None:
    before = dt.datetime.now(dt.UTC)
    made = await store.providers.create(
        "openai", "gpt-4o", base_url="https://api.openai.com/v1", api_key="sk-one"
    )
    assert isinstance(made, ProviderCredential)
    assert (made.provider, made.model, made.base_url) == (
        "openai",
        "gpt-4o",
        "https://api.openai.com/v1",
    )
    assert made.project_id is None
    assert made.has_api_key is True
    assert made.is_active is True  # the first of its scope
    assert made.created_at == made.updated_at
    assert made.created_at.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=5) <= made.created_at <= dt.datetime.now(dt.UTC)
    assert await store.providers.get(made.id) == made
    assert await store.providers.get(str(made.id)) == made
    with pytest.raises(Exception, match="frozen"):
        made.model = "other"  # type: ignore[misc]
    keyless = await store.providers.create("ollama", "llama3")
    assert keyless.has_api_key is False and keyless.base_url is None


async def test_active_none_activates_only_the_first_of_a_scope(store: Store) -> None:
    first = await store.providers.create("openai", "gpt-4o")
    second = await store.providers.create("anthropic", "claude")
    assert first.is_active is True
    assert second.is_active is False
    assert await _active(store, GLOBAL) == [first.id]
    # An explicitly inactive first credential leaves the scope empty...
    project = await new_project(store)
    idle = await store.providers.create("openai", "gpt-4o", project_id=project.id, active=False)
    assert idle.is_active is False
    assert await _active(store, project.id) == []
    # ...so the next one with active=None becomes active.
    chosen = await store.providers.create("gemini", "flash", project_id=project.id)
    assert chosen.is_active is True
    assert await _active(store, project.id) == [chosen.id]
    assert await _active(store, GLOBAL) == [first.id]


async def test_active_true_switches_the_scope(store: Store) -> None:
    first = await store.providers.create("openai", "gpt-4o")
    second = await store.providers.create("anthropic", "claude", active=True)
    assert second.is_active is True
    assert await _active(store, GLOBAL) == [second.id]
    old = await store.providers.get(first.id)
    assert old.is_active is False
    assert old.updated_at >= first.updated_at
    third = await store.providers.create("gemini", "flash", active=False)
    assert third.is_active is False
    assert await _active(store, GLOBAL) == [second.id]


async def test_scopes_are_separate(store: Store) -> None:
    alpha = await new_project(store, "alpha")
    beta = await new_project(store, "beta")
    global_ = await store.providers.create("openai", "gpt-4o")
    in_alpha = await store.providers.create("anthropic", "claude", project_id=alpha.id)
    in_beta = await store.providers.create("anthropic", "claude", project_id=str(beta.id))
    assert (in_alpha.is_active, in_beta.is_active) == (True, True)
    assert in_alpha.project_id == alpha.id and in_beta.project_id == beta.id
    switched = await store.providers.create("gemini", "pro", project_id=alpha.id, active=True)
    assert await _active(store, alpha.id) == [switched.id]
    assert await _active(store, beta.id) == [in_beta.id]
    assert await _active(store, GLOBAL) == [global_.id]
    assert [c.id for c in await store.providers.list(project_id=alpha.id)] == sorted(
        [in_alpha.id, switched.id]
    )
    assert [c.id for c in await store.providers.list(project_id=beta.id)] == [in_beta.id]


async def test_list_pages_by_keyset(store: Store) -> None:
    project = await new_project(store)
    made = [await store.providers.create("openai", f"m{i}") for i in range(5)]
    for i in range(4):
        made.append(await store.providers.create("openai", f"p{i}", project_id=project.id))
    everything = await _everything(store)
    assert [c.id for c in everything] == sorted(c.id for c in made)
    assert await every_page(lambda after: store.providers.list(limit=2, after=after), 2) == (
        everything
    )
    assert await store.providers.list(limit=3, after=str(everything[2].id)) == everything[3:6]
    assert await store.providers.list(project_id=uuid.uuid4()) == []
    for limit in (0, -1, 1001, 2.5, True, "10"):
        await refused(ValidationError, lambda li=limit: store.providers.list(limit=li), limit)


async def test_create_for_an_unknown_project_is_not_found(store: Store) -> None:
    existing = await store.providers.create("openai", "gpt-4o")
    with pytest.raises(NotFoundError):
        await store.providers.create("openai", "gpt-4o", project_id=uuid.uuid4())
    with pytest.raises(NotFoundError):
        await store.providers.create(
            "openai", "gpt-4o", project_id=uuid.uuid4(), active=True, actor="admin"
        )
    assert await _everything(store) == [existing]
    assert await store.audit.list() == []


# --- resolve --------------------------------------------------------------------------------


async def test_resolve_prefers_the_project_then_the_global_default(store: Store) -> None:
    project = await new_project(store)
    other = await new_project(store)
    with pytest.raises(NotFoundError):
        await store.providers.resolve(project.id)
    idle_global = await store.providers.create("openai", "gpt-4o", active=False)
    with pytest.raises(NotFoundError):
        await store.providers.resolve(project.id)
    global_ = await store.providers.activate(idle_global.id)
    assert await store.providers.resolve(project.id) == global_
    own = await store.providers.create("anthropic", "claude", project_id=project.id)
    assert await store.providers.resolve(project.id) == own
    assert await store.providers.resolve(str(project.id)) == own
    assert await store.providers.resolve(other.id) == global_
    # Resolution does not look at other projects, nor need the project to exist.
    assert await store.providers.resolve(uuid.uuid4()) == global_
    await store.providers.deactivate(own.id)
    assert await store.providers.resolve(project.id) == global_
    await store.providers.deactivate(global_.id)
    with pytest.raises(NotFoundError):
        await store.providers.resolve(project.id)
    await store.providers.activate(own.id)
    assert (await store.providers.resolve(project.id)).id == own.id


# --- validation -----------------------------------------------------------------------------


BAD_PROVIDERS: list[Any] = [
    "OpenAI",
    "",
    " openai",
    "openai ",
    "1openai",
    "_openai",
    "-openai",
    "open ai",
    "open/ai",
    "ü",
    "a" * 51,
    "openai\n",
    None,
    42,
    b"openai",
]
BAD_URLS: list[Any] = [
    "",
    "   ",
    "ftp://example.com",
    "example.com",
    "localhost:8080",
    "http://",
    "https://",
    "http:// example.com",
    "https://exa mple.com/v1",
    "HTTPS//example.com",
    "file:///etc/passwd",
    "https://example.com/\n",
    "https://" + "a" * 2000,
    42,
]
BAD_MODELS: list[Any] = ["", "   ", "m" * 201, "tab\tmodel", None, 42]


async def test_bad_create_arguments_write_nothing(store: Store) -> None:
    cases: list[dict[str, Any]] = [
        *({"provider": bad, "model": "m"} for bad in BAD_PROVIDERS),
        *({"provider": "openai", "model": bad} for bad in BAD_MODELS),
        *({"provider": "openai", "model": "m", "base_url": bad} for bad in BAD_URLS),
        {"provider": "openai", "model": "m", "api_key": ""},
        {"provider": "openai", "model": "m", "api_key": " sk-padded "},
        {"provider": "openai", "model": "m", "api_key": 42},
        {"provider": "openai", "model": "m", "active": "yes"},
        {"provider": "openai", "model": "m", "active": 1},
        {"provider": "openai", "model": "m", "actor": ""},
    ]
    for kwargs in cases:
        await refused(ValidationError, lambda kw=kwargs: store.providers.create(**kw), kwargs)
    assert await _everything(store) == []
    assert await store.audit.list() == []


async def test_good_names_and_urls_are_accepted(store: Store) -> None:
    for provider in ("a", "a" * 50, "open.ai-v2_x", "x9"):
        assert (await store.providers.create(provider, "m")).provider == provider
    for url in (
        "http://localhost:11434/v1",
        "https://api.openai.com/v1",
        "https://user@host.example:8443/path?q=1#f",
        "http://[::1]:8080",
        "https://" + "a" * 1992,
    ):
        assert (await store.providers.create("openai", "m", base_url=url)).base_url == url
    made = await store.providers.create("openai", "m" * 200)
    assert (await store.providers.get(made.id)).model == "m" * 200
