"""The LSP bridge over a backend that answers OVERLOADED or ENGINE_UNAVAILABLE (docs/editor-protocol.md,
"Errors and limits"): LSP's RequestFailed with the backend's retry_after_s, and no completion asked of the
backend until that pause is over. The backend is a scripted WebSocket server, so each answer is chosen
and every `complete` that reached it is counted; the bridge is the `refusion lsp` subprocess."""

from __future__ import annotations

from typing import Any, Callable

import msgpack
import pytest
from test_lsp_bridge import DOC, URI, RawLsp, raw_inline_params

from integrations.editor import protocol as rpc

TEXT = "x = 1"


class ScriptedBackend:
    """Answers `initialize`, and each `complete` with the next scripted error (None: a completion; a
    (code, reason) tuple: the connection closed with it instead of an answer; "drop": the connection
    dropped without a close frame; "hold": no answer, the connection kept open); while `close_with` is set ((code, reason)), closes each connection
    with it as it opens (a draining or full server, ingress_gate.py). `on_complete`, when set, is called
    as each `complete` arrives, before its answer (what happens meanwhile at the client). `connections`
    counts the connections opened."""

    def __init__(self):
        self.errors: list[dict | tuple | None] = []
        self.completes = self.connections = 0
        self.close_with: tuple[int, str] | None = None
        self.on_complete: Callable[[], Any] | None = None

    async def serve(self, ws) -> None:
        self.connections += 1
        if self.close_with is not None:
            await ws.close(*self.close_with)
            return
        async for frame in ws:
            _, msg_id, method, _params = msgpack.unpackb(frame)
            if method == "initialize":
                await ws.send(msgpack.packb([rpc.RESPONSE, msg_id, None, {"limits": {"max_inflight": 8}}]))
            elif method == "complete":
                self.completes += 1
                if self.on_complete is not None:
                    self.on_complete()
                error = self.errors.pop(0)
                if error == "drop":  # no close frame: the client sees 1006
                    ws.transport.abort()
                    return
                if error == "hold":
                    continue
                if isinstance(error, tuple):
                    await ws.close(*error)
                    return
                result = None if error else {"text": TEXT, "stop_reason": "stop"}
                await ws.send(msgpack.packb([rpc.RESPONSE, msg_id, error, result]))


def editor_url(server) -> str:
    """The /v1/editor URL of a websockets server listening on a free local port."""
    return f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/editor"


@pytest.fixture
async def bridge(tmp_path):
    """(the scripted backend, an initialized `refusion lsp` with DOC open on it, a request sender)."""
    import websockets

    backend = ScriptedBackend()
    async with websockets.serve(backend.serve, "127.0.0.1", 0) as server:
        lsp = await RawLsp.start(editor_url(server), tmp_path)
        ids = iter(range(1, 1000))
        try:
            assert "capabilities" in (await lsp.request(next(ids), "initialize", {"capabilities": {}}))["result"]
            lsp.notify("initialized", {})
            lsp.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                                 "text": DOC}})

            async def complete(backend_error: dict | None = None, *, reaches_backend: bool = True) -> dict:
                before = backend.completes
                if reaches_backend:
                    backend.errors.append(backend_error)
                answer = await lsp.request(next(ids), "textDocument/inlineCompletion", raw_inline_params())
                assert backend.completes - before == int(reaches_backend), answer
                return answer

            yield backend, lsp, complete
        finally:
            await lsp.close()


def busy(code: int, retry_after_s) -> dict:
    return {"code": code, "message": "engine queue full", "data": {"retry_after_s": retry_after_s}}


@pytest.mark.parametrize("code", [rpc.OVERLOADED, rpc.ENGINE_UNAVAILABLE])
async def test_a_busy_backend_is_request_failed_and_its_retry_after_is_honoured(bridge, code):
    """It was -32603 (InternalError) with retry_after_s dropped, and the next keystroke's completion went
    straight back to the backend that had refused the last one."""
    backend, lsp, complete = bridge
    answer = await complete(busy(code, 0))  # no pause asked: the next completion is sent
    assert answer["error"]["code"] == -32803 and "engine queue full" in answer["error"]["message"], answer
    assert answer["error"]["data"] == {"retry_after_s": 0, "code": code}
    assert (await complete())["result"]["items"][0]["insertText"] == TEXT
    answer = await complete(busy(code, 600))  # a pause past this test: the capped one holds throughout
    assert answer["error"]["code"] == -32803 and answer["error"]["data"] == {"retry_after_s": 60, "code": code}
    assert "no completions asked for 60 s" in answer["error"]["message"]
    for _ in range(2):  # answered at once, with nothing, without the backend
        assert (await complete(reaches_backend=False))["result"] == {"items": []}
    assert "answered JsonRpcRequestFailed (-32803): refusion backend busy" in lsp.stderr()


# (False is a bool, not a number of seconds; NaN is no duration; an infinite pause is the longest, 60 s)
@pytest.mark.parametrize("retry_after_s, paused_s", [("soon", 1), (-1, 1), (None, 1), (False, 1), (float("nan"), 1),
                                                     (float("inf"), 60)])
async def test_a_retry_after_that_is_no_duration_pauses_one_second_and_an_infinite_one_the_cap(bridge, retry_after_s, paused_s):
    _, _, complete = bridge
    answer = await complete(busy(rpc.OVERLOADED, retry_after_s))
    assert answer["error"]["data"] == {"retry_after_s": paused_s, "code": rpc.OVERLOADED}, answer


@pytest.mark.parametrize("data", [None, "retry later"])
async def test_a_busy_error_without_a_data_object_pauses_one_second(bridge, data):
    _, _, complete = bridge
    answer = await complete({"code": rpc.ENGINE_UNAVAILABLE, "message": "engine stopped", "data": data})
    assert answer["error"]["code"] == -32803, answer
    assert answer["error"]["data"] == {"retry_after_s": 1, "code": rpc.ENGINE_UNAVAILABLE}, answer


async def test_other_backend_errors_pause_nothing(bridge):
    _, _, complete = bridge
    answer = await complete({"code": rpc.INVALID_PARAMS, "message": "max_tokens must be 1..256", "data": None})
    assert answer["error"]["code"] == -32603 and "max_tokens must be 1..256" in answer["error"]["message"], answer
    assert (await complete())["result"]["items"][0]["insertText"] == TEXT


async def test_a_pause_starting_while_completions_wait_for_a_turn_keeps_them_from_the_backend(wait_until):
    """A completion waiting for one of the server's max_inflight turns when a pause starts was sent once its
    turn came (helper-235); it is not now, and a shorter pause asked later does not end the longer one."""
    import asyncio

    import websockets

    from integrations.lsp.backend import BackendPaused, EditorBackend

    completes: list[dict] = []
    answer_first = asyncio.Event()

    async def one_turn(ws) -> None:  # max_inflight 1; the first completion is answered when the test says
        async for frame in ws:
            _, msg_id, method, params = msgpack.unpackb(frame)
            if method == "initialize":
                await ws.send(msgpack.packb([rpc.RESPONSE, msg_id, None, {"limits": {"max_inflight": 1}}]))
            elif method == "complete":
                completes.append(params)
                await answer_first.wait()
                await ws.send(msgpack.packb([rpc.RESPONSE, msg_id, None, {"text": TEXT, "stop_reason": "stop"}]))

    async with websockets.serve(one_turn, "127.0.0.1", 0) as server:
        backend = EditorBackend(editor_url(server))
        first = asyncio.ensure_future(backend.complete({"uri": "a", "prefix": "x", "suffix": ""}))
        await wait_until(lambda: len(completes) == 1, "the first completion to reach the backend")
        waiting = asyncio.ensure_future(backend.complete({"uri": "b", "prefix": "y", "suffix": ""}))
        await wait_until(lambda: len(backend._turns._waiters or ()) == 1, "the second to wait for the turn")
        backend.pause(600)
        backend.pause(0)  # (a shorter pause: the longer one stays)
        answer_first.set()
        assert (await asyncio.wait_for(first, 60))["text"] == TEXT  # in flight before the pause: answered
        with pytest.raises(BackendPaused):
            await asyncio.wait_for(waiting, 60)
        with pytest.raises(BackendPaused):
            await backend.complete({"uri": "c", "prefix": "z", "suffix": ""})
        assert [c["uri"] for c in completes] == ["a"]
        await backend.close()


async def test_a_pause_holds_to_its_end_without_reaching_for_the_backend(monkeypatch):
    """While paused, complete() raises BackendPaused before it connects or waits for a turn (an unreachable
    backend here: reaching for it would fail otherwise), to the pause's last moment, however short; then
    completions go out again."""
    import types

    import integrations.lsp.backend as backend_module
    from integrations.lsp.backend import BackendPaused, EditorBackend

    now = [100.0]
    monkeypatch.setattr(backend_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    backend = EditorBackend("ws://127.0.0.1:1/v1/editor")  # (nothing listens on port 1)
    backend.pause(0.5)
    now[0] += 0.499
    with pytest.raises(BackendPaused):
        await backend.complete({"uri": "a", "prefix": "x", "suffix": ""})
    now[0] += 0.002
    with pytest.raises(OSError):  # over: it reaches for the backend
        await backend.complete({"uri": "a", "prefix": "x", "suffix": ""})
    await backend.close()


async def test_a_server_closing_with_try_again_later_is_request_failed_and_pauses(bridge):
    """A draining server, or one holding its most editor connections, closes a new connection with 1013 ("try
    again later"): RequestFailed (-32803) and a pause, as for a busy answer (it was -32603 "unreachable",
    and each keystroke connected again to be refused). The pause itself: the next test, on a frozen clock."""
    backend, _, complete = bridge
    backend.close_with = (1013, "server is shutting down")
    answer = await complete(reaches_backend=False)
    assert answer["error"]["code"] == -32803, answer
    assert answer["error"]["data"] == {"retry_after_s": 1, "close_code": 1013}, answer
    assert "shutting down or restarting (close code 1013: server is shutting down)" in answer["error"]["message"]
    assert backend.connections == 1


@pytest.mark.parametrize("refusal, own_s, data", [(busy(rpc.OVERLOADED, 2), 2, {"code": rpc.OVERLOADED}),
                                                   ((1013, "server is shutting down"), 1, {"close_code": 1013})])
@pytest.mark.parametrize("held_s", [30, 10.5])
async def test_a_refusal_within_a_longer_pause_reports_the_time_left_in_it(monkeypatch, refusal, own_s, data, held_s):
    """A busy answer or a 1013 close that came while a longer pause held (another completion's busy answer
    with a larger retry_after_s, 10 s ago) reported its own retry_after_s (2 s; 1 s for a 1013), though no
    completion was asked for until the longer pause ended: it reports the seconds left in the pause that
    holds, and its own when that ends sooner."""
    import types

    import websockets

    import integrations.lsp.backend as backend_module
    from integrations.lsp.server import JsonRpcRequestFailed

    now = [100.0]
    monkeypatch.setattr(backend_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    scripted = ScriptedBackend()
    scripted.errors = [refusal]
    async with websockets.serve(scripted.serve, "127.0.0.1", 0) as listening:
        backend, complete = in_process_bridge(editor_url(listening))

        def another_completions_busy_answer() -> None:  # a pause of held_s, 10 s of it gone by the refusal
            backend.pause(held_s)
            now[0] += 10

        scripted.on_complete = another_completions_busy_answer
        with pytest.raises(JsonRpcRequestFailed) as failed:
            await complete()
        left = max(own_s, held_s - 10)
        assert failed.value.data == {"retry_after_s": left, **data}
        assert f"no completions asked for {left:g} s" in str(failed.value)
        assert backend.retry_at == now[0] + left
        await backend.close()


def in_process_bridge(url: str):
    """_backend_completion_text over a new EditorBackend at `url`: (backend, complete()), without the
    `refusion lsp` subprocess."""
    import types

    from integrations.lsp.backend import EditorBackend
    from integrations.lsp.bridge_config import BridgeConfig
    from integrations.lsp.server import _backend_completion_text

    server = types.SimpleNamespace(protocol=types.SimpleNamespace(shutdown_received=False))
    doc = types.SimpleNamespace(uri=URI, language_id="python")
    config = BridgeConfig(url=url)
    backend = EditorBackend(config.url)
    return backend, lambda: _backend_completion_text(server, config, backend, doc, 1, "x = ", "")


async def test_a_try_again_later_close_pauses_completions_before_they_connect(monkeypatch):
    """After a 1013 close the bridge has no connection open, and asking for the backend's limits connects:
    the pause is checked where the connection is made, so none within the pause, one after it."""
    import types

    import websockets

    import integrations.lsp.backend as backend_module
    from integrations.lsp.server import TRY_LATER_S, JsonRpcRequestFailed

    now = [100.0]
    monkeypatch.setattr(backend_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    scripted = ScriptedBackend()
    scripted.close_with = (1013, "2 editor connections are open on this server replica, its most: retry later")
    async with websockets.serve(scripted.serve, "127.0.0.1", 0) as listening:
        backend, complete = in_process_bridge(editor_url(listening))
        with pytest.raises(JsonRpcRequestFailed) as failed:
            await complete()
        assert failed.value.data == {"retry_after_s": TRY_LATER_S, "close_code": 1013}
        assert "closed the editor connection (close code 1013: 2 editor connections" in str(failed.value)
        now[0] += TRY_LATER_S - 0.001
        assert await complete() == "" and scripted.connections == 1  # paused: not connected
        now[0] += 0.002
        with pytest.raises(JsonRpcRequestFailed):  # over: it connects, and is refused again
            await complete()
        assert scripted.connections == 2
        await backend.close()


@pytest.mark.parametrize("going_away", [1, 2])
async def test_a_completion_the_server_went_away_from_is_sent_once_more_on_a_new_connection(going_away):
    """A 1001 close with a completion unanswered: the server closes only once the completions it took have
    answered (or, idle, has none in flight), so this one raced the close; it goes once more on a new
    connection (it was -32603 "unreachable"). A second 1001 for it is the caller's error."""
    import websockets

    from integrations.lsp.backend import BackendClosed, EditorBackend

    server = ScriptedBackend()  # (a 1001 close instead of an answer, each of the first `going_away` times)
    server.errors = [(1001, "idle for 600 s: reconnect to complete again")] * going_away + [None]
    async with websockets.serve(server.serve, "127.0.0.1", 0) as listening:
        backend = EditorBackend(editor_url(listening))
        params = {"uri": "a", "prefix": "x", "suffix": ""}
        if going_away == 1:
            assert (await backend.complete(params))["text"] == TEXT
        else:
            with pytest.raises(BackendClosed, match="close code 1001: idle for 600 s") as closed:
                await backend.complete(params)
            assert closed.value.close_code == 1001
        assert (server.completes, server.connections) == (2, 2)
        await backend.close()


async def test_a_close_the_send_meets_first_is_retried_on_a_new_connection():
    """The 1001 close can reach the send before the reader task sees it: the dead connection was kept as
    the current one, so the completion sent once more went to it again and failed."""
    import types

    import websockets
    from websockets.exceptions import ConnectionClosedOK
    from websockets.frames import Close

    from integrations.lsp.backend import EditorBackend

    async def send(frame):
        raise ConnectionClosedOK(Close(1001, reason), None)

    reason = "idle for 600 s: reconnect to complete again"
    closed = types.SimpleNamespace(send=send, close_code=1001, close_reason=reason)
    server = ScriptedBackend()
    server.errors = [None]
    async with websockets.serve(server.serve, "127.0.0.1", 0) as listening:
        backend = EditorBackend(editor_url(listening))
        backend._ws = closed  # the server's close received, the reader not yet run
        assert (await backend.complete({"uri": "a", "prefix": "x", "suffix": ""}))["text"] == TEXT
        assert (server.connections, server.completes) == (1, 1)
        await backend.close()


@pytest.mark.parametrize("closes, sent", [([(1011, "internal error")], 1), (["drop"], 1),
                                          ([(1001, "server is shutting down")] * 2, 2)])
async def test_other_closes_are_unreachable_sent_once_and_pause_nothing(closes, sent):
    """Only a 1013 close pauses (RequestFailed), and only a 1001 close sends the completion once more: a
    1011, a drop without a close frame (1006) and a second 1001 are -32603 "unreachable", and the next
    completion goes to the backend."""
    import websockets
    from pygls.exceptions import JsonRpcInternalError

    scripted = ScriptedBackend()
    scripted.errors = [*closes, None]
    async with websockets.serve(scripted.serve, "127.0.0.1", 0) as listening:
        backend, complete = in_process_bridge(editor_url(listening))
        with pytest.raises(JsonRpcInternalError, match="unreachable"):
            await complete()
        assert scripted.completes == sent
        assert await complete() == TEXT and backend.retry_at == 0.0
        await backend.close()


async def test_a_completion_the_server_went_away_from_is_not_sent_again_within_a_pause():
    """A draining server answers a new completion OVERLOADED (a pause) and closes with 1001 once those in
    flight have answered: a completion that raced the close was sent once more at once, within the pause,
    to a server that refuses new connections (1013); it answers no item, as others within a pause do."""
    import asyncio

    import websockets
    from integrations.lsp.server import JsonRpcRequestFailed

    scripted = ScriptedBackend()
    scripted.errors = [busy(rpc.OVERLOADED, 5), (1001, "server is shutting down")]
    async with websockets.serve(scripted.serve, "127.0.0.1", 0) as listening:
        backend, complete = in_process_bridge(editor_url(listening))
        refused, raced = await asyncio.gather(complete(), complete(), return_exceptions=True)
        assert isinstance(refused, JsonRpcRequestFailed), refused
        assert raced == "", raced
        assert (scripted.connections, scripted.completes) == (1, 2)
        await backend.close()


async def test_completions_the_server_went_away_from_open_no_connection_once_a_pause_starts():
    """Two completions left unanswered by one 1001 close are each sent once more: the first to go connects
    and is refused with 1013 (a pause), while the second waits for that connection. Having passed the pause
    check before it waited, the second connected again within the pause, to be refused again; the pause is
    now checked where the connection is made, so it answers no item, as others within a pause do."""
    import asyncio

    import websockets

    from integrations.lsp.server import JsonRpcRequestFailed

    scripted = ScriptedBackend()  # both completes taken, neither answered (they raced the close), then:
    scripted.errors = ["hold", (1001, "server is shutting down")]

    def draining() -> None:  # a draining server refuses new connections
        if scripted.completes == 2:
            scripted.close_with = (1013, "server is shutting down")

    scripted.on_complete = draining
    async with websockets.serve(scripted.serve, "127.0.0.1", 0) as listening:
        backend, complete = in_process_bridge(editor_url(listening))
        answers = await asyncio.gather(complete(), complete(), return_exceptions=True)
        refused = [answer for answer in answers if isinstance(answer, JsonRpcRequestFailed)]
        assert len(refused) == 1 and refused[0].data["close_code"] == 1013, answers
        assert "" in answers and scripted.connections == 2, answers
        await backend.close()
