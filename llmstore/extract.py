"""Usage fields from an upstream's response, for ``UsageRecord(**fields, ...)``.

Pure functions over already-decoded JSON, no HTTP client. Three response shapes are read:

* OpenAI Chat Completions (and legacy Completions): ``usage.prompt_tokens``,
  ``completion_tokens``, ``total_tokens``, ``prompt_tokens_details.cached_tokens`` and
  ``audio_tokens`` (as ``audio_input_tokens``), ``completion_tokens_details.reasoning_tokens``
  and ``audio_tokens`` (as ``audio_output_tokens``), and ``choices[0].finish_reason``;
* OpenAI Responses: ``usage.input_tokens``, ``output_tokens``, ``total_tokens``,
  ``input_tokens_details.cached_tokens``, ``output_tokens_details.reasoning_tokens``, and
  ``incomplete_details.reason`` or ``status`` as the finish reason;
* Anthropic Messages: ``usage.input_tokens`` (which leaves cache reads and writes out, so
  ``prompt_tokens`` is input + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``),
  ``output_tokens``, ``cache_read_input_tokens`` as ``cached_tokens``,
  ``cache_creation_input_tokens`` as ``cache_write_tokens``, and ``stop_reason``.

The fields returned are ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
``cache_write_tokens``, ``reasoning_tokens``, ``audio_input_tokens``,
``audio_output_tokens``, ``total_tokens``, ``model`` and ``finish_reason``, those the body
has, counted as ``UsageRecord`` counts them (parts within their wholes). Where an
upstream counts a token in two parts (cached audio is both cached and audio), the audio
part is cut to what is left of the whole, so the record is never refused. A body that is not
one of these shapes, or whose counts are not non-negative integers, is a
``ValidationError``, never a ``KeyError`` or ``TypeError``.

Streams: :func:`usage_from_stream_chunk` reads one decoded event and returns what it
carries, or None. Merge them in order with ``dict.update`` (a later event wins):
OpenAI sends the finish reason in one chunk and the usage in the last one (with
``stream_options={"include_usage": true}``); the Responses API sends the whole response in
``response.completed``; Anthropic sends the prompt's counts in ``message_start`` and the
output count (a running total) and stop reason in ``message_delta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._core.errors import ValidationError
from ._core.validate import MAX_INT64, describe

__all__ = ["usage_from_response", "usage_from_stream_chunk"]

_MODEL_MAX = 200
_REASON_MAX = 100


def usage_from_response(body: Mapping[str, Any]) -> dict[str, Any]:
    """The usage fields of a whole (non-streamed) response body."""
    body = _mapping(body, "the response body")
    usage = body.get("usage")
    if usage is None:
        raise ValidationError("the response body has no usage")
    usage = _mapping(usage, "usage")
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        fields = _chat_usage(usage)
        fields |= _optional_text(_first_choice_finish(body), "finish_reason", _REASON_MAX)
    elif "input_tokens" in usage or "output_tokens" in usage:
        if body.get("object") == "response" or "total_tokens" in usage:
            fields = _responses_usage(usage) | _optional_text(
                _responses_finish(body), "finish_reason", _REASON_MAX
            )
        else:
            fields = _anthropic_prompt(usage) | _anthropic_output(usage)
            fields |= _optional_text(body.get("stop_reason"), "finish_reason", _REASON_MAX)
    else:
        raise ValidationError(
            "usage has neither prompt_tokens (OpenAI) nor input_tokens (Responses, Anthropic)"
        )
    return fields | _optional_text(body.get("model"), "model", _MODEL_MAX)


def usage_from_stream_chunk(chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    """The usage fields one decoded stream event carries, or None when it carries none."""
    chunk = _mapping(chunk, "a stream chunk")
    kind = chunk.get("type")
    if kind in ("response.completed", "response.incomplete", "response.failed"):
        return usage_from_response(_mapping(chunk.get("response"), "the event's response"))
    if kind == "message_start":
        message = _mapping(chunk.get("message"), "message_start's message")
        fields = _optional_text(message.get("model"), "model", _MODEL_MAX)
        usage = message.get("usage")
        if usage is not None:
            fields |= _anthropic_prompt(_mapping(usage, "usage"))
        return fields or None
    if kind == "message_delta":
        fields = {}
        usage = chunk.get("usage")
        if usage is not None:
            fields |= _anthropic_output(_mapping(usage, "usage"))
        delta = chunk.get("delta")
        if delta is not None:
            reason = _mapping(delta, "message_delta's delta").get("stop_reason")
            fields |= _optional_text(reason, "finish_reason", _REASON_MAX)
        return fields or None
    if isinstance(kind, str):  # any other event of those two APIs carries no usage
        return None
    # OpenAI Chat Completions: a finish reason in one chunk, usage in the last.
    fields = _optional_text(_first_choice_finish(chunk), "finish_reason", _REASON_MAX)
    usage = chunk.get("usage")
    if usage is not None:
        fields |= _chat_usage(_mapping(usage, "usage"))
    if not fields:
        return None
    return fields | _optional_text(chunk.get("model"), "model", _MODEL_MAX)


def _chat_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _count(usage, "prompt_tokens")
    completion = _count(usage, "completion_tokens")
    details = _details(usage, "prompt_tokens_details")
    cached = min(_count(details, "cached_tokens"), prompt)
    fields = {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached}
    if details.get("audio_tokens") is not None:
        fields["audio_input_tokens"] = min(_count(details, "audio_tokens"), prompt - cached)
    output = _details(usage, "completion_tokens_details")
    if output.get("reasoning_tokens") is not None:
        fields["reasoning_tokens"] = min(_count(output, "reasoning_tokens"), completion)
    if output.get("audio_tokens") is not None:
        left = completion - fields.get("reasoning_tokens", 0)
        fields["audio_output_tokens"] = min(_count(output, "audio_tokens"), left)
    if usage.get("total_tokens") is not None:
        fields["total_tokens"] = _count(usage, "total_tokens")
    return fields


def _responses_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _count(usage, "input_tokens")
    completion = _count(usage, "output_tokens")
    fields = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": min(
            _count(_details(usage, "input_tokens_details"), "cached_tokens"), prompt
        ),
    }
    output = _details(usage, "output_tokens_details")
    if output.get("reasoning_tokens") is not None:
        fields["reasoning_tokens"] = min(_count(output, "reasoning_tokens"), completion)
    if usage.get("total_tokens") is not None:
        fields["total_tokens"] = _count(usage, "total_tokens")
    return fields


def _anthropic_prompt(usage: Mapping[str, Any]) -> dict[str, Any]:
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    prompt = _count(usage, "input_tokens") + cache_read + cache_write
    if prompt > MAX_INT64:
        raise ValidationError("usage's input tokens add up to more than 2**63 - 1")
    fields = {"prompt_tokens": prompt, "cached_tokens": cache_read}
    if usage.get("cache_creation_input_tokens") is not None:
        fields["cache_write_tokens"] = cache_write
    return fields


def _anthropic_output(usage: Mapping[str, Any]) -> dict[str, Any]:
    return {"completion_tokens": _count(usage, "output_tokens")}


def _first_choice_finish(body: Mapping[str, Any]) -> object:
    choices = body.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list):
        raise ValidationError(f"choices must be a list, not {describe(choices)}")
    if not choices:
        return None
    return _mapping(choices[0], "a choice").get("finish_reason")


def _responses_finish(body: Mapping[str, Any]) -> object:
    incomplete = body.get("incomplete_details")
    if incomplete is not None:
        reason = _mapping(incomplete, "incomplete_details").get("reason")
        if reason is not None:
            return reason
    return body.get("status")


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{what} must be a JSON object, not {describe(value)}")
    return value


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    details = usage.get(key)
    return {} if details is None else _mapping(details, key)


def _count(usage: Mapping[str, Any], key: str) -> int:
    """A token count: absent or null is 0; anything but an integer from 0 is refused."""
    value = usage.get(key)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_INT64:
        raise ValidationError(
            f"{key} must be an integer from 0 to 2**63 - 1, not {describe(value)}"
        )
    return value


def _optional_text(value: object, field: str, maximum: int) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str) and len(value) <= maximum and _storable(value):
        return {field: value}
    raise ValidationError(
        f"{field} must be a string of at most {maximum} characters, not {describe(value)}"
    )


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True
