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
    """Scans the arguments text of one grammar-constrained call as it comes. feed(text) takes the next
    text after `"arguments": ` and returns the next piece of its longest prefix that is safe to send
    (module doc), '' when no more of it is yet; the pieces concatenate to that prefix. `closed` turns True
    once the arguments' outer object has ended (what follows is the call's own `}` and `</tool_call>`),
    `diverged` once a piece was found that the whole-call path writes otherwise (nothing more is safe).

    Each character is scanned once and copied into a piece once: only what is not yet sent is kept (held
    whitespace, a number or escape not yet ended, an object key being read), so a call costs its length
    however finely it is fed (feeding it the whole text so far each time copied it on every feed)."""

    def __init__(self):
        self.closed = False
        self.diverged = False
        # per open container: [is_object, keys seen (objects), expecting a key (objects)]
        self._containers: list[list] = []
        self._in_string = False
        self._number: list[str] | None = None  # a number not yet ended: its text from earlier feeds
        self._escape: str | None = None  # an escape not yet whole, so far
        self._key: list[str] | None = None  # an object key being read: its text from earlier feeds
        self._number_from = self._key_from = 0  # where the number or key starts in the text being fed
        self._space: list[str] = []  # safe whitespace held back (the end of the safe prefix so far)
        self._unsafe: list[str] = []  # text after the safe prefix (a number or escape not yet ended)

    def feed(self, text: str) -> str:
        if self.closed or self.diverged:
            return ""
        safe, self._number_from, self._key_from = -1, 0, 0  # safe: end in `text` of the safe prefix
        for i, ch in enumerate(text):
            if self._in_string:
                self._scan_string(text, i, ch)
            else:
                self._scan(text, i, ch)
            if self.diverged:
                break
            if self._number is None and self._escape is None:
                safe = i + 1
            if self.closed:
                break
        if not self.diverged:  # what is still open goes on in the next text
            if self._number is not None:
                self._number.append(text[self._number_from:])
            if self._key is not None:
                self._key.append(text[self._key_from:])
        return self._release(text, safe)

    def _release(self, text: str, safe: int) -> str:
        """The next piece: the text that became safe, trailing whitespace held back until more follows
        (tool_calls.partial_tool_call right-strips a cut call's arguments) unless the arguments closed."""
        if safe < 0:
            if not self.diverged:
                self._unsafe.append(text)
            return ""
        ready = "".join(self._unsafe) + text[:safe] if self._unsafe else text[:safe]
        self._unsafe = [text[safe:]] if safe < len(text) and not self.diverged and not self.closed else []
        if not self.closed and ready.isspace():
            self._space.append(ready)
            return ""
        body = ready if self.closed else ready.rstrip()
        piece = "".join(self._space) + body if self._space else body
        self._space = [ready[len(body):]] if len(body) < len(ready) else []
        return piece

    def _scan(self, text: str, i: int, ch: str) -> None:
        if not self._containers and ch != "{":  # not an object's text: not the grammar's call
            self.diverged = True
            return
        if self._number is not None:
            if ch in _NUMBER_CHARS:
                return
            literal = "".join(self._number) + text[self._number_from:i]
            self._number = None
            if not _written_alike(literal):
                self.diverged = True
                return
        top = self._containers[-1] if self._containers else None
        if ch == '"':
            self._in_string = True
            if top[0] and top[2]:
                self._key, self._key_from = [], i
        elif ch in "-0123456789":
            self._number, self._number_from = [], i
        elif ch in "{[":
            self._containers.append([ch == "{", set(), ch == "{"])
        elif ch in "}]":
            self._containers.pop()
            if not self._containers:
                self.closed = True
        elif ch == "," and top[0]:
            top[2] = True

    def _scan_string(self, text: str, i: int, ch: str) -> None:
        if self._escape is not None:
            self._escape += ch
            if self._escape[1] == "u" and len(self._escape) < 6:
                return
            escape, self._escape = self._escape, None
            if escape[1] not in _SIMPLE_ESCAPES and escape[1] != "u" or _rewritten(escape) != escape:
                self.diverged = True
        elif ch == "\\":
            self._escape = ch
        elif ch == '"':
            self._in_string = False
            if self._key is not None:
                key = json.loads("".join(self._key) + text[self._key_from:i + 1])
                self._key = None
                top = self._containers[-1]
                if key in top[1]:
                    self.diverged = True  # a repeated key (module doc)
                    return
                top[1].add(key)
                top[2] = False


def _written_alike(literal: str) -> bool:
    """Whether the whole-call path writes the number `literal` (as the model wrote it) the same way."""
    try:
        written = utf8_json(json.loads(literal, parse_float=read_number_float,
                                       parse_int=read_number_int)).decode("utf-8")
    except ValueError:
        return False
    return written == literal


def _rewritten(escape: str) -> str:
    """How json.dumps (non-ASCII as itself) writes the character a string escape stands for."""
    return json.dumps(json.loads(f'"{escape}"'), ensure_ascii=False)[1:-1]
