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


RESPONSES_REQUEST = {"input": REQUEST["messages"][0]["content"], "tools": [{"type": "function", **TOOL["function"]}],
                     "tool_choice": {"type": "function", "name": "record"}, "temperature": 0, "max_output_tokens": 200,
                     "extra_body": {"mode": "ar"}}


def test_responses_stream_sends_the_arguments_in_pieces_that_make_the_whole(sdk):
    whole = [item for item in sdk.responses.create(model="refusion-tiny-code", **RESPONSES_REQUEST).output
             if item.type == "function_call"]
    assert len(whole) == 1
    events = list(sdk.responses.create(model="refusion-tiny-code", stream=True, **RESPONSES_REQUEST))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and all(pieces)  # as written, and never an empty delta
    assert "".join(pieces) == whole[0].arguments
    added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call")
    assert (added.item.name, added.item.arguments) == ("record", "")
    assert {e.item_id for e in events if e.type == "response.function_call_arguments.delta"} == {added.item.id}
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == whole[0].arguments
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[-1].arguments == whole[0].arguments


def test_anthropic_stream_sends_the_input_in_pieces_that_make_the_whole(sdk):
    import anthropic

    claude = anthropic.Anthropic(base_url=str(sdk.base_url).removesuffix("/v1/"), api_key="unused", max_retries=0,
                                 timeout=120)
    kwargs = dict(model="refusion-tiny-code", max_tokens=200, messages=REQUEST["messages"],
                  tools=[{"name": "record", "description": "Record the fields",
                          "input_schema": TOOL["function"]["parameters"]}],
                  tool_choice={"type": "tool", "name": "record"}, extra_body={"mode": "ar", "temperature": 0})
    whole = [b for b in claude.messages.create(**kwargs).content if b.type == "tool_use"]
    with claude.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(pieces) > 1 and all(pieces)
    assert len(whole) == 1 and json.loads("".join(pieces)) == whole[0].input
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [("record", whole[0].input)]
    assert final.stop_reason == "tool_use"
