"""No secret reaches the database, the logs, the records or the error messages.

A realistic flow (projects with upstream keys, tokens, provider credentials, audited
mutations, token use) runs on a SQLite file and a Postgres schema; then the whole database
is dumped (the raw SQLite files, with and without the WAL; ``pg_dump`` and every row of
every table on Postgres) and searched for every secret handed to or issued by the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import shutil
import sqlite3
import subprocess
import traceback
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import (
    ConflictError,
    IssuedToken,
    LlmstoreError,
    Store,
    StoreConfig,
    TokenRejectedError,
)
from llmstore._core.secrets import SecretDigester
from llmstore._db.schema import metadata
from llmstore.migrations._commands import upgrade

ACTOR = "admin@example.com"


def _upstream_key() -> str:
    return "sk-proj-" + secrets.token_urlsafe(24)


class _Secrets:
    """Every secret of the flow, and the values that must be stored instead."""

    def __init__(self) -> None:
        self.forbidden: dict[str, str] = {}
        self.issued: list[IssuedToken] = []

    def key(self, label: str) -> str:
        value = _upstream_key()
        self.forbidden[label] = value
        # The random part alone must not be stored either.
        self.forbidden[f"{label} (without sk-proj-)"] = value.removeprefix("sk-proj-")
        return value

    def token(self, label: str, issued: IssuedToken) -> IssuedToken:
        assert issued.secret.startswith("lst_")
        assert len(issued.secret) == 47
        self.issued.append(issued)
        self.forbidden[label] = issued.secret
        self.forbidden[f"{label} (without lst_)"] = issued.secret.removeprefix("lst_")
        return issued


def _assert_absent(dump: str | bytes, forbidden: dict[str, str], where: str) -> None:
    if isinstance(dump, bytes):
        text = dump.decode("utf-8", errors="replace")
        raw = dump
    else:
        text = dump
        raw = dump.encode("utf-8")
    for label, value in forbidden.items():
        assert value not in text, f"{label} found in {where}"
        assert value.encode("utf-8") not in raw, f"{label} found in {where} (utf-8)"
        if isinstance(dump, bytes):
            for encoding in ("utf-16-le", "utf-16-be"):
                assert value.encode(encoding) not in raw, f"{label} found in {where} ({encoding})"


def _assert_present(dump: str | bytes, expected: dict[str, str], where: str) -> None:
    text = dump.decode("utf-8", errors="replace") if isinstance(dump, bytes) else dump
    for label, value in expected.items():
        assert value in text, f"{label} missing from {where}: is the dump complete?"


async def _flow(store: Store, found: _Secrets) -> None:
    """Everything a proxy does with secrets, through the public API."""
    acme = await store.projects.create("acme", api_key=found.key("project key"), actor=ACTOR)
    await store.projects.update(acme.id, api_key=found.key("rotated project key"), actor=ACTOR)
    beta = await store.projects.create("beta", api_key=found.key("beta key"))
    async with store.transaction() as tx:
        gamma = await tx.projects.create("gamma", api_key=found.key("gamma key"), actor=ACTOR)
        found.token("tx token", await tx.tokens.create(gamma.id, name="in-tx", actor=ACTOR))

    named = found.token("named token", await store.tokens.create(acme.id, name="ci", actor=ACTOR))
    unnamed = found.token("unnamed token", await store.tokens.create(acme.id))
    limited = found.token(
        "limited token", await store.tokens.create(beta.id, max_requests=2, name="limited")
    )
    expiring = found.token(
        "expiring token",
        await store.tokens.create(
            beta.id, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1), actor=ACTOR
        ),
    )
    await store.tokens.update(unnamed.token.id, name="renamed", actor=ACTOR)
    await store.tokens.deactivate(expiring.token.id, actor=ACTOR)
    await store.tokens.activate(expiring.token.id, actor=ACTOR)
    with pytest.raises(ConflictError):
        await store.tokens.create(acme.id, name="ci")

    project_credential = await store.providers.create(
        "openai", "gpt-4o", project_id=acme.id, api_key=found.key("provider key"), actor=ACTOR
    )
    global_credential = await store.providers.create(
        "anthropic",
        "claude-sonnet",
        base_url="https://api.anthropic.com",
        api_key=found.key("global provider key"),
        actor=ACTOR,
    )
    await store.providers.update(
        global_credential.id, api_key=found.key("rotated provider key"), actor=ACTOR
    )
    default = await store.providers.ensure_default(
        "openai", "gpt-4o-mini", api_key=found.key("default key"), actor=ACTOR
    )
    await store.providers.ensure_default(
        "openai", "gpt-4o-mini", api_key=found.key("re-keyed default key"), actor=ACTOR
    )
    await store.providers.activate(project_credential.id, actor=ACTOR)
    await store.audit.record(
        "proxy.request",
        "proxy",
        "success",
        project_id=acme.id,
        token_id=named.token.id,
        request_id="req-1",
        client_ip="203.0.113.7",
        metadata={"model": "gpt-4o", "token_prefix": named.token.prefix},
    )

    for issued in found.issued:
        used = await store.tokens.use(issued.secret)
        assert used.request_count == 1
        await store.tokens.use(issued.secret, cache_hit=True)
    await store.tokens.use(limited.secret)
    with pytest.raises(TokenRejectedError) as spent:
        await store.tokens.use(limited.secret)
    assert spent.value.reason == "quota_exhausted"

    # The values were stored (encrypted): they come back intact.
    keys = found.forbidden
    assert await store.projects.reveal_api_key(acme.id) == keys["rotated project key"]
    assert await store.projects.reveal_api_key(gamma.id) == keys["gamma key"]
    assert await store.providers.reveal_api_key(project_credential.id) == keys["provider key"]
    assert (
        await store.providers.reveal_api_key(global_credential.id) == keys["rotated provider key"]
    )
    assert await store.providers.reveal_api_key(default.id) == keys["re-keyed default key"]
    events = await store.audit.list(limit=1000)
    assert len([e for e in events if e.actor == ACTOR]) >= 12
    assert (await store.audit.verify()).ok


def _expected_in_dump(config: StoreConfig, found: _Secrets) -> dict[str, str]:
    digester = SecretDigester(config.token_pepper)
    expected: dict[str, str] = {}
    for issued in found.issued:
        expected[f"digest of {issued.token.prefix}"] = digester.digest(issued.secret)
        expected[f"prefix {issued.token.prefix}"] = issued.token.prefix
    return expected


def _read_sqlite_files(path: Path) -> dict[str, bytes]:
    """The raw bytes of the database file and of its -wal, -shm and -journal, if present."""
    candidates = [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))]
    return {file.name: file.read_bytes() for file in candidates if file.exists()}


async def _postgres_dumps(config: StoreConfig) -> dict[str, str]:
    schema = config.schema_name
    assert schema is not None
    url = make_url(config.url.get_secret_value())
    dumps: dict[str, str] = {}
    pg_dump = shutil.which("pg_dump")
    if pg_dump is not None:
        libpq_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
        completed = await asyncio.to_thread(
            subprocess.run,
            [pg_dump, f"--dbname={libpq_url}", f"--schema={schema}", "--no-owner"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if completed.returncode == 0:
            dumps["pg_dump"] = completed.stdout
    # Every row of every table in the schema, each row cast to text.
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            tables = (
                await conn.execute(
                    sa.text(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = :schema ORDER BY table_name"
                    ),
                    {"schema": schema},
                )
            ).scalars()
            names = list(tables)
            assert {table.name for table in metadata.sorted_tables} <= set(names)
            rows: list[str] = []
            for name in names:
                result = await conn.execute(sa.text(f'SELECT t::text FROM "{schema}"."{name}" t'))
                rows.extend(f"{name}: {row}" for row in result.scalars())
            dumps["select"] = "\n".join(rows)
    finally:
        await engine.dispose()
    return dumps


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    # Before any engine exists: SQLAlchemy decides whether to log when it connects.
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")
    caplog.set_level(logging.DEBUG, logger="llmstore")
    caplog.set_level(logging.DEBUG)
    return caplog


async def test_no_secret_is_stored_or_logged(
    db_config: StoreConfig, debug_logs: pytest.LogCaptureFixture
) -> None:
    await upgrade(db_config)
    found = _Secrets()
    store = Store(db_config)
    dumps: dict[str, str | bytes] = {}
    sqlite_path = None if db_config.sqlite_path is None else Path(db_config.sqlite_path)
    async with store:
        await _flow(store, found)
        if sqlite_path is not None:
            # While the store is open the latest pages live in the WAL.
            files = _read_sqlite_files(sqlite_path)
            dumps["open: " + " + ".join(files)] = b"".join(files.values())
    expected = _expected_in_dump(db_config, found)
    assert len(found.forbidden) == 2 * (9 + len(found.issued))

    if sqlite_path is not None:
        files = _read_sqlite_files(sqlite_path)
        dumps["closed: " + " + ".join(files)] = b"".join(files.values())
        with contextlib.closing(sqlite3.connect(sqlite_path)) as conn:
            mode = conn.execute("PRAGMA journal_mode").fetchone()
            assert mode == ("wal",)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            files = _read_sqlite_files(sqlite_path)
            dumps["checkpointed: " + " + ".join(files)] = b"".join(files.values())
    else:
        pg_dumps = await _postgres_dumps(db_config)
        if shutil.which("pg_dump") is not None:
            assert "pg_dump" in pg_dumps, "pg_dump is on PATH but failed"
        dumps.update(pg_dumps)

    assert dumps
    for where, dump in dumps.items():
        _assert_absent(dump, found.forbidden, where)
        _assert_present(dump, expected, where)

    records = debug_logs.records
    assert any(record.name.startswith("sqlalchemy.engine") for record in records), (
        "SQLAlchemy logged nothing: the log check would be vacuous"
    )
    logged = "\n".join(
        [debug_logs.text]
        + [f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in records]
    )
    _assert_absent(logged, found.forbidden, "the DEBUG logs")


def _exception_text(exc: BaseException) -> str:
    public = exc.public_message if isinstance(exc, LlmstoreError) else ""
    parts = [str(exc), repr(exc), repr(exc.args), public, *traceback.format_exception(exc)]
    return "\n".join(parts)


async def test_records_and_errors_never_show_a_token_secret(
    db_config: StoreConfig, debug_logs: pytest.LogCaptureFixture
) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        project = await store.projects.create("acme")
        issued = await store.tokens.create(project.id, name="ci")
        unnamed = await store.tokens.create(project.id, max_requests=1)
        for token in (issued, unnamed):
            secret = token.secret
            body = secret.removeprefix("lst_")
            shown = [
                repr(token),
                str(token),
                f"{token}",
                f"{token!r}",
                repr([token]),
                repr(token.token),
                str(token.token),
                token.token.model_dump_json(),
                repr(await store.tokens.get(token.token.id)),
                repr(await store.tokens.list(project.id)),
                repr(await store.tokens.use(secret)),
            ]
            for text in shown:
                assert secret not in text
                assert body not in text
            assert token.token.prefix in repr(token.token)
            assert token.secret == secret  # still readable where it is meant to be

        wrong = [
            "lst_" + secrets.token_urlsafe(32),  # well-formed, unknown
            issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B"),  # one char off
            issued.secret + "x",  # malformed: too long
            issued.secret.removeprefix("lst_"),  # malformed: no prefix
            "Bearer " + issued.secret,  # malformed: a whole header
        ]
        errors: list[BaseException] = []
        for candidate in wrong:
            with pytest.raises(TokenRejectedError) as refused:
                await store.tokens.use(candidate)
            errors.append(refused.value)
        with pytest.raises(TokenRejectedError) as not_a_string:
            await store.tokens.use(cast(Any, issued.secret.encode()))
        errors.append(not_a_string.value)
        with pytest.raises(TokenRejectedError) as spent:
            await store.tokens.use(unnamed.secret)
        assert spent.value.reason == "quota_exhausted"
        errors.append(spent.value)
        # Malformed or unknown, it is the same outcome for a proxy: rejected, unknown.
        assert [getattr(e, "reason", None) for e in errors[:6]] == ["unknown"] * 6

        for exc in errors:
            text = _exception_text(exc)
            for candidate in [*wrong, issued.secret, unnamed.secret]:
                assert candidate not in text, f"{type(exc).__name__} quotes a secret"
            assert issued.secret.removeprefix("lst_") not in text

    logged = debug_logs.text + "\n".join(r.getMessage() for r in debug_logs.records)
    for candidate in [*wrong, issued.secret, unnamed.secret]:
        assert candidate not in logged
