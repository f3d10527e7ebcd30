"""How a request body's bytes are read (integrations/request_body.py): the content codings its
Content-Encoding lines name, and the text encoding of its JSON. A break-test (helper-254) found a second
Content-Encoding line ignored ("identity" then "gzip": the gzip body read as plain JSON), a UTF-16LE body
refused as JSON "expecting property name ... column 2", and a UTF-8 body with a byte order mark refused
with Python's own "Unexpected UTF-8 BOM (decode using utf-8-sig)". The app over a
fake engine client, over httpx's ASGI transport, which sends repeated header lines as given."""

from __future__ import annotations

import gzip

import httpx
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.openai_api import APISettings, create_app

BODY = b'{"prompt": "x", "max_tokens": 4}'


@pytest.fixture
def app(fake_client):  # noqa: F811
    return create_app(APISettings(model_name=fake_client.model_name), fake_client)


async def post(app, body: bytes, headers: list[tuple[str, str]], path: str = "/v1/completions") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        return await http.post(path, content=body, headers=[("content-type", "application/json"), *headers])


@pytest.mark.parametrize("lines, named", [
    (["gzip"], "gzip"),
    (["identity", "gzip"], "gzip"),  # the second line counts as much as the first (RFC 9110, 5.3)
    (["gzip", "identity"], "gzip"),
    (["identity, br"], "br"),
    (["deflate", "gzip"], "deflate, gzip"),
])
async def test_a_coded_body_is_a_415_naming_content_encoding_and_what_is_read(app, lines, named):
    response = await post(app, gzip.compress(BODY), [("content-encoding", line) for line in lines])
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["param"] == "Content-Encoding"
    assert f"names {named!r}" in error["message"] and "uncompressed bodies only (identity)" in error["message"]


@pytest.mark.parametrize("lines", [[], ["identity"], ["identity", "identity"], ["Identity, identity"]])
async def test_identity_on_any_number_of_lines_is_a_plain_body(app, lines):
    response = await post(app, BODY, [("content-encoding", line) for line in lines])
    assert response.status_code == 200, response.text


async def test_a_utf8_body_with_a_byte_order_mark_is_read(app):
    """RFC 8259 (8.1) lets a parser ignore it, and Starlette's Request.json() (FastAPI's, vLLM's) does."""
    response = await post(app, b"\xef\xbb\xbf" + BODY, [])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("codec, named", [
    ("utf-16", "UTF-16LE (by its byte order mark)"),  # (Python's utf-16 writes a little-endian BOM)
    ("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"),
    ("utf-32", "UTF-32LE (by its byte order mark)"), ("utf-32-le", "UTF-32LE"), ("utf-32-be", "UTF-32BE"),
])
async def test_a_utf16_or_utf32_body_is_a_400_naming_its_encoding(app, codec, named):
    response = await post(app, BODY.decode().encode(codec), [])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == (f"request body is {named}, not UTF-8: send the JSON encoded as "
                                                   "UTF-8 (RFC 8259, 8.1)")
