"""The stream side of tool calls (integrations/tool_calls.py has the blocks' format and how a block's
text is read): ToolCallStreamParser splits model output as it arrives into content and tool calls, holding
back text that may open a block and finding a block's end (BlockEndScan) once however the text comes;
split_tool_calls runs it over finished output, so a streamed and a whole answer agree.
"""

from __future__ import annotations

import json
import logging
import re

from integrations.tool_call_arguments import ArgumentsPiece, ArgumentsStream, CallStart
from integrations.tool_calls import (TOOL_CLOSE, TOOL_OPEN, ToolCall, new_call_id, parse_tool_block,
                                     partial_tool_call)
from scheduler.detokenizer import held_prefix_len

log = logging.getLogger(__name__)

def split_tool_calls(text: str, allowed_names: set[str] | None = None,
                     cut: bool = False) -> tuple[str | None, list[ToolCall]]:
    """Split finished output into (content, tool_calls), exactly as ToolCallStreamParser streams it (so a
    streamed and a whole answer agree). Content is None when only calls remain. `cut`: the output was
    cut (`cut_short`; ToolCallStreamParser.finish)."""
    parser = ToolCallStreamParser(allowed_names)
    events = parser.feed(text) + parser.finish(cut)
    calls = [e for e in events if isinstance(e, ToolCall)]
    content = "".join(e for e in events if isinstance(e, str))
    return (content or None) if calls else content, calls


def block_end(body: str) -> int:
    """Index in `body` (the text after `<tool_call>`) of the `</tool_call>` that closes the block: the
    first one outside a JSON string literal (double-quoted, backslash escapes). -1 while none has come."""
    return BlockEndScan().feed(body)


class BlockEndScan:
    """block_end over one block's text as it comes: feed(text) takes the block's next text and returns
    the index, in all of the block's text so far, of its closing `</tool_call>`, -1 while none has come
    (once one has, the scan is done). Each character is scanned once; a `<` the text ends on that may
    start the tag (at most len(TOOL_CLOSE) - 1 characters) is kept and read again with the next text.
    The stream parser scanned the whole block on every feed, quadratic: a 28,000-character call fed 4
    characters at a time held the event loop ~5 s."""

    def __init__(self):
        self._scanned = 0  # length of the block's text before _tail
        self._tail = ""  # text kept to be read again: a closing tag's start, maybe
        self._in_string, self._escaped = False, False

    def feed(self, text: str) -> int:
        body = self._tail + text if self._tail else text
        i, in_string, escaped = 0, self._in_string, self._escaped
        while i < len(body):
            ch = body[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "<":
                if body.startswith(TOOL_CLOSE, i):
                    return self._scanned + i
                if len(body) - i < len(TOOL_CLOSE) and TOOL_CLOSE.startswith(body[i:]):  # its start, maybe
                    break
            i += 1
        self._scanned, self._tail = self._scanned + i, body[i:]
        self._in_string, self._escaped = in_string, escaped
        return -1


# The opening of a block the tools grammar wrote (structured_output._call_rules, its structural tags):
# exactly this text, no free whitespace; the name is known once its string closes (OpenAI and vLLM send a
# call's name before its arguments), the arguments start after _ARGUMENTS_OPEN
_NAME_OPEN = '{"name": '
_GRAMMAR_NAME = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*")')
_NAME_SO_FAR = re.compile(r'\{"name": "(?:[^"\\]|\\.)*\\?\Z')  # an opening whose name string is still open
_ARGUMENTS_OPEN = ', "arguments": '


class ToolCallStreamParser:
    """Incremental parser for streamed text. feed(text) and finish() return events in order: plain
    text (str) to send as content, or a ToolCall once its block has closed. A block's text is kept in
    the pieces it came in and read once (BlockEndScan, tool_call_arguments.ArgumentsStream), so a call
    costs its length however finely it is fed.

    stream_arguments (only for output the tools grammar constrains, where every block is a call of an
    offered tool in the grammar's exact shape): a block is a call as soon as its name's string has
    closed (before `"arguments": `, so a call the output is cut or paused at there has its opening out):
    CallStart then, ArgumentsPiece events as the arguments are written (what is sure to be part of
    the whole call's `arguments`: integrations/tool_call_arguments.py), the rest in one last piece
    when the block ends, then its ToolCall, as the whole-call path builds it (same `arguments`).

    Text that might be the start of `<tool_call>` is held back until it is decided. Trailing whitespace
    is held until more text arrives: dropped when a call comes next, or at the end when tool calls were
    found (the whitespace around tool-call blocks is formatting, not content); sent before the next text
    otherwise.
    """

    def __init__(self, allowed_names: set[str] | None = None, stream_arguments: bool = False):
        self.allowed_names = allowed_names
        self._pending = ""  # text outside a block not yet sent (a `<tool_call>` start, maybe)
        self._inside = False
        self._block: list[str] = []  # the open block's text (after `<tool_call>`), in the pieces it came in
        self._block_len = 0
        self._block_end = BlockEndScan()  # the open block's (a new one per block)
        self._space = ""  # held whitespace-only text
        self.num_calls = 0
        self.stream_arguments = stream_arguments
        # What the open block's stream reads next (stream_arguments): "name" (its opening up to the name's
        # closing quote), "arguments_open" (`, "arguments": `), "arguments", or None (nothing more to send)
        self._reading: str | None = None
        self._held = ""  # text of the opening or of `, "arguments": ` read so far (a few characters)
        self._streamed: CallStart | None = None  # the open block's call, once CallStart went out
        self._arguments: ArgumentsStream | None = None
        self._sent: list[str] = []  # its arguments pieces sent so far

    def feed(self, text: str) -> list:
        events: list = []
        while True:
            if self._inside:
                text = self._feed_block(events, text)
                if text is None:
                    return events
            self._pending += text
            start = self._pending.find(TOOL_OPEN)
            if start >= 0:
                self._text(events, self._pending[:start])
                text, self._pending = self._pending[start + len(TOOL_OPEN):], ""
                self._inside, self._block, self._block_len, self._block_end = True, [], 0, BlockEndScan()
                self._reading, self._held = ("name" if self.stream_arguments else None), ""
                continue
            keep = held_prefix_len(self._pending, [TOOL_OPEN])
            cut = len(self._pending) - keep
            self._text(events, self._pending[:cut])
            self._pending = self._pending[cut:]
            return events

    def _feed_block(self, events: list, text: str) -> str | None:
        """Take the open block's next text; once its closing tag has come, its call or text (and its
        last piece, streamed), and return the text after the tag. None while the block is open."""
        end = self._block_end.feed(text)
        if self._reading is not None:
            self._stream(events, text if end < 0 else text[:max(end - self._block_len, 0)])
        self._block.append(text)
        self._block_len += len(text)
        if end < 0:
            return None
        block = "".join(self._block)
        body, rest = block[:end], block[end + len(TOOL_CLOSE):]
        self._inside, self._block, self._block_len = False, [], 0
        call = parse_tool_block(body.strip(), self.allowed_names)
        if self._streamed is not None:
            self._end_streamed(events, call or partial_tool_call(body, self.allowed_names))
        elif call is None:
            self._text(events, TOOL_OPEN + body + TOOL_CLOSE)
        else:
            self._space = ""
            self.num_calls += 1
            events.append(call)
        return rest

    def finish(self, cut: bool = False) -> list:
        """Flush at the end of output: a held partial marker is plain text; so is an unclosed block, unless
        the output was `cut` inside it (`cut_short`): then it is an incomplete call, or nothing before its
        name is whole (module doc). A partial marker the output was `cut` inside (`<tool` at max_tokens) is
        the opening of a call cut before its name: dropped as such a call is (a forced turn cut between
        two calls came back with `\n<tool` as content); the whitespace before it is kept as there."""
        events: list = []
        if cut and not self._inside and self._pending:
            self._pending = ""
        body = "".join(self._block) if self._inside else ""
        if self._streamed is not None:  # its opening went out: it ends as a call cut short
            self._end_streamed(events, partial_tool_call(body, self.allowed_names))
            self._inside = False
        if self._inside and cut:
            call = partial_tool_call(body, self.allowed_names)
            self._inside = False
            if call is not None:
                self._space = ""
                self.num_calls += 1
                events.append(call)
        rest = (TOOL_OPEN + body if self._inside else "") + self._pending
        self._pending, self._inside, self._block, self._block_len = "", False, [], 0
        self._text(events, rest)
        if self._space and not self.num_calls:
            events.append(self._space)
        self._space = ""
        return events

    def _stream(self, events: list, text: str) -> None:
        """Read the open block's next `text` (without its closing tag): its CallStart once its name is
        whole, then the new safe piece of its arguments once `"arguments": ` has come (self._reading)."""
        if self._reading == "name":
            self._held += text
            head = _GRAMMAR_NAME.match(self._held)
            if head is None:
                if not (_NAME_OPEN + '"').startswith(self._held) and not _NAME_SO_FAR.match(self._held):
                    self._reading = None  # not the grammar's opening: the call comes whole
                return
            try:
                name = json.loads(head.group(1))
            except ValueError:  # (a bad escape: not the grammar's text)
                name = None
            if not name or (self.allowed_names and name not in self.allowed_names):
                self._reading = None
                return
            self._streamed = CallStart(new_call_id(), name)
            self._arguments, self._sent, self._space = ArgumentsStream(), [], ""
            events.append(self._streamed)
            self._reading, self._held, text = "arguments_open", "", self._held[head.end():]
        if self._reading == "arguments_open":
            self._held += text
            if not self._held.startswith(_ARGUMENTS_OPEN):
                if not _ARGUMENTS_OPEN.startswith(self._held):
                    self._reading = None  # not the grammar's text: the arguments come at the block's end
                return
            self._reading, self._held, text = "arguments", "", self._held[len(_ARGUMENTS_OPEN):]
        piece = self._arguments.feed(text)
        if piece:
            events.append(ArgumentsPiece(self._streamed.id, piece))
            self._sent.append(piece)

    def _end_streamed(self, events: list, call: ToolCall | None) -> None:
        """The last piece and the ToolCall of the streamed block (`call`: as the whole-call path reads it)."""
        opened, self._streamed, self._arguments, self._reading = self._streamed, None, None, None
        sent, self._sent = "".join(self._sent), []
        if call is None:  # (not under the grammar: its opening was a call's, the rest is not)
            call = ToolCall(opened.name, sent, complete=False)
        call.id = opened.id
        if call.arguments.startswith(sent):
            rest = call.arguments[len(sent):]
            if rest:
                events.append(ArgumentsPiece(opened.id, rest))
        else:  # (never for the grammar's calls, a repeated key's included: _repeated_key_text) nothing more is sent
            log.warning("tool call %s: the streamed arguments %r... are not the start of the whole call's",
                        opened.id, sent[:80])
        self.num_calls += 1
        events.append(call)

    def _text(self, events: list, text: str) -> None:
        if not text:
            return
        body = text.rstrip()
        if not body:
            self._space += text
            return
        events.append(self._space + body)
        self._space = text[len(body):]
