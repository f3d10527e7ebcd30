"""End to end: the Ray Serve app on a real tiny model and the real Engine, through the openai SDK."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import openai
import pytest
import websockets
import websockets.sync.client
from prometheus_client.parser import text_string_to_metric_families

from serve_testbed import API_KEY, STRICT_ALIAS, long_stream, long_stream_admitted

TOOLS = [{
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}]
AR = {"mode": "ar"}
# The random tiny model's greedy choice is mostly <|mask|> (decodes to ""); seeded sampling gives text and
# is deterministic per request, so runs can be compared exactly.
SAMPLED = {"temperature": 1.0, "seed": 7}


def test_models_list(client, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model_dir.name]
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name


def test_completion_plain(client, model):
    prompt = "def add(a, b):\n"
    first = client.completions.create(model=model, prompt=prompt, max_tokens=12, **SAMPLED, extra_body=AR)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=12, **SAMPLED, extra_body=AR)
    choice = first.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens > 0 and 0 < first.usage.completion_tokens <= 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.model_extra["refusion"]["mode"] == "ar"
    assert choice.text and again.choices[0].text == choice.text  # same seed: same text


def test_completion_refusion_mode_and_odd_max_tokens(client, model):
    # 13 tokens is no multiple of the default slot: the ingress fits the blocks and caps the output.
    out = client.completions.create(model=model, prompt="import os\n", max_tokens=13, extra_body={"mode": "refusion"})
    assert out.usage.completion_tokens <= 13
    assert out.model_extra["refusion"]["mode"] == "refusion"


def test_completion_stop(client, model):
    prompt = "class Parser:\n    def parse(self"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=24, **SAMPLED, extra_body=AR)
    text = full.choices[0].text
    words = re.findall(r"[A-Za-z]{2,}", text[2:])
    assert words, f"the tiny model should produce some letters: {text!r}"
    stop = words[0]
    cut = client.completions.create(model=model, prompt=prompt, max_tokens=24, **SAMPLED, stop=[stop], extra_body=AR)
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completion_stream_matches_plain(client, model):
    prompt = "for i in range(10):\n"
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=16, **SAMPLED, extra_body=AR)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=16, **SAMPLED, stream=True,
                                            stream_options={"include_usage": True}, extra_body=AR))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and text == plain.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_plain_and_stream(client, model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=16, **SAMPLED, extra_body=AR)
    message = plain.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert plain.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, **SAMPLED,
                                                 stream=True, extra_body=AR))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert message.content and "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def _assert_well_formed_tool_answer(message, finish_reason):
    if message.tool_calls:
        assert finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.type == "function" and call.function.name == "get_weather"
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert isinstance(message.content, str) and finish_reason in ("stop", "length")


def test_chat_with_tools_is_well_formed(client, model):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    out = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=24)
    _assert_well_formed_tool_answer(out.choices[0].message, out.choices[0].finish_reason)
    stream = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=24, stream=True)
    finish = [c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0] in ("stop", "length", "tool_calls")
    # Second turn: the SDK sends the assistant's tool call and the tool's result back.
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    follow_up = messages + [{"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'}]
    out = client.chat.completions.create(model=model, messages=follow_up, tools=TOOLS, max_tokens=16)
    _assert_well_formed_tool_answer(out.choices[0].message, out.choices[0].finish_reason)
    assert out.usage.prompt_tokens > client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, max_tokens=1).usage.prompt_tokens


def test_bad_fields_are_400_naming_the_field(client, model):
    cases = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 7}, "temperature"),
        ({"extra_body": {"slot_threshold": 1.5}}, "slot_threshold"),
        ({"extra_body": {"mode": "fast"}}, "mode"),
        ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
        # Passes the HTTP schema, rejected by the engine (InvalidRequestError over Ray): a penalty is AR's
        ({"max_tokens": 4, "frequency_penalty": 1, "extra_body": {"mode": "refusion"}}, "mode"),
        ({"extra_body": {"priority": 3}}, "priority"),  # vLLM's integer priority: only 0, its default
    ]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt="x = 1", **kwargs)
        assert err.value.status_code == 400
        assert err.value.body["param"] == field and field in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-nope", prompt="x")
    assert err.value.body["param"] == "model"
    vllm_default = client.completions.create(model=model, prompt="x", max_tokens=2, extra_body={"priority": 0})
    assert vllm_default.choices  # vLLM's integer priority 0 (its default) was a 400


def test_routes_that_are_not_served_say_so(client, model):
    """An OpenAI route this server does not offer was a bare 404 "Not Found" (and 405 "Method Not Allowed"):
    OpenAI's "Invalid URL (...)" wording and where the routes are listed, or the method to use."""
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model=model, input="x")
    assert err.value.body["message"].startswith("Invalid URL (POST /v1/embeddings): not a route of this server")
    with pytest.raises(openai.APIStatusError) as err:
        client.models.delete(model)
    assert err.value.status_code == 405 and err.value.body["message"] == f"DELETE is not allowed on /v1/models/{model}: use GET"


def test_a_base_url_without_v1_is_told_to_add_it(serve_base_url, model):
    """The OpenAI SDK with base_url missing its /v1 (a common slip; llama.cpp serves both forms) gets a 404
    that says which route was meant, not the list of routes this server does not offer."""
    bare = openai.OpenAI(base_url=serve_base_url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as err:
        bare.completions.create(model=model, prompt="x", max_tokens=1)
    assert err.value.body["message"] == ("Invalid URL (POST /completions): not a route of this server; did you mean "
                                         "/v1/completions? An OpenAI client's base_url ends in /v1")
    with pytest.raises(openai.NotFoundError) as err:  # not served under /v1 either: the routes are listed
        bare.embeddings.create(model=model, input="x")
    assert "GET /docs and docs/api.md list the routes" in err.value.body["message"]
    with httpx.Client(base_url=serve_base_url, timeout=60) as http:
        slash = http.post("/chat/completions/", json={}).json()["error"]["message"]
        get = http.get("/completions").json()["error"]["message"]  # POST only there: no hint for a GET
        models = http.get("/models").json()["error"]["message"]
        one = http.get("/models/nope").json()["error"]["message"]  # /v1/models/nope: a 404 too (no such model)
    assert "did you mean /v1/chat/completions?" in slash and "did you mean" not in get
    assert "did you mean /v1/models?" in models and "did you mean" not in one


def _metrics_text(url: str) -> str:
    """GET /metrics with the engine replica's part. The ingress leaves that part out when the replica does
    not answer within REPLICA_METRICS_TIMEOUT_S (1.5 s), a Ray call that a loaded machine can make slower;
    an engine counter then read 0 and a test's wait for it to move passed at once: read again then."""
    deadline = time.monotonic() + 120
    while True:
        text = httpx.get(url + "/metrics", timeout=30).text
        if 'refusion_service_replicas{state="unreachable"} 0.0' in text and 'state="answering"} 0.0' not in text:
            return text
        assert time.monotonic() < deadline, f"no engine replica answered /metrics for 120 s: {text[-500:]}"
        time.sleep(0.2)


def _metric(url: str, name: str, **labels) -> float:
    # the ingress's own metrics (refusion_api_*) are there with or without an engine replica (one may be dead)
    text = httpx.get(url + "/metrics", timeout=30).text if name.startswith("refusion_api_") else _metrics_text(url)
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_disconnect_cancels_engine_request(serve_base_url, wait_until):
    def cancelled() -> float:
        return _metric(serve_base_url, "refusion_requests_finished_total", reason="cancelled")

    before = cancelled()
    with httpx.Client(base_url=serve_base_url, timeout=30) as http:
        with long_stream(http, "/v1/completions") as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")  # decoding has started
        wait_until.blocking(lambda: cancelled() > before, "the engine to cancel the request after the client left")
        # Nothing is left running (Ray Serve's health probe may hold the engine for one forward: polled).
        wait_until.blocking(lambda: http.get("/v1/engine").json()["engine"]["running"] == 0, "an idle engine")
        # A non-streaming request whose client gives up is cancelled too. The client leaves once the engine
        # decodes the request (its tokens counted; the health probe's are not): a 1 s client timeout
        # could run out before the request reached the engine on a loaded machine, and then there was
        # nothing for the engine to cancel (helper-221)
        before, tokens = cancelled(), _metric(serve_base_url, "refusion_generation_tokens_total")
        # (min_tokens: no end of text before the client leaves)
        body = json.dumps({"prompt": "x", "max_tokens": 3000, "min_tokens": 3000, "mode": "ar"}).encode()
        host, port = serve_base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(body), body))
            wait_until.blocking(lambda: _metric(serve_base_url, "refusion_generation_tokens_total") > tokens,
                                "the engine to decode the non-streaming request")
        wait_until.blocking(lambda: cancelled() > before, "the engine to cancel the non-streaming request")


def test_metrics_parse_and_move(serve_base_url, client, model, wait_until):
    names = ("refusion_api_requests_total", "refusion_api_time_to_first_token_seconds_count",
             "refusion_api_completion_tokens_total", "refusion_generation_tokens_total", "refusion_api_e2e_latency_seconds_count")
    before = {n: _metric(serve_base_url, n) for n in names}
    client.completions.create(model=model, prompt="print(", max_tokens=8, extra_body=AR)
    # The ingress records a request when its response has been sent, just after the client has it.
    wait_until.blocking(lambda: all(_metric(serve_base_url, n) > before[n] for n in names), f"every one of {names} to move")
    families = {f.name for f in text_string_to_metric_families(_metrics_text(serve_base_url))}
    for family in ("refusion_requests_running", "refusion_requests_waiting", "refusion_kv_cache_usage_ratio",
                   "refusion_prefix_cache_hit_rate", "refusion_tokens_per_forward", "refusion_api_mode_decisions",
                   "refusion_api_queue_time_seconds", "refusion_api_inter_token_latency_seconds"):
        assert family in families


def test_api_keys(strict_base_url):
    with httpx.Client(base_url=strict_base_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        missing = http.get("/v1/models")
        error = missing.json()["error"]  # OpenAI's 401: invalid_request_error, code invalid_api_key
        assert missing.status_code == 401 and (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    sdk = openai.OpenAI(base_url=strict_base_url + "/v1", api_key=API_KEY, max_retries=0)
    ids = [m.id for m in sdk.models.list().data]  # the app's two served ids (--served-model-name a b)
    assert ids[1:] == [STRICT_ALIAS] and sdk.models.retrieve(STRICT_ALIAS).id == STRICT_ALIAS
    with pytest.raises(openai.NotFoundError, match=f"use '{ids[0]}' or '{STRICT_ALIAS}'"):
        sdk.completions.create(model="gpt-5", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict_base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_overload_is_503_with_retry_after(strict_base_url):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    sdk = openai.OpenAI(base_url=strict_base_url + "/v1", api_key=API_KEY, max_retries=0)
    with httpx.Client(base_url=strict_base_url, timeout=30) as http:
        with long_stream_admitted(http, "/v1/completions", auth) as lines:  # takes the engine's only slot
            assert next(lines).startswith("data: {")
            with pytest.raises(openai.APIStatusError) as err:
                sdk.completions.create(model=sdk.models.list().data[0].id, prompt="x", max_tokens=4)
    assert err.value.status_code == 503
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["type"] == "overloaded_error"


def test_engine_replica_health_check(serve_base_url):
    from ray import serve

    handle = serve.get_deployment_handle("RefusionEngine", app_name="refusion")
    assert handle.check_health.remote().result(timeout_s=30) is None


def test_drain_ends_in_flight_requests_cleanly(serve_port, tiny_model_dir):
    """A third app, drained while a long generation streams: the stream ends with an error event and
    [DONE] (not a severed connection), new requests get 503, an idle editor socket opened before the
    drain is closed with 1001 and a new one with 1013. The error says the engine stopped it: the
    drain timeout (2 s) ended it, not its own end (3000 tokens, tens of seconds on 2 cores); how fast
    is bench/'s business, not a test's. The engine is paused (POST /pause) once the stream runs, so it
    cannot end before the drain starts: signal_drain starts the drain signal's actor first, a new process
    whose start a loaded machine makes as slow as it likes."""
    import ray
    from ray import serve

    from serve_testbed import serve_config, wait_healthy
    from integrations.serve_app import signal_drain, build_app

    config = serve_config(tiny_model_dir)
    serve.run(build_app(config), name="refusion-drain", route_prefix="/drain")
    url = f"http://127.0.0.1:{serve_port}/drain"
    wait_healthy(url)
    signal = None
    editor = f"ws://127.0.0.1:{serve_port}/drain/v1/editor"
    try:
        # (a read may wait out the paused stream and the signal's start: a generous timeout)
        with httpx.Client(base_url=url, timeout=120) as http, websockets.sync.client.connect(editor) as idle:
            with long_stream(http, "/v1/completions") as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: {")
                paused = http.post("/pause", params={"mode": "keep"})
                assert paused.status_code == 200 and all(paused.json()["replicas"].values()), paused.text
                signal = signal_drain("refusion-drain")  # the drain ends the pause (Engine.stop)
                rest = [line for line in lines if line]
            refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
            with pytest.raises(websockets.exceptions.ConnectionClosed) as gone:  # open before the drain
                idle.recv(timeout=30)
        assert gone.value.rcvd.code == 1001  # "going away": closed by the server, not dropped
        with websockets.sync.client.connect(editor) as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1013  # "try again later", as the docs promise (not a 403)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["type"] == "overloaded_error" and "engine stopped" in error["message"]
        assert refused.status_code == 503 and refused.headers["retry-after"]
    finally:
        serve.delete("refusion-drain")
        if signal is not None:
            ray.kill(signal)
