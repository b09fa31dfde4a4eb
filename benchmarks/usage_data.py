"""Realistic usage rows for the benchmarks: a proxy's traffic, reproducible from a seed.

About 20 models across 5 providers (a few models take most requests), a pool of API keys
where a few keys send most of the traffic (Zipf-like), projects owning keys, token counts
that vary per model, 2% failures, and a unique ``request_id`` per row. Values are plain
Python (aware datetimes, UUIDs, ints, floats, dicts): the field names and types of
``llmstore.UsageRecord``, so ``UsageRecord(**row)`` takes them as they are.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
import uuid
from collections.abc import Iterator
from typing import Any, Final

#: (provider, model, price per 1k prompt tokens, per 1k completion tokens, in minor units)
MODELS: Final = (
    ("openai", "gpt-4o", 250, 1000),
    ("openai", "gpt-4o-mini", 15, 60),
    ("openai", "gpt-4.1", 200, 800),
    ("openai", "gpt-4.1-mini", 40, 160),
    ("openai", "o3-mini", 110, 440),
    ("anthropic", "claude-sonnet-4", 300, 1500),
    ("anthropic", "claude-haiku-3.5", 80, 400),
    ("anthropic", "claude-opus-4", 1500, 7500),
    ("google", "gemini-2.5-pro", 125, 1000),
    ("google", "gemini-2.5-flash", 30, 250),
    ("google", "gemini-2.0-flash", 10, 40),
    ("mistral", "mistral-large", 200, 600),
    ("mistral", "mistral-small", 10, 30),
    ("mistral", "codestral", 30, 90),
    ("meta", "llama-3.3-70b", 60, 60),
    ("meta", "llama-3.1-8b", 5, 5),
    ("meta", "llama-4-scout", 10, 30),
    ("meta", "llama-4-maverick", 20, 60),
    ("openai", "gpt-3.5-turbo", 50, 150),
    ("anthropic", "claude-3-opus", 1500, 7500),
)
#: A few models take most requests, as in real traffic.
MODEL_WEIGHTS: Final = tuple(1.0 / (rank + 1) for rank in range(len(MODELS)))
FINISH_REASONS: Final = ("stop", "stop", "stop", "length", "tool_calls")
ERRORS: Final = ((429, "rate_limited"), (500, "upstream_error"), (503, "overloaded"))


class UsageRows:
    """An endless, reproducible stream of usage rows for one benchmark run."""

    def __init__(self, *, keys: int = 1_000, projects: int = 50, seed: int = 7) -> None:
        self._random = random.Random(seed)
        make_id = (
            uuid.UUID(int=self._random.getrandbits(128), version=4) for _ in itertools.count()
        )
        self.project_ids = [next(make_id) for _ in range(projects)]
        self.api_key_ids = [next(make_id) for _ in range(keys)]
        self.key_projects = {key: self._random.choice(self.project_ids) for key in self.api_key_ids}
        # Zipf-like: the key at rank r sends about 1/r of the busiest key's traffic.
        self.key_weights = [1.0 / (rank + 1) for rank in range(keys)]
        self._serial = itertools.count()
        self._run = uuid.UUID(int=self._random.getrandbits(128), version=4).hex[:8]

    def rows(self, count: int, start: dt.datetime, span: dt.timedelta) -> Iterator[dict[str, Any]]:
        """``count`` rows with ``created_at`` spread at random over ``[start, start + span)``."""
        choose = self._random
        models = choose.choices(MODELS, MODEL_WEIGHTS, k=count)
        keys = choose.choices(self.api_key_ids, self.key_weights, k=count)
        microseconds = int(span / dt.timedelta(microseconds=1))
        for (provider, model, prompt_price, completion_price), key in zip(
            models, keys, strict=True
        ):
            prompt = int(choose.lognormvariate(6.5, 1.0))  # median ~665 tokens
            completion = int(choose.lognormvariate(5.0, 0.9))  # median ~150 tokens
            cached = prompt // 2 if choose.random() < 0.3 else 0
            response_ms = 200 + int(completion * choose.uniform(8, 25))
            first_ms = 80 + int(choose.expovariate(1 / 300))
            success = choose.random() >= 0.02
            status, error = (200, None) if success else choose.choice(ERRORS)
            streaming = choose.random() < 0.6
            yield {
                "created_at": start + dt.timedelta(microseconds=choose.randrange(microseconds)),
                "api_key_id": key,
                "project_id": self.key_projects[key],
                "request_id": f"req-{self._run}-{next(self._serial)}",
                "provider": provider,
                "model": model,
                "origin": "proxy",
                "is_streaming": streaming,
                "success": success,
                "status_code": status,
                "response_time_ms": response_ms,
                "time_to_first_token_ms": min(first_ms, response_ms) if streaming else None,
                "tokens_per_second": round(completion / (response_ms / 1000), 2),
                "prompt_tokens": prompt if success else 0,
                "completion_tokens": completion if success else 0,
                "cached_tokens": cached if success else 0,
                "cost": (prompt * prompt_price + completion * completion_price) // 1000
                if success
                else 0,
                "finish_reason": choose.choice(FINISH_REASONS) if success else None,
                "max_tokens": 4096,
                "temperature": 0.7,
                "error_type": error,
            }
