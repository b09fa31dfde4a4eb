"""Helpers shared by the ``test_tokens_*`` modules (the tokens repository, on every
driver, single process)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from llmstore import Store, TokenRejectedError

HYPOTHESIS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


async def _rejected(store: Store, secret: str, reason: str, *, cache_hit: bool = False) -> None:
    """use() refuses ``secret`` for ``reason`` and changes no token."""
    before = await store.tokens.list(limit=1000)
    with pytest.raises(TokenRejectedError) as info:
        await store.tokens.use(secret, cache_hit=cache_hit)
    assert info.value.reason == reason
    assert secret not in str(info.value)
    assert await store.tokens.list(limit=1000) == before
