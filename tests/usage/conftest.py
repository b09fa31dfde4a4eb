"""Fixtures shared by the signed receipts' tests (``test_receipts_*.py``): a signing key,
its public key, and a store that signs with it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llmstore import Store, StoreConfig
from llmstore._core.signing import generate_signing_key
from llmstore._usage.receipts import configured_public_key
from tests.usage.receipts_support import KEY_VARIABLE


@pytest.fixture
def signing_key() -> str:
    return generate_signing_key()


@pytest.fixture
def public_key(signing_key: str) -> str:
    return configured_public_key({KEY_VARIABLE: signing_key})


@pytest.fixture
async def signed(store: Store, signing_key: str) -> AsyncIterator[Store]:
    """A second store on the ``store`` fixture's database, holding a signing key.

    On sqlite-memory it is a database of its own (memory is not shared between stores).
    """
    config = StoreConfig.model_validate({**dict(store.config), "receipt_signing_key": signing_key})
    async with Store(config) as other:
        yield other
