"""Usage logging in a proxy: buffered writes, a metrics report, and a signed receipt.

Run it after `python -m llmstore upgrade` (on the default SQLite file, data/llmstore.db).
The receipt part needs a signing key:

    export LLMSTORE_RECEIPT_SIGNING_KEY=$(python -m llmstore receipts generate-key)
    python examples/usage_logging.py
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import uuid

from llmstore import Store, UsageRecord, verify_receipt

MODELS = {"gpt-4o": "openai", "claude-sonnet": "anthropic", "llama-70b": "groq"}


async def main() -> None:
    async with Store.from_env() as store:
        api_key_id = uuid.uuid4()
        started = dt.datetime.now(dt.UTC)

        # In a proxy the writer lives as long as the app (its lifespan); each request
        # puts one row and moves on. Leaving the block writes everything still queued.
        async with store.usage.writer(max_batch=100, flush_interval=0.2) as writer:
            for n in range(250):
                model = random.choice(list(MODELS))
                ok = random.random() > 0.05
                await writer.put(
                    UsageRecord(
                        request_id=f"req-{uuid.uuid4()}",
                        api_key_id=api_key_id,
                        model=model,
                        provider=MODELS[model],
                        success=ok,
                        status_code=200 if ok else 502,
                        is_streaming=n % 3 == 0,
                        response_time_ms=random.randint(200, 4000),
                        prompt_tokens=random.randint(50, 2000),
                        completion_tokens=random.randint(10, 800),
                        cost=random.randint(100, 5000),
                    )
                )
            print(f"queued 250 rows; {writer.stats.pending} still pending before close")
        print(f"written: {writer.stats.written}, failed attempts: {writer.stats.failed_attempts}")

        report = await store.usage.metrics(
            since=started, group_by=("model",), api_key_id=api_key_id
        )
        for row in report:
            print(
                f"{row.group['model']:>14}: {row.requests} requests, "
                f"{row.success_rate:.0%} ok, p50 {row.p50_response_time_ms} ms, "
                f"p95 {row.p95_response_time_ms} ms, cost {row.cost}"
            )

        newest = (await store.usage.list(api_key_id=api_key_id, limit=1))[0]
        if not os.environ.get("LLMSTORE_RECEIPT_SIGNING_KEY"):
            print("no LLMSTORE_RECEIPT_SIGNING_KEY: skipping the receipt")
            return
        receipt = await store.usage.issue_receipt(newest.id)
        public_key = receipt.public_key
        kept = receipt.model_dump_json()  # what the customer keeps
        print(f"receipt {receipt.id} for row {newest.id}: valid={verify_receipt(kept, public_key)}")
        payload = receipt.payload.replace(f'"cost":{newest.cost}', f'"cost":{newest.cost + 1}')
        assert payload != receipt.payload
        forged = receipt.model_copy(update={"payload": payload})
        print(f"with the cost changed: valid={verify_receipt(forged, public_key)}")


if __name__ == "__main__":
    asyncio.run(main())
