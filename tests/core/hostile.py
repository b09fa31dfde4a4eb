"""Hostile inputs for the sweep in ``test_hostile_inputs``: the values, and the world of rows
each store starts from.

The values are what a proxy may be handed by a client, or by a buggy caller: text with NUL,
lone surrogates and control characters, over-long text, numbers out of every range, bools
and numeric strings where numbers belong, JSON nested thousands deep, paths no file system
takes, and objects whose ``__repr__``, ``__str__``, ``__eq__``, ``__hash__`` or ``__bool__``
raise (or whose ``repr()`` is a megabyte).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from llmstore import Store, UsageRecord

UTC = dt.UTC
FUTURE = dt.datetime(2099, 1, 1, tzinfo=UTC)
PAST = dt.datetime(2000, 1, 1, tzinfo=UTC)
# The boundary of JSON nesting (llmstore._core.validate.JSON_MAX_DEPTH) and far beyond it.
JSON_DEPTH = 32


class Boom(Exception):
    """What the hostile objects raise: never an llmstore error, so a leak is seen as one."""


class RaisingObject:
    """Every dunder a validator might touch raises."""

    def __repr__(self) -> str:
        raise Boom("__repr__")

    def __str__(self) -> str:
        raise Boom("__str__")

    def __eq__(self, other: object) -> bool:
        raise Boom("__eq__")

    def __hash__(self) -> int:
        raise Boom("__hash__")

    def __bool__(self) -> bool:
        raise Boom("__bool__")


class HugeRepr:
    """A megabyte of repr(): a message that embeds it is no longer an error message."""

    def __repr__(self) -> str:
        return "x" * 1_000_000

    __str__ = __repr__


class HostileStr(str):
    """Valid text whose own methods raise: accepted as its plain value, or refused."""

    def __eq__(self, other: object) -> bool:
        raise Boom("__eq__")

    def __hash__(self) -> int:
        raise Boom("__hash__")

    def __repr__(self) -> str:
        raise Boom("__repr__")

    def __str__(self) -> str:
        raise Boom("__str__")


class HostileInt(int):
    """A valid number whose comparisons and conversions raise."""

    def __eq__(self, other: object) -> bool:
        raise Boom("__eq__")

    def __lt__(self, other: object) -> bool:
        raise Boom("__lt__")

    __le__ = __gt__ = __ge__ = __lt__

    def __hash__(self) -> int:
        raise Boom("__hash__")

    def __repr__(self) -> str:
        raise Boom("__repr__")

    def __index__(self) -> int:
        raise Boom("__index__")


class RaisingMapping(Mapping[str, Any]):
    """A mapping that cannot be read."""

    def __getitem__(self, key: str) -> Any:
        raise Boom("__getitem__")

    def __iter__(self) -> Iterator[str]:
        raise Boom("__iter__")

    def __len__(self) -> int:
        return 1


class RaisingPath(os.PathLike[str]):
    def __fspath__(self) -> str:
        raise Boom("__fspath__")


def nested(depth: int, *, lists: bool = False) -> dict[str, Any]:
    """A JSON object ``depth`` levels deep (the outer object is level 1); with ``lists``,
    every other level is an array."""
    value: Any = {}
    for level in range(depth - 1, 0, -1):
        value = [value] if lists and level % 2 == 0 else {"a": value}
    return dict(value)


def cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


TEXT = [
    "",
    " ",
    "42",
    "-1",
    "1.5",
    "true",
    "\x00",
    "a\x00b",
    "\ud800",
    "a\udcffb",
    "\x01",
    "\t",
    "\n",
    "\x1f",
    "\x7f",
    "\x85",
    "\x9f",
    "\u2028",
    "\U0001f600",
    "x" * 100_000,
    "é" * 300,
]
NUMBERS: list[object] = [
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**5000,
    -(10**5000),
    0.0,
    -0.0,
    1.5,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
]
OBJECTS: list[object] = [
    None,
    b"bytes",
    bytearray(b"x"),
    [],
    (),
    {},
    set(),
    object(),
    RaisingObject(),
    HugeRepr(),
    HostileStr("plain"),
    HostileInt(5),
    RaisingMapping(),
    RaisingPath(),
    uuid.UUID(int=0),
    dt.datetime(2026, 1, 1),  # naive
    dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=1))),  # before year 1 in UTC
    dt.datetime.max.replace(tzinfo=UTC),
    dt.timedelta(0),
    -dt.timedelta(days=1),
    dt.timedelta.max,
    dt.date(2026, 1, 1),
]
JSONS: list[object] = [
    nested(JSON_DEPTH),
    nested(JSON_DEPTH + 1),
    nested(3000),
    nested(JSON_DEPTH, lists=True),
    nested(JSON_DEPTH + 1, lists=True),
    cyclic(),
    {"a": math.nan},
    {"a": [math.inf]},
    {1: "int key"},
    {"a": {2: "nested int key"}},
    {"a": "\x00"},
    {"\x00": 1},
    {"a": "\ud800"},
    {"\udcff": 1},
    {"a": b"bytes"},
    {"a": {1, 2}},
    {"a": 10**5000},
    {"a": RaisingObject()},
    {"a": HostileStr("plain")},
    {"a": "x" * 20_000},
    {str(n): n for n in range(5000)},
    {"a": RaisingMapping()},
]
PATHS: list[object] = [
    "/",
    "/proc/no.csv",
    "/nonexistent-dir/x.jsonl",
    "x" * 300 + ".csv",
    "a/" * 3000 + "x.csv",
    "e\x00.csv",
    "e\ud800.csv",
    "e.txt",
    ".csv",
    Path("nonexistent-dir") / "x.csv",
]
#: Every deterministic hostile value: each argument of each public method meets all of them.
VALUES: list[object] = [*TEXT, *NUMBERS, *OBJECTS, *JSONS, *PATHS]


def label(value: object) -> str:
    """A short, safe name of a value for a failure message (never its repr())."""
    if isinstance(value, str) and type(value) is str:
        more = f"... ({len(value)} characters)" if len(value) > 40 else ""
        return ascii(value[:40]) + more
    if isinstance(value, int) and type(value) is int and abs(value) > 10**30:
        return f"int of {value.bit_length()} bits"
    if value is None or type(value) in (int, float, bool):
        return ascii(value)
    return type(value).__name__


# --- hypothesis strategies -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Hostile:
    """A drawn value, wrapped so that hypothesis can print it (its own repr may raise)."""

    value: object

    def __repr__(self) -> str:
        return f"Hostile({label(self.value)})"


def _one_of(values: list[object]) -> st.SearchStrategy[object]:
    # Not sampled_from: hypothesis prints a strategy's values, and these may not print.
    def pick(index: int) -> object:
        return values[index]

    return st.integers(0, len(values) - 1).map(pick)


_SPECIAL = st.sampled_from(["\x00", "\ud800", "\udfff", "\x85", "\x9f", "\x7f", "\x1f", "\n", " "])
_CHARS = _SPECIAL | st.characters(exclude_categories=())
TEXTS = st.text(_CHARS, max_size=30) | st.text(_CHARS, min_size=190, max_size=260)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | TEXTS
    | _one_of([2**63, -(2**63) - 1, 10**5000])
)
JSON_LIKE = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(TEXTS | st.integers(), inner, max_size=3)
        | st.tuples(inner)
    ),
    max_leaves=12,
)
_ZONES = (
    st.none()
    | st.just(UTC)
    | st.builds(
        dt.timezone,
        st.timedeltas(min_value=-dt.timedelta(hours=23), max_value=dt.timedelta(hours=23)),
    )
)
HOSTILE = (
    _one_of(VALUES)
    | _SCALARS
    | JSON_LIKE
    | st.integers(JSON_DEPTH - 2, JSON_DEPTH + 2).map(nested)
    | st.binary(max_size=8)
    | st.datetimes(timezones=_ZONES)
    | st.timedeltas()
    | st.uuids()
    | st.uuids().map(str)
).map(Hostile)

# --- the rows each store starts from ---------------------------------------------------------


@dataclasses.dataclass
class World:
    """Rows that valid arguments name, one set per store; made the same way on each."""

    store: Store
    cwd: Path
    project_id: uuid.UUID
    project_name: str
    token_id: uuid.UUID
    token_secret: str
    event_id: uuid.UUID
    credential_id: uuid.UUID
    key_id: uuid.UUID
    key_secret: str
    other_key_id: uuid.UUID
    reservation_id: uuid.UUID
    withdrawal_id: uuid.UUID
    usage_id: int
    receipt_id: uuid.UUID
    budget_id: uuid.UUID
    rate_limit_id: uuid.UUID
    admission_id: uuid.UUID
    counter: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{next(self.counter)}"


TOKEN = "cashuAeyJ0b2tlbiI6W3sicHJvb2ZzIjpbXX1dfQ"
MINT = "https://mint.example.com/v1"


async def build_world(store: Store, cwd: Path) -> World:
    cwd.mkdir(parents=True, exist_ok=True)
    project = await store.projects.create("world", api_key="sk-world")
    issued = await store.tokens.create(project.id, name="world")
    event = await store.audit.record("world.made", "tests", "success")
    credential = await store.providers.create("openai", "gpt-4o", api_key="sk-p")
    key = await store.api_keys.create(2**62, project.id)
    other = await store.api_keys.create(0)
    hold = await store.api_keys.reserve(key.key.id, 10)
    payout = await store.api_keys.withdraw(key.key.id, 10, TOKEN, MINT)
    result = await store.usage.record(UsageRecord(model="m", cost=3, request_id="world"))
    usage_id = result.ids[0]
    assert usage_id is not None
    receipt = await store.usage.issue_receipt(usage_id)
    budget = await store.budgets.create(2**62, project_id=project.id, period="month")
    limit = await store.rate_limits.create(requests=2**62, per="hour", project_id=project.id)
    admission = await store.admissions.admit(key.secret, cost=5, tokens=50)
    return World(
        store=store,
        cwd=cwd,
        project_id=project.id,
        project_name=project.name,
        token_id=issued.token.id,
        token_secret=issued.secret,
        event_id=event.id,
        credential_id=credential.id,
        key_id=key.key.id,
        key_secret=key.secret,
        other_key_id=other.key.id,
        reservation_id=hold.id,
        withdrawal_id=payout.id,
        usage_id=usage_id,
        receipt_id=receipt.id,
        budget_id=budget.id,
        rate_limit_id=limit.id,
        admission_id=admission.id,
    )
