"""The ingress gate without Ray (integrations/ingress_gate.py): the in-flight gauge returns to idle on every
exit path, errors after a stream started end it cleanly and name no internals, draining refuses new work,
a transport failure in `receive` is a quiet disconnect, and /health (GET and HEAD) reports ready only when
the engine answers."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
import logging

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_editor_fakes import bpe_tokenizer  # noqa: F401 - fixture

from integrations import openai_api
from integrations.engine_client import EngineUnavailableError
from integrations.openai_api import APISettings, create_app
from scheduler.api import MAX_CLIENT_CHARS, Delta, FinishReason, Mode, OverloadedError


class ScriptedClient:
    """An engine client streaming `pieces` (text deltas), then ending with `end`: "finish" (a finished
    delta), an exception to raise, or "hang" (never ends: a client must leave)."""

    model_name = "scripted"

    def __init__(self, tokenizer, pieces=("a", "b"), end="finish", ready=True):
        self.tokenizer, self.pieces, self.end, self.ready = tokenizer, pieces, end, ready
        self.cancelled: list[str] = []

    async def stream(self, req):
        finished = False
        try:
            for text in self.pieces:
                await asyncio.sleep(0)
                yield Delta(req.request_id, text, self.tokenizer.encode(text), mode=Mode.AR)
            if isinstance(self.end, BaseException):
                raise self.end
            if self.end == "hang":
                await asyncio.Event().wait()
            finished = True
            yield Delta(req.request_id, "", [], finished=True, finish_reason=FinishReason.STOP, mode=Mode.AR)
        finally:
            if not finished:
                self.cancelled.append(req.request_id)

    def in_flight(self, request_id: str) -> None:
        return None  # each test runs its own ids

    async def info(self) -> dict:
        if not self.ready:
            await asyncio.Event().wait()  # an engine replica that never answers
        return {"model": self.model_name}

    async def scaled_to_zero(self) -> bool:
        return False

    async def metrics(self) -> bytes:
        return b""


def _app(client):
    return create_app(APISettings(model_name=client.model_name), client)


def _metric(app, name: str, **labels) -> float:
    text = app.state.metrics.render().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test")


def _events(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]


async def test_bad_suffix_request_and_engine_refusal_leave_the_gauge_idle(bpe_tokenizer):  # noqa: F811
    app = _app(ScriptedClient(bpe_tokenizer, pieces=(), end=OverloadedError("queue full", 2.0)))
    async with _http(app) as http:
        bad = await http.post("/v1/completions", json={"prompt": [5, 6, 7], "suffix": "\nreturn x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
        refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert _metric(app, "refusion_api_requests_in_flight") == 0


@pytest.mark.parametrize("end, code, hidden", [
    (EngineUnavailableError("the engine replica serving this request stopped; retry", 2.0), "engine_unavailable", None),
    (RuntimeError("secret at /srv/internal/path.py pid 4242"), None, "secret"),
])
async def test_stream_failures_end_with_an_error_event_then_done(bpe_tokenizer, end, code, hidden):  # noqa: F811
    app = _app(ScriptedClient(bpe_tokenizer, end=end))
    async with _http(app) as http:
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            response = await http.post(path, json={**body, "max_tokens": 8, "stream": True})
            events = _events(response.text)
            assert response.status_code == 200 and events[-1] == "[DONE]", response.text
            error = json.loads(events[-2])["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
            assert hidden is None or hidden not in error["message"]
            plain = await http.post(path, json={**body, "max_tokens": 8})
            assert plain.status_code == (503 if code else 500)
            assert hidden is None or hidden not in plain.text
    assert _metric(app, "refusion_api_requests_in_flight") == 0


async def _asgi_stream(app, receive, path: str = "/v1/completions", fields: dict | None = None,
                       leave_when=None) -> list[dict]:
    """POST a request (default a streamed completion) straight through ASGI; once the body is read,
    `receive` answers after `leave_when` (an asyncio.Event; default: the response has started, the
    client leaves mid-stream). The messages sent."""
    sent: list[dict] = []
    started = asyncio.Event()
    leave_when = leave_when or started

    async def send(message):
        sent.append(message)
        started.set()

    body = json.dumps(fields or {"prompt": "x", "max_tokens": 8, "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("127.0.0.1", 1)}
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def first_then(next_receive):
        message = next(messages, None)
        if message is not None:
            return message
        await leave_when.wait()
        return await next_receive()

    # (the bound only turns a hang into a failure: the route's first use of the tokenizer pool starts its
    # thread inside it, and the request runs at nice 19 on a loaded machine)
    await asyncio.wait_for(app(scope, lambda: first_then(receive), send), 60)
    return sent


async def test_client_gone_is_one_quiet_499_even_when_receive_raises(bpe_tokenizer, caplog):  # noqa: F811
    """Ray Serve's bridge raises TaskCancelledError from receive() when the proxy drops a client; a server
    delivers http.disconnect. Both are a 499 in the request log, a cancelled engine request, no error log."""
    from ray.exceptions import TaskCancelledError

    client = ScriptedClient(bpe_tokenizer, end="hang")
    app = _app(client)

    async def disconnect():
        return {"type": "http.disconnect"}

    async def ray_cancelled():
        raise TaskCancelledError()

    with caplog.at_level(logging.INFO):
        for receive in (disconnect, ray_cancelled):
            await _asgi_stream(app, receive)
    assert len(client.cancelled) == 2
    assert _metric(app, "refusion_api_requests_total", endpoint="completions", status="499") == 2
    assert _metric(app, "refusion_api_requests_in_flight") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


@pytest.mark.parametrize("path, fields", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "n": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8, "stream": True}),  # still waiting for its first token
    ("/completion", {"prompt": "x", "n_predict": 8}),
])
async def test_a_client_that_leaves_before_its_answer_starts_has_its_engine_requests_cancelled(
        bpe_tokenizer, path, fields, monkeypatch):  # noqa: F811
    """A plain ASGI server (uvicorn) tells a route that its client left only through receive(), which a
    route collecting a whole answer never reads: the gate watches the connection and cancels the route,
    so the engine requests end (KV freed) at once, counted as one 499, nothing sent. Forced: the client
    leaves once every engine request has started."""
    client = ScriptedClient(bpe_tokenizer, pieces=() if fields.get("stream") else ("a",), end="hang")
    running, stream = [], client.stream
    all_running = asyncio.Event()
    choices = fields.get("n", 1)

    async def recording(req):
        running.append(req.request_id)
        if len(running) == choices:
            all_running.set()
        async for delta in stream(req):
            yield delta

    client.stream = recording
    app = _app(client)
    from integrations import http_metrics

    lines = []
    monkeypatch.setattr(http_metrics, "request_log", SimpleNamespace(info=lambda event, **fields: lines.append(fields)))

    async def disconnect():
        return {"type": "http.disconnect"}

    sent = await _asgi_stream(app, disconnect, path, fields, leave_when=all_running)
    assert sent == [] and sorted(client.cancelled) == sorted(running) and len(running) == choices
    endpoint = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/completion": "completion"}[path]
    assert _metric(app, "refusion_api_requests_total", endpoint=endpoint, status="499") == 1
    assert _metric(app, "refusion_api_requests_total", endpoint=endpoint) == 1
    assert _metric(app, "refusion_api_requests_in_flight") == 0 and app.state.gate.open_requests == 0
    assert [(line["status"], line["error"]) for line in lines] == [(499, "client disconnected")]


async def test_a_client_that_stays_gets_its_whole_answer_with_the_watch_on(bpe_tokenizer):  # noqa: F811
    """The watch reads the connection while the route works: a client that stays connected gets every
    answer whole, and the disconnect uvicorn delivers once a response has gone out cancels nothing."""
    client = ScriptedClient(bpe_tokenizer, pieces=("a", "b"))
    app = _app(client)

    async def stays():
        await asyncio.Event().wait()

    async def disconnect():
        return {"type": "http.disconnect"}

    for receive in (stays, disconnect):
        for fields in ({"prompt": "x", "max_tokens": 8}, {"prompt": "x", "max_tokens": 8, "stream": True}):
            if fields.get("stream") and receive is disconnect:
                continue  # a disconnect mid-stream is a client leaving: the next test's case
            sent = await _asgi_stream(app, receive, fields=fields)
            body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
            if fields.get("stream"):
                texts = [json.loads(e)["choices"][0]["text"] for e in _events(body) if e != "[DONE]"]
            else:
                texts = [json.loads(body)["choices"][0]["text"]]
            assert sent[0]["status"] == 200 and "".join(texts) == "ab", body
    assert client.cancelled == []
    assert _metric(app, "refusion_api_requests_total", endpoint="completions", status="200") == 3
    assert _metric(app, "refusion_api_requests_in_flight") == 0


async def test_llama_cpp_streams_left_by_their_client_are_499s(bpe_tokenizer):  # noqa: F811
    """/completion and /infill streams whose client leaves mid-way: the engine requests are cancelled and
    each is counted once as a 499 (the 200 header had gone out: the route records the outcome)."""
    client = ScriptedClient(bpe_tokenizer, pieces=("a", "b"), end="hang")
    app = _app(client)

    async def disconnect():
        return {"type": "http.disconnect"}

    streams = {"completion": ("/completion", {"prompt": "x", "n_predict": 8, "stream": True}),
               "infill": ("/infill", {"input_prefix": "x = ", "input_suffix": "", "n_predict": 8, "stream": True})}
    for endpoint, (path, fields) in streams.items():
        sent = await _asgi_stream(app, disconnect, path, fields)
        assert sent[0]["status"] == 200 and b"data: " in sent[1]["body"]
        assert _metric(app, "refusion_api_requests_total", endpoint=endpoint, status="499") == 1, endpoint
        assert _metric(app, "refusion_api_requests_total", endpoint=endpoint) == 1, endpoint
    assert client.cancelled and _metric(app, "refusion_api_requests_in_flight") == 0
    client.end = "finish"
    async with _http(app) as http:  # a whole /infill: one request-log line and its counts, as any route's
        whole = await http.post("/infill", json=streams["infill"][1] | {"stream": False})
    assert whole.status_code == 200 and whole.json()["content"]
    assert _metric(app, "refusion_api_requests_total", endpoint="infill", status="200") == 1
    assert _metric(app, "refusion_api_prompt_tokens_total") > 0


async def test_draining_refuses_new_work_but_keeps_metrics(bpe_tokenizer):  # noqa: F811
    app = _app(ScriptedClient(bpe_tokenizer))
    app.state.gate.start_draining(retry_after_s=3)
    async with _http(app) as http:
        refused = await http.post("/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert _metric(app, "refusion_api_requests_total", endpoint="completions", status="503") == 1
        assert refused.json()["error"]["code"] == "shutting_down"
        health = await http.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        assert (await http.head("/health")).status_code == 503
        assert (await http.get("/metrics")).status_code == 200
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    await app({"type": "websocket", "path": "/v1/editor", "root_path": "", "headers": [], "query_string": b""},
              receive, send)
    # accepted, then closed: a close before the accept reaches the client as an HTTP 403
    assert sent == [{"type": "websocket.accept"},
                    {"type": "websocket.close", "code": 1013, "reason": "server is shutting down"}]
    assert app.state.gate.open_requests == 0


async def test_health_is_ready_only_when_the_engine_answers(bpe_tokenizer, monkeypatch):  # noqa: F811
    monkeypatch.setattr(openai_api, "READY_TIMEOUT_S", 0.05)
    client = ScriptedClient(bpe_tokenizer, ready=False)
    async with _http(_app(client)) as http:
        starting = await http.get("/health")
        assert starting.status_code == 503 and starting.headers["retry-after"]
        client.ready = True
        ok = await http.get("/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        head = await http.head("/health")
        assert head.status_code == 200 and head.content == b""


async def test_requests_refused_before_the_engine_are_counted(bpe_tokenizer, monkeypatch):  # noqa: F811
    """A 400 for an invalid body or a 404 for an unknown model is answered before the route makes its
    request observer; the gate counts it, once, under the endpoint and status that went out, and
    writes its request-log line (with the client's X-Request-Id when it sent one)."""
    from integrations import http_metrics

    lines = []
    monkeypatch.setattr(http_metrics, "request_log", SimpleNamespace(info=lambda event, **fields: lines.append(fields)))
    app = _app(ScriptedClient(bpe_tokenizer))
    async with _http(app) as http:
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1},
                                headers={"X-Request-Id": "bad-1"})).status_code == 400
        assert (await http.post("/v1/completions", content=b"{not json")).status_code == 400
        assert (await http.post("/v1/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "hi"}]})).status_code == 404
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
    assert _metric(app, "refusion_api_requests_total", endpoint="completions", status="400") == 2
    assert _metric(app, "refusion_api_requests_total", endpoint="chat", status="404") == 1
    assert _metric(app, "refusion_api_requests_total", endpoint="completions", status="200") == 1
    assert _metric(app, "refusion_api_requests_in_flight") == 0
    assert sorted((line["endpoint"], line["status"]) for line in lines) == [
        ("chat", 404), ("completions", 200), ("completions", 400), ("completions", 400)]
    assert any(line["request_id"] == "bad-1" and line["status"] == 400 for line in lines)
    # each refused request's line says why, as its error body did; the answered one has no error
    errors = {(line["request_id"] or line["endpoint"], line["status"]): line["error"] for line in lines}
    assert "max_tokens" in errors[("bad-1", 400)] and "nope" in errors[("chat", 404)], errors
    assert [e for (_, status), e in errors.items() if status == 200] == [None]


async def test_a_requests_log_line_is_written_while_it_still_counts_as_open(bpe_tokenizer, monkeypatch):  # noqa: F811
    """The gate records a request's outcome (metrics, its request-log line) before the request stops
    counting in open_requests, so whoever waits for 0 (a drain, a test's teardown: tests/integrations/
    conftest.py) finds every line written. It dropped the count first: a line could follow a drain's
    end, or land in CI output after the test whose request it was had ended."""
    from integrations import http_metrics

    app = _app(ScriptedClient(bpe_tokenizer))
    open_at_line = []
    monkeypatch.setattr(http_metrics, "request_log", SimpleNamespace(
        info=lambda event, **fields: open_at_line.append((fields["status"], app.state.gate.open_requests))))
    async with _http(app) as http:
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})).status_code == 400
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
        streamed = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("[DONE]")
    assert open_at_line == [(400, 1), (200, 1), (200, 1)]
    assert app.state.gate.open_requests == 0


async def test_a_streamed_completion_ends_with_the_refusion_block(bpe_tokenizer):  # noqa: F811
    app = _app(ScriptedClient(bpe_tokenizer))
    async with _http(app) as http:
        response = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True})
    chunks = [json.loads(e) for e in _events(response.text) if e != "[DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["refusion"]["mode"] == "ar"
    assert not any("refusion" in c for c in chunks[:-1])


def _recording_app(tokenizer, field: str):
    """The app over a ScriptedClient, and the list its engine requests' `field` values are recorded in."""
    client = ScriptedClient(tokenizer)
    values, stream = [], client.stream

    def recording(req):
        values.append(getattr(req, field))
        return stream(req)

    client.stream = recording
    return _app(client), values


async def test_prompt_cache_key_is_the_requests_affinity_key(bpe_tokenizer):  # noqa: F811
    """OpenAI's prompt_cache_key (chat, and the Responses API's) becomes the engine request's affinity key,
    which the serve router sends to one replica (integrations/serve_router.py); without it, the
    conversation's key."""
    app, keys = _recording_app(bpe_tokenizer, "affinity_key")
    messages = [{"role": "user", "content": "hi"}]
    async with _http(app) as http:
        for body in ({"messages": messages, "prompt_cache_key": "conv-7"}, {"messages": messages}):
            assert (await http.post("/v1/chat/completions", json=body | {"max_tokens": 4})).status_code == 200
        assert (await http.post("/v1/responses", json={"input": "hi", "prompt_cache_key": "conv-8"})).status_code == 200
    assert keys[0] == "conv-7" and keys[1] not in (None, "conv-7") and keys[2] == "conv-8"


async def test_the_end_user_id_is_the_requests_fair_share_client(bpe_tokenizer):  # noqa: F811
    """OpenAI's safety_identifier (or the older user), on chat, completions (with a suffix too) and the
    Responses API, and
    Anthropic's metadata.user_id become the engine request's client (the scheduler's fair share,
    scheduler.api.GenerationRequest.client); none is the anonymous client; a long id is digested to
    fit the engine's bound, one id always to one key."""
    app, keys = _recording_app(bpe_tokenizer, "client")
    messages = [{"role": "user", "content": "hi"}]
    long_id = "u" * 300
    async with _http(app) as http:
        for route, body in (("chat/completions", {"messages": messages, "user": "ann"}),
                            ("chat/completions", {"messages": messages, "safety_identifier": "bob", "user": "x"}),
                            ("completions", {"prompt": "x", "user": "cy"}),
                            ("completions", {"prompt": "x"}),
                            ("completions", {"prompt": "def f(", "suffix": "\n", "user": "fim"}),
                            ("responses", {"input": "hi", "safety_identifier": "dee", "max_output_tokens": 16}),
                            ("messages", {"messages": messages, "metadata": {"user_id": "eve"}, "model": "scripted"}),
                            ("completions", {"prompt": "x", "user": long_id}),
                            ("completions", {"prompt": "x", "user": long_id})):
            response = await http.post(f"/v1/{route}", json=({"max_tokens": 4} if route != "responses" else {}) | body)
            assert response.status_code == 200, response.text
    fim = keys[4:-4]  # (a completion with suffix: its gap candidates, each one engine request)
    assert fim and set(fim) == {"user:fim"}, keys
    keys = keys[:4] + keys[-4:]
    assert keys[:6] == ["user:ann", "user:bob", "user:cy", None, "user:dee", "user:eve"], keys
    assert keys[6] == keys[7] and keys[6].startswith("user#") and len(keys[6]) <= MAX_CLIENT_CHARS


async def test_latencies_count_from_arrival_reading_the_body_included(bpe_tokenizer):  # noqa: F811
    """TTFT and e2e start when the request arrives, not when the route has read and tokenized it: a body
    that takes STALL_S to come in shows in both (the route made its observer after reading it)."""
    stall_s = 0.3
    app = _app(ScriptedClient(bpe_tokenizer))

    async def slow_body():
        yield b'{"prompt": "x", '
        await asyncio.sleep(stall_s)
        yield b'"max_tokens": 8}'

    async with _http(app) as http:
        reply = await http.post("/v1/completions", content=slow_body(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert _metric(app, "refusion_api_e2e_latency_seconds_sum", endpoint="completions") >= stall_s
    assert _metric(app, "refusion_api_time_to_first_token_seconds_sum", endpoint="completions") >= stall_s


async def test_the_model_list_pages_as_anthropics(bpe_tokenizer):  # noqa: F811
    """GET /v1/models takes the anthropic SDK's pagination (after_id, before_id, limit): the page after
    the last id is empty (it returned the model again, helper-123), a limit pages with has_more, a
    cursor that is no served id is a 400 naming it. Without parameters: every id (OpenAI's list)."""
    client = ScriptedClient(bpe_tokenizer)
    app = create_app(APISettings(model_name="m", model_aliases=("a1", "a2")), client)

    async def page(**params):
        response = await http.get("/v1/models", params=params)
        body = response.json()
        if response.status_code != 200:
            return response.status_code, body["error"]["param"]
        return [card["id"] for card in body["data"]], body["has_more"], body["first_id"], body["last_id"]

    async with _http(app) as http:
        assert await page() == (["m", "a1", "a2"], False, "m", "a2")
        assert await page(after_id="m") == (["a1", "a2"], False, "a1", "a2")
        assert await page(after_id="a2") == ([], False, None, None)
        assert await page(before_id="a2") == (["m", "a1"], False, "m", "a1")
        assert await page(limit=1) == (["m"], True, "m", "m")
        assert await page(after_id="m", limit=1) == (["a1"], True, "a1", "a1")
        assert await page(before_id="a2", limit=1) == (["a1"], True, "a1", "a1")
        assert await page(after_id="m", before_id="a2") == (["a1"], False, "a1", "a1")
        assert await page(after_id="nope") == (400, "after_id")
        assert await page(limit=0) == (400, "limit")
