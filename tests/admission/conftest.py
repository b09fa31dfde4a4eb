"""A store on a clock the test moves: every admission test runs on SQLite (file and
memory) and on Postgres (a fresh schema per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmstore import Store, generate_key
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.admission.admission_support import START, Clock
from tests.conftest import DRIVERS, _param
from tests.head_schemas import postgres_schema_at_head, sqlite_file_at_head
from tests.helpers import require_postgres


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture(params=[_param(name) for name in DRIVERS])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[Store]:
    """An open store at the head schema whose clock is ``clock``."""
    key = generate_key()
    if request.param == "sqlite-memory":
        async with Store.from_url("sqlite:///:memory:", encryption_keys=key, clock=clock) as memory:
            yield memory
        return
    if request.param == "postgres":
        url = require_postgres()
        schema = fresh_schema_name()
        await postgres_schema_at_head(url, schema)
        async with Store.from_url(url, schema_name=schema, encryption_keys=key, clock=clock) as pg:
            yield pg
        await drop_schema(url, schema)
        return
    path = tmp_path / "llmstore.db"
    await sqlite_file_at_head(path)
    async with Store.from_url(f"sqlite:///{path}", encryption_keys=key, clock=clock) as db:
        yield db
