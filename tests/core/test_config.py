"""StoreConfig: reading the environment, normalising URLs, and never showing a password."""

from __future__ import annotations

import string
from pathlib import Path
from urllib.parse import quote

import pydantic
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from llmstore import ConfigError, LlmstoreError, Store, StoreConfig
from llmstore._core.config import DEFAULT_SQLITE_PATH, mask_url, normalise_url
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres

PASSWORD = "s3cr3t-Pa55word"
PG_URL = f"postgresql+asyncpg://alice:{PASSWORD}@db.example.com:5432/app"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from_url`` reads LLMSTORE_ENCRYPTION_KEYS; ``from_env()`` reads everything."""
    for name in (
        "DATABASE_URL",
        "DB_DRIVER",
        "DATABASE_PATH",
        "DATABASE_POOL_SIZE",
        "DATABASE_MAX_OVERFLOW",
        "DATABASE_CONN_MAX_LIFETIME",
        "DATABASE_BUSY_TIMEOUT",
        "DATABASE_SCHEMA",
        "LLMSTORE_ENV",
        "LLMSTORE_ENCRYPTION_KEYS",
    ):
        monkeypatch.delenv(name, raising=False)


def config_error_message(url: str) -> str:
    with pytest.raises(ConfigError) as caught:
        StoreConfig.from_url(url)
    return str(caught.value)


# --- the error type -------------------------------------------------------------------------


def test_config_error_is_an_llmstore_error() -> None:
    assert issubclass(ConfigError, LlmstoreError)
    assert issubclass(ConfigError, Exception)


# --- URL normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "postgres://alice:pw@db.example.com/app",
            "postgresql+asyncpg://alice:pw@db.example.com/app",
        ),
        (
            "postgresql://alice:pw@db.example.com:5433/app",
            "postgresql+asyncpg://alice:pw@db.example.com:5433/app",
        ),
        (
            "postgresql+asyncpg://alice:pw@db.example.com/app",
            "postgresql+asyncpg://alice:pw@db.example.com/app",
        ),
        ("postgres://db.example.com/app", "postgresql+asyncpg://db.example.com/app"),
        ("  postgres://alice:pw@h/app  ", "postgresql+asyncpg://alice:pw@h/app"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("sqlite:///data/sub/relative.db", "sqlite:///data/sub/relative.db"),
        ("sqlite:////abs.db", "sqlite:////abs.db"),
        ("sqlite:////var/lib/llmstore/abs.db", "sqlite:////var/lib/llmstore/abs.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite+aiosqlite:///relative.db", "sqlite:///relative.db"),
        ("sqlite+aiosqlite:////abs.db", "sqlite:////abs.db"),
        ("sqlite+aiosqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite+pysqlite:///relative.db", "sqlite:///relative.db"),
    ],
)
def test_urls_are_accepted_as_people_write_them(raw: str, expected: str) -> None:
    assert normalise_url(raw) == expected
    assert StoreConfig.from_url(raw).url.get_secret_value() == expected


def test_postgres_query_options_survive_normalisation() -> None:
    normalised = normalise_url("postgres://alice:pw@h:5432/app?ssl=require")
    parsed = make_url(normalised)
    assert parsed.drivername == "postgresql+asyncpg"
    assert parsed.query == {"ssl": "require"}
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "alice",
        "pw",
        "h",
        5432,
        "app",
    )


def test_percent_encoded_password_is_kept_encoded() -> None:
    normalised = normalise_url("postgresql://alice:p%40ss%2Fw%3Ard@h/app")
    assert make_url(normalised).password == "p@ss/w:rd"
    assert normalise_url(normalised) == normalised


@pytest.mark.parametrize(
    ("raw", "driver", "sqlite_path", "is_memory"),
    [
        ("postgres://alice:pw@h/app", "postgresql", None, False),
        ("postgresql+asyncpg://alice:pw@h/app", "postgresql", None, False),
        ("sqlite:///relative.db", "sqlite", "relative.db", False),
        ("sqlite:////abs.db", "sqlite", "/abs.db", False),
        ("sqlite+aiosqlite:///x/y.db", "sqlite", "x/y.db", False),
        ("sqlite:///:memory:", "sqlite", ":memory:", True),
        ("sqlite+aiosqlite:///:memory:", "sqlite", ":memory:", True),
    ],
)
def test_driver_sqlite_path_and_is_memory(
    raw: str, driver: str, sqlite_path: str | None, is_memory: bool
) -> None:
    config = StoreConfig.from_url(raw)
    assert config.driver == driver
    assert config.sqlite_path == sqlite_path
    assert config.is_memory is is_memory


@pytest.mark.parametrize(
    "raw",
    [
        "postgres://alice:pw@h/app",
        "postgresql+asyncpg://alice:pw@h:5432/app?ssl=require",
        "sqlite:///relative.db",
        "sqlite:////abs.db",
        "sqlite:///:memory:",
        "sqlite+aiosqlite:///with space.db",
        # A file literally named "a%20b.db": SQLAlchemy reads this URL's database as
        # "a%20b.db", so its normal form must not turn into "a b.db" on a second pass.
        "sqlite:///a%2520b.db",
    ],
)
def test_normalising_is_idempotent(raw: str) -> None:
    once = normalise_url(raw)
    assert normalise_url(once) == once


@pytest.mark.parametrize(
    ("raw", "database"),
    [
        ("sqlite:///data/a%2520b.db", "data/a%20b.db"),
        ("sqlite:///data/100%2541.db", "data/100%41.db"),
        ("sqlite+aiosqlite:////srv/x%2525.db", "/srv/x%25.db"),
    ],
)
def test_sqlite_path_is_the_file_sqlalchemy_reads_from_the_url(raw: str, database: str) -> None:
    assert make_url(raw).database == database  # what SQLAlchemy says the URL names
    assert StoreConfig.from_url(raw).sqlite_path == database


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "not a url",
        "postgresql://alice:pw@h:notaport/app",
        "mysql://alice:pw@h/app",
        "oracle://h/app",
        "postgresql+psycopg2://alice:pw@h/app",
        "sqlite+pysqlcipher:///x.db",
        "postgresql://alice:pw@h",
        "sqlite://alice:pw@h/x.db",
        "sqlite:///x.db?mode=ro",
    ],
)
def test_malformed_or_unsupported_urls_are_config_errors(raw: str) -> None:
    with pytest.raises(ConfigError):
        normalise_url(raw)
    with pytest.raises(ConfigError):
        StoreConfig.from_url(raw)
    if raw.strip():
        with pytest.raises(ConfigError):
            StoreConfig.from_env({"DATABASE_URL": raw})


def test_non_string_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="int"):
        StoreConfig(url=42)


def test_error_message_quotes_the_value() -> None:
    message = config_error_message("mysql://alice@db.example.com/app")
    assert "mysql://alice@db.example.com/app" in message


@pytest.mark.parametrize(
    "raw",
    [
        # unknown or unsupported driver
        f"mysql://alice:{PASSWORD}@db.example.com/app",
        f"postgresql+psycopg2://alice:{PASSWORD}@db.example.com/app",
        f"sqlite://alice:{PASSWORD}@db.example.com/x.db",
        f"postgresql://alice:{PASSWORD}@db.example.com",
        # malformed, with "://"
        f"postgresql://alice:{PASSWORD}@db.example.com:notaport/app",
        f"postgresql-asyncpg://alice:{PASSWORD}@db.example.com/app",
        # malformed, as typed by a hurried human: no "://" at all
        f"postgres:/alice:{PASSWORD}@db.example.com/app",
        f"postgresql//alice:{PASSWORD}@db.example.com/app",
        f"postgres:alice:{PASSWORD}@db.example.com/app",
        f"alice:{PASSWORD}@db.example.com/app",
    ],
)
def test_config_error_never_shows_the_password(raw: str) -> None:
    message = config_error_message(raw)
    assert PASSWORD not in message
    assert "db.example.com" in message  # the value is still quoted, minus the secret
    with pytest.raises(ConfigError) as caught:
        StoreConfig.from_env({"DATABASE_URL": raw})
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)


# --- masking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        (PG_URL, "postgresql+asyncpg://alice:***@db.example.com:5432/app"),
        ("postgresql+asyncpg://alice@h/app", "postgresql+asyncpg://alice@h/app"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
    ],
)
def test_mask_url(raw: str, masked: str) -> None:
    assert mask_url(raw) == masked
    assert PASSWORD not in mask_url(raw)


def test_mask_url_hides_the_password_of_an_unparseable_url() -> None:
    masked = mask_url(f"postgresql://alice:{PASSWORD}@db.example.com:bad/app")
    assert PASSWORD not in masked
    assert masked.startswith("postgresql://")
    assert masked.endswith("@db.example.com:bad/app")


@pytest.mark.parametrize("raw", ["", "nonsense", "::::", "a://@", "://x@y"])
def test_mask_url_never_raises(raw: str) -> None:
    assert isinstance(mask_url(raw), str)


def test_config_masks_the_password_everywhere() -> None:
    config = StoreConfig.from_url(f"postgres://alice:{PASSWORD}@db.example.com:5432/app")
    assert config.masked_url == "postgresql+asyncpg://alice:***@db.example.com:5432/app"
    assert isinstance(config.url, SecretStr)
    assert PASSWORD in config.url.get_secret_value()
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.model_dump())):
        assert PASSWORD not in text


def test_repr_does_not_show_encryption_keys() -> None:
    config = StoreConfig.from_url("sqlite:///x.db", encryption_keys="first-key-123,second-key-456")
    assert [key.get_secret_value() for key in config.encryption_keys] == [
        "first-key-123",
        "second-key-456",
    ]
    assert "first-key-123" not in repr(config)
    assert "second-key-456" not in str(config)


# --- from_env -------------------------------------------------------------------------------


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


# --- properties -----------------------------------------------------------------------------

# The "ZQX" prefix keeps a password from being a substring of the fixed text around it
# (a password of "max_ov" is "in" any StoreConfig repr without leaking anything).
SAFE_PASSWORDS = st.text(alphabet=string.ascii_letters + string.digits + "-_.~!$*", min_size=3).map(
    "ZQX".__add__
)
ANY_PASSWORDS = st.text(min_size=3).map("ZQX".__add__)

ERROR_TEMPLATES = [
    "mysql://alice:{}@db.example.com/app",
    "postgresql+psycopg2://alice:{}@db.example.com/app",
    "postgresql://alice:{}@db.example.com:notaport/app",
    "postgresql://alice:{}@db.example.com",
    "sqlite://alice:{}@db.example.com/x.db",
    "postgres:/alice:{}@db.example.com/app",
]


def _assume_password_is_distinctive(password: str, template: str) -> None:
    """Skip passwords that occur in the rest of the URL or in the fixed message text."""
    placeholder = template.format("PLACEHOLDER")
    with pytest.raises(ConfigError) as caught:
        normalise_url(placeholder)
    for text in (password, quote(password, safe="")):
        assume(text not in placeholder and text not in str(caught.value) + "***")


@given(password=SAFE_PASSWORDS)
def test_mask_url_hides_safe_passwords(password: str) -> None:
    url = f"postgresql+asyncpg://alice:{password}@db.example.com:5432/app"
    assume(password not in "postgresql+asyncpg://alice:***@db.example.com:5432/app")
    masked = mask_url(url)
    assert password not in masked
    assert make_url(masked).host == "db.example.com"
    config = StoreConfig.from_url(url)
    assert password not in config.masked_url
    assert password not in repr(config)


@given(password=ANY_PASSWORDS)
def test_mask_url_hides_percent_encoded_passwords(password: str) -> None:
    encoded = quote(password, safe="")
    url = f"postgres://alice:{encoded}@db.example.com/app"
    baseline = "postgresql+asyncpg://alice:***@db.example.com/app"
    assume(password not in baseline and encoded not in baseline)
    config = StoreConfig.from_url(url)
    assert make_url(config.url.get_secret_value()).password == password
    for text in (mask_url(url), config.masked_url, repr(config)):
        assert password not in text
        assert encoded not in text


@given(password=SAFE_PASSWORDS, template=st.sampled_from(ERROR_TEMPLATES))
def test_config_errors_hide_safe_passwords(password: str, template: str) -> None:
    _assume_password_is_distinctive(password, template)
    message = config_error_message(template.format(password))
    assert password not in message


@given(password=ANY_PASSWORDS, template=st.sampled_from(ERROR_TEMPLATES))
def test_config_errors_hide_percent_encoded_passwords(password: str, template: str) -> None:
    _assume_password_is_distinctive(password, template)
    encoded = quote(password, safe="")
    message = config_error_message(template.format(encoded))
    assert password not in message
    assert encoded not in message


HOSTS = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
SQLITE_PATHS = st.text(alphabet=string.ascii_letters + string.digits + "_-./ %", max_size=30)


@given(
    scheme=st.sampled_from(["postgres", "postgresql", "postgresql+asyncpg"]),
    # NUL is refused in a URL's user (its startup message cannot carry it); tested apart.
    user=st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=12),
    password=st.text(max_size=12),
    host=HOSTS,
    port=st.none() | st.integers(min_value=1, max_value=65535),
    database=NAMES,
)
def test_postgres_normalisation_round_trips_and_is_idempotent(
    scheme: str, user: str, password: str, host: str, port: int | None, database: str
) -> None:
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    raw = f"{scheme}://{netloc}{'' if port is None else f':{port}'}/{database}"
    once = normalise_url(raw)
    assert normalise_url(once) == once
    parsed = make_url(once)
    assert parsed.drivername == "postgresql+asyncpg"
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        user,
        password,
        host,
        port,
        database,
    )


@given(
    scheme=st.sampled_from(["sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"]),
    path=SQLITE_PATHS,
)
@example(scheme="sqlite", path="a%2520b.db")
def test_sqlite_normalisation_is_idempotent(scheme: str, path: str) -> None:
    once = normalise_url(f"{scheme}:///{path}")
    assert once.startswith("sqlite:///")
    assert normalise_url(once) == once
    config = StoreConfig.from_url(once)
    assert config.driver == "sqlite"
    assert config.url.get_secret_value() == once


@pytest.mark.parametrize(
    "query", ["?timeout=abc", "?application_name=x", "?sslmode=bogus", "?ssl=sometimes"]
)
def test_postgres_url_options_asyncpg_cannot_take_are_refused(query: str) -> None:
    with pytest.raises(ConfigError, match=r"option|must be one of"):
        StoreConfig.from_url(f"postgresql://u@h/db{query}")


@pytest.mark.postgres
@pytest.mark.parametrize("query", ["?sslmode=disable", "?sslmode=prefer", "?ssl=disable"])
async def test_postgres_ssl_options_reach_asyncpg(query: str) -> None:
    url = require_postgres()
    schema = fresh_schema_name()
    try:
        async with Store.from_url(f"{url}{query}", schema_name=schema, auto_upgrade=True) as s:
            assert (await s.health_check()).driver == "postgresql"
    finally:
        await drop_schema(url, schema)


@pytest.mark.parametrize("flag", ["auto_upgrade", "allow_plaintext_secrets"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_store_flags_are_bools(flag: str, value: object) -> None:
    with pytest.raises(ConfigError, match=flag):
        Store.from_url("sqlite:///:memory:", **{flag: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("auto_upgrade", [False, True])
async def test_a_sqlite_path_too_long_for_the_file_system_is_an_llmstore_error(
    tmp_path: Path, auto_upgrade: bool
) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path}/{'x/' * 3000}a.db", auto_upgrade=auto_upgrade)
    with pytest.raises(LlmstoreError) as raised:
        await store.open()
    assert len(str(raised.value)) < 1_000
