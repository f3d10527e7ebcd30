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


def _run(allowed=frozenset({"ping"}), stream_arguments=False, max_calls=None) -> ChatRun:
    return ChatRun(client=None, header=ResponseHeader("resp", "m", "resp-1"), observer=Observer(), streams=[],
                   forced="", allowed=set(allowed), max_calls=max_calls, stream_arguments=stream_arguments)


async def _deltas(pieces, fail=False, finish=FinishReason.STOP):
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1 and not fail
        yield Delta("resp-1", text, [i], finished=last, finish_reason=finish if last else None,
                    logprobs=[TokenLogprob(i, -0.5)])
    if fail:
        raise APIError(500, "engine error: boom", "server_error")


async def _events(pieces, body=None, run=None, finish=FinishReason.STOP):
    body = body or ResponsesRequest(input="x", tools=[{"type": "function", "name": "ping"}], top_logprobs=0)
    numbers = itertools.count()

    class Formatter:
        def chat(self, entries):
            return [{"token": str(e.token), "logprob": e.logprob} for e in entries]

    return [e async for e in response_events(ResponseShell(body, run or _run()), _deltas(pieces, finish=finish),
                                             Formatter(), numbers)]


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


@pytest.mark.parametrize("pieces", [["def add", "(a, b):", ""], ["", ""], ["x", "", ""]])
async def test_the_deltas_log_probabilities_add_up_to_the_messages(pieces):
    """Tokens that release no text (a stop string's, the last step's) still reach a delta: the streamed
    log probabilities are the final message's, entry for entry (they were only in the final events)."""
    events = await _events(pieces)
    streamed = [entry for e in events if e["type"] == "response.output_text.delta" for entry in e["logprobs"]]
    final = events[-1]["response"]["output"][0]["content"][0]
    assert streamed == final["logprobs"] and len(streamed) == len(pieces)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == final["text"]


async def test_the_message_the_cap_cut_is_incomplete():
    """As OpenAI: in an incomplete response the message being written when the cap cut it has status
    "incomplete" (it was "completed"); a call finished before it stays "completed"."""
    async def cut(pieces):
        async for delta in _deltas(pieces):
            yield Delta(delta.request_id, delta.text, delta.token_ids, finished=delta.finished, logprobs=delta.logprobs,
                        finish_reason=FinishReason.LENGTH if delta.finished else None)

    numbers = itertools.count()
    body = ResponsesRequest(input="x", tools=[{"type": "function", "name": "ping"}])
    events = [e async for e in response_events(ResponseShell(body, _run()), cut([CALL, "Then I"]), None, numbers)]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete" and final["status"] == "incomplete"
    assert [(i["type"], i["status"]) for i in final["output"]] == [("function_call", "completed"), ("message", "incomplete")]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]
    events = await _events(["All done."])  # a turn that ended by itself: completed
    assert [i["status"] for i in events[-1]["response"]["output"]] == ["completed"]


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


def test_a_json_schema_format_needs_its_schema():
    """OpenAI's Responses API requires text.format.schema for a json_schema format; without it the output
    was unconstrained JSON, answered 200 (helper-176)."""
    from integrations.request_limits import InputError

    with pytest.raises(InputError, match="needs its schema") as err:
        ResponsesRequest(input="x", text={"format": {"type": "json_schema", "name": "n"}}).chat_request()
    assert err.value.field == "text.format.schema"
    chat = ResponsesRequest(input="x", text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}}
                            ).chat_request()
    assert chat.response_format is not None


def test_calls_join_the_assistant_turn_they_belong_to_and_outputs_need_their_call():
    from integrations.request_limits import InputError

    body = ResponsesRequest(input=[
        {"role": "user", "content": "ping a"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "c1", "name": "ping", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "ping", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "up"},
        {"type": "function_call_output", "call_id": "c2", "output": "down"}])
    messages = body.chat_request().messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1].content == "Let me check." and [c.id for c in messages[1].tool_calls] == ["c1", "c2"]
    orphan = ResponsesRequest(input=[{"role": "user", "content": "x"},
                                     {"type": "function_call_output", "call_id": "nope", "output": "up"}])
    with pytest.raises(InputError) as err:
        orphan.chat_request()
    assert err.value.field == "input.1.call_id"
    # As OpenAI: a call without its output, or two calls sharing a call_id, is a 400 naming the item
    call = {"type": "function_call", "call_id": "c1", "name": "ping", "arguments": "{}"}
    for items, field, message in (
            ([call], "input.1", "no function_call_output item answers function_call 'c1'"),
            ([call, call, {"type": "function_call_output", "call_id": "c1", "output": "up"}], "input.2.call_id",
             "call_id 'c1' is used by input.1 too")):
        with pytest.raises(InputError, match=message) as err:
            ResponsesRequest(input=[{"role": "user", "content": "x"}, *items]).chat_request()
        assert err.value.field == field


def test_metadata_is_held_to_openais_limits():
    """Responses' metadata is echoed back, so it takes OpenAI's limits as chat's does: 16 pairs, keys up
    to 64 characters, values up to 512 (it was uncapped)."""
    from pydantic import ValidationError

    assert ResponsesRequest(input="x", metadata={"k" * 64: "v" * 512}).metadata == {"k" * 64: "v" * 512}
    for metadata, where in (({str(k): "v" for k in range(17)}, ("metadata",)), ({"k" * 65: "v"}, ("metadata", "k" * 65, "[key]")),
                            ({"k": "v" * 513}, ("metadata", "k"))):
        with pytest.raises(ValidationError) as err:
            ResponsesRequest(input="x", metadata=metadata)
        assert err.value.errors()[0]["loc"] == where


def test_text_parts_are_joined_by_newlines_as_on_chat():
    """input_text parts ran together ("def f():" + "    return 1" on one line); they are joined by newlines,
    as the chat route and vLLM join a message's text parts."""
    parts = [{"type": "input_text", "text": "def f():"}, {"type": "input_text", "text": "    return 1"}]
    [message] = ResponsesRequest(input=[{"role": "user", "content": parts}]).chat_request().messages
    assert message.content == "def f():\n    return 1"


async def test_every_event_validates_against_the_openai_sdks_own_types():
    # The SDK builds its objects without validating them, so a missing required field only shows to a
    # strictly typed client: validate every event as the SDK's own class for its `type` (openai's usage
    # has `input_tokens_details.cache_write_tokens`, required in the SDK's 3.x types), log probabilities
    # from the real formatter on the shipped tokenizer
    import typing
    from pathlib import Path

    from openai.types.responses import ResponseStreamEvent

    from integrations.openai_logprobs import LogprobFormatter
    from workers.loader import load_tokenizer

    members = typing.get_args(typing.get_args(ResponseStreamEvent)[0])
    classes = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls for cls in members}
    tokenizer = load_tokenizer(Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code")
    body = ResponsesRequest(input="x", tools=[{"type": "function", "name": "ping"}], top_logprobs=2)
    for pieces in (["Let me check. ", CALL, " Then I explain."], ["All done."]):
        events = [e async for e in response_events(ResponseShell(body, _run()), _deltas(pieces),
                                                   LogprobFormatter(tokenizer, 2), itertools.count())]
        for event in events:
            classes[event["type"]].model_validate(event)
        assert events[-1]["response"]["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}


ARGUMENTS = '{"host": "a.example", "port": 8080, "tags": ["x", "y"]}'
LONG_CALL = TOOL_OPEN + '{"name": "ping", "arguments": ' + ARGUMENTS + "}" + TOOL_CLOSE


@pytest.mark.parametrize("max_calls", [None, 1])
async def test_a_grammar_call_streams_its_arguments_in_pieces(max_calls):
    """Under the tools grammar (ChatRun.stream_arguments) a call's arguments deltas come as the model
    writes them (they came whole, in one delta, once the block closed); every delta is non-empty, and
    they add up to the done event's and the item's arguments. A second call past max_calls is dropped."""
    events = await _events(["Hi. "] + list(LONG_CALL) + ["\n"] + list(LONG_CALL),
                           run=_run(stream_arguments=True, max_calls=max_calls))
    calls = [i for i in events[-1]["response"]["output"] if i["type"] == "function_call"]
    assert len(calls) == (max_calls or 2) and all(c["arguments"] == ARGUMENTS for c in calls)
    for index, call in enumerate(calls, start=1):
        pieces = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                  and e["item_id"] == call["id"]]
        assert len(pieces) > 1 and all(pieces) and "".join(pieces) == ARGUMENTS
        assert {e["output_index"] for e in events if e.get("item_id") == call["id"]} == {index}
        added = [e for e in events if e["type"] == "response.output_item.added" and e["item"]["id"] == call["id"]]
        assert [(a["item"]["arguments"], a["item"]["status"]) for a in added] == [("", "in_progress")]
        kinds = [e["type"] for e in events if e.get("item_id") == call["id"] or e.get("item", {}).get("id") == call["id"]]
        assert kinds[0] == "response.output_item.added" and kinds[-2:] == [
            "response.function_call_arguments.done", "response.output_item.done"]


async def test_a_call_cut_before_its_arguments_sends_no_empty_delta():
    """A call the cap cut before its arguments (arguments ""), sent whole: no `"delta": ""` event (one went out)."""
    events = await _events(['<tool_call>{"name": "ping"'], finish=FinishReason.LENGTH)
    assert [e for e in events if e["type"] == "response.function_call_arguments.delta"] == []
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == ""


async def test_a_grammar_call_is_added_once_its_name_is_written():
    """OpenAI sends output_item.added (name, arguments "") before the arguments deltas; it went out only
    once `"arguments": ` had come, so a call paused or cut after its name came whole at the end. It now
    goes out with the delta that closes the name; cut there (max_output_tokens), the call is that item."""
    seen: list = []

    async def deltas(pieces, finish):
        for i, text in enumerate(pieces):
            seen.append(("delta", i))
            last = i == len(pieces) - 1
            yield Delta("resp-1", text, [i], finished=last, finish_reason=finish if last else None)

    body = ResponsesRequest(input="x", tools=[{"type": "function", "name": "ping"}])
    pieces = ['<tool_call>{"name": "ping"', ', "arguments": {"host": "a"}}' + TOOL_CLOSE]
    async for event in response_events(ResponseShell(body, _run(stream_arguments=True)),
                                       deltas(pieces, FinishReason.STOP), None, itertools.count()):
        seen.append(event)
    first = seen.index(("delta", 1))
    added = [e for e in seen[:first] if isinstance(e, dict) and e["type"] == "response.output_item.added"]
    assert [(e["item"]["type"], e["item"]["name"], e["item"]["arguments"]) for e in added] == [("function_call", "ping", "")]
    pieces_sent = [e["delta"] for e in seen[first:] if isinstance(e, dict) and e["type"] == "response.function_call_arguments.delta"]
    assert "".join(pieces_sent) == '{"host": "a"}'
    events = [e async for e in response_events(ResponseShell(body, _run(stream_arguments=True)),
                                               deltas(pieces[:1], FinishReason.LENGTH), None, itertools.count())]
    kinds = [e["type"] for e in events if e.get("item", {}).get("type") == "function_call" or "item_id" in e]
    assert kinds == ["response.output_item.added", "response.function_call_arguments.done", "response.output_item.done"]
    [item] = [i for i in events[-1]["response"]["output"] if i["type"] == "function_call"]
    assert (item["name"], item["arguments"], item["status"]) == ("ping", "", "incomplete")
