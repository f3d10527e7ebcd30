"""The bad-input corpus (bad_inputs.py) against the real Ray Serve app (serve_base_url), over real HTTP
and WebSocket clients: every case gets its 4xx (or is ignored), never a 5xx; the error names the
offending field; /health answers after each case, the WebSocket connection keeps serving after each
bad frame, a real completion works at the end, and the app's logs gained no traceback meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets
from bad_inputs import ANY_PARAM, FRAME_CASES, HTTP_CASES

from integrations.editor import protocol as rpc


def _app_logs() -> list[Path]:
    """The refusion app's replica logs, the Serve proxy's log, and its replicas' stderr (where the
    app's own `logging` goes) in this Ray session."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for the session's logs
    files = [*(logs / "serve").glob("replica_refusion_*.log"), *(logs / "serve").glob("proxy_*.log")]
    return files + [p for p in logs.glob("worker-*.err") if b"ServeReplica:refusion:" in p.read_bytes()[:400]]


@pytest.fixture(scope="module", autouse=True)
def log_marks(serve_base_url) -> dict:
    """Each app log's size when the corpus starts; what is written after is the corpus's."""
    return {path: path.stat().st_size for path in _app_logs()}


@pytest.fixture(scope="module")
def http(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=60) as client:
        yield client


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/editor"


@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda case: case.id)
def test_http_bad_input_is_a_4xx_naming_the_field(http, case):
    headers = {"content-type": "application/json", **case.headers} if case.body is not None else dict(case.headers)
    response = http.request(case.method, case.path, content=case.content(), headers=headers)
    assert response.status_code == case.status, response.text[:400]
    if case.status >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"] != "server_error"
        assert len(response.content) < 3000, response.content[:400]  # a quoted value is clipped, never echoed whole
        if case.field:
            assert case.field in error["message"], error
        if case.param != ANY_PARAM:
            assert error["param"] == case.param, error
    assert http.get("/health").status_code == 200


async def _response(ws, msg_id, limit: int = 50):
    """The response frame for msg_id (notifications and other responses skipped, bounded)."""
    for _ in range(limit):
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60), raw=False)
        if frame[0] == rpc.RESPONSE and frame[1] == msg_id:
            return frame
    raise AssertionError(f"no response for {msg_id!r} in {limit} frames")


@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda case: case.id)
async def test_editor_bad_frame_is_an_error_naming_the_field(serve_base_url, case):
    async with websockets.connect(ws_url(serve_base_url), max_size=None) as ws:
        await ws.send(case.frame)
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60), raw=False)
        assert frame[0] == rpc.RESPONSE and frame[3] is None, frame
        error = frame[2]
        assert error["code"] == case.code, error
        if case.field:
            assert error.get("data", {}).get("field") == case.field or case.field in error["message"], error
        await ws.send(rpc.encode_request("after", "initialize"))  # the connection still serves
        _, _, err, info = await _response(ws, "after")
        assert err is None and info["protocol_version"] == rpc.PROTOCOL_VERSION
    async with httpx.AsyncClient(base_url=serve_base_url, timeout=60) as client:
        assert (await client.get("/health")).status_code == 200


async def test_the_server_still_serves_after_the_corpus(serve_base_url, log_marks):
    async with httpx.AsyncClient(base_url=serve_base_url, timeout=60) as client:
        assert (await client.get("/health")).status_code == 200
        out = await client.post("/v1/completions", json={"prompt": "def add(a, b):\n", "max_tokens": 8, "mode": "ar",
                                                         "temperature": 1.0, "seed": 3})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] > 0, out.text
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        infill = await client.post("/infill", json={"input_prefix": "def f(x):\n    ", "input_suffix": "", "n_predict": 8})
        assert infill.status_code == 200 and isinstance(infill.json()["content"], str)
        tokens = await client.post("/tokenize", json={"content": "def f(x):"})
        assert tokens.status_code == 200 and tokens.json()["tokens"]
    async with websockets.connect(ws_url(serve_base_url), max_size=None) as ws:
        await ws.send(rpc.encode_request(1, "complete", {"uri": "file:///a.py", "prefix": "x = ", "max_tokens": 8,
                                                         "mode": "ar", "temperature": 1.0, "seed": 3}))
        _, _, err, result = await _response(ws, 1)
        assert err is None and result["tokens"] > 0
    written = ""
    for path in _app_logs():
        with path.open("rb") as log:
            log.seek(log_marks.get(path, 0))
            written += log.read().decode("utf-8", "replace")
    assert "Traceback" not in written, written[written.find("Traceback") - 2000:][:6000]
