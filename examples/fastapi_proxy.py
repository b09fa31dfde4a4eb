"""An OpenAI-compatible ``/v1/chat/completions`` proxy on llmstore, in FastAPI.

Per request, one call decides everything before the upstream is called
(``admissions.admit``): the bearer key is authenticated, every rate limit and budget of the
key, its project and the request's ``user`` is checked and counted, and an estimate of the
cost is held on the key's balance and on every budget, or nothing is. After the upstream
call the actual cost is settled from the usage it reports (``admissions.settle``, cost 0
for a failed call), and one usage row is queued on the writer. Streamed responses are
passed through as they come and settled from their final usage chunk. Every llmstore
error is answered with its ``http_status`` and ``public_message``, and a rate limit or an
exhausted budget with a ``Retry-After`` header.

    pip install fastapi uvicorn httpx
    export LLMSTORE_ENCRYPTION_KEYS=$(python -m llmstore generate-key)
    python -m llmstore upgrade
    UPSTREAM_URL=https://api.openai.com UPSTREAM_API_KEY=sk-... \\
        uvicorn examples.fastapi_proxy:app

Prices are whole minor units per token (integers, as every amount in llmstore).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmstore import (
    Admission,
    ApiKeyRejectedError,
    BudgetExceededError,
    LlmstoreError,
    RateLimitedError,
    Store,
    UsageRecord,
    UsageWriter,
    ValidationError,
)
from llmstore.extract import usage_from_response, usage_from_stream_chunk

PROMPT_PRICE = 1  # per prompt token
COMPLETION_PRICE = 3  # per completion token
DEFAULT_MAX_TOKENS = 1024
HOLD_FOR = dt.timedelta(minutes=10)


@dataclass
class Proxy:
    store: Store
    writer: UsageWriter
    upstream: httpx.AsyncClient
    upstream_key: str


def estimate(body: Mapping[str, Any]) -> tuple[int, int]:
    """Upper bounds of the cost and the tokens: every character a token, all of max_tokens."""
    prompt = len(json.dumps(body.get("messages", []), ensure_ascii=False))
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    if type(max_tokens) is not int or max_tokens < 1:
        raise ValidationError("max_tokens must be a positive integer")
    return max(1, prompt * PROMPT_PRICE + max_tokens * COMPLETION_PRICE), prompt + max_tokens


def cost(fields: Mapping[str, Any]) -> int:
    return int(
        fields.get("prompt_tokens", 0) * PROMPT_PRICE
        + fields.get("completion_tokens", 0) * COMPLETION_PRICE
    )


def create_app(
    store_url: str | None = None,
    *,
    upstream_url: str | None = None,
    upstream_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **store_options: Any,
) -> FastAPI:
    """The app; ``transport`` replaces the network (tests pass ``httpx.MockTransport``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store.from_url(store_url, **store_options) if store_url else Store.from_env()
        async with (
            store,
            store.usage.writer() as writer,
            httpx.AsyncClient(
                base_url=upstream_url or os.environ.get("UPSTREAM_URL", "https://api.openai.com"),
                transport=transport,
                timeout=httpx.Timeout(60.0, connect=5.0),
            ) as client,
        ):
            app.state.proxy = Proxy(
                store, writer, client, upstream_key or os.environ.get("UPSTREAM_API_KEY", "")
            )
            yield

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(LlmstoreError)
    async def llmstore_error(request: Request, exc: LlmstoreError) -> JSONResponse:
        error = {"message": exc.public_message, "type": type(exc).__name__}
        headers = {}
        if isinstance(exc, RateLimitedError | BudgetExceededError) and exc.retry_after:
            headers["Retry-After"] = str(exc.retry_after)
        return JSONResponse({"error": error}, status_code=exc.http_status, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        proxy: Proxy = request.app.state.proxy
        secret = _bearer(request)
        body = await _json_body(request)
        cost_bound, tokens_bound = estimate(body)
        user = body.get("user")
        admission = await proxy.store.admissions.admit(
            secret,
            end_user=user if isinstance(user, str) and user.strip() else None,
            cost=cost_bound,
            tokens=tokens_bound,
            ttl=HOLD_FOR,
        )
        call = _Call(proxy, admission, body)
        if body.get("stream"):
            return await call.stream()
        return await call.whole()

    return app


def _bearer(request: Request) -> str:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        raise ApiKeyRejectedError("unknown")
    return secret.strip()


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ValidationError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return body


class _Call:
    """One upstream call, which ends by settling or releasing its admission exactly once."""

    def __init__(self, proxy: Proxy, admission: Admission, body: dict[str, Any]):
        self.proxy, self.admission, self.body = proxy, admission, body
        self.started = time.monotonic()
        self.request_id = f"req-{uuid.uuid4()}"
        self.headers = {"authorization": f"Bearer {proxy.upstream_key}"}

    async def whole(self) -> Response:
        try:
            reply = await self.proxy.upstream.post(
                "/v1/chat/completions", json=self.body, headers=self.headers
            )
        except BaseException:
            await self.proxy.store.admissions.release(self.admission.id)
            raise
        if reply.status_code != 200:
            await self.proxy.store.admissions.release(self.admission.id)
            await self._log({}, status=reply.status_code, streaming=False)
            return Response(reply.content, reply.status_code, media_type="application/json")
        data = reply.json()
        try:
            fields = usage_from_response(data)
        except ValidationError:
            fields = {}  # no usage reported: charge nothing rather than guess
        await self._finish(fields, status=200, streaming=False)
        return JSONResponse(data)

    async def stream(self) -> Response:
        body = {**self.body, "stream_options": {"include_usage": True}}
        request = self.proxy.upstream.build_request(
            "POST", "/v1/chat/completions", json=body, headers=self.headers
        )
        try:
            reply = await self.proxy.upstream.send(request, stream=True)
        except BaseException:
            await self.proxy.store.admissions.release(self.admission.id)
            raise
        if reply.status_code != 200:
            content = await reply.aread()
            await reply.aclose()
            await self.proxy.store.admissions.release(self.admission.id)
            await self._log({}, status=reply.status_code, streaming=True)
            return Response(content, reply.status_code, media_type="application/json")
        return StreamingResponse(self._relay(reply), media_type="text/event-stream")

    async def _relay(self, reply: httpx.Response) -> AsyncIterator[bytes]:
        fields: dict[str, Any] = {}
        finished = False
        try:
            async for line in reply.aiter_lines():
                yield (line + "\n").encode()
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        part = usage_from_stream_chunk(json.loads(line[len("data: ") :]))
                    except (ValueError, ValidationError):
                        part = None
                    fields.update(part or {})
            finished = True
        finally:
            # Shielded: a client that went away cancels this generator, and it still pays
            # for what the upstream reported, and frees the rest of its hold.
            with anyio.CancelScope(shield=True):
                await reply.aclose()
                await self._finish(fields, status=200 if finished else 499, streaming=True)

    async def _finish(self, fields: Mapping[str, Any], *, status: int, streaming: bool) -> None:
        # The actual cost (0 when nothing was reported) and token count replace the
        # estimates in the key, the budgets and the rate limits, once.
        charged = cost(fields)
        tokens = int(fields.get("prompt_tokens", 0) + fields.get("completion_tokens", 0))
        await self.proxy.store.admissions.settle(self.admission.id, charged, tokens=tokens)
        await self._log(fields, status=status, streaming=streaming, charged=charged)

    async def _log(
        self, fields: Mapping[str, Any], *, status: int, streaming: bool, charged: int = 0
    ) -> None:
        await self.proxy.writer.put(
            UsageRecord(
                **fields,
                request_id=self.request_id,
                api_key_id=self.admission.api_key_id,
                project_id=self.admission.project_id,
                provider="openai",
                is_streaming=streaming,
                success=status == 200,
                status_code=status,
                response_time_ms=int((time.monotonic() - self.started) * 1000),
                cost=charged,
            )
        )


app = create_app()
