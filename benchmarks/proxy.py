"""``python -m benchmarks.proxy``: ``examples/fastapi_proxy.py`` against itself without
llmstore, per driver.

Both apps answer ``POST /v1/chat/completions`` alike: the bearer and the JSON body read,
the estimate computed, the upstream called, its usage read and the cost computed, the
upstream's JSON returned. The example also admits the request (``admissions.admit``),
settles it and queues its usage row on the writer; the plain one does nothing else.

Everything runs in this one process and event loop, over ``httpx``'s in-process
transports (no sockets, no server): the clients (``--concurrency`` at a time), the proxy
(an ASGI app) and the upstream (``httpx.MockTransport``, a fixed reply). So the ratio is
that of the whole request's cost in this process, the clients' and the upstream's
included: a real server and a real upstream add the same time to both apps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmstore import Store, StoreConfig, generate_key
from llmstore.extract import usage_from_response
from llmstore.migrations import upgrade

from .common import DRIVERS, Driver, masked, postgres_dsn, postgres_url
from .databases import drop_schema, postgres_unreachable

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_proxy.py"
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
REPLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}
UPSTREAM_URL = "http://upstream.invalid"


def example() -> ModuleType:
    """``examples/fastapi_proxy.py`` (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("fastapi_proxy", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastapi_proxy"] = module  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


def upstream() -> httpx.MockTransport:
    body = json.dumps(REPLY).encode()

    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    return httpx.MockTransport(reply)


def plain_app(proxy: ModuleType) -> FastAPI:
    """The example's request handling without llmstore."""
    client: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=UPSTREAM_URL, transport=upstream()
        ) as upstream_client:
            client["upstream"] = upstream_client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.json()
        proxy.estimate(body)
        reply = await client["upstream"].post(
            "/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-upstream"}
        )
        data = reply.json()
        proxy.cost(usage_from_response(data))
        return JSONResponse(data)

    return app


async def load(app: FastAPI, secret: str, requests: int, concurrency: int) -> list[float]:
    """Send ``requests`` requests, ``concurrency`` at a time; each one's seconds."""
    latencies: list[float] = []
    left = requests
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://proxy"
    ) as client:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                started = time.perf_counter()
                reply = await client.post("/v1/chat/completions", json=REQUEST, headers=headers)
                latencies.append(time.perf_counter() - started)
                if reply.status_code != 200:
                    raise RuntimeError(f"the proxy answered {reply.status_code}: {reply.text}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


@contextlib.asynccontextmanager
async def database(driver: Driver) -> AsyncIterator[dict[str, Any]]:
    """A migrated database for the example: its ``create_app`` arguments."""
    keys = generate_key()
    if driver == "sqlite":
        with tempfile.TemporaryDirectory(prefix="llmstore-proxy-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'proxy.db'}"
            await upgrade(StoreConfig.from_url(url), backup=False)
            yield {"store_url": url, "encryption_keys": keys}
        return
    url = postgres_url()
    schema = f"bench_proxy_{secrets.token_hex(6)}"
    try:
        await upgrade(StoreConfig.from_url(url, schema_name=schema), backup=False)
        yield {"store_url": url, "schema_name": schema, "encryption_keys": keys}
    finally:
        await drop_schema(postgres_dsn(url), schema)


async def _tenant(store: Store) -> str:
    """A project with a budget and a rate limit, its funded key; the key's secret."""
    project = await store.projects.create("proxy")
    issued = await store.api_keys.create(balance=10**15, project_id=project.id)
    await store.budgets.create(10**15, project_id=project.id, period="month")
    await store.rate_limits.create(requests=10**12, per="minute", api_key_id=issued.key.id)
    return issued.secret


async def measure(
    driver: Driver, *, requests: int, concurrency: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Per app: (requests per second at ``concurrency``, p50 ms one at a time), medians."""
    proxy = example()
    async with database(driver) as options:
        store_url = options.pop("store_url")
        with_llmstore = proxy.create_app(
            store_url,
            upstream_url=UPSTREAM_URL,
            upstream_key="sk-upstream",
            transport=upstream(),
            **options,
        )
        without = plain_app(proxy)
        apps: dict[str, FastAPI] = {"with llmstore": with_llmstore, "without": without}
        throughput: dict[str, list[float]] = {name: [] for name in apps}
        light: dict[str, list[float]] = {name: [] for name in apps}
        async with (
            with_llmstore.router.lifespan_context(with_llmstore),
            without.router.lifespan_context(without),
        ):
            secret = await _tenant(with_llmstore.state.proxy.store)
            for app in apps.values():  # warm up: connections, prepared statements
                await load(app, secret, max(requests // 10, 10), concurrency)
            for round_number in range(rounds):
                order = list(apps.items())
                if round_number % 2:
                    order.reverse()
                for name, app in order:
                    started = time.perf_counter()
                    await load(app, secret, requests, concurrency)
                    throughput[name].append(requests / (time.perf_counter() - started))
                    single = await load(app, secret, max(requests // 10, 10), 1)
                    light[name].append(statistics.median(single) * 1000)
    return {
        name: (statistics.median(throughput[name]), statistics.median(light[name])) for name in apps
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.proxy",
        description="examples/fastapi_proxy.py against itself without llmstore, in process",
    )
    parser.add_argument("--driver", choices=[*DRIVERS, "all"], default="all")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and app")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; medians are shown")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    drivers: list[Driver] = list(DRIVERS) if args.driver == "all" else [args.driver]
    print(
        f"{args.requests} requests per round and app, {args.concurrency} in flight, "
        f"{args.rounds} rounds (medians); p50 one request at a time"
    )
    print(
        f"{'driver':9} {'with req/s':>11} {'without req/s':>14} {'ratio':>6} {'p50 added ms':>13}"
    )
    for driver in drivers:
        if driver == "postgres":
            if await postgres_unreachable(postgres_url()):
                if args.driver == "postgres":
                    return 1
                continue
            print(f"postgres: {masked(postgres_url())}")
        found = await measure(
            driver, requests=args.requests, concurrency=args.concurrency, rounds=args.rounds
        )
        (with_rate, with_p50), (without_rate, without_p50) = (
            found["with llmstore"],
            found["without"],
        )
        print(
            f"{driver:9} {with_rate:11,.0f} {without_rate:14,.0f} {with_rate / without_rate:6.2f}"
            f" {with_p50 - without_p50:13.2f}"
        )
    return 0


def main(argv: Sequence[str] | None = None, *, run: Callable[..., Any] = asyncio.run) -> int:
    return int(run(main_async(parse(argv))))


if __name__ == "__main__":
    raise SystemExit(main())
