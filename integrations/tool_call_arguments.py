"""A tool call's arguments streamed as the model writes them (OpenAI's and vLLM's stream shape: the
call's id and name first, then pieces of `function.arguments` whose concatenation is the whole).

Only for calls the tools grammar constrains (integrations/structured_output.py: `_call_rules` and the
structural tags): the block is `{"name": "<name>", "arguments": <JSON>}</tool_call>`, the arguments
compact JSON in json.dumps's form (", " and ": ", no other whitespace) that the grammar lets through
only with simple escapes, `\\u00XX` for control characters and no lone surrogates. The whole-call
path (tool_calls.parse_tool_block) re-serializes the parsed arguments (tool_calls._json_text), so a
piece is sent only where that text is bound to agree with what the model wrote:

  - a number is held until it ends, and `1.50` (written `1.5`), `1E5`, `-0` and the like end
    the streaming of that call;
  - an escape is held until it ends; one json.dumps writes otherwise (`\\u001F`, `\\u0008`, `\\u007f`) ends it;
  - whitespace at the end is held (a call the output is cut inside keeps its text right-stripped:
    tool_calls.partial_tool_call).

A call whose streaming ended gets the rest of its arguments at its end (ToolCallStreamParser): the sent
text is then a prefix of them. A key repeated within an object (only an object the schema leaves open
can hold one, `{"a": 1, "a": 2}`) ends the streaming too, and the whole-call path then returns the
arguments as the model wrote them (tool_calls._repeated_key_text; re-serialized, json would keep the last
value at the first key's place, `{"a": 2}`), so the pieces still join to the call's arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from integrations.json_response import read_number_float, read_number_int, utf8_json

@dataclass
class CallStart:
    """A streamed call's opening (tool_call_stream.ToolCallStreamParser with stream_arguments): its id and
    name, sent as soon as they are known; ArgumentsPiece events follow, then the ToolCall (same id)
    once its block has ended."""

    id: str
    name: str


@dataclass
class ArgumentsPiece:
    """The next piece of a streamed call's arguments (never empty); the pieces of a call, in order,
    concatenate to its ToolCall's `arguments`."""

    id: str
    text: str


_NUMBER_CHARS = frozenset("0123456789+-.eE")
_SIMPLE_ESCAPES = frozenset('"\\/bfnrt')


class ArgumentsStream:
    """Scans the arguments text of one grammar-constrained call as it grows. feed(text) takes the text
    after `"arguments": ` so far (the whole of it each time: it only ever grows) and returns its longest
    prefix that is safe to send (module doc); `closed` turns True once the arguments' outer object has
    ended (what follows is the call's own `}` and `</tool_call>`), `diverged` once a piece was found
    that the whole-call path writes otherwise (nothing more is safe)."""

    def __init__(self):
        self.closed = False
        self.diverged = False
        self._pos = 0  # characters scanned
        self._safe = 0  # end of the safe prefix (before trailing whitespace is held back)
        self._depth = 0
        self._in_string = False
        self._escape_at = -1  # start of an escape not yet whole
        self._number_at = -1  # start of a number not yet ended
        # per open container: (is_object, keys seen (objects), expecting a key (objects))
        self._containers: list[list] = []
        self._string_at = -1
        self._key_string = False

    def feed(self, text: str) -> str:
        while self._pos < len(text) and not self.closed and not self.diverged:
            self._scan(text, self._pos)
        if not self.diverged and self._number_at < 0 and self._escape_at < 0:
            self._safe = self._pos
        return text[:self._safe].rstrip() if not self.closed else text[:self._safe]

    def _scan(self, text: str, i: int) -> None:
        ch = text[i]
        if self._in_string:
            self._scan_string(text, i)
            return
        if not self._containers and ch != "{":  # not an object's text: not the grammar's call
            self.diverged = True
            return
        if self._number_at >= 0:
            if ch in _NUMBER_CHARS:
                self._pos = i + 1
                return
            self._end_number(text[self._number_at:i])
            if self.diverged:
                return
        if ch == '"':
            self._in_string, self._string_at = True, i
            top = self._containers[-1] if self._containers else None
            self._key_string = top is not None and top[0] and top[2]
        elif ch in "-0123456789":
            self._number_at = i
        elif ch in "{[":
            self._containers.append([ch == "{", set(), ch == "{"])
        elif ch in "}]":
            self._containers.pop()
            if not self._containers:
                self.closed = True
        elif ch == "," and self._containers[-1][0]:
            self._containers[-1][2] = True
        self._pos = i + 1
        if not self._in_string and self._number_at < 0:
            self._safe = self._pos

    def _scan_string(self, text: str, i: int) -> None:
        ch = text[i]
        if self._escape_at >= 0:
            escape = text[self._escape_at:i + 1]
            if escape[1] == "u" and len(escape) < 6:
                self._pos = i + 1
                return
            self._escape_at = -1
            if escape[1] not in _SIMPLE_ESCAPES and escape[1] != "u" or _rewritten(escape) != escape:
                self.diverged = True
                return
        elif ch == "\\":
            self._escape_at = i
        elif ch == '"':
            self._in_string = False
            if self._key_string:
                self._key_string = False
                top = self._containers[-1]
                key = json.loads(text[self._string_at:i + 1])
                if key in top[1]:
                    self.diverged = True  # a repeated key (module doc)
                    return
                top[1].add(key)
                top[2] = False
        self._pos = i + 1
        if self._escape_at < 0:
            self._safe = self._pos

    def _end_number(self, literal: str) -> None:
        self._number_at = -1
        try:
            written = utf8_json(json.loads(literal, parse_float=read_number_float,
                                           parse_int=read_number_int)).decode("utf-8")
        except ValueError:
            written = None
        if written != literal:
            self.diverged = True


def _rewritten(escape: str) -> str:
    """How json.dumps (non-ASCII as itself) writes the character a string escape stands for."""
    return json.dumps(json.loads(f'"{escape}"'), ensure_ascii=False)[1:-1]
