"""llama.cpp /infill over the router with a scripted engine: request shapes copied from what llama.vim
and llama.vscode send (field names and types from their source), and the parsing they do.
(The same requests against the real Ray Serve app: test_editor_serve.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading

import httpx
import pytest
from fastapi import FastAPI
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.editor.http import router
from integrations.editor.llama_compat import select_fields
from scheduler.api import Mode, Priority

PREFIX = "import math\n\n\ndef area(r):\n"
MIDDLE = "    "
SUFFIX = "\n    return result\n\n\ndef main():\n    print(area(2))\n"
TIMING_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                 "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                 "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]


def llama_vim_request(**over) -> dict:
    """As llama.vim's llama#fim builds it (autoload/llama.vim)."""
    body = {
        "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX,
        "input_extra": [{"text": "PI = 3.14\n", "time": [1732, 5], "filename": "consts.py"}],
        "prompt": MIDDLE, "n_predict": 128, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
        "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "response_fields": TIMING_FIELDS,
    }
    body.update(over)
    return body


def llama_vscode_request(**over) -> dict:
    """As llama.vscode's createRequestPayload builds it (src/llama-server.ts)."""
    body = {
        "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX,
        "input_extra": [{"text": "PI = 3.14\n", "time": 1732000000000, "filename": "/w/consts.py"}],
        "prompt": MIDDLE, "n_predict": 128, "n_cmpl": 1, "top_k": 40, "top_p": 0.99, "stream": False,
        "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
        "t_max_prompt_ms": 500, "t_max_predict_ms": 2500,
    }
    body.update(over)
    return body


@pytest.fixture
def http(fake_client):  # noqa: F811
    app = FastAPI()
    app.state.engine_client = fake_client
    app.include_router(router)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_llama_vim_request_and_its_parsing(http, fake_client):  # noqa: F811
    fake_client.script = {32: "result = math.pi * r * r\n    return result\n"}
    resp = await http.post("/infill", json=llama_vim_request())
    assert resp.status_code == 200
    raw = resp.text
    # llama.vim's own checks on the raw body before json_decode
    assert re.match(r"^\s*\{", raw) and re.search(r'"content"\s*:"', raw)
    data = json.loads(raw)
    assert set(data) == set(TIMING_FIELDS)  # flattened response_fields, nothing else
    assert data["content"] == "result = math.pi * r * r"  # suffix repeat trimmed
    assert data["timings/predicted_n"] > 0 and data["tokens_cached"] == 0 and data["truncated"] is False  # cold cache
    req = fake_client.requests[0]
    # t_max_predict_ms is llama.cpp's rule (from the first token, once a newline is out), not an engine deadline
    assert req.priority == Priority.INTERACTIVE and req.max_time_ms is None and req.mode == Mode.AUTO
    # llama.cpp's defaults where the client sends none (llama.vim sends top_k and top_p)
    assert req.params["temperature"] == 0.8 and req.params["top_k"] == 40 and req.params["top_p"] == 0.90
    assert req.params["min_p"] == 0.05  # llama.cpp's default min_p, applied
    text = fake_client.tokenizer.decode(req.prompt_ids)
    assert text.startswith("# consts.py\nPI = 3.14\n") and text.endswith(PREFIX)  # MIDDLE is indentation: healed
    assert fake_client.tokenizer.decode(req.suffix_ids) == SUFFIX


async def test_llama_vim_cache_warm_request_runs_prompt_only(http, fake_client):  # noqa: F811
    body = llama_vim_request(input_prefix="", input_suffix="", prompt="", n_predict=0, temperature=0.0,
                             samplers=[], t_max_prompt_ms=1, t_max_predict_ms=1, response_fields=[""])
    body.pop("n_indent")
    resp = await http.post("/infill", json=body)
    assert resp.status_code == 200 and resp.json() == {}
    [req] = fake_client.requests
    assert req.params["gen_length"] == 1 and req.mode == Mode.AR and req.priority == Priority.BATCH
    assert fake_client.tokenizer.decode(req.prompt_ids).startswith("# consts.py\nPI = 3.14")


async def test_llama_vscode_request_full_response(http, fake_client):  # noqa: F811
    fake_client.script = {32: "result = r\n    return result\n"}
    resp = await http.post("/infill", json=llama_vscode_request())
    data = resp.json()
    assert resp.status_code == 200 and data["content"] == "result = r"
    assert data["stop"] is True and data["stop_type"] == "limit"
    assert set(data["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"}
    assert isinstance(data["tokens_cached"], int) and isinstance(data["truncated"], bool)


async def test_llama_vscode_n_cmpl_returns_an_array_of_candidates(http, fake_client):  # noqa: F811
    fake_client.script = {32: "result = r\n    return result\n", 64: "result = r * r\n    return result\n"}
    resp = await http.post("/infill", json=llama_vscode_request(n_cmpl=2))
    data = resp.json()
    assert isinstance(data, list) and len(data) == 2
    assert [d["content"] for d in data] == ["result = r", "result = r * r"]
    assert [d["index"] for d in data] == [0, 1]


async def test_stream_sends_pieces_then_a_final_event(http, fake_client):  # noqa: F811
    fake_client.script = {32: "result = 2 * r\n    return result\n"}
    resp = await http.post("/infill", json=llama_vscode_request(stream=True))
    events = [json.loads(line[len("data: "):]) for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
    assert "".join(e["content"] for e in events) == "result = 2 * r"


@pytest.mark.parametrize("prompt, suffix, raw, expected", [
    ("y = f(", ")\n", "x))\nz = 2\n", "x)"),  # the closing rule cut twice: "x" (the stream showed "x)")
    ("    ", "\n    return x\n", "return\n", "return"),  # the tail and repeat rules twice: emptied
])
async def test_the_end_rules_run_once_so_the_stream_and_the_answer_agree(http, fake_client, prompt, suffix, raw,
                                                                          expected):  # noqa: F811
    """The final-only rules ran on the text the last step had already finished with them, a second
    time: the non-streamed answer lost text a stream had sent ("x" against "x)"), or was emptied
    (helper-218)."""
    fake_client.default_text = raw
    body = {"input_prefix": "", "prompt": prompt, "input_suffix": suffix, "temperature": 0, "n_predict": 16}
    whole = (await http.post("/infill", json=body)).json()["content"]
    resp = await http.post("/infill", json={**body, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert whole == "".join(e["content"] for e in events) == expected


async def test_stream_with_n_cmpl_sends_every_candidate_under_its_index(http, fake_client):  # noqa: F811
    fake_client.script = {32: "result = r\n    return result\n", 64: "result = r * r\n    return result\n"}
    whole = (await http.post("/infill", json=llama_vscode_request(n_cmpl=2))).json()
    resp = await http.post("/infill", json=llama_vscode_request(n_cmpl=2, stream=True))
    events = [json.loads(line[len("data: "):]) for line in resp.text.split("\n\n") if line.startswith("data: ")]
    streamed = {}
    for event in events:
        streamed[event["index"]] = streamed.get(event["index"], "") + event["content"]
    assert streamed == {d["index"]: d["content"] for d in whole} == {0: "result = r", 1: "result = r * r"}
    assert [e["index"] for e in events if e["stop"]] == [0, 1]


async def test_more_candidates_keep_the_gap_n_predict_rounds_up_to(http, fake_client):  # noqa: F811
    fake_client.script = {32: "result = r\n", 40: "result = r * r\n"}
    one = (await http.post("/infill", json=llama_vscode_request(n_predict=33))).json()
    four = (await http.post("/infill", json=llama_vscode_request(n_predict=33, n_cmpl=4))).json()
    assert one["generation_settings"]["gaps"] == four[0]["generation_settings"]["gaps"] == [32, 40]
    assert len(four) == 2


@pytest.mark.parametrize(
    "over, field",
    [({"n_predict": "many"}, "n_predict"), ({"n_cmpl": 7}, "n_cmpl"), ({"input_extra": [{"filename": "x"}]}, "input_extra.0.text"),
     ({"n_indent": 1001}, "n_indent")],
)
async def test_bad_fields_are_400_naming_the_field(http, over, field):
    resp = await http.post("/infill", json=llama_vscode_request(**over))
    assert resp.status_code == 400
    assert f"Field '{field}'" in resp.json()["error"]["message"]


async def test_engine_overload_is_503_with_retry_after(http, fake_client):  # noqa: F811
    from scheduler.api import OverloadedError

    fake_client.fail_with = OverloadedError("queue full", 1.2)
    resp = await http.post("/infill", json=llama_vim_request())
    assert resp.status_code == 503 and resp.headers["retry-after"] == "2"


@pytest.mark.parametrize("stream", [False, True])
async def test_one_candidate_refused_under_load_is_a_503_not_another_text(http, fake_client, stream):  # noqa: F811
    """/infill answered with the candidates the engine admitted: under load a greedy request came back
    with the 32-token gap's text (gaps still said [32, 64]), or one result for n_cmpl 2 (helper-145).
    Every candidate or none: the admitted one is cancelled, the request is a 503 with Retry-After."""
    fake_client.hold = threading.Event()  # the admitted candidate waits: the refusal comes first
    fake_client.refuse_gen_lengths = frozenset({64})
    try:  # (answering with the admitted candidate alone waited for it: a timeout)
        resp = await asyncio.wait_for(http.post("/infill", json=llama_vim_request(stream=stream)), 30)
    finally:
        fake_client.hold.set()
    assert resp.status_code == 503 and resp.headers["retry-after"] == "2", resp.text
    gaps = sorted(r.params["gen_length"] for r in fake_client.requests)
    assert gaps == [32, 64] and [r.request_id for r in fake_client.requests if r.params["gen_length"] == 32][0] \
        in fake_client.cancelled and not fake_client.completed


async def test_a_failed_candidate_fails_the_infill(http, fake_client):  # noqa: F811
    """A candidate that ended in an error (a failed forward) was dropped for the other gap's text
    (helper-148): the engine error is the answer."""
    fake_client.fail_gen_lengths = frozenset({32})
    resp = await http.post("/infill", json=llama_vim_request())
    assert resp.status_code == 500 and "forward failed" in resp.text, resp.text


async def test_a_candidate_a_stopping_engine_cut_is_a_503_to_retry(http, fake_client):  # noqa: F811
    """A candidate the engine ended at its drain timeout (CANCELLED, "engine stopped") is no text: the
    other gap's text is not served in its place, and the answer is the 503 `shutting_down` a plain
    completion cut so gets (it was a 500 "engine error", which says the server is broken)."""
    fake_client.stopped_at = {32: 0}
    resp = await http.post("/infill", json=llama_vim_request())
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1", resp.text
    assert "engine stopped" in resp.json()["error"]["message"]


async def test_a_stream_a_stopping_engine_cuts_ends_with_llama_cpps_503_error_event(http, fake_client):  # noqa: F811
    """Cut mid-stream by a stopping engine: the last event is the error the same fault's response is
    (503, llama.cpp's type unavailable_error), not our own type name."""
    fake_client.default_text = "total = alpha + beta + gamma + delta\n"
    fake_client.stopped_at = {None: 6}
    resp = await http.post("/infill", json=llama_vim_request(stream=True, n_indent=0))
    events = [json.loads(line[len("data: "):]) for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert resp.status_code == 200 and events[0]["content"], resp.text
    assert events[-1]["error"]["code"] == 503 and events[-1]["error"]["type"] == "unavailable_error"
    assert "engine stopped" in events[-1]["error"]["message"]
    whole = await http.post("/infill", json=llama_vim_request(n_indent=0))
    assert whole.status_code == 503 and whole.json()["error"]["type"] == "unavailable_error", whole.text


async def test_add_generation_prompt_false_leaves_the_assistant_header_out_on_both_chat_forms(http, fake_client):  # noqa: F811
    """llama.cpp's /apply-template reads add_generation_prompt (default true) and vLLM's /tokenize does too:
    false renders the conversation without the assistant turn's opening header. /apply-template ignored
    it (false still ended in the header) and /tokenize refused it. On both a non-boolean, both flags true
    (vLLM's rule), or false beside a forced tool call (whose opening starts the assistant's turn) is a 400."""
    chat = [{"role": "user", "content": "hi"}]
    opened = (await http.post("/apply-template", json={"messages": chat})).json()["prompt"]
    assert opened == "### User\nhi\n### Assistant\n"  # the plain template (integrations/chat.py)
    for flag in (True, None):
        same = await http.post("/apply-template", json={"messages": chat, "add_generation_prompt": flag})
        assert same.json()["prompt"] == opened, same.text
    closed = await http.post("/apply-template", json={"messages": chat, "add_generation_prompt": False})
    assert closed.status_code == 200 and closed.json()["prompt"] == "### User\nhi", closed.text
    tokens = (await http.post("/tokenize", json={"messages": chat, "add_generation_prompt": False})).json()["tokens"]
    assert tokens == fake_client.tokenizer.encode("### User\nhi", add_special_tokens=False)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    for route in ("/apply-template", "/tokenize"):
        for flags in ({"add_generation_prompt": "not-a-bool"}, {"add_generation_prompt": 0},
                      {"add_generation_prompt": True, "continue_final_message": True}):
            refused = await http.post(route, json={"messages": chat, **flags})
            assert refused.status_code == 400, (route, flags, refused.text)
            assert refused.json()["error"]["message"].startswith("Field 'add_generation_prompt': "), refused.text
        forced = await http.post(route, json={"messages": chat, "tools": tools, "tool_choice": "required",
                                              "add_generation_prompt": False})
        assert forced.status_code == 400 and "tool_choice" in forced.json()["error"]["message"], forced.text


def test_select_fields_flattens_paths_and_skips_unknown():
    result = {"content": "x", "timings": {"prompt_n": 3}}
    assert select_fields(result, ["content", "timings/prompt_n", "nope", ""]) == {"content": "x", "timings/prompt_n": 3}
    assert select_fields(result, None) is result


async def test_tokenize_like_llama_vscode_counts_tokens(http, fake_client):  # noqa: F811
    resp = await http.post("/tokenize", json={"content": "def f(x):\n    return x\n", "add_special": False,
                                              "parse_special": True})
    expected = fake_client.tokenizer.encode("def f(x):\n    return x\n", add_special_tokens=False)
    assert resp.status_code == 200 and resp.json()["tokens"] == expected and resp.json()["count"] == len(expected)
    bad = await http.post("/tokenize", json={"text": "x"})
    assert bad.status_code == 400 and "content" in bad.json()["error"]["message"]


async def test_tokenize_and_detokenize_in_vllms_forms(http, fake_client):  # noqa: F811
    tok = fake_client.tokenizer
    text = "def f(x):\n    return x\n"
    vllm = (await http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})).json()
    assert vllm["tokens"] == tok.encode(text, add_special_tokens=False) and vllm["count"] == len(vllm["tokens"])
    both = await http.post("/tokenize", json={"prompt": text, "content": text})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    # vLLM's generation-prompt rule: the 400 names add_generation_prompt, the field to change (it named
    # continue_final_message, which the client may not have sent)
    chat = [{"role": "user", "content": "hi"}]
    refused = await http.post("/tokenize", json={"messages": chat, "add_generation_prompt": True,
                                                 "continue_final_message": True})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("Field 'add_generation_prompt': "), refused.text
    assert (await http.post("/tokenize", json={"messages": chat, "add_generation_prompt": True})).status_code == 200
    ids = vllm["tokens"] + [tok.eos_token_id]
    out = (await http.post("/detokenize", json={"tokens": ids})).json()
    assert out["content"] == out["prompt"] == tok.decode(ids) and out["content"].startswith(text)
    for bad in ([10**9], [-1], "x", [1.5]):
        resp = await http.post("/detokenize", json={"tokens": bad})
        assert resp.status_code == 400 and "tokens" in resp.json()["error"]["message"], resp.text


async def test_tokenize_with_pieces_and_parse_special_as_llama_cpp_documents(http, fake_client):  # noqa: F811
    tok = fake_client.tokenizer
    resp = await http.post("/tokenize", json={"content": "def á", "with_pieces": True})
    pieces = resp.json()["tokens"]
    assert [p["id"] for p in pieces] == tok.encode("def á", add_special_tokens=False)
    # á is two bytes (C3 A1); a byte-level token holding one of them is returned as a list of bytes
    assert bytes(b for p in pieces for b in (p["piece"] if isinstance(p["piece"], list) else p["piece"].encode())) \
        == "def á".encode()
    special = tok.eos_token
    parsed = (await http.post("/tokenize", json={"content": "x" + special})).json()["tokens"]
    plain = (await http.post("/tokenize", json={"content": "x" + special, "parse_special": False})).json()["tokens"]
    assert parsed[-1] == tok.eos_token_id and tok.eos_token_id not in plain and len(plain) > len(parsed)
    # null is the field's default, as on every llama.cpp route (it was 400 "not a valid boolean")
    nulls = await http.post("/tokenize", json={"content": "x" + special, "add_special": None, "with_pieces": None,
                                               "parse_special": None})
    assert nulls.status_code == 200 and nulls.json()["tokens"] == parsed, nulls.text


@pytest.mark.parametrize("sampling", [{"temperature": -1.0}, {"temperature": -0.5, "top_p": 0.0}, {"top_p": 0}])
async def test_llama_cpps_greedy_spellings_are_taken(http, fake_client, sampling):  # noqa: F811
    """llama.cpp samples greedily at a temperature <= 0 (a negative one too) and keeps one token at top_p 0;
    here they were 400s (temperature >= 0, top_p >= 1e-06). Now: greedy (temperature 0) and the decoders'
    least top_p, which keeps one token, on /infill and /completion alike."""
    from decoding.params import MIN_TOP_P
    from integrations.llama_completion import LlamaCompletionBody

    response = await http.post("/infill", json=llama_vscode_request(**sampling))
    assert response.status_code == 200, response.text
    sent = llama_vscode_request(**sampling)
    want = (0.0 if "temperature" in sampling else 0.8), (MIN_TOP_P if "top_p" in sampling else sent["top_p"])
    assert fake_client.requests and all((r.params["temperature"], r.params["top_p"]) == want
                                        for r in fake_client.requests), [r.params for r in fake_client.requests]
    openai = LlamaCompletionBody.model_validate({"prompt": "x", **sampling}).openai_body()
    assert (openai.temperature, openai.top_p) == (want[0], MIN_TOP_P if "top_p" in sampling else 0.95)
    for refused in ({"temperature": 2.5}, {"top_p": -0.1}, {"top_p": 1.5}):  # still out of range
        bad = await http.post("/infill", json=llama_vscode_request(**refused))
        assert bad.status_code == 400 and f"'{next(iter(refused))}'" in bad.json()["error"]["message"], bad.text


async def test_infill_returns_llama_cpp_fields(http, fake_client):  # noqa: F811
    fake_client.script = {32: "result = 2 * r\n    return result\n"}
    data = (await http.post("/infill", json=llama_vscode_request(return_tokens=True, top_k=5, top_p=0.5))).json()
    assert data["tokens"] == fake_client.tokenizer.encode(data["content"], add_special_tokens=False)
    assert data["prompt"] == fake_client.tokenizer.decode(fake_client.tokenizer.encode(
        "# /w/consts.py\nPI = 3.14\n\n" + PREFIX, add_special_tokens=False))  # context + prefix, healed
    settings = data["generation_settings"]
    assert settings["top_k"] == 5 and settings["top_p"] == 0.5 and settings["model"] == data["model"]
    assert fake_client.requests and all(r.params["top_k"] == 5 and r.params["top_p"] == 0.5 for r in fake_client.requests)
    stream = await http.post("/infill", json=llama_vscode_request(stream=True))
    events = [json.loads(line[len("data: "):]) for line in stream.text.split("\n\n") if line.startswith("data: ")]
    assert all(set(e) == {"index", "content", "tokens", "stop"} for e in events[:-1])  # llama.cpp's stream fields
    assert [t for e in events for t in e["tokens"]] and events[-1]["stop"] is True


# ---- issue 14, item 11: fields behave as llama.cpp's server README documents them --------------------

@pytest.fixture
def moving_clock(monkeypatch):
    """The runner's clock moves one second each time it is read, so "the limit has passed" is decided
    by the code path, not by how fast this machine is."""
    from integrations.editor import runner

    ticks = iter(range(10_000))
    monkeypatch.setattr(runner, "_now", lambda: float(next(ticks)))


async def _run_with_clock(client, body: dict):
    """An /infill job run to its outcome (with the moving_clock fixture in force)."""
    from integrations.editor.llama_compat import InfillBody, make_job
    from integrations.editor.runner import run_completion

    return await run_completion(client, await make_job(client, InfillBody(**body), "t-max"))


async def test_t_max_predict_ms_ends_after_the_limit_once_a_newline_is_out(fake_client, moving_clock):  # noqa: F811
    # README: the limit is measured from the first token and triggers only once a newline was generated.
    fake_client.default_text = "a = 1\nb = 2\nc = 3\nd = 4\n"
    body = {"input_prefix": "x = 0\n", "input_suffix": "", "n_predict": 64, "temperature": 0}
    limited = await _run_with_clock(fake_client, {**body, "t_max_predict_ms": 500})
    assert limited.stop_reason == "deadline" and limited.text == "a = 1\n"  # ends at the first newline past the limit
    assert set(fake_client.cancelled) >= {r.request_id for r in fake_client.requests}  # stopped in the engine
    unlimited = await _run_with_clock(fake_client, body)
    assert unlimited.text.startswith("a = 1\nb = 2\nc = 3") and unlimited.stop_reason != "deadline"
    # No newline: the limit never ends a one-line completion, however long it takes.
    fake_client.default_text = "total = a + b + c + d + e"
    one_line = await _run_with_clock(fake_client, {**body, "t_max_predict_ms": 500})
    assert one_line.text == "total = a + b + c + d + e" and one_line.stop_reason != "deadline"


async def test_the_limit_reports_stop_type_limit(http, fake_client, moving_clock):  # noqa: F811
    fake_client.default_text = "a = 1\nb = 2\nc = 3\n"
    data = (await http.post("/infill", json={"input_prefix": "x = 0\n", "input_suffix": "", "n_predict": 64, "temperature": 0,
                                             "t_max_predict_ms": 500})).json()
    assert data["content"] == "a = 1\n" and data["stop_type"] == "limit" and data["stopping_word"] == ""


async def test_defaults_n_ctx_and_n_predict_are_llama_cpp_s(http, fake_client):  # noqa: F811
    data = (await http.post("/infill", json={"input_prefix": "x = 0\n", "input_suffix": "", "n_predict": 100_000})).json()
    settings = data["generation_settings"]
    assert (settings["temperature"], settings["top_k"], settings["top_p"]) == (0.8, 40, 0.95)  # README defaults
    assert settings["n_predict"] == 100_000  # a maximum, not a size to refuse (n_ctx: test_serve_client_text)
    assert all(r.params["temperature"] == 0.8 and r.params["top_k"] == 40 and r.params["top_p"] == 0.95
               and r.max_tokens == 256 for r in fake_client.requests)  # capped at the longest editor gap


@pytest.mark.parametrize("field, value", [("grammar", "root ::= [0-9]+"), ("json_schema", {}), ("n_probs", 3),
                                          ("lora", [{"id": 0, "scale": 1.0}]), ("ignore_eos", True),
                                          ("logit_bias", [[15043, 1.0]])])
async def test_options_that_would_change_the_output_are_refused_not_ignored(http, fake_client, field, value):  # noqa: F811
    resp = await http.post("/infill", json={"input_prefix": "x", "input_suffix": "", field: value})
    assert resp.status_code == 400 and f"Field '{field}'" in resp.json()["error"]["message"]
    assert not fake_client.requests
    off = {"grammar": "", "json_schema": None, "n_probs": 0, "lora": [], "ignore_eos": False, "logit_bias": []}
    assert (await http.post("/infill", json={"input_prefix": "x", "input_suffix": "", field: off[field]})).status_code == 200


async def test_the_request_id_prefixes_the_engine_ids(http, fake_client):  # noqa: F811
    for stream in (False, True):
        resp = await http.post("/infill", json={"input_prefix": "x = 0\n", "input_suffix": "", "stream": stream},
                               headers={"X-Request-Id": f"vim-{stream}"})
        assert resp.status_code == 200  # (Ray's proxy echoes a given id: test_serve_openai_fields)
        # <id>.<random>-g<gap>: the client's id first; a reused id never meets its last request's candidates
        assert all(r.request_id.startswith(f"vim-{stream}.") for r in fake_client.requests)
        assert len({r.request_id.rsplit("-g", 1)[0] for r in fake_client.requests}) == 1
        fake_client.requests.clear()
    fresh = await http.post("/infill", json={"input_prefix": "x = 0\n", "input_suffix": ""})
    assert fake_client.requests[0].request_id.startswith(fresh.headers["x-request-id"] + ".")


async def test_an_id_in_flight_is_refused_and_free_again_once_it_ends(http, fake_client):  # noqa: F811
    """Two /infill requests of one X-Request-Id ran side by side: their candidates (<id>.<random>-g<gap>)
    never overlap, so the engine's check never fired. The id itself is checked now, as on every route."""
    import threading

    fake_client.hold = threading.Event()
    body = {"input_prefix": "x = 0\n", "input_suffix": "", "n_predict": 16}
    first = asyncio.create_task(http.post("/infill", json=body, headers={"X-Request-Id": "vim-7"}))
    while not fake_client.requests:  # the first one's candidate is in flight (held)
        await asyncio.sleep(0.005)
    for stream in (False, True):
        again = await asyncio.wait_for(  # (a second request of the id was held too: it ran)
            http.post("/infill", json={**body, "stream": stream}, headers={"X-Request-Id": "vim-7"}), 30)
        assert again.status_code == 400 and "X-Request-Id" in again.text and "in flight" in again.text, again.text
    assert len(fake_client.requests) == 1  # the refused ones reached no engine
    fake_client.hold.set()
    assert (await first).status_code == 200
    assert (await http.post("/infill", json=body, headers={"X-Request-Id": "vim-7"})).status_code == 200


async def test_null_means_the_default_and_all_candidates_share_one_seed(http, fake_client):  # noqa: F811
    body = {"input_prefix": "x = 0\n", "input_suffix": "", "temperature": None, "top_k": None, "top_p": None, "grammar": None,
            "n_probs": None, "lora": None, "ignore_eos": None, "json_schema": None, "logit_bias": None}
    data = (await http.post("/infill", json=body)).json()
    settings = data["generation_settings"]
    assert (settings["temperature"], settings["top_k"], settings["top_p"]) == (0.8, 40, 0.95)
    seeds = {r.params["seed"] for r in fake_client.requests}
    assert len(fake_client.requests) > 1 and len(seeds) == 1 and settings["seed"] in seeds  # one drawn seed
    fake_client.requests.clear()
    await http.post("/infill", json=body)
    assert {r.params["seed"] for r in fake_client.requests} != seeds  # fresh for the next completion


async def test_tokens_cached_survives_a_completion_cut_before_the_engines_final_stats(bpe_tokenizer):  # noqa: F811
    """The engine sends cached_prompt_tokens with the first tokens; a completion that a rule ends early
    (here the suffix repeat) never reads the final stats, and still reports what the cache served."""
    from test_editor_fakes import FakeEngineClient

    class CachedFirst(FakeEngineClient):
        async def stream(self, req):
            first = True
            async for delta in super().stream(req):
                if first:
                    delta = dataclasses.replace(delta, stats={"cached_prompt_tokens": 9})
                    first = False
                yield delta

    client = CachedFirst(bpe_tokenizer, script={32: "result = math.pi * r * r\n    return result\n    x = 1\n"})
    app = FastAPI()
    app.state.engine_client = client
    app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        data = (await http.post("/infill", json=llama_vim_request(response_fields=None))).json()
    assert data["content"] == "result = math.pi * r * r" and data["tokens_cached"] == 9
    assert client.cancelled  # cut before its end: the final stats were never read


# ---- fields and stop types as llama.cpp's server reports them -------------------------------------

async def test_n_indent_stops_before_a_line_indented_less(http, fake_client):  # noqa: F811
    """n_indent (llama.cpp: the minimum indentation of the generated lines) reaches the rules: the
    completion ends before the first later line indented less, and that is a "limit" stop. Without it
    the same text comes back whole, ended by the model ("eos")."""
    fake_client.default_text = "    a\nb"
    body = {"input_prefix": "def f():\n", "input_suffix": "", "n_predict": 16, "temperature": 0}
    indented = (await http.post("/infill", json={**body, "n_indent": 4})).json()
    assert (indented["content"], indented["stop_type"]) == ("    a", "limit")
    assert indented["generation_settings"]["n_indent"] == 4
    plain = (await http.post("/infill", json=body)).json()
    assert (plain["content"], plain["stop_type"]) == ("    a\nb", "eos")


async def test_a_completion_the_model_ended_reports_stop_type_eos(http, fake_client):  # noqa: F811
    """A candidate the engine ended with its stop token, no rule and no stop string involved, is
    llama.cpp's stop_type "eos" with no stopping_word."""
    fake_client.default_text = "x = 1\n"
    data = (await http.post("/infill", json={"input_prefix": "y = 0\n", "input_suffix": "", "n_predict": 16,
                                             "temperature": 0})).json()
    assert (data["content"], data["stop_type"], data["stopping_word"]) == ("x = 1\n", "eos", "")


async def test_streamed_tokens_add_up_to_the_returned_tokens(http, fake_client):  # noqa: F811
    """A stream's events carry their generated ids without return_tokens, the final event too (here
    the line break the pieces held back): together they are the ids a non-streamed request returns
    with return_tokens. Without return_tokens and without stream, `tokens` is empty."""
    fake_client.default_text = "x = 1\n"
    body = {"input_prefix": "def f(r):\n    ", "input_suffix": "", "n_predict": 16, "temperature": 0}
    whole = (await http.post("/infill", json={**body, "return_tokens": True})).json()
    assert whole["tokens"] == fake_client.tokenizer.encode("x = 1\n", add_special_tokens=False)
    resp = await http.post("/infill", json={**body, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1]["stop"] is True and events[-1]["content"] == "\n" and events[-1]["tokens"]
    assert [t for e in events for t in e["tokens"]] == whole["tokens"]
    assert (await http.post("/infill", json=body)).json()["tokens"] == []


async def test_a_stop_strings_ids_are_returned_as_the_engine_generated_them(http, fake_client):  # noqa: F811
    """The engine ends the text before a stop string, but its ids are generated ids (counted in
    tokens_predicted): return_tokens holds them, as llama.cpp's server returns them (docs/api.md)."""
    fake_client.default_text = "x = 1 + 2\ny = 3\n"
    ids = fake_client.tokenizer.encode(fake_client.default_text, add_special_tokens=False)
    through_stop = next(k for k in range(1, len(ids) + 1) if "+" in fake_client.tokenizer.decode(ids[:k]))
    body = {"input_prefix": "def f():\n    ", "input_suffix": "", "n_predict": 16, "temperature": 0, "stop": ["+"],
            "return_tokens": True}
    data = (await http.post("/infill", json=body)).json()
    assert (data["content"], data["stop_type"], data["stopping_word"]) == ("x = 1 ", "word", "+")
    assert data["tokens"] == ids[:through_stop] and data["tokens_predicted"] == through_stop


async def test_a_prompt_cut_to_fit_the_context_reports_truncated(fake_client):  # noqa: F811
    """`truncated` is true when the prefix had to be cut to fit the model's context (n_ctx), false when
    the whole prompt fits."""
    from integrations.editor.llama_compat import InfillBody, infill

    fake_client.default_text = "x = 1\n"
    body = {"input_suffix": "", "n_predict": 16, "temperature": 0}
    cut = await infill(fake_client, InfillBody(input_prefix="x = 1\n" * 200, **body), 64, "long")
    assert cut["truncated"] is True and cut["tokens_evaluated"] < 64
    whole = await infill(fake_client, InfillBody(input_prefix="x = 1\n" * 2, **body), 64, "short")
    assert whole["truncated"] is False


async def test_a_warm_up_on_a_context_too_small_for_any_gap_is_answered(fake_client):  # noqa: F811
    """n_predict 0 only prefills its prompt: on a 2-token context, where no gap fits beside a prompt (a
    completion there is a 400 naming n_predict), it is answered with the prompt cut to the context; on
    a 20-token one its prompt keeps the room a completion leaves to its gap (all but one token)."""
    from integrations.editor.llama_compat import InfillBody, infill
    from integrations.request_limits import InputError

    body = {"input_prefix": "x = 1\n" * 50, "input_suffix": "y = 2\n" * 50}
    warmed = await infill(fake_client, InfillBody(**body, n_predict=0), 2, "warm")
    assert warmed["content"] == "" and warmed["truncated"] is True and 0 < warmed["tokens_evaluated"] <= 2
    assert [r.params["gen_length"] for r in fake_client.requests] == [1]
    with pytest.raises(InputError) as err:
        await infill(fake_client, InfillBody(**body, n_predict=16), 2, "complete")
    assert err.value.status == 400 and err.value.field == "n_predict"
    roomy = await infill(fake_client, InfillBody(**body, n_predict=0), 20, "warm-20")
    completed = await infill(fake_client, InfillBody(**body, n_predict=16), 20, "complete-20")
    assert roomy["tokens_evaluated"] == 19 and completed["tokens_evaluated"] <= 20 - 8  # (its gap: 8 tokens)


async def test_a_stream_whose_client_leaves_cancels_its_candidates(bpe_tokenizer):  # noqa: F811
    """The route's event generator closed after its first event (the client went away) cancels every
    candidate in the engine at once: no candidate's stream is read on to its last token."""
    from test_editor_fakes import FakeEngineClient

    from integrations.editor.llama_compat import InfillBody, infill_events

    read: dict[str, int] = {}  # request id -> the deltas its stream gave before it ended

    class Counting(FakeEngineClient):
        async def stream(self, req):
            read[req.request_id] = 0
            async for delta in super().stream(req):
                read[req.request_id] += 1
                yield delta

    text = "total = " + " + ".join(f"v{i}" for i in range(40)) + "\n"
    client = Counting(bpe_tokenizer, default_text=text)
    body = InfillBody(input_prefix="x = 0\n", input_suffix="", n_predict=64, temperature=0, stream=True)
    events = infill_events(client, body, 0, "gone")
    first = json.loads((await anext(events))[len(b"data: "):])
    assert first["stop"] is False and first["content"]
    await events.aclose()
    ids = {r.request_id for r in client.requests}
    for _ in range(6000):  # each candidate's stream ends: cancelled (or, uncancelled, after its last token)
        if set(client.cancelled) >= ids:
            break
        await asyncio.sleep(0.005)
    assert len(ids) == 2 and set(client.cancelled) == ids and not client.completed
    gaps = {r.request_id: r.params["gen_length"] for r in client.requests}
    assert all(read[rid] < gaps[rid] for rid in ids), (read, gaps)  # (the fake stops at gen_length)


# A source file that mentions special tokens (any GPT-2/HF tokenizer's code does): its text, not the tokens
SPECIAL_TEXT_DOC = "EOS = '{}'\nx = 1\n"


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|mask|>", "<|beginoftext|>"])
async def test_special_token_text_in_the_document_is_plain_text(http, fake_client, special):  # noqa: F811
    """llama.cpp's /infill tokenizes input_prefix, input_suffix and input_extra with parse_special false:
    "<|endoftext|>" in a document is its characters, never a real EOS in the prompt ("<|mask|>" never a
    mask position). The document's ids are /tokenize's with parse_special false; they were the special id."""
    doc = SPECIAL_TEXT_DOC.format(special)

    async def plain(text: str) -> list[int]:
        return (await http.post("/tokenize", json={"content": text, "parse_special": False})).json()["tokens"]

    tok = fake_client.tokenizer
    special_ids = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    for body, part, want in (({"input_prefix": doc}, "prompt_ids", await plain(doc)),
                             ({"input_suffix": doc}, "suffix_ids", await plain(doc)),
                             ({"input_extra": [{"filename": "", "text": doc}]}, "prompt_ids", await plain(doc + "\n"))):
        fake_client.requests.clear()
        resp = await http.post("/infill", json={"input_prefix": "", "input_suffix": "", "n_predict": 8, **body})
        assert resp.status_code == 200, resp.text
        req = fake_client.requests[0]
        assert getattr(req, part) == want, (body, part)
        assert not special_ids & set(req.prompt_ids) and not special_ids & set(req.suffix_ids or ()), body
