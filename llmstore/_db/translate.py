"""The one place where driver exceptions become llmstore errors (``raise ... from exc``).

The message never quotes statement parameters: they may hold digests or ciphertext.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy.exc

from llmstore._core.errors import (
    ConfigError,
    ConflictError,
    DatabaseError,
    DatabaseUnavailableError,
    LlmstoreError,
    NotFoundError,
    ValidationError,
)

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


# A unique index refused a row: Postgres's SQLSTATE, SQLite's extended result code.
_UNIQUE_VIOLATIONS = {"23505", "SQLITE_CONSTRAINT_UNIQUE"}


def is_unique_violation(exc: BaseException) -> bool:
    """Whether a driver error, raised by the driver itself or wrapped by SQLAlchemy, is a
    unique index refusing a row."""
    for candidate in (exc, getattr(exc, "orig", None)):
        for attribute in ("sqlstate", "sqlite_errorname"):
            if getattr(candidate, attribute, None) in _UNIQUE_VIOLATIONS:
                return True
    return False
