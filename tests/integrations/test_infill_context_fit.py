"""An infill's prompt fits the model's context: the token budgets of its prefix, suffix and context
chunks (integrations/editor/infill.py) shrink to the context less the longest gap, on every route that
builds one (the editor WebSocket, llama.cpp's /infill, /v1/completions with `suffix`). With a context
smaller than the budgets, /infill ran past the model's positions (1,767 tokens on a 1,024-token model)
and a completion with `suffix` was a 400 telling the client to shorten a prompt the server had cut.

The shipped model's weights under a config.json of 1,024 positions, behind the real app on a local
uvicorn (serve_testbed.local_app); the engine client records what each engine request holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets

from integrations.editor import protocol as rpc
from integrations.editor.infill import (MAX_CONTEXT_TOKENS, MAX_PREFIX_TOKENS, MAX_SUFFIX_TOKENS, fitted_budgets,
                                        infill_room)
from integrations.engine_client import LocalEngineClient

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
CONTEXT = 1024
SOURCE = (Path(__file__).resolve().parents[2] / "scheduler" / "admission.py").read_text()
PREFIX, SUFFIX = SOURCE[:20000], SOURCE[20000:30000]  # far more than any budget, as a large file is

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present")


def test_budgets_give_way_context_first_then_prefix_and_suffix_in_proportion():
    full = (MAX_PREFIX_TOKENS, MAX_SUFFIX_TOKENS, MAX_CONTEXT_TOKENS)
    assert fitted_budgets(4096 - 64, *full) == full  # the shipped model's context: as before
    assert fitted_budgets(2000, *full) == (MAX_PREFIX_TOKENS, MAX_SUFFIX_TOKENS, 2000 - 1920)
    assert fitted_budgets(960, *full) == (768, 192, 0)  # 4:1, as the budgets
    assert sum(fitted_budgets(7, *full)) == 7 and fitted_budgets(2, *full) == (1, 1, 0)
    assert infill_room(0, (32, 64)) == 0 and infill_room(1024, (32, 64)) == 960 and infill_room(16, (64,)) == 2


class RecordingClient(LocalEngineClient):
    """Keeps every GenerationRequest the engine was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list = []

    async def stream(self, req):
        self.requests.append(req)
        async for delta in super().stream(req):
            yield delta


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on the shipped weights with a 1,024-token context."""
    from serve_testbed import local_app

    model = tmp_path_factory.mktemp("context1024") / "refusion-tiny-code"
    model.mkdir()
    for item in SHIPPED_MODEL.iterdir():
        (model / item.name).symlink_to(item)
    config = json.loads((SHIPPED_MODEL / "config.json").read_text()) | {"max_position_embeddings": CONTEXT}
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(config))
    with local_app(model, RecordingClient) as app:
        yield app


def _fits_exactly(requests: list, most_generated: int) -> None:
    """Every engine request's prompt + suffix fills the room its longest sibling gap leaves, no more."""
    assert requests
    for req in requests:
        held = len(req.prompt_ids) + len(req.suffix_ids or [])
        assert held == CONTEXT - most_generated, (held, req.request_id)
        assert held + req.params["gen_length"] <= CONTEXT, req.request_id


def _after(client: RecordingClient, start: int) -> list:
    return client.requests[start:]


def test_llama_infill_fits_the_context(served):
    start = len(served.client.requests)
    resp = httpx.post(served.url + "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 32,
                                                    "input_extra": [{"filename": "b.py", "text": SOURCE[:3000]}],
                                                    "temperature": 0}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["tokens_evaluated"] == CONTEXT - 32
    _fits_exactly(_after(served.client, start), 32)


def test_a_completion_with_suffix_fits_the_context_with_its_max_tokens(served):
    start = len(served.client.requests)
    resp = httpx.post(served.url + "/v1/completions", json={"model": "refusion-tiny-code", "prompt": PREFIX,
                                                            "suffix": SUFFIX, "max_tokens": 100, "temperature": 0},
                      timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == CONTEXT - 100
    _fits_exactly(_after(served.client, start), 100)


async def _complete(url: str, params: dict) -> tuple:
    async with websockets.connect(url.replace("http://", "ws://") + "/v1/editor") as ws:
        await ws.send(rpc.encode_request(1, "complete", params))
        while True:
            frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 120), raw=False)
            if frame[0] == rpc.RESPONSE and frame[1] == 1:
                return frame[2], frame[3]


def test_an_editor_completion_fits_the_context(served):
    start = len(served.client.requests)
    error, result = asyncio.run(_complete(served.url, {
        "uri": "file:///a.py", "prefix": PREFIX, "suffix": SUFFIX, "multiline": True, "temperature": 0,
        "context": [{"path": "b.py", "text": SOURCE[:3000]}]}))
    assert error is None, error
    assert "text" in result
    _fits_exactly(_after(served.client, start), 64)  # the multi-line gaps: 32 and 64
