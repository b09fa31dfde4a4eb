"""``llmstore.extract``: usage fields from OpenAI, OpenAI Responses and Anthropic bodies."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstore import UsageRecord, ValidationError
from llmstore.extract import usage_from_response, usage_from_stream_chunk

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1733000000,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi"},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 80,
        "total_tokens": 1280,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 30},
    },
}
RESPONSES = {
    "id": "resp_1",
    "object": "response",
    "model": "gpt-4.1",
    "status": "incomplete",
    "incomplete_details": {"reason": "max_output_tokens"},
    "output": [],
    "usage": {
        "input_tokens": 300,
        "input_tokens_details": {"cached_tokens": 128},
        "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 350,
    },
}
ANTHROPIC = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hi"}],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 20,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2000,
        "output_tokens": 15,
    },
}


def test_openai_chat_completions() -> None:
    assert usage_from_response(CHAT) == {
        "prompt_tokens": 1200,
        "completion_tokens": 80,
        "cached_tokens": 1024,
        "audio_input_tokens": 0,
        "reasoning_tokens": 30,
        "total_tokens": 1280,
        "model": "gpt-4o-2024-08-06",
        "finish_reason": "stop",
    }


def test_openai_responses() -> None:
    assert usage_from_response(RESPONSES) == {
        "prompt_tokens": 300,
        "completion_tokens": 50,
        "cached_tokens": 128,
        "reasoning_tokens": 20,
        "total_tokens": 350,
        "model": "gpt-4.1",
        "finish_reason": "max_output_tokens",
    }
    completed = {**RESPONSES, "status": "completed", "incomplete_details": None}
    assert usage_from_response(completed)["finish_reason"] == "completed"


def test_anthropic_counts_cache_reads_and_writes_in_the_prompt() -> None:
    fields = usage_from_response(ANTHROPIC)
    assert fields == {
        "prompt_tokens": 2120,
        "completion_tokens": 15,
        "cached_tokens": 2000,
        "cache_write_tokens": 100,
        "model": "claude-sonnet-4-5",
        "finish_reason": "end_turn",
    }
    assert UsageRecord(**fields).total_tokens == 2135


@pytest.mark.parametrize("body", [CHAT, RESPONSES, ANTHROPIC])
def test_every_shape_makes_a_usage_record(body: dict[str, Any]) -> None:
    record = UsageRecord(**usage_from_response(body), cost=3)
    assert record.prompt_tokens >= record.cached_tokens > 0


def test_counts_an_upstream_puts_in_two_parts_never_break_the_convention() -> None:
    # Cached audio counted as cached and as audio; reasoning and audio output overlapping.
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 80, "audio_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 5},
    }
    fields = usage_from_response({"usage": usage})
    assert (fields["cached_tokens"], fields["audio_input_tokens"]) == (80, 20)
    assert (fields["reasoning_tokens"], fields["audio_output_tokens"]) == (8, 2)
    record = UsageRecord(**fields)
    assert record.prompt_tokens == 100 and record.completion_tokens == 10
    over = {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 20}}
    assert usage_from_response({"usage": over})["cached_tokens"] == 10


def test_missing_details_and_null_counts_are_zero() -> None:
    body = {"model": "m", "usage": {"prompt_tokens": 5, "completion_tokens": None}}
    assert usage_from_response(body) == {
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "model": "m",
    }


def _openai_stream() -> list[dict[str, Any]]:
    base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o"}
    return [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {**base, "choices": [], "usage": CHAT["usage"]},
    ]


def _merged(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for chunk in chunks:
        part = usage_from_stream_chunk(chunk)
        if part is not None:
            fields.update(part)
    return fields


def test_an_openai_stream_merges_its_finish_reason_and_final_usage() -> None:
    chunks = _openai_stream()
    assert [usage_from_stream_chunk(c) is None for c in chunks] == [True, True, False, False]
    assert _merged(chunks) == {
        "prompt_tokens": 1200,
        "completion_tokens": 80,
        "cached_tokens": 1024,
        "audio_input_tokens": 0,
        "reasoning_tokens": 30,
        "total_tokens": 1280,
        "model": "gpt-4o",
        "finish_reason": "length",
    }


def test_an_anthropic_stream() -> None:
    start_usage = {**ANTHROPIC["usage"], "output_tokens": 1}  # type: ignore[dict-item]
    chunks: list[dict[str, Any]] = [
        {"type": "message_start", "message": {**ANTHROPIC, "usage": start_usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}},
        {"type": "ping"},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 42},
        },
        {"type": "message_stop"},
    ]
    fields = _merged(chunks)
    assert fields == {
        "prompt_tokens": 2120,
        "completion_tokens": 42,
        "cached_tokens": 2000,
        "cache_write_tokens": 100,
        "model": "claude-sonnet-4-5",
        "finish_reason": "max_tokens",
    }
    assert UsageRecord(**fields).total_tokens == 2162


def test_a_responses_stream_reads_the_completed_event() -> None:
    chunks: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**RESPONSES, "usage": None}},
        {"type": "response.output_text.delta", "delta": "Hi"},
        {"type": "response.completed", "response": RESPONSES},
    ]
    assert _merged(chunks) == usage_from_response(RESPONSES)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "usage",
        {},
        {"usage": None},
        {"usage": []},
        {"usage": {"tokens": 3}},
        {"usage": {"prompt_tokens": -1}},
        {"usage": {"prompt_tokens": True}},
        {"usage": {"prompt_tokens": 1.5}},
        {"usage": {"prompt_tokens": "10"}},
        {"usage": {"prompt_tokens": 2**63}},
        {"usage": {"prompt_tokens": 1, "prompt_tokens_details": []}},
        {"usage": {"prompt_tokens": 1}, "choices": {"0": {}}},
        {"usage": {"prompt_tokens": 1}, "choices": ["stop"]},
        {"usage": {"prompt_tokens": 1}, "model": 7},
        {"usage": {"prompt_tokens": 1}, "model": "m" * 201},
        {"usage": {"prompt_tokens": 1}, "model": "\ud800"},
        {
            "usage": {
                "input_tokens": 2**62,
                "cache_read_input_tokens": 2**62,
                "cache_creation_input_tokens": 2**62,
            }
        },
        {"type": "message", "usage": {"input_tokens": 1}, "stop_reason": ["end_turn"]},
    ],
)
def test_malformed_bodies_are_validation_errors(body: Any) -> None:
    with pytest.raises(ValidationError):
        usage_from_response(body)


@pytest.mark.parametrize(
    "chunk",
    [
        None,
        "data: {}",
        {"type": "message_start"},
        {"type": "message_delta", "usage": "many"},
        {"type": "response.completed"},
        {"choices": [{"finish_reason": 1}]},
        {"usage": {"prompt_tokens": -5}},
    ],
)
def test_malformed_chunks_are_validation_errors(chunk: Any) -> None:
    with pytest.raises(ValidationError):
        usage_from_stream_chunk(chunk)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "usage",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "prompt_tokens_details",
        "cached_tokens",
        "choices",
        "finish_reason",
        "model",
        "type",
        "message",
        "delta",
        "stop_reason",
        "response",
        "object",
    ]
)
_bodies = st.recursive(
    _json,
    lambda inner: st.dictionaries(_keys, inner, max_size=5) | st.lists(inner, max_size=2),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_bodies)
def test_anything_gives_fields_a_usage_record_takes_or_a_validation_error(body: Any) -> None:
    for extract in (usage_from_response, usage_from_stream_chunk):
        try:
            fields = extract(body)
        except ValidationError:
            continue
        if fields is None:
            continue
        assert set(fields) <= {
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "total_tokens",
            "model",
            "finish_reason",
        }
        # Refused by the record's own rules, if at all, as an llmstore error: nothing else.
        with contextlib.suppress(ValidationError):
            UsageRecord(**fields)
