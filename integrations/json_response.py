"""JSON response bodies in UTF-8 that every value can take.

A tool call's arguments are JSON the model wrote; one holding an escaped lone surrogate ("\\ud800",
valid JSON text) reads back as a string UTF-8 cannot carry, and Starlette's JSONResponse (and the event
stream's lines) failed to encode it: a 500, or a stream cut, after the request had run. Such a value
is written with every non-ASCII character escaped instead (RFC 8259 section 7: the same string to any
JSON reader); everything else keeps its characters as they are, as before.
"""

from __future__ import annotations

import json
import math
import re
import secrets

from fastapi.responses import JSONResponse


class JSONNumber:
    """A JSON number kept as written: RFC 8259 bounds no number's size, but one past float64's range
    (1e999) reads as Infinity, which no JSON writer takes (a tool call's arguments with one were a 500,
    or the call came back as text, helper-176), and one of more digits than Python's int limit (4,300)
    does not read at all. `utf8_json` writes it as it came. `read_number_float` / `read_number_int`
    make one where json would lose it."""

    __slots__ = ("literal",)

    def __init__(self, literal: str):
        self.literal = literal

    def __eq__(self, other) -> bool:
        return isinstance(other, JSONNumber) and other.literal == self.literal

    def __hash__(self) -> int:
        return hash(self.literal)

    def __repr__(self) -> str:
        return f"JSONNumber({self.literal!r})"


def read_number_float(literal: str):
    """json's parse_float: the float, or a JSONNumber past float64's range."""
    value = float(literal)
    return value if math.isfinite(value) else JSONNumber(literal)


def read_number_int(literal: str):
    """json's parse_int: the int, or a JSONNumber past Python's digit limit for int()."""
    try:
        return int(literal)
    except ValueError:
        return JSONNumber(literal)


_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_MARK = secrets.token_hex(8)  # (per process: a string in a body cannot pose as a number's placeholder)
_PLACED = re.compile(r'"\\u0000' + _MARK + "(" + _NUMBER + r')\\u0000"')  # (json escapes the NULs)


def _placeholder(value):
    if isinstance(value, JSONNumber):
        return "\x00" + _MARK + value.literal + "\x00"
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def utf8_json(value, **options) -> bytes:
    """json.dumps(value, **options) in UTF-8, non-ASCII characters as themselves, or all escaped when
    some string holds a lone surrogate; a JSONNumber as its literal."""
    text = json.dumps(value, ensure_ascii=False, default=_placeholder, **options)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(value, ensure_ascii=True, default=_placeholder, **options).encode("ascii")
    if _MARK.encode() in data:  # (a JSONNumber's placeholder string: written as its literal)
        data = _PLACED.sub(lambda m: m.group(1), data.decode("utf-8")).encode("utf-8")
    return data


class UTF8JSONResponse(JSONResponse):
    """Starlette's JSONResponse (compact, no NaN) rendered by `utf8_json`."""

    def render(self, content) -> bytes:
        return utf8_json(content, allow_nan=False, indent=None, separators=(",", ":"))
