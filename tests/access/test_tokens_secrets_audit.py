"""Tokens: secrets at rest (never stored nor shown) and audited mutations, on every driver
(single process)."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from llmstore import ConflictError, NotFoundError, Store, TokenRejectedError, generate_key
from llmstore._db.schema import tokens as tokens_table
from llmstore.pytest_plugin import run_sql
from tests.helpers import column_value, new_project

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
