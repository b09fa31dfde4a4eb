"""``examples/fastapi_proxy.py`` against a mock upstream (``httpx.MockTransport``, no
network), through httpx's ASGI transport, on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmstore import Store, StoreConfig, migrations

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import fastapi_proxy

PROMPT, COMPLETION = 10, 20
COST = PROMPT * fastapi_proxy.PROMPT_PRICE + COMPLETION * fastapi_proxy.COMPLETION_PRICE
USAGE = {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION, "total_tokens": 30}
REQUEST = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
HOLD, TOKENS_BOUND = fastapi_proxy.estimate(REQUEST)


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def _stream() -> bytes:
    base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o"}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"content": "hel"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": USAGE},
    ]
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


class Upstream:
    """The mock upstream: counts its calls and checks what the proxy sends it."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_with: int | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        assert request.headers["authorization"] == "Bearer sk-upstream"
        body = json.loads(request.content)
        await asyncio.sleep(0.001)  # a real await: requests interleave
        if self.fail_with is not None:
            return httpx.Response(self.fail_with, json={"error": {"message": "upstream down"}})
        if body.get("stream"):
            assert body["stream_options"] == {"include_usage": True}
            return httpx.Response(
                200, content=_stream(), headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(200, json=_completion())


@pytest.fixture
async def migrated(db_config: StoreConfig) -> StoreConfig:
    await migrations.upgrade(db_config, backup=False)
    return db_config


def _app(config: StoreConfig, upstream: Upstream) -> Any:
    return fastapi_proxy.create_app(
        config.url.get_secret_value(),
        upstream_url="https://upstream.test",
        upstream_key="sk-upstream",
        transport=httpx.MockTransport(upstream),
        schema_name=config.schema_name,
        encryption_keys=config.encryption_keys,
    )


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


async def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")


def _auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def _usage_rows(config: StoreConfig) -> list[Any]:
    async with Store(config) as store:
        return await store.usage.list(limit=1000)


async def test_a_request_is_authenticated_held_settled_and_logged(
    migrated: StoreConfig, upstream: Upstream
) -> None:
    app = _app(migrated, upstream)
    async with app.router.lifespan_context(app), await _client(app) as client:
        store: Store = app.state.proxy.store
        key = await store.api_keys.create(balance=1000)

        whole = await client.post("/v1/chat/completions", json=REQUEST, headers=_auth(key.secret))
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["message"]["content"] == "hello"
        assert (await store.api_keys.get(key.key.id)).balance == 1000 - COST

        streamed = await client.post(
            "/v1/chat/completions", json={**REQUEST, "stream": True}, headers=_auth(key.secret)
        )
        assert streamed.status_code == 200
        assert streamed.text.endswith("data: [DONE]\n\n") and '"lo"' in streamed.text
        after = await store.api_keys.get(key.key.id)
        assert (after.balance, after.reserved) == (1000 - 2 * COST, 0)

        upstream.fail_with = 503
        failed = await client.post("/v1/chat/completions", json=REQUEST, headers=_auth(key.secret))
        assert failed.status_code == 503
        assert (await store.api_keys.get(key.key.id)).balance == 1000 - 2 * COST  # released
        assert (await store.api_keys.verify()).ok
        assert (await store.budgets.verify()).ok
    rows = await _usage_rows(migrated)
    assert sorted((row.is_streaming, row.status_code, row.cost) for row in rows) == [
        (False, 200, COST),
        (False, 503, 0),
        (True, 200, COST),
    ]
    assert all(row.api_key_id == key.key.id and row.prompt_tokens in (0, PROMPT) for row in rows)


async def test_refusals_are_answered_with_status_and_public_message(
    migrated: StoreConfig, upstream: Upstream
) -> None:
    app = _app(migrated, upstream)
    async with app.router.lifespan_context(app), await _client(app) as client:
        store: Store = app.state.proxy.store
        poor = await store.api_keys.create(balance=HOLD - 1)
        post = client.post
        cases = [
            (await post("/v1/chat/completions", json=REQUEST), 401, "invalid API key"),
            (
                await post("/v1/chat/completions", json=REQUEST, headers=_auth("sk-proj-abc")),
                401,
                "invalid API key",
            ),
            (
                await post(
                    "/v1/chat/completions",
                    json=REQUEST,
                    headers={"authorization": f"Basic {poor.secret}"},
                ),
                401,
                "invalid API key",
            ),
            (
                await post("/v1/chat/completions", json=REQUEST, headers=_auth(poor.secret)),
                402,
                "insufficient balance",
            ),
            (
                await post(
                    "/v1/chat/completions", content=b"{not json", headers=_auth(poor.secret)
                ),
                400,
                "invalid request",
            ),
            (
                await post(
                    "/v1/chat/completions",
                    json={**REQUEST, "max_tokens": -1},
                    headers=_auth(poor.secret),
                ),
                400,
                "invalid request",
            ),
        ]
        for response, status, message in cases:
            assert (response.status_code, response.json()["error"]["message"]) == (status, message)
            assert poor.secret not in response.text
        assert upstream.calls == 0
        assert (await store.api_keys.get(poor.key.id)).balance == HOLD - 1
    assert await _usage_rows(migrated) == []


async def test_budgets_and_rate_limits_are_answered_429_with_retry_after(
    migrated: StoreConfig, upstream: Upstream
) -> None:
    app = _app(migrated, upstream)
    async with app.router.lifespan_context(app), await _client(app) as client:
        store: Store = app.state.proxy.store
        key = await store.api_keys.create(balance=100 * HOLD)
        budget = await store.budgets.create(HOLD + COST, end_user="alice", period="day")
        limit = await store.rate_limits.create(requests=3, per="hour", api_key_id=key.key.id)
        alice = {**REQUEST, "user": "alice"}
        for _ in range(2):
            ok = await client.post("/v1/chat/completions", json=alice, headers=_auth(key.secret))
            assert ok.status_code == 200, ok.text
        # Alice's budget: a hold fits after one request settled at COST, not after two.
        over = await client.post("/v1/chat/completions", json=alice, headers=_auth(key.secret))
        assert (over.status_code, over.json()["error"]["message"]) == (429, "budget exceeded")
        assert 0 < int(over.headers["retry-after"]) <= 86_400
        # The key's rate limit: a third request, then refused until the hour is over.
        bob = {**REQUEST, "user": "bob"}
        third = await client.post("/v1/chat/completions", json=bob, headers=_auth(key.secret))
        assert third.status_code == 200
        limited = await client.post("/v1/chat/completions", json=bob, headers=_auth(key.secret))
        assert (limited.status_code, limited.json()["error"]["message"]) == (
            429,
            "rate limit exceeded",
        )
        assert 0 < int(limited.headers["retry-after"]) <= 3600
        assert upstream.calls == 3
        status = await store.budgets.status(budget.id)
        assert (status.spent, status.reserved) == (2 * COST, 0)
        window = await store.rate_limits.status(limit.id)
        # Settled with the tokens the upstream reported, not the estimate.
        assert (window.requests, window.tokens) == (3, 3 * (PROMPT + COMPLETION))
        assert (await store.api_keys.get(key.key.id)).balance == 100 * HOLD - 3 * COST


@pytest.mark.slow
async def test_200_concurrent_requests_over_5_keys_two_of_them_too_poor(
    migrated: StoreConfig, upstream: Upstream
) -> None:
    app = _app(migrated, upstream)
    # Each key gets 40 requests: the first three can hold all of them at once, the last two
    # cannot hold even one.
    deposits = [40 * HOLD, 40 * HOLD + 7, 45 * HOLD, HOLD - 1, COST]
    async with app.router.lifespan_context(app), await _client(app) as client:
        store: Store = app.state.proxy.store
        keys = [await store.api_keys.create(balance=amount) for amount in deposits]

        async def call(n: int) -> tuple[int, int]:
            key = keys[n % len(keys)]
            body = {**REQUEST, "stream": n % 3 == 0}
            reply = await client.post("/v1/chat/completions", json=body, headers=_auth(key.secret))
            return n % len(keys), reply.status_code

        results = await asyncio.gather(*(call(n) for n in range(200)))
        statuses = [status for _, status in results]
        assert 500 not in statuses
        assert set(statuses) <= {200, 402}
        assert all(status == 200 for k, status in results if k < 3)
        for index, deposit in enumerate(deposits):
            served = sum(1 for k, status in results if k == index and status == 200)
            key = await store.api_keys.get(keys[index].key.id)
            assert (key.balance, key.reserved) == (deposit - served * COST, 0), index
            if index >= 3:
                assert served == 0
        assert (await store.api_keys.verify()).ok
    rows = await _usage_rows(migrated)
    assert len(rows) == statuses.count(200) == upstream.calls
    assert len({row.request_id for row in rows}) == len(rows)
    assert statuses.count(402) == sum(1 for k, _ in results if k >= 3)
