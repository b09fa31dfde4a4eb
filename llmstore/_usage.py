"""Usage logs: one row per proxied request, validated, then written in bulk.

``record_many`` writes a batch in one transaction with the driver's bulk path: one
``executemany`` on SQLite, ``COPY`` (``copy_records_to_table``) on Postgres. Values go
through the column types' own bind processors, so rows read back exactly as the generic
path would store them. Ids are taken before the write (``max(id)`` under SQLite's write
lock, the sequence on Postgres), so the caller learns each new row's id.

A ``request_id`` is unique: a batch is checked against the table (and itself) first, and
rows seen before are reported, not written. Two batches racing with the same new
``request_id`` cannot both insert; the loser's whole transaction is undone and retried.
"""

from __future__ import annotations

import builtins
import datetime as dt
import operator
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Self

import pydantic
import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.util import await_only

from ._errors import ConflictError, ValidationError
from ._ids import utcnow
from ._receipts import Receipt, ReceiptRepository, ReceiptSigner
from ._runner import Runner
from ._schema import usage_logs
from ._usage_metrics import UsageMetrics, check_metrics_query, read_metrics
from ._usage_purge import Progress as PurgeProgress
from ._usage_purge import purge_usage
from ._validate import (
    MAX_INT64,
    check_aware,
    check_id,
    check_json_mapping,
    check_limit,
    check_name,
    check_optional_bool,
    check_positive_int,
)

if TYPE_CHECKING:
    from ._usage_writer import UsageWriter

U = usage_logs
ERROR_MESSAGE_MAX = 4000
NAME_MAX = 200
MAX_BATCH = 100_000
MAX_LIST = 10_000
_TRUNCATED = "... [truncated from {} characters]"
_RACE_ATTEMPTS = 3
_CHECK_CHUNK = 500


def _encodable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (Postgres refuses them)")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid text (lone surrogates)") from None
    return value


def _json_object(value: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
        return check_json_mapping(value, "metadata")
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def _truncated(value: str | None) -> str | None:
    if value is None or len(value) <= ERROR_MESSAGE_MAX:
        return value
    marker = _TRUNCATED.format(len(value))
    cut = value[: ERROR_MESSAGE_MAX - len(marker)]
    return cut + marker


Count = Annotated[int, Strict(), Field(ge=0, le=MAX_INT64)]
Millis = Annotated[int, Strict(), Field(ge=0, le=MAX_INT64)]
Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX), AfterValidator(_encodable)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class UsageRecord(BaseModel):
    """One proxied request, checked before it is written.

    Counts, times and ``cost`` (integer minor units) are non-negative integers;
    ``created_at`` is timezone-aware (default: now, UTC). ``total_tokens`` defaults to
    ``prompt_tokens + completion_tokens``. An ``error_message`` longer than 4,000
    characters is cut and marked ``... [truncated from N characters]``. Unknown fields are
    refused. Any refusal raises :class:`~llmstore.ValidationError`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    created_at: pydantic.AwareDatetime = Field(default_factory=utcnow)
    api_key_id: uuid.UUID | None = None
    project_id: uuid.UUID | None = None
    token_id: uuid.UUID | None = None
    request_id: Name | None = None
    alias: Name | None = None
    profile: Name | None = None
    provider: Name | None = None
    model: Name | None = None
    origin: Name | None = None
    is_streaming: Annotated[bool, Strict()] = False
    success: Annotated[bool, Strict()] = True
    status_code: Annotated[int, Strict(), Field(ge=100, le=599)] | None = None
    response_time_ms: Millis | None = None
    time_to_first_token_ms: Millis | None = None
    time_to_last_token_ms: Millis | None = None
    tokens_per_second: Rate | None = None
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    cached_tokens: Count = 0
    total_tokens: Count | None = None
    cost: Count = 0
    finish_reason: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    max_tokens: Count | None = None
    temperature: Rate | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    message_count: Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)] | None = None
    error_type: Name | None = None
    error_message: Annotated[str | None, AfterValidator(_truncated)] = None
    metadata: Annotated[dict[str, Any] | None, AfterValidator(_json_object)] = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise ValidationError(f"invalid usage record: {_describe(exc)}") from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except pydantic.ValidationError as exc:
            raise ValidationError(f"invalid usage record: {_describe(exc)}") from None

    @classmethod
    def model_validate_json(cls, json_data: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except pydantic.ValidationError as exc:
            raise ValidationError(f"invalid usage record: {_describe(exc)}") from None

    @pydantic.model_validator(mode="after")
    def _finish(self) -> UsageRecord:
        if self.error_message is not None:
            _encodable(self.error_message)
        if self.finish_reason is not None:
            _encodable(self.finish_reason)
        if self.total_tokens is None:
            total = self.prompt_tokens + self.completion_tokens
            if total > MAX_INT64:
                raise ValueError("prompt_tokens + completion_tokens is too large")
            object.__setattr__(self, "total_tokens", total)
        object.__setattr__(self, "created_at", self.created_at.astimezone(dt.UTC))
        return self


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "record"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


class UsageLog(BaseModel):
    """A stored usage row: the record's fields plus its ``id``."""

    model_config = ConfigDict(frozen=True)

    id: int
    created_at: dt.datetime
    api_key_id: uuid.UUID | None
    project_id: uuid.UUID | None
    token_id: uuid.UUID | None
    request_id: str | None
    alias: str | None
    profile: str | None
    provider: str | None
    model: str | None
    origin: str | None
    is_streaming: bool
    success: bool
    status_code: int | None
    response_time_ms: int | None
    time_to_first_token_ms: int | None
    time_to_last_token_ms: int | None
    tokens_per_second: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost: int
    finish_reason: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    message_count: int | None
    error_type: str | None
    error_message: str | None
    metadata: dict[str, Any] | None


class RecordResult(BaseModel):
    """What ``record`` and ``record_many`` wrote.

    ``ids`` has one entry per record given, in order: the new row's id, or None for a
    record whose ``request_id`` was already stored (or repeated earlier in the batch).
    """

    model_config = ConfigDict(frozen=True)

    written: int
    duplicate_request_ids: list[str]
    ids: list[int | None]


# Column name -> record field name (the JSON column is not called "metadata": that name
# is taken on SQLAlchemy tables).
_FIELDS = {column.name: column.name for column in U.c if column.name != "id"}
_FIELDS["usage_metadata"] = "metadata"
_WRITE_COLUMNS = ("id", *_FIELDS)
_LOG_COLUMNS = tuple(U.c)


def log_from_row(row: Any) -> UsageLog:
    values = dict(row._mapping)
    values["metadata"] = values.pop("usage_metadata")
    return UsageLog.model_construct(**values)


def check_records(records: object) -> list[UsageRecord]:
    """The records of a batch, or ValidationError naming the first bad one's index."""
    if isinstance(records, UsageRecord | Mapping | str | bytes) or not isinstance(
        records, Iterable
    ):
        raise ValidationError("records must be a sequence of UsageRecord")
    checked: list[UsageRecord] = []
    for index, record in enumerate(records):
        if len(checked) >= MAX_BATCH:
            raise ValidationError(f"a batch holds at most {MAX_BATCH} records")
        if isinstance(record, UsageRecord):
            checked.append(record)
        elif isinstance(record, Mapping):
            try:
                checked.append(UsageRecord(**record))
            except ValidationError as exc:
                raise ValidationError(f"record {index}: {exc}") from None
        else:
            raise ValidationError(
                f"record {index} must be a UsageRecord or a mapping, not {type(record).__name__}"
            )
    return checked


def sqlite_utc_text(value: dt.datetime) -> str:
    """A UTC datetime as UTCDateTime stores it on SQLite: naive, with microseconds."""
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


class _Encoder:
    """Rows as the driver takes them, through each column type's bind processor."""

    def __init__(self, dialect: Dialect) -> None:
        processors: list[Callable[[Any], Any] | None] = [
            U.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in _FIELDS
        ]
        if dialect.name == "sqlite":
            # The same values by a shorter road (tests compare them with the processors'):
            # a record's created_at is already UTC, sqlite3 stores bools as 1 and 0.
            shortcuts: dict[type, Callable[[Any], Any] | None] = {
                bool: None,
                uuid.UUID: operator.attrgetter("hex"),
            }
            for index, name in enumerate(_FIELDS):
                python_type = U.c[name].type.python_type
                if name == "created_at":
                    processors[index] = sqlite_utc_text
                elif python_type in shortcuts:
                    processors[index] = shortcuts[python_type]
        # Most columns need no processing: take all values in one C call, then fix the few
        # that do (a per-value Python loop cost more than the driver's insert).
        self._values = operator.itemgetter(*_FIELDS.values())
        self._processed = [(i, p) for i, p in enumerate(processors, start=1) if p is not None]

    def rows(self, records: Sequence[UsageRecord], ids: Sequence[int]) -> list[Any]:
        values, processed = self._values, self._processed
        out = []
        for record, row_id in zip(records, ids, strict=True):
            row = [row_id, *values(record.__dict__)]
            for index, process in processed:
                value = row[index]
                if value is not None:
                    row[index] = process(value)
            out.append(row)
        return out


_ENCODERS: dict[str, _Encoder] = {}
_SQLITE_INSERT = (
    f"INSERT INTO usage_logs ({', '.join(_WRITE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _WRITE_COLUMNS)})"
)


def _encoder(dialect: Dialect) -> _Encoder:
    encoder = _ENCODERS.get(dialect.name)
    if encoder is None:
        encoder = _ENCODERS[dialect.name] = _Encoder(dialect)
    return encoder


_UNIQUE_VIOLATION = "23505"
_SQLITE_TOP_ID = sa.text(
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'usage_logs'), 0),"
    " coalesce((SELECT max(id) FROM usage_logs), 0))"
)
_SEQUENCES: dict[str | None, str] = {}


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, raised by asyncpg itself or wrapped by SQLAlchemy."""
    for candidate in (exc, getattr(exc, "orig", None)):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def _schema(conn: Connection) -> str | None:
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema


class UsageRepository:
    """Usage rows on one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def insert(self, records: Sequence[UsageRecord]) -> RecordResult:
        """Write the records whose request id is new; report the others."""
        if all(record.request_id is None for record in records):
            return self._insert(records, stored=set())
        if self._conn.dialect.name == "postgresql":
            # Most batches repeat no stored request id: try them as they are, and look
            # the ids up only when the unique index says one is taken. (The lookup first
            # cost more than the COPY.)
            try:
                with self._conn.begin_nested():
                    return self._insert(records, stored=set())
            except Exception as exc:
                if _sqlstate(exc) != _UNIQUE_VIOLATION:
                    raise
        return self._insert(records, stored=self._stored_request_ids(records))

    def _insert(self, records: Sequence[UsageRecord], stored: set[str]) -> RecordResult:
        seen = set(stored)
        fresh: list[UsageRecord] = []
        duplicates: list[str] = []
        positions: list[int | None] = []
        for record in records:
            request_id = record.request_id
            if request_id is not None and request_id in seen:
                duplicates.append(request_id)
                positions.append(None)
                continue
            if request_id is not None:
                seen.add(request_id)
            positions.append(len(fresh))
            fresh.append(record)
        ids = self._new_ids(len(fresh))
        if fresh:
            self._write(fresh, ids)
        return RecordResult(
            written=len(fresh),
            duplicate_request_ids=duplicates,
            ids=[None if position is None else ids[position] for position in positions],
        )

    def _stored_request_ids(self, records: Sequence[UsageRecord]) -> set[str]:
        wanted = sorted({r.request_id for r in records if r.request_id is not None})
        if self._conn.dialect.name == "postgresql":
            listed = sa.bindparam("wanted", wanted, type_=postgresql.ARRAY(sa.String()))
            statement = sa.select(U.c.request_id).where(U.c.request_id == sa.any_(listed))
            return set(self._conn.execute(statement).scalars())
        found: set[str] = set()
        for start in range(0, len(wanted), _CHECK_CHUNK):
            chunk = wanted[start : start + _CHECK_CHUNK]
            found.update(
                self._conn.execute(sa.select(U.c.request_id).where(U.c.request_id.in_(chunk)))
                .scalars()
                .all()
            )
        return found

    def _new_ids(self, count: int) -> list[int]:
        if count == 0:
            return []
        if self._conn.dialect.name == "postgresql":
            sequence = sa.cast(self._sequence(), postgresql.REGCLASS)
            statement = sa.select(sa.func.nextval(sequence)).select_from(
                sa.func.generate_series(1, count)
            )
            return list(self._conn.execute(statement).scalars())
        # SQLite: the write lock is held (BEGIN IMMEDIATE), so nobody else takes these.
        # AUTOINCREMENT's high-water mark keeps a purged row's id from coming back.
        top = self._conn.execute(_SQLITE_TOP_ID).scalar() or 0
        return list(range(top + 1, top + 1 + count))

    def _sequence(self) -> str:
        # Looked up once per schema: pg_get_serial_sequence per row cost 10 us each.
        schema = _schema(self._conn)
        name = _SEQUENCES.get(schema)
        if name is None:
            table = "usage_logs" if schema is None else f'"{schema}".usage_logs'
            found = self._conn.execute(sa.select(sa.func.pg_get_serial_sequence(table, "id")))
            name = _SEQUENCES[schema] = str(found.scalar_one())
        return name

    def _write(self, records: Sequence[UsageRecord], ids: Sequence[int]) -> None:
        dialect = self._conn.dialect
        rows = _encoder(dialect).rows(records, ids)
        driver = self._conn.connection.driver_connection
        if dialect.name == "postgresql":
            await_only(
                driver.copy_records_to_table(  # type: ignore[union-attr]
                    "usage_logs",
                    records=rows,
                    columns=_WRITE_COLUMNS,
                    schema_name=_schema(self._conn),
                )
            )
            return
        cursor = self._conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(_SQLITE_INSERT, rows)
        finally:
            cursor.close()

    def get(self, usage_id: int) -> UsageLog | None:
        row = self._conn.execute(sa.select(*_LOG_COLUMNS).where(U.c.id == usage_id)).first()
        return None if row is None else log_from_row(row)

    def list(
        self,
        *,
        api_key_id: uuid.UUID | None,
        project_id: uuid.UUID | None,
        model: str | None,
        success: bool | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        limit: int,
        after: int | None,
    ) -> builtins.list[UsageLog]:
        """Newest first by (created_at, id); ``after`` is the last id of the previous page."""
        statement = sa.select(*_LOG_COLUMNS)
        if api_key_id is not None:
            statement = statement.where(U.c.api_key_id == api_key_id)
        if project_id is not None:
            statement = statement.where(U.c.project_id == project_id)
        if model is not None:
            statement = statement.where(U.c.model == model)
        if success is not None:
            statement = statement.where(U.c.success == success)
        if since is not None:
            statement = statement.where(U.c.created_at >= since)
        if until is not None:
            statement = statement.where(U.c.created_at < until)
        if after is not None:
            boundary = sa.select(U.c.created_at).where(U.c.id == after).scalar_subquery()
            statement = statement.where(
                sa.or_(
                    U.c.created_at < boundary,
                    sa.and_(U.c.created_at == boundary, U.c.id < after),
                )
            )
        statement = statement.order_by(U.c.created_at.desc(), U.c.id.desc()).limit(limit)
        return [log_from_row(row) for row in self._conn.execute(statement)]


def _optional_aware(value: object, what: str) -> dt.datetime | None:
    return None if value is None else check_aware(value, what)


class Usage:
    """``store.usage`` and ``tx.usage``: usage rows, metrics, retention and receipts."""

    def __init__(self, runner: Runner, signer: ReceiptSigner | None = None) -> None:
        self._runner = runner
        self._signer = ReceiptSigner(None) if signer is None else signer

    async def record(self, record: UsageRecord) -> RecordResult:
        """Write one row durably before returning (unless its request id is known)."""
        if not isinstance(record, UsageRecord):
            raise ValidationError(f"record must be a UsageRecord, not {type(record).__name__}")
        return await self.record_many([record])

    async def record_many(self, records: Iterable[UsageRecord]) -> RecordResult:
        """Write a batch in one transaction: all of it, or (on any error) none of it."""
        checked = check_records(records)
        if not checked:
            return RecordResult(written=0, duplicate_request_ids=[], ids=[])
        for attempt in range(_RACE_ATTEMPTS):
            try:
                return await self._runner.write(lambda conn: UsageRepository(conn).insert(checked))
            except ConflictError:
                # Another batch wrote one of these request ids first; look again.
                if attempt == _RACE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def get(self, usage_id: int) -> UsageLog | None:
        checked = check_positive_int(usage_id, "usage id")
        return await self._runner.read(lambda conn: UsageRepository(conn).get(checked), single=True)

    async def list(
        self,
        api_key_id: uuid.UUID | str | None = None,
        project_id: uuid.UUID | str | None = None,
        model: str | None = None,
        success: bool | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
        after: int | None = None,
    ) -> builtins.list[UsageLog]:
        """Rows newest first; pass the last row's id as ``after`` for the next page."""
        key = None if api_key_id is None else check_id(api_key_id, "api_key_id")
        project = None if project_id is None else check_id(project_id, "project_id")
        if model is not None:
            model = check_name(model, "model")
        filters: dict[str, Any] = {
            "api_key_id": key,
            "project_id": project,
            "model": model,
            "success": check_optional_bool(success, "success"),
            "since": _optional_aware(since, "since"),
            "until": _optional_aware(until, "until"),
            "limit": check_limit(limit, maximum=MAX_LIST),
            "after": None if after is None else check_positive_int(after, "after"),
        }
        return await self._runner.read(
            lambda conn: UsageRepository(conn).list(**filters), single=True
        )

    async def metrics(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        group_by: str | Sequence[str] = (),
        bucket: str | None = None,
        **filters: Any,
    ) -> builtins.list[UsageMetrics]:
        """Requests, tokens, cost and latency per bucket and group, in one statement.

        ``since`` is inclusive and ``until`` exclusive, on ``created_at``. ``group_by``
        names columns among model, provider, project_id, api_key_id, origin, alias and
        profile; ``bucket`` is None, "minute", "hour" or "day" (UTC). ``filters`` are
        equality filters on api_key_id, project_id, token_id, model, provider, origin,
        alias, profile, success and is_streaming (None: not filtered).
        """
        query = check_metrics_query(
            since=since, until=until, group_by=group_by, bucket=bucket, filters=filters
        )
        return await self._runner.read(lambda conn: read_metrics(conn, query), single=True)

    async def purge(
        self,
        older_than: dt.datetime | dt.timedelta,
        batch_size: int = 10_000,
        export_to: str | os.PathLike[str] | None = None,
        progress: PurgeProgress | None = None,
    ) -> int:
        """Delete the rows created before a cutoff, one short transaction per batch.

        ``older_than`` is the cutoff (an aware datetime) or its age (a timedelta before
        now); a row created exactly at the cutoff is kept. With ``export_to`` (a new
        ``.jsonl`` or ``.csv`` file) each batch is written there and fsynced before it is
        deleted. ``progress(deleted, batches)`` is called after each batch. Returns the
        number of rows deleted.
        """
        return await purge_usage(
            self._runner,
            older_than,
            batch_size=batch_size,
            export_to=export_to,
            progress=progress,
        )

    async def issue_receipt(self, usage_id: int) -> Receipt:
        """The row's signed receipt: issued and stored now, or the one issued before.

        Raises NotFoundError for an unknown row (unless it had a receipt before it was
        deleted) and ConfigError when ``LLMSTORE_RECEIPT_SIGNING_KEY`` is not set.
        """
        checked = check_positive_int(usage_id, "usage id")
        signer = self._signer.require()
        return await self._runner.write(
            lambda conn: ReceiptRepository(conn).issue(checked, signer, UsageRepository(conn).get)
        )

    async def get_receipt(self, receipt_id: uuid.UUID | str) -> Receipt | None:
        """The stored receipt with that id, or None; needs no signing key."""
        checked = check_id(receipt_id, "receipt id")
        return await self._runner.read(
            lambda conn: ReceiptRepository(conn).get(checked), single=True
        )

    def writer(
        self, max_batch: int = 500, flush_interval: float = 0.5, max_pending: int = 10_000
    ) -> UsageWriter:
        """A buffered writer for logging off the request path: ``async with`` it, ``put`` rows.

        Rows are written in batches of up to ``max_batch``, at least every
        ``flush_interval`` seconds; ``put`` waits while ``max_pending`` rows are held.
        Failed batches are retried until written; closing drains. See ``UsageWriter``.
        """
        # Imported here: the writer's module builds on this one.
        from ._usage_writer import UsageWriter

        return UsageWriter(
            self._runner,
            max_batch=max_batch,
            flush_interval=flush_interval,
            max_pending=max_pending,
        )
