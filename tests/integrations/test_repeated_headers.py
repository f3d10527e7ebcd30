"""A request that repeats Host, or carries two different Origin values (integrations/auth.py
repeated_header): a 400 naming the header, on every path, and for a WebSocket handshake a close before
the accept. A break-test (helper-254) found the guards read the first line only: `Origin: <allowed>`
then `Origin: <evil>` passed OriginGuard, and a loopback request naming `localhost` then a rebinding
page's name passed HostGuard. The app over a fake engine client; httpx sends repeated lines as given."""

from __future__ import annotations

import httpx
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.auth import HostGuard, OriginGuard
from integrations.openai_api import APISettings, create_app

ALLOWED = "http://localhost:5173"


@pytest.fixture
def app(fake_client):  # noqa: F811
    return create_app(APISettings(model_name=fake_client.model_name, allowed_origins=[ALLOWED]), fake_client)


async def get(app, path: str, headers: list[tuple[str, str]]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        return await http.get(path, headers=headers)


@pytest.mark.parametrize("path", ["/v1/models", "/health"])
@pytest.mark.parametrize("headers, named", [
    ([("origin", ALLOWED), ("origin", "https://evil.example")], "Origin"),
    ([("origin", "https://evil.example"), ("origin", ALLOWED)], "Origin"),
    ([("host", "localhost:8000"), ("host", "rebound.example:8000")], "Host"),
    ([("host", "localhost:8000"), ("host", "localhost:8000")], "Host"),  # RFC 9112, 3.2: any second line
])
async def test_a_repeated_host_or_two_origins_is_a_400_naming_the_header(app, path, headers, named):
    response = await get(app, path, headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (named, "duplicate_header", "invalid_request_error")
    assert f"more than one {named} header" in error["message"]


async def test_one_origin_sent_twice_is_one_origin(app):
    """(Only different values are ambiguous: the allowed origin, repeated, passes.)"""
    response = await get(app, "/v1/models", [("origin", ALLOWED), ("origin", ALLOWED.upper())])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("guard, headers", [
    (lambda app: OriginGuard(app, [ALLOWED]), [(b"origin", ALLOWED.encode()), (b"origin", b"https://evil.example")]),
    (lambda app: HostGuard(app, []), [(b"host", b"localhost"), (b"host", b"rebound.example")]),
])
async def test_a_websocket_handshake_repeating_them_is_closed_before_the_accept(guard, headers):
    async def inner(scope, receive, send):
        await send({"type": "websocket.accept"})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/editor", "root_path": "", "headers": headers,
             "server": ("127.0.0.1", 8000), "query_string": b""}
    await guard(inner)(scope, None, send)
    assert [m["type"] for m in sent] == ["websocket.close"] and sent[0]["code"] == 1008
    assert "more than one" in sent[0]["reason"]
