"""Streamed tool-call arguments (tool_call_stream.ToolCallStreamParser with stream_arguments,
integrations/tool_call_arguments.py): fed in pieces split anywhere, the events are the same and each
call's pieces concatenate to the arguments the whole-call path gives (split_tool_calls)."""

from __future__ import annotations

import json

import pytest

from integrations import openai_responses as shape
from integrations.openai_stream import chat_events
from integrations.tool_call_arguments import ArgumentsStream
from integrations.tool_call_arguments import ArgumentsPiece, CallStart
from integrations.tool_call_stream import ToolCallStreamParser, split_tool_calls
from integrations.tool_calls import ToolCall
from scheduler.api import Delta, FinishReason, Mode

ALLOWED = {"f", "g"}


def _block(name: str, arguments: str) -> str:
    """A call as the tools grammar writes it (structured_output._call_rules)."""
    return '<tool_call>{"name": "%s", "arguments": %s}</tool_call>' % (name, arguments)


SAMPLES = [
    "Sure. " + _block("f", '{"a": 1, "b": [true, null, "x\\ny </tool_call> \\"q\\""], "c": {"d": -2.5, "e": {}}}'),
    _block("g", '{"s": "é 😀 \\u001f \\t", "n": 12345678901234567890}') + "\n" + _block("f", "{}"),
    _block("f", '{"n": 1.50, "e": 1E5, "z": -0, "s": "ok"}'),  # numbers json.dumps writes otherwise
    _block("f", '{"s": "\\u001F \\u0008 end"}'),  # escapes json.dumps writes otherwise
    _block("f", '{"s": "trailing   "}') + " after",
]


def _run(parts: list[str], cut: bool = False) -> list:
    parser = ToolCallStreamParser(ALLOWED, stream_arguments=True)
    events = []
    for part in parts:
        events += parser.feed(part)
    return events + parser.finish(cut)


def _shape(events: list) -> list:
    """The events with text and arguments pieces joined (how they split depends on how text came)."""
    out: list = []
    for event in events:
        if isinstance(event, str) and out and isinstance(out[-1], str):
            out[-1] += event
        elif isinstance(event, ArgumentsPiece) and out and isinstance(out[-1], ArgumentsPiece):
            out[-1] = ArgumentsPiece(event.id, out[-1].text + event.text)
        else:
            out.append(event)
    return [("call", e.name, e.arguments, e.complete) if isinstance(e, ToolCall)
            else ("start", e.name) if isinstance(e, CallStart)
            else ("arguments", e.text) if isinstance(e, ArgumentsPiece) else e for e in out]


def _pieces_per_call(events: list) -> list[tuple[str, ToolCall]]:
    """(the call's concatenated pieces, its ToolCall) per call; checks each piece's id. A call that never
    opened (a CallStart) has None for pieces: none should, as a call comes out only once its name is
    whole, and that opens it."""
    out, sent, opened = [], "", None
    for event in events:
        if isinstance(event, CallStart):
            opened, sent = event, ""
        elif isinstance(event, ArgumentsPiece):
            assert event.id == opened.id and event.text
            sent += event.text
        elif isinstance(event, ToolCall):
            assert opened is None and event.arguments == "" or event.id == opened.id
            out.append((sent if opened else None, event))
            opened = None
    return out


@pytest.mark.parametrize("text", SAMPLES)
def test_every_split_gives_the_same_events_and_the_whole_calls_arguments(text):
    content, calls = split_tool_calls(text, ALLOWED)
    whole = _shape(_run([text]))
    assert [e for e in whole if isinstance(e, tuple) and e[0] == "call"] == [
        ("call", c.name, c.arguments, True) for c in calls]
    assert "".join(e for e in whole if isinstance(e, str)) == (content or "")
    for cut in range(len(text) + 1):
        events = _run([text[:cut], text[cut:]])
        assert _shape(events) == whole, cut
        assert [(s, c.arguments) for s, c in _pieces_per_call(events)] == [(c.arguments, c.arguments) for c in calls]
    by_character = _run(list(text))
    assert _shape(by_character) == whole
    assert [s for s, _ in _pieces_per_call(by_character)] == [c.arguments for c in calls]


def test_canonical_arguments_stream_in_more_than_one_piece():
    events = _run(list(SAMPLES[0]))
    pieces = [e.text for e in events if isinstance(e, ArgumentsPiece)]
    assert len(pieces) > 10 and pieces[0] == "{"


@pytest.mark.parametrize("text", SAMPLES)
def test_a_call_cut_anywhere_ends_with_the_text_so_far(text):
    """Output cut (max_tokens) inside a call: its pieces still concatenate to the incomplete call's
    arguments, which are what the whole-call path gives for the cut text."""
    for cut in range(len(text) + 1):
        prefix = text[:cut]
        _, calls = split_tool_calls(prefix, ALLOWED, cut=True)
        streamed = _pieces_per_call(_run(list(prefix), cut=True))
        assert [(c.name, c.arguments, c.complete) for _, c in streamed] == [
            (c.name, c.arguments, c.complete) for c in calls]
        assert all(sent == call.arguments for sent, call in streamed), prefix


def test_without_stream_arguments_a_call_comes_whole():
    parser = ToolCallStreamParser(ALLOWED)
    events = parser.feed(SAMPLES[0][:40]) + parser.feed(SAMPLES[0][40:]) + parser.finish()
    assert not [e for e in events if isinstance(e, (CallStart, ArgumentsPiece))]
    assert [type(e) for e in events] == [str, ToolCall]


def test_a_block_not_in_the_grammars_shape_is_not_streamed():
    """Only the grammar's exact opening streams (a name not offered, free whitespace: the whole path)."""
    for text in ['<tool_call> {"name": "f", "arguments": {}}</tool_call>', _block("h", "{}")]:
        events = _run(list(text))
        assert not [e for e in events if isinstance(e, (CallStart, ArgumentsPiece))]


@pytest.mark.parametrize("arguments, sent", [
    ('{"a": 1.50}', '{"a":'), ('{"a": "x\\u001F"}', '{"a": "x'), ('{"a": 1, "a": 2}', '{"a": 1, "a'),
    ('{"a": "b  ', '{"a": "b'), ('{"a": 12', '{"a":'), ('{"a": "\\n', '{"a": "\\n'),
])
def test_the_safe_prefix_stops_where_the_whole_path_may_write_otherwise(arguments, sent):
    for step in (1, 2, len(arguments)):
        stream = ArgumentsStream()
        assert "".join(stream.feed(arguments[i:i + step]) for i in range(0, len(arguments), step)) == sent


async def _aiter(items):
    for item in items:
        yield item


async def test_chat_chunks_open_each_call_then_send_its_pieces():
    text = _block("f", '{"a": "xy"}') + "\n" + _block("g", '{"b": 2}')
    deltas = [Delta("r1", ch, [7]) for ch in text]
    deltas[-1].finished, deltas[-1].finish_reason, deltas[-1].mode = True, FinishReason.STOP, Mode.AR
    header = shape.ResponseHeader("chatcmpl", "m")
    for max_calls, names in ((None, ["f", "g"]), (1, ["f"])):
        chunks = [c async for c in chat_events(header, _aiter(deltas), ALLOWED, max_calls=max_calls,
                                               stream_arguments=True)]
        calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
        starts = [c for c in calls if "id" in c]
        assert [(c["index"], c["type"], c["function"]) for c in starts] == [
            (i, "function", {"name": n, "arguments": ""}) for i, n in enumerate(names)]
        joined = ["".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in range(len(names))]
        assert joined == ['{"a": "xy"}', '{"b": 2}'][:len(names)]
        assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls if "id" not in c)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert json.loads(joined[0]) == {"a": "xy"}


def test_a_repeated_key_comes_back_as_written_so_the_pieces_still_join():
    """An object the schema leaves open may repeat a key; the whole-call path re-serialized it as json
    keeps it (`{"a": 2}`), so the pieces already streamed (`{"a": 1, "a`) were not its start and the chat
    stream's arguments stayed cut. The arguments now come back as the model wrote them, on both paths."""
    from integrations.tool_calls import parse_tool_block

    written = '{"a": 1, "b": {"c": [1.50, {"d": 2, "d": 3}]}, "a": "x"}'
    assert parse_tool_block('{"name": "f", "arguments": ' + written + "}").arguments == written
    assert parse_tool_block('{"name": "f", "arguments": {"a": 1.50}}').arguments == '{"a": 1.5}'  # none repeated
    text = _block("f", written)
    for split in range(1, len(text)):
        events = _run([text[:split], text[split:]])
        [call] = [e for e in events if isinstance(e, ToolCall)]
        assert call.arguments == written
        assert "".join(e.text for e in events if isinstance(e, ArgumentsPiece)) == written


def test_a_repeated_key_in_a_call_cut_in_its_closing_text_comes_back_as_written():
    """The output cut after the arguments' object but before the call's closing `}` (max_tokens, a stop
    string): partial_tool_call re-serialized the object, so a repeated key came back as json keeps it
    (`{"a": 2}`) while the stream had sent `{"a": 1, "a`; both paths now give the text as written."""
    from integrations.tool_calls import partial_tool_call

    written = '{"a": 1, "a": 2}'
    body = '{"name": "f", "arguments": ' + written
    assert partial_tool_call(body, ALLOWED).arguments == written
    assert partial_tool_call(body + "}", ALLOWED).arguments == written
    for text in ("<tool_call>" + body, "<tool_call>" + body + "}"):
        for split in range(1, len(text)):
            events = _run([text[:split], text[split:]], cut=True)
            [call] = [e for e in events if isinstance(e, ToolCall)]
            assert call.arguments == written
            assert "".join(e.text for e in events if isinstance(e, ArgumentsPiece)) == written


def test_a_block_is_scanned_for_its_end_once_however_it_is_fed():
    """The stream parser looked for a block's `</tool_call>` by scanning all of the block's text on every
    feed: a 28,000-character call fed 4 characters at a time held the event loop ~5 s. The scan now
    resumes where it stopped (tool_call_stream.BlockEndScan); the lines run in tool_call_stream.py (counted with
    sys.settrace, not timed) grow with the text, not its square, and a closing tag split across feeds,
    or inside a string, is still found only where it closes the block."""
    import sys

    from integrations import tool_call_stream
    from integrations.tool_call_stream import block_end

    text = _block("f", json.dumps({"code": "x = '</tool_call>'\n" * 100, "n": "<" * 50}))
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        if frame.f_code.co_filename == tool_call_stream.__file__:
            lines += event == "line"
            return trace
        return None

    for stream_arguments in (False, True):
        lines = 0
        parser = ToolCallStreamParser(ALLOWED, stream_arguments=stream_arguments)
        sys.settrace(trace)
        try:
            events = [e for i in range(0, len(text), 4) for e in parser.feed(text[i:i + 4])] + parser.finish()
        finally:
            sys.settrace(None)
        assert lines < 20 * len(text), (stream_arguments, lines, len(text))  # (2,769,000 before)
        [call] = [e for e in events if isinstance(e, ToolCall)]
        assert json.loads(call.arguments)["n"] == "<" * 50
    body = text[len("<tool_call>"):]
    scan = tool_call_stream.BlockEndScan()
    found = [scan.feed(ch) for ch in body]
    assert found == [-1] * (len(body) - 1) + [block_end(body)]
    assert block_end(body) == len(body) - len("</tool_call>")


def test_a_call_opens_as_soon_as_its_name_string_closes():
    """OpenAI and vLLM send a call's name before its arguments: the CallStart went out only once
    `"arguments": ` had come, so a call cut (or paused) between its name and its arguments came whole at
    the end. It now goes out when the name's string closes; the pieces follow once the arguments open."""
    parser = ToolCallStreamParser(ALLOWED, stream_arguments=True)
    assert parser.feed('<tool_call>{"name": "f') == []
    [start] = parser.feed('"')
    assert (type(start), start.name) == (CallStart, "f")
    assert parser.feed(', "argum') == []
    events = parser.feed('ents": {"a": 1}}</tool_call>') + parser.finish()
    assert [e.text for e in events if isinstance(e, ArgumentsPiece)] == ['{"a": 1}']
    assert [(e.id, e.arguments) for e in events if isinstance(e, ToolCall)] == [(start.id, '{"a": 1}')]
    for cut_at in ('<tool_call>{"name": "f"', '<tool_call>{"name": "f", "argu'):
        events = _run([cut_at], cut=True)
        assert [(type(e), e.name) for e in events[:1]] == [(CallStart, "f")]
        assert [(e.arguments, e.complete, e.id) for e in events[1:]] == [("", False, events[0].id)]
    # after the name, not the grammar's text: the opening went out, the arguments come at the end
    events = _run(['<tool_call>{"name": "f"}</tool_call>'])
    assert _shape(events) == [("start", "f"), ("arguments", "{}"), ("call", "f", "{}", True)]


async def test_a_chat_stream_paused_after_the_name_has_sent_the_calls_opening():
    """The deltas stop (the model pauses, a step boundary) right after the call's name: the chunk with
    its index, id, type, name and arguments "" is out before the next delta is asked for; cut there
    (max_tokens) the call is that opening alone, finish "length"."""
    seen: list = []

    async def deltas(pieces, finish):
        for i, text in enumerate(pieces):
            seen.append(("delta", i))
            last = i == len(pieces) - 1
            yield Delta("r1", text, [7], finished=last, finish_reason=finish if last else None, mode=Mode.AR)

    header = shape.ResponseHeader("chatcmpl", "m")
    pieces = ['Ok. <tool_call>{"name": "f"', ', "arguments": {"a": 1}}</tool_call>']
    async for chunk in chat_events(header, deltas(pieces, FinishReason.STOP), ALLOWED, stream_arguments=True):
        seen.append(chunk["choices"][0]["delta"].get("tool_calls"))
    first = seen.index(("delta", 1))
    assert [c for c in seen[:first] if isinstance(c, list)] == [[{"index": 0, "id": seen[first - 1][0]["id"], "type": "function",
                                               "function": {"name": "f", "arguments": ""}}]]
    assert "".join(c[0]["function"]["arguments"] for c in seen[first:] if isinstance(c, list)) == '{"a": 1}'
    chunks = [c async for c in chat_events(header, deltas(pieces[:1], FinishReason.LENGTH), ALLOWED,
                                           stream_arguments=True)]
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert [[{**c, "id": None} for c in call] for call in calls] == [
        [{"index": 0, "id": None, "type": "function", "function": {"name": "f", "arguments": ""}}]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def _random_value(rng, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -7, 12345678901234567890, 2.5, -0.001, 1e-7, 3e100])
    if kind in (2, 3, 4):
        alphabet = ['a', ' ', '"', '\\', '/', '\n', '\x1f', 'é', '😀', '</tool_call>', '<', '{', '}', ',', ':']
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return {rng.choice(["a", "b", "c d", "é", ""]): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _random_arguments(rng) -> str:
    """Arguments as the tools grammar may write them: json.dumps's form, now and then with what
    json.dumps writes otherwise (a number, an escape) or a repeated key."""
    text = json.dumps({"k": _random_value(rng), "m": _random_value(rng)}, ensure_ascii=False)
    variant = rng.randrange(6)
    if variant == 0:
        text = text[:-1] + ', "n": 1.50}'
    elif variant == 1:
        text = text[:-1] + ', "s": "x\\u001F y"}'
    elif variant == 2:
        text = text[:-1] + ', "k": 3}'
    return text


def test_random_calls_split_and_cut_anywhere_stream_the_whole_calls_arguments():
    """Random grammar-shaped calls (seeded), fed in random pieces: every call opens (CallStart) and its
    pieces join to exactly the arguments the whole-call path gives; cut at a random point, likewise for
    the incomplete call's."""
    import random

    rng = random.Random(269)
    for _ in range(300):
        calls = [_block(rng.choice(["f", "g"]), _random_arguments(rng)) for _ in range(rng.randrange(1, 3))]
        text = rng.choice(["", "Sure. "]) + "\n".join(calls)
        for cut in (False, True):
            if cut:
                text = text[:rng.randrange(len(text) + 1)]
            parts, at = [], 0
            while at < len(text):
                step = rng.randrange(1, 9)
                parts.append(text[at:at + step])
                at += step
            _, whole_calls = split_tool_calls(text, ALLOWED, cut=cut)
            streamed = _pieces_per_call(_run(parts, cut=cut))
            assert [(c.name, c.arguments, c.complete) for _, c in streamed] == [
                (c.name, c.arguments, c.complete) for c in whole_calls], text
            assert [sent for sent, _ in streamed] == [c.arguments for c in whole_calls], text


def feed_allocations(parser: ToolCallStreamParser, text: str) -> tuple[int, list]:
    """`text` fed to `parser` 3 characters at a time: the bytes the feeds allocate beyond what each started
    with (tracemalloc's peak: the copies each made, kept or not), summed; and the events."""
    import tracemalloc

    total, events = 0, []
    tracemalloc.start()
    try:
        for i in range(0, len(text), 3):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            events += parser.feed(text[i:i + 3])
            total += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return total, events


def test_a_call_costs_its_length_in_copies_however_finely_it_is_fed():
    """Each feed copied all of the block's text so far (the pending text grown by +=, the arguments
    sliced out of it and their safe prefix): a 112 KB call fed 3 characters at a time took 0.23 s, the
    square of its length. Counted, not timed: the memory each feed allocates beyond what it started with
    (tracemalloc's peak, the copies it made whether kept or not), summed over the call's feeds, grows with
    the call's length (about 2x at twice the length; it was 3.7x, and 1,700 bytes a character at 10 KB)."""
    def allocated(lines: int, stream_arguments: bool) -> tuple[int, int]:
        text = _block("f", json.dumps({"code": "x = '</tool_call>'  # é\n" * lines, "n": [1, 2.5, "<<"]},
                                      ensure_ascii=False))
        parser = ToolCallStreamParser(ALLOWED, stream_arguments=stream_arguments)
        total, events = feed_allocations(parser, text)
        [call] = [e for e in events + parser.finish() if isinstance(e, ToolCall)]
        assert json.loads(call.arguments)["n"] == [1, 2.5, "<<"]
        return total, len(text)

    for stream_arguments in (False, True):
        (small, small_len), (large, large_len) = allocated(100, stream_arguments), allocated(200, stream_arguments)
        assert large / small < 1.2 * large_len / small_len, (stream_arguments, small, large)
        assert large < 300 * large_len, (stream_arguments, large, large_len)
