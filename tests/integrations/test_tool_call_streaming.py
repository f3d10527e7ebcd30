"""Tool-call arguments streamed as they are written (OpenAI's and vLLM's stream shape), with the shipped
tiny model served in this process (serve_testbed.local_app) and the `openai` SDK as the client: a call
forced by tool_choice, under the tools grammar, whose schema makes its arguments long."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from serve_testbed import local_app

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present")

# Every property required and the objects closed: the grammar makes the model write all of them
WORDS = [f"field_{i}" for i in range(6)]
TOOL = {"type": "function", "function": {"name": "record", "description": "Record the fields", "parameters": {
    "type": "object", "properties": {w: {"type": "string", "maxLength": 8} for w in WORDS},
    "required": WORDS, "additionalProperties": False}}}
REQUEST = {"messages": [{"role": "user", "content": "Record the fields for the test."}], "tools": [TOOL],
           "tool_choice": {"type": "function", "function": {"name": "record"}}, "temperature": 0, "max_tokens": 200,
           "extra_body": {"mode": "ar"}}


@pytest.fixture(scope="module")
def sdk():
    with local_app(SHIPPED_MODEL, runner_options={"num_blocks": 64}) as app:
        yield openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def whole(sdk):
    """The same greedy request, not streamed: its one call."""
    response = sdk.chat.completions.create(model="refusion-tiny-code", **REQUEST)
    calls = response.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "record", response
    json.loads(calls[0].function.arguments)
    return response


def test_chat_stream_sends_the_arguments_in_pieces_that_make_the_whole(sdk, whole):
    chunks = list(sdk.chat.completions.create(model="refusion-tiny-code", stream=True, **REQUEST))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "record", "")
    assert first.id.startswith("call_")
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert len(rest) > 1  # the arguments came as they were written, not in one piece
    assert all(d.function.arguments for d in rest)
    assert "".join(d.function.arguments for d in rest) == whole.choices[0].message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"


def test_the_sdk_accumulator_gets_the_whole_call(sdk, whole):
    with sdk.chat.completions.stream(model="refusion-tiny-code", **REQUEST) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert events.count("tool_calls.function.arguments.delta") > 1
    call, expected = final.choices[0].message.tool_calls[0], whole.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("record", expected.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"

