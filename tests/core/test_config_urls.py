"""StoreConfig: the error type, normalising URLs, and masking passwords."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from llmstore import ConfigError, LlmstoreError, StoreConfig
from llmstore._core.config import mask_url, normalise_url
from tests.core.config_support import (
    PASSWORD,
    PG_URL,
    _clean_environment,  # noqa: F401 (an autouse fixture)
    config_error_message,
)

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
