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
    return BlockEndScan().find(body)


class BlockEndScan:
    """block_end over one block's text as it grows (each `find` is given the text so far, which only
    ever grows): a scan resumes where the last one stopped, so a block costs its length once. The
    stream parser scanned the whole block on every feed, quadratic: a 28,000-character call fed 4
    characters at a time held the event loop ~5 s."""

    def __init__(self):
        self._pos, self._in_string, self._escaped = 0, False, False

    def find(self, body: str) -> int:
        i, in_string, escaped = self._pos, self._in_string, self._escaped
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
                    return i
                if len(body) - i < len(TOOL_CLOSE) and TOOL_CLOSE.startswith(body[i:]):  # its start, maybe: read again with more
                    break
            i += 1
        self._pos, self._in_string, self._escaped = i, in_string, escaped
        return -1


# The opening of a block the tools grammar wrote (structured_output._call_rules, its structural tags):
# exactly this text, no free whitespace; the name is known once its string closes (OpenAI and vLLM send a
# call's name before its arguments), the arguments start after _ARGUMENTS_OPEN
_GRAMMAR_NAME = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*")')
_ARGUMENTS_OPEN = ', "arguments": '


class ToolCallStreamParser:
    """Incremental parser for streamed text. feed(text) and finish() return events in order: plain
    text (str) to send as content, or a ToolCall once its block has closed.

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
        self._pending = ""
        self._inside = False
        self._block_end = BlockEndScan()  # the open block's (a new one per block)
        self._space = ""  # held whitespace-only text
        self.num_calls = 0
        self.stream_arguments = stream_arguments
        self._streamed: CallStart | None = None  # the open block's call, once CallStart went out
        self._name_end = 0  # end of its name's string in the block's text
        self._head = None  # length of its opening in the block's text, once known; -1: not the grammar's
        self._arguments: ArgumentsStream | None = None
        self._sent = ""  # its arguments sent so far

    def feed(self, text: str) -> list:
        self._pending += text
        events: list = []
        while True:
            if self._inside:
                end = self._block_end.find(self._pending)
                if self.stream_arguments:
                    self._stream(events, self._pending if end < 0 else self._pending[:end])
                if end < 0:
                    return events
                body, self._pending = self._pending[:end], self._pending[end + len(TOOL_CLOSE):]
                self._inside = False
                call = parse_tool_block(body.strip(), self.allowed_names)
                if self._streamed is not None:
                    self._end_streamed(events, call or partial_tool_call(body, self.allowed_names))
                elif call is None:
                    self._text(events, TOOL_OPEN + body + TOOL_CLOSE)
                else:
                    self._space = ""
                    self.num_calls += 1
                    events.append(call)
                continue
            start = self._pending.find(TOOL_OPEN)
            if start >= 0:
                self._text(events, self._pending[:start])
                self._pending = self._pending[start + len(TOOL_OPEN):]
                self._inside, self._block_end = True, BlockEndScan()
                continue
            keep = held_prefix_len(self._pending, [TOOL_OPEN])
            cut = len(self._pending) - keep
            self._text(events, self._pending[:cut])
            self._pending = self._pending[cut:]
            return events

    def finish(self, cut: bool = False) -> list:
        """Flush at the end of output: a held partial marker is plain text; so is an unclosed block, unless
        the output was `cut` inside it (`cut_short`): then it is an incomplete call, or nothing before its
        name is whole (module doc). A partial marker the output was `cut` inside (`<tool` at max_tokens) is
        the opening of a call cut before its name: dropped as such a call is (a forced turn cut between
        two calls came back with `\n<tool` as content); the whitespace before it is kept as there."""
        events: list = []
        if cut and not self._inside and self._pending:
            self._pending = ""
        if self._streamed is not None:  # its opening went out: it ends as a call cut short
            self._end_streamed(events, partial_tool_call(self._pending, self.allowed_names))
            self._pending, self._inside = "", False
        if self._inside and cut:
            call = partial_tool_call(self._pending, self.allowed_names)
            self._pending, self._inside = "", False
            if call is not None:
                self._space = ""
                self.num_calls += 1
                events.append(call)
        rest = (TOOL_OPEN if self._inside else "") + self._pending
        self._pending, self._inside = "", False
        self._text(events, rest)
        if self._space and not self.num_calls:
            events.append(self._space)
        self._space = ""
        return events

    def _stream(self, events: list, body: str) -> None:
        """The CallStart of the open block once its name is whole, then the new safe piece of its
        arguments once `"arguments": ` has come (`body`: the block's text so far, without its closing tag)."""
        if self._streamed is None:
            head = _GRAMMAR_NAME.match(body)
            if head is None:
                return
            try:
                name = json.loads(head.group(1))
            except ValueError:  # (a bad escape: not the grammar's text)
                return
            if not name or (self.allowed_names and name not in self.allowed_names):
                return
            self._streamed, self._name_end, self._head = CallStart(new_call_id(), name), head.end(), None
            self._arguments, self._sent, self._space = ArgumentsStream(), "", ""
            events.append(self._streamed)
        if self._head is None:
            after = body[self._name_end:self._name_end + len(_ARGUMENTS_OPEN)]
            if after == _ARGUMENTS_OPEN:
                self._head = self._name_end + len(_ARGUMENTS_OPEN)
            elif _ARGUMENTS_OPEN.startswith(after):
                return  # (not yet written)
            else:  # not the grammar's text: the arguments come whole at the block's end
                self._head = -1
        if self._head < 0:
            return
        safe = self._arguments.feed(body[self._head:])
        if len(safe) > len(self._sent):
            events.append(ArgumentsPiece(self._streamed.id, safe[len(self._sent):]))
            self._sent = safe

    def _end_streamed(self, events: list, call: ToolCall | None) -> None:
        """The last piece and the ToolCall of the streamed block (`call`: as the whole-call path reads it)."""
        opened, self._streamed, self._arguments = self._streamed, None, None
        if call is None:  # (not under the grammar: its opening was a call's, the rest is not)
            call = ToolCall(opened.name, self._sent, complete=False)
        call.id = opened.id
        if call.arguments.startswith(self._sent):
            rest = call.arguments[len(self._sent):]
            if rest:
                events.append(ArgumentsPiece(opened.id, rest))
        else:  # (never for the grammar's calls, a repeated key's included: _repeated_key_text) nothing more is sent
            log.warning("tool call %s: the streamed arguments %r... are not the start of the whole call's",
                        opened.id, self._sent[:80])
        self._sent = ""
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
