"""Tool calls in model output: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
(the Qwen3 / Hermes convention) become OpenAI `tool_calls`.

A block is a tool call only when its body is a JSON object with a string `name` (one of the request's
tools when the request lists any) and `arguments` that are an object (or a JSON string of one); a
missing `arguments` means `{}`. Anything else (bad JSON, unknown name, an unclosed block) stays in the
message content as the model wrote it: a malformed call is text, never an error.

A block ends at the first `</tool_call>` outside a JSON string, so an argument whose text contains
`</tool_call>` (code, documentation) stays inside its call.

A block the output was cut inside (max_tokens, a deadline, a stop string: `cut_short`) is a call
whose arguments are the text so far, marked incomplete (`ToolCall.complete` False), as OpenAI returns a
call max_tokens cut (its `arguments` "may not be valid JSON") and Anthropic an incomplete tool_use:
once its name is whole and one of the request's tools; before that it is dropped, and so is text cut
while it may still open a call (a held `<`, `<tool_call` prefix). Its markup (the forced call's opening
is the server's, not the model's) never reaches the content.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field

from integrations.json_response import read_number_float, read_number_int, utf8_json
from integrations.tool_call_arguments import ArgumentsPiece, ArgumentsStream, CallStart
from scheduler.detokenizer import held_prefix_len

log = logging.getLogger(__name__)

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialized (OpenAI sends arguments as a string); cut short: the text so far
    id: str = field(default_factory=lambda: new_call_id())
    complete: bool = True  # False: the output was cut inside the call (module doc)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    """A tool call's id, `call_<24 hex>` (OpenAI's form)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def forced_call(forced: str | None, tool_names: list[str]) -> tuple[str, str] | None:
    """The opening of the call a tool_choice forces and an example of its rest, or None when nothing is
    forced (OpenAI: "required" (forced == "") means the model must call one or more tools, a named
    function that it must call that one). required -> (`<tool_call>{"name": "`, `<first tool>", ...`),
    named, or required with a single tool -> (`<tool_call>{"name": "<name>", "arguments": `, `{}}</tool_call>`). The opening is prefilled
    after the prompt (chat.forced_prefix_ids cuts it at a token boundary of the whole call, so the
    model sees the tokens it was trained on) and put back in front of the model's text before parsing:
    a call the model completes comes back as `tool_calls`; one the output is cut inside comes back
    incomplete (module doc). Raises ValueError when the request offers no tools or not the named one."""
    if forced is None:
        return None
    if not tool_names:
        raise ValueError("forcing a tool call needs `tools`: list the functions, or leave tool_choice out")
    if not forced and len(tool_names) == 1:  # "required" with one tool: that tool (the name is not left to chance)
        forced = tool_names[0]
    if not forced:
        name = json.dumps(tool_names[0], ensure_ascii=False)
        return TOOL_OPEN + '{"name": "', name[1:] + ', "arguments": {}}' + TOOL_CLOSE
    if forced not in tool_names:
        raise ValueError(f"names {forced!r}, which is not in `tools` ({', '.join(tool_names)}): name one of them")
    return TOOL_OPEN + '{"name": ' + json.dumps(forced, ensure_ascii=False) + ', "arguments": ', "{}}" + TOOL_CLOSE


def parse_tool_block(body: str, allowed_names: set[str] | None = None) -> ToolCall | None:
    """The ToolCall a block body encodes, or None when the body is not a well-formed call. NaN and
    Infinity are not JSON (Python's json reads them): a call holding one is not well-formed. A number
    past float64's range (1e999) or Python's int digit limit is JSON (RFC 8259 bounds no number, and the
    tool grammar writes any): it is kept as written (json_response.JSONNumber; a forced call holding one
    came back as text, helper-176). The arguments are JSON text (RFC 8259) in UTF-8, a lone surrogate
    escape ("\\ud800", which UTF-8 cannot carry) kept escaped."""
    try:
        obj = read_json(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if allowed_names and obj["name"] not in allowed_names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = read_json(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=obj["name"], arguments=_repeated_key_text(body) or _json_text(arguments))


def _repeated_key_text(body: str) -> str | None:
    """The arguments' text as the model wrote it in `body` (the grammar's shape, `{"name": ...,
    "arguments": {...}}`) when an object in them repeats a key; None otherwise. json keeps a repeated
    key's last value at its first place (`{"a": 1, "a": 2}` -> `{"a": 2}`), so the re-serialized text
    would not start with what a stream already sent of the arguments as written
    (integrations/tool_call_arguments.py); the text as written is JSON all the same (RFC 8259 4: names
    SHOULD be unique, and parsers keep the last), so both paths return it."""
    head = _CALL_HEAD.match(body)
    if head is None or not head.group(0).rstrip().endswith(":"):
        return None
    repeated = []

    def pairs(items: list) -> dict:
        if len({key for key, _ in items}) < len(items):
            repeated.append(True)
        return dict(items)

    decoder = json.JSONDecoder(object_pairs_hook=pairs, parse_float=str, parse_int=str, parse_constant=_not_json)
    try:
        _, end = decoder.raw_decode(body, head.end())
    except ValueError:
        return None
    return body[head.end():end] if repeated else None


def _json_text(arguments: dict) -> str:
    """`arguments` as JSON text in json.dumps's form; a string holding a lone surrogate (read from a
    "\\ud800" escape; UTF-8 cannot carry it, and the response failed to encode) stays escaped."""
    return utf8_json(arguments).decode("utf-8")


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def read_json(text: str):
    """json.loads for JSON the model wrote: NaN and Infinity refused (ValueError), numbers past float64
    or int() kept as written (json_response.JSONNumber)."""
    return json.loads(text, parse_constant=_not_json, parse_float=read_number_float, parse_int=read_number_int)


# The start of a block body up to its arguments: {"name": "<JSON string>", "arguments":
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*(?:,\s*"arguments"\s*:\s*)?')


def partial_tool_call(body: str, allowed_names: set[str] | None = None) -> ToolCall | None:
    """The ToolCall of a block body the output was cut inside (module doc): its name once whole (and
    allowed), its arguments the text after `"arguments":` so far ('' before it), incomplete; complete
    when those arguments are a whole object already (the cut fell in the call's closing text). None
    before the name is whole or for a body that is not a call's start."""
    head = _CALL_HEAD.match(body)
    if head is None:
        return None
    try:
        name = json.loads(head.group(1))
    except ValueError:
        return None
    if not isinstance(name, str) or not name or (allowed_names and name not in allowed_names):
        return None
    arguments = body[head.end():] if head.group(0).rstrip().endswith(":") else ""
    try:  # the arguments may be whole, the cut past them (in the call's closing `}` or `</tool_call>`)
        value, end = json.JSONDecoder(parse_constant=_not_json, parse_float=read_number_float,
                                      parse_int=read_number_int).raw_decode(arguments)
    except ValueError:
        return ToolCall(name, arguments.rstrip(), complete=False)
    if isinstance(value, str):  # a JSON string of an object, as parse_tool_block takes
        try:
            value = read_json(value)
        except ValueError:
            return ToolCall(name, arguments[:end], complete=False)
    if not isinstance(value, dict):
        return ToolCall(name, arguments[:end], complete=False)
    return ToolCall(name, _repeated_key_text(body) or _json_text(value))  # (as parse_tool_block)


def cut_short(finish_reason, stop_word: str | None) -> bool:
    """Whether output that ended so (a scheduler.api.FinishReason and the stop string matched, if any) was
    cut rather than ended by the model: the token cap, a deadline, or a stop string."""
    return getattr(finish_reason, "value", finish_reason) in ("length", "deadline") or stop_word is not None


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
# exactly this text, no free whitespace
_GRAMMAR_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


class ToolCallStreamParser:
    """Incremental parser for streamed text. feed(text) and finish() return events in order: plain
    text (str) to send as content, or a ToolCall once its block has closed.

    stream_arguments (only for output the tools grammar constrains, where every block is a call of an
    offered tool in the grammar's exact shape): a block is a call as soon as its name is known:
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
        self._head = 0  # length of its opening in the block's text
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
        """The CallStart of the open block once its opening is whole, then the new safe piece of its
        arguments (`body`: the block's text so far, without its closing tag)."""
        if self._streamed is None:
            head = _GRAMMAR_HEAD.match(body)
            if head is None:
                return
            try:
                name = json.loads(head.group(1))
            except ValueError:  # (a bad escape: not the grammar's text)
                return
            if not name or (self.allowed_names and name not in self.allowed_names):
                return
            self._streamed, self._head = CallStart(new_call_id(), name), head.end()
            self._arguments, self._sent, self._space = ArgumentsStream(), "", ""
            events.append(self._streamed)
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
