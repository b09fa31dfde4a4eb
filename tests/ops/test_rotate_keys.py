"""Key rotation (``Store.rotate_keys``, ``python -m llmstore rotate-keys``) on a SQLite file
and a Postgres schema: every secret ends up under the first key, in batches that a rerun
finishes, and still decrypts once the old key is gone."""

from __future__ import annotations

import asyncio
import secrets
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.engine import Connection

from llmstore import ConfigError, Store, StoreConfig, ValidationError, generate_key
from llmstore._cli.main import EXIT_OK, EXIT_USAGE, main
from llmstore._cli.progress import CopyProgress
from llmstore._db.schema import metadata, projects, provider_credentials, withdrawals
from llmstore._ops import rotation as _rotation
from llmstore._ops.rotation import ENCRYPTED_COLUMNS, _write_batch
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests.helpers import Terminal

MINT = "https://mint.example.com/v1"
# Listed here independently of the module under test.
COLUMNS = {
    "projects": projects.c.api_key_encrypted,
    "provider_credentials": provider_credentials.c.api_key_encrypted,
    "withdrawals": withdrawals.c.token_encrypted,
}
# Three projects with a key (and one without), three credentials, two withdrawals.
SEEDED = 8

Stored = dict[tuple[str, uuid.UUID], str]


@dataclass
class Seeded:
    """The secrets handed to the store, by the id that reveals each."""

    projects: dict[uuid.UUID, str] = field(default_factory=dict)
    credentials: dict[uuid.UUID, str] = field(default_factory=dict)
    withdrawals: dict[uuid.UUID, str] = field(default_factory=dict)

    def all(self) -> list[str]:
        return [*self.projects.values(), *self.credentials.values(), *self.withdrawals.values()]


def _store(config: StoreConfig, *keys: str, plaintext: bool = False) -> Store:
    """A store on the same database with these encryption keys (first encrypts)."""
    return Store.from_url(
        config.url.get_secret_value(),
        schema_name=config.schema_name,
        encryption_keys=",".join(keys),
        allow_plaintext_secrets=plaintext,
    )


def _secret(label: str) -> str:
    return f"sk-{label}-" + secrets.token_urlsafe(16)


async def _seed(store: Store, seeded: Seeded, projects_with_keys: int = 3) -> None:
    for number in range(projects_with_keys):
        key = _secret("project")
        project = await store.projects.create(f"p{number}-{uuid.uuid4().hex[:6]}", api_key=key)
        seeded.projects[project.id] = key
        credential_key = _secret("provider")
        credential = await store.providers.create(
            "openai", "gpt-4o", project_id=project.id, api_key=credential_key
        )
        seeded.credentials[credential.id] = credential_key
    await store.projects.create(f"keyless-{uuid.uuid4().hex[:6]}")
    issued = await store.api_keys.create()
    await store.api_keys.deposit(issued.key.id, 1000)
    for _ in range(2):
        token = "cashuA" + secrets.token_urlsafe(32)
        withdrawal = await store.api_keys.withdraw(issued.key.id, 100, token, MINT)
        seeded.withdrawals[withdrawal.id] = token


async def _seeded(config: StoreConfig, *keys: str, plaintext: bool = False) -> Seeded:
    await upgrade(config)
    seeded = Seeded()
    async with _store(config, *keys, plaintext=plaintext) as store:
        await _seed(store, seeded)
    return seeded


async def _revealed(store: Store, seeded: Seeded) -> Seeded:
    """Every secret read back through the public API."""
    return Seeded(
        projects={i: await store.projects.reveal_api_key(i) or "" for i in seeded.projects},
        credentials={i: await store.providers.reveal_api_key(i) or "" for i in seeded.credentials},
        withdrawals={
            i: await store.api_keys.reveal_withdrawal_token(i) for i in seeded.withdrawals
        },
    )


async def _stored(store: Store) -> Stored:
    """Every stored (encrypted) value, as the database holds it."""

    def read(conn: Connection) -> Stored:
        found: Stored = {}
        for name, column in COLUMNS.items():
            table = column.table
            statement = sa.select(table.c.id, column).where(column.is_not(None))
            for row_id, value in conn.execute(statement):
                found[(name, row_id)] = value
        return found

    return await run_sql(store, read)


def _under(key: str, value: str) -> bool:
    try:
        Fernet(key.encode()).decrypt(value.encode())
    except InvalidToken:
        return False
    return True


def test_every_encrypted_column_is_rotated() -> None:
    in_schema = {
        (table.name, column.name)
        for table in metadata.sorted_tables
        for column in table.columns
        if column.name.endswith("_encrypted")
    }
    assert in_schema == {(column.table.name, column.name) for column in COLUMNS.values()}
    assert {(column.table.name, column.name) for column in ENCRYPTED_COLUMNS} == in_schema


async def test_rotation_moves_every_secret_to_the_new_first_key(db_config: StoreConfig) -> None:
    old, new = generate_key(), generate_key()
    seeded = await _seeded(db_config, old)
    async with _store(db_config, new, old) as store:
        before = await _stored(store)
        assert len(before) == SEEDED and all(_under(old, v) for v in before.values())
        seen: list[tuple[int, int]] = []
        assert await store.rotate_keys(batch_size=3, progress=lambda *a: seen.append(a)) == SEEDED
        assert seen == [(0, SEEDED), (3, SEEDED), (6, SEEDED), (8, SEEDED)]
        after = await _stored(store)
        assert after.keys() == before.keys()
        for where, value in after.items():
            assert value != before[where], where
            assert _under(new, value) and not _under(old, value), where

        # A second run finds nothing to do and rewrites nothing.
        assert await store.rotate_keys() == 0
        assert await _stored(store) == after

    # The old key is gone: every secret still decrypts.
    async with _store(db_config, new) as store:
        assert await _revealed(store, seeded) == seeded
        assert await store.rotate_keys() == 0
    async with _store(db_config, old) as store:
        with pytest.raises(ConfigError):
            await store.projects.reveal_api_key(next(iter(seeded.projects)))


async def test_plaintext_marked_values_are_encrypted(db_config: StoreConfig) -> None:
    seeded = await _seeded(db_config, plaintext=True)
    async with _store(db_config, plaintext=True) as store:
        before = await _stored(store)
        assert sorted(before.values()) == sorted("plain:" + s for s in seeded.all())
        with pytest.raises(ConfigError, match="LLMSTORE_ENCRYPTION_KEYS"):
            await store.rotate_keys()
        assert await _stored(store) == before

    key = generate_key()
    async with _store(db_config, key) as store:
        assert await store.rotate_keys(batch_size=2) == SEEDED
        after = await _stored(store)
        assert after.keys() == before.keys()
        assert all(_under(key, value) for value in after.values())
        stored_text = "\n".join(after.values())
        assert not any(plain in stored_text for plain in seeded.all())
        assert await _revealed(store, seeded) == seeded
        assert await store.rotate_keys() == 0


async def test_an_interrupted_rotation_is_finished_by_a_rerun(db_config: StoreConfig) -> None:
    old, new = generate_key(), generate_key()
    seeded = await _seeded(db_config, old)

    def interrupt(checked: int, total: int) -> None:
        if checked > 0:
            raise KeyboardInterrupt

    async with _store(db_config, new, old) as store:
        with pytest.raises(KeyboardInterrupt):
            await store.rotate_keys(batch_size=2, progress=interrupt)
        # The first batch (two project keys) was committed, nothing else was touched.
        stored = await _stored(store)
        rotated = {where for where, value in stored.items() if _under(new, value)}
        assert len(rotated) == 2 and {name for name, _ in rotated} == {"projects"}
        assert all(_under(old, v) for where, v in stored.items() if where not in rotated)
        assert await _revealed(store, seeded) == seeded

        assert await store.rotate_keys(batch_size=2) == SEEDED - 2
        assert all(_under(new, value) for value in (await _stored(store)).values())
    async with _store(db_config, new) as store:
        assert await _revealed(store, seeded) == seeded


async def test_an_undecryptable_value_stops_before_its_batch_writes(
    db_config: StoreConfig,
) -> None:
    old, stray, new = generate_key(), generate_key(), generate_key()
    await upgrade(db_config)
    names = iter(range(10))
    keys: dict[uuid.UUID, str] = {}
    # Created in id order: two under the old key, one under a key nobody kept, one more.
    for key in (old, old, stray, old):
        async with _store(db_config, key) as store:
            secret = _secret("project")
            keys[(await store.projects.create(f"p{next(names)}", api_key=secret)).id] = secret
    ids = sorted(keys)

    async with _store(db_config, new, old) as store:
        before = await _stored(store)
        seen: list[tuple[int, int]] = []
        with pytest.raises(ConfigError) as refused:
            await store.rotate_keys(batch_size=2, progress=lambda *a: seen.append(a))
        assert seen == [(0, 4), (2, 4)]
        after = await _stored(store)
        # The first batch was committed; the failing batch wrote nothing.
        assert [_under(new, after[("projects", i)]) for i in ids] == [True, True, False, False]
        assert after[("projects", ids[2])] == before[("projects", ids[2])]
        assert after[("projects", ids[3])] == before[("projects", ids[3])]

    message = "\n".join(
        [str(refused.value), repr(refused.value), *traceback.format_exception(refused.value)]
    )
    assert "projects.api_key_encrypted" in message and str(ids[2]) in message
    for value in [*before.values(), *keys.values(), old, stray, new]:
        assert value not in message


async def test_a_value_replaced_meanwhile_is_not_overwritten(db_config: StoreConfig) -> None:
    old, new = generate_key(), generate_key()
    seeded = await _seeded(db_config, old)
    project_id = next(iter(seeded.projects))
    column = projects.c.api_key_encrypted
    async with _store(db_config, new, old) as store:
        # A proxy replaced the key after the rotation read it: the stale compare fails.
        replacement = _secret("replacement")
        await store.projects.update(project_id, api_key=replacement)
        current = (await _stored(store))[("projects", project_id)]
        stale = [(project_id, "a value read before the update", "the rotated value")]
        written = await run_sql(store, lambda conn: _write_batch(conn, column, stale), write=True)
        assert written == 0
        assert (await _stored(store))[("projects", project_id)] == current
        assert await store.projects.reveal_api_key(project_id) == replacement
        assert await store.rotate_keys() == SEEDED - 1  # the replacement was under `new`


async def test_a_value_replaced_between_read_and_write_is_read_again(
    db_config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = generate_key(), generate_key()
    seeded = await _seeded(db_config, old)
    project_id = next(iter(seeded.projects))
    replacement = Fernet(old.encode()).encrypt(b"sk-written-under-the-old-key").decode()
    real_write = _rotation._write_batch
    raced: list[int] = []

    def racing_write(conn: Connection, column: sa.Column[str], changes: list[Any]) -> int:
        if column is projects.c.api_key_encrypted and not raced:
            # A proxy not yet restarted writes under the old key after the batch was read.
            raced.append(1)
            by_id = projects.c.id == project_id
            conn.execute(sa.update(projects).where(by_id).values(api_key_encrypted=replacement))
        return real_write(conn, column, changes)

    monkeypatch.setattr(_rotation, "_write_batch", racing_write)
    async with _store(db_config, new, old) as store:
        assert await store.rotate_keys() == SEEDED
        assert raced == [1]
        stored = await _stored(store)
        assert all(_under(new, value) for value in stored.values())
        assert await store.projects.reveal_api_key(project_id) == "sk-written-under-the-old-key"
        assert await store.rotate_keys() == 0


async def test_rotate_keys_refuses_bad_arguments(store: Store) -> None:
    for bad in (0, -1, 100_001, True, "10"):
        with pytest.raises(ValidationError, match="batch_size"):
            await store.rotate_keys(batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="progress"):
        await store.rotate_keys(progress="print")  # type: ignore[arg-type]


async def _reveal_with(config: StoreConfig, seeded: Seeded, *keys: str) -> Seeded:
    async with _store(config, *keys) as store:
        return await _revealed(store, seeded)


def test_cli_rotate_keys(
    schema_env: StoreConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = generate_key(), generate_key()
    seeded = asyncio.run(_seeded(schema_env, old))
    url = ["--url", schema_env.url.get_secret_value()]
    done = "under the first key of LLMSTORE_ENCRYPTION_KEYS\n"

    monkeypatch.delenv("LLMSTORE_ENCRYPTION_KEYS", raising=False)
    assert main(["rotate-keys", *url]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("llmstore: error: rotate-keys needs LLMSTORE_ENCRYPTION_KEYS")
    assert captured.err.count("\n") == 1

    monkeypatch.setenv("LLMSTORE_ENCRYPTION_KEYS", f"{new},{old}")
    assert main(["rotate-keys", "--batch-size", "2", *url]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == f"{schema_env.masked_url}: re-encrypted {SEEDED} value(s) {done}"
    # Not a terminal: plain lines on stderr, from the start to the end, no bar.
    lines = captured.err.splitlines()
    assert lines[0] == f"re-encrypting: 0% (0/{SEEDED})"
    assert lines[-1] == f"re-encrypting: 100% ({SEEDED}/{SEEDED})"
    assert len(lines) > 2 and all(line.startswith("re-encrypting: ") for line in lines)
    assert "\r" not in captured.err and "[" not in captured.err
    assert old not in captured.err + captured.out and new not in captured.err + captured.out

    assert main(["rotate-keys", *url]) == EXIT_OK
    assert capsys.readouterr().out == f"{schema_env.masked_url}: re-encrypted 0 value(s) {done}"
    assert asyncio.run(_reveal_with(schema_env, seeded, new)) == seeded


def test_cli_rotate_keys_refuses_a_bad_batch_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["rotate-keys", "--batch-size", "0", "--url", "sqlite://"])
    assert exited.value.code == EXIT_USAGE
    assert "--batch-size" in capsys.readouterr().err


def test_cli_progress_is_a_bar_on_a_terminal() -> None:
    terminal = Terminal()
    progress = CopyProgress(terminal, "re-encrypting")
    for checked in (0, 500, 1000):
        progress(checked, 1000)
    progress.end()
    text = terminal.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "re-encrypting: [##############################] 100% (1,000/1,000)" in text
