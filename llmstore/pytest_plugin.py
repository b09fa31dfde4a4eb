"""pytest fixtures for applications that use llmstore (registered as a ``pytest11`` plugin).

* ``llmstore_memory_store``: a fresh, open in-memory store at the head schema, with a
  throwaway encryption key; a few milliseconds each.
* ``llmstore_postgres_factory``: ``await factory(**options)`` opens a store in a fresh
  schema of the database at ``LLMSTORE_TEST_POSTGRES_URL``, migrated to head; every schema
  is dropped at teardown. Tests using it are skipped when the variable is not set.
* ``run_sql(store, fn)``: run ``fn(connection)`` on the store's own database, for a test
  that looks at or changes rows directly.

Both need pytest-asyncio (``pip install 'llmstore[pytest]'``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from ._core.config import StoreConfig
from ._core.secrets import generate_key
from ._store import Store
from .migrations._commands import upgrade

POSTGRES_URL_VARIABLE = "LLMSTORE_TEST_POSTGRES_URL"

StoreFactory = Callable[..., Awaitable[Store]]
T = TypeVar("T")


async def run_sql(
    store: Store, fn: Callable[[Connection], T], *, write: bool = False, single: bool = False
) -> T:
    """Run ``fn`` with a SQLAlchemy ``Connection`` of the open ``store``, as one unit.

    ``write``: the unit may write; it is committed when ``fn`` returns and rolled back if
    it raises (SQLite: under the write lock). ``single``: ``fn`` runs one statement, in
    autocommit. The connection is the store's own, with its schema; ``fn`` must not commit.
    """
    runner = store._require_open()
    if write:
        return await runner.write(fn, single=single)
    return await runner.read(fn, single=single)


def postgres_test_url() -> str | None:
    return os.environ.get(POSTGRES_URL_VARIABLE, "").strip() or None


def fresh_schema_name() -> str:
    return f"llmstore_test_{uuid.uuid4().hex[:12]}"


async def drop_schema(url: str, schema: str) -> None:
    config = StoreConfig.from_url(url)
    engine = create_async_engine(config.url.get_secret_value(), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


async def _memory_store() -> AsyncIterator[Store]:
    store = Store.from_url("sqlite:///:memory:", encryption_keys=generate_key())
    async with store:
        yield store


async def _postgres_factory() -> AsyncIterator[StoreFactory]:
    url = postgres_test_url()
    if url is None:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set")
    made: list[tuple[Store, str]] = []

    async def factory(**options: Any) -> Store:
        schema = fresh_schema_name()
        options.setdefault("encryption_keys", generate_key())
        store = Store.from_url(url, schema_name=schema, **options)
        made.append((store, schema))
        await upgrade(store.config)
        await store.open()
        return store

    try:
        yield factory
    finally:
        for store, schema in made:
            await store.close()
            await drop_schema(url, schema)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - depends on the user's environment
    pytest_asyncio = None  # type: ignore[assignment]


def _missing_plugin() -> None:
    pytest.fail("llmstore's fixtures need pytest-asyncio: pip install 'llmstore[pytest]'")


_fixture: Any = pytest.fixture if pytest_asyncio is None else pytest_asyncio.fixture
llmstore_memory_store = _fixture(
    _missing_plugin if pytest_asyncio is None else _memory_store, name="llmstore_memory_store"
)
llmstore_postgres_factory = _fixture(
    _missing_plugin if pytest_asyncio is None else _postgres_factory,
    name="llmstore_postgres_factory",
)
