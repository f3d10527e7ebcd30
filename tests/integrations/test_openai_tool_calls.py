"""Tool-call parsing and the chat response builder, streamed and whole, with real Delta objects."""

from __future__ import annotations

import json

import httpx
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations import openai_responses as shape
from integrations.openai_api import APISettings, create_app
from integrations.openai_stream import chat_events, usage_at_end
from integrations.tool_call_stream import ToolCallStreamParser, split_tool_calls
from integrations.tool_calls import forced_call, parse_tool_block, partial_tool_call
from scheduler.api import Delta, FinishReason, Mode

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _deltas(pieces: list[str], finish=FinishReason.STOP) -> list[Delta]:
    out = [Delta("r1", p, [7] * max(1, len(p) // 4)) for p in pieces]
    out[-1].finished, out[-1].finish_reason, out[-1].mode = True, finish, Mode.REFUSION
    out[-1].stats = {"tokens_per_forward": 2.5}
    return out


def _stream_events(text: str, cut: int, allowed=None) -> list:
    parser = ToolCallStreamParser(allowed)
    return parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()


def test_parse_block_accepts_object_and_string_arguments():
    call = parse_tool_block('{"name": "f", "arguments": {"x": 1}}')
    assert (call.name, json.loads(call.arguments)) == ("f", {"x": 1})
    call = parse_tool_block('{"name": "f", "arguments": "{\\"x\\": 2}"}')
    assert json.loads(call.arguments) == {"x": 2}
    assert json.loads(parse_tool_block('{"name": "f"}').arguments) == {}


@pytest.mark.parametrize("body", ['{"name": "f", "arguments": {', '["f"]', '{"arguments": {}}', '{"name": "f", "arguments": 3}', '{"name": "g"}',
                                  '{"name": "f", "arguments": {"x": NaN}}', '{"name": "f", "arguments": "{\\"x\\": -Infinity}"}'])
def test_parse_block_rejects_malformed(body):
    assert parse_tool_block(body, {"f"}) is None


def test_parse_block_keeps_numbers_past_float64_and_int_as_written():
    """RFC 8259 bounds no number, and the tool grammar writes any: 1e999 read as Infinity (then refused,
    and a forced call came back as text; helper-176), and a 5,000-digit int past int()'s limit."""
    big = "9" * 5000
    call = parse_tool_block('{"name": "f", "arguments": {"x": 0.101413027E2483208, "y": 1.5, "z": -2e-99999, "w": ' + big + '}}',
                            {"f"})
    assert call is not None and call.arguments == '{"x": 0.101413027E2483208, "y": 1.5, "z": -0.0, "w": ' + big + '}'
    string_form = parse_tool_block('{"name": "f", "arguments": "{\\"x\\": 1e999}"}', {"f"})
    assert string_form.arguments == '{"x": 1e999}'
    cut = partial_tool_call('{"name": "f", "arguments": {"x": 1e999}}')
    assert cut.complete and cut.arguments == '{"x": 1e999}'


def test_split_whole_text():
    content, calls = split_tool_calls("Let me check.\n" + CALL + "\n", {"get_weather"})
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")


def test_split_keeps_malformed_and_unclosed_blocks_as_text():
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert split_tool_calls("a " + bad, {"get_weather"}) == ("a " + bad, [])
    assert split_tool_calls("a <tool_call>{\"name\"", None) == ("a <tool_call>{\"name\"", [])
    content, calls = split_tool_calls(bad + CALL, {"get_weather"})
    assert content == bad and len(calls) == 1


def test_a_block_the_output_was_cut_inside_is_an_incomplete_call_or_nothing():
    # cut = max_tokens, a deadline or a stop string ended the output inside the block (tool_calls.cut_short)
    def outcome(text):
        content, calls = split_tool_calls(text, {"get_weather"}, cut=True)
        return content, [(c.name, c.arguments, c.complete) for c in calls]

    assert outcome('ok <tool_call>{"name": "get_wea') == ("ok ", [])  # the name not whole: dropped, no markup
    assert outcome('ok <tool_call>{"name": "unknown", "arguments": {') == ("ok ", [])
    assert outcome('<tool_call>{"name": "get_weather"') == (None, [("get_weather", "", False)])
    assert outcome('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa') == (
        None, [("get_weather", '{"city": "Pa', False)])
    assert outcome(CALL[:-5]) == (None, [("get_weather", '{"city": "Paris"}', True)])  # cut in its closing tag
    assert outcome('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": 1}"}') == (
        None, [("get_weather", '{"city": 1}', True)])  # arguments as a JSON string of an object
    assert outcome(CALL + ' <tool_call>{"name": "get_weather", "arguments": {"ci') == (
        None, [("get_weather", '{"city": "Paris"}', True), ("get_weather", '{"ci', False)])
    # cut inside what may open a call: dropped as a call cut before its name (a forced turn cut between two
    # calls returned "\n<tool" as content); not cut, it is text (below)
    assert outcome("no call <tool_") == ("no call ", [])
    for tail in ("\n<", "\n<tool", "\n<tool_call"):
        assert outcome(CALL + tail) == (None, [("get_weather", '{"city": "Paris"}', True)])
    assert split_tool_calls("no call <tool_", {"get_weather"}) == ("no call <tool_", [])
    # not cut (the model ended there): an unclosed block is text, as before
    assert split_tool_calls('<tool_call>{"name": "get_weather", "arguments": {', {"get_weather"}) == (
        '<tool_call>{"name": "get_weather", "arguments": {', [])
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Li'
    for split in range(len(text) + 1):  # streamed, split anywhere: the same
        parser = ToolCallStreamParser({"get_weather"})
        events = parser.feed(text[:split]) + parser.feed(text[split:]) + parser.finish(cut=True)
        assert "".join(e for e in events if isinstance(e, str)) == "Sure."
        assert [(e.name, e.arguments) for e in events if not isinstance(e, str)] == [("get_weather", '{"city": "Li')]


@pytest.mark.parametrize("cut", range(0, len(CALL) + 8, 3))
def test_stream_parser_any_split_point(cut):
    text = "ok " + CALL + " done"
    events = _stream_events(text, cut, {"get_weather"})
    texts = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if not isinstance(e, str)]
    assert texts == "ok done" and [c.name for c in calls] == ["get_weather"]  # the space before a call is formatting
    assert split_tool_calls(text, {"get_weather"})[0] == texts  # whole and streamed alike


def test_stream_parser_holds_back_marker_prefix_only_while_undecided():
    parser = ToolCallStreamParser({"f"})
    assert parser.feed("x <tool_") == ["x"]  # the space waits: it is dropped if a call comes next
    assert parser.feed("box") == [" <tool_box"]
    assert parser.feed("<tool_call>{\"na") == []
    assert parser.finish() == ['<tool_call>{"na']


async def _aiter(items):
    for item in items:
        yield item


async def _run_chat_stream(pieces, allowed, prefix=""):
    header = shape.ResponseHeader("chatcmpl", "m")
    deltas = _deltas(pieces)

    class Observer:
        prompt_tokens, completion_tokens = 3, 4

    events = usage_at_end(chat_events(header, _aiter(deltas), allowed, prefix=prefix), header, "chat.completion.chunk",
                          Observer())
    return [c async for c in events]


async def test_streamed_tool_call_chunks():
    pieces = ["Sure. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>', ""]
    chunks = await _run_chat_stream(pieces, {"get_weather"})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert deltas[0] == {"content": "Sure."}  # the space before the call is formatting (as the whole answer)
    call = deltas[1]["tool_calls"][0]
    assert call["index"] == 0 and call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7


async def test_streamed_malformed_block_is_content():
    pieces = ['<tool_call>{"name": "get_weather", "arguments": }', "</tool_call>"]
    chunks = await _run_chat_stream(pieces, {"get_weather"})
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "".join(pieces)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"])
    # the finishing chunk carries the extension block, as the non-streamed body does
    assert chunks[-2]["refusion"] == {"mode": "refusion", "tokens_per_forward": 2.5}
    assert not any("refusion" in c for c in chunks[:-2])


def test_chat_body_with_and_without_tools():
    header = shape.ResponseHeader("chatcmpl", "m")
    last = _deltas([CALL])[-1]
    body = shape.chat_body(header, [(CALL, last, None)], 5, 9, {"get_weather"})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    assert body["refusion"] == {"mode": "refusion", "tokens_per_forward": 2.5}
    plain = shape.chat_body(header, [(CALL, last, None)], 5, 9, None)  # tools not enabled: text stays text
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": CALL}


def test_deadline_reports_length_with_detail():
    last = _deltas(["x"], finish=FinishReason.DEADLINE)[-1]
    body = shape.completion_body(shape.ResponseHeader("cmpl", "m"), [("x", last, None)], 1, 1)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["refusion"]["finish_detail"] == "deadline"


# A call whose argument text contains the closing marker (code or docs about tool calls).
TRICKY = ('<tool_call>{"name": "write_file", "arguments": {"path": "a.md", '
          '"text": "end a call with </tool_call> and \\"quote\\" it"}}</tool_call>')


@pytest.mark.parametrize("cut", range(0, len(TRICKY) + 1, 7))
def test_close_marker_inside_an_argument_string_stays_in_the_call(cut):
    events = _stream_events(TRICKY + " done", cut)
    (call,) = [e for e in events if not isinstance(e, str)]
    assert call.name == "write_file"
    assert json.loads(call.arguments) == {"path": "a.md", "text": 'end a call with </tool_call> and "quote" it'}
    assert "".join(e for e in events if isinstance(e, str)) == " done"
    content, calls = split_tool_calls(TRICKY, {"write_file"})
    assert content is None and [c.arguments for c in calls] == [call.arguments]


def test_block_end_skips_markers_in_strings_and_escaped_quotes():
    from integrations.tool_call_stream import block_end

    assert block_end('{"a": "x</tool_call>"}</tool_call>') == len('{"a": "x</tool_call>"}')
    assert block_end('{"a": "\\"</tool_call>"}</tool_call>') == len('{"a": "\\"</tool_call>"}')
    assert block_end('{"a": "still open </tool_call>') == -1


@pytest.mark.parametrize("finish, stop_word, expected", [
    (FinishReason.LENGTH, None, "length"), (FinishReason.DEADLINE, None, "length"),
    (FinishReason.STOP, None, "tool_calls"),
    (FinishReason.STOP, "\n### ", "tool_calls"),  # the plain chat template's turn end: the turn ended itself
    (FinishReason.STOP, "unit", "stop"),  # the client's stop string cut the turn (a second call, say)
])
async def test_turn_with_a_call_reports_a_cut_not_tool_calls(finish, stop_word, expected):
    header = shape.ResponseHeader("chatcmpl", "m")

    def deltas(pieces):
        out = _deltas(pieces, finish=finish)
        if stop_word:
            out[-1].stats = {**out[-1].stats, "stop_word": stop_word}
        return out

    last = deltas([CALL])[-1]
    body = shape.chat_body(header, [(CALL, last, None)], 5, 9, {"get_weather"}, client_stops=["unit"])
    assert body["choices"][0]["finish_reason"] == expected
    chunks = [c async for c in chat_events(header, _aiter(deltas([CALL, ""])), {"get_weather"}, client_stops=["unit"])]
    assert chunks[-1]["choices"][0]["finish_reason"] == expected
    assert any("tool_calls" in c["choices"][0]["delta"] for c in chunks)


def test_forced_call_for_each_tool_choice():
    assert forced_call(None, ["get_weather"]) is None  # auto, none or unset: nothing forced
    opening, rest = forced_call("", ["get_weather", "get_time"])  # required: any tool; the example is the first
    assert (opening, rest) == ('<tool_call>{"name": "', 'get_weather", "arguments": {}}</tool_call>')
    assert forced_call("", ["get_time"]) == forced_call("get_time", ["get_time"])  # required, one tool: that one
    opening, rest = forced_call("get_weather", ["get_time", "get_weather"])
    assert (opening, rest) == ('<tool_call>{"name": "get_weather", "arguments": ', "{}}</tool_call>")
    content, calls = split_tool_calls(opening + '{"city": "Paris"}}</tool_call>', {"get_time", "get_weather"})
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert forced_call('we"ird', ['we"ird'])[0].endswith('{"name": "we\\"ird", "arguments": ')  # JSON-quoted
    with pytest.raises(ValueError, match="not in `tools`"):
        forced_call("get_time", ["get_weather"])
    with pytest.raises(ValueError, match="needs `tools`"):
        forced_call("", [])


def test_forced_prefix_ids_are_the_whole_calls_leading_tokens():
    from pathlib import Path

    from integrations.chat import forced_prefix_ids
    from workers.loader import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code")
    for forced in ("", "get_weather"):
        opening, rest = forced_call(forced, ["get_weather"])
        ids, text = forced_prefix_ids(tok, opening, rest)
        whole = tok.encode(opening + rest, add_special_tokens=False)
        assert ids and ids == whole[: len(ids)]  # the tokens the model sees when it writes the call itself
        assert opening.startswith(text) and tok.decode(ids) == text
        assert len(tok.decode(whole[: len(ids) + 1])) > len(opening)  # the next token crosses the opening's end


async def test_streamed_forced_call_starts_with_the_prefix():
    opening, _ = forced_call("get_weather", ["get_weather"])
    pieces = ['{"city": ', '"Lima"}}</tool_call>', ""]
    chunks = await _run_chat_stream(pieces, {"get_weather"}, prefix=opening)
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Lima"})]
    assert not any(d.get("content") for d in deltas)
    # the model did not finish the call: the prefix and what it wrote come back as text
    chunks = await _run_chat_stream([" nothing useful", ""], {"get_weather"}, prefix=opening)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == opening + " nothing useful"


def test_refusion_detail_lists_the_modes_of_a_switched_request():
    last = _deltas(["x"])[-1]
    last.mode, last.stats = Mode.AR, {"tokens_per_forward": 1.41, "modes": ["refusion", "ar"]}
    assert shape.refusion_detail(last) == {"mode": "ar", "tokens_per_forward": 1.41, "modes": ["refusion", "ar"]}
    last.stats = {"tokens_per_forward": 1.0, "modes": ["ar"]}  # one decoder throughout: no list
    assert shape.refusion_detail(last) == {"mode": "ar", "tokens_per_forward": 1.0}


async def test_parallel_tool_calls_false_keeps_only_the_first_call():
    # OpenAI: parallel_tool_calls false means at most one call; a turn with two (tool_choice auto lets
    # the grammar allow several) answers with the first only, as vLLM does, streamed or not
    second = CALL.replace("Paris", "Lima")
    header = shape.ResponseHeader("chatcmpl", "m")
    last = _deltas([CALL + "\n" + second])[-1]
    for max_calls, expected in ((None, ["Paris", "Lima"]), (1, ["Paris"])):
        body = shape.chat_body(header, [(CALL + "\n" + second, last, None)], 5, 9, {"get_weather"}, max_calls)
        made = body["choices"][0]["message"]["tool_calls"]
        assert [json.loads(c["function"]["arguments"])["city"] for c in made] == expected
        assert body["choices"][0]["finish_reason"] == "tool_calls"

        class Observer:
            prompt_tokens, completion_tokens = 3, 4

        chunks = [c async for c in chat_events(header, _aiter(_deltas([CALL, "\n", second, ""])),
                                               {"get_weather"}, max_calls=max_calls)]
        streamed = [d["tool_calls"][0] for c in chunks if c["choices"] for d in [c["choices"][0]["delta"]]
                    if "tool_calls" in d]
        assert [json.loads(c["function"]["arguments"])["city"] for c in streamed] == expected
        assert [c["index"] for c in streamed] == list(range(len(expected)))


@pytest.mark.parametrize("text", [
    CALL + "\n >",                            # text after a call (a cut second call, ignore_eos)
    "Sure.\n\n" + CALL + "\n" + CALL + "\n",  # formatting between and after calls
    "  lead " + CALL + " tail  ",
    "no call at all \n",
    "a <tool_call>{\"name\"",                  # an unclosed block is text
])
def test_streamed_and_whole_answers_have_the_same_content(text):
    """The non-streamed content (split_tool_calls) is what the stream sends, split anywhere."""
    content, calls = split_tool_calls(text, {"get_weather"})
    for cut in range(len(text) + 1):
        events = _stream_events(text, cut, {"get_weather"})
        assert "".join(e for e in events if isinstance(e, str)) == (content or "")
        assert [c.name for c in events if not isinstance(c, str)] == [c.name for c in calls]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop_word, stop, expected", [("unit", ["unit"], "stop"), ("\n### ", [], "tool_calls")])
async def test_the_chat_route_tells_a_clients_stop_string_from_the_templates_turn_end(
        fake_client, stream, stop_word, stop, expected):  # noqa: F811
    """The route passes the request's `stop` strings to the finish reason: a call followed by the cut of
    the client's stop string is "stop"; the plain template's own turn end ("\n### ") is the turn ending."""
    fake_client.default_text, fake_client.final_stats = CALL, {"stop_word": stop_word}
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": tools, "stop": stop, "stream": stream}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: {")]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish == [expected], finish
    else:
        assert response.json()["choices"][0]["finish_reason"] == expected, response.json()


def _weather_turn(route: str, model: str, stream: bool) -> dict:
    """A body asking for the weather with the get_weather tool, in `route`'s shape."""
    body = {"model": model, "stream": stream}
    if route == "/v1/messages":
        return body | {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 256,
                       "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}
    if route == "/v1/responses":
        return body | {"input": "weather?", "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}
    return body | {"messages": [{"role": "user", "content": "weather?"}],
                   "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}


async def _weather_answer(client, text: str, route: str, stream: bool) -> httpx.Response:
    """The answer of `route` to `_weather_turn` when the model writes `text` (the fake client's)."""
    client.default_text = text
    app = create_app(APISettings(model_name=client.model_name), client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        return await http.post(route, json=_weather_turn(route, client.model_name, stream))


SURROGATE_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "\\ud800 Paris"}}</tool_call>'


@pytest.mark.parametrize("route, stream", [("/v1/chat/completions", False), ("/v1/chat/completions", True),
                                           ("/v1/messages", False), ("/v1/messages", True), ("/v1/responses", False)])
async def test_a_call_whose_arguments_escape_a_lone_surrogate_is_answered(fake_client, route, stream):  # noqa: F811
    """"\\ud800" is valid JSON text but reads back as a string UTF-8 cannot carry: the non-streamed
    answer was a 500 (UnicodeEncodeError in the response's render) and the stream was cut. The call comes
    back with the escape, the same string to a JSON reader."""
    response = await _weather_answer(fake_client, SURROGATE_CALL, route, stream)
    assert response.status_code == 200, response.text
    response.content.decode("utf-8")  # the body is UTF-8
    assert "\\ud800 Paris" in response.text, response.text  # the escape, in the arguments or the input
    if not stream and route == "/v1/chat/completions":
        [call] = response.json()["choices"][0]["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"city": "\ud800 Paris"}


BIG_NUMBER_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "x": 0.101413027E2483208}}</tool_call>'


@pytest.mark.parametrize("route, stream", [("/v1/chat/completions", False), ("/v1/chat/completions", True),
                                           ("/v1/messages", False), ("/v1/messages", True), ("/v1/responses", False),
                                           ("/v1/responses", True)])
async def test_a_call_holding_a_number_past_float64_is_a_call(fake_client, route, stream):  # noqa: F811
    """A number past float64's range is JSON the tool grammar writes; the call came back as text with its
    <tool_call> markup (the parser refused it; a forced call so broke tool_choice "required"), and a
    Messages answer cut inside one was a 500 (Infinity in `input`; helper-176). It is a call, its number
    as written."""
    response = await _weather_answer(fake_client, BIG_NUMBER_CALL, route, stream)
    assert response.status_code == 200, response.text
    assert "<tool_call>" not in response.text and "0.101413027E2483208" in response.text, response.text
    if stream:
        return
    literal = dict(parse_float=str)  # (the number as written)
    if route == "/v1/messages":
        [block] = json.loads(response.text, **literal)["content"]
        assert block["type"] == "tool_use" and block["input"] == {"city": "Paris", "x": "0.101413027E2483208"}
    elif route == "/v1/responses":
        [item] = response.json()["output"]
        assert item["type"] == "function_call" and json.loads(item["arguments"], **literal)["x"] == "0.101413027E2483208"
    else:
        [call] = response.json()["choices"][0]["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"], **literal) == {"city": "Paris", "x": "0.101413027E2483208"}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_response_whose_call_a_stop_string_cut_is_incomplete(fake_client, stream):  # noqa: F811
    """A client's stop string cut a function call: its item was "incomplete" but the response said
    "completed", and an agent reading only `status` ran a call whose arguments do not parse (helper-176).
    The response is "incomplete" with reason "stop"."""
    fake_client.default_text, fake_client.final_stats = '<tool_call>{"name": "get_weather", "arguments": {"city": ', {"stop_word": '"'}
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    body = {"model": fake_client.model_name, "input": "weather?", "stream": stream, "stop": ['"'], "tool_choice": "required",
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    if stream:
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "response.incomplete", events[-1]
        final = events[-1]["response"]
    else:
        final = response.json()
    [item] = final["output"]
    assert item["type"] == "function_call" and item["status"] == "incomplete"
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "stop"}


def test_a_messages_input_cut_inside_a_number_past_float64_keeps_it():
    """The input of a call cut short (max_tokens inside it), read as the SDK reads partial_json: a number
    past float64 came back as Infinity, which the response could not write (a 500, helper-176)."""
    from integrations.anthropic_api import _partial_input
    from integrations.json_response import utf8_json

    partial = _partial_input('{"x": 205500001005221e1024, "y": 2.5, "z": [1e400')
    assert utf8_json(partial, allow_nan=False) == b'{"x": 205500001005221e1024, "y": 2.5, "z": [1e400]}'


async def test_a_call_with_a_number_past_float64_sent_back_goes_into_the_prompt_as_written(fake_client):  # noqa: F811
    """Read back for the template, 1e999 became Infinity in the prompt (not JSON, and the parser refuses
    it should the model copy it; helper-178): the arguments go in as sent."""
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    body = {"model": fake_client.model_name, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"x": 1e999}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    prompt = fake_client.tokenizer.decode(fake_client.requests[-1].prompt_ids)
    assert "1e999" in prompt and "Infinity" not in prompt, prompt


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses"])
async def test_such_a_call_sent_back_in_the_conversation_is_taken(fake_client, route):  # noqa: F811
    """The next turn carries the call back: its arguments, read, held the lone surrogate, which the
    tokenizer cannot encode (TypeError: a 500; helper-148). They go into the prompt as sent."""
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    arguments = '{"city": "\\ud800 Paris"}'
    if route == "/v1/responses":
        body = {"input": [{"type": "message", "role": "user", "content": "weather?"},
                          {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": arguments},
                          {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}
    else:
        body = {"messages": [{"role": "user", "content": "weather?"},
                             {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                                 "name": "get_weather", "arguments": arguments}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post(route, json={"model": fake_client.model_name, **body})
    assert response.status_code == 200, response.text
    prompt = fake_client.tokenizer.decode(fake_client.requests[-1].prompt_ids)
    assert "\\\\ud800 Paris" in prompt, prompt  # the escape, as sent
