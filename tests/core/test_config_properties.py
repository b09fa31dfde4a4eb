"""StoreConfig: properties (a password is never shown, normalising is idempotent), and
the options asyncpg or the file system refuse."""

from __future__ import annotations

import string
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from llmstore import ConfigError, LlmstoreError, Store, StoreConfig
from llmstore._core.config import mask_url, normalise_url
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.core.config_support import (
    _clean_environment,  # noqa: F401 (an autouse fixture)
    config_error_message,
)
from tests.helpers import require_postgres

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
