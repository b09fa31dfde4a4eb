"""pytest-alembic's built-in tests against llmstore's migrations, as a host would run them.

``alembic_runner`` hands ``env.py`` the engine below in ``config.attributes["connection"]``:
a sync ``Engine`` on SQLite, an ``AsyncEngine`` on SQLite (aiosqlite) and on Postgres (in a
fresh schema, named by the ``llmstore_schema`` attribute). Each command runs ``env.py`` in an
event loop of its own, so the async engines use ``NullPool``, as Alembic's async template
does: a pooled connection belongs to the loop that opened it. The plugin's own collector is
off (``-p no:pytest_alembic``: it does not collect under pytest 9), so its tests are
imported here, which is the other way its documentation gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import alembic.config
import pytest
import sqlalchemy as sa
from pytest_alembic.plugin.fixtures import alembic_runner
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from llmstore.migrations import script_location
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres

__all__ = [
    "alembic_runner",
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]

_ENGINES = [
    "sqlite-engine",
    "sqlite-async-engine",
    pytest.param("postgres-async-engine", marks=pytest.mark.postgres),
]


@pytest.fixture(params=_ENGINES)
def _database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """The engine kind and, on Postgres, a fresh schema dropped afterwards."""
    if request.param != "postgres-async-engine":
        yield request.param, None
        return
    url = require_postgres()
    schema = fresh_schema_name()
    yield url, schema
    asyncio.run(drop_schema(url, schema))


@pytest.fixture
def alembic_config(_database: tuple[str, str | None]) -> alembic.config.Config:
    config = alembic.config.Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["llmstore_schema"] = _database[1]
    return config


@pytest.fixture
def alembic_engine(
    _database: tuple[str, str | None], tmp_path: Path
) -> Iterator[Engine | AsyncEngine]:
    kind, schema = _database
    path = tmp_path / "pytest-alembic.db"
    engine: Engine | AsyncEngine
    if kind == "sqlite-engine":
        engine = sa.create_engine(f"sqlite:///{path}")
    elif kind == "sqlite-async-engine":
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
    else:
        assert schema is not None
        url = kind.replace("postgresql://", "postgresql+asyncpg://", 1)
        engine = create_async_engine(url, poolclass=NullPool)
    yield engine
    if isinstance(engine, AsyncEngine):
        asyncio.run(engine.dispose())
    else:
        engine.dispose()
