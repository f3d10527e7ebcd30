"""`suffix` on /v1/completions runs the editor's infill path: the shared prompt builder (token healing),
candidate gaps and suffix-repeat trimming, behind OpenAI's response shape. Scripted engine here for
exact text; the real Ray Serve app in test_openai_infill_e2e below."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.openai_api import APISettings, create_app
from scheduler.api import OverloadedError

PREFIX = "def area(r):\n    "
SUFFIX = "\n    return result\n"
MIDDLE = "result = 3.14 * r * r"


@pytest.fixture
def http(fake_client):  # noqa: F811
    app = create_app(APISettings(model_name=fake_client.model_name), fake_client)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_suffix_completion_trims_the_suffix_repeat_and_heals_indentation(http, fake_client):  # noqa: F811
    fake_client.default_text = f"    {MIDDLE}\n    return result\n"  # the model repeats the suffix
    resp = await http.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 32})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["text"] == MIDDLE  # healed leading indent, suffix repeat cut
    assert body["usage"]["completion_tokens"] > 0
    req = fake_client.requests[0]
    assert fake_client.tokenizer.decode(req.prompt_ids) == PREFIX.rstrip(" ")  # trailing indent healed
    assert fake_client.tokenizer.decode(req.suffix_ids) == SUFFIX
    assert len({r.params["gen_length"] for r in fake_client.requests}) >= 1


async def test_suffix_completion_streams_prefixes_of_the_final_text(http, fake_client):  # noqa: F811
    fake_client.default_text = f"    {MIDDLE}\n    return result\n"
    async with http.stream("POST", "/v1/completions",
                           json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 32, "stream": True}) as resp:
        assert resp.status_code == 200
        events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == MIDDLE
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_fim_completion_is_interactive_unless_the_client_says_otherwise(http, fake_client):  # noqa: F811
    """`suffix` is what autocomplete plugins send (Continue, Tabby): unset, its priority is the editor
    protocol's (INTERACTIVE), so a steady editor stream does not hold it back; a plain completion
    stays BATCH; the client's own `priority` wins either way."""
    from scheduler.api import Priority

    fake_client.default_text = MIDDLE
    cases = [({"suffix": SUFFIX}, Priority.INTERACTIVE), ({}, Priority.BATCH),
             ({"suffix": SUFFIX, "priority": "batch"}, Priority.BATCH), ({"priority": "interactive"}, Priority.INTERACTIVE)]
    for fields, priority in cases:
        fake_client.requests.clear()
        resp = await http.post("/v1/completions", json={"prompt": PREFIX, "max_tokens": 16, **fields})
        assert resp.status_code == 200, resp.text
        assert fake_client.requests and {r.priority for r in fake_client.requests} == {priority}, fields


async def test_suffix_completion_errors_are_http_errors(http, fake_client):  # noqa: F811
    resp = await http.post("/v1/completions", json={"prompt": [1, 2, 3], "suffix": SUFFIX})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    fake_client.fail_with = OverloadedError("queue full", retry_after_s=2.0)
    resp = await http.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX})
    assert resp.status_code in (429, 503) and "Retry-After" in resp.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_a_suffix_completion_is_every_candidate_or_a_503(http, fake_client, stream):  # noqa: F811
    """Under load a candidate gap the engine refused was dropped and the text came from the others: a
    greedy request's text depended on the load (helper-145). Now the admitted ones are cancelled."""
    fake_client.hold = threading.Event()  # the admitted candidate waits: the refusal comes first
    fake_client.refuse_gen_lengths = frozenset({64})
    body = {"prompt": PREFIX, "suffix": SUFFIX, "stream": stream}
    try:  # (answering with the admitted candidate alone waited for it: a timeout)
        resp = await asyncio.wait_for(http.post("/v1/completions", json=body), 30)
    finally:
        fake_client.hold.set()
    assert resp.status_code == 503 and "Retry-After" in resp.headers, resp.text
    assert sorted(r.params["gen_length"] for r in fake_client.requests) == [32, 64]
    assert not fake_client.completed and len(fake_client.cancelled) >= 1


async def test_a_suffix_completion_with_a_failed_candidate_is_that_failure(http, fake_client):  # noqa: F811
    """A candidate that ended in an error (a failed forward) was dropped, and the answer came from the
    other gap (helper-148); alone, it answered 200 with empty text. It is the engine error a plain
    completion's failed forward is: a 500 naming it."""
    fake_client.fail_gen_lengths = frozenset({32})
    resp = await http.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX})
    assert resp.status_code == 500 and resp.json()["error"]["message"] == "engine error: forward failed", resp.text


def test_min_tokens_with_a_suffix_is_checked_against_max_tokens_not_a_gap(serve_base_url):
    """The infill's shortest candidate gap (32 tokens) refused min_tokens 40 with max_tokens 64 ("must
    lie in 0..gen_length (32)", a length the client never set); no gap is now shorter than min_tokens."""
    client = openai.OpenAI(base_url=serve_base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    kwargs = dict(model=model, prompt="def add(a, b):\n    ", suffix="\n    return total\n", temperature=1.0, seed=3)
    out = client.completions.create(max_tokens=64, extra_body={"min_tokens": 40}, **kwargs)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 40
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(max_tokens=16, extra_body={"min_tokens": 40}, **kwargs)
    assert err.value.body["param"] == "min_tokens" and "above max_tokens (16)" in err.value.body["message"]
    # without max_tokens the bound is the strategy's longest gap: min_tokens 5000 ran a 5,000-token candidate
    # past the 4,096-token context, unchecked (found by a break-test)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(extra_body={"min_tokens": 5000}, **kwargs)
    assert err.value.body["param"] == "min_tokens" and "without max_tokens (set max_tokens too)" in err.value.body["message"]


def test_suffix_completion_through_the_sdk_on_the_real_app(serve_base_url):
    client = openai.OpenAI(base_url=serve_base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="def add(a, b):\n    ", suffix="\n    return total\n",
                                    max_tokens=16, temperature=1.0, seed=3)
    text = out.choices[0].text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert "return total" not in text  # the suffix is never repeated inside the middle
    assert out.usage.prompt_tokens > 0


@pytest.mark.parametrize("path, body, shrinks", [
    ("/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX}, True),
    ("/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 32}, False),
    ("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX}, True),
    ("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 32}, False),
])
async def test_an_infill_without_a_length_may_shrink_to_the_kv_cache(http, fake_client, path, body, shrinks):  # noqa: F811
    """An infill whose client set no length (max_tokens, n_predict) runs candidates of the server's
    lengths: the engine may shrink them to its KV cache (fit_to_kv) as it shrinks an unset max_tokens
    without suffix; a length the client set is refused instead (test_serve_units.py runs both on a real engine)."""
    fake_client.default_text = MIDDLE
    resp = await http.post(path, json=body)
    assert resp.status_code == 200, resp.text
    assert fake_client.requests and all(r.fit_to_kv is shrinks for r in fake_client.requests)


async def test_closing_the_deltas_while_they_wait_leaves_no_pending_task(fake_client):  # noqa: F811
    """A client gone while infill_deltas waits for the next piece (the route's generator closed) left its
    queue getter pending: "Task was destroyed but it is pending!" at garbage collection (helper-197)."""
    from integrations.editor.infill import build_infill_prompt
    from integrations.editor.postprocess import Rules
    from integrations.editor.runner import CompletionJob
    from integrations.openai_infill import infill_deltas

    fake_client.hold = threading.Event()  # the engine answers nothing until the generator is closed
    job = CompletionJob("t", build_infill_prompt(fake_client.tokenizer, PREFIX, SUFFIX), (32,), Rules(suffix=SUFFIX))
    before = asyncio.all_tasks()
    deltas = infill_deltas(fake_client, job, "cmpl-1", stream=True)
    waiting = asyncio.ensure_future(deltas.__anext__())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done() and fake_client.requests  # waiting on the piece queue, the request in flight
    waiting.cancel()  # (as the route is when its client disconnects)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await deltas.aclose()
    fake_client.hold.set()
    for _ in range(20):
        await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
    assert left == [], left


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|mask|>"])
async def test_special_token_text_in_prompt_and_suffix_is_plain_text(http, fake_client, special):  # noqa: F811
    """With `suffix` the prompt and suffix are the document around the cursor (the infill path): a special
    token's spelling in them is plain text, as /tokenize with parse_special false gives it, never the
    special id (a real EOS or a mask position in the prompt). Without suffix the prompt parses specials."""
    doc = f"EOS = '{special}'\nx = 1\n"
    plain = (await http.post("/tokenize", json={"content": doc, "parse_special": False})).json()["tokens"]
    resp = await http.post("/v1/completions", json={"prompt": doc, "suffix": doc, "max_tokens": 8})
    assert resp.status_code == 200, resp.text
    req = fake_client.requests[0]
    assert req.prompt_ids == plain and req.suffix_ids == plain
    special_id = fake_client.tokenizer.convert_tokens_to_ids(special)
    fake_client.requests.clear()
    await http.post("/v1/completions", json={"prompt": doc, "max_tokens": 8})  # vLLM's plain prompt: unchanged
    assert special_id in fake_client.requests[0].prompt_ids
