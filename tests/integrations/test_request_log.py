"""The request log and the request metrics of a real server: the app on the shipped model in this process,
served by uvicorn (serve_testbed.local_app), its request-log lines captured as they are written.

What each line and figure says for the outcomes that are easy to get wrong: editor WebSocket completions
(one line each, whatever their outcome, under the id the client was given), several choices (each one's
finish reason, the number asked for whatever became of them), a stream that fails after its 200 went out
(counted and logged as the 200 it was, the failure in `error`), a refusal while draining, a drain that
cuts a stream (its own engine finish reason), which requests the end-to-end latency times (only those
served), and the engine ids a suffix completion's candidates take (never one a client may send).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from serve_testbed import local_app

from integrations import http_metrics
from integrations.editor import protocol as rpc
from integrations.engine_client import EngineUnavailableError, LocalEngineClient

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
LOST = "lost-"  # requests whose ids start so lose their engine replica after their first delta
WAIT_S = 120.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present"),
]


class RecordingClient(LocalEngineClient):
    """The engine's client, recording the ids of the engine requests that have streamed a delta
    (`started`); a request whose id starts with LOST fails after its first delta as a request does
    whose engine replica died (EngineUnavailableError, what ServeEngineClient raises then), and one whose
    id starts with a prefix in `held` is held after each delta until the test takes the prefix out (an
    editor completion then stays in flight however short its text)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: set[str] = set()
        self.held: set[str] = set()

    async def stream(self, req):
        async for delta in super().stream(req):
            self.started.add(req.request_id)
            yield delta
            if req.request_id.startswith(LOST):
                raise EngineUnavailableError("the engine replica serving this request stopped; retry", 2.0)
            while any(req.request_id.startswith(prefix) for prefix in list(self.held)):
                await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def log_lines():
    """Every request-log line written while the module runs, as the dict of its fields."""
    lines: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_metrics, "request_log", _Capture(lines))
        yield lines


class _Capture:
    def __init__(self, lines: list[dict]):
        self.lines, self._lock = lines, threading.Lock()

    def info(self, event: str, **fields) -> None:
        with self._lock:
            self.lines.append({"event": event, **fields})


@pytest.fixture(scope="module")
def served(log_lines):
    with local_app(SHIPPED_MODEL, RecordingClient) as app:
        yield app


def line_of(lines: list[dict], request_id: str, wait_s: float = WAIT_S, **match) -> dict:
    """The one log line of `request_id` (with the fields in `match`), waiting for it to be written."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [line for line in list(lines) if line.get("request_id") == request_id
                 and all(line.get(k) == v for k, v in match.items())]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, f"no log line for {request_id} {match}: {lines[-5:]}"
        time.sleep(0.05)


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


LONG = {"prompt": "def f(x):\n", "max_tokens": 3000, "ignore_eos": True, "mode": "ar", "temperature": 0}


async def _answer(ws, msg_id):
    """Read frames until the response to msg_id: (error, result)."""
    while True:
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), WAIT_S), raw=False)
        if frame[0] == rpc.RESPONSE and frame[1] == msg_id:
            return frame[2], frame[3]


async def _started(client: RecordingClient, prefix: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not any(i.startswith(prefix) for i in client.started):
        assert time.monotonic() < deadline, f"no engine request {prefix}* started"
        await asyncio.sleep(0.02)


async def test_each_editor_completion_has_a_log_line_under_the_id_the_client_was_given(served, log_lines):
    """A completed, a superseded, a cancelled and an invalid `complete` each write one request-log line
    (none did) with its outcome and JSON-RPC code; the session id in the engine's ids is the one
    `initialize` announces, each result names its completion's id, and the handshake's X-Request-Id comes
    back on the 101 and is in every line of the session."""
    client = served.client
    url = served.url.replace("http://", "ws://") + "/v1/editor"
    async with websockets.connect(url, additional_headers={"X-Request-Id": "ws-1"}) as ws:
        assert ws.response.headers["x-request-id"] == "ws-1"
        await ws.send(rpc.encode_request(1, "initialize", {}))
        session = (await _answer(ws, 1))[1]["session_id"]
        params = {"prefix": "def add(a, b):\n    ", "suffix": "\n", "mode": "ar", "temperature": 0, "max_tokens": 8}
        await ws.send(rpc.encode_request(2, "complete", {"uri": "file:///a.py", **params}))
        err, result = await _answer(ws, 2)
        assert err is None and result["request_id"] == f"ed-{session}-1"
        assert any(i.startswith(f"ed-{session}-1-g") for i in client.started)  # the engine's ids
        client.held.update({f"ed-{session}-2-", f"ed-{session}-3-"})
        try:
            await ws.send(rpc.encode_request(3, "complete", {"uri": "file:///b.py", **params}))
            await _started(client, f"ed-{session}-2-")
            await ws.send(rpc.encode_request(4, "complete", {"uri": "file:///b.py", **params}))  # supersedes 3
            assert (await _answer(ws, 3))[0]["code"] == rpc.REQUEST_CANCELLED
            await _started(client, f"ed-{session}-3-")
            await ws.send(rpc.encode_request(5, "cancel", {"id": 4}))
            assert (await _answer(ws, 4))[0]["code"] == rpc.REQUEST_CANCELLED
        finally:
            client.held.clear()
        await ws.send(rpc.encode_request(6, "complete", {"uri": 5, "prefix": "x"}))
        assert (await _answer(ws, 6))[0]["code"] == rpc.INVALID_PARAMS
    lines = {line["id"]: line for line in log_lines if line.get("session") == session}
    assert {i: (line["outcome"], line["code"], line["request_id"]) for i, line in lines.items()} == {
        2: ("completed", None, f"ed-{session}-1"), 3: ("superseded", rpc.REQUEST_CANCELLED, f"ed-{session}-2"),
        4: ("cancelled", rpc.REQUEST_CANCELLED, f"ed-{session}-3"), 6: ("error", rpc.INVALID_PARAMS, None)}
    assert lines[2]["completion_tokens"] == result["tokens"] and lines[2]["finish_reason"] == [result["stop_reason"]]
    assert lines[3]["error"] == "completion superseded by 4" and "uri" in lines[6]["error"]
    assert all(line["endpoint"] == "editor" and line["connection"] == "ws-1" and line["e2e_ms"] > 0
               for line in lines.values())


def test_suffix_candidates_never_take_an_id_a_client_may_send(served, log_lines):
    """A completion with `suffix` ran its candidates as `<X-Request-Id>-g<gap>`, so a client's unrelated
    `fim-1-g2000` was refused as in flight while `fim-1` ran; they are `<id>.<random>-g<gap>` now, as
    /infill's, and `fim-1` itself is still refused while its candidates run, the log naming the header
    the client sent (it said `request_id`)."""
    body = {"prompt": "def f(x):\n", "suffix": "\n# zq\n", "max_tokens": 2000, "min_tokens": 2000,
            "ignore_eos": True, "mode": "ar", "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as http:
        with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "fim-1"}) as running:
            wait_for(lambda: any(i.startswith("fim-1") for i in served.client.started), "fim-1's candidate")
            unrelated = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                  headers={"X-Request-Id": "fim-1-g2000"})
            assert unrelated.status_code == 200, unrelated.text
            for again in ({"prompt": "x", "max_tokens": 2}, {"prompt": "x", "suffix": "\n", "max_tokens": 2}):
                refused = http.post("/v1/completions", json=again, headers={"X-Request-Id": "fim-1"})
                assert refused.status_code == 400 and refused.json()["error"]["param"] == "X-Request-Id", refused.text
            assert running.status_code == 200
    errors = [line["error"] for line in log_lines if line["request_id"] == "fim-1" and line.get("status") == 400]
    assert len(errors) == 2 and all(e.startswith("X-Request-Id: 'fim-1'") for e in errors), errors


def test_several_choices_log_how_many_were_asked_and_each_finish_reason(served, log_lines):
    """n=3: the line's `choices` is 3 and `finish_reason` every choice's, in choice order (it was the
    last one's alone); a request of 3 choices whose client left is logged with its 3 choices too."""
    body = {"prompt": "def add(a, b):\n", "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 5, "stop": ["\n"],
            "mode": "ar"}
    answer = httpx.post(served.url + "/v1/completions", json=body, headers={"X-Request-Id": "n3-ok"}, timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    reasons = [choice["finish_reason"] for choice in sorted(answer.json()["choices"], key=lambda c: c["index"])]
    line = line_of(log_lines, "n3-ok")
    assert (line["status"], line["choices"], line["finish_reason"]) == (200, 3, reasons)
    with pytest.raises(httpx.ReadTimeout):  # the client leaves while its 3 choices run
        httpx.post(served.url + "/v1/completions", json={**LONG, "n": 3}, headers={"X-Request-Id": "n3-left"},
                   timeout=httpx.Timeout(WAIT_S, read=1.0))
    line = line_of(log_lines, "n3-left")
    assert (line["status"], line["choices"], line["error"]) == (499, 3, "client disconnected")


def test_end_to_end_latency_times_only_the_requests_served(served):
    """vLLM times the requests its engine served: a 400 or 404 answered in milliseconds adds no
    end-to-end sample (they were half the samples of an overload test); a 200 adds one."""
    def samples() -> float:
        return metric(served.url, "refusion_api_e2e_latency_seconds_count", endpoint="completions")

    before = samples()
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as http:
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400
        assert http.post("/v1/completions", json={"prompt": "x", "model": "nope"}).status_code == 404
        assert samples() == before
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert samples() == before + 1


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "def f(x):\n", "max_tokens": 16, "stream": True}),
    ("/completion", {"prompt": "def f(x):\n", "n_predict": 16, "stream": True}),
])
def test_a_stream_that_fails_after_its_start_is_the_200_that_went_out(served, log_lines, path, body):
    """A stream whose engine replica dies after the 200 went out: counted under 200 (the status that went
    out, as docs/api.md says) and logged as a 200 whose `error` says how it ended (it was a 503)."""
    rid = LOST + path.strip("/").replace("/", "-")
    endpoint = {"/v1/completions": "completions", "/completion": "completion"}[path]
    before = {status: metric(served.url, "refusion_api_requests_total", endpoint=endpoint, status=status)
              for status in ("200", "503")}
    response = httpx.post(served.url + path, json={**body, "mode": "ar", "temperature": 0},
                          headers={"X-Request-Id": rid}, timeout=WAIT_S)
    events = [part.removeprefix("data: ") for part in response.text.split("\n\n") if part.startswith("data: ")]
    assert response.status_code == 200 and any('"error"' in event for event in events), response.text
    line = line_of(log_lines, rid)
    assert line["status"] == 200 and "engine replica" in line["error"], line
    after = {status: metric(served.url, "refusion_api_requests_total", endpoint=endpoint, status=status)
             for status in ("200", "503")}
    assert after == {"200": before["200"] + 1, "503": before["503"]}


def test_a_drain_logs_its_refusals_and_cuts_streams_with_a_reason_of_their_own(log_lines):
    """While the server drains, a new request's 503 is logged like any refusal (it had no line) and adds no
    end-to-end sample; a stream still running at the drain timeout ends with its error event, logged as
    the 200 it was, and the engine counts it as finished by `shutdown`, not as `cancelled` (a client that
    left)."""
    with local_app(SHIPPED_MODEL) as app, httpx.Client(base_url=app.url, timeout=WAIT_S) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True},
                         headers={"X-Request-Id": "drain-cut"}) as running:
            lines = running.iter_lines()
            assert running.status_code == 200 and next(lines).startswith("data: ")
            e2e_before = metric(app.url, "refusion_api_e2e_latency_seconds_count", endpoint="completions")
            app.app.state.gate.start_draining(retry_after_s=3)
            refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                headers={"X-Request-Id": "drain-refused"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            line = line_of(log_lines, "drain-refused")
            assert (line["status"], line["endpoint"]) == (503, "completions") and "shutting down" in line["error"]
            assert metric(app.url, "refusion_api_e2e_latency_seconds_count", endpoint="completions") == e2e_before
            app.call(app.engine.stop(drain_timeout_s=0))  # the drain timeout has passed
            rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "shutting_down"
        line = line_of(log_lines, "drain-cut")
        assert line["status"] == 200 and "engine stopped" in line["error"], line
        assert metric(app.url, "refusion_requests_finished_total", reason="shutdown") == 1
        assert metric(app.url, "refusion_requests_finished_total", reason="cancelled") == 0
        assert metric(app.url, "refusion_api_requests_total", endpoint="completions", status="503") == 1


@pytest.mark.parametrize("bad", ["a b", "x" * 3000, "caf\u00e9", "a\tb", "<script>"])
def test_a_malformed_request_id_is_a_400_naming_the_header_on_every_route(served, log_lines, bad):
    """An X-Request-Id with spaces, tabs, non-ASCII or 3,000 characters went on into the access log and the
    response header (and was refused only on the generating routes): now every route answers 400 naming
    the header and what it may hold, in its own error shape, before anything repeats it, and a generating
    route logs the refusal (under no id: the client's is not written anywhere). Ids clients send pass."""
    headers = {"X-Request-Id": bad.encode("latin-1")}
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as http:
        before = len([line for line in log_lines if line.get("status") == 400 and line["endpoint"] == "completions"])
        for method, path, body in (("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
                                   ("POST", "/infill", {"input_prefix": "x", "input_suffix": ""}),
                                   ("GET", "/v1/models", None), ("POST", "/tokenize", {"content": "x"})):
            refused = http.request(method, path, json=body, headers=headers)
            assert refused.status_code == 400, (path, refused.text)
            message = refused.json()["error"]["message"]
            assert "X-Request-Id" in message and "1-200 letters, digits" in message, (path, message)
            assert bad not in refused.headers.get("x-request-id", "") and bad not in message
        lines = [line for line in log_lines if line.get("status") == 400 and line["endpoint"] == "completions"]
        assert len(lines) == before + 1 and lines[-1]["request_id"] is None and "X-Request-Id" in lines[-1]["error"]
        # probes and scrapes answer whatever id a load balancer adds (helper-161: /health said 400)
        assert [http.get(path, headers=headers).status_code for path in ("/health", "/metrics")] == [200, 200]
        for good in ("3f2a9c1e-7b4d-4e8a-9f10-2b6c8d0e1a57", "0123abcdef", "editor.session_7:req-12", "aGVsbG8+/w=="):
            ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": good})
            assert ok.status_code == 200 and ok.json()["id"] == good, ok.text


def test_an_empty_request_id_is_no_id(served):
    """nginx's `proxy_set_header X-Request-Id $http_x_request_id` sends the header empty for every client
    that sent none: that was a 400 on every generating route. Now the request gets a fresh id, as without
    the header, and the response carries it."""
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as http:
        for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
            answered = http.post(path, json=body, headers={"X-Request-Id": ""})
            assert answered.status_code == 200, (path, answered.text)
            ids = [i for i in answered.headers.get_list("x-request-id") if i]
            assert ids == [answered.json()["id"]], (path, answered.headers.get_list("x-request-id"))
        infill = http.post("/infill", json={"input_prefix": "x", "input_suffix": "", "n_predict": 2},
                           headers={"X-Request-Id": ""})
        assert infill.status_code == 200 and [i for i in infill.headers.get_list("x-request-id") if i], infill.text


async def test_a_malformed_request_id_closes_the_editor_socket_naming_it(served):
    url = served.url.replace("http://", "ws://") + "/v1/editor"
    async with websockets.connect(url, additional_headers={"X-Request-Id": "a b"}) as ws:
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT_S)
    assert closed.value.rcvd.code == 1008 and "X-Request-Id" in closed.value.rcvd.reason


@pytest.mark.parametrize("path, body", [
    ("/infill", {"input_prefix": "def add(a, b):\n", "prompt": "    ", "input_suffix": "\n", "n_predict": 16}),
    ("/v1/completions", {"prompt": "def add(a, b):\n    ", "suffix": "\n", "max_tokens": 16}),
])
def test_a_whole_infill_is_timed_to_its_engines_first_token(served, log_lines, path, body):
    """A non-streamed infill (/infill, completions with `suffix`) recorded its time to first token when it
    answered (385 ms of a 386 ms request), as its candidates run to their end before the route has its
    one result; now it is the engine's first token, as a non-streamed plain completion records it. Its
    candidates are held for a second after their first token, so the two times must be that far apart."""
    rid = "ttft" + path.replace("/", "-")
    answers: list[httpx.Response] = []
    served.client.held.add(rid + ".")
    try:
        asking = threading.Thread(target=lambda: answers.append(httpx.post(
            served.url + path, json={**body, "temperature": 0, "mode": "ar"}, headers={"X-Request-Id": rid},
            timeout=WAIT_S)))
        asking.start()
        wait_for(lambda: any(i.startswith(rid + ".") for i in served.client.started), "the first token")
        time.sleep(1.0)
    finally:
        served.client.held.clear()
    asking.join(WAIT_S)
    [answer] = answers
    assert answer.status_code == 200, answer.text
    line = line_of(log_lines, rid)
    assert line["ttft_ms"] is not None and line["ttft_ms"] <= line["e2e_ms"] - 500, line


def test_a_request_log_line_goes_to_stderr_in_one_write(monkeypatch):
    """print() writes a message and its newline apart; Ray Serve's access log (another thread, the same
    stderr) landed between them in CI, and the line ran into the next (`..."}INFO ... POST /completion`).
    Each line now goes out whole, in one write."""
    import sys

    from integrations import http_metrics

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    import structlog

    monkeypatch.setattr(sys, "stderr", Recorder())
    # request_log's wiring (the module's own object may be a test's capture while this module's fixtures run)
    log = structlog.wrap_logger(structlog.PrintLogger(http_metrics._CurrentStderr()),
                                processors=[structlog.processors.JSONRenderer()])
    log.info("request", request_id="one-write", status=200)
    log.info("request", request_id="two-writes", status=499)
    assert len(writes) == 2 and all(w.endswith("\n") and w.count("\n") == 1 for w in writes), writes
    assert [json.loads(w)["request_id"] for w in writes] == ["one-write", "two-writes"]
