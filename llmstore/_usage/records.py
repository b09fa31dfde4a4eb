"""Usage records: what a proxied request's row holds, checked before it is written.

``UsageRecord`` is what callers build, ``UsageLog`` a stored row read back and
``RecordResult`` what a write reports.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, Self

import pydantic
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict

from llmstore._core.errors import ValidationError
from llmstore._core.ids import utcnow
from llmstore._core.validate import (
    MAX_INT64,
    check_aware,
    check_json_mapping,
    check_storable,
    plain_mapping,
)
from llmstore._db.schema import usage_logs
from llmstore._prices import broken_convention

ERROR_MESSAGE_MAX = 4000
NAME_MAX = 200
MAX_TAGS = 20
MAX_BATCH = 100_000
_TRUNCATED = "... [truncated from {} characters]"


def _encodable(value: str) -> str:
    """Recorded text, as a plain ``str`` either driver stores (no NUL, no lone surrogates)."""
    try:
        return check_storable(str.__str__(value), "text")
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def _json_object(value: object) -> dict[str, Any] | None:
    # Before pydantic's own dict check, which would hash the caller's keys and recurse
    # into the caller's nesting: this copy is plain, bounded and checked.
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


def _tags(value: object) -> object:
    # Before pydantic: a plain list or tuple of strings, not a str (which is iterable).
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise ValueError("tags must be a list of strings")
    return tuple(value)


def _distinct_tags(value: tuple[str, ...]) -> tuple[str, ...]:
    """The tags in the order given, each once; at most 20 distinct."""
    distinct = tuple(dict.fromkeys(value))
    if len(distinct) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} distinct tags")
    if any(not tag.strip() for tag in distinct):
        raise ValueError("a tag must not be blank")
    return distinct


Tags = Annotated[tuple[Name, ...], BeforeValidator(_tags), AfterValidator(_distinct_tags)]
UsageSource = Literal["reported", "estimated", "missing"]
CostSource = Literal["given", "price_table", "none"]
# Strict: an int is a number, a bool or a numeric string is not.
Rate = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]


class UsageRecord(BaseModel):
    """One proxied request, checked before it is written.

    Counts, times and ``cost`` (integer minor units) are non-negative integers;
    ``created_at`` is timezone-aware (default: now, UTC). Token counts follow
    OpenTelemetry's GenAI convention: ``prompt_tokens`` includes ``cached_tokens`` (cache
    reads), ``cache_write_tokens`` and ``audio_input_tokens``; ``completion_tokens``
    includes ``reasoning_tokens`` and ``audio_output_tokens``; a record whose parts add up
    to more than their whole is refused. ``total_tokens`` defaults to ``prompt_tokens +
    completion_tokens``. ``cost=None`` (the default) takes the cost from the price table
    when the row is written (see ``store.prices``). ``tags`` are up to 20 distinct
    strings, kept in the order given, each once. An ``error_message`` longer than 4,000
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
    cost: Count | None = None
    finish_reason: (
        Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_encodable)] | None
    ) = None
    max_tokens: Count | None = None
    temperature: Rate | None = None
    top_p: Fraction | None = None
    message_count: Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)] | None = None
    error_type: Name | None = None
    error_message: Annotated[str | None, AfterValidator(_truncated)] = None
    metadata: Annotated[dict[str, Any] | None, BeforeValidator(_json_object)] = None
    cache_write_tokens: Count = 0
    reasoning_tokens: Count = 0
    audio_input_tokens: Count = 0
    audio_output_tokens: Count = 0
    end_user: Name | None = None
    session_id: Name | None = None
    service_tier: Name | None = None
    tags: Tags = ()
    usage_source: UsageSource = "reported"

    def __init__(self, /, **data: Any) -> None:  # "self" may be a (refused) field name
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise ValidationError(f"invalid usage record: {_describe(exc)}") from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        if isinstance(obj, Mapping):
            obj = _fields(obj)
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
            object.__setattr__(self, "error_message", _encodable(self.error_message))
        if self.total_tokens is None:
            total = self.prompt_tokens + self.completion_tokens
            if total > MAX_INT64:
                raise ValueError("prompt_tokens + completion_tokens is too large")
            object.__setattr__(self, "total_tokens", total)
        broken = broken_convention(self)
        if broken is not None:
            raise ValueError(broken)
        try:
            created_at = check_aware(self.created_at, "created_at")
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(self, "created_at", created_at)
        return self


def _fields(value: Mapping[Any, Any]) -> dict[str, Any]:
    """A mapping of fields as plain keyword arguments, read once (pydantic hands a mapping
    to ``__init__`` as keywords, and would run the caller's mapping code itself)."""
    fields = plain_mapping(value)
    if not all(isinstance(name, str) for name in fields):
        raise ValidationError("invalid usage record: field names must be strings")
    return {str.__str__(name): item for name, item in fields.items()}


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
    cache_write_tokens: int
    reasoning_tokens: int
    audio_input_tokens: int
    audio_output_tokens: int
    end_user: str | None
    session_id: str | None
    service_tier: str | None
    tags: tuple[str, ...]
    usage_source: UsageSource
    cost_source: CostSource


class RecordResult(BaseModel):
    """What ``record`` and ``record_many`` wrote.

    ``ids`` has one entry per record given, in order: the new row's id, or None for a
    record whose ``request_id`` was already stored (or repeated earlier in the batch).
    """

    model_config = ConfigDict(frozen=True)

    written: int
    duplicate_request_ids: list[str]
    ids: list[int | None]


#: Each column's field in records and logs: the same name, except the JSON column, which
#: is not called "metadata" (SQLAlchemy tables take that name).
FIELD_OF_COLUMN = {
    column.name: "metadata" if column.name == "usage_metadata" else column.name
    for column in usage_logs.c
}
#: ``UsageLog``'s fields, in the table's column order.
LOG_FIELDS = tuple(FIELD_OF_COLUMN.values())


def log_from_row(row: Any) -> UsageLog:
    """A log from a row of every column, in the table's order."""
    fields = dict(zip(LOG_FIELDS, row, strict=True))
    fields["tags"] = tuple(fields["tags"] or ())
    return UsageLog.model_construct(**fields)


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
                checked.append(UsageRecord(**_fields(record)))
            except ValidationError as exc:
                raise ValidationError(f"record {index}: {exc}") from None
        else:
            raise ValidationError(
                f"record {index} must be a UsageRecord or a mapping, not {type(record).__name__}"
            )
    return checked


class WriterStats(BaseModel):
    """A snapshot of a usage writer's counters (``writer.stats``).

    * ``pending``: rows put and not yet written (queued, or in the batch being written).
    * ``written``: rows stored.
    * ``duplicates``: rows not stored because their ``request_id`` was already stored.
    * ``retried``: rows settled (stored or duplicate) only after their batch had failed.
    * ``failed_attempts``: write attempts that failed; each is logged.
    * ``batches``: batches settled, one transaction each.
    * ``rejected``: rows the database refused on their own; set aside, and handed back by
      ``close()`` in UnwrittenUsageError.
    """

    model_config = ConfigDict(frozen=True)

    pending: int
    written: int
    duplicates: int
    retried: int
    failed_attempts: int
    batches: int
    rejected: int
