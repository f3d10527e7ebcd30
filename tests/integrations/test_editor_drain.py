"""Editor sockets when the ingress drains (`refusion serve` stopping; integrations/ingress_gate.py): an idle
socket is closed with 1001 ("going away") at once, a socket with a completion in flight gets that
completion's answer first and then the 1001 close (a new `complete` meanwhile is refused, superseding
nothing), a new socket gets 1013 and the LSP bridge's backend says the server is going away, and the
gate's open work returns to 0. A real uvicorn server and websockets client over the ingress app; the engine is scripted
(test_editor_fakes.FakeEngineClient, held until the test lets it go, so the drain surely finds the
completion running). test_serve_openai.py drains the real Ray Serve app."""

from __future__ import annotations

import asyncio
import gc

import msgpack
import pytest
import websockets
from test_editor_fakes import FakeEngineClient, bpe_tokenizer  # noqa: F401 - fixture

from integrations.editor import protocol as rpc
from integrations.lsp.backend import EditorBackend
from integrations.openai_api import APISettings, create_app
from ports import server_socket

WAIT_S = 30.0


async def _frames_until_closed(ws) -> tuple[list, int]:
    """Every frame the server sends, decoded, until it closes: (frames, close code)."""
    frames = []
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        while True:
            frames.append(msgpack.unpackb(await asyncio.wait_for(ws.recv(), WAIT_S)))
    return frames, closed.value.rcvd.code if closed.value.rcvd else None


async def test_draining_closes_editor_sockets_with_1001_after_their_completions_answer(bpe_tokenizer, wait_until):  # noqa: F811
    import threading

    import uvicorn

    fake = FakeEngineClient(bpe_tokenizer, default_text="total = a + b\n", hold=threading.Event())
    app = create_app(APISettings(model_name=fake.model_name), fake)
    gate = app.state.gate
    sock = server_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started, "uvicorn to start")
        url = f"ws://127.0.0.1:{port}/v1/editor"
        async with websockets.connect(url) as idle, websockets.connect(url) as busy:
            await busy.send(rpc.encode_request(1, "complete", {"uri": "file:///a.py", "prefix": "def add(a, b):\n    ",
                                                               "multiline": False}))
            await wait_until(lambda: fake.requests, "the completion to reach the engine")  # held there
            assert gate.open_work == 2
            gate.start_draining()
            idle_frames, idle_code = await _frames_until_closed(idle)
            assert (idle_frames, idle_code) == ([], 1001)
            async with websockets.connect(url) as late:  # a new socket while draining: "try again later"
                assert (await _frames_until_closed(late))[1] == 1013
            # the LSP bridge's backend connecting now is told the server is going away, as an error it
            # handles (it raised websockets' ConnectionClosed, and logged an unretrieved future; a break-test)
            unhandled = []
            asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
            backend = EditorBackend(url)
            for _ in range(2):
                with pytest.raises(ConnectionError, match="shutting down or restarting"):
                    await backend.complete({"uri": "file:///b.py", "prefix": "x = ", "multiline": False})
            await backend.close()
            gc.collect()
            assert unhandled == []
            # an editor that keeps typing: its new `complete` for the same uri is refused at once and
            # supersedes nothing (it cancelled the completion the drain lets finish; a break-test)
            await busy.send(rpc.encode_request(2, "complete", {"uri": "file:///a.py", "prefix": "def add(a, b):\n    t",
                                                               "multiline": False}))
            refused = msgpack.unpackb(await asyncio.wait_for(busy.recv(), WAIT_S))
            assert refused[:2] == [1, 2] and refused[2]["code"] == rpc.OVERLOADED, refused
            assert refused[2]["data"]["retry_after_s"] == gate.retry_after_s and len(fake.requests) == 1
            fake.hold.set()  # the engine answers; only then may the busy socket close
            frames, code = await _frames_until_closed(busy)
        assert code == 1001
        results = [f for f in frames if f[0] == 1]  # responses: [1, id, error, result]
        assert [(r[1], r[2]) for r in results] == [(1, None)] and frames[-1] == results[0]
        assert results[0][3]["text"].startswith("total = a + b")
        # every engine request ended (a single-line completion stops its engine request at the newline)
        assert sorted(fake.completed + fake.cancelled) == sorted(r.request_id for r in fake.requests)
        await wait_until(lambda: gate.open_work == 0, "the routes to return")  # just after their close frames
    finally:
        server.should_exit = True
        await serving
        sock.close()
