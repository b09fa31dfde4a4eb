"""Hostile input, everywhere: every argument of every public method, on SQLite and Postgres.

For each public method of the store's repositories (``tests/core/hostile_calls.SPECS``,
checked against the classes themselves), each argument in turn is replaced by hostile
values (``tests/core/hostile``) and the call is made on a SQLite store and a Postgres store
side by side. Whatever happens, only llmstore errors come out; both drivers give the same verdict
(both succeed, or both refuse with the same error class); a refusal leaves every table as it
was, its message is short, and a ValidationError is llmstore's, not the database's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine

from llmstore import (
    Admissions,
    ApiKeys,
    Audit,
    Budgets,
    ConfigError,
    LlmstoreError,
    Projects,
    Providers,
    RateLimits,
    Store,
    StoreConfig,
    Tokens,
    Usage,
    UsageRecord,
    UsageWriter,
    ValidationError,
    generate_key,
    verify_receipt,
)
from llmstore._core.signing import generate_signing_key, public_key_text
from llmstore._core.validate import JSON_MAX_DEPTH
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres

from .hostile import (
    HOSTILE,
    JSONS,
    NUMBERS,
    OBJECTS,
    PATHS,
    TEXT,
    Hostile,
    HostileInt,
    HostileStr,
    HugeRepr,
    RaisingMapping,
    RaisingObject,
    build_world,
    label,
    nested,
)
from .hostile_calls import ARGUMENTS, LIFECYCLE, MAX_MESSAGE, SPECS, Pair

#: Met by every argument; the rest of the values (hostile.VALUES) come by hypothesis.
CORE: list[object] = [
    "",
    "42",
    "\x00",
    "\ud800",
    "\x85",
    "\x7f",
    "\n",
    "x" * 100_000,
    True,
    0,
    -1,
    2**63,
    -(2**63) - 1,
    10**5000,
    1.5,
    math.nan,
    math.inf,
    None,
    b"bytes",
    [],
    {},
    object(),
    RaisingObject(),
    HugeRepr(),
    HostileStr("plain"),
    HostileInt(5),
    RaisingMapping(),
    nested(3000),
    dt.datetime(2026, 1, 1),
    dt.timedelta(0),
]
JSON_ARGUMENTS = {"metadata", "request_data", "records", "filters"}
REPOSITORIES: dict[str, type] = {
    "projects": Projects,
    "tokens": Tokens,
    "audit": Audit,
    "providers": Providers,
    "api_keys": ApiKeys,
    "budgets": Budgets,
    "rate_limits": RateLimits,
    "admissions": Admissions,
    "usage": Usage,
    "writer": UsageWriter,
    "store": Store,
}


def _values_for(argument: str) -> list[object]:
    if argument in JSON_ARGUMENTS:
        return CORE + JSONS
    if argument == "export_to":
        return CORE + PATHS
    return CORE


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """A SQLite file store and a Postgres store (a fresh schema), each with its world."""
    url = require_postgres()
    schema = fresh_schema_name()
    options: dict[str, Any] = {
        "encryption_keys": generate_key(),
        "receipt_signing_key": generate_signing_key(),
        "auto_upgrade": True,
    }
    sqlite = Store.from_url(f"sqlite:///{tmp_path / 'hostile.db'}", **options)
    postgres = Store.from_url(url, schema_name=schema, **options)
    try:
        async with sqlite, postgres:
            yield Pair(
                (
                    await build_world(sqlite, tmp_path / "sqlite"),
                    await build_world(postgres, tmp_path / "postgres"),
                )
            )
    finally:
        await drop_schema(url, schema)


# --- nothing is forgotten ------------------------------------------------------------------


def _public_methods(cls: type) -> set[str]:
    names = set()
    members = {
        name: member
        for klass in reversed(cls.__mro__)
        if klass.__module__.startswith("llmstore")
        for name, member in vars(klass).items()
    }
    for name, member in members.items():
        if name.startswith("_"):
            continue
        if getattr(member, "body", None) is not None and hasattr(member, "__get__"):
            names.add(name)  # an operation written once (@reads / @writes)
            continue
        if not inspect.isfunction(member):
            continue
        if inspect.iscoroutinefunction(member) or (cls is Usage and name == "writer"):
            names.add(name)
    return names


def test_every_public_method_has_a_hostile_input_spec() -> None:
    for repo, cls in REPOSITORIES.items():
        specified = {method for (r, method) in SPECS if r == repo}
        lifecycle = {method for (r, method) in LIFECYCLE if r == repo}
        assert _public_methods(cls) == specified | lifecycle, repo
        for method in specified:
            signature = inspect.signature(getattr(cls, method))
            parameters = set(signature.parameters) - {"self"}
            assert parameters == set(SPECS[repo, method]), f"{repo}.{method}"


# --- the sweep ---------------------------------------------------------------------------


@pytest.mark.postgres
async def test_every_valid_call_succeeds_on_both_drivers(pair: Pair) -> None:
    """The calls the sweep spoils: as given, every one of them works."""
    for repo, method in SPECS:
        assert await pair.call(repo, method) == "ok", f"{repo}.{method}"


@pytest.mark.postgres
async def test_every_argument_meets_the_hostile_values(pair: Pair) -> None:
    for repo, method, argument in ARGUMENTS:
        for value in _values_for(argument):
            await pair.call(repo, method, argument, value)


@pytest.mark.postgres
@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(call=st.sampled_from(ARGUMENTS), hostile=HOSTILE)
async def test_hypothesis_sweep(pair: Pair, call: tuple[str, str, str], hostile: Hostile) -> None:
    await pair.call(*call, hostile.value)


@pytest.mark.postgres
async def test_every_usage_record_field(pair: Pair) -> None:
    """A record is checked when built; whatever is accepted is stored alike by both."""
    for field in UsageRecord.model_fields:
        for value in [*CORE, *TEXT, *NUMBERS, *OBJECTS]:
            record = _built(field, UsageRecord, **{field: value})
            if record is not None:
                assert await pair.call("usage", "record", "record", record) == "ok", field
    for value in [*CORE, *JSONS]:
        _built("model_validate", UsageRecord.model_validate, value)
        _built("model_validate_json", UsageRecord.model_validate_json, value)


def _attempt(where: str, build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """What ``build`` returned, or the short llmstore error it raised; nothing else escapes."""
    try:
        result = build(*args, **kwargs)
    except LlmstoreError as exc:
        result = exc
    except Exception as exc:
        raise AssertionError(f"{where}: {type(exc).__name__} escaped") from exc
    if isinstance(result, LlmstoreError):
        assert len(str(result)) <= MAX_MESSAGE, where
    return result


def _built(where: str, build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """What ``build`` made, or None if it refused."""
    result = _attempt(where, build, *args, **kwargs)
    return None if isinstance(result, LlmstoreError) else result


def _verdict(where: str, build: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """ "ok", or the class of the llmstore error ``build`` refused with."""
    result = _attempt(where, build, *args, **kwargs)
    return type(result).__name__ if isinstance(result, LlmstoreError) else "ok"


def test_bools_and_numeric_strings_are_not_numbers() -> None:
    for field in ("temperature", "tokens_per_second", "top_p", "cost", "status_code"):
        for value in (True, "42", "0.5"):
            with pytest.raises(ValidationError, match=field):
                UsageRecord(**{field: value})
    assert UsageRecord(temperature=1, top_p=1).temperature == 1.0


CONTROLS = [chr(code) for code in (*range(0x20), *range(0x7F, 0xA0))]


async def test_labels_refuse_every_control_character_and_records_only_nul() -> None:
    """Labels (names, actors, ...) refuse C0, DEL and C1; recorded text and JSON text refuse
    only NUL, which Postgres cannot store (nor a jsonb column)."""
    async with Store.from_url("sqlite:///:memory:") as store:
        project = await store.projects.create("controls")
        for char in CONTROLS:
            text = f"a{char}b"
            with pytest.raises(ValidationError, match="control characters"):
                await store.projects.create(text)
            with pytest.raises(ValidationError, match="control characters"):
                await store.tokens.create(project.id, name=text)
            with pytest.raises(ValidationError, match="control characters"):
                await store.audit.record("a", text, "success")
            if char == "\x00":
                with pytest.raises(ValidationError, match="NUL"):
                    UsageRecord(model=text)
                with pytest.raises(ValidationError, match="NUL"):
                    await store.api_keys.create(metadata={"a": text})
            else:
                record = UsageRecord(model=text, metadata={text: text})
                assert (await store.usage.record(record)).written == 1


# --- limits ------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_metadata_at_the_depth_limit_is_stored_and_signed_alike(pair: Pair) -> None:
    deepest = nested(JSON_MAX_DEPTH, lists=True)
    for world in pair.worlds:
        store = world.store
        [usage_id] = (await store.usage.record(UsageRecord(model="d", metadata=deepest))).ids
        assert usage_id is not None
        stored = await store.usage.get(usage_id)
        assert stored is not None and stored.metadata == deepest
        receipt = await store.usage.issue_receipt(usage_id)
        assert verify_receipt(receipt, receipt.public_key)
        await store.audit.record("deep", "tests", "success", metadata=deepest)
        assert (await store.audit.verify()).ok
        for too_deep in (nested(JSON_MAX_DEPTH + 1), nested(JSON_MAX_DEPTH + 1, lists=True)):
            with pytest.raises(ValidationError, match=f"deeper than {JSON_MAX_DEPTH}"):
                await store.api_keys.create(metadata=too_deep)


@pytest.mark.postgres
async def test_refusals_inside_a_transaction_leave_it_usable(pair: Pair) -> None:
    for world in pair.worlds:
        async with world.store.transaction() as tx:
            for value in CORE:
                with contextlib.suppress(LlmstoreError):
                    await tx.projects.create(value)  # type: ignore[arg-type]
                with contextlib.suppress(LlmstoreError):
                    await tx.api_keys.charge(world.key_id, value)  # type: ignore[arg-type]
                with contextlib.suppress(LlmstoreError):
                    await tx.audit.record("a", "b", "success", client_ip=value)  # type: ignore[arg-type]
            project = await tx.projects.create("after the refusals")
        assert (await world.store.projects.get(project.id)).name == "after the refusals"


# --- configuration and the functions without a database --------------------------------------

POSTGRES_URL = "postgresql://user@localhost:5432/app"
URLS = ("sqlite:///hostile.db", POSTGRES_URL)
OPTIONS = [
    *(name for name in StoreConfig.model_fields if name != "url"),
    "auto_upgrade",
    "allow_plaintext_secrets",
    "no_such_option",
]
ENVIRONMENT = [
    "LLMSTORE_ENV",
    "DB_DRIVER",
    "DATABASE_PATH",
    "DATABASE_POOL_SIZE",
    "DATABASE_MAX_OVERFLOW",
    "DATABASE_CONN_MAX_LIFETIME",
    "DATABASE_BUSY_TIMEOUT",
    "DATABASE_SCHEMA",
    "LLMSTORE_ENCRYPTION_KEYS",
    "LLMSTORE_TOKEN_PEPPER",
    "LLMSTORE_BACKUP_DIR",
    "LLMSTORE_BACKUP_KEEP",
    "LLMSTORE_RECEIPT_SIGNING_KEY",
]


def test_store_options_are_checked_alike_for_both_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("LLMSTORE_ENCRYPTION_KEYS", "LLMSTORE_TOKEN_PEPPER", "DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    for option in OPTIONS:
        for value in [*CORE, *TEXT, *NUMBERS, *OBJECTS]:
            where = f"{option}={label(value)}"
            options = {option: value}
            verdicts = {_verdict(where, Store.from_url, url, **options) for url in URLS}
            assert len(verdicts) == 1, f"{where}: {verdicts}"
            _verdict(where, StoreConfig.from_env, {}, **options)
    for variable in ENVIRONMENT:
        for value in [*TEXT, "9" * 5000, "1e999", "nan", "-1"]:
            environ = {"DATABASE_URL": POSTGRES_URL, variable: value}
            _verdict(f"{variable}={label(value)}", StoreConfig.from_env, environ)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h:0/app",
        "postgresql://u@h:65536/app",
        "postgresql://u@h:-1/app",
        "postgresql://u@h:99999999999999999999/app",
        "postgresql://u@h/a%00b",
        "postgresql://u%00@h/app",
        "sqlite:///a%00b.db",
        "sqlite:///a\x00b.db",
    ],
)
def test_urls_no_driver_can_open_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        StoreConfig.from_url(url)
    assert len(str(caught.value)) <= MAX_MESSAGE


async def test_hostile_urls_environments_and_engines() -> None:
    for value in [*CORE, *TEXT, *OBJECTS, "postgresql://", "sqlite://h/x", "mysql://x/y"]:
        where = label(value)
        _verdict(f"url={where}", Store.from_url, value)
        _verdict(f"url={where}", StoreConfig.from_env, {}, url=value)
        _verdict(f"environ={where}", StoreConfig.from_env, value)
        _verdict(f"env={where}", StoreConfig.from_env, {"LLMSTORE_ENV": value})
        _verdict(f"env={where}", StoreConfig.from_env, {}, env=value)
        _verdict(f"engine={where}", Store.from_engine, value)
    engine = create_async_engine("sqlite+aiosqlite:///hostile-engine.db")  # connects to nothing
    for value in [*CORE, *TEXT, *OBJECTS]:
        for option in ("schema_name", "encryption_keys", "auto_upgrade"):
            _verdict(f"{option}={label(value)}", Store.from_engine, engine, **{option: value})
    await engine.dispose()


def test_verify_receipt_refuses_only_unusable_types() -> None:
    public_key = public_key_text(Ed25519PrivateKey.generate().public_key())
    for value in [*CORE, *JSONS, "{" * 100_000, b"\xff" * 10]:
        for args in ((value, public_key), ('{"id": 1}', value)):
            verdict = _verdict(label(value), verify_receipt, *args)
            assert verdict in ("ok", "ValidationError"), label(value)


# --- single cases ----------------------------------------------------------------------------


async def test_writer_close_with_an_int_too_large_for_a_float(tmp_path: Path) -> None:
    async with Store.from_url(f"sqlite:///{tmp_path / 'w.db'}", auto_upgrade=True) as store:
        writer = store.usage.writer()
        try:
            with pytest.raises(ValidationError):
                await writer.close(timeout=10**400)
        finally:
            await writer.close()
