"""What migrations and operations ask of a database, from its driver's name or dialect."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from llmstore import ConfigError
from llmstore._db.traits import traits


def test_sqlite_is_one_file_whose_tables_are_rebuilt_to_alter() -> None:
    found = traits("sqlite")
    assert found == traits(sqlite.dialect())
    assert (found.driver, found.single_file, found.alters_by_rebuilding) == ("sqlite", True, True)
    assert not found.named_schemas and not found.online_ddl


def test_postgres_has_schemas_and_online_ddl() -> None:
    found = traits("postgresql")
    assert found == traits(postgresql.dialect())  # type: ignore[no-untyped-call]
    assert (found.driver, found.named_schemas, found.online_ddl) == ("postgresql", True, True)
    assert not found.single_file and not found.alters_by_rebuilding


@pytest.mark.parametrize(
    "database", ["mysql", "", sa.create_mock_engine("mssql://", print).dialect]
)
def test_another_database_is_refused(database: str | sa.Dialect) -> None:
    with pytest.raises(ConfigError, match="SQLite and PostgreSQL"):
        traits(database)
