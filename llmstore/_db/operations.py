"""Each operation written once: a synchronous body on a connection, run as one unit.

A domain's public repository (``store.projects``, ``tx.projects``) subclasses
:class:`Repository` and writes each operation as a method ``(self, conn, ...)``
decorated with :func:`reads` or :func:`writes`. The decorator makes it the public async
method ``(self, ...)``: the same name, parameters and docstring, its validation in the
body, and the unit handed to the repository's runner, which decides how it reaches the
database (a thread hop, ``run_sync``, a savepoint inside ``store.transaction()``).

Whether a unit is one statement (``single``, run in autocommit where the runner can) is
stated once, on the decorator. ``"unless_audited"``: one statement unless the call passes
an ``actor``, whose audit event is then written in the same transaction.

Inside another unit, ``Repository.operation.run_in(repository, conn, ...)`` runs the
body on that unit's connection (one operation composed of others).

A hot write that the runner can send as one statement (``runner.one_statement_writes``)
goes through :func:`first_or_explain`: the statement, and only when it changed nothing a
read that says why, tried again while the answer is "it would succeed now".
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

from sqlalchemy.engine import Connection

from llmstore._core.errors import ConfigError, ConflictError, ValidationError
from llmstore._core.ids import utcnow
from llmstore._core.validate import check_aware

from .lean import LeanStatement, Row
from .runner import Runner

__all__ = ["Clock", "Operation", "Repository", "Single", "first_or_explain", "reads", "writes"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="Repository")
T = TypeVar("T")
Single = bool | Literal["unless_audited"]
#: The store's clock: the time expiries, holds, periods and windows are decided by.
Clock = Callable[[], dt.datetime]
ATTEMPTS = 5


class Repository:
    """The base of a public repository: it holds the runner its operations run on and
    the store's clock (the system's UTC time unless ``Store(clock=...)`` gave another)."""

    def __init__(self, runner: Runner, clock: Clock | None = None) -> None:
        self._runner = runner
        self._clock = clock

    def now(self) -> dt.datetime:
        """The store clock's time, timezone-aware UTC."""
        if self._clock is None:
            return utcnow()
        try:
            value = self._clock()
        except Exception as exc:  # the caller's code: reported as its configuration's fault
            raise ConfigError(f"the store's clock failed ({type(exc).__name__})") from exc
        try:
            return check_aware(value, "the store's clock")
        except ValidationError as exc:
            raise ConfigError(f"{exc} (Store(clock=...) must return aware datetimes)") from None


class Operation(Generic[S, P, R]):
    """A body ``(self, conn, *args)`` that reads as the async method ``(self, *args)``."""

    def __init__(
        self,
        body: Callable[Concatenate[S, Connection, P], R],
        *,
        write: bool,
        single: Single,
        snapshot: bool,
    ) -> None:
        self.body = body
        self.write = write
        self.single = single
        self.snapshot = snapshot
        self.name = body.__name__
        self.__doc__ = body.__doc__
        signature = inspect.signature(body)
        parameters = list(signature.parameters.values())
        # The public method's signature: the body's without ``conn``.
        self.signature = signature.replace(parameters=[parameters[0], *parameters[2:]])

    @property
    def __signature__(self) -> inspect.Signature:
        # As an unbound method's: the body's parameters without ``conn``.
        return self.signature

    def __call__(self, repository: S, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """``Projects.get(store.projects, ...)``, as an unbound method is called."""
        bound: Callable[P, Coroutine[Any, Any, R]] = getattr(repository, self.name)
        return bound(*args, **kwargs)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Operation[S, P, R]: ...

    @overload
    def __get__(self, instance: S, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, R]]: ...

    def __get__(
        self, instance: S | None, owner: type[Any]
    ) -> Operation[S, P, R] | Callable[P, Coroutine[Any, Any, R]]:
        if instance is None:
            return self
        bound = self._bind(instance)
        # Cached on the instance (a non-data descriptor): the next lookup is a dict hit.
        instance.__dict__[self.name] = bound
        return bound

    def _bind(self, repository: S) -> Callable[P, Coroutine[Any, Any, R]]:
        body = self.body
        runner = repository._runner
        write, single, snapshot = self.write, self.single, self.snapshot

        @functools.wraps(body)
        async def operation(*args: P.args, **kwargs: P.kwargs) -> R:
            def unit(conn: Connection) -> R:
                return body(repository, conn, *args, **kwargs)

            one = kwargs.get("actor") is None if single == "unless_audited" else bool(single)
            if write:
                return await runner.write(unit, single=one)
            return await runner.read(unit, single=one, snapshot=snapshot)

        operation.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            list(self.signature.parameters.values())[1:],
            return_annotation=self.signature.return_annotation,
        )
        return operation

    def run_in(self, repository: S, conn: Connection, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the body on ``conn``, inside a unit that is already running."""
        return self.body(repository, conn, *args, **kwargs)


def reads(
    *, single: bool = True, snapshot: bool = False
) -> Callable[[Callable[Concatenate[S, Connection, P], R]], Operation[S, P, R]]:
    """An operation that only reads. ``single``: it runs one statement (the default);
    ``snapshot``: its statements see one snapshot of the database."""

    def decorate(body: Callable[Concatenate[S, Connection, P], R]) -> Operation[S, P, R]:
        return Operation(body, write=False, single=single, snapshot=snapshot)

    return decorate


def writes(
    *, single: Single = False
) -> Callable[[Callable[Concatenate[S, Connection, P], R]], Operation[S, P, R]]:
    """An operation that writes, whole or not at all. ``single``: it is one statement
    (``"unless_audited"``: unless the call passes an ``actor``)."""

    def decorate(body: Callable[Concatenate[S, Connection, P], R]) -> Operation[S, P, R]:
        return Operation(body, write=True, single=single, snapshot=False)

    return decorate


async def first_or_explain(
    runner: Runner,
    statement: LeanStatement,
    params: Callable[[], Mapping[str, Any]],
    convert: Callable[[Row], T],
    explain: Callable[[Connection], T | None],
    *,
    conflict: str,
    explain_writes: bool = False,
) -> T:
    """Run a conditional write as one statement; when it writes nothing, ask why.

    ``params()`` is called for each attempt (a fresh time, a fresh id). ``explain`` reads
    the rows the condition is about and raises the caller's error (unknown, too little
    money), returns the result found instead (an idempotent replay), or returns None: the
    condition holds now, a concurrent change came between, and the statement is tried
    again. After :data:`ATTEMPTS` such rounds it is a ``ConflictError(conflict)``.
    ``explain_writes``: ``explain`` may write (it clears what was in the way), so it runs
    as a write unit.
    """
    for _ in range(ATTEMPTS):
        try:
            row = await runner.lean_first(statement, params())
        except ConflictError:
            # A unique index refused the INSERT (a racing call's idempotency key): the
            # statement was undone whole, its balance change with it; explain() finds it.
            row = None
        if row is not None:
            return convert(row)
        if explain_writes:
            found = await runner.write(explain)
        else:
            found = await runner.read(explain, single=True)
        if found is not None:
            return found
    raise ConflictError(conflict)
