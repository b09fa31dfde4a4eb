"""Usage retention: delete rows older than a cutoff in short batches, exporting them first.

A purge is a loop of batches, each one write transaction: select the oldest ``batch_size``
rows below the cutoff that follow the previous batch's last row, append them to the export
file (flushed and fsynced), delete them by id, commit. So a writer waits for one batch at
most, memory holds one batch at most, and no batch walks back over what earlier ones
removed: each reads one range of the ``(created_at, id)`` index. An export that fails
raises inside the batch's transaction, so that batch's rows stay.

Rows written during a purge with a ``created_at`` behind its position are left for the
next purge. On Postgres the batch's rows are locked (``SKIP LOCKED``), so two purges at
once delete and export disjoint rows.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import functools
import io
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ExportError, ValidationError
from llmstore._core.files import fsync_directory
from llmstore._core.ids import utcnow
from llmstore._core.jcs import timestamp
from llmstore._core.validate import check_aware, check_batch_size, check_timedelta, describe
from llmstore._db.dialects import delete_where_in
from llmstore._db.runner import Runner
from llmstore._db.schema import usage_logs

from .records import LOG_FIELDS

U = usage_logs
EXPORT_SUFFIXES = (".jsonl", ".csv")
#: An exported row's fields: ``UsageLog``'s, in the table's column order.
EXPORT_FIELDS = LOG_FIELDS

_TAGS = EXPORT_FIELDS.index("tags")

Progress = Callable[[int, int], object]
#: A row's place in the (created_at, id) index: where the previous batch ended.
Position = tuple[dt.datetime, int]


def check_cutoff(older_than: object) -> dt.datetime:
    """The cutoff: rows created strictly before it are purged."""
    if isinstance(older_than, dt.timedelta):
        age = check_timedelta(older_than, "older_than")
        if age <= dt.timedelta(0):
            raise ValidationError("older_than must be a positive timedelta")
        try:
            return utcnow() - age
        except OverflowError:
            raise ValidationError("older_than reaches back before the year 1") from None
    if isinstance(older_than, dt.datetime):
        return check_aware(older_than, "older_than")
    raise ValidationError(
        "older_than must be a timezone-aware datetime or a datetime.timedelta, "
        f"not {type(older_than).__name__}"
    )


def check_export_path(value: object) -> Path:
    """A new file's path: text the file system can take, not there yet (nor a link)."""
    if not isinstance(value, str | os.PathLike):
        raise ValidationError(
            f"export_to must be a path ending in .jsonl or .csv, not {type(value).__name__}"
        )
    try:
        # A PathLike's __fspath__ is the caller's code: it may return anything, or raise.
        raw = os.fspath(str.__str__(value) if isinstance(value, str) else value)
        text = os.fsdecode(raw)
    except Exception as exc:
        raise ValidationError(f"export_to is not a usable path ({type(exc).__name__})") from exc
    if not text:
        raise ValidationError("export_to must be a path ending in .jsonl or .csv")
    if "\x00" in text:
        raise ValidationError("export_to must not contain NUL characters")
    try:
        os.fsencode(text)  # bytes a file name may hold (a lone surrogate is none)
    except UnicodeEncodeError:
        raise ValidationError("export_to is not valid text (lone surrogates)") from None
    path = Path(text)
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise ValidationError(f"export_to must end in .jsonl or .csv, not {describe(path.name)}")
    try:
        os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:  # a name too long, a file where a folder should be, no access...
        raise ValidationError(
            f"cannot use export_to {describe(text, 80)} ({type(exc).__name__}: "
            f"{exc.strerror or exc})"
        ) from None
    raise ValidationError(f"export_to {describe(text, 80)} already exists; purge never overwrites")


def select_batch(cutoff: dt.datetime, after: Position | None, size: int) -> sa.Select[Any]:
    """The next batch's rows in index order: below the cutoff, after the previous batch."""
    statement = sa.select(*U.c).where(U.c.created_at < cutoff)
    if after is not None:
        statement = statement.where(sa.tuple_(U.c.created_at, U.c.id) > after)
    return (
        statement.order_by(U.c.created_at, U.c.id)
        .limit(size)
        .with_for_update(skip_locked=True)  # Postgres only; SQLite holds its write lock
    )


def select_batch_keys(cutoff: dt.datetime, after: Position | None, size: int) -> sa.Select[Any]:
    """As :func:`select_batch`, only the index's own columns (nothing to export)."""
    return select_batch(cutoff, after, size).with_only_columns(U.c.created_at, U.c.id)


# -- export -----------------------------------------------------------------------------------


def _json_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        return timestamp(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return _json_value(value)


def _log_values(row: Sequence[Any]) -> list[Any]:
    """A stored row's values as ``UsageLog`` holds them: no tags are an empty list."""
    values = list(row)
    values[_TAGS] = values[_TAGS] or []
    return values


class Export:
    """An export file that purge alone creates, then appends one batch at a time to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.csv = path.suffix.lower() == ".csv"

    def create(self) -> None:
        """Create the file (never an existing one), with the CSV header, durably."""
        try:
            with self.path.open("xb") as file:
                if self.csv:
                    file.write(self._csv([EXPORT_FIELDS]))
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            raise ValidationError(
                f"cannot create the export file {describe(str(self.path), 80)} "
                f"({type(exc).__name__}: {exc.strerror or exc})"
            ) from None
        fsync_directory(self.path.parent)

    def append(self, rows: Sequence[Any]) -> None:
        """Write the rows and fsync them; on failure, cut the file back and raise OSError."""
        data = self._encode(rows)
        with self.path.open("ab") as file:
            start = file.tell()
            try:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    file.truncate(start)
                raise

    def _encode(self, rows: Sequence[Any]) -> bytes:
        if self.csv:
            return self._csv([_csv_value(v) for v in _log_values(row)] for row in rows)
        lines = [
            json.dumps(
                dict(zip(EXPORT_FIELDS, map(_json_value, _log_values(row)), strict=True)),
                ensure_ascii=False,
                separators=(",", ":"),
            )
            for row in rows
        ]
        lines.append("")
        return "\n".join(lines).encode("utf-8")

    @staticmethod
    def _csv(rows: Any) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        return buffer.getvalue().encode("utf-8")


# -- the loop ---------------------------------------------------------------------------------


def _batch(
    conn: Connection,
    cutoff: dt.datetime,
    after: Position | None,
    size: int,
    export: Export | None,
    deleted_before: int,
) -> tuple[int, Position | None, bool]:
    """One batch's unit: (rows deleted, the last row's position, whether the batch was full)."""
    if export is None:
        rows = conn.execute(select_batch_keys(cutoff, after, size)).all()
    else:
        rows = conn.execute(select_batch(cutoff, after, size)).all()
        if rows:
            try:
                export.append(rows)
            except OSError as exc:
                # Raised inside the transaction: the rollback keeps this batch's rows.
                raise ExportError(
                    f"could not write the usage export {describe(str(export.path), 80)} "
                    f"({type(exc).__name__}: {exc.strerror or exc}); this batch was not "
                    f"deleted, {deleted_before} row(s) were exported and deleted before it"
                ) from exc
    if not rows:
        return 0, None, False
    last = rows[-1]
    return (
        delete_where_in(conn, U.c.id, [row.id for row in rows]),
        (last.created_at, last.id),
        len(rows) == size,
    )


async def purge_usage(
    runner: Runner,
    older_than: object,
    *,
    batch_size: object,
    export_to: object,
    progress: Progress | None,
) -> int:
    """Delete the rows created before the cutoff, a batch per transaction; their count."""
    cutoff = check_cutoff(older_than)
    size = check_batch_size(batch_size)
    if progress is not None and not callable(progress):
        raise ValidationError("progress must be a callable taking (deleted, batches)")
    export = None if export_to is None else Export(check_export_path(export_to))
    if export is not None:
        export.create()
    deleted = batches = 0
    after: Position | None = None
    while True:
        unit = functools.partial(
            _batch, cutoff=cutoff, after=after, size=size, export=export, deleted_before=deleted
        )
        count, last, full = await runner.write(unit)
        if last is None:
            return deleted
        deleted += count
        batches += 1
        after = last
        if progress is not None:
            progress(deleted, batches)
        if not full:
            return deleted
