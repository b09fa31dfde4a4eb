"""Constants, the environment fixture and a helper shared by the ``test_config_*``
modules (StoreConfig)."""

from __future__ import annotations

import pytest

from llmstore import ConfigError, StoreConfig

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
