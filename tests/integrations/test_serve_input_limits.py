"""Issue 11's input defects, each through the real Ray Serve app (serve_base_url) with real clients:

  item 2  body and prompt limits: 413 naming max_body_bytes (declared or chunked bodies), prompt
          characters and context tokens refused with the limit named, defaults shrink to the context
          left, the ingress's memory stays bounded across near-limit requests;
  item 5  malformed bodies (100,000 nested '[') are 400 on every POST route, not 500;
  item 8  browser origins: the editor WebSocket refuses a foreign Origin at the handshake (403) and
          serves editors (no Origin) and configured origins; HTTP likewise, with CORS for the latter.

The wider bad-input corpus is test_bad_input_corpus.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import msgpack
import pytest
import websockets
import websockets.exceptions
from bad_inputs import CONTEXT, MAX_BODY_BYTES, MAX_PROMPT_CHARS, NESTED
from serve_testbed import ALLOWED_ORIGIN, ENGINE_OPTIONS

from integrations.editor import protocol as rpc


@pytest.fixture(scope="module")
def http(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=120) as client:
        yield client


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/editor"


# --- item 2: limits ------------------------------------------------------------------------------


def test_limits_are_announced(http):
    limits = http.get("/v1/engine").json()["request_limits"]
    assert limits == {"max_body_bytes": MAX_BODY_BYTES, "body_timeout_s": 10.0, "max_prompt_chars": MAX_PROMPT_CHARS,
                      "context_length": CONTEXT, "max_json_depth": 64,
                      "max_sequences": ENGINE_OPTIONS["max_running"] + ENGINE_OPTIONS["max_queue"],
                      "max_editor_connections": 450, "editor_idle_timeout_s": 600.0}  # (half the ingress's 900 slots)


def test_an_upload_that_stalls_is_a_408_after_body_timeout_s(http, serve_base_url):
    """Headers and 9 bytes of a 1,000-byte body, then nothing: a 408 naming body_timeout_s once the body
    has paused for 10 s (the test app's default), and the connection closes; the slot it held is free
    again. Meanwhile the service answers others."""
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(serve_base_url)
    with socket.create_connection((url.hostname, url.port), timeout=120) as sock:
        # Taken before the bytes go: the server's pause starts once they arrive, so the time measured here
        # can only be longer than it, however long sendall (or this thread's next turn on the CPU) takes
        began = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        assert http.get("/health").status_code == 200
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply and b"nothing came for 10 s (body_timeout_s)" in reply, reply
    assert time.monotonic() - began >= 9  # not before the body had paused that long (10 s)


def test_more_sequences_than_an_engine_can_ever_hold_are_a_400_not_a_503(http):
    """prompts x n above the engine's max_running + max_queue (8 + 16 here) could never be admitted: a
    400 naming `n` (or `prompt` for one choice each), not a retryable 503 a client would retry for ever;
    a request that fits is served (a few sequences short of the room: a health probe may hold a slot)."""
    room = ENGINE_OPTIONS["max_running"] + ENGINE_OPTIONS["max_queue"]
    sampled = {"mode": "ar", "temperature": 1.0, "seed": 3, "max_tokens": 2}
    for body, field in (({"prompt": ["a", "b"], "n": 13}, "n"), ({"prompt": ["a"] * (room + 1)}, "prompt")):
        response = http.post("/v1/completions", json={**body, **sampled})
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["param"] == field and f"at most {room} at once" in error["message"], error
    fits = http.post("/v1/completions", json={"prompt": ["a", "b"], "n": room // 2 - 2, **sampled})
    assert fits.status_code == 200 and len(fits.json()["choices"]) == room - 4, fits.text[:300]


def test_body_over_the_limit_is_413_naming_it(http):
    """The probe's 50 MB prompt stalled every route for minutes; now it is answered 413 unparsed (read
    to its end and dropped, so a client that sends before it reads sees the answer)."""
    big = b'{"prompt": "' + b"a" * (50 << 20) + b'"}'
    declared = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    chunked = http.post("/v1/completions", content=iter([big[:1 << 20]] * 9), headers={"content-type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert "max_body_bytes" in error["message"] and f"{MAX_BODY_BYTES:,}" in error["message"]
    assert http.get("/health").status_code == 200


def test_prompt_over_the_character_limit_is_400_naming_it(http):
    for path, body in (("/v1/completions", {"prompt": "a" * (MAX_PROMPT_CHARS + 1)}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * (MAX_PROMPT_CHARS + 1)}]}),
                       ("/tokenize", {"content": "a" * (MAX_PROMPT_CHARS + 1)})):
        response = http.post(path, json=body)
        assert response.status_code == 400, response.text[:300]
        message = response.json()["error"]["message"]
        assert "max_prompt_chars" in message and f"{MAX_PROMPT_CHARS:,}" in message
    # short messages whose templated prompt is over the limit: the message says what was counted
    # (4,000 messages: an array longer than the context, 4,096, is refused before anything is counted)
    many = [{"role": "user", "content": "a" * 4}] * 4000
    response = http.post("/v1/chat/completions", json={"messages": many})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text[:300]
    assert "chat template" in response.json()["error"]["message"], response.text[:300]


def test_prompt_and_max_tokens_must_fit_the_context(http):
    prompt = [5] * (CONTEXT - 6)  # room for 6 tokens
    too_many = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 7})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    assert "at most 6" in too_many.json()["error"]["message"]
    full = http.post("/v1/completions", json={"prompt": [5] * CONTEXT})
    assert full.status_code == 400 and full.json()["error"]["param"] == "prompt"
    # The default max_tokens (16) shrinks to the room left, as in vLLM.
    fits = http.post("/v1/completions", json={"prompt": prompt, "mode": "ar", "temperature": 1.0, "seed": 1})
    assert fits.status_code == 200, fits.text[:300]
    assert fits.json()["usage"]["completion_tokens"] <= 6


def _ingress_rss_bytes() -> int:
    """Resident memory of this Ray session's ingress replica (its pid ends the name of its log file)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for the session's logs
    for err in logs.glob("worker-*.err"):
        if b"ServeReplica:refusion:RefusionIngress" in err.read_bytes()[:400]:
            pid = err.stem.rsplit("-", 1)[-1]
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
    raise AssertionError(f"no ingress replica log in {logs}")


def test_ingress_memory_stays_bounded_under_near_limit_requests(http):
    """Before the limits a 10 MB prompt grew the ingress from 0.6 to 3.9 GB. Now the largest accepted
    prompt is max_prompt_chars and a larger body never reaches a route."""
    http.post("/tokenize", json={"content": "a" * 1000})  # warm up the tokenizer and the pool
    before = _ingress_rss_bytes()
    near_limit_body = b'{"content": "' + b"b" * (MAX_BODY_BYTES - 64) + b'"}'  # parsed, refused by characters
    code = Path(__file__).read_text()
    largest_prompt = (code * (MAX_PROMPT_CHARS // len(code) + 1))[:MAX_PROMPT_CHARS]
    for _ in range(3):
        assert http.post("/tokenize", content=near_limit_body).status_code == 400
        assert http.post("/tokenize", json={"content": largest_prompt}).status_code == 200
        assert http.post("/v1/completions", content=b"[" * (MAX_BODY_BYTES + 1)).status_code == 413
    grown = _ingress_rss_bytes() - before
    assert grown < 150 * 2**20, f"ingress grew by {grown / 2**20:.0f} MiB"


# --- item 5: malformed bodies ----------------------------------------------------------------------


def test_deeply_nested_body_is_400_on_every_post_route(http):
    for path in ("/v1/completions", "/v1/chat/completions", "/infill", "/tokenize"):
        response = http.post(path, content=NESTED, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text[:300])
        assert "deeper than 64 levels" in response.json()["error"]["message"]


# --- item 8: browser origins -----------------------------------------------------------------------


async def _initialize(ws) -> dict:
    await ws.send(rpc.encode_request(1, "initialize"))
    frame = msgpack.unpackb(await ws.recv(), raw=False)
    assert frame[:3] == [rpc.RESPONSE, 1, None]
    return frame[3]


async def test_editor_websocket_refuses_foreign_origins(serve_base_url):
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(ws_url(serve_base_url), origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(ws_url(serve_base_url)) as ws:  # editors send no Origin
        assert (await _initialize(ws))["protocol_version"] == rpc.PROTOCOL_VERSION
    async with websockets.connect(ws_url(serve_base_url), origin=ALLOWED_ORIGIN) as ws:
        assert (await _initialize(ws))["protocol_version"] == rpc.PROTOCOL_VERSION


def test_http_refuses_foreign_origins_and_allows_configured_ones(http):
    body = {"input_prefix": "def f(", "input_suffix": "", "n_predict": 4}
    foreign = http.post("/infill", json=body, headers={"Origin": "https://evil.example"})
    error = foreign.json()["error"]  # llama.cpp's shape on its route, the middleware's answer too
    assert foreign.status_code == 403 and (error["code"], error["type"]) == (403, "permission_error"), error
    assert error["message"] == "origin 'https://evil.example' is not allowed: add it to allowed_origins in the serve config"
    openai_route = http.post("/v1/completions", json={"prompt": "x"}, headers={"Origin": "https://evil.example"})
    assert openai_route.status_code == 403 and openai_route.json()["error"]["code"] == "origin_not_allowed"
    allowed = http.post("/infill", json=body, headers={"Origin": ALLOWED_ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = http.options("/v1/completions", headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert http.get("/health", headers={"Origin": "https://evil.example"}).status_code == 200


async def test_a_loopback_request_naming_a_foreign_host_is_refused_through_ray_serve(http, serve_base_url):
    """DNS rebinding through Ray Serve's proxy: a same-origin GET from a page on rebound.example (its name
    now resolving to 127.0.0.1) carries no Origin; it names the page's host on a loopback connection."""
    rebound = http.get("/v1/models", headers={"Host": "rebound.example:8000"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed", rebound.text
    assert http.get("/v1/models", headers={"Host": "localhost:8000"}).status_code == 200
    assert http.get("/health", headers={"Host": "rebound.example:8000"}).status_code == 200
    port = int(serve_base_url.rsplit(":", 1)[1])
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:  # the URL's host names the Host header
        async with websockets.connect(f"ws://rebound.example:{port}/v1/editor", host="127.0.0.1", port=port):
            pass
    assert refused.value.response.status_code == 403
