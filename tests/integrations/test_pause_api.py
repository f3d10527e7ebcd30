"""POST /pause, POST /resume, GET /is_paused (integrations/pause_api.py) on the real app over uvicorn and the
shipped model: off by default (404), behind the API key, only vLLM's mode "keep" (others a 400 naming
`mode`); a paused engine holds a running stream and a new request while /health answers, and both
finish on resume. Behind Ray Serve the same routes pause every engine replica
(tests/cluster/test_cluster_serve.py's hand-back test holds two that way)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import pytest
from serve_testbed import local_app

from integrations.engine_client import LocalEngineClient
from scheduler.engine_loop import PAUSED_POLL_S

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present")
BODY = {"prompt": "def add(a, b):", "max_tokens": 48, "temperature": 0, "mode": "ar", "ignore_eos": True}


T = 60  # seconds for any one call (httpx's default 5 s ran out once on a loaded 2-core machine)


def test_the_routes_are_off_by_default():
    with local_app(SHIPPED_MODEL) as app:
        for method, path in (("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused")):
            assert httpx.request(method, app.url + path, timeout=T).status_code == 404, path
        assert not app.engine.paused


def test_only_the_keep_mode_named_once_is_offered_and_the_api_key_guards_the_routes():
    with local_app(SHIPPED_MODEL, settings={"pause_endpoints": True, "api_keys": ["k"]}) as app:
        key = {"Authorization": "Bearer k"}
        assert httpx.post(app.url + "/pause", params={"mode": "keep"}, timeout=T).status_code == 401
        for query, said in (("mode=abort", "'abort'"), ("", "missing"), ("mode=abort&mode=keep", "2 times"),
                            ("mode=keep&mode=keep", "2 times"), ("mode=KEEP", "'KEEP'")):
            answer = httpx.post(f"{app.url}/pause?{query}", headers=key, timeout=T)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "mode", (query, answer.text)
            assert said in answer.json()["error"]["message"] and "mode=keep" in answer.json()["error"]["message"]
        assert not app.engine.paused and not app.engine._paused  # (none of them asked the engine)
        assert httpx.post(app.url + "/pause?mode=keep", headers=key, timeout=T).json()["status"] == "paused"
        assert httpx.post(app.url + "/resume", headers=key, timeout=T).json()["status"] == "resumed"


class ResumedFirst(LocalEngineClient):
    """A POST /resume that comes while the pause waits for the step in progress (forced: resumed as the
    pause is asked for, before the loop can hold)."""

    async def pause(self):
        waiting = asyncio.ensure_future(self.engine.pause())
        await asyncio.sleep(0)
        self.engine.resume()
        return {"local": await waiting}


def test_a_pause_that_a_resume_overtakes_answers_409_not_paused():
    with local_app(SHIPPED_MODEL, ResumedFirst, settings={"pause_endpoints": True}) as app:
        answer = httpx.post(app.url + "/pause?mode=keep", timeout=T)
        assert answer.status_code == 409 and answer.json()["error"]["param"] == "mode", answer.text
        assert "last call wins" in answer.json()["error"]["message"]
        assert httpx.get(app.url + "/is_paused", timeout=T).json() == {"is_paused": False, "replicas": {"local": False}}
        done = httpx.post(app.url + "/v1/completions", json={**BODY, "max_tokens": 4}, timeout=T)  # (not held)
        assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"


def _stream(url: str, chunks: list) -> dict:
    """A streamed completion; each content chunk's text is appended to `chunks` as it comes."""
    with httpx.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                chunks.append(chunk["choices"][0]["text"])
                if chunk["choices"][0]["finish_reason"]:
                    return chunk["choices"][0]


class PausingClient(LocalEngineClient):
    """Pauses the engine (Engine.pause) as the first request after `armed` is set has its first token, so
    the test holds a running request without racing its end."""

    armed = False

    async def stream(self, req):
        async for delta in super().stream(req):
            if self.armed and delta.token_ids:
                self.armed = False
                await self.engine.pause()
            yield delta


def test_a_paused_service_holds_its_requests_and_finishes_them_on_resume():
    with local_app(SHIPPED_MODEL, PausingClient, settings={"pause_endpoints": True}) as app, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        want = httpx.post(app.url + "/v1/completions", json=BODY, timeout=120).json()["choices"][0]["text"]
        app.client.armed = True
        chunks: list[str] = []
        running = pool.submit(_stream, app.url, chunks)
        try:
            deadline = time.monotonic() + 60
            while not app.engine.paused:  # (its first token out: the request holds a slot)
                assert time.monotonic() < deadline and not running.done(), "the stream did not start"
                time.sleep(0.01)
            paused = httpx.post(app.url + "/pause?mode=keep", timeout=T)  # (idempotent: the engine holds already)
            assert paused.status_code == 200 and paused.json() == {"status": "paused", "replicas": {"local": True}}
            assert httpx.get(app.url + "/is_paused", timeout=T).json() == {"is_paused": True, "replicas": {"local": True}}
            forwards = app.engine.forwards
            queued = pool.submit(lambda: httpx.post(app.url + "/v1/completions", json=BODY, timeout=120))
            deadline = time.monotonic() + 60
            while not app.engine.scheduler.waiting:
                assert time.monotonic() < deadline, "the new request was not admitted"
                time.sleep(0.01)
            time.sleep(10 * PAUSED_POLL_S)
            assert app.engine.forwards == forwards and not running.done() and not queued.done()  # held
            assert httpx.get(app.url + "/health", timeout=T).status_code == 200
            resumed = httpx.post(app.url + "/resume", timeout=T)
            assert resumed.status_code == 200 and resumed.json() == {"status": "resumed", "replicas": {"local": False}}
            end = running.result(120)
            answer = queued.result(120)
            assert httpx.get(app.url + "/is_paused", timeout=T).json()["is_paused"] is False
        finally:
            app.call(_resume(app.engine))  # (a failed check leaves no stream held)
    assert end["finish_reason"] == "length" and "".join(chunks) == want  # as if never paused
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == want


async def _resume(engine) -> None:
    engine.resume()
