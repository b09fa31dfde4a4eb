"""What a proxy does per request: check a token, spend its quota, audit the refusal.

Runs on a private in-memory database, so it needs no set-up:

    python examples/proxy_tokens.py
"""

from __future__ import annotations

import asyncio

from llmstore import Store, TokenRejectedError, generate_key


async def handle_request(store: Store, bearer: str, client_ip: str) -> int:
    """The HTTP status a proxy would answer with."""
    try:
        token = await store.tokens.use(bearer)
    except TokenRejectedError as exc:  # a string of the wrong shape too: reason "unknown"
        await store.audit.record(
            "token.use", "proxy", "denied", client_ip=client_ip, metadata={"reason": exc.reason}
        )
        print(f"  {exc.http_status}: {exc.reason} ({exc.public_message})")
        return exc.http_status
    upstream = await store.providers.resolve(token.project_id)
    print(
        f"  200: call {upstream.provider}/{upstream.model}, "
        f"{token.remaining_requests} request(s) left"
    )
    return 200


async def main() -> None:
    # An encryption key is needed to store upstream API keys; use a fixed one in real life.
    async with Store.from_url("sqlite:///:memory:", encryption_keys=generate_key()) as store:
        project = await store.projects.create("demo", actor="admin@example.com")
        await store.providers.ensure_default("openai", "gpt-4o-mini", api_key="sk-upstream")
        issued = await store.tokens.create(project.id, max_requests=2, actor="admin@example.com")
        print(f"issued token {issued.token.prefix}... (the secret is shown only once)")

        statuses = [await handle_request(store, issued.secret, "203.0.113.7") for _ in range(3)]
        statuses.append(await handle_request(store, "not-a-token", "198.51.100.1"))
        assert statuses == [200, 200, 429, 401], statuses

        report = await store.audit.verify()
        events = await store.audit.list(limit=10)
        print(f"audit: {len(events)} event(s), chain intact: {report.ok}")
        for event in reversed(events):
            print(f"  #{event.seq} {event.action} by {event.actor}: {event.outcome}")


if __name__ == "__main__":
    asyncio.run(main())
