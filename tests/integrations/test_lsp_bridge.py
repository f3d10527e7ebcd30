"""`refusion lsp` as a subprocess, driven by a pygls LanguageClient: initialize, open a document,
inline completion, $/cancelRequest. Here the backend is the editor router on a local uvicorn over a
scripted engine (so the test can see what reached the engine); test_editor_serve.py repeats the round
trip against the real Ray Serve app."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import sys
import threading
from typing import Awaitable, Callable

import pytest
from lsprotocol import types
from pygls.lsp.client import LanguageClient
from test_editor_fakes import FakeEngineClient, bpe_tokenizer  # noqa: F401 - fixture

from integrations.editor.document import LINE_BREAK
from integrations.lsp.documents import _LSP_LINE
from integrations.lsp.server import (BridgeConfig, BridgeConfigError, LspTextDocument, answer_timeout_s, complete_params,
                                    cursor_context, position_at_offset, wants_multiline, with_selected_item)
from ports import free_port, refused_port, server_socket

DOC = "def area(r):\n    \n    return result\n"
URI = "file:///tmp/area.py"
WAIT_S = 60.0  # bound on every LSP answer: generous for a loaded 2-core machine (the bridge is a subprocess)


@pytest.fixture(scope="module")
def scripted_backend(bpe_tokenizer, wait_until):  # noqa: F811
    """(ws url, fake engine) for the editor router served by uvicorn in a thread."""
    import uvicorn
    from fastapi import FastAPI

    from integrations.editor.http import router

    fake = FakeEngineClient(bpe_tokenizer, script={32: "result = 3.14 * r * r\n    return result\n"})
    app = FastAPI()
    app.state.engine_client = fake
    app.include_router(router)
    sock = server_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until.blocking(lambda: server.started, "uvicorn to start")
    yield f"ws://127.0.0.1:{port}/v1/editor", fake
    server.should_exit = True
    thread.join(10)
    sock.close()


async def spawn_bridge(url: str) -> LanguageClient:
    """A client of a `refusion lsp` process pointed at `url`, not yet initialized."""
    client = LanguageClient("refusion-test", "0")
    await client.start_io(sys.executable, "-m", "integrations.cli", "lsp", "--url", url, "--max-time-ms", "5000")
    return client


async def initialize(client: LanguageClient, init_options=None) -> None:
    init = types.InitializeParams(capabilities=types.ClientCapabilities(), initialization_options=init_options)
    await asyncio.wait_for(client.initialize_async(init), WAIT_S)


def open_document(client: LanguageClient, uri: str = URI, text: str = DOC) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))


async def start_lsp(url: str, init_options: dict | None = None) -> LanguageClient:
    client = await spawn_bridge(url)
    await initialize(client, init_options)
    client.initialized(types.InitializedParams())
    open_document(client)
    return client


def inline_params(line: int = 1, character: int = 4, uri: str = URI) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character),
    )


async def stop_lsp(client: LanguageClient) -> None:
    await asyncio.wait_for(client.shutdown_async(None), WAIT_S)
    client.exit(None)
    await asyncio.wait_for(client.stop(), WAIT_S)


async def lsp_round_trip(url: str) -> types.InlineCompletionList:
    client = await start_lsp(url)
    try:
        return await asyncio.wait_for(client.text_document_inline_completion_async(inline_params()), WAIT_S)
    finally:
        await stop_lsp(client)


async def lsp_cancel(url: str, init_options: dict | None = None, *, in_flight: Callable[[], Awaitable],
                     ended: Callable[[], Awaitable] | None = None) -> Exception | None:
    """Send a completion, cancel it, return the error the client got (None: a result).

    in_flight: awaited before $/cancelRequest is sent; it returns once the backend runs the request, so
    the cancel cannot overtake it (the bridge connects to the backend on first use, which takes a
    while on a loaded machine).
    ended: awaited after the answer while the bridge is still connected, so what it sees was done by
    the cancel, not by the disconnect at shutdown.
    """
    client = await start_lsp(url, init_options)
    try:
        future = client.protocol.send_request_async(types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(),
                                                    msg_id="to-cancel")
        await in_flight()
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="to-cancel"))
        try:
            await asyncio.wait_for(future, WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the cancellation error is the expected outcome
            error = exc
        else:
            error = None
        if ended is not None:
            await ended()
        return error
    finally:
        await stop_lsp(client)


# The bridge as `refusion lsp` runs it, with SIGINT handled as in a terminal even when the test runner
# ignores it (a child inherits an ignored SIGINT).
BRIDGE = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from integrations.cli import main; sys.exit(main(sys.argv[1:]))")


class RawLsp:
    """The bridge as a subprocess spoken to in raw frames: what a well-behaved LSP client never sends."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path):
        self.proc, self.stderr_path = proc, stderr_path

    @classmethod
    async def start(cls, url: str, tmp_path) -> "RawLsp":
        stderr_path = tmp_path / "bridge-stderr.txt"
        with open(stderr_path, "wb") as stderr:  # a file: a pipe nobody reads could fill and block the bridge
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", BRIDGE, "lsp", "--url", url, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=stderr)
        return cls(proc, stderr_path)

    def send(self, message: bytes | dict) -> None:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def receive(self) -> dict:
        async def read() -> dict:
            header = await self.proc.stdout.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", header).group(1))
            return json.loads(await self.proc.stdout.readexactly(length))
        return await asyncio.wait_for(read(), WAIT_S)

    async def request(self, msg_id, method: str, params=None) -> dict:
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return await self.receive()

    def notify(self, method: str, params=None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    async def exit_code(self) -> int:
        """The exit code, with stdin still open: the bridge ends by itself."""
        return await asyncio.wait_for(self.proc.wait(), WAIT_S)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


def raw_inline_params(uri: str = URI) -> dict:
    return {"textDocument": {"uri": uri}, "position": {"line": 1, "character": 4}, "context": {"triggerKind": 1}}


def test_cursor_context_and_multiline_choice():
    offset = DOC.index("\n    return")
    prefix, suffix = cursor_context(DOC, offset, prefix_lines=256, suffix_lines=64)
    assert prefix + suffix == DOC and prefix.endswith("    ")
    assert cursor_context("a\nb\nc\nd", 5, prefix_lines=1, suffix_lines=0) == ("b\nc", "")
    assert wants_multiline("auto", "\n    return") and not wants_multiline("auto", ")\n")
    assert wants_multiline("always", ")") and not wants_multiline("never", "\n")


def test_lines_break_only_where_lsp_says():
    """LSP's line breaks are \\n, \\r\\n and \\r: a form feed or U+2028 is text (pygls's splitlines broke
    there, so positions and incremental edits landed on the wrong line)."""
    source = "import os\n\x0c\ndef f():\n    return 1\u2028x\r\ny\rz"
    doc = LspTextDocument("file:///t.py", source)
    assert doc.lines == ("import os\n", "\x0c\n", "def f():\n", "    return 1\u2028x\r\n", "y\r", "z")
    assert source[doc.offset_at_position(types.Position(3, 4)):].startswith("return 1")
    doc.apply_change(types.TextDocumentContentChangePartial(
        range=types.Range(types.Position(3, 4), types.Position(3, 4)), text="x"))
    assert doc.lines[3] == "    xreturn 1\u2028x\r\n"
    assert cursor_context("a\rb\r\nc\nd", 6, prefix_lines=1, suffix_lines=0) == ("b\r\nc", "")  # CR and CRLF too
    assert wants_multiline("auto", "\r    return") and not wants_multiline("auto", "x\ry")


@pytest.mark.parametrize("source, start, end, text, edited", [
    ("abc", (0, 5), (0, 5), "X", "abcX"),  # past the line's end: its end (pygls put it one before)
    ("abc\r\ndef", (0, 4), (0, 4), "X", "abcX\r\ndef"),  # never inside the line break
    ("abc\rdef", (0, 4), (0, 4), "X", "abcX\rdef"),
    ("abc\ndef", (0, 3), (1, 9), "", "abc"),
    ("abc\n", (7, 0), (9, 9), "Z", "abc\nZ"),  # lines past the end: the document's end
])
def test_edits_clamp_positions_as_lsp_says(source, start, end, text, edited):
    doc = LspTextDocument("file:///t.py", source)
    doc.apply_change(types.TextDocumentContentChangePartial(range=types.Range(types.Position(*start), types.Position(*end)), text=text))
    assert doc.source == edited


def _reference_edit(source: str, start: types.Position, end: types.Position, text: str) -> str:
    """An edit applied as LSP 3.17 defines it, over the whole document (UTF-16 positions clamped to the line
    and document ends; one inside a surrogate pair taken to the character's end, as pygls's position codec
    takes it): what LspTextDocument's splice must equal."""
    lines = _LSP_LINE.findall(source)

    def offset(position: types.Position) -> int:
        if position.line >= len(lines):
            return len(source)
        line = lines[position.line].rstrip("\r\n")
        units, chars = 0, 0
        while chars < len(line) and units < position.character:
            units += len(line[chars].encode("utf-16-le")) // 2
            chars += 1
        return sum(map(len, lines[:position.line])) + chars

    begin, finish = sorted((offset(start), offset(end)))
    return source[:begin] + text + source[finish:]


def test_edits_splice_the_document_as_a_whole_document_edit_would():
    """Edits are spliced into the source and only the touched lines re-split (whole-document work per
    keystroke took 0.4 s on a 30 MB file). 3,000 seeded random edits over CR, LF, CRLF, form feeds and
    astral characters, "\r" + "\n" joins included, end with the same text and lines as the reference."""
    rng = random.Random(20261203)
    pieces = ["a", "b", "\r", "\n", "\r\n", "\x0c", "\U0001F600", "€", ""]
    for _ in range(300):
        source = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))
        doc = LspTextDocument("file:///t.py", source)
        for _ in range(10):
            start, end = (types.Position(rng.randrange(0, 6), rng.randrange(0, 6)) for _ in range(2))
            if (end.line, end.character) < (start.line, start.character):
                start, end = end, start
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 4)))
            expected = _reference_edit(doc.source, start, end, text)
            doc.apply_change(types.TextDocumentContentChangePartial(range=types.Range(start, end), text=text))
            assert doc.source == expected
            assert doc.lines == tuple(_LSP_LINE.findall(expected)), repr(expected)


def test_cursor_context_reads_lines_as_a_whole_document_split_would():
    """cursor_context reads a window around the cursor; it must cut where splitting the whole document at
    LSP's line breaks cuts, a window edge inside "\r\n" and a window that must grow included."""
    rng = random.Random(3)
    for _ in range(400):
        source = "".join(rng.choice(["x" * 1500, "y", "\r", "\n", "\r\n"]) for _ in range(rng.randrange(0, 30)))
        offset, above, below = rng.randrange(0, len(source) + 1), rng.randrange(0, 5), rng.randrange(0, 5)
        before, after = source[:offset], source[offset:]
        starts = [m.end() for m in LINE_BREAK.finditer(before)]
        ends = [m.start() for m in LINE_BREAK.finditer(after)]
        expected = (before[starts[-(above + 1)] if len(starts) > above else 0:],
                    after[:ends[below] if len(ends) > below else len(after)])
        assert cursor_context(source, offset, above, below) == expected


def test_position_at_offset_is_the_normalized_cursor():
    doc = LspTextDocument("file:///t.py", "a\U0001F600b\nxy")  # UTF-16: the emoji is 2 units
    assert position_at_offset(doc, 2) == types.Position(0, 3)  # after the emoji
    assert position_at_offset(doc, 4) == types.Position(1, 0)
    assert position_at_offset(doc, 6) == types.Position(1, 2)  # end of a document without a final newline
    assert position_at_offset(LspTextDocument("file:///t.py", "ab\n"), 3) == types.Position(1, 0)
    assert position_at_offset(LspTextDocument("file:///t.py", ""), 0) == types.Position(0, 0)


def test_a_selected_item_is_applied_only_with_the_cursor_inside_its_range():
    """with_selected_item answers over the selected item's range only when the cursor lies within it
    (its ends included): a cursor before or after the range gets None, as no completion over that range
    continues the text at the cursor."""
    doc = LspTextDocument("file:///t.py", "abcdef")

    def selected(start: int, end: int, text: str) -> types.SelectedCompletionInfo:
        return types.SelectedCompletionInfo(range=types.Range(types.Position(0, start), types.Position(0, end)), text=text)

    assert with_selected_item(doc, selected(0, 2, "ab"), 4) is None  # after the range
    assert with_selected_item(doc, selected(2, 4, "cd"), 1) is None  # before it
    for cursor in (0, 1, 2):
        assert with_selected_item(doc, selected(0, 2, "abX"), cursor) == (
            "abXcdef", 3, types.Range(types.Position(0, 0), types.Position(0, 2)))


@pytest.mark.parametrize("options, field", [
    ({"prefix_lines": "x"}, "prefix_lines"), ({"prefix_lines": -1}, "prefix_lines"), ({"params": "x"}, "params"),
    ({"url": "http://h/v1/editor"}, "url"), ({"max_time_ms": 0}, "max_time_ms"), ({"multiline": "yes"}, "multiline"),
    ({"url": "ws://h:port/x"}, "url"), ({"url": "ws://[::1"}, "url"), ({"max_tokens": 300}, "max_tokens"),
    ({"maxTokens": 8}, "maxTokens"),  # not an option (camelCase): named, not ignored
    # The `complete` params the server would refuse on every completion (-32603 each time): at initialize
    ({"params": {"mode": "bogus"}}, "params.mode"), ({"params": {"temperature": 5}}, "params.temperature"),
    ({"params": {"stop": [""]}}, "params.stop"),
    ({"params": {"modee": "ar"}}, "params.modee"), ({"params": {"prefix": "x"}}, "params.prefix"),  # typos named
])
def test_initialization_options_are_checked_and_a_bad_one_changes_nothing(options, field):
    config = BridgeConfig()
    with pytest.raises(BridgeConfigError) as err:
        config.update({"max_tokens": 8, **options})
    assert err.value.field == field and config == BridgeConfig()
    config.update({"max_tokens": 8, "prefix_lines": None})
    assert config.max_tokens == 8 and config.prefix_lines == 256


@pytest.mark.parametrize("options", [{}, {"max_time_ms": 5000}, {"params": {"max_time_ms": 30000}},
                                     {"max_time_ms": 5000, "params": {"max_time_ms": 30000}}])
def test_the_stall_timeout_follows_the_max_time_ms_a_completion_is_sent_with(options):
    """params.max_time_ms overrides max_time_ms in the request, but the stall timer read max_time_ms
    alone: a 30 s budget was cut as "stalled" after 12 s (helper-142)."""
    config = BridgeConfig()
    config.update(options)
    sent = complete_params(config, "file:///a.py", None, "python", "x", "")["max_time_ms"]
    assert answer_timeout_s(config) == sent / 1000 + 10


async def test_bad_initialization_options_fail_initialize_naming_the_option(scripted_backend):
    url, _ = scripted_backend
    with pytest.raises(Exception, match="initializationOptions.prefix_lines must be an integer >= 0"):
        await start_lsp(url, {"prefix_lines": "x"})
    with pytest.raises(Exception, match="initializationOptions.params.mode must be one of auto"):
        await start_lsp(url, {"params": {"mode": "bogus"}})
    with pytest.raises(Exception, match="initializationOptions must be an object of options, got str"):
        await start_lsp(url, "x")


async def test_requests_after_a_failed_initialize_answer_server_not_initialized(scripted_backend):
    """LSP 3.17: until initialize succeeds, requests answer -32002; a completion after a refused
    initialize was served with the default settings the client had tried to change."""
    from pygls.exceptions import JsonRpcException

    url, fake = scripted_backend
    client = await spawn_bridge(url)
    try:
        with pytest.raises(Exception, match="max_tokens"):
            await initialize(client, {"max_tokens": "lots"})
        open_document(client)
        n = len(fake.requests)
        with pytest.raises(JsonRpcException, match="not initialized") as err:
            await asyncio.wait_for(client.text_document_inline_completion_async(inline_params()), WAIT_S)
        assert err.value.code == -32002 and len(fake.requests) == n
        with pytest.raises(JsonRpcException, match="not initialized") as err:
            await asyncio.wait_for(client.shutdown_async(None), WAIT_S)
        assert err.value.code == -32002
        await initialize(client, {"max_tokens": 8})
        open_document(client)
        result = await asyncio.wait_for(client.text_document_inline_completion_async(inline_params()), WAIT_S)
        assert fake.requests[-1].max_tokens == 8 and result.items
    finally:
        await stop_lsp(client)


async def test_form_feed_document_edit_and_completion_on_the_right_line(scripted_backend):
    """End to end through the bridge: a document with a form feed, an incremental edit, a completion:
    the prompt the engine gets is the edited document cut at the cursor."""
    url, fake = scripted_backend
    client = await spawn_bridge(url)
    try:
        await initialize(client)
        client.initialized(types.InitializedParams())
        uri = "file:///tmp/my%20project/ff.py"  # escaped, as VS Code sends paths with spaces or drive colons
        open_document(client, uri, "import os\n\x0c\ndef f():\n    return 1\n")
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(types.Position(3, 4), types.Position(3, 4)), text="y = 2\n    ")]))
        n = len(fake.requests)
        result = await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(4, 4, uri)), WAIT_S)
    finally:
        await stop_lsp(client)
    assert all(item.range.start == types.Position(4, 4) for item in result.items)
    req = fake.requests[n]
    assert fake.tokenizer.decode(req.prompt_ids).endswith("import os\n\x0c\ndef f():\n    y = 2\n")  # indent healed
    assert fake.tokenizer.decode(req.suffix_ids).startswith("return 1\n")


async def test_initialization_options_reach_the_backend(scripted_backend):
    url, fake = scripted_backend
    client = await start_lsp(url, {"multiline": "never", "params": {"mode": "ar", "temperature": 0.5}})
    try:
        await asyncio.wait_for(client.text_document_inline_completion_async(inline_params()), WAIT_S)
    finally:
        await stop_lsp(client)
    req = fake.requests[-1]
    assert req.params["temperature"] == 0.5 and req.mode.value == "ar" and req.params["gen_length"] == 16


async def test_inline_completion_round_trip(scripted_backend):
    url, fake = scripted_backend
    result = await lsp_round_trip(url)
    [item] = result.items
    assert item.insert_text == "result = 3.14 * r * r"  # the suffix repeat was trimmed
    assert item.range.start == types.Position(line=1, character=4)
    req = fake.requests[-1]
    assert fake.tokenizer.decode(req.prompt_ids).endswith("def area(r):\n")  # indentation healed
    assert fake.tokenizer.decode(req.suffix_ids) == "\n    return result\n"


async def test_cancel_request_cancels_the_backend_completion(scripted_backend, wait_until):
    url, fake = scripted_backend
    n_before = len(fake.requests)

    def started() -> set[str]:
        return {r.request_id for r in fake.requests[n_before:]}

    fake.hold = threading.Event()  # the completion stays in flight until the cancel ends it
    try:
        error = await lsp_cancel(
            url,
            in_flight=lambda: wait_until(lambda: bool(started()), "the completion to reach the backend"),
            ended=lambda: wait_until(lambda: started() <= set(fake.cancelled), "the backend to cancel it"),
        )
    finally:
        fake.hold.set()  # the fixture is shared: leave no request held
        fake.hold = None
    assert error is not None and "cancel" in str(error).lower()
    assert started() and started() <= set(fake.cancelled)
    assert not started() & set(fake.completed)


async def test_an_answer_for_a_document_changed_meanwhile_is_not_given(scripted_backend, wait_until):
    """The document changed while the backend answered: the item's range, read before, pointed into
    text the answer was not made for (an editor that keeps late answers inserted it there,
    helper-218). No item then; the next request, on the new text, gets one. An edit that changes no
    text (a new version, an empty insert) keeps the answer (helper-219)."""
    url, fake = scripted_backend
    client = await start_lsp(url)

    async def answer_around(edit: str, version: int, line: int = 1) -> types.InlineCompletionList:
        n_before = len(fake.requests)
        fake.hold = threading.Event()  # the completion stays in flight until the edit is in
        future = asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(line=line)))
        await wait_until(lambda: len(fake.requests) > n_before, "the completion to reach the backend")
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=version),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(start=types.Position(line=0, character=0), end=types.Position(line=0, character=0)),
                text=edit)]))
        # the bridge reads its messages in order and applies an edit as it reads it: once a later request
        # is answered (an error: no such document), the edit is in, before the answer is let go
        with pytest.raises(Exception, match="is not open"):
            await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(
                uri="file:///tmp/not-open.py")), WAIT_S)
        fake.hold.set()
        return await asyncio.wait_for(future, WAIT_S)

    try:
        unchanged = await answer_around("", 2)
        stale = await answer_around("import math\n", 3)
        fake.hold = None
        fresh = await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(line=2)), WAIT_S)
    finally:
        if fake.hold is not None:
            fake.hold.set()  # the fixture is shared: leave no request held
        fake.hold = None
        await stop_lsp(client)
    [kept] = unchanged.items
    assert kept.insert_text == "result = 3.14 * r * r" and kept.range.start == types.Position(line=1, character=4)
    assert list(stale.items) == []
    [item] = fresh.items
    assert item.insert_text == "result = 3.14 * r * r" and item.range.start == types.Position(line=2, character=4)


async def test_completions_past_the_servers_max_inflight_wait_for_a_turn(scripted_backend, wait_until):
    """Every document shares the bridge's one connection: the 9th to 12th of twelve concurrent completions
    were refused by the server (-32003) and reached the editor as InternalError."""
    url, fake = scripted_backend
    n_before = len(fake.requests)

    def completions_started() -> set[str]:  # engine ids are <completion id>-g<gap>
        return {r.request_id.rsplit("-g", 1)[0] for r in fake.requests[n_before:]}

    client = await start_lsp(url)
    fake.hold = threading.Event()
    try:
        uris = [f"file:///tmp/doc{i}.py" for i in range(12)]
        for uri in uris:
            open_document(client, uri)
        answers = [asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(uri=uri)))
                   for uri in uris]
        await wait_until(lambda: len(completions_started()) == 8, "eight completions to reach the backend")
        done = [(i, a.exception() or a.result()) for i, a in enumerate(answers) if a.done()]
        assert not done, done  # the other four wait in the bridge
        fake.hold.set()
        results = await asyncio.wait_for(asyncio.gather(*answers), WAIT_S)
        assert all(result.items for result in results) and len(completions_started()) == 12
    finally:
        fake.hold.set()  # the fixture is shared: leave no request held
        fake.hold = None
        await stop_lsp(client)


async def test_unopened_document_and_cursor_past_the_line_end(scripted_backend):
    """A completion for a document the client never opened is InvalidParams naming the fix (pygls would
    read the URI from disk: an internal error with a traceback); a negative position is InvalidParams too
    (pygls alone answered nothing: the client waited forever); a cursor past its line's end is the
    line's end (LSP's Position rule), so the newline stays in the suffix."""
    url, fake = scripted_backend
    client = await start_lsp(url)
    try:
        unopened = inline_params()
        unopened.text_document = types.TextDocumentIdentifier(uri="file:///tmp/never-opened.py")
        with pytest.raises(Exception, match="is not open: send textDocument/didOpen first") as err:
            await asyncio.wait_for(client.text_document_inline_completion_async(unopened), WAIT_S)
        assert "Traceback" not in str(err.value)
        negative = inline_params()
        object.__setattr__(negative.position, "line", -1)  # lsprotocol validates on construction only
        with pytest.raises(Exception, match=r"params\.position: Position\.line should be in range"):  # answered
            await asyncio.wait_for(client.text_document_inline_completion_async(negative), WAIT_S)
        n = len(fake.requests)
        past_end = await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(0, 13)), WAIT_S)
    finally:
        await stop_lsp(client)
    assert past_end.items and all(item.range.start == types.Position(0, 12) for item in past_end.items)
    reqs = fake.requests[n:]  # one per gap candidate, all over the same text
    assert reqs and all(fake.tokenizer.decode(r.prompt_ids).endswith("def area(r):") for r in reqs)  # char 13 of 12
    assert all(fake.tokenizer.decode(r.suffix_ids).startswith("\n    \n") for r in reqs), [
        fake.tokenizer.decode(r.suffix_ids) for r in reqs]


async def test_unreachable_backend_is_an_lsp_error_not_an_empty_answer():
    with refused_port() as port, pytest.raises(Exception, match="unreachable"):
        await lsp_round_trip(f"ws://127.0.0.1:{port}/v1/editor")


async def test_an_answered_error_is_one_line_in_the_log_not_a_traceback(tmp_path):
    """The server's stderr is the editor's LSP log: pygls wrote a full traceback there for each error the
    bridge answers on purpose (a backend that is down; a break-test's finding)."""
    with refused_port() as port:
        lsp = await RawLsp.start(f"ws://127.0.0.1:{port}/v1/editor", tmp_path)
        try:
            assert "capabilities" in (await lsp.request(1, "initialize", {"capabilities": {}}))["result"]
            lsp.notify("initialized", {})
            lsp.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                                 "text": DOC}})
            answer = await lsp.request(2, "textDocument/inlineCompletion", raw_inline_params())
            assert answer["error"]["code"] == -32603 and "unreachable" in answer["error"]["message"]
            assert await lsp.request(3, "shutdown") == {"jsonrpc": "2.0", "id": 3, "result": None}
            lsp.notify("exit")
            assert await lsp.exit_code() == 0
        finally:
            await lsp.close()
    log = lsp.stderr()
    assert "Traceback" not in log and "answered JsonRpcInternalError (-32603): refusion backend unreachable" in log, log


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://127.0.0.1:8000/v1/editor"], "--url must be a WebSocket URL"),
    (["--max-tokens", "0"], "--max-tokens must be an integer in 1..256"),
    (["--url", "ws://"], "--url must be a WebSocket URL"),
    (["--suffix-lines", "-1"], "--suffix-lines must be an integer >= 0"),
    (["--log-file", "/nonexistent/dir/x.log"], "--log-file /nonexistent/dir/x.log: No such file or directory"),
    (["--api-key", ""], "--api-key is empty; give the key the server requires"),  # was taken: no key was sent
    (["--api-key= "], "--api-key is empty; give the key the server requires"),
])
def test_cli_rejects_bad_arguments_with_a_clear_message(argv, message, capsys):
    from integrations.cli import main

    assert main(["lsp", *argv]) == 2  # as argparse's own errors
    err = capsys.readouterr().err
    assert err.startswith(f"refusion lsp: error: {message}") and err.count("\n") == 1, err


def test_cli_api_key_falls_back_to_a_stripped_env_key_and_reads_a_blank_one_as_none():
    """Without --api-key the bridge sends env REFUSION_API_KEY, read as the server reads it
    (auth.keys_from_env): stripped, and a blank one is no key rather than an error."""
    from integrations.cli_lsp import api_key

    assert api_key(None, {"REFUSION_API_KEY": " k1 "}) == "k1"
    assert api_key(None, {"REFUSION_API_KEY": "  "}) is None and api_key(None, {}) is None
    assert api_key("k2", {"REFUSION_API_KEY": "k1"}) == "k2"  # the flag wins


async def test_backend_forgets_a_request_whose_send_failed_or_whose_caller_left():
    """EditorBackend._pending holds only requests still waiting for an answer: a send that fails (the
    connection broke) or a caller cancelled mid-wait leaves no entry behind (they were kept until the
    connection closed, or forever on a connection that stayed up)."""
    from integrations.lsp.backend import EditorBackend

    class Socket:
        def __init__(self, fail: bool):
            self.fail, self.sent = fail, []

        async def send(self, frame: bytes) -> None:
            if self.fail:
                raise ConnectionError("the connection broke")
            self.sent.append(frame)

    backend = EditorBackend("ws://127.0.0.1:1/v1/editor")
    with pytest.raises(ConnectionError):
        await backend._call_on(Socket(fail=True), "initialize", {})
    assert backend._pending == {}
    up = Socket(fail=False)
    waiting = asyncio.ensure_future(backend._call_on(up, "initialize", {}))
    while not up.sent:  # sent; now waiting for an answer that never comes
        await asyncio.sleep(0)
    assert len(backend._pending) == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert backend._pending == {}


async def test_a_backend_that_never_answers_times_out_and_the_completion_is_cancelled(wait_until):
    """A server that keeps the connection open and never answers held an LSP request for as long as the
    socket lived (50 s, helper-125). With answer_timeout_s a completion fails with TimeoutError and is
    cancelled at the server; an unanswered `initialize` drops the connection, so the next call connects
    again.

    The short timeout bounds only the call the server never answers: each answered `initialize` is made
    under a generous one, so a slow start on a loaded machine cannot fail the wrong call."""
    import msgpack
    import websockets

    from integrations.lsp.backend import EditorBackend

    received, answer_initialize = [], [True]

    async def silent(ws):  # answers `initialize` (while told to), never a completion
        async for frame in ws:
            _, msg_id, method, params = msgpack.unpackb(frame)
            received.append((method, params))
            if method == "initialize" and answer_initialize[0]:
                await ws.send(msgpack.packb([1, msg_id, None, {"limits": {"max_inflight": 8}}]))

    async with websockets.serve(silent, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/editor"
        backend = EditorBackend(url, connect_timeout_s=WAIT_S, answer_timeout_s=WAIT_S)
        assert (await backend.limits()).max_inflight == 8  # connected and initialized
        backend.answer_timeout_s = 0.3  # the completion is never answered: it times out however slow the machine
        with pytest.raises(asyncio.TimeoutError, match="no answer to complete"):
            await asyncio.wait_for(backend.complete({"uri": "u", "prefix": "x", "suffix": ""}), WAIT_S)
        # the cancel is sent (shielded) as the call fails; it follows the completion on the connection
        await wait_until(lambda: any(method == "cancel" for method, _ in received), "the cancel to arrive")
        assert [method for method, _ in received] == ["initialize", "complete", "cancel"]
        assert backend._pending == {} and received[1][1]["uri"] == "u"
        await backend.close()
        answer_initialize[0] = False
        mute = EditorBackend(url, connect_timeout_s=WAIT_S, answer_timeout_s=0.3)  # `initialize` never answered
        with pytest.raises(asyncio.TimeoutError, match="no answer to initialize"):
            await asyncio.wait_for(mute.limits(), WAIT_S)
        assert mute._ws is None  # dropped: the next call connects again
        answer_initialize[0] = True
        mute.answer_timeout_s = WAIT_S  # this `initialize` is answered: only a stall may fail it
        assert (await asyncio.wait_for(mute.limits(), WAIT_S)).max_inflight == 8
        await mute.close()


async def test_closing_a_connection_to_a_stalled_server_is_quick():
    """The LSP `shutdown` handler closes the backend: a server that no longer reads (stalled, stopped)
    never answers the closing handshake, and websockets' default 10 s close timeout held the `shutdown`
    answer that long (helper-142), past the ~2 s editors wait before killing a language server."""
    import msgpack
    import websockets

    from integrations.lsp.backend import CLOSE_TIMEOUT_S, EditorBackend

    async def stalls(ws):  # answers `initialize`, then reads nothing more: the close frame goes unread
        _, msg_id, _, _ = msgpack.unpackb(await ws.recv())
        await ws.send(msgpack.packb([1, msg_id, None, {"limits": {"max_inflight": 8}}]))
        ws.transport.pause_reading()
        await ws.wait_closed()  # (the client gives up on the handshake and drops the connection)

    async with websockets.serve(stalls, "127.0.0.1", 0, close_timeout=0.1) as server:
        backend = EditorBackend(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/editor")
        assert (await asyncio.wait_for(backend.limits(), WAIT_S)).max_inflight == 8
        await asyncio.wait_for(backend.close(), CLOSE_TIMEOUT_S + 7)  # (it took 10 s, websockets' default)


class _SentFrames:
    """A backend socket that keeps what is sent on it (the backend's frames) and answers nothing."""

    def __init__(self):
        self.sent = []

    async def send(self, frame: bytes) -> None:
        self.sent.append(frame)


async def test_an_unreadable_frame_error_fails_only_the_oversized_request():
    """The server answers a frame over its max_frame_bytes with an error of id nil. Every waiting request
    failed with it, so one document's oversized request also failed another document's completion; now
    only requests whose frames were over the announced limit fail (all of them when none was)."""
    from integrations.editor import protocol as rpc
    from integrations.lsp.backend import BackendError, EditorBackend

    backend, up = EditorBackend("ws://127.0.0.1:1/v1/editor"), _SentFrames()
    backend.server_info = {"limits": {"max_frame_bytes": 1000}}
    small = asyncio.ensure_future(backend._call_on(up, "complete", {"prefix": "def f("}, msg_id=1))
    big = asyncio.ensure_future(backend._call_on(up, "complete", {"prefix": "x" * 2000}, msg_id=2))
    while len(up.sent) < 2:
        await asyncio.sleep(0)
    unreadable = [rpc.RESPONSE, None, {"code": -32600, "message": "frame over 1000 bytes"}, None]
    backend._answer_unreadable_frame(unreadable)
    with pytest.raises(BackendError, match="frame over 1000 bytes"):
        await big
    assert not small.done() and list(backend._pending) == [1]
    backend._pending[1].set_result([rpc.RESPONSE, 1, None, {"text": "x)"}])
    assert await small == {"text": "x)"}
    unknown = asyncio.ensure_future(backend._call_on(up, "complete", {"prefix": "y"}, msg_id=3))
    while len(up.sent) < 3:
        await asyncio.sleep(0)
    backend._answer_unreadable_frame(unreadable)  # no frame was over the limit: whichever it was, it fails
    with pytest.raises(BackendError):
        await unknown
    assert backend._pending == {} and backend._frame_bytes == {}


async def test_a_frame_exactly_at_the_limit_is_not_taken_for_the_oversized_one():
    """The server refuses only frames larger than its max_frame_bytes (protocol.decode_frame): an
    unreadable-frame error fails the waiting request one byte over the limit, and leaves the one
    exactly at it waiting for its own answer."""
    from integrations.editor import protocol as rpc
    from integrations.lsp.backend import BackendError, EditorBackend

    backend, up = EditorBackend("ws://127.0.0.1:1/v1/editor"), _SentFrames()
    limit = len(rpc.encode_request(1, "complete", {"prefix": "x" * 500}))
    backend.server_info = {"limits": {"max_frame_bytes": limit}}
    at = asyncio.ensure_future(backend._call_on(up, "complete", {"prefix": "x" * 500}, msg_id=1))
    over = asyncio.ensure_future(backend._call_on(up, "complete", {"prefix": "x" * 501}, msg_id=2))
    while len(up.sent) < 2:
        await asyncio.sleep(0)
    assert [len(frame) for frame in up.sent] == [limit, limit + 1]
    backend._answer_unreadable_frame([rpc.RESPONSE, None, {"code": -32600, "message": "frame too large"}, None])
    with pytest.raises(BackendError, match="frame too large"):
        await over
    assert not at.done() and list(backend._pending) == [1]
    backend._pending[1].set_result([rpc.RESPONSE, 1, None, {"text": "y"}])
    assert await at == {"text": "y"}


LONG = "a" * 300_000


@pytest.mark.parametrize("text, prompt_end, suffix_start", [
    # a 300,000-character line on each side: over the server's max_text_chars (200,000), whole lines or not
    (f"s = '{LONG}'\ndef area(r):\n    \nt = '{LONG}'\n", "a'\ndef area(r):\n", "\nt = 'aaaa"),
    # under max_text_chars, but at 3 bytes a character over the server's 1 MiB frame
    ("€" * 190_000 + "\ndef area(r):\n    \n" + "€" * 190_000, "€€\ndef area(r):\n", "\n€€€€"),
], ids=["over-max-text-chars", "over-max-frame-bytes"])  # short ids: pytest puts the id in the bridge's environment
async def test_long_lines_are_cut_to_the_server_limits(scripted_backend, text, prompt_end, suffix_start):
    """The bridge cut by whole lines only: the server answered every completion with an error (too many
    characters), or with an error its id could not be read for (too many bytes), which left it waiting."""
    url, fake = scripted_backend
    client = await start_lsp(url)
    try:
        uri = "file:///tmp/long.py"
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        n = len(fake.requests)
        result = await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(2, 4, uri)), WAIT_S)
    finally:
        await stop_lsp(client)
    assert result.items and result.items[0].insert_text.startswith("result = 3.14 * r * r")
    reqs = fake.requests[n:]  # one per candidate gap
    assert reqs and all(fake.tokenizer.decode(r.prompt_ids).endswith(prompt_end) for r in reqs)
    assert all(fake.tokenizer.decode(r.suffix_ids).startswith(suffix_start) for r in reqs)


async def test_an_error_the_server_cannot_tie_to_a_request_fails_the_waiting_completion(scripted_backend):
    """Extra `complete` params (here context chunks) can still make a frame over the server's 1 MiB: it
    answers with id nil, which the backend client dropped, so the LSP request was never answered."""
    url, _ = scripted_backend
    context = [{"path": f"lib{i}.py", "text": "x" * 40_000} for i in range(32)]  # 1.3 MB, each chunk allowed
    client = await start_lsp(url, {"params": {"context": context}})
    try:
        with pytest.raises(Exception, match="the limit is 1048576"):
            await asyncio.wait_for(client.text_document_inline_completion_async(inline_params()), WAIT_S)
    finally:
        await stop_lsp(client)


async def test_malformed_messages_and_the_lifecycle_get_the_answers_the_specs_give(scripted_backend, tmp_path):
    """JSON-RPC 2.0 (5.1: parse error and invalid request, with id null) and LSP 3.17's lifecycle, where
    pygls answered with window/showMessage popups, a traceback, or nothing."""
    url, _ = scripted_backend
    lsp = await RawLsp.start(url, tmp_path)
    try:
        early = await lsp.request(1, "textDocument/inlineCompletion", raw_inline_params())
        assert early["id"] == 1 and early["error"]["code"] == -32002  # ServerNotInitialized
        lsp.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                             "text": DOC}})  # before initialize: dropped
        assert "capabilities" in (await lsp.request(2, "initialize", {"capabilities": {}}))["result"]
        lsp.notify("initialized", {})
        request_with_object_id = {"jsonrpc": "2.0", "id": {"a": 1}, "method": "textDocument/inlineCompletion",
                                  "params": raw_inline_params()}
        for message, code in [(b"{not json", -32700), (b"[1, 2]", -32600), (b"3", -32600), (b"null", -32600),
                              ({"jsonrpc": "2.0"}, -32600), (request_with_object_id, -32600)]:
            lsp.send(message)
            answer = await lsp.receive()
            assert answer["id"] is None and answer["error"]["code"] == code, (message, answer)
            assert "data" not in answer["error"], answer  # no traceback
        # Ignored and logged; a popup (window/showMessage) would come before the next answer.
        lsp.notify("textDocument/didChange", {"textDocument": {"uri": "file:///never-opened.py", "version": 2},
                                              "contentChanges": [{"text": "x"}]})
        lsp.notify("$/cancelRequest", {})
        lsp.notify("$/cancelRequest", {"id": [1]})  # unhashable ids: pygls's own handling ended the bridge
        lsp.notify("$/cancelRequest", {"id": {"a": 1}})
        lsp.send({"jsonrpc": "2.0", "id": [1], "result": None})  # a response to no request of ours
        lsp.send({"jsonrpc": "2.0", "id": {"a": 1}, "error": {"code": -1, "message": "x"}})
        for msg_id, method in ((20, "$/cancelRequest"), (21, "textDocument/didClose"), (22, "initialized")):
            answer = await lsp.request(msg_id, method, {"id": 1} if method == "$/cancelRequest" else {})
            assert answer["id"] == msg_id and answer["error"]["code"] == -32600, answer  # (no answer came)
            assert "is a notification: send it without an id" in answer["error"]["message"]
        for params in ({}, None):  # JSON-RPC's params are optional: without them it was -32602 and a traceback
            message = {"jsonrpc": "2.0", "id": 30, "method": "foo/bar", **({} if params is None else {"params": params})}
            lsp.send(message)
            unknown = await lsp.receive()
            assert unknown["id"] == 30 and unknown["error"]["code"] == -32601, (message, unknown)  # MethodNotFound
        again = await lsp.request(7, "initialize", {"capabilities": {}})
        assert again["error"]["code"] == -32600 and "only be sent once" in again["error"]["message"]
        no_context = {key: value for key, value in raw_inline_params().items() if key != "context"}
        malformed = await lsp.request(3, "textDocument/inlineCompletion", no_context)
        assert malformed == {"jsonrpc": "2.0", "id": 3, "error": {
            "code": -32602, "message": "textDocument/inlineCompletion: params.context: required field missing"}}
        unopened = await lsp.request(4, "textDocument/inlineCompletion", raw_inline_params())
        assert "is not open" in unopened["error"]["message"]  # the didOpen before initialize was dropped
        assert await lsp.request(5, "shutdown") == {"jsonrpc": "2.0", "id": 5, "result": None}
        late = await lsp.request(6, "textDocument/inlineCompletion", raw_inline_params())
        assert late["id"] == 6 and late["error"]["code"] == -32600  # InvalidRequest after shutdown
        lsp.notify("exit")
        assert await lsp.exit_code() == 0
    finally:
        await lsp.close()


async def test_a_lone_surrogate_in_the_document_is_sent_as_a_replacement_character(scripted_backend, tmp_path):
    """JSON carries "\\ud800", UTF-8 cannot: the bridge failed every completion of such a document with
    -32603. It is sent as U+FFFD, as an editor's UTF-8 encoder (WHATWG TextEncoder) writes it."""
    url, fake = scripted_backend
    lsp = await RawLsp.start(url, tmp_path)
    try:
        assert "capabilities" in (await lsp.request(1, "initialize", {"capabilities": {}}))["result"]
        lsp.notify("initialized", {})
        text = "s = '\ud800'\n" + DOC  # json.dumps writes the lone surrogate as an escape
        lsp.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                             "text": text}})
        prompts = await _complete_then_exit(lsp, fake, URI)
        assert prompts and all(p.startswith("s = '\ufffd'\ndef area(r):\n") for p in prompts), prompts
    finally:
        await lsp.close()


async def _complete_then_exit(lsp: RawLsp, fake, uri: str) -> list[str]:
    """Complete line 2, column 4 of `uri` (DOC's indented line after one more line above it), check the
    answer, shut the bridge down; the prompts the backend was sent."""
    n = len(fake.requests)
    params = raw_inline_params(uri) | {"position": {"line": 2, "character": 4}}
    answer = await lsp.request(2, "textDocument/inlineCompletion", params)
    assert answer["result"]["items"][0]["insertText"].startswith("result = 3.14 * r * r"), answer
    prompts = [fake.tokenizer.decode(r.prompt_ids) for r in fake.requests[n:]]
    assert await lsp.request(3, "shutdown") == {"jsonrpc": "2.0", "id": 3, "result": None}
    lsp.notify("exit")
    assert await lsp.exit_code() == 0
    return prompts


async def test_exit_without_shutdown_ends_with_1_and_ctrl_c_with_130(tmp_path):
    """LSP 3.17, "Exit Notification": 0 after shutdown, else 1 (pygls exited 0, and only once the editor
    closed stdin). Ctrl-C kept the bridge running until the editor closed stdin."""
    url = f"ws://127.0.0.1:{free_port()}/v1/editor"  # never connected: neither needs a backend
    lsp = await RawLsp.start(url, tmp_path)
    try:
        lsp.notify("exit")  # allowed before initialize
        assert await lsp.exit_code() == 1
    finally:
        await lsp.close()
    lsp = await RawLsp.start(url, tmp_path)
    try:
        assert "result" in await lsp.request(1, "initialize", {"capabilities": {}})  # serving: past start-up
        lsp.proc.send_signal(signal.SIGINT)
        assert await lsp.exit_code() == 130
    finally:
        await lsp.close()


@pytest.mark.parametrize("frame, message", [
    (b"Content-Lenght: 2\r\n\r\n{}", "without Content-Length"),
    (b"Content-Length: 99999999999\r\n\r\n", "over the 67108864-byte limit"),
    (b"Content-Length 2\r\n\r\n{}", "malformed header line"),
])
async def test_a_broken_header_ends_the_bridge_with_a_message(frame, message, tmp_path):
    """After a header the base protocol does not allow, no message boundary can be trusted (pygls went on
    reading bodies as headers, or allocated what Content-Length said)."""
    lsp = await RawLsp.start(f"ws://127.0.0.1:{free_port()}/v1/editor", tmp_path)
    try:
        lsp.proc.stdin.write(frame)
        assert await lsp.exit_code() == 1
    finally:
        await lsp.close()
    assert lsp.stderr().startswith("refusion lsp: error: ") and message in lsp.stderr(), lsp.stderr()


def test_no_traceback_in_error_data():
    """pygls put the traceback of an unexpected error in a handler into error.data, which editors show."""
    from pygls.exceptions import JsonRpcInternalError

    from integrations.lsp.base_protocol import BridgeServer

    written = []
    protocol = BridgeServer("refusion-lsp", "0").protocol
    protocol.set_writer(type("Writer", (), {"write": lambda self, data: written.append(data)})())
    try:
        {}["missing"]
    except KeyError:
        protocol._send_response(7, error=JsonRpcInternalError.of(sys.exc_info()).to_response_error())
    body = json.loads(written[0].split(b"\r\n\r\n", 1)[1])
    assert body == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32603, "message": "KeyError: 'missing'"}}


async def test_a_completion_in_flight_at_shutdown_is_answered_as_cancelled(scripted_backend, tmp_path, wait_until):
    """`shutdown` closes the backend connection under a completion still in flight: its answer is LSP
    3.17's RequestCancelled (-32800), which clients drop quietly; it was -32603 "backend unreachable",
    an error in the editor's log at every quit with a completion pending (a break-test's finding)."""
    url, fake = scripted_backend
    n_before = len(fake.requests)
    lsp = await RawLsp.start(url, tmp_path)
    fake.hold = threading.Event()  # the completion stays in flight until shutdown ends it
    try:
        assert "capabilities" in (await lsp.request(1, "initialize", {"capabilities": {}}))["result"]
        lsp.notify("initialized", {})
        lsp.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                             "text": DOC}})
        lsp.send({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": raw_inline_params()})
        await wait_until(lambda: len(fake.requests) > n_before, "the completion to reach the backend")
        lsp.send({"jsonrpc": "2.0", "id": 3, "method": "shutdown"})
        answers = {}
        while len(answers) < 2:
            answer = await lsp.receive()
            answers[answer["id"]] = answer
        assert answers[3] == {"jsonrpc": "2.0", "id": 3, "result": None}
        assert answers[2]["error"]["code"] == -32800 and "shutting down" in answers[2]["error"]["message"], answers[2]
        lsp.notify("exit")
        assert await lsp.exit_code() == 0
    finally:
        fake.hold.set()  # the fixture is shared: leave no request held
        fake.hold = None
        await lsp.close()


async def test_a_selected_suggestion_is_extended_over_its_range(scripted_backend):
    """LSP 3.18: with the suggest popup open (selectedCompletionInfo), an inline completion must extend the
    selected item's text and use its range, or the editor does not show it. The bridge completed at the
    cursor, so VS Code dropped every suggestion made while the popup was open."""
    url, fake = scripted_backend
    client = await start_lsp(url)
    try:
        doc = "def area(r):\n    res\n    return result\n"
        uri = "file:///tmp/selected.py"
        open_document(client, uri, doc)
        selected = types.SelectedCompletionInfo(range=types.Range(start=types.Position(1, 4), end=types.Position(1, 7)),
                                                text="result")
        params = types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic,
                                                  selected_completion_info=selected),
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(1, 7))
        n = len(fake.requests)
        result = await asyncio.wait_for(client.text_document_inline_completion_async(params), WAIT_S)
        [item] = result.items
        assert item.range == selected.range  # the item's range, not the cursor's
        assert item.insert_text.startswith("result") and len(item.insert_text) > len("result")
        prompts = [fake.tokenizer.decode(r.prompt_ids) for r in fake.requests[n:]]
        assert prompts and all(p.endswith("def area(r):\n    result") for p in prompts), prompts
        # the cursor outside the selected range: no answer (one widened to the cursor deleted user text)
        n = len(fake.requests)
        outside = types.InlineCompletionParams(context=params.context, text_document=params.text_document,
                                               position=types.Position(1, 2))
        result = await asyncio.wait_for(client.text_document_inline_completion_async(outside), WAIT_S)
        assert not result.items and len(fake.requests) == n
        after = types.InlineCompletionParams(context=params.context, text_document=params.text_document,
                                             position=types.Position(2, 4))  # past the range's end
        result = await asyncio.wait_for(client.text_document_inline_completion_async(after), WAIT_S)
        assert not result.items and len(fake.requests) == n
    finally:
        await stop_lsp(client)


async def test_lone_surrogates_in_the_uri_and_language_and_an_emoji_typed_in_two_edits(scripted_backend, tmp_path):
    """A lone surrogate in a document's URI or languageId failed its completions with a -32603 that showed
    Python's UnicodeEncodeError; an emoji whose two UTF-16 halves came in two edits reached the model as
    two U+FFFD. Now: served, and the emoji is sent whole."""
    url, fake = scripted_backend
    lsp = await RawLsp.start(url, tmp_path)
    try:
        assert "capabilities" in (await lsp.request(1, "initialize", {"capabilities": {}}))["result"]
        lsp.notify("initialized", {})
        uri = "file:///tmp/a\ud800.py"
        lsp.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "py\udc00", "version": 1,
                                                             "text": "s = '\ud83d" + DOC}})
        lsp.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 0, "character": 6}, "end": {"line": 0, "character": 6}}, "text": "\ude00'\n"}]})
        prompts = await _complete_then_exit(lsp, fake, uri)
        assert prompts and all(p.startswith("s = '\U0001F600'\ndef area(r):\n") for p in prompts), prompts
    finally:
        await lsp.close()


async def test_a_change_with_a_lower_version_is_applied_in_order_and_logged(scripted_backend, tmp_path):
    """LSP's versions increase; a didChange whose version is lower than the document's is a client's slip,
    not a late message (one connection delivers in order). The bridge applies it in the order it came, as
    the editor protocol compares no versions (dropped, the edits after it would land on the wrong text),
    and logs a warning once per document, which the old bridge did not."""
    url, fake = scripted_backend
    log = tmp_path / "bridge.log"
    client = LanguageClient("refusion-test", "0")
    await client.start_io(sys.executable, "-m", "integrations.cli", "lsp", "--url", url, "--max-time-ms", "5000",
                          "--log-file", str(log))
    try:
        await initialize(client)
        client.initialized(types.InitializedParams())
        open_document(client)

        def insert(version: int, line: int, text: str) -> None:
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=version),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(line, 4), types.Position(line, 4)), text=text)]))

        insert(5, 1, "a = 1\n    ")  # line 1 becomes "a = 1", the cursor line is 2
        insert(3, 2, "b = 2\n    ")  # lower than 5: still applied
        insert(2, 3, "c = 3\n    ")  # lower again: applied, not logged again
        n = len(fake.requests)
        await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(4, 4)), WAIT_S)
    finally:
        await stop_lsp(client)
    assert fake.tokenizer.decode(fake.requests[n].prompt_ids).endswith(
        "def area(r):\n    a = 1\n    b = 2\n    c = 3\n")  # (the cursor's indent healed)
    said = [line for line in log.read_text().splitlines() if "lower than the document's" in line]
    assert len(said) == 1 and f"didChange for {URI} has version 3, lower than the document's 5" in said[0], said
