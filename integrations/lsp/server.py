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
import itertools
import re
from dataclasses import dataclass, field, fields
from urllib.parse import unquote

from lsprotocol import types
from pygls.exceptions import JsonRpcInternalError, JsonRpcInvalidParams, JsonRpcRequestCancelled
from pygls.lsp.server import LanguageServer
from pygls.workspace import TextDocument, Workspace

from integrations.editor.document import LINE_BREAK
from integrations.editor.protocol import CompleteParams, Limits, RpcError, parse_complete
from integrations.lsp.backend import BackendError, EditorBackend
from integrations.lsp.base_protocol import BridgeServer


@dataclass
class BridgeConfig:
    """How the bridge asks for completions; initializationOptions may override any field by name."""

    url: str = "ws://127.0.0.1:8000/v1/editor"
    api_key: str | None = None  # sent as "Authorization: Bearer" when the server requires keys
    prefix_lines: int = 256  # lines above the cursor sent as prefix
    suffix_lines: int = 64  # lines below the cursor sent as suffix
    multiline: str = "auto"  # auto: multi-line only when the cursor line has no text after the cursor
    max_tokens: int | None = None  # None: the backend's default gaps
    max_time_ms: int | None = 2000
    params: dict = field(default_factory=dict)  # extra `complete` params, e.g. {"mode": "ar", "temperature": 0.2}

    def update(self, options: dict | None) -> None:
        """Apply initializationOptions (None values keep the default); raises BridgeConfigError naming the
        first bad option, and then changes nothing."""
        updated = BridgeConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        for key, value in (options or {}).items():
            if key not in self.__dataclass_fields__:
                raise BridgeConfigError(key, f"is not an option; options are {', '.join(sorted(self.__dataclass_fields__))}")
            if value is not None:
                setattr(updated, key, value)
        updated.check()
        self.__dict__.update(updated.__dict__)

    def check(self) -> None:
        """Raises BridgeConfigError(field, message) for the first field a completion could not use."""
        def integer(value, low):
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        if not _websocket_url(self.url):
            raise BridgeConfigError("url", f"must be a WebSocket URL (ws://HOST:PORT/v1/editor), got {self.url!r}")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise BridgeConfigError("api_key", "must be a string")
        for name in ("prefix_lines", "suffix_lines"):
            if not integer(getattr(self, name), 0):
                raise BridgeConfigError(name, f"must be an integer >= 0, got {getattr(self, name)!r}")
        limits = Limits()  # the protocol's defaults (docs/editor-protocol.md): a server answers larger with an error
        for name, most in (("max_tokens", limits.max_tokens), ("max_time_ms", limits.max_time_ms)):
            value = getattr(self, name)
            if value is not None and not (integer(value, 1) and value <= most):
                raise BridgeConfigError(name, f"must be an integer in 1..{most}, got {value!r}")
        if self.multiline not in ("auto", "always", "never"):
            raise BridgeConfigError("multiline", f"must be 'auto', 'always' or 'never', got {self.multiline!r}")
        if not isinstance(self.params, dict):
            raise BridgeConfigError("params", "must be an object of extra `complete` params, e.g. {\"mode\": \"ar\"}")
        for key in self.params:  # a typo ("modee") was ignored, as the protocol ignores unknown keys
            if key in BRIDGE_SETS:
                raise BridgeConfigError(f"params.{key}", "is set by the bridge from the document and the cursor; drop it")
            if key not in COMPLETE_PARAMS:
                raise BridgeConfigError(f"params.{key}", "is not a `complete` param; they are "
                                                         + ", ".join(sorted(COMPLETE_PARAMS)))
        try:  # the protocol's own checks (docs/editor-protocol.md, "complete"): a bad one failed every completion
            parse_complete({**self.params, "uri": "file:///check", "prefix": ""}, limits)
        except RpcError as exc:
            raise BridgeConfigError(f"params.{exc.data['field']}", exc.message.split(": ", 1)[-1]) from None


# `complete` params a client may set through initializationOptions.params, and those the bridge sets itself
BRIDGE_SETS = frozenset({"uri", "prefix", "suffix", "language", "version"})
COMPLETE_PARAMS = frozenset(f.name for f in fields(CompleteParams)) - BRIDGE_SETS


def _websocket_url(url) -> bool:
    """Whether `url` is a ws:// or wss:// URL the websockets client can open (host, valid port)."""
    from websockets.exceptions import InvalidURI
    from websockets.uri import parse_uri

    try:
        return isinstance(url, str) and bool(parse_uri(url).host)
    except (InvalidURI, ValueError):
        return False


class BridgeConfigError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name} {message}")
        self.field = field_name
        self.message = message


# LSP's line breaks are "\n", "\r\n" and "\r" only (LSP 3.17, "Text Documents"). pygls splits lines
# with str.splitlines, which also breaks at form feeds, U+2028 and others: positions in a file with a
# form feed (common in Python, C and Lisp sources) then point into the wrong line, and incremental edits
# land there too, corrupting the bridge's copy of the document.
_LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


class LspTextDocument(TextDocument):
    """A pygls document whose lines end only at LSP's line breaks (see _LSP_LINE), and whose edits clamp
    positions as LSP says (`clamp_position`; pygls moved a character past the line's end one back, into
    the line, and counted the line break as part of the line)."""

    _lines_of: tuple = (None, ())  # (source, its lines): pygls reads `lines` for every edit and position

    @property
    def lines(self):
        source = self.source
        if self._lines_of[0] is not source:
            self._lines_of = (source, tuple(_LSP_LINE.findall(source)))
        return self._lines_of[1]

    def _apply_incremental_change(self, change: types.TextDocumentContentChangePartial) -> None:
        """Splice the edit into the source and re-split only the lines it touched. pygls rebuilt the whole
        document line by line for every edit, and `lines` then re-split all of it: 0.4 s a keystroke on a
        30 MB file (bench/lsp_document.py, docs/benchmarks.md)."""
        lines, text = self.lines, change.text
        start, end = clamp_position(self, change.range.start), clamp_position(self, change.range.end)
        if not lines:  # an empty document
            self._source = text
            return

        def server_position(position: types.Position) -> tuple[int, int]:
            """(line, character offset into it); the document's end after a final line break is the
            last line's end, line break included."""
            if position.line >= len(lines):
                return len(lines) - 1, len(lines[-1])
            return position.line, self._position_codec.position_from_client_units(lines, position).character

        first, last = sorted([server_position(start), server_position(end)])
        # One unchanged line of margin on each side: an inserted "\n" after a line ending in "\r" joins it
        # into one "\r\n" break, which a split of the touched lines alone would not see.
        low, high = max(0, first[0] - 1), min(len(lines), last[0] + 2)
        starts = list(itertools.accumulate(map(len, lines[low:high]), initial=sum(map(len, lines[:low]))))
        begin, finish = starts[first[0] - low] + first[1], starts[last[0] - low] + last[1]
        source = self.source
        edited = "".join((source[:begin], text, source[finish:]))
        region = edited[starts[0]:starts[-1] + len(text) - (finish - begin)]
        self._source = edited
        self._lines_of = (edited, lines[:low] + tuple(_LSP_LINE.findall(region)) + lines[high:])


class LspWorkspace(Workspace):
    """A pygls workspace of LspTextDocuments."""

    def _create_text_document(self, doc_uri, source=None, version=None, language_id=None) -> TextDocument:
        return LspTextDocument(doc_uri, source=source, version=version, language_id=language_id,
                               sync_kind=self._sync_kind, position_codec=self.position_codec)


def cursor_context(source: str, offset: int, prefix_lines: int, suffix_lines: int) -> tuple[str, str]:
    """(prefix, suffix) around a character offset: the cursor's line and at most `prefix_lines` lines
    above and `suffix_lines` below (LSP line breaks, kept as they are). Reads only the text near the
    cursor (a window that grows until it holds the lines), not the whole document."""
    window, start = max(4096, 128 * (prefix_lines + 1)), 0  # most code lines are shorter: one pass
    while True:
        low = max(0, offset - window)
        # ends of the line breaks before the cursor; a "\r\n" cut at `low` ends at the same place
        starts = [m.end() for m in LINE_BREAK.finditer(source, low, offset)]
        if len(starts) > prefix_lines:
            start = starts[-(prefix_lines + 1)]
            break
        if low == 0:
            break
        window *= 4
    ends = [m.start() for m in itertools.islice(LINE_BREAK.finditer(source, offset), suffix_lines + 1)]
    end = ends[suffix_lines] if len(ends) > suffix_lines else len(source)
    return source[start:offset], source[offset:end]


def position_at_offset(doc, offset: int) -> types.Position:
    """The client position (the negotiated encoding's units) of a character offset into doc.source. Not
    pygls's client_position_at_offset, which answers (last line + 1, 0) at the end of a document that
    does not end with a line break and fails on an empty one."""
    lines = doc.lines
    for number, line in enumerate(lines):
        if offset < len(line) or (number == len(lines) - 1 and not LINE_BREAK.search(line[-1:])):
            return types.Position(number, doc.position_codec.client_num_units(line[:offset]))
        offset -= len(line)
    return types.Position(len(lines), 0)


def clamp_position(doc, position: types.Position) -> types.Position:
    """A character past the end of its line means the line's end (LSP 3.17, Position: "If the character
    value is greater than the line length it defaults back to the line length"; the end-of-line
    characters do not count), and a line past the document's last means the document's end."""
    lines = doc.lines
    if position.line >= len(lines):
        return position_at_offset(doc, len(doc.source))
    text = lines[position.line].rstrip("\r\n")
    return types.Position(position.line, min(position.character, doc.position_codec.client_num_units(text)))


def with_selected_item(doc, selected: types.SelectedCompletionInfo,
                       offset: int) -> tuple[str, int, types.Range] | None:
    """(source, cursor offset, range to answer over) when the editor's suggest popup has an item selected
    (InlineCompletionContext.selectedCompletionInfo): the document as if the item's text replaced its
    range, the cursor after it, and that range. LSP 3.18: "If set, provided inline completions must
    extend the text of the selected item and use the same range, otherwise they are not shown as
    preview" (they were completed at the cursor, so VS Code dropped every one made with the popup open).
    None when the cursor is outside the range: no answer over that range continues the text at the
    cursor (one widened to take the cursor in deleted the text between them)."""
    start, end = sorted(doc.offset_at_position(clamp_position(doc, p)) for p in (selected.range.start, selected.range.end))
    if not start <= offset <= end:
        return None
    source = "".join((doc.source[:start], selected.text, doc.source[end:]))
    return source, start + len(selected.text), types.Range(start=position_at_offset(doc, start),
                                                           end=position_at_offset(doc, end))


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
    selected item extended) completed by the backend; one item, or none for blank text."""
    uri = params.text_document.uri
    if unquote(uri) not in server.workspace.text_documents:  # pygls keys by the unquoted URI; it would read the path from disk
        raise JsonRpcInvalidParams(f"textDocument {uri} is not open: send textDocument/didOpen first")
    doc = server.workspace.get_text_document(uri)
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
    text = await _backend_completion_text(server, config, backend, doc, prefix, suffix)
    if not text.strip():
        return types.InlineCompletionList(items=[])
    if selected is not None:
        text = selected.text + text  # it extends the selected item, over the item's range (LSP 3.18)
    return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=text, range=here)])


async def _backend_completion_text(server: BridgeServer, config: BridgeConfig, backend: EditorBackend, doc,
                                   prefix: str, suffix: str) -> str:
    """The backend's completion of the text around the cursor (cut to the backend's limits); "" when a
    newer request for the document superseded it. A failure is a JSON-RPC error saying what is wrong
    (cancelled once `shutdown` was received)."""
    try:
        prefix, suffix = fit_to_limits(prefix, suffix, await backend.limits())  # a line can be very long
        request = complete_params(config, doc.uri, doc.version, doc.language_id or "", prefix, suffix)
        result = await backend.complete(request)
    except (BackendError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
        if server.protocol.shutdown_received:  # `shutdown` closed the backend under it: cancelled (LSP
            # 3.17 RequestCancelled, which clients drop quietly; it was -32603 "unreachable")
            raise JsonRpcRequestCancelled("the server is shutting down (shutdown received)") from None
        if isinstance(exc, BackendError):
            if exc.code == -32800:  # superseded by a newer request for this document: nothing to show
                return ""
            raise JsonRpcInternalError(f"refusion backend: {exc}") from None
        # An error, not an empty answer: the editor's LSP log then says what is wrong.
        raise JsonRpcInternalError(f"refusion backend unreachable at {config.url}: {exc}") from None
    return result.get("text", "")
