"""integrations/responses_api.py's event builder without Ray or a model: output items in the order the
model wrote text and calls (streamed and not, one builder), log probabilities only on text, an error
event numbered like the others, and chat-turn field names mapped to the Responses API's."""

from __future__ import annotations

import itertools
import json

import pytest

from integrations.chat_run import ChatRun
from integrations.http_errors import APIError
from integrations.openai_responses import ResponseHeader
from integrations.responses_api import ResponseShell, _error_event, response_events
from integrations.responses_models import ResponsesRequest, responses_field
from integrations.tool_calls import TOOL_CLOSE, TOOL_OPEN
from scheduler.api import Delta, FinishReason
from workers.batch import TokenLogprob

CALL = TOOL_OPEN + '{"name": "ping", "arguments": {"host": "a"}}' + TOOL_CLOSE


class Observer:
    prompt_tokens, completion_tokens = 5, 9


def _run(allowed=frozenset({"ping"})) -> ChatRun:
    return ChatRun(client=None, header=ResponseHeader("resp", "m", "resp-1"), observer=Observer(), streams=[],
                   forced="", allowed=set(allowed), max_calls=None)


async def _deltas(pieces, fail=False):
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1 and not fail
        yield Delta("resp-1", text, [i], finished=last, finish_reason=FinishReason.STOP if last else None,
                    logprobs=[TokenLogprob(i, -0.5)])
    if fail:
        raise APIError(500, "engine error: boom", "server_error")


async def _events(pieces, body=None):
    body = body or ResponsesRequest(input="x", tools=[{"type": "function", "name": "ping"}], top_logprobs=0)
    numbers = itertools.count()

    class Formatter:
        def chat(self, entries):
            return [{"token": str(e.token), "logprob": e.logprob} for e in entries]

    return [e async for e in response_events(ResponseShell(body, _run()), _deltas(pieces), Formatter(), numbers)]


async def test_items_keep_the_order_written():
    events = await _events(["Let me check. ", CALL[:20], CALL[20:], " Then I explain."])
    final = events[-1]["response"]
    kinds = [(i["type"], i["content"][0]["text"] if i["type"] == "message" else i["name"]) for i in final["output"]]
    assert kinds == [("message", "Let me check."), ("function_call", "ping"), ("message", " Then I explain.")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]  # the streamed items are the response's
    texts = [part["logprobs"] for i in final["output"] if i["type"] == "message" for part in i["content"]]
    assert [len(t) for t in texts] == [1, 1]  # each text its own token's entry; the call's tokens none
    assert json.loads(final["output"][1]["arguments"]) == {"host": "a"}


async def test_an_error_event_is_numbered_after_the_last_event():
    numbers = itertools.count()
    body = ResponsesRequest(input="x")
    events = []
    with pytest.raises(APIError) as err:
        async for event in response_events(ResponseShell(body, _run(())), _deltas(["a", "b"], fail=True), None, numbers):
            events.append(event)
    error = _error_event(err.value, next(numbers))
    assert error["sequence_number"] == len(events) and error["type"] == "error" and error["code"] == "server_error"


def test_chat_turn_fields_are_named_as_the_responses_api_names_them():
    assert responses_field("tools.0.function.name") == "tools.0.name"
    assert responses_field("response_format.json_schema.schema") == "text.format.schema"
    assert responses_field("response_format") == "text.format"
    assert responses_field("messages.3.content") == "input.3.content"
    assert responses_field("max_completion_tokens") == "max_output_tokens"
    assert responses_field("temperature") == "temperature"


def test_calls_join_the_assistant_turn_they_belong_to_and_outputs_need_their_call():
    from integrations.request_limits import InputError

    body = ResponsesRequest(input=[
        {"role": "user", "content": "ping a"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "c1", "name": "ping", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "ping", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "up"}])
    messages = body.chat_request().messages
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert messages[1].content == "Let me check." and [c["id"] for c in messages[1].tool_calls] == ["c1", "c2"]
    orphan = ResponsesRequest(input=[{"role": "user", "content": "x"},
                                     {"type": "function_call_output", "call_id": "nope", "output": "up"}])
    with pytest.raises(InputError) as err:
        orphan.chat_request()
    assert err.value.field == "input.1.call_id"
