"""The llmstore error hierarchy and the one place where driver exceptions are translated.

::

    LlmstoreError
    ├── ConfigError               bad or missing configuration
    ├── ValidationError           bad input, refused before anything is written
    ├── NotFoundError             no row with that id or name
    ├── TokenRejectedError        tokens.use() refused a token; ``.reason`` says why
    ├── ApiKeyRejectedError       api_keys.authenticate() refused a key; ``.reason`` says why
    ├── InsufficientBalanceError  the available balance does not cover the amount
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

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar, Literal

import sqlalchemy.exc

if TYPE_CHECKING:
    from ._usage_records import UsageRecord


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
        return _TOKEN_REJECTIONS[self.reason]


ApiKeyRejectionReason = Literal["unknown", "expired"]


class ApiKeyRejectedError(LlmstoreError):
    """``api_keys.authenticate()`` refused the key; ``reason`` is ``unknown`` or ``expired``."""

    http_status = 401

    def __init__(self, reason: ApiKeyRejectionReason) -> None:
        super().__init__(f"API key rejected: {reason}")
        self.reason: ApiKeyRejectionReason = reason

    @property
    def public_message(self) -> str:
        return "API key expired" if self.reason == "expired" else "invalid API key"


class InsufficientBalanceError(LlmstoreError):
    """The key's available balance (``balance - reserved``) is less than requested."""

    http_status = 402
    _public = "insufficient balance"

    def __init__(self, available: int, requested: int) -> None:
        super().__init__(f"insufficient balance: {available} available, {requested} requested")
        self.available = available
        self.requested = requested


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


_TOKEN_REJECTIONS: dict[str, str] = {
    "unknown": "invalid token",
    "inactive": "token inactive",
    "project_inactive": "project inactive",
    "expired": "token expired",
    "quota_exhausted": "token quota exhausted",
}


# SQLSTATE codes (Postgres) and extended result names (SQLite) of integrity failures.
_PG_CONFLICT = {"23505", "23P01"}
_PG_NOT_FOUND = {"23503"}
_PG_INVALID = {"23502", "23514", "22001", "22003", "22P02", "22007", "22008"}
_SQLITE_CONFLICT = {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}
_SQLITE_NOT_FOUND = {"SQLITE_CONSTRAINT_FOREIGNKEY"}
_SQLITE_BUSY = {"SQLITE_BUSY", "SQLITE_BUSY_SNAPSHOT", "SQLITE_BUSY_TIMEOUT", "SQLITE_LOCKED"}
# SQLSTATE class 28: the server refused the credentials (no such role, a wrong password).
_PG_CREDENTIALS = "28"


def _driver_code(orig: BaseException | None) -> str:
    if orig is None:
        return ""
    for attribute in ("sqlstate", "pgcode", "sqlite_errorname"):
        code = getattr(orig, attribute, None)
        if isinstance(code, str):
            return code
    cause = orig.__cause__
    return _driver_code(cause) if cause is not orig else ""


def translate(exc: BaseException) -> LlmstoreError | None:
    """Map a driver or SQLAlchemy exception to an llmstore error, or None if it is not one.

    The message never quotes statement parameters: they may hold digests or ciphertext.
    """
    if isinstance(exc, LlmstoreError):
        return exc
    if isinstance(exc, sqlalchemy.exc.StatementError):
        orig = exc.orig
        code = _driver_code(orig)
        detail = _detail(orig)
        if isinstance(exc, sqlalchemy.exc.IntegrityError):
            return _integrity_error(code, detail)
        if isinstance(exc, sqlalchemy.exc.InterfaceError):
            return DatabaseUnavailableError(f"database unavailable ({detail})")
        return _by_code(code, detail, lost=exc.connection_invalidated)
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return DatabaseUnavailableError(f"timed out waiting for a pooled connection ({exc})")
    if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
        # No statement failed (a connection in a state SQLAlchemy refuses, say): still a
        # database failure to the caller, never SQLAlchemy's own exception.
        return DatabaseError(f"database error ({_detail(exc)})")
    if isinstance(exc, sqlite3.Error):
        # Raised by sqlite3 used directly (the bulk insert path), not wrapped by SQLAlchemy.
        if isinstance(exc, sqlite3.IntegrityError):
            return _integrity_error(_driver_code(exc), _detail(exc))
        return _by_code(_driver_code(exc), _detail(exc), lost=False)
    if type(exc).__module__.startswith("asyncpg"):
        return _raw_asyncpg(exc)
    if isinstance(exc, OSError):
        return DatabaseUnavailableError(f"cannot reach the database ({_detail(exc)})")
    return None


def _detail(exc: BaseException | None) -> str:
    """The exception's type and the first line of its message (never its parameters)."""
    text = str(exc) if exc is not None else ""
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"  # an OSError quotes its whole path


def _by_code(code: str, detail: str, *, lost: bool) -> LlmstoreError:
    """A failed statement that broke no constraint, by its SQLSTATE or SQLite error name."""
    if code in _PG_INVALID:
        return ValidationError(f"rejected by the database ({detail})")
    if code in _SQLITE_BUSY:
        return DatabaseUnavailableError(f"database unavailable ({detail})")
    if code.startswith(_PG_CREDENTIALS):
        return _credentials_error(detail)
    if code.startswith("SQLITE_READONLY"):
        return DatabaseUnavailableError(
            f"the database cannot be written: the file, its folder or the disk is "
            f"read-only ({detail})"
        )
    if code == "3D000":
        return DatabaseUnavailableError(
            f"the database does not exist: create it with `python -m llmstore create-db` ({detail})"
        )
    if lost or code.startswith(("08", "57P")):
        return DatabaseUnavailableError(f"lost the database connection ({detail})")
    if "unable to open" in detail:
        return DatabaseUnavailableError(f"cannot open the database ({detail})")
    return DatabaseError(f"database error ({detail})")


def _integrity_error(code: str, detail: str) -> LlmstoreError:
    if code in _PG_CONFLICT or code in _SQLITE_CONFLICT:
        return ConflictError(f"conflicts with an existing row ({detail})")
    if code in _PG_NOT_FOUND or code in _SQLITE_NOT_FOUND:
        return NotFoundError(f"refers to a row that does not exist ({detail})")
    return ValidationError(f"rejected by a database constraint ({detail})")


def _credentials_error(detail: str) -> ConfigError:
    # The URL (or the server's pg_hba.conf) is wrong: retrying will not help.
    return ConfigError(f"the database refused the connection's credentials ({detail})")


def _raw_asyncpg(exc: BaseException) -> LlmstoreError:
    """An exception from asyncpg used directly (the lean path), classified by SQLSTATE."""
    code = _driver_code(exc)
    detail = _detail(exc)
    if code.startswith("23"):  # SQLSTATE class 23: integrity constraint violation
        return _integrity_error(code, detail)
    if code in _PG_INVALID:
        return ValidationError(f"rejected by the database ({detail})")
    if code.startswith(_PG_CREDENTIALS):
        return _credentials_error(detail)
    if not code or code.startswith(("08", "57P", "3D")):
        return DatabaseUnavailableError(f"cannot reach the database ({detail})")
    return DatabaseError(f"database error ({detail})")


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise driver exceptions raised inside the block as llmstore errors."""
    try:
        yield
    except LlmstoreError:
        raise
    except Exception as exc:
        error = translate(exc)
        if error is None:
            raise
        raise error from exc
