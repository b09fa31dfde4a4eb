"""StoreConfig.from_env: reading the environment (or a mapping), and refusing bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from llmstore import ConfigError, StoreConfig
from llmstore._core.config import DEFAULT_SQLITE_PATH, normalise_url
from tests.core.config_support import (
    PG_URL,
    _clean_environment,  # noqa: F401 (an autouse fixture)
)


def test_from_env_defaults() -> None:
    config = StoreConfig.from_env({})
    assert config.driver == "sqlite"
    assert config.sqlite_path == DEFAULT_SQLITE_PATH == "data/llmstore.db"
    assert config.env == "dev"
    assert config.pool_size == 10
    assert config.max_overflow == 10
    assert config.conn_max_lifetime == 3600
    assert config.schema_name is None
    assert config.encryption_keys == ()
    assert not config.is_memory


def test_from_env_uses_the_given_mapping_not_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://alice:pw@h/app")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "3")
    config = StoreConfig.from_env({})
    assert config.driver == "sqlite"
    assert config.pool_size == 10


def test_from_env_without_a_mapping_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://alice:pw@h/app")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "3")
    config = StoreConfig.from_env()
    assert config.driver == "postgresql"
    assert config.pool_size == 3


def test_from_env_reads_every_variable() -> None:
    config = StoreConfig.from_env(
        {
            "DATABASE_URL": "postgres://alice:pw@h:5432/app",
            "DB_DRIVER": "postgres",
            "DATABASE_POOL_SIZE": "5",
            "DATABASE_MAX_OVERFLOW": "0",
            "DATABASE_CONN_MAX_LIFETIME": "90.5",
            "DATABASE_SCHEMA": "tenant_1",
            "LLMSTORE_ENV": "test",
            "LLMSTORE_ENCRYPTION_KEYS": " key-one , key-two ,,",
        }
    )
    assert config.url.get_secret_value() == "postgresql+asyncpg://alice:pw@h:5432/app_test"
    assert config.driver == "postgresql"
    assert config.pool_size == 5
    assert config.max_overflow == 0
    assert config.conn_max_lifetime == 90.5
    assert config.schema_name == "tenant_1"
    assert config.env == "test"
    assert all(isinstance(key, SecretStr) for key in config.encryption_keys)
    assert [key.get_secret_value() for key in config.encryption_keys] == ["key-one", "key-two"]


@pytest.mark.parametrize("driver", ["", "sqlite", "SQLite", "postgres", "postgresql"])
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://alice:pw@h/app", "postgresql"),
        ("postgresql+asyncpg://alice:pw@h/app", "postgresql"),
        ("sqlite:///other.db", "sqlite"),
        ("sqlite+aiosqlite:///:memory:", "sqlite"),
    ],
)
def test_database_url_wins_and_implies_the_driver(driver: str, url: str, expected: str) -> None:
    config = StoreConfig.from_env(
        {"DATABASE_URL": url, "DB_DRIVER": driver, "DATABASE_PATH": "ignored/path.db"}
    )
    assert config.driver == expected
    assert config.sqlite_path != "ignored/path.db"


@pytest.mark.parametrize("driver", ["sqlite", "SQLITE", ""])
def test_sqlite_driver_uses_database_path(driver: str, tmp_path: Path) -> None:
    path = str(tmp_path / "nested" / "store.db")
    config = StoreConfig.from_env({"DB_DRIVER": driver, "DATABASE_PATH": path})
    assert config.driver == "sqlite"
    assert config.sqlite_path == path
    assert config.url.get_secret_value() == f"sqlite:///{path}"


def test_database_path_can_be_relative_or_memory() -> None:
    assert StoreConfig.from_env({"DATABASE_PATH": "var/x.db"}).sqlite_path == "var/x.db"
    assert StoreConfig.from_env({"DATABASE_PATH": ":memory:"}).is_memory


def test_database_path_expands_the_home_directory() -> None:
    path = StoreConfig.from_env({"DATABASE_PATH": "~/llmstore.db"}).sqlite_path
    assert path == str(Path("~/llmstore.db").expanduser())
    assert "~" not in path


@pytest.mark.parametrize("name", ["a%41.db", "100%25.db", "a%20b.db", "what?.db"])
def test_database_path_is_used_as_is(name: str, tmp_path: Path) -> None:
    """DATABASE_PATH is a file name, not a URL fragment: no percent-decoding, no query."""
    path = str(tmp_path / name)
    assert StoreConfig.from_env({"DATABASE_PATH": path}).sqlite_path == path


@pytest.mark.parametrize("driver", ["postgres", "postgresql", "POSTGRES"])
@pytest.mark.parametrize("extra", [{}, {"DATABASE_PATH": "some.db"}])
def test_postgres_driver_without_url_names_the_variable(driver: str, extra: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        StoreConfig.from_env({"DB_DRIVER": driver, **extra})


@pytest.mark.parametrize("driver", ["mysql", "oracle", "sqlite3"])
def test_unknown_db_driver_is_a_config_error(driver: str) -> None:
    with pytest.raises(ConfigError, match="DB_DRIVER") as caught:
        StoreConfig.from_env({"DB_DRIVER": driver})
    assert driver in str(caught.value)


@pytest.mark.parametrize("environ", [{}, {"DB_DRIVER": "sqlite"}, {"DATABASE_POOL_SIZE": "4"}])
def test_prod_refuses_defaults(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="prod"):
        StoreConfig.from_env({"LLMSTORE_ENV": "prod", **environ})
    with pytest.raises(ConfigError, match="prod"):
        StoreConfig.from_env(environ, env="prod")


def test_prod_needs_an_explicit_url() -> None:
    by_url = StoreConfig.from_env({"LLMSTORE_ENV": "prod", "DATABASE_URL": PG_URL})
    assert (by_url.env, by_url.driver) == ("prod", "postgresql")
    sqlite = StoreConfig.from_env({"LLMSTORE_ENV": "prod", "DATABASE_URL": "sqlite:////srv/x.db"})
    assert (sqlite.env, sqlite.sqlite_path) == ("prod", "/srv/x.db")
    with pytest.raises(ConfigError, match="prod needs an explicit DATABASE_URL"):
        StoreConfig.from_env({"LLMSTORE_ENV": "prod", "DATABASE_PATH": "/srv/x.db"})
    by_override = StoreConfig.from_env({"LLMSTORE_ENV": "prod"}, url="sqlite:///y.db")
    assert by_override.sqlite_path == "y.db"


@pytest.mark.parametrize(
    ("env", "path"), [("dev", "data/llmstore.db"), ("test", "data/llmstore_test.db")]
)
def test_dev_and_test_fall_back_to_the_default_path(env: str, path: str) -> None:
    config = StoreConfig.from_env({"LLMSTORE_ENV": env})
    assert config.env == env
    assert config.sqlite_path == path


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://alice:p%40ss@h:5432/app", "postgresql+asyncpg://alice:p%40ss@h:5432/app_test"),
        ("postgresql://h/app_test", "postgresql+asyncpg://h/app_test"),
        ("sqlite:////srv/proxy.db", "sqlite:////srv/proxy_test.db"),
        ("sqlite:///data/llmstore", "sqlite:///data/llmstore_test"),
        ("sqlite:///x_test.db", "sqlite:///x_test.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
    ],
)
def test_the_test_environment_uses_the_test_twin_of_any_database(given: str, used: str) -> None:
    for config in (
        StoreConfig.from_env({"LLMSTORE_ENV": "test", "DATABASE_URL": given}),
        StoreConfig.from_env({"DATABASE_URL": given}, env="test"),
        StoreConfig.from_env({}, env="test", url=given),
    ):
        assert config.url.get_secret_value() == used
    assert StoreConfig.from_env({"DATABASE_PATH": "/srv/p.db"}, env="test").sqlite_path == (
        "/srv/p_test.db"
    )
    dev = StoreConfig.from_env({"DATABASE_URL": given}, env="dev")
    assert dev.url.get_secret_value() == normalise_url(given)


@pytest.mark.parametrize("env", ["production", "staging", "PRODUCTION"])
def test_unknown_environment_is_a_config_error(env: str) -> None:
    with pytest.raises(ConfigError, match="LLMSTORE_ENV"):
        StoreConfig.from_env({"LLMSTORE_ENV": env})


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("DATABASE_POOL_SIZE", "abc"),
        ("DATABASE_POOL_SIZE", "0"),
        ("DATABASE_POOL_SIZE", "-3"),
        ("DATABASE_POOL_SIZE", "2.5"),
        ("DATABASE_POOL_SIZE", "100000"),
        ("DATABASE_MAX_OVERFLOW", "abc"),
        ("DATABASE_MAX_OVERFLOW", "-1"),
        ("DATABASE_MAX_OVERFLOW", "1.5"),
        ("DATABASE_CONN_MAX_LIFETIME", "abc"),
        ("DATABASE_CONN_MAX_LIFETIME", "0"),
        ("DATABASE_CONN_MAX_LIFETIME", "-60"),
        ("DATABASE_CONN_MAX_LIFETIME", "nan"),
    ],
)
def test_bad_numbers_are_config_errors(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError):
        StoreConfig.from_env({variable: raw})


@pytest.mark.parametrize(
    "variable", ["DATABASE_POOL_SIZE", "DATABASE_MAX_OVERFLOW", "DATABASE_CONN_MAX_LIFETIME"]
)
def test_non_numeric_value_names_the_variable(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        StoreConfig.from_env({variable: "lots"})
    assert "lots" in str(caught.value)


def test_numbers_tolerate_surrounding_whitespace() -> None:
    config = StoreConfig.from_env(
        {
            "DATABASE_POOL_SIZE": " 7 ",
            "DATABASE_MAX_OVERFLOW": "3\n",
            "DATABASE_CONN_MAX_LIFETIME": " 60 ",
        }
    )
    assert (config.pool_size, config.max_overflow, config.conn_max_lifetime) == (7, 3, 60)


@pytest.mark.parametrize("schema", ["1tenant", "my-schema", "a b", "drop;table", "é", "x" * 64])
def test_bad_schema_names_are_config_errors(schema: str) -> None:
    with pytest.raises(ConfigError):
        StoreConfig.from_env({"DATABASE_URL": PG_URL, "DATABASE_SCHEMA": schema})
    with pytest.raises(ConfigError):
        StoreConfig.from_url(PG_URL, schema_name=schema)


@pytest.mark.parametrize("schema", ["tenant", "_private", "Tenant_42", "x" * 63])
def test_good_schema_names_are_kept(schema: str) -> None:
    assert StoreConfig.from_env({"DATABASE_SCHEMA": schema}).schema_name == schema


def test_overrides_win_over_the_environment() -> None:
    config = StoreConfig.from_env(
        {"DATABASE_URL": PG_URL, "DATABASE_POOL_SIZE": "5", "LLMSTORE_ENV": "test"},
        url="sqlite:///override.db",
        pool_size=7,
        env="dev",
    )
    assert config.sqlite_path == "override.db"
    assert config.pool_size == 7
    assert config.env == "dev"


@pytest.mark.parametrize(
    "overrides", [{"pool_size": 0}, {"pool_size": "many"}, {"no_such_field": 1}, {"env": "qa"}]
)
def test_invalid_overrides_are_config_errors(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        StoreConfig.from_env({}, **overrides)
