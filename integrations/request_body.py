"""The request body, read before any route runs: its size, its pace, then its JSON.

    BodyLimitMiddleware      ASGI, every HTTP route: a body over max_body_bytes is answered 413 before
                             the route runs (by Content-Length, or counted as it arrives); a body that
                             stops arriving for body_timeout_s is answered 408
    parse_json_object(raw)   the body as a JSON object (a leading UTF-8 byte order mark ignored); UTF-16
                             or UTF-32, not UTF-8, not JSON, NaN/Infinity, nested deeper
                             than MAX_JSON_DEPTH, an array longer than the context, an object of more
                             than MAX_OBJECT_KEYS keys, or a lone UTF-16
                             surrogate in a string (which no tokenizer or JSON encoder accepts) -> InputError
                             naming the field
    read_json_object(req)    both for a Starlette request, with the app's limits (integrations/request_limits.py)
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from integrations.request_limits import (DEFAULT_BODY_TIMEOUT_S, DISCARD_UP_TO_BYTES, MAX_JSON_DEPTH, MAX_OBJECT_KEYS,
                                         TRIM_AFTER_BODY_BYTES, InputError, trim_heap)


def too_large_body(size: int, limit: int) -> dict:
    """The 413 body in OpenAI's error shape."""
    return {"error": {"message": f"request body is {size:,} bytes or more; the limit is {limit:,} bytes "
                                 f"(max_body_bytes): send a shorter prompt",
                      "type": "invalid_request_error", "param": None, "code": "request_too_large"}}


# A whole body may take this many body_timeout_s in all (60 s by default): a client that trickles a
# byte just inside each pause would otherwise hold its call slot for as long as it likes.
BODY_TOTAL_TIMEOUTS = 6


def timed_out_body(timeout_s: float, in_all: bool = False) -> dict:
    """The 408 body in OpenAI's error shape: the body paused for `timeout_s`, or took longer in all."""
    what = (f"took longer than {timeout_s * BODY_TOTAL_TIMEOUTS:g} s in all ({BODY_TOTAL_TIMEOUTS} x body_timeout_s)"
            if in_all else f"stopped arriving: nothing came for {timeout_s:g} s (body_timeout_s)")
    return {"error": {"message": f"the request body {what}; send the whole body at once",
                      "type": "invalid_request_error", "param": None, "code": "request_timeout"}}


class BodyLimitMiddleware:
    """Pure ASGI: reads an HTTP request's body (at most max_body_bytes) before the app runs and hands it
    on in one piece, or answers 413 without running the app. Every route reads its whole body anyway;
    reading it here bounds what any route can be made to hold. WebSockets pass untouched (their frames
    have the editor protocol's own limit). A body that pauses for body_timeout_s is answered 408 (and
    the connection closed) without running the app: a stalled upload holds no call slot for long.

    Most clients send the whole body before reading the answer, and see a reset connection instead of
    a 413 sent early. So the rest of an over-limit body is read and discarded (memory stays flat) up to
    DISCARD_UP_TO_BYTES in all, then the 413 goes out; a body declared larger is answered at once."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self._read_then_run(scope, receive, send)
        except BodyTimeout as timeout:
            await _send_error(send, 408, timed_out_body(self.timeout_s, in_all=timeout.in_all))

    async def _read_then_run(self, scope, receive, send):
        app_receive = receive
        deadline = time.monotonic() + self.timeout_s * BODY_TOTAL_TIMEOUTS

        async def receive():  # the body's messages, each within the pause allowed and the whole deadline
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(app_receive(), min(self.timeout_s, max(left, 0)))
            except asyncio.TimeoutError:
                raise BodyTimeout(in_all=left < self.timeout_s) from None

        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            if declared <= DISCARD_UP_TO_BYTES:
                await _discard(receive, DISCARD_UP_TO_BYTES)
            await _send_413(send, declared, self.limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body: nobody to answer
            size += len(message.get("body", b""))
            if size > self.limit:
                chunks.clear()
                if message.get("more_body", False):
                    size += await _discard(receive, DISCARD_UP_TO_BYTES - size)
                await _send_413(send, size, self.limit)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        held = [b"".join(chunks)]
        chunks.clear()

        async def replay():
            if held:  # the body once, then the connection's own messages (disconnect), untimed
                return {"type": "http.request", "body": held.pop(), "more_body": False}
            return await app_receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if size >= TRIM_AFTER_BODY_BYTES:
                held.clear()
                trim_heap()  # parsing a large body leaves freed heap glibc would otherwise keep


async def _discard(receive, budget: int) -> int:
    """Read and drop body messages until the body ends, the client leaves or `budget` bytes went by;
    returns the bytes read."""
    read = 0
    while read <= budget:
        message = await receive()
        if message["type"] != "http.request":
            break
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return read


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyTimeout(Exception):
    """A request body paused for longer than body_timeout_s, or (in_all) ran past its whole deadline."""

    def __init__(self, in_all: bool = False):
        super().__init__("request body timed out")
        self.in_all = in_all


async def _send_413(send, size: int, limit: int) -> None:
    await _send_error(send, 413, too_large_body(size, limit))


async def _send_error(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def parse_json_object(raw: bytes, max_array_items: int | None = None) -> dict:
    """The body as a JSON object (an empty body is {}, so validation names the missing fields).
    Raises InputError(400) saying what is wrong and, for a bad string, nesting or an array longer than
    max_array_items, where."""
    wide = _wide_encoding(raw)
    if wide is not None:
        raise InputError(400, None, f"request body is {wide}, not UTF-8: send the JSON encoded as UTF-8 "
                                    f"(RFC 8259, 8.1)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(400, None, f"request body is not UTF-8 (bad byte at offset {exc.start}): "
                                    f"send JSON encoded as UTF-8") from None
    text = text.removeprefix(UTF8_BOM)
    if not text.strip():
        return {}
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" at")  # "Invalid control character at": the position follows
        raise InputError(400, None, f"request body is not valid JSON: {what} at line {exc.lineno} "
                                    f"column {exc.colno}") from None
    except RecursionError:
        raise InputError(400, None, f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH} "
                                    f"levels: flatten it") from None
    except ValueError as exc:  # NaN/Infinity, or an integer of more than 4,300 digits
        why = "an integer of more than 4,300 digits" if "digits" in str(exc) else str(exc)
        raise InputError(400, _bad_number_field(text),
                         f"request body has a number JSON cannot carry: {why}") from None
    if not isinstance(data, dict):
        raise InputError(400, None, f"request body must be a JSON object ({{...}}), got {_json_kind(data)}")
    check_json_tree(data, max_array_items)
    return data


# A UTF-8 body may begin with a byte order mark: RFC 8259 (8.1) lets a parser ignore it, Starlette's
# Request.json() (so FastAPI's body models, and vLLM's server) does, and Windows tools write one (PowerShell 5's
# `Out-File -Encoding utf8`, whose file `curl -d @body.json` then sends); Python's json.loads of a str refuses it.
UTF8_BOM = "\ufeff"
# UTF-16/32 by their byte order marks, longest first (UTF-32LE's begins as UTF-16LE's)
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"), (b"\xff\xfe", "UTF-16LE"),
              (b"\xfe\xff", "UTF-16BE"))


def _wide_encoding(raw: bytes) -> str | None:
    """The UTF-16 or UTF-32 encoding `raw` is in, by its byte order mark or, without one, by where the
    zero bytes of its first (ASCII) character fall (RFC 4627, 3); None for anything else. A UTF-8 JSON text
    holds no zero byte (a control character, which JSON escapes), so such a body is no UTF-8 JSON; one
    in UTF-16LE is valid UTF-8, and was refused as JSON "expecting property name" at column 2."""
    for bom, name in _WIDE_BOMS:
        if raw.startswith(bom):
            return f"{name} (by its byte order mark)"
    head = raw[:4]
    if len(head) == 4 and head[:3] == b"\0\0\0":
        return "UTF-32BE"
    if len(head) == 4 and head[1:] == b"\0\0\0":
        return "UTF-32LE"
    if len(head) >= 2 and head[0] == 0:
        return "UTF-16BE"
    if len(head) >= 2 and head[1] == 0:
        return "UTF-16LE"
    return None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float; send a finite number")
    return value


_BAD_NUMBER = object()


def _bad_number_field(text: str) -> str | None:
    """The dotted path of the first number parse_json_object refuses (NaN, Infinity, one past float64's
    range, an integer of more than 4,300 digits), so the 400 names the field; None if none is found.
    Parsed again with such numbers kept as a marker: the error path only."""
    def number(kind):
        def read(token: str):
            try:
                value = kind(token)
            except ValueError:
                return _BAD_NUMBER
            return value if kind is int or math.isfinite(value) else _BAD_NUMBER
        return read

    try:
        data = json.loads(text, parse_constant=lambda _: _BAD_NUMBER, parse_float=number(float),
                          parse_int=number(int))
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if node is _BAD_NUMBER:
            return _dotted(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((value, path + (key,)) for key, value in reversed(list(items)))
    return None


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def check_json_tree(data: dict, max_array_items: int | None = None) -> None:
    """Iteratively (no recursion to exhaust): nesting depth (at most MAX_JSON_DEPTH levels, `data` being
    the first), strings or keys that are not valid Unicode (a lone surrogate), arrays longer than
    max_array_items and objects of more than MAX_OBJECT_KEYS keys. Raises InputError(400) whose field is the dotted path to the fault
    ("messages.0.content")."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            field = _dotted(path[:6]) + (".…" if len(path) > 6 else "")
            raise InputError(400, field, f"nests arrays/objects deeper than {MAX_JSON_DEPTH} levels: flatten it")
        if max_array_items is not None and isinstance(node, list) and len(node) > max_array_items:
            raise InputError(400, _dotted(path), f"holds {len(node):,} items; an array may hold at most "
                                                 f"{max_array_items:,} (the context served, in tokens, or the "
                                                 "engine's max_running + max_queue, whichever is more)")
        if isinstance(node, list):  # (a list of a million ids: one pass in C over the item types)
            kinds = set(map(type, node))
            if str in kinds:
                for i, value in enumerate(node):
                    if type(value) is str and not value.isascii():
                        _check_text(value, path + (i,))
            if dict in kinds or list in kinds:
                stack.extend((value, path + (i,), depth + 1) for i, value in enumerate(node) if type(value) in (dict, list))
            continue
        if len(node) > MAX_OBJECT_KEYS:
            raise InputError(400, _dotted(path), f"holds {len(node):,} keys; an object may hold at most "
                                                 f"{MAX_OBJECT_KEYS:,}: send only the fields the route takes")
        for key, value in node.items():
            if isinstance(key, str):
                _check_text(key, path + (key,))
            if isinstance(value, str):
                _check_text(value, path + (key,))
            elif isinstance(value, (dict, list)):
                stack.append((value, path + (key,), depth + 1))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(400, _dotted(path), f"has a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at "
                                             f"character {exc.start}: send valid Unicode text") from None


def _dotted(path: tuple) -> str:
    """"messages.0.content"; a key that is not valid Unicode itself is shown escaped."""
    text = ".".join(str(p) for p in path) or "body"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_content_encoding(values: list[str]) -> None:
    """Raises InputError(415, "Content-Encoding") unless every coding the request's Content-Encoding
    lines name is identity: this server reads uncompressed bodies (a compressed one would be read as
    UTF-8 text and fail as "not UTF-8"). Each line is a comma-separated list and several lines are one
    list (RFC 9110, 5.3 and 8.4), so "identity" on one line beside "gzip" on another is a gzip body (the
    first line alone let such a body through as plain JSON). 415 is RFC 9110's answer to a content
    coding the server does not take (15.5.16)."""
    codings = [coding.strip().lower() for value in values for coding in value.split(",")]
    refused = [coding for coding in codings if coding not in ("", "identity")]
    if refused:
        named = ", ".join(dict.fromkeys(refused))[:60]
        raise InputError(415, "Content-Encoding", f"names {named!r}; this server reads uncompressed bodies only "
                                                  "(identity): send the JSON as is, without Content-Encoding")


OFF_LOOP_BODY_BYTES = 256 * 1024  # bodies at least this large are parsed in a worker thread


async def read_json_object(request) -> dict:
    """parse_json_object of a Starlette request's body (already bounded by BodyLimitMiddleware), with
    the app's max_array_items (openai_api.APISettings.limits). A large body is parsed in a worker thread:
    checking a tree of millions of items is Python work that would hold the event loop (the thread
    gives it the interpreter between bytecodes)."""
    check_content_encoding(request.headers.getlist("content-encoding"))
    raw = await request.body()
    settings = getattr(request.app.state, "settings", None)
    max_items = settings.limits.max_array_items if settings is not None else None
    if len(raw) >= OFF_LOOP_BODY_BYTES:
        return await asyncio.to_thread(parse_json_object, raw, max_items)
    return parse_json_object(raw, max_items)
