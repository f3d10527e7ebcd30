"""An engine 400 (scheduler.api.InvalidRequestError) names the field the route's client sent: the KV-cache
refusal of a request that can never fit said `prompt` and `gen_length` on every route ('prompt_ids' on
/infill), which a chat, Responses, Messages or llama.cpp client never sends. The app over a scripted
engine client that raises the engine's own error, as the engine raises it at admission. Also the
validation 400's hints, which are a route's own too (a chat field sent to /v1/responses)."""

from __future__ import annotations

import json

import httpx
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.openai_api import APISettings, create_app
from integrations.engine_client import EngineFailure
from scheduler.api import InvalidRequestError

NEVER_FITS = ("prompt (2006 tokens) + gen_length (64) need 131 KV blocks but the engine's KV cache has "
              "46 (the runner's num_blocks or kv_memory_bytes); shorten the prompt")
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http(fake_client):  # noqa: F811
    fake_client.fail_with = InvalidRequestError("prompt_ids", NEVER_FITS)
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("path, body, field, cap", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 64}, "prompt", "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 64}, "messages", "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 64, "stream": True}, "messages", "max_tokens"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 64}, "input", "max_output_tokens"),
    ("/v1/messages", {"model": "m", "messages": USER, "max_tokens": 64}, "messages", "max_tokens"),
])
async def test_the_route_names_its_own_fields(http, fake_client, path, body, field, cap):  # noqa: F811
    if path == "/v1/messages":
        body = body | {"model": fake_client.model_name}
    response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(f"{field}: prompt (2006 tokens)"), error
    assert f"{cap} (64)" in error["message"] and "gen_length" not in error["message"], error
    if path != "/v1/messages":  # Anthropic's shape has no param
        assert error["param"] == field


@pytest.mark.parametrize("path, body, cap", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 64}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 64}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 64}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 64, "stream": True}, "max_completion_tokens"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 64}, "max_output_tokens"),
])
async def test_a_length_the_kv_cache_cannot_hold_names_the_routes_cap(fake_client, path, body, cap):  # noqa: F811
    fake_client.fail_with = InvalidRequestError("gen_length", NEVER_FITS.replace(
        "shorten the prompt", "ask for at most 16"))
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == cap, error
    assert error["message"].startswith(f"{cap}: prompt") and error["message"].endswith("ask for at most 16"), error


async def test_llama_routes_name_llama_fields(http):
    infill = await http.post("/infill", json={"input_prefix": "x", "input_suffix": "", "n_predict": 64})
    assert infill.status_code == 400, infill.text
    message = infill.json()["error"]["message"]
    assert message.startswith("Field 'input_prefix': prompt (2006 tokens)") and "n_predict (64)" in message, message
    completion = await http.post("/completion", json={"prompt": "x", "n_predict": 64})
    message = completion.json()["error"]["message"]
    assert completion.status_code == 400 and "n_predict (64)" in message and "gen_length" not in message, message


@pytest.mark.parametrize("path, body, fits", [
    ("/v1/chat/completions", {"messages": USER}, True),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8}, False),
    ("/v1/completions", {"prompt": "x"}, True),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8}, False),
    ("/v1/responses", {"input": "hi"}, True),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 8}, False),
    ("/completion", {"prompt": "x"}, True),  # n_predict -1: the server's default
])
async def test_only_a_default_max_tokens_may_shrink_to_the_kv_cache(fake_client, path, body, fits):  # noqa: F811
    """The engine shrinks an unset max_tokens to its KV cache (scheduler.Scheduler.add, fit_to_kv) as the
    ingress shrinks it to the context; a client's own max_tokens is never changed (a 400 instead)."""
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    assert fake_client.requests[-1].fit_to_kv is fits


@pytest.mark.parametrize("path, body, default", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 8}, True),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8, "slot_size": 4}, False),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8, "serial_num_blocks": 1}, False),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8}, True),
    ("/v1/messages", {"model": "m", "messages": USER, "max_tokens": 8}, True),
    ("/completion", {"prompt": "x", "n_predict": 8}, True),
])
async def test_only_the_servers_slot_shape_may_shrink_to_the_kv_cache(fake_client, path, body, default):  # noqa: F811
    """A client's max_tokens that the KV cache holds in a smaller shape than the model's is decoded in it
    (scheduler.Submission, default_shape); a shape the client chose is kept (a 400 instead)."""
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post(path, json={**body, "model": fake_client.model_name} if "model" in body else body)
    assert response.status_code == 200, response.text
    assert fake_client.requests[-1].default_shape is default


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_word_a_kv_refusal_of_max_tokens_as_anthropic_does(fake_client, stream):  # noqa: F811
    """Claude Code reads "input length and `max_tokens` exceed context limit: P + M > C" to lower
    max_tokens and retry (anthropic_api._renamed_fields words the context-length 400 so); the KV refusal,
    whose limit is the engine's KV cache, is worded the same and keeps the engine's own reason."""
    fake_client.fail_with = EngineFailure.from_exception(InvalidRequestError(  # as it crosses from a replica
        "gen_length", NEVER_FITS.replace("shorten the prompt", "ask for at most 16"),
        asked=64, most=16, prompt_tokens=2006)).to_exception()
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post("/v1/messages", json={"model": fake_client.model_name, "messages": USER,
                                                          "max_tokens": 64, "stream": stream})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    message = body["error"]["message"]
    assert message.startswith("input length and `max_tokens` exceed context limit: 2006 + 64 > 2022, decrease "
                              "input length or `max_tokens` and try again (prompt (2006 tokens)"), message
    assert message.endswith("ask for at most 16)") and "gen_length" not in message, message


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}, "response_format.json_schema.schema"),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}},
     "text.format.schema"),
    ("/v1/messages", {"messages": USER, "max_tokens": 64, "output_config": {"format": {
        "type": "json_schema", "schema": SCHEMA}}}, "output_config.format.schema"),
    ("/completion", {"prompt": "x", "n_predict": 8, "json_schema": SCHEMA}, "json_schema"),
])
async def test_a_grammar_failing_mid_request_names_the_routes_field(fake_client, path, body, field, stream):  # noqa: F811
    """A grammar that fails after the first delta (DecodeParamError naming its source,
    response_format.json_schema.schema) is named in the route's own field, as one failing on the first
    delta is: Responses, Messages and a streamed /completion named the chat field (helper-192)."""
    fake_client.grammar_fault_after = 2
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    body = body | {"stream": stream} | ({"model": fake_client.model_name} if path == "/v1/messages" else {})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post(path, json=body)
    assert fake_client.requests[-1].grammar is not None
    if not stream:
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
    else:
        assert response.status_code == 200, response.text
        events = [json.loads(line[len("data: "):]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        # (Responses: {"type": "error", "message"}; Messages: {"type": "error", "error": {...}}; else {"error": {...}})
        errors = [e.get("message") or e["error"]["message"] for e in events
                  if e.get("type") == "error" or isinstance(e.get("error"), dict)]
        assert len(errors) == 1, response.text
        message = errors[0]
    named = f"Field '{field}': " if path == "/completion" else f"{field}: "
    assert message.startswith(named) and "matching the grammar took too long" in message, message
    if field != "response_format.json_schema.schema":
        assert "response_format" not in message, message


@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_a_chat_field_sent_to_responses_names_where_it_moved_under_a_root_path(fake_client, root_path):  # noqa: F811
    """The hint is the route's (http_options.root_path puts its prefix into the path the app sees: the
    hint was lost under one, helper-226)."""
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post(root_path + "/v1/responses", json={"input": "hi", "max_tokens": 8})
        chat = await http.post(root_path + "/v1/chat/completions", json={"messages": USER, "max_output_tokens": 8})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "max_tokens", error
    assert error["message"] == ("max_tokens: Extra inputs are not permitted; in the Responses API it is "
                                "`max_output_tokens`")
    assert chat.status_code == 400 and chat.json()["error"]["message"] == (
        "max_output_tokens: Extra inputs are not permitted")  # no hint where the route has none


async def test_many_unknown_fields_leave_room_for_the_hint(fake_client):  # noqa: F811
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    body = {"input": "hi", "x" * 3000: 1, **{f"field_{i}": i for i in range(400)}, "max_tokens": 8}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        error = (await http.post("/v1/responses", json=body)).json()["error"]
    assert error["message"].startswith("x" * 79 + "…: Extra inputs are not permitted (nor are: field_0, field_1"), error
    assert error["message"].endswith("… (401 in all)); max_tokens: in the Responses API it is `max_output_tokens`"), error


@pytest.mark.parametrize("path, body, said", [
    ("/v1/completions", {"prompt": "x", "moed": "ar"}, "moed: Extra inputs are not permitted; did you mean `mode`?"),
    ("/v1/chat/completions", {"messages": USER, "temprature": 0}, "did you mean `temperature`?"),
    ("/v1/responses", {"input": "hi", "max_output_token": 8}, "did you mean `max_output_tokens`?"),
    ("/v1/messages", {"messages": USER, "max_tokens": 8, "stop_sequence": ["x"]}, "did you mean `stop_sequences`?"),
])
async def test_a_misspelt_field_is_told_the_field_meant(fake_client, path, body, said):  # noqa: F811
    """An unknown top-level field spelled almost as one of the route's was only "moed: Extra inputs are not
    permitted" (helper-258's new-user run): the client had to find `mode` in the docs."""
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    body = body | ({"model": fake_client.model_name} if path == "/v1/messages" else {})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post(path, json=body)
        far = await http.post(path, json=body | {"zzqx": 1})
    assert response.status_code == 400 and said in response.json()["error"]["message"], response.text
    assert "did you mean `zzqx`" not in far.text and far.text.count("did you mean") == 1, far.text
