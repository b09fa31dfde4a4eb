"""The llmstore error hierarchy (driver exceptions are translated in ``_db.translate``).

::

    LlmstoreError
    ├── ConfigError               bad or missing configuration
    ├── ValidationError           bad input, refused before anything is written
    ├── NotFoundError             no row with that id or name
    ├── TokenRejectedError        tokens.use() refused a token; ``.reason`` says why
    ├── ApiKeyRejectedError       api_keys.authenticate() refused a key; ``.reason`` says why
    ├── InsufficientBalanceError  the available balance does not cover the amount
    ├── RateLimitedError          a rate limit's window is full; ``.retry_after`` seconds
    ├── BudgetExceededError       a budget has no room left in its period; ``.resets_at``
    ├── ConflictError             a uniqueness or state conflict
    │   └── IdempotencyConflictError  an idempotency key reused with other parameters
    ├── StoreClosedError          the store is not open (never opened, or closed)
    ├── EventLoopError            the store was used from another event loop than its own
    ├── WriterClosedError         a usage writer was given a row after it closed
    ├── UnwrittenUsageError       a usage writer stopped with rows unwritten (``.records``)
    ├── ExportError               a purge could not write its export; that batch stays
    ├── TransactionError          a transaction used the wrong way
    ├── SchemaError
    │   ├── SchemaOutOfDateError  the database is behind the installed code
    │   └── UnknownRevisionError  the database is at a revision this code does not know
    ├── MigrationError            a migration command failed
    ├── BackupError               a backup could not be made, checked or restored
    └── DatabaseError             any other failure reported by the database
        └── DatabaseUnavailableError  the database cannot be reached (or stayed locked)
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from llmstore._usage.records import UsageRecord


class LlmstoreError(Exception):
    """Base class of every error llmstore raises.

    ``http_status`` is the status a web framework answers it with, and ``public_message``
    a text safe to show the client: a fixed text per class (and reason), never the
    message itself, which may name a table, quote a driver or echo an argument.
    """

    #: The HTTP status that answers this error (500 unless a subclass says otherwise).
    http_status: int = 500
    _public: ClassVar[str] = "internal error"

    @property
    def public_message(self) -> str:
        """Text safe to show a client: never a secret, a digest, SQL or a driver message."""
        return self._public


class ConfigError(LlmstoreError):
    """The configuration is missing, malformed or contradictory."""


class ValidationError(LlmstoreError):
    """An argument was refused before anything was written."""

    http_status = 400
    _public = "invalid request"


class NotFoundError(LlmstoreError):
    """No row exists with the given id or name."""

    http_status = 404
    _public = "not found"


TokenRejectionReason = Literal[
    "unknown", "inactive", "project_inactive", "expired", "quota_exhausted"
]


class TokenRejectedError(LlmstoreError):
    """``tokens.use()`` refused the token; ``reason`` is one of ``TokenRejectionReason``.

    The message never quotes the secret.
    """

    http_status = 401

    def __init__(self, reason: TokenRejectionReason, message: str | None = None) -> None:
        super().__init__(message or f"token rejected: {reason.replace('_', ' ')}")
        self.reason: TokenRejectionReason = reason
        if reason == "quota_exhausted":
            self.http_status = 429  # the token is good: it has used up its requests

    @property
    def public_message(self) -> str:
        """Text safe to show a client, by reason."""
        return _TOKEN_REJECTIONS[self.reason]


ApiKeyRejectionReason = Literal["unknown", "inactive", "expired"]


class ApiKeyRejectedError(LlmstoreError):
    """The key was refused; ``reason`` is ``unknown``, ``inactive`` or ``expired``."""

    http_status = 401

    def __init__(self, reason: ApiKeyRejectionReason) -> None:
        super().__init__(f"API key rejected: {reason}")
        self.reason: ApiKeyRejectionReason = reason

    @property
    def public_message(self) -> str:
        """Text safe to show a client, by reason."""
        return _KEY_REJECTIONS[self.reason]


class InsufficientBalanceError(LlmstoreError):
    """The key's available balance (``balance - reserved``) is less than requested."""

    http_status = 402
    _public = "insufficient balance"

    def __init__(self, available: int, requested: int) -> None:
        super().__init__(f"insufficient balance: {available} available, {requested} requested")
        self.available = available
        self.requested = requested


class RateLimitedError(LlmstoreError):
    """A rate limit has no room for the request in its current window.

    ``retry_after`` is whole seconds until the window ends (at least 1), ready for a
    ``Retry-After`` header; ``rate_limit_id`` names the limit.
    """

    http_status = 429
    _public = "rate limit exceeded"

    def __init__(self, rate_limit_id: uuid.UUID, retry_after: int) -> None:
        super().__init__(f"rate limit {rate_limit_id} exceeded: retry after {retry_after} s")
        self.rate_limit_id = rate_limit_id
        self.retry_after = retry_after


class BudgetExceededError(LlmstoreError):
    """A budget has no room for the request's cost in its current period.

    ``remaining`` is what the period has left (never negative); ``resets_at`` when the
    next period begins (None for a lifetime budget), and ``retry_after`` the whole
    seconds until then (None likewise), for a ``Retry-After`` header.
    """

    http_status = 429
    _public = "budget exceeded"

    def __init__(
        self,
        budget_id: uuid.UUID,
        remaining: int,
        resets_at: dt.datetime | None,
        retry_after: int | None,
    ) -> None:
        when = "never resets" if resets_at is None else f"resets at {resets_at.isoformat()}"
        super().__init__(f"budget {budget_id} exceeded: {remaining} remaining, {when}")
        self.budget_id = budget_id
        self.remaining = remaining
        self.resets_at = resets_at
        self.retry_after = retry_after


class ConflictError(LlmstoreError):
    """The change conflicts with existing data, for example a duplicate name."""

    http_status = 409
    _public = "conflict with existing data"


class IdempotencyConflictError(ConflictError):
    """An idempotency key was used again with different parameters."""

    _public = "idempotency key already used with other parameters"


class StoreClosedError(LlmstoreError):
    """The store was used before ``open()`` or after ``close()``."""


class EventLoopError(LlmstoreError):
    """The store was used from an event loop other than the one it was opened in.

    A store's connections and locks belong to its event loop: open one store per loop
    (per thread running ``asyncio.run``, say).
    """


class WriterClosedError(LlmstoreError):
    """A usage writer was given a row after ``close()`` began, or after it stopped."""


class UnwrittenUsageError(LlmstoreError):
    """A usage writer stopped with rows it had not written; ``records`` holds them, in order.

    Raised by ``close(timeout=...)`` when the timeout passed first, and by ``close()`` when
    the store was closed under the writer. The writer has let go of these records and will
    never write them: they are the caller's to save elsewhere.
    """

    def __init__(self, message: str, records: Sequence[UsageRecord]) -> None:
        super().__init__(message)
        self.records: list[UsageRecord] = list(records)


class ExportError(LlmstoreError):
    """Writing a purge's export file failed; the batch being exported was not deleted."""


class TransactionError(LlmstoreError):
    """A transaction was misused: nested, reused after its end, or bypassed."""


class SchemaError(LlmstoreError):
    """The database schema does not match the installed code."""


class SchemaOutOfDateError(SchemaError):
    """The database is behind the installed code: run ``python -m llmstore upgrade``."""


class UnknownRevisionError(SchemaError):
    """The database is at a schema revision the installed code does not know."""


class MigrationError(LlmstoreError):
    """A migration command failed; the message names the revision when known."""


class BackupError(LlmstoreError):
    """A backup could not be made, checked or restored; the database was left as it was."""


class DatabaseError(LlmstoreError):
    """The database reported a failure that is not one of the more specific errors."""


class DatabaseUnavailableError(DatabaseError):
    """The database could not be reached, or stayed locked past the busy timeout."""

    http_status = 503
    _public = "service unavailable"


_KEY_REJECTIONS: dict[str, str] = {
    "unknown": "invalid API key",
    "inactive": "API key inactive",
    "expired": "API key expired",
}

_TOKEN_REJECTIONS: dict[str, str] = {
    "unknown": "invalid token",
    "inactive": "token inactive",
    "project_inactive": "project inactive",
    "expired": "token expired",
    "quota_exhausted": "token quota exhausted",
}


def _public_module(error: type[LlmstoreError]) -> None:
    # Printed as ``llmstore.ValidationError``, where users import it, not the private path.
    error.__module__ = "llmstore"
    for subclass in error.__subclasses__():
        _public_module(subclass)


_public_module(LlmstoreError)
