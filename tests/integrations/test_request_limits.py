"""integrations/request_limits.py and auth.OriginGuard without Ray: JSON reading, the body limit, prompt
and context limits, tokenizing off the event loop, browser origins, and the editor paths that use them.
(The same behaviour through the real Ray Serve app: test_serve_input_limits.py, test_bad_input_corpus.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
from test_editor_fakes import FakeEngineClient, bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.auth import HostGuard, OriginGuard, normalize_origin
from integrations.editor.infill import MAX_CHARS_PER_TOKEN, MAX_CONTEXT_TOKENS, MAX_PREFIX_TOKENS, MAX_SUFFIX_TOKENS, build_infill_prompt
from integrations.openai_api import APISettings, create_app
from integrations.request_body import BodyLimitMiddleware, parse_json_object
from integrations.request_limits import InputError, MAX_JSON_DEPTH, MAX_OBJECT_KEYS, RequestLimits, clipped, sampling_temperature
from integrations.serve_config import ServeConfig
from scheduler.api import Delta, FinishReason, InvalidRequestError, Mode

# --- JSON bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, field, words", [
    (b"{", None, "not valid JSON"),
    (b"[" * 100_000, None, "deeper than 64"),
    (b'{"a": "\xff"}', None, "not UTF-8"),
    (b"[1, 2]", None, "got an array"),
    (b"null", None, "got null"),
    (b'{"t": NaN}', "t", "NaN"),  # (the field was not named: helper-143)
    (b'{"a": [1, {"t": -Infinity}]}', "a.1.t", "Infinity"),
    (b'{"t": 1e400}', "t", "finite"),
    (b'{"n": ' + b"7" * 5000 + b"}", "n", "number"),
    (json.dumps({"messages": [{"content": "ok\ud800"}]}).encode(), "messages.0.content", "lone UTF-16 surrogate"),
    (json.dumps({"tools": {"\udc00key": 1}}).encode(), "tools.\\udc00key", "lone UTF-16 surrogate"),
    (b'{"stop": ["ok", "x\\ud800"]}', "stop.1", "lone UTF-16 surrogate"),  # a string item of an array: its index
])
def test_malformed_json_names_what_and_where(raw, field, words):
    with pytest.raises(InputError) as err:
        parse_json_object(raw)
    assert err.value.status == 400 and err.value.field == field and words in str(err.value)


def test_nesting_is_limited_below_the_recursion_limit():
    def nested(levels):
        value = 1
        for _ in range(levels):
            value = [value]
        return {"a": value}

    assert parse_json_object(json.dumps(nested(MAX_JSON_DEPTH - 1)).encode())
    with pytest.raises(InputError) as err:
        parse_json_object(json.dumps(nested(MAX_JSON_DEPTH + 5)).encode())
    assert err.value.field.startswith("a.0.0") and "deeper than 64" in err.value.message


def test_an_object_of_more_keys_than_any_route_takes_is_refused_before_validation():
    """Each unknown key is one pydantic error built and worded on the event loop: a 5 MB body of 300k keys
    held every route ~3 s (helper-250). An object may hold MAX_OBJECT_KEYS keys, at any depth."""
    most = {f"k{i}": i for i in range(MAX_OBJECT_KEYS)}
    assert len(parse_json_object(json.dumps({"prompt": "x", "logit_bias": most}).encode())["logit_bias"]) == MAX_OBJECT_KEYS
    for body, field, keys in (({"prompt": "x", **most}, "body", MAX_OBJECT_KEYS + 1),
                              ({"messages": [{"role": "user", "content": "x", **most}]}, "messages.0", MAX_OBJECT_KEYS + 2)):
        with pytest.raises(InputError) as err:
            parse_json_object(json.dumps(body).encode())
        assert err.value.status == 400 and err.value.field == field, (err.value.field, err.value.message)
        assert err.value.message == (f"holds {keys:,} keys; an object may hold at most {MAX_OBJECT_KEYS:,}: send "
                                     "only the fields the route takes")


def test_valid_bodies_parse_and_empty_is_an_empty_object():
    assert parse_json_object(b"") == {} and parse_json_object(b"  ") == {}
    emoji = json.dumps({"prompt": "caf\u00e9 \ud83d\ude00", "ids": list(range(1000))}).encode()  # a surrogate *pair*
    assert parse_json_object(emoji)["prompt"] == "caf\u00e9 \U0001F600"


# --- the body limit (ASGI) -------------------------------------------------------------------------


async def _run(app, messages: list[dict], headers=()) -> tuple[list[dict], list]:
    """Call an ASGI app; receive() pops `messages` (what is left shows what was not read). Returns
    (sent messages, messages)."""
    sent, pending = [], messages

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/completions", "root_path": "", "headers": list(headers), "query_string": b""}
    await app(scope, receive, send)
    return sent, messages


async def test_body_limit_by_declared_length_and_by_count():
    seen = []

    async def inner(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})

    def chunks(n):
        return [{"type": "http.request", "body": b"12345", "more_body": True} for _ in range(n)]

    app = BodyLimitMiddleware(inner, max_body_bytes=10)
    sent, _ = await _run(app, [{"type": "http.request", "body": b"x"}], [(b"content-length", b"11")])
    assert sent[0]["status"] == 413 and not seen
    assert "max_body_bytes" in json.loads(sent[1]["body"])["error"]["message"]
    sent, _ = await _run(app, chunks(3))
    assert sent[0]["status"] == 413 and not seen
    # The rest of an over-limit body is read (and dropped) before the 413, so the client sees it.
    _, left = await _run(app, chunks(3) + [{"type": "http.request", "body": b"6789"}, {"type": "http.request", "body": b"next"}])
    assert left == [{"type": "http.request", "body": b"next"}]
    _, left = await _run(app, chunks(2), [(b"content-length", str(1 << 40).encode())])
    assert len(left) == 2  # declared beyond DISCARD_UP_TO_BYTES: answered without reading
    sent, _ = await _run(app, chunks(1) + [{"type": "http.request", "body": b"678"}])
    assert sent[0]["status"] == 200
    assert seen == [{"type": "http.request", "body": b"12345678", "more_body": False}, {"type": "http.disconnect"}]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "counted"])
async def test_a_body_of_exactly_max_body_bytes_runs_the_app_and_one_byte_more_is_a_413(declared):
    """max_body_bytes is the most a body may hold: a body of exactly that many bytes reaches the app
    whole, whether its Content-Length says so or its bytes are counted as they arrive; one byte more
    is a 413 and the app never runs."""
    seen = []

    async def inner(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})

    app = BodyLimitMiddleware(inner, max_body_bytes=10)
    for body, status in ((b"1234567890", 200), (b"12345678901", 413)):
        headers = [(b"content-length", str(len(body)).encode())] if declared else []
        messages = [{"type": "http.request", "body": body[:5], "more_body": True},
                    {"type": "http.request", "body": body[5:]}]
        sent, _ = await _run(app, messages, headers)
        assert sent[0]["status"] == status, (body, sent)
    assert seen == [{"type": "http.request", "body": b"1234567890", "more_body": False}]


async def test_a_body_that_stops_arriving_is_a_408_and_the_app_never_runs():
    """A stalled upload (headers and part of the body, then nothing) held an ingress call slot for good;
    about a thousand of them hung the service. Each pause between body messages is bounded."""
    ran = []

    async def inner(scope, receive, send):
        ran.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def stalled(first: list[dict]):
        sent = []

        async def receive():
            if first:
                return first.pop(0)
            await asyncio.Event().wait()  # the client sends no more, and stays connected

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/v1/completions", "headers": [(b"content-length", b"1000")]}
        await asyncio.wait_for(BodyLimitMiddleware(inner, max_body_bytes=10_000, body_timeout_s=0.2)(scope, receive, send), 10)
        return sent

    for first in ([], [{"type": "http.request", "body": b'{"model":', "more_body": True}]):
        sent = await stalled(first)
        assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"] and not ran
        error = json.loads(sent[1]["body"])["error"]
        assert error["code"] == "request_timeout" and "body_timeout_s" in error["message"], error
    # a body whose parts keep coming is read whole, however long it takes in all
    parts = [{"type": "http.request", "body": b"ab", "more_body": True}] * 5 + [{"type": "http.request", "body": b"c"}]

    async def slow():
        await asyncio.sleep(0.01)  # each pause far inside the timeout (a loaded CI machine stalls ~0.1 s)
        return parts.pop(0)

    sent = []

    async def keep(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/completions", "headers": []}
    await BodyLimitMiddleware(inner, max_body_bytes=10_000, body_timeout_s=1.0)(scope, slow, keep)
    assert sent[0]["status"] == 200 and ran == [{"type": "http.request", "body": b"ababababab" + b"c", "more_body": False}]
    # a body trickled inside each pause ends at the whole body's deadline, 6 pauses (6 s here). (Pauses
    # of 0.1 s against a 0.2 s timeout failed 2 runs in 30 on a loaded machine: helper-141.)
    ran.clear(), sent.clear()

    async def trickle():
        await asyncio.sleep(0.01)
        return {"type": "http.request", "body": b"a", "more_body": True}  # never the last part

    await asyncio.wait_for(BodyLimitMiddleware(inner, max_body_bytes=10_000, body_timeout_s=1.0)(scope, trickle, keep), 30)
    assert sent[0]["status"] == 408 and not ran
    assert "took longer than 6 s in all" in json.loads(sent[1]["body"])["error"]["message"]


# --- prompt and context limits ----------------------------------------------------------------------


def test_prompt_chars_default_to_eight_per_context_token():
    limits = RequestLimits(context_length=4096)
    assert limits.prompt_chars == 32_768 and RequestLimits(max_prompt_chars=10, context_length=4096).prompt_chars == 10
    limits.check_chars("prompt", "a" * 32_768)
    with pytest.raises(InputError, match="max_prompt_chars") as err:
        limits.check_chars("prompt", "a" * 32_769)
    assert err.value.field == "prompt"


def test_temperatures_below_epsilon_mean_greedy():
    assert sampling_temperature(1e-300) == 0.0 and sampling_temperature(0.7) == 0.7 and sampling_temperature(None) is None


class _BlockingTokenizer:
    """Wraps a tokenizer; encode() of long texts waits for `release` (bounded) and records its calls."""

    def __init__(self, inner, block_over: int = 10_000):
        self.inner, self.block_over = inner, block_over
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), []

    def encode(self, text, add_special_tokens=True, **options):
        self.calls.append(len(text))
        if len(text) > self.block_over:
            self.entered.set()
            assert self.release.wait(30), "never released: the test did not get a response while encoding"
        return self.inner.encode(text, add_special_tokens=add_special_tokens, **options)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def _app(client, **settings) -> httpx.AsyncClient:
    app = create_app(APISettings(model_name="fake-model", limits=RequestLimits(context_length=4096), **settings), client)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


async def test_tokenizing_runs_off_the_event_loop(bpe_tokenizer, wait_until):  # noqa: F811
    """While one request's prompt is being tokenized, the same event loop answers /health."""
    tokenizer = _BlockingTokenizer(bpe_tokenizer)
    async with _app(FakeEngineClient(tokenizer)) as http:
        long_request = asyncio.ensure_future(http.post("/tokenize", json={"content": "x = 1\n" * 3000}))
        await wait_until(lambda: tokenizer.entered.is_set() or long_request.done(), "encode() in the pool thread")
        assert tokenizer.entered.is_set(), long_request
        health = await http.get("/health")  # would never be served if encode() held the loop
        assert health.status_code == 200 and not long_request.done()
        tokenizer.release.set()
        assert (await long_request).status_code == 200


async def test_slow_grammar_checks_never_hold_other_requests_tokenizing(bpe_tokenizer, wait_until, monkeypatch):  # noqa: F811
    """Requests whose schemas take seconds to check (llguidance, a 5,000-property schema) wait for each
    other in the grammar pool; another request's tokenizing goes on meanwhile. They shared the tokenizer
    pool: GRAMMAR_THREADS blocked checks held /tokenize (and every prompt) until they ended."""
    from integrations import structured_output
    from integrations.request_limits import GRAMMAR_THREADS

    entered, release = threading.Semaphore(0), threading.Event()
    real = structured_output.json_grammar

    def slow_json_grammar(*args, **kwargs):
        entered.release()
        assert release.wait(60), "never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(structured_output, "json_grammar", slow_json_grammar)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    async with _app(FakeEngineClient(bpe_tokenizer)) as http:
        slow = [asyncio.ensure_future(http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "response_format": schema}))
            for _ in range(GRAMMAR_THREADS + 1)]
        for _ in range(GRAMMAR_THREADS):  # every grammar thread is taken
            await wait_until(lambda: entered.acquire(blocking=False), "a grammar check to start")
        try:
            counted = await asyncio.wait_for(http.post("/tokenize", json={"content": "x = 1"}), 30)
            assert counted.status_code == 200 and counted.json()["count"] > 0
            assert not any(task.done() for task in slow)  # the checks are still held
        finally:
            release.set()
        answers = [await task for task in slow]
        assert [a.status_code for a in answers] == [200] * len(slow), answers[0].text


async def test_over_long_prompt_is_refused_before_tokenizing(bpe_tokenizer):  # noqa: F811
    tokenizer = _BlockingTokenizer(bpe_tokenizer, block_over=10**9)
    async with _app(FakeEngineClient(tokenizer)) as http:
        for path, body in (("/v1/completions", {"prompt": "a" * 40_000}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 40_000}]}),
                           ("/tokenize", {"content": "a" * 40_000})):
            response = await http.post(path, json=body)
            assert response.status_code == 400 and "max_prompt_chars" in response.text, response.text
    assert tokenizer.calls == []


async def test_suffix_completion_has_the_editor_limits_not_the_context(fake_client):  # noqa: F811
    """With `suffix`, /v1/completions is an infill: a prompt longer than max_prompt_chars and than the
    context is cut to the infill budgets (as /infill and the editor protocol do), not refused."""
    async with _app(fake_client) as http:
        long = await http.post("/v1/completions", json={"prompt": "x = 1\n" * 8000, "suffix": "\n", "max_tokens": 8})
        assert long.status_code == 200, long.text
        assert len(fake_client.requests[0].prompt_ids) == MAX_PREFIX_TOKENS
        assert long.json()["usage"]["prompt_tokens"] == MAX_PREFIX_TOKENS + len(fake_client.requests[0].suffix_ids)
        too_long = await http.post("/v1/completions", json={"prompt": "x" * 200_001, "suffix": "\n"})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"


def test_infill_prompt_tokenizes_at_most_its_budgets(bpe_tokenizer):  # noqa: F811
    tokenizer = _BlockingTokenizer(bpe_tokenizer, block_over=10**9)
    prompt = build_infill_prompt(tokenizer, "def f():\n    pass\n" * 20_000, "x = 1\n" * 20_000,
                                 [{"path": "big.py", "text": "y = 2\n" * 20_000}])
    assert prompt.truncated and len(prompt.prompt_ids) == MAX_PREFIX_TOKENS + prompt.context_tokens
    assert len(prompt.suffix_ids) == MAX_SUFFIX_TOKENS and 0 < prompt.context_tokens <= MAX_CONTEXT_TOKENS
    assert max(tokenizer.calls) <= MAX_PREFIX_TOKENS * MAX_CHARS_PER_TOKEN


# --- /infill streaming errors -----------------------------------------------------------------------


class _FailsMidStream(FakeEngineClient):
    """Streams one token, then the engine refuses the request."""

    async def stream(self, req):
        ids = self.tokenizer.encode("total", add_special_tokens=False)
        yield Delta(req.request_id, "total", ids, mode=Mode.AR)
        await asyncio.sleep(0)
        raise InvalidRequestError("stop", "has 20 strings; give at most 16")


async def test_infill_stream_error_after_the_first_event_is_an_error_event(bpe_tokenizer):  # noqa: F811
    async with _app(_FailsMidStream(bpe_tokenizer)) as http:
        response = await http.post("/infill", json={"input_prefix": "x = ", "input_suffix": "", "n_predict": 16, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert response.status_code == 200 and events[0]["content"] == "total"
    assert events[-1]["error"] == {"code": 400, "message": "Field 'stop': has 20 strings; give at most 16",
                                   "type": "invalid_request_error"}


async def test_infill_stream_error_before_the_first_event_is_an_http_error(fake_client):  # noqa: F811
    fake_client.fail_with = InvalidRequestError("gen_length", "too long")
    async with _app(fake_client) as http:
        response = await http.post("/infill", json={"input_prefix": "x = ", "input_suffix": "", "stream": True})
    assert response.status_code == 400 and response.json()["error"]["message"] == "Field 'n_predict': too long"  # llama.cpp's name


# --- browser origins ---------------------------------------------------------------------------------


async def _origin_call(app, scope_type: str, path: str, origin: bytes | None, headers=()) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    headers = ([(b"origin", origin)] if origin else []) + list(headers)
    await app({"type": scope_type, "path": path, "root_path": "", "headers": headers, "query_string": b"",
               "method": "GET", "scheme": "http"}, receive, send)
    return sent


async def test_origin_guard_refuses_unlisted_browser_origins():
    async def inner(scope, receive, send):
        await send({"type": "ok"})

    guard = OriginGuard(inner, ["http://localhost:5173"])
    assert await _origin_call(guard, "websocket", "/v1/editor", None) == [{"type": "ok"}]  # editors send no Origin
    refused = await _origin_call(guard, "websocket", "/v1/editor", b"https://evil.example")
    assert refused[0]["type"] == "websocket.close" and refused[0]["code"] == 1008
    assert await _origin_call(guard, "websocket", "/v1/editor", b"http://LOCALHOST:5173") == [{"type": "ok"}]
    http = await _origin_call(guard, "http", "/infill", b"https://evil.example")
    assert http[0]["status"] == 403 and json.loads(http[1]["body"])["error"]["param"] == "Origin"
    assert await _origin_call(guard, "http", "/health", b"https://evil.example") == [{"type": "ok"}]
    assert await _origin_call(OriginGuard(inner, []), "websocket", "/v1/editor", b"null") != [{"type": "ok"}]
    assert await _origin_call(OriginGuard(inner, ["*"]), "websocket", "/v1/editor", b"https://a.b") == [{"type": "ok"}]


async def _host_call(guard, host: bytes | None, server=("127.0.0.1", 8000), path="/metrics", kind="http") -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    headers = [(b"host", host)] if host is not None else []
    await guard({"type": kind, "path": path, "root_path": "", "headers": headers, "query_string": b"",
                 "method": "GET", "server": server}, receive, send)
    return sent


async def test_a_loopback_connection_naming_a_foreign_host_is_refused_against_dns_rebinding():
    """A DNS-rebinding page (rebound.example, its name now resolving to 127.0.0.1) is same-origin with
    the server: its GET carries no Origin (nor Fetch Metadata, sent only to trustworthy origins), so it
    read /metrics and /v1/models of a server without API keys. It arrives on a loopback connection
    naming its own host: refused unless that host is an IP, localhost or in allowed_hosts (as Ollama)."""
    async def inner(scope, receive, send):
        await send({"type": "ok"})

    guard = HostGuard(inner, ["llm.example.com"])
    rebound = await _host_call(guard, b"rebound.example:8000")
    assert rebound[0]["status"] == 403
    error = json.loads(rebound[1]["body"])["error"]
    assert (error["param"], error["code"]) == ("Host", "host_not_allowed") and "'rebound.example'" in error["message"]
    closed = await _host_call(guard, b"rebound.example:8000", kind="websocket")
    assert closed[0]["type"] == "websocket.close" and closed[0]["code"] == 1008
    ok = [{"type": "ok"}]
    for host in (b"127.0.0.1:8000", b"LOCALHOST:8000", b"[::1]:8000", b"app.localhost", b"LLM.example.com.:443",
                 b"10.1.2.3", b"printer.local", b"gpu-box.internal", socket.gethostname().encode() + b":8000", None):
        assert await _host_call(guard, host) == ok, host
    assert await _host_call(guard, b"rebound.example", server=("::1", 8000)) != ok  # IPv6 loopback too
    # a server listening on `::` sees a connection to 127.0.0.1 as ::ffff:127.0.0.1 (helper-182: it passed)
    assert await _host_call(guard, b"rebound.example", server=("::ffff:127.0.0.1", 8000)) != ok
    assert await _host_call(guard, b"rebound.example", server=("10.0.0.7", 8000)) == ok  # not loopback: a LAN client
    assert await _host_call(guard, b"rebound.example", server=None) == ok  # (no server address: a test transport)
    assert await _host_call(guard, b"rebound.example", path="/health") == ok
    assert await _host_call(HostGuard(inner, ["*"]), b"rebound.example") == ok
    with pytest.raises(ValueError, match="allowed_hosts: 'http://x' is not a host name"):
        HostGuard(inner, ["http://x"])


def test_allowed_origins_are_validated_in_the_config(tiny_model_dir):
    assert ServeConfig(model=str(tiny_model_dir), allowed_hosts=["LLM.Example.com."]).allowed_hosts == ["llm.example.com"]
    with pytest.raises(ValueError, match="allowed_hosts"):
        ServeConfig(model=str(tiny_model_dir), allowed_hosts=["llm.example.com:8000"])
    assert normalize_origin("HTTP://LocalHost:3000/") == "http://localhost:3000"
    config = ServeConfig(model=str(tiny_model_dir), allowed_origins=["vscode-webview://abc", "null", "*"])
    assert config.allowed_origins == ["vscode-webview://abc", "null", "*"]
    with pytest.raises(ValueError, match="allowed_origins"):
        ServeConfig(model=str(tiny_model_dir), allowed_origins=["http://localhost:3000/app"])
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServeConfig(model=str(tiny_model_dir), max_body_bytes=10)
    assert ServeConfig(model=str(tiny_model_dir)).max_body_bytes == 8 << 20


def test_seed_bounds_on_the_editor_protocol():
    from integrations.editor import protocol as rpc

    assert rpc.parse_complete({"uri": "u", "prefix": "", "seed": 2**63 - 1}, rpc.Limits()).seed == 2**63 - 1
    with pytest.raises(rpc.RpcError) as err:
        rpc.parse_complete({"uri": "u", "prefix": "", "seed": -1}, rpc.Limits())
    assert err.value.data == {"field": "seed"}


@pytest.mark.parametrize("value, request_id", [([0, 26], 26), ([0, "a", "complete"], "a"), ([0, 3, "x", {}, 5], 3),
                                               ([0, True], None), ([0, 1.5], None), ([1, 4, None, None], None), ({0: 7}, None)])
def test_a_malformed_request_frame_is_answered_with_its_id_when_one_can_be_read(value, request_id):
    # (docs/editor-protocol.md: the error's id is nil only when the id could not be read)
    import msgpack

    from integrations.editor import protocol as rpc

    with pytest.raises(rpc.RpcError) as err:
        rpc.decode_frame(msgpack.packb(value), rpc.Limits())
    assert err.value.code == rpc.INVALID_REQUEST and getattr(err.value, "request_id", None) == request_id


def test_the_server_refuses_only_frames_larger_than_max_frame_bytes():
    """decode_frame takes a frame exactly max_frame_bytes long and refuses one a byte longer with
    MESSAGE_TOO_LARGE, answered by its id (docs/editor-protocol.md, "Errors and limits")."""
    from integrations.editor import protocol as rpc

    at = rpc.encode_request(5, "complete", {"uri": "u", "prefix": "x" * 500})
    limits = rpc.Limits(max_frame_bytes=len(at))
    assert rpc.decode_frame(at, limits).params["prefix"] == "x" * 500
    over = rpc.encode_request(6, "complete", {"uri": "u", "prefix": "x" * 501})
    assert len(over) == len(at) + 1
    with pytest.raises(rpc.RpcError) as err:
        rpc.decode_frame(over, limits)
    assert err.value.code == rpc.MESSAGE_TOO_LARGE and err.value.request_id == 6


# --- a request cancelled by the server ---------------------------------------------------------------


class _CancelledByServer(FakeEngineClient):
    """Streams one token, then the request ends CANCELLED without an error (a server-side cancel by id)."""

    async def stream(self, req):
        ids = self.tokenizer.encode("total", add_special_tokens=False)
        yield Delta(req.request_id, "total", ids, mode=Mode.AR)
        yield Delta(req.request_id, "", [], finished=True, finish_reason=FinishReason.CANCELLED, mode=Mode.AR)


async def test_a_request_cancelled_by_the_server_is_a_503_not_a_short_stop(bpe_tokenizer):  # noqa: F811
    """The caller is still there, so the cancel was not theirs: they get a retryable error, never a 200
    whose cut text claims finish_reason "stop"."""
    async with _app(_CancelledByServer(bpe_tokenizer)) as http:
        response = await http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 16})
        streamed = await http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 16, "stream": True})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "cancelled by the server" in response.json()["error"]["message"]
    events = [line[len("data: "):] for line in streamed.text.split("\n\n") if line.startswith("data: ")]
    assert '"stop"' not in streamed.text and "cancelled by the server" in events[-2]


def test_chat_template_kwargs_reach_the_models_chat_template(bpe_tokenizer):  # noqa: F811
    """vLLM's chat_template_kwargs are variables of the tokenizer's own template (Qwen3's enable_thinking);
    the plain template (no tokenizer template) reads none."""
    import copy

    from integrations.chat import render_chat
    from integrations.openai_models import ChatMessage

    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = ("{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
                         "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    messages = [ChatMessage(role="user", content="hi")]
    assert render_chat(tok, messages, None)[0] == "user: hi\n"
    assert render_chat(tok, messages, None, template_kwargs={"enable_thinking": False})[0] == "<no-think>user: hi\n"
    assert render_chat(None, messages, None, template_kwargs={"enable_thinking": False}) == render_chat(None, messages, None)


def test_arrays_longer_than_the_context_are_refused_while_parsing():
    """A 2.7M-id prompt (8 MB, under the body limit) took seconds of validation on the event loop; no
    array a request needs is longer than the context, so the parse refuses it naming its path."""
    limits = RequestLimits(context_length=4096, max_sequences=320)
    assert limits.max_array_items == 4096 and RequestLimits().max_array_items is None
    assert RequestLimits(context_length=64, max_sequences=320).max_array_items == 320  # a batch of prompts
    body = json.dumps({"prompt": [[1, 2], [5] * 4097]}).encode()
    with pytest.raises(InputError, match="holds 4,097 items; an array may hold at most 4,096") as err:
        parse_json_object(body, limits.max_array_items)
    assert err.value.field == "prompt.1"
    assert parse_json_object(body)["prompt"][1] == [5] * 4097  # no limit given, none applied
    assert len(parse_json_object(json.dumps({"prompt": [5] * 4096}).encode(), 4096)["prompt"]) == 4096


def test_a_clipped_message_fits_its_limit_and_clipping_again_changes_nothing():
    """An InputError's message is clipped, and again as the APIError it becomes: the second pass must
    keep the first's count of what was left out."""
    once = clipped("m" * 1_000_000)
    assert len(once) <= 2000 and once.endswith(f"... ({1_000_000 - once.index('...'):,} more characters)")
    assert clipped(once) == once and clipped("short") == "short"


async def test_responses_instructions_too_long_name_instructions(bpe_tokenizer):  # noqa: F811
    """Responses `instructions` (a system message before the input) that make the prompt too long, over
    the character limit or the context, are a 400 naming `instructions`: it named `input`, so a client
    cut its input and kept failing. A long input with short instructions still names `input`."""
    long_chars = "a" * 40_000  # over 8 x 4,096 characters
    many_tokens = " ".join(f"q{k}z" for k in range(3000))  # under that; over 4,096 tokens
    async with _app(FakeEngineClient(bpe_tokenizer)) as http:
        for instructions, words in ((long_chars, "max_prompt_chars"), (many_tokens, "maximum context length")):
            refused = await http.post("/v1/responses", json={"input": "hi", "instructions": instructions,
                                                             "max_output_tokens": 16})
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == "instructions", refused.text[:300]
            assert words in error["message"] and "shorten the instructions" in error["message"], error["message"]
        chatty = " ".join(f"w{k}" for k in range(5000))
        refused = await http.post("/v1/responses", json={"input": chatty, "instructions": "Be brief.",
                                                         "max_output_tokens": 16})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input", refused.text[:300]
        refused = await http.post("/v1/responses", json={"input": "a" * 40_000, "instructions": "Be brief."})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input", refused.text[:300]


async def test_a_prompt_too_long_for_its_tools_names_tools(bpe_tokenizer):  # noqa: F811
    """A chat prompt over the character limit or the context because of the tools' definitions is a 400
    naming `tools` (on the Responses route too; the Messages route keeps Anthropic's wording); one whose conversation alone is too long still names
    `messages` (both named `messages`: a client cut its conversation and kept failing)."""
    user = [{"role": "user", "content": "hi"}]

    def tool(i: int, description: str) -> dict:
        return {"type": "function", "function": {"name": f"f{i}", "description": description,
                                                 "parameters": {"type": "object", "properties": {}}}}

    long_description = [tool(0, "a" * 40_000)]  # over 8 x 4,096 characters
    many = [tool(i, " ".join(f"step{i}x{k}" for k in range(40))) for i in range(60)]  # under it; over 4,096 tokens
    async with _app(FakeEngineClient(bpe_tokenizer)) as http:
        for tools, words in ((long_description, "max_prompt_chars"), (many, "maximum context length")):
            refused = await http.post("/v1/chat/completions", json={"messages": user, "tools": tools, "max_tokens": 4})
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == "tools", refused.text[:300]
            assert words in error["message"] and "offer fewer tools" in error["message"]
            responses = await http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 16, "tools": [
                {"type": "function", **t["function"]} for t in tools]})
            assert responses.status_code == 400 and responses.json()["error"]["param"] == "tools", responses.text[:300]
        chatty = [{"role": "user", "content": " ".join(f"w{k}" for k in range(5000))}]  # the conversation alone
        refused = await http.post("/v1/chat/completions", json={"messages": chatty, "tools": many[:1], "max_tokens": 4})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages", refused.text[:300]
