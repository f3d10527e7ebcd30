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
import re
import uuid
from dataclasses import dataclass, field

from integrations.json_response import read_number_float, read_number_int, utf8_json

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
