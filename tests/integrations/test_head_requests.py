"""HEAD on every GET route (integrations/head_requests.py): the GET's status and headers, an empty body.
A break-test found HEAD answered 405 on every GET route but /health (FastAPI's APIRoute adds no HEAD,
where Starlette's Route and llama.cpp's server answer HEAD wherever GET is served). The app over a fake
engine client, with every optional router included."""

from __future__ import annotations

import httpx
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.openai_api import APISettings, create_app

# GET routes left out of the OpenAPI schema (include_in_schema=False): FastAPI's docs and the editor's
# WebSocket route, whose plain GET answers 426
UNLISTED_GET_PATHS = ("/docs", "/redoc", "/openapi.json", "/v1/editor")


@pytest.fixture
def app(fake_client):  # noqa: F811
    async def is_paused():  # (GET /is_paused asks the engine client; the fake has no pause)
        return {"fake": False}

    fake_client.is_paused = is_paused
    return create_app(APISettings(model_name=fake_client.model_name, pause_endpoints=True), fake_client)


def get_paths(app, model: str) -> list[str]:
    """Every GET route of `app`, path parameters filled in."""
    listed = [path.replace("{model_id}", model) for path, ops in app.openapi()["paths"].items() if "get" in ops]
    return [*listed, *UNLISTED_GET_PATHS]


async def test_head_answers_every_get_route_with_its_status_and_headers_and_no_body(app):
    paths = get_paths(app, "fake-model")
    assert {"/health", "/v1/models", "/v1/models/fake-model", "/metrics", "/props", "/is_paused"} <= set(paths)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        for path in paths:
            got = await http.get(path)
            head = await http.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code, head.headers)
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
            if path != "/metrics":  # (the scrape's own numbers move between the two requests)
                assert head.headers["content-length"] == got.headers["content-length"], path


async def test_head_keeps_the_answers_a_get_would_have_there(app):
    """An unknown path is the 404 whose GET names the route meant (route_hints); a path served to POST
    only answers 405 naming it; an unknown model is the GET's 404."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        assert "did you mean /v1/models?" in (await http.get("/models")).json()["error"]["message"]
        unknown = await http.head("/models")
        assert (unknown.status_code, unknown.content) == (404, b"")
        post_only = await http.head("/v1/completions")
        assert (post_only.status_code, post_only.headers["allow"], post_only.content) == (405, "POST", b"")
        assert (await http.head("/v1/models/no-such-model")).status_code == 404
