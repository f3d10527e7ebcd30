"""A stop string's length is bounded on every route (request_limits.MAX_STOP_CHARS): the editor protocol
took 16 stops of 60,000 characters each, bounded only by its 1 MiB frame, and /v1/completions,
/v1/chat/completions, llama.cpp's /completion and /infill and the Messages route took any length. One
at the limit is served; one past it is refused naming `stop` (Messages: `stop_sequences`) and the limit.
Over a scripted engine (test_editor_fakes)."""

from __future__ import annotations

import httpx
import msgpack
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.editor import protocol as rpc
from integrations.editor.session import EditorSession
from integrations.openai_api import APISettings, create_app
from integrations.request_limits import MAX_STOP_CHARS

AT_LIMIT, PAST = "x" * MAX_STOP_CHARS, "x" * (MAX_STOP_CHARS + 1)
SAID = f"string 1 is {MAX_STOP_CHARS + 1:,} characters long; a stop string may be at most {MAX_STOP_CHARS:,} characters"


async def _complete(client, stop: list[str]) -> tuple:
    frames = []

    async def send(data: bytes) -> None:
        frames.append(msgpack.unpackb(data, raw=False))

    session = EditorSession(client, send)
    await session.handle_frame(rpc.encode_request(1, "complete", {"uri": "file:///a.py", "prefix": "a = ",
                                                                  "suffix": "\n", "stop": stop}))
    await session.drain()
    [[_, _, err, result]] = [f for f in frames if f[0] == rpc.RESPONSE]
    return err, result


async def test_an_editor_stop_string_past_the_limit_is_invalid_params_naming_stop(fake_client):  # noqa: F811
    err, result = await _complete(fake_client, ["\n\n", AT_LIMIT])
    assert err is None and result["text"], err
    assert fake_client.requests[-1].stop[-1] == AT_LIMIT
    asked = len(fake_client.requests)
    err, _ = await _complete(fake_client, ["\n\n", PAST] + [PAST * 60] * 14)
    assert err["code"] == rpc.INVALID_PARAMS and err["data"] == {"field": "stop"}, err
    assert err["message"] == f"stop: {SAID}", err
    assert len(fake_client.requests) == asked  # refused before the engine


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"prompt": "a = ", "max_tokens": 4}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, "stop"),
    ("/completion", {"prompt": "a = ", "n_predict": 4}, "stop"),
    ("/infill", {"input_prefix": "a = ", "input_suffix": "\n", "n_predict": 4}, "stop"),
    ("/v1/messages", {"model": "fake-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
     "stop_sequences"),
])
async def test_an_http_stop_string_past_the_limit_is_a_400_naming_the_field(fake_client, path, body, field):  # noqa: F811
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        served = await http.post(path, json={**body, field: ["\n\n", AT_LIMIT]})
        refused = await http.post(path, json={**body, field: ["\n\n", PAST]})
    assert served.status_code == 200, served.text
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["message"] in (f"{field}: {SAID}", f"Field '{field}': {SAID}"), error  # (llama.cpp's shape)
