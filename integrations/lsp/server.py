"""The LSP bridge: textDocument/inlineCompletion served from the native editor protocol.

Any LSP 3.18 client with inline completions (Neovim 0.12+ `vim.lsp.inline_completion`, VS Code via
vscode-languageclient, Emacs lsp-mode/eglot) gets completions without a plugin. The bridge keeps the
documents in sync (pygls workspace), cuts prefix and suffix around the cursor (whole lines, then to the
server's announced limits), sends `complete` to the backend over one WebSocket, and answers with one
InlineCompletionItem. `$/cancelRequest` cancels the handler task, which cancels the backend completion;
a newer request for the same document supersedes the older one in the backend too. The LSP base
protocol and lifecycle (framing, malformed messages, initialize/shutdown/exit) are base_protocol.py's.
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidParams, JsonRpcRequestCancelled
from pygls.lsp.server import LanguageServer

from integrations.editor import protocol as rpc
from integrations.editor.document import LINE_BREAK
from integrations.editor.protocol import Limits
from integrations.lsp.backend import BackendClosed, BackendError, BackendPaused, EditorBackend
from integrations.lsp.base_protocol import BridgeServer
from integrations.lsp.bridge_config import BridgeConfig, BridgeConfigError
from integrations.lsp.documents import (LspTextDocument, LspWorkspace, clamp_position, cursor_context,
                                        position_at_offset, with_selected_item)

# Its own, and the settings' and documents' names as the bridge's users knew them here (their homes:
# bridge_config.py, documents.py)
__all__ = ["BridgeConfig", "BridgeConfigError", "LspTextDocument", "answer_timeout_s", "build_server", "clamp_position",
           "complete_params", "cursor_context", "fit_to_limits", "position_at_offset", "wants_multiline",
           "with_selected_item"]


def wants_multiline(mode: str, suffix: str) -> bool:
    if mode in ("always", "never"):
        return mode == "always"
    return not LINE_BREAK.split(suffix, 1)[0].strip()


def complete_params(config: BridgeConfig, uri: str, version: int | None, language: str,
                    prefix: str, suffix: str) -> dict:
    params = {"multiline": wants_multiline(config.multiline, suffix)}
    if config.max_tokens:
        params["max_tokens"] = config.max_tokens
    if config.max_time_ms:
        params["max_time_ms"] = config.max_time_ms
    params.update(config.params)
    # (a lone surrogate in the URI or language, which JSON can carry and UTF-8 cannot, as in the text)
    params.update(uri=_SURROGATE.sub("\ufffd", uri), prefix=prefix, suffix=suffix,
                  language=_SURROGATE.sub("\ufffd", language or ""))
    if version is not None:
        params["version"] = version
    return params


def fit_to_limits(prefix: str, suffix: str, limits: Limits) -> tuple[str, str]:
    """Prefix and suffix cut to what the server accepts (the limits its `initialize` announces,
    docs/editor-protocol.md): at most max_text_chars each, and UTF-8 (up to 4 bytes a character) small
    enough that both fit in one max_frame_bytes frame with room for the other params. The prefix keeps
    its end and the suffix its start: the text next to the cursor, as the server's token budgets keep."""
    chars, size = limits.max_text_chars, limits.max_frame_bytes * 3 // 8  # each; a quarter of the frame for the rest
    before, after = _utf8(prefix[max(0, len(prefix) - chars):]), _utf8(suffix[:chars])
    return (before[max(0, len(before) - size):].decode(errors="ignore"),  # a character cut in two is dropped
            after[:size].decode(errors="ignore"))


def _utf8(text: str) -> bytes:
    """UTF-8 of document text, a lone surrogate (JSON can carry "\\ud800"; UTF-8 cannot) as U+FFFD, as the
    WHATWG Encoding Standard's UTF-8 encoder (an editor's TextEncoder) writes it; it failed the completion
    with -32603 before. A surrogate pair that came in two edits (an emoji typed as two UTF-16 units) is
    two code points in the document: joined into its character (it was sent as two U+FFFD)."""
    if _SURROGATE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.encode()


_SURROGATE = re.compile("[\ud800-\udfff]")


def answer_timeout_s(config: BridgeConfig) -> float:
    """How long a completion may wait for the backend's answer: the max_time_ms it is sent with (the
    engine ends it then, at the latest after its deadline grace; `params.max_time_ms` where given, as
    complete_params sends it), or 60 s without one, plus 10 s for queueing and the network; later, the
    backend is taken as stalled and the request fails with -32603 saying so."""
    sent = config.params["max_time_ms"] if "max_time_ms" in config.params else config.max_time_ms
    return (sent or 60_000) / 1000 + 10


def build_server(config: BridgeConfig) -> LanguageServer:
    """The bridge's language server on one backend: `initialize` applies initializationOptions to `config`
    and the backend, textDocument/inlineCompletion asks the backend, `shutdown` closes it."""
    server = BridgeServer("refusion-lsp", "0.1.0")
    backend = EditorBackend(config.url, config.api_key, answer_timeout_s=answer_timeout_s(config))

    @server.feature(types.INITIALIZE)
    def on_initialize(params: types.InitializeParams) -> None:
        _initialize(server, config, backend, params)

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(params: types.InlineCompletionParams) -> types.InlineCompletionList:
        return await _inline_completion(server, config, backend, params)

    @server.feature(types.SHUTDOWN)
    async def on_shutdown(_params) -> None:
        await backend.close()

    server.backend = backend  # type: ignore[attr-defined] - for tests and embedding
    return server


def _initialize(server: BridgeServer, config: BridgeConfig, backend: EditorBackend,
                params: types.InitializeParams) -> None:
    """`initialize`: the workspace made to use LSP's lines, initializationOptions applied to `config` and
    the backend (JsonRpcInvalidParams naming a bad option), then requests are served."""
    # pygls made its workspace just before this handler runs, with no document yet: use LSP's lines.
    ws = server.workspace
    server.protocol._workspace = LspWorkspace(ws.root_uri, server._text_document_sync_kind,
                                              list(ws.folders.values()), ws.position_encoding)
    options = params.initialization_options
    if options is not None and not isinstance(options, dict):  # it was taken as no options at all
        raise JsonRpcInvalidParams(f"initializationOptions must be an object of options, got {type(options).__name__}")
    try:
        config.update(options)
    except BridgeConfigError as exc:
        raise JsonRpcInvalidParams(f"initializationOptions.{exc.field} {exc.message}") from None
    backend.url, backend.answer_timeout_s = config.url, answer_timeout_s(config)
    backend.extra_headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    server.protocol.initialized = True  # from now on requests are served (base_protocol.py)


async def _inline_completion(server: BridgeServer, config: BridgeConfig, backend: EditorBackend,
                             params: types.InlineCompletionParams) -> types.InlineCompletionList:
    """textDocument/inlineCompletion: the open document's text around the cursor (or the editor's
    selected item extended) completed by the backend; one item, or none for blank text or for a
    document whose text changed (or that closed) while the backend answered: its range would point into
    text the answer was not made for (an editor that keeps late answers inserted it there, helper-218).
    The text is compared, not the version: an edit that changes nothing keeps the answer, and a client
    that sends an edit without a new version still loses it (helper-219)."""
    uri = params.text_document.uri
    if unquote(uri) not in server.workspace.text_documents:  # pygls keys by the unquoted URI; it would read the path from disk
        raise JsonRpcInvalidParams(f"textDocument {uri} is not open: send textDocument/didOpen first")
    doc = server.workspace.get_text_document(uri)
    version, text_then = doc.version, doc.source  # (what the prefix, suffix and range are read from)
    offset = doc.offset_at_position(clamp_position(doc, params.position))
    position = position_at_offset(doc, offset)  # where the prefix ends: a mid-character position normalized
    here = types.Range(start=position, end=position)  # where it completes (a clamped cursor included)
    source, selected = doc.source, params.context.selected_completion_info if params.context else None
    if selected is not None:  # the editor's suggest popup is open on an item: extend that item
        extended = with_selected_item(doc, selected, offset)
        if extended is None:
            return types.InlineCompletionList(items=[])
        source, offset, here = extended
    prefix, suffix = cursor_context(source, offset, config.prefix_lines, config.suffix_lines)
    text = await _backend_completion_text(server, config, backend, doc, version, prefix, suffix)
    now = server.workspace.text_documents.get(unquote(uri))
    if not text.strip() or now is not doc or doc.source != text_then:
        return types.InlineCompletionList(items=[])
    if selected is not None:
        text = selected.text + text  # it extends the selected item, over the item's range (LSP 3.18)
    return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=text, range=here)])


async def _backend_completion_text(server: BridgeServer, config: BridgeConfig, backend: EditorBackend, doc,
                                   version: int | None, prefix: str, suffix: str) -> str:
    """The backend's completion of the text around the cursor (cut to the backend's limits), of `doc` at
    `version` (the one prefix and suffix were read from); "" when a newer request for the document
    superseded it, or while the backend asked for a pause (`retry_after_s`, see _busy). A failure is a
    JSON-RPC error saying what is wrong (cancelled once `shutdown` was received)."""
    try:
        prefix, suffix = fit_to_limits(prefix, suffix, await backend.limits())  # a line can be very long
        request = complete_params(config, doc.uri, version, doc.language_id or "", prefix, suffix)
        result = await backend.complete(request)
    except BackendPaused:
        return ""
    except (BackendError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
        if server.protocol.shutdown_received:  # `shutdown` closed the backend under it: cancelled (LSP
            # 3.17 RequestCancelled, which clients drop quietly; it was -32603 "unreachable")
            raise JsonRpcRequestCancelled("the server is shutting down (shutdown received)") from None
        if isinstance(exc, BackendError):
            if exc.code == -32800:  # superseded by a newer request for this document: nothing to show
                return ""
            if exc.code in (rpc.OVERLOADED, rpc.ENGINE_UNAVAILABLE):
                raise _busy(backend, exc) from None
            raise JsonRpcInternalError(f"refusion backend: {exc}") from None
        if isinstance(exc, BackendClosed) and exc.close_code == 1013:
            raise _paused(backend, exc, TRY_LATER_S, close_code=exc.close_code) from None
        # An error, not an empty answer: the editor's LSP log then says what is wrong.
        raise JsonRpcInternalError(f"refusion backend unreachable at {config.url}: {exc}") from None
    return result.get("text", "")


class JsonRpcRequestFailed(JsonRpcException):
    """LSP 3.17's RequestFailed: the request was valid and the server understood it, but it failed."""

    CODE = int(types.LSPErrorCodes.RequestFailed)  # -32803
    MESSAGE = "Request Failed"


# The longest pause a backend's retry_after_s buys: a wrong or huge value must not silence the bridge for long
MAX_RETRY_AFTER_S = 60.0


def _busy(backend: EditorBackend, exc: BackendError) -> JsonRpcException:
    """An OVERLOADED or ENGINE_UNAVAILABLE backend (docs/editor-protocol.md, "Errors and limits"): LSP
    3.17's RequestFailed (-32803: a valid request that failed; the message says why), its data carrying the
    backend's `retry_after_s` and `code`, and the bridge honours the pause as an HTTP client honours
    Retry-After (EditorBackend.pause): the completions asked for within it, and those waiting for a turn
    when it starts, answer no item without reaching the backend (they were answered -32603 and sent on,
    each adding to the load that refused them). retry_after_s is 1 s when absent or not a number >= 0, at
    most MAX_RETRY_AFTER_S (an infinite one too); a pause that ends later already stays, and the seconds
    left in it are the retry_after_s answered (_paused)."""
    after = exc.data.get("retry_after_s") if isinstance(exc.data, dict) else None
    valid = isinstance(after, (int, float)) and not isinstance(after, bool) and after >= 0  # (NaN is not >= 0)
    after = min(float(after), MAX_RETRY_AFTER_S) if valid else 1.0
    return _paused(backend, exc, after, code=exc.code)


# How long a 1013 close ("try again later", RFC 6455 7.4.1: the server draining or holding its most editor
# connections, docs/editor-protocol.md) pauses completions: its frame names no time, and a draining or full
# server was connected to and refused again at each keystroke
TRY_LATER_S = 1.0


def _paused(backend: EditorBackend, exc: Exception, after: float, **data) -> JsonRpcException:
    """No completion asked of the backend for `after` seconds (EditorBackend.pause), and RequestFailed (-32803)
    saying why, its `data` {"retry_after_s": the seconds the pause that now holds has left, **data}: `after`,
    or more when a longer pause started before (a busy answer with a larger retry_after_s; it reported
    `after` while no completion went out for longer). For a busy answer (_busy) or a 1013 close."""
    after = backend.pause(after)
    return JsonRpcRequestFailed(f"refusion backend busy: {exc}; no completions asked for {after:g} s",
                                data={"retry_after_s": after, **data})
