"""integrations/anthropic_models.py's mapping of a Messages request onto a chat turn, and
integrations/anthropic_api.py's event builder, without Ray or a model: content blocks in the order
written (text, tool_use, tool_result), a final assistant message as a prefill, 400s naming the Messages
field, content blocks in the order the model wrote text and calls, stop reasons, and the error event."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from integrations.anthropic_api import MessageTurn, _partial_input, error_event
from integrations.anthropic_models import CountTokensRequest, MessagesRequest, messages_field
from integrations.chat_run import ChatRun
from integrations.http_errors import APIError
from integrations.openai_models import ChatCompletionRequest
from integrations.openai_responses import ResponseHeader
from integrations.request_limits import InputError
from integrations.tool_calls import TOOL_CLOSE, TOOL_OPEN
from scheduler.api import Delta, FinishReason

TOOL = {"name": "add", "description": "Add", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}


def _request(**fields) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
                                          | fields)


def test_blocks_become_chat_messages_in_the_order_written():
    chat = _request(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use Python."}], tools=[TOOL],
                    messages=[
                        {"role": "user", "content": [{"type": "text", "text": "Add 2 "}, {"type": "text", "text": "and 3."}]},
                        {"role": "assistant", "content": [
                            {"type": "thinking", "thinking": "easy", "signature": "s"},
                            {"type": "text", "text": "Adding."},
                            {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2}}]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "5"}]},
                            {"type": "text", "text": "Thanks."}]},
                    ], stop_sequences=["\n\n"], top_k=5, metadata={"user_id": "u1"},
                    tool_choice={"type": "any", "disable_parallel_tool_use": True}).chat_request()
    got = [(m.role, m.content, [c.model_dump() for c in m.tool_calls] if m.tool_calls else None, m.tool_call_id)
           for m in chat.messages]
    call = {"id": "toolu_1", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": 2})}}
    assert got == [("system", "Be brief.\nUse Python.", None, None), ("user", "Add 2 and 3.", None, None),
                   ("assistant", "Adding.", [call], None), ("tool", "5", None, "toolu_1"), ("user", "Thanks.", None, None)]
    assert not chat.continue_final_message
    assert chat.stop == ["\n\n"] and chat.top_k == 5 and chat.user == "u1" and chat.max_tokens == 8
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools[0].function.parameters == TOOL["input_schema"]


def test_tool_results_come_first_in_their_user_message():
    """Anthropic's rule (a 400 there): in a user message every tool_result block comes before any text.
    Text before one was taken (helper-176)."""
    use = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2}}]}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"}
    for content, index in (([{"type": "text", "text": "Here:"}, result], 1),
                           ([result, {"type": "text", "text": "and"}, {**result, "tool_use_id": "toolu_2"}], 2)):
        second = {"type": "tool_use", "id": "toolu_2", "name": "add", "input": {"a": 3}}
        messages = [{"role": "user", "content": "add"}, {**use, "content": use["content"] + [second]},
                    {"role": "user", "content": content}]
        with pytest.raises(InputError, match="tool_result blocks come first") as err:
            _request(tools=[TOOL], messages=messages).chat_request()
        assert err.value.field == f"messages.2.content.{index}"


def test_system_messages_within_the_conversation_stay_in_place():
    """Claude Code sends `role: "system"` messages between turns (its mid-conversation-system beta), and
    `context_management`, `thinking: adaptive`, `output_config.effort`, which change nothing here."""
    chat = _request(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": [{"type": "text", "text": "s"}]},
                              {"role": "user", "content": "b"}],
                    context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
                    thinking={"type": "adaptive"}, output_config={"effort": "high"}).chat_request()
    assert [(m.role, m.content) for m in chat.messages] == [("user", "a"), ("system", "s"), ("user", "b")]


def test_extensions_come_only_from_their_own_top_level_fields():
    """The extensions collected from the top level are not a field a client can send itself (it would
    bypass the Messages checks: `n`, `messages`)."""
    assert _request(mode="ar", seed=3).chat_request().mode == "ar"
    with pytest.raises(ValidationError) as err:
        _request(extensions={"n": 3})
    assert err.value.errors()[0]["loc"] == ("extensions",)


def test_a_final_assistant_message_is_a_prefill_to_continue():
    chat = _request(messages=[{"role": "user", "content": "Write add."},
                              {"role": "assistant", "content": [{"type": "text", "text": "def add("}]}]).chat_request()
    assert chat.continue_final_message and chat.messages[-1].content == "def add("
    count = CountTokensRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]}).chat_request()
    assert count.continue_final_message


def test_tool_choices_and_the_output_format_map_to_the_chat_turn():
    named = _request(tools=[TOOL], tool_choice={"type": "tool", "name": "add"}).chat_request()
    assert named.forced_tool == "add" and named.parallel_tool_calls is None
    assert _request(tools=[TOOL], tool_choice={"type": "none"}).chat_request().tools_enabled is False
    assert _request(tools=[TOOL], tool_choice={"type": "auto"}).chat_request().tool_choice == "auto"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    chat = _request(output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"}).chat_request()
    assert chat.response_format.json_schema.schema_ == schema
    assert _request(thinking={"type": "enabled", "budget_tokens": 2048}).chat_request().messages[-1].content == "hi"


@pytest.mark.parametrize("fields, field", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": []},
                   {"role": "user", "content": "y"}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages.0.content.0.text"),
    # an empty text block, as Anthropic refuses it ("text content blocks must be non-empty")
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": ""}]}]},
     "messages.0.content.1.text"),
    ({"system": [{"type": "text", "text": ""}]}, "system.0.text"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {}},
                                                     {"type": "tool_use", "id": "t1", "name": "add", "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}]},
     "messages.1.content.1.id"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {}}]},
                   {"role": "user", "content": "never answered"}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "1"}]},
                   {"role": "assistant", "content": "ok"},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "1"}]}]},
     "messages.4.content.0.tool_use_id"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": "yes"}]}]},
     "messages.2.content.0.is_error"),
    ({"system": ["hi"]}, "system.0"),
    ({"tools": [TOOL], "tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}},
     "tool_choice.disable_parallel_tool_use"),
    ({"tools": [{"name": "add", "input_schema": None}]}, "tools.0.input_schema"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "mul"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"output_config": {"effort": 5}}, "output_config.effort"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "5"}]}]},
     "messages.0.content.0.tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "add", "input": {}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "add", "input": {}}]}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"system": [{"type": "image"}]}, "system.0.type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"name": "add"}]}, "tools.0.input_schema"),
    ({"tools": [{"name": "add", "input_schema": {}, "input_examples": []}]}, "tools.0.input_examples"),
    ({"tools": [{"name": "", "input_schema": {"type": "object"}}]}, "tools.0.name"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tools": [TOOL], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"output_config": {"format": {"type": "xml"}}}, "output_config.format"),
    ({"output_config": {"verbosity": 1}}, "output_config.verbosity"),
    ({"thinking": {"type": "deep"}}, "thinking.type"),
    ({"metadata": {"user": "x"}}, "metadata.user"),
    ({"temperature": 7}, "temperature"),
    ({"mode": "fast"}, "mode"),
    ({"stop_sequences": [f"s{k}" for k in range(17)]}, "stop_sequences"),
])
def test_bad_requests_name_the_messages_field(fields, field):
    with pytest.raises(InputError) as err:
        _request(**fields).chat_request()
    assert err.value.status == 400 and err.value.field == field


def test_stop_sequences_are_not_held_to_openais_four():
    """Anthropic documents no stop_sequences limit: the Messages route takes up to 16 (chat's `stop`, 4)."""
    stops = [f"s{k}" for k in range(16)]
    assert _request(stop_sequences=stops).chat_request().stop == stops
    with pytest.raises(InputError, match="stop_sequences: at most 16 stop sequences, got 17"):
        _request(stop_sequences=[*stops, "x"]).chat_request()
    with pytest.raises(ValidationError, match="at most 4 stop sequences, got 5"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "stop": stops[:5]})


def test_fields_of_the_sdk_without_effect_here_are_accepted():
    """The anthropic SDK sends speed and inference_geo, and tools with defer_loading: each was a 400 "Extra
    inputs are not permitted"; an unknown tool field lists the accepted ones."""
    tool = TOOL | {"defer_loading": False, "cache_control": {"type": "ephemeral"}}
    chat = _request(speed="standard", inference_geo="us", tools=[tool]).chat_request()
    assert [t.function.name for t in chat.tools] == ["add"]
    assert CountTokensRequest.model_validate({"model": "m", "speed": "standard", "messages": [
        {"role": "user", "content": "x"}]}).chat_request().messages[0].content == "x"
    with pytest.raises(InputError) as err:
        _request(tools=[TOOL | {"color": "red"}]).chat_request()
    assert err.value.field == "tools.0.color" and "input_schema, strict, cache_control" in err.value.message
    with pytest.raises(InputError) as err:
        _request(tools=[TOOL | {"defer_loading": True}]).chat_request()
    assert err.value.field == "tools.0.defer_loading"


def test_body_faults_are_validation_errors_naming_the_field():
    for body, field in (({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
                        ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
                        ({"max_tokens": 4, "messages": []}, "messages"),
                        ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "container": "c"}, "container"),
                        ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "stop_sequences": [5]},
                         "stop_sequences")):
        with pytest.raises(ValidationError) as err:
            MessagesRequest.model_validate({"model": "m"} | body)
        assert err.value.errors()[0]["loc"][0] == field
    for request in (MessagesRequest, CountTokensRequest):  # Anthropic requires model on both routes
        with pytest.raises(ValidationError) as err:
            request.model_validate({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
        assert err.value.errors()[0]["loc"] == ("model",)


def test_chat_turn_fields_are_named_as_the_messages_api_names_them():
    assert messages_field("tools.0.function.parameters") == "tools.0.input_schema"
    assert messages_field("tools.1.function.name") == "tools.1.name"
    assert messages_field("response_format.json_schema.schema") == "output_config.format.schema"
    assert messages_field("messages.3.content") == "messages"  # chat indices are not the request's
    assert messages_field("stop.0") == "stop_sequences.0" and messages_field("max_tokens") == "max_tokens"


# --- the event builder ---------------------------------------------------------------------------------

CALL = TOOL_OPEN + '{"name": "add", "arguments": {"a": 1}}' + TOOL_CLOSE


class Observer:
    prompt_tokens, completion_tokens = 5, 9


def _turn(body: MessagesRequest, allowed=frozenset({"add"}), max_calls=None, stream_arguments=False) -> MessageTurn:
    run = ChatRun(client=None, header=ResponseHeader("msg", "m", "msg-1"), observer=Observer(), streams=[],
                  forced="", allowed=set(allowed) if allowed is not None else None, max_calls=max_calls,
                  stream_arguments=stream_arguments)
    return MessageTurn(body, run)


async def _deltas(pieces, reason=FinishReason.STOP, stats=None, fail=False):
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1 and not fail
        yield Delta("msg-1", text, [i], finished=last, finish_reason=reason if last else None,
                    stats=(stats or {}) if last else {})
    if fail:
        raise APIError(500, "engine error: boom", "server_error")


async def _events(turn: MessageTurn, deltas) -> list[dict]:
    turn.run.streams.append(deltas)
    return [e async for e in turn.events()]


async def test_blocks_keep_the_order_written_and_the_stream_builds_the_message():
    turn = _turn(_request(tools=[TOOL]))
    events = await _events(turn, _deltas(["Let me add. ", CALL[:15], CALL[15:], " Done."], stats={"cached_prompt_tokens": 2}))
    message = turn.message
    assert [(b["type"], b.get("text") or b.get("name")) for b in message["content"]] == [
        ("text", "Let me add."), ("tool_use", "add"), ("text", " Done.")]
    assert message["content"][1]["input"] == {"a": 1} and message["content"][1]["id"].startswith("toolu_")
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2,
                                "output_tokens": 9}
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None
    rebuilt: list[dict] = []  # what a client rebuilds from the events
    for e in events:
        if e["type"] == "content_block_start":
            assert e["index"] == len(rebuilt)
            rebuilt.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta":
            rebuilt[e["index"]]["text"] += e["delta"]["text"]
        elif e["type"] == "content_block_delta":
            rebuilt[e["index"]]["input"] = json.loads(e["delta"]["partial_json"])
    assert rebuilt == message["content"]
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"] == message["usage"]


@pytest.mark.parametrize("reason, stats, stop_sequences, expected", [
    (FinishReason.LENGTH, {}, None, ("max_tokens", None)),
    (FinishReason.DEADLINE, {}, None, ("max_tokens", None)),
    (FinishReason.STOP, {"stop_word": "\n\n"}, ["\n\n"], ("stop_sequence", "\n\n")),
    (FinishReason.STOP, {"stop_word": "\n### "}, ["\n\n"], ("end_turn", None)),  # the template's turn end
    (FinishReason.STOP, {}, None, ("end_turn", None)),
])
async def test_stop_reasons(reason, stats, stop_sequences, expected):
    turn = _turn(_request(stop_sequences=stop_sequences), allowed=None)
    await _events(turn, _deltas(["abc"], reason, stats))
    assert (turn.message["stop_reason"], turn.message["stop_sequence"]) == expected


async def test_a_turn_cut_after_a_call_says_max_tokens_and_disabled_parallel_calls_keep_the_first():
    turn = _turn(_request(tools=[TOOL]), max_calls=1)
    await _events(turn, _deltas([CALL, CALL], FinishReason.LENGTH))
    assert [b["type"] for b in turn.message["content"]] == ["tool_use"]
    assert turn.message["stop_reason"] == "max_tokens"


async def test_a_failure_after_the_start_is_one_anthropic_error_event():
    turn = _turn(_request(), allowed=None)
    events = []
    with pytest.raises(APIError) as err:
        turn.run.streams.append(_deltas(["a", "b"], fail=True))
        async for event in turn.events():
            events.append(event)
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                           "content_block_delta"]
    assert error_event(err.value) == {"type": "error", "error": {"type": "api_error", "message": "engine error: boom"}}
    # a lost engine replica (503, ours server_error/engine_unavailable) is overloaded, as a drain says
    lost = APIError(503, "engine replica unavailable", "server_error", code="engine_unavailable")
    assert error_event(lost)["error"]["type"] == "overloaded_error"


def test_a_system_message_in_the_conversation_joins_its_blocks_as_the_top_level_system_does():
    blocks = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use Python."}]
    chat = _request(system=blocks, messages=[{"role": "user", "content": "a"}, {"role": "system", "content": blocks},
                                             {"role": "user", "content": "b"}]).chat_request()
    assert chat.messages[0].content == chat.messages[2].content == "Be brief.\nUse Python."


def test_a_call_cut_inside_a_string_has_the_input_the_sdk_stream_reads():
    """The anthropic SDK's stream accumulator leaves out a string cut inside (jiter partial_mode=True):
    the whole answer gave {"city": "al"} where the stream's final message had {} (helper-150)."""
    assert _partial_input('{"city": "al') == {}
    assert _partial_input('{"days": 3, "city": "Par') == {"days": 3}
    assert _partial_input('{"days": 3, "city": "Paris"') == {"days": 3, "city": "Paris"}
    assert _partial_input('{"tags": ["a", "b') == {"tags": ["a"]}
    assert _partial_input("") == {} and _partial_input("[1") == {}


LONG_INPUT = '{"a": 12, "b": [3, 4], "note": "sum them"}'


@pytest.mark.parametrize("max_calls", [None, 1])
async def test_a_grammar_call_streams_its_input_in_pieces(max_calls):
    """Under the tools grammar (ChatRun.stream_arguments) a tool_use block's input_json_delta pieces come
    as the model writes them (one whole delta once the block closed, before); they add up to the
    block's input. A second call past max_calls (disable_parallel_tool_use) is dropped whole."""
    call = TOOL_OPEN + '{"name": "add", "arguments": ' + LONG_INPUT + "}" + TOOL_CLOSE
    turn = _turn(_request(tools=[TOOL]), max_calls=max_calls, stream_arguments=True)
    events = await _events(turn, _deltas(["Adding. "] + list(call) + ["\n"] + list(call)))
    uses = [b for b in turn.message["content"] if b["type"] == "tool_use"]
    assert [b["input"] for b in uses] == [json.loads(LONG_INPUT)] * (max_calls or 2)
    for index, block in enumerate(turn.message["content"]):
        if block["type"] != "tool_use":
            continue
        mine = [e for e in events if e.get("index") == index]
        assert mine[0] == {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}
        pieces = [e["delta"]["partial_json"] for e in mine if e["type"] == "content_block_delta"]
        assert len(pieces) > 1 and all(pieces) and "".join(pieces) == LONG_INPUT
        assert mine[-1] == {"type": "content_block_stop", "index": index}
    assert turn.message["stop_reason"] == "tool_use"


async def test_a_grammar_tool_use_starts_once_its_name_is_written():
    """Anthropic sends content_block_start (tool_use, input {}) before the input_json_delta pieces; it went
    out only once `"arguments": ` had come. It now goes out with the delta that closes the name; cut there
    (max_tokens), the block is that start and its stop, input {}."""
    seen: list = []

    async def deltas(pieces, reason):
        for i, text in enumerate(pieces):
            seen.append(("delta", i))
            last = i == len(pieces) - 1
            yield Delta("msg-1", text, [i], finished=last, finish_reason=reason if last else None, stats={})

    pieces = ['<tool_call>{"name": "add"', ', "arguments": {"a": 1}}' + TOOL_CLOSE]
    turn = _turn(_request(tools=[TOOL]), stream_arguments=True)
    turn.run.streams.append(deltas(pieces, FinishReason.STOP))
    async for event in turn.events():
        seen.append(event)
    first = seen.index(("delta", 1))
    starts = [e for e in seen[:first] if isinstance(e, dict) and e["type"] == "content_block_start"]
    assert [(e["content_block"]["type"], e["content_block"]["name"], e["content_block"]["input"]) for e in starts] == [
        ("tool_use", "add", {})]
    assert "".join(e["delta"]["partial_json"] for e in seen[first:] if isinstance(e, dict)
                   and e["type"] == "content_block_delta") == '{"a": 1}'
    turn = _turn(_request(tools=[TOOL]), stream_arguments=True)
    events = await _events(turn, deltas(pieces[:1], FinishReason.LENGTH))
    assert [e["type"] for e in events if "index" in e] == ["content_block_start", "content_block_stop"]
    assert [(b["name"], b["input"]) for b in turn.message["content"] if b["type"] == "tool_use"] == [("add", {})]
    assert turn.message["stop_reason"] == "max_tokens"
