"""Provider credentials: update, delete and reveal_api_key (encrypted at rest), on every
driver (single process)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from llmstore import NotFoundError, Store, ValidationError
from llmstore._db.schema import provider_credentials as table
from llmstore.pytest_plugin import run_sql
from tests.access.providers_support import _everything
from tests.helpers import column_value, new_project, refused


async def test_update_each_field(store: Store) -> None:
    made = await store.providers.create(
        "openai", "gpt-4o", base_url="https://a.example/v1", api_key="sk-one"
    )
    renamed = await store.providers.update(made.id, provider="azure")
    assert (renamed.provider, renamed.model) == ("azure", "gpt-4o")
    remodelled = await store.providers.update(made.id, model="gpt-5")
    assert remodelled.model == "gpt-5"
    moved = await store.providers.update(made.id, base_url="http://b.example:8080/v1")
    assert moved.base_url == "http://b.example:8080/v1"
    rekeyed = await store.providers.update(made.id, api_key="sk-two")
    assert rekeyed.has_api_key is True
    assert await store.providers.reveal_api_key(made.id) == "sk-two"
    cleared = await store.providers.update(made.id, base_url=None, api_key=None)
    assert (cleared.base_url, cleared.has_api_key) == (None, False)
    assert await store.providers.reveal_api_key(made.id) is None
    assert await column_value(store, table.c.api_key_encrypted, made.id) is None
    assert cleared.is_active is True  # update never switches
    assert cleared.created_at == made.created_at
    assert cleared.updated_at >= made.updated_at
    assert await store.providers.get(made.id) == cleared


async def test_update_needs_a_change_and_validates_it(store: Store) -> None:
    made = await store.providers.create("openai", "gpt-4o", api_key="sk-keep")
    with pytest.raises(ValidationError, match="at least one"):
        await store.providers.update(made.id)
    with pytest.raises(ValidationError, match="at least one"):
        await store.providers.update(made.id, actor="admin")
    cases: list[dict[str, Any]] = [
        {"provider": "Open AI"},
        {"provider": None},
        {"model": ""},
        {"model": None},
        {"base_url": "not a url"},
        {"api_key": ""},
        {"api_key": "sk-x\n"},
        {"model": "fine", "base_url": "javascript:alert(1)"},
        {"model": "fine", "actor": ""},
    ]
    for kwargs in cases:
        await refused(
            ValidationError, lambda kw=kwargs: store.providers.update(made.id, **kw), kwargs
        )
    assert await store.providers.get(made.id) == made
    assert await store.providers.reveal_api_key(made.id) == "sk-keep"
    assert await store.audit.list() == []


async def test_delete(store: Store) -> None:
    project = await new_project(store)
    global_ = await store.providers.create("openai", "gpt-4o")
    local = await store.providers.create("anthropic", "claude", project_id=project.id)
    assert await store.providers.resolve(project.id) == local
    await store.providers.delete(local.id)
    with pytest.raises(NotFoundError):
        await store.providers.get(local.id)
    with pytest.raises(NotFoundError):
        await store.providers.delete(local.id)
    assert await store.providers.resolve(project.id) == global_
    assert await _everything(store) == [global_]
    # The scope is empty again: the next credential becomes active.
    assert (await store.providers.create("gemini", "pro", project_id=project.id)).is_active


async def test_unknown_ids_are_not_found(store: Store) -> None:
    existing = await store.providers.create("openai", "gpt-4o")
    missing = uuid.uuid4()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.providers.get(missing),
        lambda: store.providers.update(missing, model="x"),
        lambda: store.providers.activate(missing),
        lambda: store.providers.deactivate(missing),
        lambda: store.providers.delete(missing),
        lambda: store.providers.reveal_api_key(missing),
        lambda: store.providers.update(missing, model="x", actor="admin"),
        lambda: store.providers.activate(missing, actor="admin"),
        lambda: store.providers.deactivate(missing, actor="admin"),
        lambda: store.providers.delete(missing, actor="admin"),
    ]
    for number, call in enumerate(calls):
        await refused(NotFoundError, call, number)
    assert await _everything(store) == [existing]
    assert await store.audit.list() == []


@pytest.mark.parametrize("bad_id", ["not-a-uuid", 123, "", b"\x00" * 16])
async def test_malformed_ids_are_validation_errors(store: Store, bad_id: Any) -> None:
    existing = await store.providers.create("openai", "gpt-4o")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.providers.get(bad_id),
        lambda: store.providers.update(bad_id, model="x"),
        lambda: store.providers.activate(bad_id),
        lambda: store.providers.deactivate(bad_id),
        lambda: store.providers.delete(bad_id),
        lambda: store.providers.reveal_api_key(bad_id),
        lambda: store.providers.resolve(bad_id),
        lambda: store.providers.list(project_id=bad_id),
        lambda: store.providers.list(after=bad_id),
        lambda: store.providers.create("openai", "m", project_id=bad_id),
        lambda: store.providers.activate(bad_id, actor="admin"),
    ]
    for number, call in enumerate(calls):
        await refused(ValidationError, call, number)
    with pytest.raises(ValidationError):
        await store.providers.get(None)  # type: ignore[arg-type]
    assert await _everything(store) == [existing]
    assert await store.audit.list() == []


async def test_reveal_api_key_and_encryption_at_rest(store: Store) -> None:
    secret = "sk-provider-" + uuid.uuid4().hex
    made = await store.providers.create("openai", "gpt-4o", api_key=secret)
    assert secret not in repr(made)
    assert secret not in made.model_dump_json()
    stored = await column_value(store, table.c.api_key_encrypted, made.id)
    assert stored is not None
    assert secret not in stored
    assert stored.startswith("gAAAAA")  # a Fernet token
    assert await store.providers.reveal_api_key(made.id) == secret
    assert await store.providers.reveal_api_key(str(made.id)) == secret
    keyless = await store.providers.create("ollama", "llama3")
    assert await store.providers.reveal_api_key(keyless.id) is None
    defaulted = await store.providers.ensure_default("azure", "gpt-4o", secret + "-2")
    default_stored = await column_value(store, table.c.api_key_encrypted, defaulted.id)
    assert default_stored is not None and secret not in default_stored
    assert await store.providers.reveal_api_key(defaulted.id) == secret + "-2"
    dump = await run_sql(store, lambda conn: repr(conn.execute(sa.select(table)).all()))
    assert "gpt-4o" in dump
    assert secret not in dump
