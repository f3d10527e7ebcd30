"""A path that is no route: a 404 naming the route a client most likely meant (integrations/route_hints.py),
in that route's error shape, never a 307 redirect. A break-test (helper-246) found a trailing slash
answered 307 with an empty body and an absolute http:// Location (a client that does not follow redirects
read nothing; behind a TLS proxy the Location is the wrong scheme), and an Anthropic SDK whose base_url
ended in /v1 (so POST /v1/v1/messages) got OpenAI's shape and no hint. The app over a fake engine client."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.openai_api import APISettings, create_app

USER = [{"role": "user", "content": "hi"}]
OPENAI_BASE = "An OpenAI client's base_url ends in /v1"
CLOSE = "A route with a name almost alike"
ANTHROPIC_BASE = "An Anthropic client's base_url is the server's root, without /v1 (the SDK adds /v1/messages)"


@pytest.fixture
def app(fake_client):  # noqa: F811
    return create_app(APISettings(model_name=fake_client.model_name), fake_client)


@pytest.mark.parametrize("method, path, meant, why", [
    ("POST", "/v1/chat/completions/", "/v1/chat/completions", "Routes here have no trailing slash"),
    ("POST", "/chat/completions/", "/v1/chat/completions", OPENAI_BASE),
    ("POST", "/completions", "/v1/completions", OPENAI_BASE),
    ("POST", "/v1/v1/chat/completions", "/v1/chat/completions",
     "The URL holds /v1 twice: an OpenAI client's base_url ends in /v1, and the client adds only the route"),
    ("POST", "/messages", "/v1/messages", ANTHROPIC_BASE),
    ("POST", "/v1/v1/messages", "/v1/messages", ANTHROPIC_BASE),
    ("POST", "/v1/v1/messages/count_tokens", "/v1/messages/count_tokens", ANTHROPIC_BASE),
    ("POST", "/v1/messages/", "/v1/messages", "Routes here have no trailing slash"),
    ("POST", "/completion/", "/completion", "Routes here have no trailing slash"),  # llama.cpp's
    # a route spelled almost alike (a letter missing, doubled or swapped): close_routes
    ("POST", "/v1/chat/completion", "/v1/chat/completions", CLOSE),
    ("POST", "/chat/completion", "/v1/chat/completions", CLOSE),
    ("POST", "/v1/chat/compeltions", "/v1/chat/completions", CLOSE),
    ("GET", "/v1/model", "/v1/models", CLOSE),
    ("GET", "/healthz", "/health", CLOSE),
])
@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_a_slip_in_the_url_names_the_route_meant(app, method, path, meant, why, root_path):
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.request(method, root_path + path, json={})
    assert response.status_code == 404, response.text
    said = response.json()["error"]["message"]
    assert said == (f"Invalid URL ({method} {root_path}{path}): not a route of this server; did you mean "
                    f"{root_path}{meant}? {why}")
    anthropic_shape = "/v1/messages" in path  # (a bare /messages is no SDK's)
    assert (response.json().get("type") == "error") is anthropic_shape, response.json()  # the route meant's shape
    if meant == "/completion":
        assert response.json()["error"]["code"] == 404  # llama.cpp's shape


@pytest.mark.parametrize("method, path", [
    ("GET", "/completions"),  # POST only at /v1/completions: no guess for a GET
    ("GET", "/models/nope"),  # /v1/models/{id} may not hold that id
    ("GET", "/v1/v1/models/nope"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/v1/embeddings"),
])
@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_no_guess_where_no_route_serves_the_method(app, method, path, root_path):
    """No guess: the routes are listed at GET /docs, under the root_path (it said /docs behind /api)."""
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.request(method, root_path + path)
        docs = await http.get(root_path + "/docs")
    assert response.status_code == 404, response.text
    said = response.json()["error"]["message"]
    assert said.startswith(f"Invalid URL ({method} {root_path}{path}): not a route of this server (embeddings, files"), said
    assert "did you mean" not in said
    assert said.endswith(f"GET {root_path}/docs and docs/api.md list the routes"), said
    assert docs.status_code == 200, docs.text


async def test_the_sdks_with_a_base_url_slip_read_the_hint(app):
    """The real clients: the OpenAI SDK with a trailing slash on its route (a hand-built path), the anthropic
    SDK with base_url ending in /v1. Each raises its NotFoundError with the hint as its message."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        oai = openai.AsyncOpenAI(base_url="http://test/v1", api_key="k", http_client=http, max_retries=0)
        with pytest.raises(openai.NotFoundError) as err:
            await oai.post("/chat/completions/", body={"messages": USER}, cast_to=httpx.Response)
        assert "did you mean /v1/chat/completions? Routes here have no trailing slash" in err.value.body["message"]
    import httpx2  # (the anthropic SDK's own httpx)

    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http:
        claude = anthropic.AsyncAnthropic(base_url="http://test/v1", api_key="k", http_client=http, max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as err:
            await claude.messages.create(model="m", max_tokens=4, messages=USER)
    assert err.value.body["error"]["type"] == "not_found_error"
    assert f"did you mean /v1/messages? {ANTHROPIC_BASE}" in err.value.body["error"]["message"]


@pytest.mark.parametrize("root_path", ["", "/api"])
@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": USER}),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "hi"}),
    ("GET", "/v1/models/nope", None),
    ("POST", "/v1/messages", {"model": "nope", "max_tokens": 4, "messages": USER}),
])
async def test_an_unknown_model_names_the_listing_route_under_the_root_path(app, root_path, method, path, body):
    """The model_not_found 404 points at GET /v1/models as the app is served: behind http_options.root_path
    /api that is /api/v1/models (it said /v1/models, a 404 there), as the route hints above do."""
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.request(method, root_path + path, json=body)
    assert response.status_code == 404, response.text
    said = response.json()["error"]["message"]
    assert said.endswith(f"(GET {root_path}/v1/models)"), said


@pytest.mark.parametrize("root_path", ["", "/api"])
@pytest.mark.parametrize("path, body, route", [
    ("/completion", {"prompt": [261, "return"]}, "(POST {root}/tokenize)"),  # llama.cpp's mixed prompt
    ("/completion", {"prompt": ["a", "b"]}, "the list to {root}/v1/completions,"),  # llama.cpp's several prompts
    ("/v1/completions", {"prompt": "x", "suffix": "y", "n": 2}, "or POST {root}/infill with n_cmpl"),
])
async def test_a_refusal_names_the_route_to_use_under_the_root_path(app, root_path, path, body, route):
    """A 400 that sends the client to another route names it as the app is served (behind root_path /api,
    /api/tokenize; it said /tokenize, a 404 there), as the model_not_found 404 above does."""
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post(root_path + path, json=body)
    assert response.status_code == 400, response.text
    said = response.json()["error"]["message"]
    assert route.format(root=root_path) in said, said


@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_pause_refusals_name_the_pause_routes_under_the_root_path(fake_client, root_path):  # noqa: F811
    """POST /pause's 400 (no mode) and 409 (a resume came first) name POST /resume and POST /pause as the
    app is served: /api/resume behind root_path /api (they said /resume)."""
    async def overtaken():
        return {"r1": False}

    fake_client.pause = overtaken
    app = create_app(APISettings(model_name=fake_client.model_name, pause_endpoints=True), fake_client)
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        bare = await http.post(root_path + "/pause")
        overtaken_answer = await http.post(root_path + "/pause", params={"mode": "keep"})
    assert bare.status_code == 400, bare.text
    assert f"continue on POST {root_path}/resume)" in bare.json()["error"]["message"]
    assert overtaken_answer.status_code == 409, overtaken_answer.text
    said = overtaken_answer.json()["error"]["message"]
    assert f"a POST {root_path}/resume or a shutdown" in said and f"send POST {root_path}/pause?mode=keep again" in said
