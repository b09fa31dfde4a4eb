"""Running test workers as separate OS processes (spawned) against one database."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from llmstore import Store, StoreConfig

READY_TIMEOUT = 120.0
T = TypeVar("T")


def failure(exc: BaseException, what: str | None = None) -> str:
    """How a worker reports an exception it caught (it never lets one escape)."""
    described = f"{type(exc).__name__}: {exc}"
    return described if what is None else f"{what}: {described}"


def config_json(config: StoreConfig) -> str:
    """The config as JSON for a worker; secret fields serialise masked, so reveal them."""
    data = config.model_dump()
    data["url"] = config.url.get_secret_value()
    data["encryption_keys"] = [key.get_secret_value() for key in config.encryption_keys]
    for field in ("token_pepper", "receipt_signing_key"):
        secret = getattr(config, field)
        data[field] = None if secret is None else secret.get_secret_value()
    return json.dumps(data)


async def open_and_wait(
    config_json: str,
    ready: Any,
    start: Any,
    work: Callable[[Store], Awaitable[T]],
    *,
    clock: Callable[[], dt.datetime] | None = None,
) -> T:
    """Open a store, wait for every worker (and the parent), start on the event, work.

    ``clock``: the store's clock (the system's by default)."""
    async with Store(StoreConfig.model_validate_json(config_json), clock=clock) as store:
        ready.wait(READY_TIMEOUT)
        if not start.wait(READY_TIMEOUT):
            raise RuntimeError("the start event was never set")
        return await work(store)


async def run_workers(
    entry: Callable[..., Any], args: Sequence[tuple[Any, ...]], *, round_barrier: bool = False
) -> list[Any]:
    """Run ``entry(*args[i], ready, start[, barrier])`` in one process per worker."""
    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    try:
        ready = manager.Barrier(len(args) + 1)
        start = manager.Event()
        extra = (manager.Barrier(len(args)),) if round_barrier else ()
        with context.Pool(len(args)) as pool:
            pending = [
                pool.apply_async(entry, (*worker_args, ready, start, *extra))
                for worker_args in args
            ]
            # Every worker has opened its store: a worker process runs one task at a time,
            # so the barrier also proves that the workers are distinct processes. If one
            # failed to start, the barrier breaks and its get() below raises its error.
            with contextlib.suppress(threading.BrokenBarrierError):
                await asyncio.to_thread(ready.wait, READY_TIMEOUT)
            start.set()
            return await asyncio.to_thread(lambda: [p.get(timeout=240) for p in pending])
    finally:
        manager.shutdown()
