"""StoreConfig.from_url, and the Store constructors (no I/O, config errors)."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
from sqlalchemy.engine import make_url

from llmstore import ConfigError, Store, StoreConfig
from tests.core.config_support import (
    PASSWORD,
    PG_URL,
    _clean_environment,  # noqa: F401 (an autouse fixture)
)

# --- from_url -------------------------------------------------------------------------------


def test_from_url_accepts_other_fields_as_options() -> None:
    config = StoreConfig.from_url(
        PG_URL,
        env="prod",
        pool_size=3,
        max_overflow=0,
        conn_max_lifetime=5.5,
        schema_name="tenant",
        busy_timeout=2,
        encryption_keys=("k1",),
    )
    assert config.env == "prod"
    assert (config.pool_size, config.max_overflow, config.conn_max_lifetime) == (3, 0, 5.5)
    assert config.schema_name == "tenant"
    assert config.busy_timeout == 2
    assert [key.get_secret_value() for key in config.encryption_keys] == ["k1"]


def test_from_url_accepts_a_sqlalchemy_url() -> None:
    config = StoreConfig.from_url(make_url(f"postgres://alice:{PASSWORD}@h/app"))
    assert config.url.get_secret_value() == f"postgresql+asyncpg://alice:{PASSWORD}@h/app"


def test_from_url_reads_encryption_keys_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSTORE_ENCRYPTION_KEYS", "env-key-a,env-key-b")
    config = StoreConfig.from_url("sqlite:///:memory:")
    assert [key.get_secret_value() for key in config.encryption_keys] == ["env-key-a", "env-key-b"]
    explicit = StoreConfig.from_url("sqlite:///:memory:", encryption_keys="given")
    assert [key.get_secret_value() for key in explicit.encryption_keys] == ["given"]


@pytest.mark.parametrize(
    "options",
    [
        {"pool_size": 0},
        {"pool_size": "abc"},
        {"max_overflow": -1},
        {"conn_max_lifetime": 0},
        {"busy_timeout": -1},
        {"env": "staging"},
        {"schema_name": ""},
        {"schema_name": "bad-name"},
        {"unknown_option": True},
        {"encryption_keys": 42},
    ],
)
def test_from_url_invalid_options_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        StoreConfig.from_url("sqlite:///x.db", **options)


def test_config_is_frozen() -> None:
    config = StoreConfig.from_url("sqlite:///x.db")
    with pytest.raises(pydantic.ValidationError):
        config.pool_size = 99  # type: ignore[misc]
    assert config.pool_size == 10


# --- Store constructors ---------------------------------------------------------------------


def test_store_from_url_on_sqlite_does_no_io(tmp_path: Path) -> None:
    folder = tmp_path / "not" / "yet"
    store = Store.from_url(f"sqlite:///{folder / 'store.db'}")
    assert store.driver == "sqlite"
    assert store.config.sqlite_path == str(folder / "store.db")
    assert not folder.exists()
    assert not (tmp_path / "not").exists()


def test_store_from_env_on_sqlite_does_no_io(tmp_path: Path) -> None:
    folder = tmp_path / "absent"
    store = Store.from_env(environ={"DATABASE_PATH": str(folder / "store.db")})
    assert store.driver == "sqlite"
    assert not folder.exists()


def test_store_from_url_on_a_closed_postgres_port_constructs() -> None:
    store = Store.from_url(f"postgres://alice:{PASSWORD}@127.0.0.1:1/app", pool_size=2)
    assert store.driver == "postgresql"
    assert store.config.pool_size == 2
    assert PASSWORD not in repr(store)
    assert "127.0.0.1:1" in repr(store)


def test_store_from_env_on_postgres_constructs() -> None:
    store = Store.from_env(
        environ={"DATABASE_URL": f"postgresql://alice:{PASSWORD}@127.0.0.1:1/app"},
        schema_name="tenant",
    )
    assert store.driver == "postgresql"
    assert store.config.schema_name == "tenant"
    assert PASSWORD not in repr(store)
    assert PASSWORD not in repr(store.config)


def test_store_constructors_raise_config_errors() -> None:
    with pytest.raises(ConfigError):
        Store.from_url(f"mysql://alice:{PASSWORD}@h/app")
    with pytest.raises(ConfigError):
        Store.from_env(environ={"DB_DRIVER": "postgres"})
    with pytest.raises(ConfigError):
        Store.from_url("sqlite:///x.db", pool_size=0)
