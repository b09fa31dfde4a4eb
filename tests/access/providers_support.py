"""Helpers shared by the ``test_providers_*`` modules (the provider credentials
repository, on every driver, single process)."""

from __future__ import annotations

import uuid

from llmstore import ProviderCredential, Store

GLOBAL = None


async def _everything(store: Store) -> list[ProviderCredential]:
    return await store.providers.list(limit=1000)


async def _active(store: Store, project_id: uuid.UUID | None) -> list[uuid.UUID]:
    """Ids of the active credentials in one scope (a project, or global for None)."""
    return [c.id for c in await _everything(store) if c.project_id == project_id and c.is_active]
