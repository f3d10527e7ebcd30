"""Gaps a mutation audit of ToolCallStreamParser's streamed calls (tool_call_stream.py, stream_arguments)
found: each test fails on a small change to the parser that the split/cut tests in
test_tool_call_arguments.py let through. The streamed path must give the content and calls the whole path
(split_tool_calls) gives, whatever surrounds a call; what it cannot take back (a CallStart already sent)
ends as the module doc says; and text that is not the grammar's costs its length, not its square."""

from __future__ import annotations

import json

import pytest
from test_tool_call_arguments import feed_allocations

from integrations.tool_call_arguments import ArgumentsPiece, ArgumentsStream, CallStart
from integrations.tool_call_stream import ToolCallStreamParser, split_tool_calls
from integrations.tool_calls import ToolCall

ALLOWED = {"f"}
CALL = '<tool_call>{"name": "f", "arguments": {"a": 1, "s": "x y"}}</tool_call>'


def _streamed(text: str, step: int, allowed: set[str] | None = ALLOWED) -> list:
    parser = ToolCallStreamParser(allowed, stream_arguments=True)
    events: list = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    return events + parser.finish()


@pytest.mark.parametrize("text", [
    "Hi\n" + CALL + " more",  # the "\n" before a streamed call is formatting: not sent after it
    CALL + "\n",  # nor whitespace after the last call
    "\n\n" + CALL + "\n" + CALL + "\n\n",
])
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_the_text_around_a_streamed_call_is_the_whole_paths(text, step):
    """The whitespace held before a block was sent after a streamed call (CallStart did not drop it), and
    whitespace after the last streamed call came back as content (the call was not counted): the whole
    path drops both (module doc of ToolCallStreamParser)."""
    events = _streamed(text, step)
    content, calls = split_tool_calls(text, ALLOWED)
    assert "".join(e for e in events if isinstance(e, str)) == (content or "")
    assert [c.arguments for c in events if isinstance(c, ToolCall)] == [c.arguments for c in calls]
    assert sum(isinstance(e, CallStart) for e in events) == len(calls)


@pytest.mark.parametrize("name", ['""', '"a\\qb"'])  # an empty name; a bad escape (not JSON)
@pytest.mark.parametrize("step", [1, 1000])
def test_a_name_that_is_no_name_opens_no_call_with_any_name_allowed(name, step):
    """With no tool names to check against (allowed_names None), an opening whose name is empty or not a
    JSON string is not a call: the block is text, as the whole path reads it, and no CallStart goes out."""
    text = '<tool_call>{"name": %s, "arguments": {"a": 1}}</tool_call>' % name
    assert split_tool_calls(text, None) == (text, [])
    events = _streamed(text, step, allowed=None)
    assert not any(isinstance(e, (CallStart, ToolCall)) for e in events), events
    assert "".join(events) == text


def test_arguments_that_are_not_the_grammars_object_come_in_one_piece_at_the_blocks_end():
    """A block whose opening was a call's (CallStart went out) but whose arguments are not an object gets
    them at its end as the cut-call reading (partial_tool_call) has them, in one piece: the client's
    pieces join to the ToolCall's arguments. Ending it with the pieces sent so far ("") lost them."""
    events = _streamed('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>', 1)
    [start] = [e for e in events if isinstance(e, CallStart)]
    pieces = [e.text for e in events if isinstance(e, ArgumentsPiece)]
    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert (call.id, call.name, call.arguments) == (start.id, "f", "[1, 2]")
    assert pieces == ["[1, 2]"]


def test_whole_arguments_that_do_not_extend_the_sent_pieces_get_no_more_pieces():
    """The outer object's "arguments" written twice (json keeps the last): the pieces sent are the first
    one's and the ToolCall has the second's. No piece is added then (the ToolCall carries the arguments):
    a tail sliced off the second at the first's length made the joined pieces '{"a": 1}}'."""
    events = _streamed('<tool_call>{"name": "f", "arguments": {"a": 1}, "arguments": {"b": 22}}</tool_call>', 1)
    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert json.loads(call.arguments) == {"b": 22}
    assert "".join(e.text for e in events if isinstance(e, ArgumentsPiece)) == '{"a": 1}'


def _allocated(opening: str, lines: int) -> tuple[int, int]:
    """Bytes the feeds allocate beyond what each started with (tracemalloc's peak), summed over a block that
    starts with `opening`, fed 3 characters at a time; and the block's length."""
    text = "<tool_call>" + opening + json.dumps({"code": "x = 1  # é\n" * lines}) + "}</tool_call>"
    total, _ = feed_allocations(ToolCallStreamParser(ALLOWED, stream_arguments=True), text)
    return total, len(text)


@pytest.mark.parametrize("opening", [
    '{"tool": "f", "arguments": ',  # not the grammar's opening: read no further once that is known
    '{"name": "f", "args": ',  # the name's, then not `, "arguments": `
])
def test_a_block_not_in_the_grammars_shape_costs_its_length(opening):
    """Once a block's opening is known not to be the grammar's, the stream stops reading it; had it kept
    the text it read (the opening's or `, "arguments": `'s few characters) growing with +=, each feed
    copied the block so far: the square of its length. Counted, not timed, as
    test_tool_call_arguments' test_a_call_costs_its_length_in_copies_however_finely_it_is_fed."""
    (small, small_len), (large, large_len) = _allocated(opening, 100), _allocated(opening, 200)
    assert large / small < 1.2 * large_len / small_len, (small, large)
    assert large < 300 * large_len, (large, large_len)


@pytest.mark.parametrize("arguments", [
    '{"a": "a", "b": "a"}',  # a value spelled as a key before it, or as another value: not a repeated key
    '{"k": ["k", {"k": "k"}], "v": {"k": 1}}',  # a key once per object, however often the text holds it
])
def test_only_a_key_repeated_in_its_own_object_stops_the_streaming(arguments):
    """A repeated key ends the streaming (tool_call_arguments module doc); a string value is no key, and a
    key of a nested object is that object's. Reading values as keys stopped the streaming at `"a"`: the
    rest then came in the block's last piece, not as the model wrote it."""
    for step in (1, 3, len(arguments)):
        stream = ArgumentsStream()
        assert "".join(stream.feed(arguments[i:i + step]) for i in range(0, len(arguments), step)) == arguments
        assert stream.closed and not stream.diverged
