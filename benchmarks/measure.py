"""Measuring: warm-up, timed rounds in rotating order, and each variant's ops/s per round
(the report shows their medians)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

from .common import VARIANTS, Context, Driver, OpCall, Operation, PreparedCall, Variant


@dataclass
class Result:
    driver: Driver
    operation: str
    samples: dict[Variant, list[float]]  # ops/s, one per round

    def median(self, variant: Variant) -> float:
        return statistics.median(self.samples[variant])


async def timed(call: OpCall, ops: int) -> float:
    """Ops per second of ``ops`` sequential calls (a PreparedCall's input built untimed)."""
    gc.collect()
    if not isinstance(call, PreparedCall):
        start = time.perf_counter()
        for _ in range(ops):
            await call()
        return ops / (time.perf_counter() - start)
    busy = 0.0
    for _ in range(ops):
        call.prepare()
        gc.collect()
        start = time.perf_counter()
        await call()
        busy += time.perf_counter() - start
    return ops / busy


async def untimed(call: OpCall, ops: int) -> None:
    for _ in range(ops):
        if isinstance(call, PreparedCall):
            call.prepare()
        await call()


def calls_per_round(operation: Operation, ops: int) -> tuple[int, int]:
    """(timed calls per round, warm-up calls): a bulk operation's ``max_ops`` caps ``ops``."""
    cap: int | None = getattr(operation, "max_ops", None)
    if cap is None:
        return ops, min(ops, max(50, ops // 10))
    ops = min(ops, cap)
    return ops, max(1, ops // 10)


async def bench(ctx: Context, name: str, operation: Operation, ops: int, rounds: int) -> Result:
    calls: dict[Variant, OpCall] = {
        "llmstore": await operation.llmstore(ctx),
        "raw": await operation.raw(ctx),
        "orm": await operation.orm(ctx),
    }
    ops, warmup = calls_per_round(operation, ops)
    for call in calls.values():
        await untimed(call, warmup)
    samples: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(rounds):
        # Rotate the order so no variant always runs first (or after the same neighbour).
        shift = round_ % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            samples[variant].append(await timed(calls[variant], ops))
    return Result(ctx.driver, name, samples)
