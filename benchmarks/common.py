"""What every part of the harness shares: the drivers and variants, the timed call's type,
the per-driver :class:`Context`, the :class:`Operation` protocol, ids and times, and the
Postgres URL."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llmstore import Store, StoreConfig

from .raw_driver import RawDB

Driver = Literal["sqlite", "postgres"]
Variant = Literal["llmstore", "raw", "orm"]

DRIVERS: Final[tuple[Driver, ...]] = ("sqlite", "postgres")
VARIANTS: Final[tuple[Variant, ...]] = ("llmstore", "raw", "orm")
POSTGRES_URL_VARIABLE: Final = "LLMSTORE_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_URL: Final = "postgresql://postgres@127.0.0.1:5432/test"

#: What an operation's variant hands back: one call is one timed operation.
OpCall = Callable[[], Awaitable[object]]

In = TypeVar("In")


class PreparedCall(Generic[In]):
    """A timed call that takes fresh input each time (a batch of new rows, say).

    The harness calls ``prepare()`` before each call and times only the call itself.
    """

    def __init__(self, build: Callable[[], In], call: Callable[[In], Awaitable[object]]) -> None:
        self._build = build
        self._call = call
        self._input: list[In] = []

    def prepare(self) -> None:
        self._input.append(self._build())

    async def __call__(self) -> object:
        return await self._call(self._input.pop())


@dataclass
class Context:
    """One database, three ways in: the open ``Store``, the raw connection, the ORM's
    session factory."""

    driver: Driver
    store: Store
    raw: RawDB
    orm: async_sessionmaker[AsyncSession]


class Operation(Protocol):
    """One benchmarked operation; each method sets up (untimed) and returns the timed call."""

    description: str

    async def llmstore(self, ctx: Context) -> OpCall: ...

    async def raw(self, ctx: Context) -> OpCall: ...

    async def orm(self, ctx: Context) -> OpCall: ...


# Ids as llmstore makes them: UUID version 7, strictly increasing within the process. The
# 74 bits after the millisecond count up within it from a random start (RFC 9562, method 2);
# here they are kept with the millisecond as one number, ``(millis << 74) | counter``.
_COUNTER_BITS: Final = 74
_id_lock = threading.Lock()
_last_id = 0


def new_id() -> uuid.UUID:
    """A time-ordered id, like the ones llmstore gives its rows."""
    global _last_id
    with _id_lock:
        millis = time.time_ns() // 1_000_000
        if millis > _last_id >> _COUNTER_BITS:
            # A random start with its top bit clear: room for 2**73 ids in the millisecond.
            start = int.from_bytes(os.urandom(10), "big") >> (80 - _COUNTER_BITS + 1)
            _last_id = (millis << _COUNTER_BITS) | start
        else:
            _last_id += 1  # an exhausted counter carries into the next millisecond
        stamp, counter = _last_id >> _COUNTER_BITS, _last_id & ((1 << _COUNTER_BITS) - 1)
    high, low = counter >> 62, counter & ((1 << 62) - 1)
    return uuid.UUID(int=(stamp << 80) | (0x7 << 76) | (high << 64) | (0x2 << 62) | low)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def secret_digest(secret: str) -> str:
    """What llmstore stores and looks up (without ``LLMSTORE_TOKEN_PEPPER``): SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def unique_names(prefix: str) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in itertools.count())


def postgres_url() -> str:
    return os.environ.get(POSTGRES_URL_VARIABLE, "").strip() or DEFAULT_POSTGRES_URL


def postgres_dsn(url: str) -> str:
    """``url`` (``postgresql://``, ``postgres://`` or ``postgresql+asyncpg://``) as asyncpg
    takes it."""
    orm_url = StoreConfig.from_url(url).url.get_secret_value()  # postgresql+asyncpg://
    return make_url(orm_url).set(drivername="postgresql").render_as_string(hide_password=False)


def masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
