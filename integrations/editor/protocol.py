"""The native editor protocol: msgpack-RPC frames over a WebSocket (docs/editor-protocol.md).

Frames are binary WebSocket messages, each one msgpack array:
    request       [0, id, method, params]     id: int or str chosen by the client
    response      [1, id, error, result]      exactly one per request; error is None or ErrorInfo map
    notification  [2, method, params]         server -> client: completion/partial

This module is pure Python: frame decoding/encoding, error codes, limits, and validation of the
`complete` parameters into a typed `CompleteParams`. Every bad input becomes an `RpcError` whose
message names the field and says what to change; the session turns it into an error response and
keeps the connection open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from integrations.request_limits import MAX_SEED, clipped, long_stop_fault

PROTOCOL_VERSION = 1

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2

# Error codes (JSON-RPC's where one fits, so LSP-minded authors recognise them).
PARSE_ERROR = -32700  # not a binary msgpack frame
INVALID_REQUEST = -32600  # msgpack, but not [0, id, method, params]
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602  # data: {"field": name}
INTERNAL_ERROR = -32603
MESSAGE_TOO_LARGE = -32001  # frame over Limits.max_frame_bytes; data: {"limit": bytes}
OVERLOADED = -32002  # engine queue/KV full; data: {"retry_after_s": float}
TOO_MANY_REQUESTS = -32003  # more than Limits.max_inflight completions on this connection
ENGINE_UNAVAILABLE = -32004  # the engine replica serving it died (or none runs); data: {"retry_after_s"}
REQUEST_CANCELLED = -32800  # data: {"reason": "cancelled" | "superseded", "superseded_by": id}

MODES = ("auto", "refusion", "ar")
MAX_INDENT = 1000  # `indent` / llama.cpp's `n_indent`, in characters: far past any code line's indentation
MAX_STOP_STRINGS = 16  # a completion's own stop strings, as /infill's (the engine takes 24 with the server's own)


@dataclass(frozen=True)
class Limits:
    """Per-connection limits, announced by `initialize`. Defaults explained inline."""

    max_frame_bytes: int = 1 << 20  # 1 MiB: a big file's prefix + suffix + context fits
    max_text_chars: int = 200_000  # per prefix / suffix / context chunk
    max_context_chunks: int = 32  # llama.vim's ring buffer holds 16 by default
    max_tokens: int = 256  # longest gap a completion may ask for
    max_time_ms: int = 30_000
    max_inflight: int = 8  # concurrent completions per connection (distinct uris)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class RpcError(Exception):
    """An error response: `code` from the table above, message says what to change (clipped, as the
    HTTP routes' messages: a value quoted from a 1 MiB frame would come back whole)."""

    def __init__(self, code: int, message: str, data: dict | None = None):
        message = clipped(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}

    def to_wire(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.data:
            err["data"] = self.data
        return err


def invalid_params(field_name: str, message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"{field_name}: {message}", {"field": field_name})


@dataclass
class Request:
    """A decoded request frame."""

    id: int | str
    method: str
    params: dict


def decode_frame(data: bytes | str | None, limits: Limits) -> Request:
    """Parse one incoming frame. Raises RpcError (with .request_id when it could be read)."""
    if data is None or isinstance(data, str):
        raise RpcError(PARSE_ERROR, "frames must be binary WebSocket messages holding msgpack, not text")
    if len(data) > limits.max_frame_bytes:
        err = RpcError(
            MESSAGE_TOO_LARGE,
            f"frame is {len(data)} bytes; the limit is {limits.max_frame_bytes}: send less context",
            {"limit": limits.max_frame_bytes},
        )
        msg_id = _peek_id(data)  # (answered with its id: a client tracking its requests by id stops waiting)
        raise err if msg_id is None else _with_id(err, msg_id)
    try:
        # A string that is not UTF-8 (a lone UTF-16 surrogate, which JavaScript msgpack encoders write as
        # 3 bytes) is read with U+FFFD for each bad byte: the request is answered, by its id (the whole
        # frame was refused with id nil, so a client waiting on that id waited forever)
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False, unicode_errors="replace")
    except Exception as exc:  # msgpack raises several unrelated types
        raise RpcError(PARSE_ERROR, f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(msg, (list, tuple)) or len(msg) != 4 or msg[0] != REQUEST:
        err = RpcError(INVALID_REQUEST, "a request frame is the array [0, id, method, params]")
        if isinstance(msg, (list, tuple)) and len(msg) >= 2 and msg[0] == REQUEST and _is_id(msg[1]):
            raise _with_id(err, msg[1])  # (a short or long request whose id is readable: answered with it)
        raise err
    _, msg_id, method, params = msg
    if not _is_id(msg_id):
        raise RpcError(INVALID_REQUEST, "request id must be an integer or a string")
    if not isinstance(method, str):
        raise _with_id(RpcError(INVALID_REQUEST, "method must be a string"), msg_id)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _with_id(RpcError(INVALID_REQUEST, "params must be a map (or nil)"), msg_id)
    return Request(msg_id, method, params)


def _peek_id(data: bytes, head_bytes: int = 4096):
    """The id of a request frame read from its first `head_bytes` without unpacking the rest (a frame
    refused for its size: [0, id, ...] comes first); None when it is not readable there."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, unicode_errors="replace")
    unpacker.feed(data[:head_bytes])
    try:
        if unpacker.read_array_header() != 4 or unpacker.unpack() != REQUEST:
            return None
        msg_id = unpacker.unpack()
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types; cut short: not readable
        return None
    return msg_id if _is_id(msg_id) else None


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _with_id(err: RpcError, msg_id) -> RpcError:
    err.request_id = msg_id  # type: ignore[attr-defined]
    return err


def encode_response(msg_id, error: dict | None = None, result: Any = None) -> bytes:
    return msgpack.packb([RESPONSE, msg_id, error, result], use_bin_type=True)


def encode_notification(method: str, params: dict) -> bytes:
    return msgpack.packb([NOTIFICATION, method, params], use_bin_type=True)


def encode_request(msg_id, method: str, params: dict | None = None) -> bytes:
    """Client side (LSP bridge, tests, bench)."""
    return msgpack.packb([REQUEST, msg_id, method, params or {}], use_bin_type=True)


# --------------------------------------------------------------------------------------------------
# complete params


@dataclass
class ContextChunk:
    path: str
    text: str


@dataclass
class CompleteParams:
    """Validated `complete` parameters (docs/editor-protocol.md, "complete")."""

    uri: str
    prefix: str
    suffix: str = ""
    version: int | None = None
    language: str = ""
    context: list[ContextChunk] = field(default_factory=list)
    max_tokens: int | None = None  # None: the strategy's default gap lengths
    max_time_ms: int | None = None
    multiline: bool = False
    mode: str = "auto"
    indent: int = 0  # minimum indentation of generated lines (llama.cpp n_indent)
    stop: list[str] = field(default_factory=list)
    temperature: float | None = None
    seed: int | None = None
    gaps: tuple[int, ...] | None = None  # explicit candidate gap lengths (overrides the strategy)


def _get(params: dict, name: str, kinds: tuple, default=None, what: str = ""):
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise invalid_params(name, f"must be {what}, got a boolean")
    if not isinstance(value, kinds):
        raise invalid_params(name, f"must be {what}, got {type(value).__name__}")
    return value


def _text(params: dict, name: str, limits: Limits, required: bool = False) -> str:
    if required and params.get(name) is None:  # nil is not a string either (it read as "")
        raise invalid_params(name, "is required (a string)")
    value = _get(params, name, (str,), "", "a string")
    if len(value) > limits.max_text_chars:
        raise invalid_params(name, f"is {len(value)} chars; send at most {limits.max_text_chars}")
    return value


def _bounded_int(params: dict, name: str, low: int, high: int) -> int | None:
    value = _get(params, name, (int,), None, "an integer")
    if value is not None and not low <= value <= high:
        raise invalid_params(name, f"must be between {low} and {high}, got {value}")
    return value


def parse_context(raw, limits: Limits, name: str = "context") -> list[ContextChunk]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid_params(name, "must be a list of {path, text} maps")
    if len(raw) > limits.max_context_chunks:
        raise invalid_params(name, f"has {len(raw)} chunks; send at most {limits.max_context_chunks}")
    chunks = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise invalid_params(f"{name}[{i}]", "must be a map with a string 'text' (and 'path')")
        if len(item["text"]) > limits.max_text_chars:
            raise invalid_params(f"{name}[{i}].text", f"send at most {limits.max_text_chars} chars")
        key = "path" if "path" in item else "filename"
        path = item.get(key, "")
        if path is not None and not isinstance(path, str):
            raise invalid_params(f"{name}[{i}].{key}", f"must be a string (the file's path), got {type(path).__name__}")
        chunks.append(ContextChunk(path or "", item["text"]))
    return chunks


def parse_complete(params: dict, limits: Limits) -> CompleteParams:
    """Validate `complete` params; unknown keys are ignored (forward compatibility)."""
    uri = _get(params, "uri", (str,), None, "a string")
    if not uri:
        raise invalid_params("uri", "is required: the document's URI (completions for one uri supersede)")
    mode = _get(params, "mode", (str,), "auto", "a string")
    if mode not in MODES:
        raise invalid_params("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    stop = _get(params, "stop", (list,), [], "a list of strings")
    if not all(isinstance(s, str) and s for s in stop):
        raise invalid_params("stop", "must be a list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid_params("stop", f"holds {len(stop)} strings; give at most {MAX_STOP_STRINGS}")
    if (fault := long_stop_fault(stop)) is not None:
        raise invalid_params("stop", fault)
    gaps = _get(params, "gaps", (list,), None, "a list of 1 to 4 integers")
    if gaps is not None and not (1 <= len(gaps) <= 4 and all(
            isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= limits.max_tokens for g in gaps)):
        raise invalid_params("gaps", f"must be 1 to 4 integers between 1 and {limits.max_tokens}, got {gaps!r}")
    temperature = _get(params, "temperature", (int, float), None, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise invalid_params("temperature", f"must be between 0 and 2, got {temperature}")
    return CompleteParams(
        uri=uri,
        prefix=_text(params, "prefix", limits, required=True),
        suffix=_text(params, "suffix", limits),
        version=_get(params, "version", (int,), None, "an integer"),
        language=_get(params, "language", (str,), "", "a string"),
        context=parse_context(params.get("context"), limits),
        max_tokens=_bounded_int(params, "max_tokens", 1, limits.max_tokens),
        max_time_ms=_bounded_int(params, "max_time_ms", 1, limits.max_time_ms),
        multiline=_get(params, "multiline", (bool,), False, "a boolean"),
        mode=mode,
        indent=_bounded_int(params, "indent", 0, MAX_INDENT) or 0,
        stop=list(stop),
        temperature=float(temperature) if temperature is not None else None,
        seed=_bounded_int(params, "seed", 0, MAX_SEED),
        gaps=tuple(sorted(set(gaps))) if gaps else None,
    )


def request_id_of(params: dict, name: str = "id"):
    """The `id` field of cancel/accept/reject: the id of an earlier complete request."""
    if name not in params:
        raise invalid_params(name, "is required: the id of the complete request it refers to")
    value = params[name]
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise invalid_params(name, f"must be an integer or a string (the id of the complete request it refers to), "
                             f"got {type(value).__name__}")
    return value
