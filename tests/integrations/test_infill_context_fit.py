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
from integrations.editor.infill import (MAX_PREFIX_TOKENS, MAX_SUFFIX_TOKENS, fitting_gaps, infill_room, split_room,
                                       strategy_gaps)
from integrations.engine_client import LocalEngineClient
from integrations.request_limits import InputError

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
CONTEXT = 1024
SOURCE = (Path(__file__).resolve().parents[2] / "scheduler" / "admission.py").read_text()
PREFIX, SUFFIX = SOURCE[:20000], SOURCE[20000:30000]  # far more than any budget, as a large file is

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present")


def test_prefix_and_suffix_share_the_room_as_they_fill_it_and_context_gets_the_rest():
    full = (MAX_PREFIX_TOKENS, MAX_SUFFIX_TOKENS)
    assert split_room(2000, 1536, 384, *full) == (1536, 384)  # they fit (context gets 80)
    assert split_room(960, 1536, 384, *full) == (768, 192)  # both over: 4:1, as the budgets
    assert split_room(960, 1536, 20, *full) == (940, 20)  # a short suffix leaves its share to the prefix
    assert split_room(960, 3, 384, *full) == (3, 384)  # a short prefix keeps all: the suffix fits
    assert split_room(100, 5, 384, *full) == (5, 95) and split_room(2, 1, 384, *full) == (1, 1)
    # the span a gap decodes is whole slots (gap_params): 20 -> 24; gaps that leave no room are dropped
    assert infill_room(0, (32, 64)) == 0 and infill_room(1024, (32, 64)) == 960 and infill_room(200, (20,)) == 176
    assert fitting_gaps(64, (32, 64)) == (32,) and fitting_gaps(16, (16,)) == () and fitting_gaps(0, (64,)) == (64,)
    # the strategy's gaps keep within half the context (the prompt keeps the rest: a 32-token gap at 34 cut a
    # 10-token prompt to 2), else one gap of that length (whole slots or one short slot); min_tokens' past it
    assert strategy_gaps(4096, (32, 64)) == (32, 64) and strategy_gaps(66, (32, 64)) == (32,)
    assert strategy_gaps(64, (32, 64)) == (24,) and strategy_gaps(24, (32, 64)) == (8,) and strategy_gaps(9, (32,)) == (3,)
    assert strategy_gaps(3, (16,)) == (1,) and strategy_gaps(2, (16,)) == () and strategy_gaps(0, (64,)) == (64,)
    assert strategy_gaps(24, (32,), at_least=9) == (16,) and strategy_gaps(24, (32,), at_least=17) == ()


class RecordingClient(LocalEngineClient):
    """Keeps every GenerationRequest the engine was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list = []

    async def stream(self, req):
        self.requests.append(req)
        async for delta in super().stream(req):
            yield delta


def _model_with_context(tmp_path_factory, positions: int) -> Path:
    """The shipped model's files under a config.json of `positions` positions."""
    model = tmp_path_factory.mktemp(f"context{positions}") / "refusion-tiny-code"
    model.mkdir()
    for item in SHIPPED_MODEL.iterdir():
        (model / item.name).symlink_to(item)
    config = json.loads((SHIPPED_MODEL / "config.json").read_text()) | {"max_position_embeddings": positions}
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on the shipped weights with a 1,024-token context."""
    from serve_testbed import local_app

    with local_app(_model_with_context(tmp_path_factory, CONTEXT), RecordingClient) as app:
        yield app


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The app on the shipped weights with a 200-token context."""
    from serve_testbed import local_app

    with local_app(_model_with_context(tmp_path_factory, 200), RecordingClient) as app:
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


def test_context_chunks_fill_what_a_short_prefix_leaves(served):
    """The budgets were shrunk by their fixed sizes: below 1,920 + gap tokens of room the context's share
    was 0, so a chunk beside a 3-token prefix was dropped on a 1,024-position model (helper-172)."""
    chunk = "def helper(values):\n    return sorted(set(values))\n"
    start = len(served.client.requests)
    resp = httpx.post(served.url + "/infill", json={"input_prefix": "x = ", "input_suffix": "", "n_predict": 16,
                                                    "temperature": 0,
                                                    "input_extra": [{"filename": "b.py", "text": chunk}]}, timeout=120)
    assert resp.status_code == 200, resp.text
    tokenizer = served.client.tokenizer
    for req in _after(served.client, start):
        assert tokenizer.encode(chunk, add_special_tokens=False)[:8] == _find(req.prompt_ids, tokenizer, chunk)


def _find(ids: list[int], tokenizer, text: str) -> list[int]:
    """The first 8 ids of `text` where they stand in `ids` ([] when absent)."""
    want = tokenizer.encode(text, add_special_tokens=False)[:8]
    return next((ids[i:i + 8] for i in range(len(ids)) if ids[i:i + 8] == want), [])


def _spans_fit(requests: list, positions: int) -> None:
    """Prompt + suffix + the span each request decodes (whole slots) fit the model's positions."""
    assert requests
    for req in requests:
        slot = req.params.get("slot_size", 1) or 1
        decoded = -(-req.params["gen_length"] // slot) * slot
        assert len(req.prompt_ids) + len(req.suffix_ids or []) + decoded <= positions, req.request_id


def test_gaps_are_counted_in_whole_slots_and_those_past_the_context_are_dropped(small):
    """On a 200-position model an editor gap of 20 decodes 24 positions (prompt + suffix + span was 204),
    and /infill's n_cmpl gaps of up to 256 shrank every candidate's prompt to 2 tokens (helper-172)."""
    start = len(small.client.requests)
    error, result = asyncio.run(_complete(small.url, {"uri": "file:///a.py", "prefix": PREFIX, "suffix": SUFFIX,
                                                      "gaps": [20], "temperature": 0}))
    assert error is None, error
    _spans_fit(_after(small.client, start), 200)
    start = len(small.client.requests)
    resp = httpx.post(small.url + "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_cmpl": 4,
                                                   "temperature": 0}, timeout=120)
    assert resp.status_code == 200, resp.text
    requests = _after(small.client, start)
    _spans_fit(requests, 200)
    # gaps 32, 64 (128 and 256 dropped: past half the context they leave the prompt less than the other
    # half, 256 none at all); the longest one sets the shared prompt's room
    assert sorted(r.params["gen_length"] for r in requests) == [32, 64]
    assert {len(r.prompt_ids) + len(r.suffix_ids or []) for r in requests} == {200 - 64}


def test_a_context_too_short_for_any_gap_is_a_400_naming_the_field(small):
    resp = httpx.post(small.url + "/v1/completions", json={"model": "refusion-tiny-code", "prompt": "x = ",
                                                           "suffix": "\n", "min_tokens": 199, "max_tokens": 199},
                      timeout=120)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens", resp.text  # the cap first
    resp = httpx.post(small.url + "/v1/completions", json={"model": "refusion-tiny-code", "prompt": "x = ",
                                                           "suffix": "\n", "min_tokens": 199}, timeout=120)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "min_tokens", resp.text
    error, _ = asyncio.run(_complete(small.url, {"uri": "file:///a.py", "prefix": "x = ", "suffix": "",
                                                 "gaps": [256], "max_tokens": 256}))
    assert error is not None and error["data"]["field"] == "max_tokens" and "context (200 tokens)" in error["message"]


def test_an_empty_prefix_leaves_its_room_to_context_chunks(served):
    """The token an empty prompt gets ("\\n") was held back from the context too, so a chunk that fitted
    exactly was cut (helper-173)."""
    from integrations.editor.infill import build_infill_prompt

    tokenizer = served.client.tokenizer
    chunk = {"path": "", "text": "def helper(values):\n    return sorted(set(values))"}
    whole = build_infill_prompt(tokenizer, "", "x\n", [chunk])
    assert whole.context_tokens and not whole.truncated
    fitted = build_infill_prompt(tokenizer, "", "x\n", [chunk], room=len(whole.prompt_ids) + len(whole.suffix_ids))
    assert fitted.prompt_ids == whole.prompt_ids and not fitted.truncated


def test_a_warm_up_needs_no_room_for_a_gap():
    """/infill with n_predict 0 only prefills its prompt: on a 20-position model it was a 400 "holds no
    completion" (its gaps were planned as a completion's; helper-173)."""
    from transformers import AutoTokenizer

    from integrations.editor.llama_compat import InfillBody, make_job

    client = type("Client", (), {"tokenizer": AutoTokenizer.from_pretrained(str(SHIPPED_MODEL))})()
    body = InfillBody.model_validate({"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 0})
    job = asyncio.run(make_job(client, body, "warm", n_ctx=20))
    assert 0 < len(job.prompt.prompt_ids) + len(job.prompt.suffix_ids or []) <= 19
    # n_predict is a most (llama.cpp stops where its context is full): a gap that fits, within half of it
    capped = asyncio.run(make_job(client, InfillBody.model_validate({**body.model_dump(), "n_predict": 32}), "x", n_ctx=20))
    assert capped.gaps == (8,) and len(capped.prompt.prompt_ids) + len(capped.prompt.suffix_ids or []) <= 12
    with pytest.raises(InputError, match="n_predict"):  # no gap at all beside a prefix and a suffix token
        asyncio.run(make_job(client, InfillBody.model_validate({**body.model_dump(), "n_predict": 32}), "x", n_ctx=2))
