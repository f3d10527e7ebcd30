"""How many editor WebSockets an ingress replica holds open, for how long, and what their frames put in the
request log (helper-171). Each socket holds
one of the replica's max_ongoing_requests call slots while open, so 900 idle sockets left no slot for
any HTTP request, /health included. RequestLimits.max_editor_connections bounds them (one more is
closed with 1013, "try again later") and editor_idle_timeout_s closes an idle one with 1001 ("going
away"), never one with a completion in flight. The real app on the shipped model over uvicorn
(serve_testbed.local_app), real websockets clients. A frame's id and method are logged clipped: 1 MB
ids were logged whole, 28 MB/s of log from one connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures
from websockets.exceptions import ConnectionClosed

from integrations import http_metrics
from integrations.editor import protocol as rpc
from integrations.editor.session import EditorSession
from integrations.engine_client import LocalEngineClient

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
WAIT_S = 60

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present")


class HeldClient(LocalEngineClient):
    """A LocalEngineClient whose engine requests wait for `release` (set on the app's loop) to start."""

    release: asyncio.Event | None = None

    async def stream(self, req):
        if self.release is None:
            self.release = asyncio.Event()
        await self.release.wait()
        async for delta in super().stream(req):
            yield delta


def _ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/editor"


async def _answer(ws, msg_id):
    """The response frame [1, id, error, result] of msg_id (notifications skipped)."""
    while True:
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), WAIT_S), raw=False)
        if frame[0] == rpc.RESPONSE and frame[1] == msg_id:
            return frame


async def _closed_with(ws) -> int:
    """The close code the server ends `ws` with (frames before it are read and dropped)."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), WAIT_S)
    return closed.value.rcvd.code


def test_one_socket_past_the_bound_is_closed_with_1013_and_http_keeps_answering(wait_until):
    from serve_testbed import local_app

    async def scenario(app):
        url, gate = app.url, app.app.state.gate
        first, second = [await websockets.connect(_ws_url(url)) for _ in range(2)]
        for n, ws in enumerate((first, second)):
            await ws.send(rpc.encode_request(n, "initialize", {}))
            assert (await _answer(ws, n))[2] is None
        third = await websockets.connect(_ws_url(url))
        assert await _closed_with(third) == 1013
        assert httpx.get(url + "/health", timeout=WAIT_S).status_code == 200
        await first.close()
        await wait_until(lambda: gate.open_sockets == 1, "the server to let the closed socket go")
        again = await websockets.connect(_ws_url(url))
        await again.send(rpc.encode_request(9, "initialize", {}))
        assert (await _answer(again, 9))[2] is None
        await again.close()
        await second.close()
        await wait_until(lambda: gate.open_sockets == 0, "every socket let go")

    with local_app(SHIPPED_MODEL, limits={"max_editor_connections": 2}) as app:
        asyncio.run(scenario(app))


def test_the_lsp_bridge_names_a_refused_connection_and_gets_in_once_there_is_room(wait_until):
    from integrations.lsp.backend import EditorBackend
    from serve_testbed import local_app

    async def scenario(app):
        url, gate = app.url, app.app.state.gate
        held = await websockets.connect(_ws_url(url))
        await held.send(rpc.encode_request(1, "initialize", {}))
        assert (await _answer(held, 1))[2] is None
        backend = EditorBackend(_ws_url(url))
        with pytest.raises(ConnectionError, match="closed the editor connection .close code 1013: 1 editor connections"):
            await backend.call("initialize", {})
        await held.close()
        await wait_until(lambda: gate.open_sockets == 0, "the server to let the held socket go")
        assert "session_id" in await backend.call("initialize", {})  # the next call connects again
        await backend.close()

    with local_app(SHIPPED_MODEL, limits={"max_editor_connections": 1}) as app:
        asyncio.run(scenario(app))


# The idle timeout here: a socket's first frame must reach the server within it (0.5 s could pass between
# accept and the first frame on a loaded 2-core machine, helper-177)
IDLE_S = 2.0


def test_an_idle_socket_is_closed_with_1001_but_not_while_its_completion_runs():
    from serve_testbed import local_app

    async def scenario(app):
        idle = await websockets.connect(_ws_url(app.url))
        await idle.send(rpc.encode_request(1, "initialize", {}))
        assert (await _answer(idle, 1))[2] is None
        assert await _closed_with(idle) == 1001
        busy = await websockets.connect(_ws_url(app.url))
        await busy.send(rpc.encode_request(2, "complete", {"uri": "file:///a.py", "prefix": "def f(x):\n    return ",
                                                           "suffix": "", "temperature": 0}))
        await asyncio.sleep(2.5 * IDLE_S)  # idle timeouts over with the completion held in the engine client
        app.call(_release(app.client))
        response = await _answer(busy, 2)  # answered, not cut by the idle timeout
        assert response[2] is None and "text" in response[3]
        assert await _closed_with(busy) == 1001  # idle again once it has answered

    with local_app(SHIPPED_MODEL, HeldClient, limits={"editor_idle_timeout_s": IDLE_S}) as app:
        asyncio.run(scenario(app))


async def _release(client: HeldClient) -> None:
    if client.release is None:
        client.release = asyncio.Event()
    client.release.set()


def test_the_bound_is_half_the_call_slots_ray_applies_and_leaves_some_for_http():
    """The slots are the replica's as Ray applies them: a `deployments:` override of max_ongoing_requests
    (100) left the bound at 450 of the config's 900, and editor sockets could take every slot again
    (helper-172)."""
    from pydantic import ValidationError

    from integrations.serve_app import call_slots
    from integrations.serve_config import ServeConfig

    config = ServeConfig()
    assert call_slots(config) == 900 and config.editor_idle_timeout_s == 600  # (outside a replica: the config's)
    assert config.editor_connections(900) == 450 and config.editor_connections(100) == 50
    assert config.editor_connections(1) == 0  # one slot: a socket would take it from every HTTP request
    explicit = ServeConfig.model_validate({"editor_max_connections": 899})
    assert explicit.editor_connections(900) == 899 and explicit.editor_connections(100) == 99
    assert explicit.editor_connections(1) == 0
    with pytest.raises(ValidationError, match="editor_max_connections .900. must be below ingress.max_ongoing_requests"):
        ServeConfig.model_validate({"editor_max_connections": 900})


async def test_a_frames_huge_id_and_method_are_logged_clipped(fake_client, monkeypatch):  # noqa: F811
    lines, sent = [], []

    class Capture:
        def info(self, event: str, **fields) -> None:
            lines.append(fields)

    async def send(data: bytes) -> None:
        sent.append(msgpack.unpackb(data, raw=False))

    monkeypatch.setattr(http_metrics, "request_log", Capture())
    session = EditorSession(fake_client, send)
    await session.handle_frame(msgpack.packb([rpc.REQUEST, "i" * 300_000, "M" * 300_000, None]))
    [response] = sent
    assert response[1] == "i" * 300_000 and response[2]["code"] == rpc.METHOD_NOT_FOUND  # answered as sent
    [line] = lines
    assert len(line["id"]) <= 256 and len(line["method"]) <= 256 and len(line["error"]) <= 256
    assert line["id"].startswith("iii") and "more characters" in line["id"]
