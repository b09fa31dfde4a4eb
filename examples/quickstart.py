"""Quickstart: open the store configured by the environment and use the projects repository.

Run it after `python -m llmstore upgrade` (on the default SQLite file, data/llmstore.db):

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import os

from llmstore import NotFoundError, Store


async def main() -> None:
    async with Store.from_env() as store:
        health = await store.health_check()
        print(f"connected: {health.driver}, schema {health.revision}, {health.latency_ms:.2f} ms")

        try:
            project = await store.projects.get_by_name("quickstart")
            print(f"found project {project.name} ({project.id})")
        except NotFoundError:
            # An upstream key is only stored encrypted: it needs LLMSTORE_ENCRYPTION_KEYS.
            api_key = (
                "sk-example-upstream-key" if os.environ.get("LLMSTORE_ENCRYPTION_KEYS") else None
            )
            project = await store.projects.create("quickstart", api_key=api_key)
            print(f"created project {project.name} ({project.id})")

        async with store.transaction() as tx:
            renamed = await tx.projects.update(project.id, name="quickstart-renamed")
            await tx.projects.update(renamed.id, name="quickstart")

        active = await store.projects.list(active=True)
        print(f"{len(active)} active project(s); has upstream key: {project.has_api_key}")


if __name__ == "__main__":
    asyncio.run(main())
