"""The projects repository, on every driver."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmstore import (
    ConfigError,
    ConflictError,
    NotFoundError,
    Project,
    Store,
    ValidationError,
)
from llmstore._db.schema import projects
from llmstore.pytest_plugin import run_sql
from tests.helpers import column_value


async def test_create_returns_a_frozen_record(store: Store) -> None:
    before = dt.datetime.now(dt.UTC)
    project = await store.projects.create("alpha")
    assert isinstance(project, Project)
    assert project.name == "alpha"
    assert project.is_active is True
    assert project.has_api_key is False
    assert project.deactivated_at is None
    assert project.created_at.tzinfo is not None
    assert project.created_at.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=5) <= project.created_at <= dt.datetime.now(dt.UTC)
    with pytest.raises(Exception, match="frozen"):
        project.name = "other"  # type: ignore[misc]


async def test_get_and_get_by_name_round_trip(store: Store) -> None:
    created = await store.projects.create("beta ☃ ünïcode")
    assert await store.projects.get(created.id) == created
    assert await store.projects.get(str(created.id)) == created
    assert await store.projects.get_by_name("beta ☃ ünïcode") == created


async def test_unknown_ids_and_names_are_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.projects.get(uuid.uuid4())
    with pytest.raises(NotFoundError):
        await store.projects.get_by_name("nobody")
    for operation in ("deactivate", "activate", "delete", "reveal_api_key"):
        with pytest.raises(NotFoundError):
            await getattr(store.projects, operation)(uuid.uuid4())
    with pytest.raises(NotFoundError):
        await store.projects.update(uuid.uuid4(), name="x")


async def test_duplicate_name_is_a_conflict_and_writes_nothing(store: Store) -> None:
    await store.projects.create("dup")
    with pytest.raises(ConflictError):
        await store.projects.create("dup")
    assert [p.name for p in await store.projects.list()] == ["dup"]


async def test_renaming_onto_an_existing_name_is_a_conflict(store: Store) -> None:
    await store.projects.create("one")
    two = await store.projects.create("two")
    with pytest.raises(ConflictError):
        await store.projects.update(two.id, name="one")
    assert (await store.projects.get(two.id)).name == "two"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 201, "limit is 200"),
        ("tab\there", "control"),
        (42, "must be a string"),
        (None, "must be a string"),
        (b"bytes", "must be a string"),
    ],
)
async def test_bad_names_are_refused_before_writing(
    store: Store, name: object, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        await store.projects.create(name)  # type: ignore[arg-type]
    assert await store.projects.list() == []


async def test_name_of_exactly_the_limit_is_accepted(store: Store) -> None:
    project = await store.projects.create("n" * 200)
    assert (await store.projects.get(project.id)).name == "n" * 200


@pytest.mark.parametrize("bad_id", ["not-a-uuid", 123, None, ""])
async def test_malformed_ids_are_validation_errors(store: Store, bad_id: object) -> None:
    with pytest.raises(ValidationError, match="project id"):
        await store.projects.get(bad_id)  # type: ignore[arg-type]


async def test_api_key_is_encrypted_at_rest_and_never_in_records(store: Store) -> None:
    secret = "sk-live-" + uuid.uuid4().hex
    project = await store.projects.create("keyed", api_key=secret)
    assert project.has_api_key is True
    assert secret not in repr(project)
    assert secret not in project.model_dump_json()
    stored = await column_value(store, projects.c.api_key_encrypted, project.id)
    assert stored is not None
    assert secret not in stored
    assert stored.startswith("gAAAAA")  # a Fernet token
    assert await store.projects.reveal_api_key(project.id) == secret


async def test_update_replaces_and_removes_the_api_key(store: Store) -> None:
    project = await store.projects.create("rotating", api_key="first-key")
    updated = await store.projects.update(project.id, api_key="second-key")
    assert updated.has_api_key is True
    assert updated.updated_at >= project.updated_at
    assert await store.projects.reveal_api_key(project.id) == "second-key"
    cleared = await store.projects.update(project.id, api_key=None)
    assert cleared.has_api_key is False
    assert await store.projects.reveal_api_key(project.id) is None
    assert await column_value(store, projects.c.api_key_encrypted, project.id) is None


async def test_update_needs_a_change_and_validates_it(store: Store) -> None:
    project = await store.projects.create("stable")
    with pytest.raises(ValidationError, match="at least one"):
        await store.projects.update(project.id)
    with pytest.raises(ValidationError):
        await store.projects.update(project.id, name="")
    with pytest.raises(ValidationError):
        await store.projects.update(project.id, api_key="  padded  ")
    assert await store.projects.get(project.id) == project


async def test_deactivate_and_activate(store: Store) -> None:
    project = await store.projects.create("switch")
    off = await store.projects.deactivate(project.id)
    assert off.is_active is False
    assert off.deactivated_at is not None
    again = await store.projects.deactivate(project.id)
    assert again.deactivated_at == off.deactivated_at  # the first date is kept
    on = await store.projects.activate(project.id)
    assert on.is_active is True
    assert on.deactivated_at is None


async def test_delete(store: Store) -> None:
    project = await store.projects.create("doomed")
    await store.projects.delete(project.id)
    with pytest.raises(NotFoundError):
        await store.projects.get(project.id)
    with pytest.raises(NotFoundError):
        await store.projects.delete(project.id)


async def test_list_filters_and_pages_by_keyset(store: Store) -> None:
    made = [await store.projects.create(f"p{i:02d}") for i in range(25)]
    for project in made[::3]:
        await store.projects.deactivate(project.id)
    everything = await store.projects.list(limit=1000)
    assert [p.id for p in everything] == sorted(p.id for p in made)
    seen: list[Project] = []
    after = None
    while True:
        page = await store.projects.list(limit=7, after=after)
        if not page:
            break
        assert len(page) <= 7
        seen.extend(page)
        after = page[-1].id
    assert [p.id for p in seen] == [p.id for p in everything]
    active = await store.projects.list(active=True, limit=1000)
    inactive = await store.projects.list(active=False, limit=1000)
    assert len(inactive) == len(made[::3])
    assert {p.id for p in active} | {p.id for p in inactive} == {p.id for p in made}
    assert all(p.is_active for p in active) and not any(p.is_active for p in inactive)


@pytest.mark.parametrize("limit", [0, -1, 1001, 2.5, True, "10"])
async def test_list_refuses_bad_limits(store: Store, limit: object) -> None:
    with pytest.raises(ValidationError, match="limit"):
        await store.projects.list(limit=limit)  # type: ignore[arg-type]


async def test_list_refuses_a_non_boolean_active(store: Store) -> None:
    with pytest.raises(ValidationError, match="active"):
        await store.projects.list(active="yes")  # type: ignore[arg-type]


async def test_storing_a_key_without_encryption_keys_is_a_config_error(tmp_path: object) -> None:
    async with Store.from_url("sqlite:///:memory:", encryption_keys=()) as plain:
        with pytest.raises(ConfigError, match="LLMSTORE_ENCRYPTION_KEYS"):
            await plain.projects.create("keyless", api_key="sk-secret")
        assert await plain.projects.list() == []
        project = await plain.projects.create("no key needed")
        assert project.has_api_key is False


async def test_allow_plaintext_secrets_stores_a_marked_plaintext() -> None:
    async with Store.from_url(
        "sqlite:///:memory:", encryption_keys=(), allow_plaintext_secrets=True
    ) as plain:
        project = await plain.projects.create("test only", api_key="sk-test")
        assert await plain.projects.reveal_api_key(project.id) == "sk-test"
        assert (
            await column_value(plain, projects.c.api_key_encrypted, project.id) == "plain:sk-test"
        )


async def test_plaintext_key_never_reaches_the_database(store: Store) -> None:
    secret = "sk-needle-" + uuid.uuid4().hex
    project = await store.projects.create("needle", api_key=secret)
    await store.projects.update(project.id, name="needle-2")
    dump = await run_sql(store, lambda conn: repr(conn.execute(sa.select(projects)).all()))
    assert "needle-2" in dump
    assert secret not in dump
    path = store.config.sqlite_path
    if store.driver == "sqlite" and path and path != ":memory:":
        for file in Path(path).parent.glob(Path(path).name + "*"):
            assert secret.encode() not in file.read_bytes(), file.name


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    names=st.sets(
        st.text(
            st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=40
        ).filter(lambda s: s.strip() and not any(0x7F <= ord(c) <= 0x9F for c in s)),
        max_size=12,
    ),
    page=st.integers(min_value=1, max_value=5),
)
async def test_pages_cover_every_project_once(store: Store, names: set[str], page: int) -> None:
    for existing in await store.projects.list(limit=1000):
        await store.projects.delete(existing.id)
    created = {(await store.projects.create(name)).id for name in names}
    seen: list[uuid.UUID] = []
    after = None
    while batch := await store.projects.list(limit=page, after=after):
        seen.extend(p.id for p in batch)
        after = batch[-1].id
    assert seen == sorted(created)
    assert {(await store.projects.get_by_name(name)).name for name in names} == names
