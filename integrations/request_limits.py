"""What a request may carry, checked before any costly work, and tokenizing off the event loop.

Every HTTP route reads its body through this module, so one kind of fault has one fix:

    BodyLimitMiddleware      ASGI, every HTTP route: a body over max_body_bytes is answered 413 before
                             the route runs (by Content-Length, or counted as it arrives); a body that
                             stops arriving for body_timeout_s is answered 408
    parse_json_object(raw)   the body as a JSON object; not UTF-8, not JSON, NaN/Infinity, nested deeper
                             than MAX_JSON_DEPTH, or a lone UTF-16 surrogate in a string (which no
                             tokenizer or JSON encoder accepts) -> InputError naming the field
    RequestLimits            prompt characters (checked before tokenizing) and the model context (tokens,
                             checked against the generation by integrations/context_fit.py)
    off_loop(fn, ...)        tokenizer work (encode, chat template, infill prompt) in a small thread
                             pool, so a long prompt never stalls other requests; memory freed after

Fronts map `InputError` to their error shape (OpenAI's in http_errors, llama.cpp's in editor/route_errors.py).
Sampling bounds that keep hostile values out of the forward (where one failing request would end
every request of that batch) are here too: MAX_SEED, MIN_TOP_P, GREEDY_BELOW_TEMPERATURE.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from decoding import params
from workers.batch import SEED_MAX

MiB = 1 << 20
DEFAULT_MAX_BODY_BYTES = 8 * MiB  # a 128K-token prompt is ~0.5 MB of text or ~0.9 MB of token ids
PROMPT_CHARS_PER_CONTEXT_TOKEN = 8  # default max_prompt_chars = 8 x context; BPE averages 3-4 chars/token
MAX_JSON_DEPTH = 64  # nested arrays/objects; tool schemas need ~20
# Sampling bounds are the engine's own (decoding.params, workers.batch), checked here too so the HTTP
# layer answers 400 naming the field before a request reaches the engine.
MAX_SEED = SEED_MAX  # signed 64-bit: the device hashes (seed, step, position) in int64
MIN_TOP_P = params.MIN_TOP_P
GREEDY_BELOW_TEMPERATURE = params.GREEDY_BELOW_TEMPERATURE
TOKENIZER_THREADS = 2  # concurrent tokenizations; bounds their memory (one 2M-char encode holds ~0.5 GB)
TRIM_AFTER_CHARS = 1 << 16  # after tokenizing this much text, give freed memory back to the OS
TRIM_AFTER_BODY_BYTES = 1 * MiB  # likewise after a request with a body this large
DISCARD_UP_TO_BYTES = 64 * MiB  # an over-limit body up to this size is read (and dropped) before the 413
# Seconds a request body may pause (no data) before a 408: a stalled upload would otherwise hold one of
# the ingress replica's max_ongoing_requests call slots for good, and enough of them starve everyone
# (nginx's client_body_timeout is the same rule, 60 s; clients send a JSON body at once).
DEFAULT_BODY_TIMEOUT_S = 10.0


MAX_ERROR_MESSAGE_CHARS = 2000  # an error message quoting a client's value is cut here (a 1 MB `model` came back whole)


def clipped(text: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """`text`, or its first `limit` characters and how many more were left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


class InputError(Exception):
    """Bad or oversized input. `status`: 400 (malformed), 413 (too large), 415 (a compressed body); `field`: the JSON path
    ("messages.0.content") or None for the body as a whole; the message says what to change (clipped to
    MAX_ERROR_MESSAGE_CHARS, as the field)."""

    def __init__(self, status: int, field: str | None, message: str):
        field = clipped(field, 200) if field else field
        message = clipped(message)
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.field, self.message = status, field, message


class PromptCharsError(InputError):
    """A prompt over max_prompt_chars (400), with the numbers, for routes that word it their own way."""

    def __init__(self, field: str, chars: int, limit: int, what: str = "is"):
        super().__init__(400, field, f"{what} {chars:,} characters; the limit is {limit:,} (max_prompt_chars): "
                         "send less text")
        self.chars, self.limit = chars, limit


@dataclass(frozen=True)
class RequestLimits:
    """The HTTP front's input limits.

    max_body_bytes: request body size in bytes (413 above it).
    body_timeout_s: seconds a request body may stop arriving before it is answered 408.
    max_prompt_chars: characters of a prompt (or chat messages, suffix, /tokenize content), refused
        before tokenizing; None = PROMPT_CHARS_PER_CONTEXT_TOKEN x context_length (1,000,000 when the
        context is unknown).
    context_length: the model's context in tokens (config.json max_position_embeddings); prompt +
        max_tokens must fit. 0 = unknown, not checked.
    max_sequences: engine requests one HTTP request may start (prompts x n): more than the engine's
        max_running + max_queue can never be admitted, so that is a 400, not a retryable 503.
        0 = unknown, not checked.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_prompt_chars: int | None = None
    context_length: int = 0
    max_sequences: int = 0

    @property
    def max_array_items(self) -> int | None:
        """The most items a JSON array in a request may hold: the model's context in tokens (a prompt of
        ids, messages, stop strings, a batch of prompts: no request needs more), at least max_sequences.
        None when the context is unknown. Checked while parsing, before validation: validating a list
        of millions of ids blocked the event loop for seconds."""
        return max(self.context_length, self.max_sequences) if self.context_length else None

    @property
    def prompt_chars(self) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return PROMPT_CHARS_PER_CONTEXT_TOKEN * self.context_length if self.context_length else 1_000_000

    def as_dict(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "body_timeout_s": self.body_timeout_s,
                "max_prompt_chars": self.prompt_chars, "context_length": self.context_length, "max_json_depth": MAX_JSON_DEPTH,
                **({"max_sequences": self.max_sequences} if self.max_sequences else {})}

    def check_chars(self, field: str, text: str) -> None:
        """Raise PromptCharsError (an InputError, 400 naming `field`) when `text` is over the prompt
        character limit."""
        if len(text) > self.prompt_chars:
            raise PromptCharsError(field, len(text), self.prompt_chars)

    def check_sequences(self, prompts: int, n: int) -> None:
        """Raise InputError (400 naming `n`, or `prompt` for a batch of one choice each) when prompts x n
        engine requests exceed max_sequences: the engine could never hold them all at once."""
        count = prompts * n
        if self.max_sequences and count > self.max_sequences:
            what = f"{prompts} prompts x n {n}" if prompts > 1 else f"{n} choices"  # the field, n, leads the message
            raise InputError(400, "n" if n > 1 else "prompt",
                             f"{what} = {count} sequences, but this server admits at most {self.max_sequences} "
                             "at once (the engine's max_running + max_queue): lower n or send fewer prompts per request")


def sampling_temperature(value: float | None) -> float | None:
    """The temperature the decoder gets: below GREEDY_BELOW_TEMPERATURE means greedy (0)."""
    return 0.0 if value is not None and value < GREEDY_BELOW_TEMPERATURE else value


# --------------------------------------------------------------------------------------------------
# The body: size, then JSON


def too_large_body(size: int, limit: int) -> dict:
    """The 413 body in OpenAI's error shape."""
    return {"error": {"message": f"request body is {size:,} bytes or more; the limit is {limit:,} bytes "
                                 f"(max_body_bytes): send a shorter prompt",
                      "type": "invalid_request_error", "param": None, "code": "request_too_large"}}


def timed_out_body(timeout_s: float) -> dict:
    """The 408 body in OpenAI's error shape."""
    return {"error": {"message": f"the request body stopped arriving: nothing came for {timeout_s:g} s "
                                 f"(body_timeout_s); send the whole body at once",
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
        except BodyTimeout:
            await _send_error(send, 408, timed_out_body(self.timeout_s))

    async def _read_then_run(self, scope, receive, send):
        app_receive = receive

        async def receive():  # the body's messages, each within the timeout
            try:
                return await asyncio.wait_for(app_receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout from None

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
                _trim_heap()  # parsing a large body leaves freed heap glibc would otherwise keep


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
    """A request body paused for longer than body_timeout_s."""


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
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(400, None, f"request body is not UTF-8 (bad byte at offset {exc.start}): "
                                    f"send JSON encoded as UTF-8") from None
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
        raise InputError(400, None, f"request body has a number JSON cannot carry: {why}") from None
    if not isinstance(data, dict):
        raise InputError(400, None, f"request body must be a JSON object ({{...}}), got {_json_kind(data)}")
    check_json_tree(data, max_array_items)
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float; send a finite number")
    return value


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def check_json_tree(data: dict, max_array_items: int | None = None) -> None:
    """Iteratively (no recursion to exhaust): nesting depth (at most MAX_JSON_DEPTH levels, `data` being
    the first), strings or keys that are not valid Unicode (a lone surrogate) and arrays longer than
    max_array_items. Raises InputError(400) whose field is the dotted path to the fault
    ("messages.0.content")."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            field = _dotted(path[:6]) + (".…" if len(path) > 6 else "")
            raise InputError(400, field, f"nests arrays/objects deeper than {MAX_JSON_DEPTH} levels: flatten it")
        if max_array_items is not None and isinstance(node, list) and len(node) > max_array_items:
            raise InputError(400, _dotted(path), f"holds {len(node):,} items; an array may hold at most "
                                                 f"{max_array_items:,}, the model's context length in tokens")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
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


OFF_LOOP_BODY_BYTES = 256 * 1024  # bodies at least this large are parsed in a worker thread


async def read_json_object(request) -> dict:
    """parse_json_object of a Starlette request's body (already bounded by BodyLimitMiddleware), with
    the app's max_array_items (openai_api.APISettings.limits). A large body is parsed in a worker thread:
    checking a tree of millions of items is Python work that would hold the event loop (the thread
    gives it the interpreter between bytecodes)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # (the body would be read as UTF-8 text and fail as "not UTF-8")
        raise InputError(415, "Content-Encoding", f"is {encoding[:40]!r}; this server reads uncompressed "
                                                  "bodies: send the JSON as is, without Content-Encoding")
    raw = await request.body()
    settings = getattr(request.app.state, "settings", None)
    max_items = settings.limits.max_array_items if settings is not None else None
    if len(raw) >= OFF_LOOP_BODY_BYTES:
        return await asyncio.to_thread(parse_json_object, raw, max_items)
    return parse_json_object(raw, max_items)


# --------------------------------------------------------------------------------------------------
# Tokenizing off the event loop

_TOKENIZER_POOL = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="tokenize")


async def off_loop(fn: Callable, *args, chars: int = 0):
    """Run `fn(*args)` (tokenizer-bound work) in the tokenizer pool and return its result; exceptions
    propagate. The event loop stays free meanwhile (HF tokenizers release the GIL while encoding).
    `chars`: the text size involved; at TRIM_AFTER_CHARS or more, freed heap is returned to the OS
    afterwards (glibc keeps it otherwise: a 2M-char encode leaves ~0.5 GB behind)."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_POOL, _run_and_trim, fn, args, chars)


def _run_and_trim(fn: Callable, args: tuple, chars: int):
    try:
        return fn(*args)
    finally:
        if chars >= TRIM_AFTER_CHARS:
            _trim_heap()


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text` (CPU-bound: run it through off_loop)."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens)) if text or add_special_tokens else []
