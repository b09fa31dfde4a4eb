"""``python -m llmstore prices ...``: import, list and set prices, each a call of
``store.prices``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any, TypeVar

from llmstore._core.config import StoreConfig
from llmstore._prices.records import OPTIONAL_PRICES, PRICE_FIELDS, Price, PriceImport
from llmstore._store import Store

from .commands import EXIT_OK, config_of

T = TypeVar("T")


def add_commands(
    subcommands: Any,
    common: argparse.ArgumentParser,
) -> None:
    """``prices import``, ``prices list`` and ``prices set``."""
    prices = subcommands.add_parser(
        "prices", help="the price table", description="the price table (store.prices)"
    )
    commands = prices.add_subparsers(dest="prices_command", required=True, metavar="COMMAND")
    text = (
        "seed the price table from the genai-prices package's bundled data (pip install "
        "'llmstore[prices]'); prices set by hand are kept"
    )
    sub = commands.add_parser("import", parents=[common], help=text, description=text)
    sub.add_argument(
        "--units-per-usd",
        required=True,
        type=_decimal,
        metavar="N",
        help="cost units per US dollar: 100 for cents, 1000000 for micro-dollars",
    )
    sub.set_defaults(handler=prices_import)
    text = "list the prices, per million tokens in the store's cost unit"
    sub = commands.add_parser("list", parents=[common], help=text, description=text)
    sub.add_argument("--provider", help="only this provider's prices")
    sub.add_argument("--model", help="only this model's prices")
    sub.add_argument("--source", choices=("manual", "genai-prices"), help="only these prices")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.set_defaults(handler=prices_list)
    text = "set a model's prices per million tokens (replacing the price from the same start)"
    sub = commands.add_parser("set", parents=[common], help=text, description=text)
    sub.add_argument("provider", metavar="PROVIDER")
    sub.add_argument("model", metavar="MODEL")
    sub.add_argument("--input", required=True, type=_decimal, metavar="PRICE")
    sub.add_argument("--output", required=True, type=_decimal, metavar="PRICE")
    for name in OPTIONAL_PRICES:
        fallback = "input" if name in ("cached_input", "cache_write", "audio_input") else "output"
        sub.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_decimal,
            metavar="PRICE",
            help=f"default: priced as {fallback}",
        )
    sub.add_argument(
        "--tier",
        dest="tiers",
        action="append",
        type=_tier,
        default=[],
        metavar="ABOVE:NAME=PRICE,...",
        help="prices above ABOVE prompt tokens, e.g. 200000:input=6,output=22.5 (repeatable)",
    )
    sub.add_argument(
        "--valid-from",
        type=_moment,
        metavar="TIME",
        help="an ISO 8601 time with its offset (default: undated)",
    )
    sub.add_argument("--json", action="store_true", help="print the price as JSON")
    sub.set_defaults(handler=prices_set)


def _decimal(text: str) -> Decimal:
    # Checked by the library; here only made a Decimal, never a float.
    try:
        return Decimal(text)
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"expected a decimal number, not {text!r}") from None


def _tier(text: str) -> dict[str, Any]:
    above, _, prices = text.partition(":")
    try:
        tier: dict[str, Any] = {"above": int(above)}
        for item in prices.split(","):
            name, _, value = item.partition("=")
            tier[name.strip().replace("-", "_")] = Decimal(value)
    except (ValueError, ArithmeticError):
        raise argparse.ArgumentTypeError(
            f"expected ABOVE:NAME=PRICE,... such as 200000:input=6,output=22.5, not {text!r}"
        ) from None
    return tier


def _moment(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2025-01-01T00:00:00+00:00, not {text!r}"
        ) from None


def _run(config: StoreConfig, call: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    async def run() -> T:
        async with Store(config) as store:
            return await call(store)

    return asyncio.run(run())


def _price_json(price: Price) -> str:
    return json.dumps(price.model_dump(mode="json"), ensure_ascii=False)


def _price_line(price: Price) -> str:
    when = "undated" if price.valid_from is None else f"from {price.valid_from:%Y-%m-%dT%H:%M:%SZ}"
    parts = [
        f"{name}={value}" for name in PRICE_FIELDS if (value := getattr(price, name)) is not None
    ]
    tiers = f" tiers={len(price.tiers)}" if price.tiers else ""
    return f"{price.provider}/{price.model} ({when}, {price.source}): {' '.join(parts)}{tiers}"


def prices_import(args: argparse.Namespace) -> int:
    config = config_of(args)
    done: PriceImport = _run(config, lambda s: s.prices.import_genai_prices(args.units_per_usd))
    print(
        f"{config.masked_url}: imported genai-prices: {done.written} written, "
        f"{done.unchanged} unchanged, {done.removed} removed, {done.kept_manual} model(s) "
        f"kept as set by hand, {done.skipped} not storable"
    )
    return EXIT_OK


def prices_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    found = _run(
        config,
        lambda s: s.prices.list(provider=args.provider, model=args.model, source=args.source),
    )
    for price in found:
        print(_price_json(price) if args.json else _price_line(price))
    return EXIT_OK


def prices_set(args: argparse.Namespace) -> int:
    config = config_of(args)
    optional = {name: getattr(args, name) for name in OPTIONAL_PRICES}
    price = _run(
        config,
        lambda s: s.prices.set(
            args.provider,
            args.model,
            input=args.input,
            output=args.output,
            tiers=args.tiers,
            valid_from=args.valid_from,
            **optional,
        ),
    )
    print(_price_json(price) if args.json else f"{config.masked_url}: set {_price_line(price)}")
    return EXIT_OK
