"""The LSP base protocol and lifecycle on stdio, held to the specs where pygls 2.1 is lenient.

`serve_stdio` reads the frames itself (LSP 3.17, "Base Protocol": header fields ending in \\r\\n, an
empty line, then Content-Length bytes of JSON-RPC 2.0). pygls's loop reads stdin in a pool thread that
the interpreter joins at exit: `exit` (always with code 0), and Ctrl-C when that thread took the signal,
ended the process only once the editor closed the pipe. It also trusted any header: a huge
Content-Length was a MemoryError, a malformed one lost the message boundaries for good.

`BridgeProtocol` answers each message as the specs say, where pygls answered with a window/showMessage
popup, with nothing, or with a traceback:

    body not JSON                         -32700 ParseError, id null          JSON-RPC 2.0, 5.1
    no request, notification or response  -32600 InvalidRequest, id null     JSON-RPC 2.0, 4 and 5.1
                                          (the id when one could be read)
    a method the server does not know    -32601 MethodNotFound, with or      JSON-RPC 2.0, 4 and 5.1
                                          without params (they are optional)
    params that do not fit the method     -32602 InvalidParams naming fields  JSON-RPC 2.0, 5.1
                                          (a notification: logged and ignored)
    a request before a successful         -32002 ServerNotInitialized; a notification is dropped
    `initialize`                          (LSP 3.17, "Initialize Request")
    `initialize` after a successful one   -32600 InvalidRequest ("may only be sent once")
    a notification's method with an id   -32600 InvalidRequest (pygls dropped the id: no answer came)
    a response with an id that is not     logged and ignored: no request of ours carries it
    an integer or a string
    `$/cancelRequest` whose id is not     logged and ignored, as any notification whose params do not
    an integer or a string                fit (pygls failed on it and the bridge exited)
    a request after `shutdown`            -32600 InvalidRequest; a notification is dropped ("Shutdown")
    `exit`                                the process ends: 0 after `shutdown`, else 1 ("Exit Notification")

and it never puts a traceback in error.data (it is logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import threading

from cattrs.v import format_exception, transform_error
from lsprotocol import types
from pygls.exceptions import (JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest, JsonRpcParseError,
                              JsonRpcServerNotInitialized)
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol

logger = logging.getLogger(__name__)


class _AnswersWithoutTracebacks(logging.Filter):
    """pygls logs every JSON-RPC error a handler answers with its traceback (stderr, which an editor shows
    as the server's log): for the bridge's own answers (JsonRpcException: a backend that is down,
    params to fix) one line says what was answered; other exceptions (bugs) keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, JsonRpcException):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "answered %s (%s): %s", (type(error).__name__, error.code, error.message), None, None)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("pygls.protocol.json_rpc").addFilter(_AnswersWithoutTracebacks())

MAX_MESSAGE_BYTES = 64 << 20  # far above any editor's message (didOpen of a big file): larger is a broken header
SIGINT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


class FramingError(Exception):
    """A header the base protocol does not allow: no later message boundary can be trusted."""


class BridgeProtocol(LanguageServerProtocol):
    """pygls's LanguageServerProtocol, with every message first checked by `message_received`."""

    def __init__(self, server, converter):
        super().__init__(server, converter)
        self.initialized = False  # set by the server's initialize handler once it succeeds
        self.shutdown_received = False  # on arrival: pygls sets its own flag once the handler has run
        self.exit_code: int | None = None  # set by `exit`: the process ends with it

    def message_received(self, body: bytes) -> None:
        """Check one message body (see the module docstring), then hand it to pygls."""
        try:
            data = json.loads(body)
        except ValueError:  # not UTF-8, or not JSON
            return self._send_error(None, JsonRpcParseError("Parse error: the message body is not JSON"))
        problem = _why_invalid(data)
        if problem:
            msg_id = data.get("id") if isinstance(data, dict) and _is_id(data.get("id")) else None
            return self._send_error(msg_id, JsonRpcInvalidRequest(f"Invalid Request: {problem}"))
        method, is_request = data.get("method"), "method" in data and "id" in data
        if method is None and not _is_id(data["id"]):
            logger.warning("ignored a response with id %.80r: not an integer or a string", data["id"])
            return
        if is_request and _is_notification(method):  # pygls read it as the notification and dropped the id
            return self._send_error(data["id"], JsonRpcInvalidRequest(
                f"Invalid Request: {method} is a notification: send it without an id (it has no answer)"))
        if method == types.CANCEL_REQUEST and not is_request and not _is_id(_params_id(data)):
            logger.warning("ignored a $/cancelRequest: params.id must be an integer or a string")
            return
        if method == types.EXIT and not is_request:
            self.exit_code = 0 if self.shutdown_received else 1
            return
        if is_request and method == types.INITIALIZE and self.initialized:
            return self._send_error(data["id"], JsonRpcInvalidRequest(
                "initialize: the server is initialized already; initialize may only be sent once"))
        if is_request and not self.initialized and method != types.INITIALIZE:
            return self._send_error(data["id"], JsonRpcServerNotInitialized(
                f"{method}: the server is not initialized: send initialize (with valid initializationOptions) first"))
        if is_request and self.shutdown_received:
            return self._send_error(data["id"], JsonRpcInvalidRequest(
                f"{method}: the server is shut down; only the exit notification may follow shutdown"))
        if method is not None and not is_request and (self.shutdown_received or not self.initialized):
            logger.info("dropped the %s notification: it came before initialize or after shutdown", method)
            return
        self.shutdown_received |= is_request and method == types.SHUTDOWN
        if method is not None and "params" not in data and method not in types.METHOD_TO_TYPES:
            data = {**data, "params": None}  # (JSON-RPC's params are optional; pygls's generic type needs the key)
        try:
            message = self.structure_message(data)
        except JsonRpcException as exc:  # pygls could not build the method's LSP type (exc.__cause__ says why)
            problem = f"{method}: {_field_problems(exc.__cause__ or exc)}"
            if is_request:
                return self._send_error(data["id"], JsonRpcInvalidParams(problem))
            logger.warning("ignored a notification: %s", problem)
            return
        self.handle_message(message)

    def _send_error(self, msg_id, error: JsonRpcException) -> None:
        # Written as a dict: lsprotocol leaves out an id of None, and JSON-RPC 2.0 (5) wants "id": null.
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": error.code, "message": error.message}})

    def _send_response(self, msg_id, result=None, error=None):
        """pygls puts the traceback of an unexpected error in a handler into error.data, which clients
        show to the user; it is in the log (pygls logs it), and the answer keeps the message."""
        if error is not None and isinstance(error.data, dict) and "traceback" in error.data:
            error = types.ResponseError(code=error.code, message=error.message)
        super()._send_response(msg_id, result, error)


class BridgeServer(LanguageServer):
    """pygls's LanguageServer on a BridgeProtocol. An error handling a notification (a didChange for a
    document never opened) is logged, not shown as a window/showMessage popup: a notification has no
    answer (LSP 3.17, "Notification Message"), and the editor's user can do nothing about it."""

    def __init__(self, name: str, version: str):
        super().__init__(name, version, protocol_cls=BridgeProtocol)

    def report_server_error(self, error: Exception, source) -> None:
        logger.warning("%s: %s", source.__name__, error)


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)  # LSP 3.17: id is integer | string


def _is_notification(method: str) -> bool:
    """Whether LSP 3.17 defines `method` as a notification (didOpen, $/cancelRequest, exit, ...)."""
    kinds = types.METHOD_TO_TYPES.get(method)
    return kinds is not None and kinds[0].__name__.endswith("Notification")


def _params_id(data: dict):
    params = data.get("params")
    return params.get("id") if isinstance(params, dict) else None


def _why_invalid(data) -> str | None:
    """What keeps `data` from being a JSON-RPC 2.0 request, notification or response (None: nothing)."""
    if not isinstance(data, dict):
        return "a message is a JSON object (LSP has no batches)"
    if data.get("jsonrpc") != "2.0":
        return 'a message has "jsonrpc": "2.0"'
    if "method" in data and not isinstance(data["method"], str):
        return "method must be a string"
    if "method" in data and "id" in data and not _is_id(data["id"]):
        return "a request's id must be an integer or a string"
    if "method" not in data and "id" not in data:
        return "a message has a method (a request or a notification) or an id (a response)"
    return None


def _field_problems(error: BaseException) -> str:
    """The fields that do not fit the method's LSP type, named as in the JSON:
    "params.context: required field missing"."""
    def why(exc, kind):  # an lsprotocol validator's own words: "Position.line should be in range [0:2147483647]..."
        return str(exc) if isinstance(exc, ValueError) and kind is None else format_exception(exc, kind)

    problems = []
    for line in transform_error(error, path="", format_exception=why):
        what, _, where = line.rpartition(" @ ")
        field = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), where.lstrip("."))  # text_document -> textDocument
        problems.append(f"{field}: {what}")
    return "; ".join(problems)


def serve_stdio(server: BridgeServer, stdin_fd: int = 0, stdout=None) -> int:
    """Serve LSP on stdin/stdout until `exit`, the end of input or Ctrl-C; returns the exit code: `exit`'s
    (0 after shutdown, else 1), the same rule at the end of input (the client left without `exit`), and
    130 on Ctrl-C (SIGINT). Raises FramingError on a malformed header."""
    server.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
    try:
        return asyncio.run(_serve(server.protocol, stdin_fd))
    except KeyboardInterrupt:  # asyncio.run turns SIGINT into this once it has cancelled the loop's work
        return SIGINT_EXIT_CODE


async def _serve(protocol: BridgeProtocol, stdin_fd: int) -> int:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_pump, args=(stdin_fd, loop, reader), name="lsp-stdin", daemon=True).start()
    while protocol.exit_code is None:
        body = await read_message(reader)
        if body is None:
            return 0 if protocol.shutdown_received else 1
        protocol.message_received(body)
    return protocol.exit_code


def _pump(fd: int, loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader) -> None:
    """Feed what stdin gives into `reader`. A daemon thread reading the file descriptor: the process can
    end while it waits for input, and it holds no lock of sys.stdin that shutting down would wait for.
    It blocks SIGINT, so the kernel hands Ctrl-C to the main thread: taken here, it would not wake the
    event loop waiting in the main thread, and the bridge would go on until its next message."""
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:  # stdin closed under us: as the end of input
                chunk = b""
            if not chunk:
                loop.call_soon_threadsafe(reader.feed_eof)
                return
            loop.call_soon_threadsafe(reader.feed_data, chunk)
    except RuntimeError:  # the event loop has closed: the server is ending
        pass


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """The body of the next message; None at the end of input. Header fields other than Content-Length
    are ignored (Content-Type says utf-8, the only encoding LSP allows). Raises FramingError."""
    length, headers = None, 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # asyncio.StreamReader's line limit, 64 KiB
            raise FramingError("a header line over 64 KiB (LSP 3.17, Base Protocol)") from None
        if not line.endswith(b"\n"):
            return None  # the end of input, perhaps inside a header
        if not line.strip():
            if headers == 0:
                continue  # a stray line break between messages
            if length is None:
                raise FramingError("a message header without Content-Length (LSP 3.17, Base Protocol)")
            break
        headers += 1
        name, colon, value = line.partition(b":")
        if not colon:
            raise FramingError(f"malformed header line {line[:80]!r}: a header field is 'Name: value\\r\\n'")
        if name.strip().lower() == b"content-length":
            digits = value.strip()
            if not (digits.isdigit() and len(digits) <= 18):
                raise FramingError(f"Content-Length {digits[:40]!r} is not a byte count")
            length = int(digits)
    if length > MAX_MESSAGE_BYTES:
        raise FramingError(f"Content-Length {length} is over the {MAX_MESSAGE_BYTES}-byte limit of a message")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:  # the input ended inside the body
        return None
