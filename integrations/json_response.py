"""JSON response bodies in UTF-8 that every value can take.

A tool call's arguments are JSON the model wrote; one holding an escaped lone surrogate ("\\ud800",
valid JSON text) reads back as a string UTF-8 cannot carry, and Starlette's JSONResponse (and the event
stream's lines) failed to encode it: a 500, or a stream cut, after the request had run. Such a value
is written with every non-ASCII character escaped instead (RFC 8259 section 7: the same string to any
JSON reader); everything else keeps its characters as they are, as before.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse


def utf8_json(value, **options) -> bytes:
    """json.dumps(value, **options) in UTF-8, non-ASCII characters as themselves, or all escaped when
    some string holds a lone surrogate."""
    text = json.dumps(value, ensure_ascii=False, **options)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **options).encode("ascii")


class UTF8JSONResponse(JSONResponse):
    """Starlette's JSONResponse (compact, no NaN) rendered by `utf8_json`."""

    def render(self, content) -> bytes:
        return utf8_json(content, allow_nan=False, indent=None, separators=(",", ":"))
