"""What OpenAI clients receive from the real Ray Serve app (serve_base_url), issue 14 items 8, 10, 12:
one X-Request-Id, ours (the body's id and the request log's), `"usage": null` on every streamed chunk
but the final usage chunk, JSON null meaning "not set", and the context counted as really generated."""

from __future__ import annotations

import json

from pathlib import Path

import httpx
import openai
import pytest

from integrations.chat import PLAIN_STOP

CONTEXT = 4096  # tests/model_factory.py max_position_embeddings
SAMPLED = {"temperature": 1.0, "seed": 7, "mode": "ar"}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=60) as client:
        yield client


def _request_log() -> str:
    """The ingress replica's log in this Ray session (where the request log lines go)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for the session's logs
    files = [*(logs / "serve").glob("replica_refusion_RefusionIngress_*.log")]
    files += [p for p in logs.glob("worker-*.err") if b"ServeReplica:refusion:RefusionIngress" in p.read_bytes()[:400]]
    return "".join(p.read_text("utf-8", "replace") for p in files)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "def f(x):\n", "max_tokens": 4, **SAMPLED}),
    ("/v1/completions", {"prompt": "def f(x):\n", "max_tokens": 4, "stream": True, **SAMPLED}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 4, **SAMPLED}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 4, "stream": True, **SAMPLED}),
])
def test_one_request_id_in_header_body_and_log(http, wait_until, path, body):
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text[:300]
    ids = response.headers.get_list("x-request-id")
    assert len(ids) == 1 and "," not in ids[0], ids  # was "ours, Ray's"
    first = response.text.split("data: ", 1)[-1].split("\n", 1)[0] if body.get("stream") else response.text
    assert httpx.Response(200, content=first).json()["id"] == ids[0]
    wait_until.blocking(lambda: f'"request_id": "{ids[0]}"' in _request_log(), f"the request log line of {ids[0]}")


def test_a_malformed_request_id_is_refused_and_never_echoed(http):
    """Ray Serve's proxy echoed any X-Request-Id into the response header and its access log (3,000
    characters, spaces: a forged-looking access line) before the app refused it on some routes. With the
    proxy's guard (integrations/request_id_guard.py, installed as `refusion serve` does) the proxy gives
    such a request a fresh id, and every route answers 400 naming the header."""
    for bad in ("a b", "x" * 3000, "id\tforged"):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
            refused = http.request(method, path, json={"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": bad})
            assert refused.status_code == 400 and "X-Request-Id" in refused.json()["error"]["message"], refused.text
            [echoed] = refused.headers.get_list("x-request-id")
            assert echoed != bad and len(echoed) <= 128, echoed


def test_an_empty_request_id_gets_a_fresh_one(http):
    """An empty X-Request-Id (nginx passing on a header the client never sent) is no id: the proxy's guard
    drops it, Ray's proxy makes one, and that one id is in the header and the body (it was a 400)."""
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **SAMPLED}, headers={"X-Request-Id": ""})
    assert response.status_code == 200, response.text
    [rid] = response.headers.get_list("x-request-id")
    assert rid and response.json()["id"] == rid


def test_a_client_request_id_is_the_one_id(http):
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **SAMPLED},
                         headers={"X-Request-Id": "editor-42.a"})
    assert response.headers.get_list("x-request-id") == ["editor-42.a"] and response.json()["id"] == "editor-42.a"
    bad = http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "a b"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
    assert len(bad.headers.get_list("x-request-id")) == 1
    eos = http.post("/tokenize", json={"content": http.get("/tokenizer_info").json()["eos_token"]}).json()["tokens"]
    endless = {"prompt": "while True:\n", "max_tokens": 3000, "stream": True, "logit_bias": {str(eos[0]): -100}}
    with http.stream("POST", "/v1/completions", json=endless, headers={"X-Request-Id": "dup-1"}) as running:
        lines = running.iter_lines()  # keep a reference: a collected iterator closes the stream
        assert next(lines).startswith("data: {")  # no EOS: it runs until the stream is closed
        again = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "dup-1"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "X-Request-Id"  # the header to change
    assert "already in flight" in again.json()["error"]["message"]
    # n choices run as <id>.<i>: the client's id was not seen among them, so a second request with the id of
    # a running n=2 request was served (found by a break-test)
    with http.stream("POST", "/v1/completions", json=endless | {"n": 2}, headers={"X-Request-Id": "dup-2"}) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: {")
        for body in ({"prompt": "x", "max_tokens": 2}, {"prompt": "x", "max_tokens": 2, "n": 3}):
            again = http.post("/v1/completions", json=body, headers={"X-Request-Id": "dup-2"})
            assert again.status_code == 400 and again.json()["error"]["param"] == "X-Request-Id", again.text
        sibling = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "dup-2x"})
        assert sibling.status_code == 200  # only dotted prefixes overlap


def test_streamed_chunks_carry_null_usage_until_the_final_usage_chunk(client):
    model = client.models.list().data[0].id
    for stream in (client.completions.create(model=model, prompt="def f(x):\n", max_tokens=6, stream=True,
                                             stream_options={"include_usage": True}, extra_body=SAMPLED),
                   client.chat.completions.create(model=model, messages=USER, max_tokens=6, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=SAMPLED)):
        chunks = list(stream)
        assert len(chunks) >= 2 and chunks[-1].usage is not None and chunks[-1].choices == []
        assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1]), chunks
        assert chunks[-1].usage.completion_tokens > 0


def test_json_null_means_not_set(http):
    body = {"prompt": "x", "max_tokens": 2, "logprobs": None, "echo": None, "stream": None, "n": None, "seed": None,
            "stop": None, "user": None, "best_of": None, "suffix": None, "stream_options": None, "mode": "ar"}
    out = http.post("/v1/completions", json=body)
    assert out.status_code == 200, out.text[:300]
    chat = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "tools": None, "n": None,
                                                   "max_completion_tokens": None, "response_format": None, "mode": "ar"})
    assert chat.status_code == 200, chat.text[:300]
    # defaults that SDK wrappers send explicitly (OpenAI's own defaults; top_k 0 = off, as in vLLM)
    chat = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "logprobs": False,
                                                   "top_logprobs": None, "store": False, "top_k": 0, "mode": "ar"})
    assert chat.status_code == 200, chat.text[:300]
    echoed = http.post("/v1/completions", json={"prompt": "x", "echo": True, "max_tokens": 2, "logprobs": None})
    assert echoed.status_code == 200 and echoed.json()["choices"][0]["text"].startswith("x")


def test_context_errors_name_the_field_to_change(client):
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as err:  # the example: 4200 > 4096
        client.completions.create(model=model, prompt="def f(x):\n", max_tokens=4200)
    assert err.value.body["param"] == "max_tokens" and "maximum context length is 4,096 tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=USER, max_completion_tokens=100_000)
    assert err.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x", extra_body={"slot_size": 1_000_000})
    assert err.value.body["param"] == "slot_size"


def test_the_model_slot_never_takes_a_generation_past_the_context(client):
    """Room for 6 tokens with the model's slot of 8: the generation is not rounded up to 8 (past the
    context); the ingress picks a slot that fits and the request is served."""
    model = client.models.list().data[0].id
    prompt = [5] * (CONTEXT - 6)
    for mode in ("ar", "refusion"):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=1.0, seed=3,
                                        extra_body={"mode": mode})
        assert 0 < out.usage.completion_tokens <= 6 and out.usage.prompt_tokens == CONTEXT - 6


def test_infill_carries_the_one_request_id(http):
    # llama.cpp's /infill has no body id: the X-Request-Id (Ray's or the client's) is the one id, and
    # the engine's ids of its candidates start with it (test_infill_llama_compat checks those).
    body = {"input_prefix": "def f(x):\n    ", "input_suffix": "", "n_predict": 4, "temperature": 0, "mode": "ar"}
    for stream in (False, True):
        given = http.post("/infill", json={**body, "stream": stream}, headers={"X-Request-Id": "vim-7.a"})
        assert given.status_code == 200 and given.headers.get_list("x-request-id") == ["vim-7.a"]
        fresh = http.post("/infill", json={**body, "stream": stream})
        assert len(fresh.headers.get_list("x-request-id")) == 1 and "," not in fresh.headers["x-request-id"]
    bad = http.post("/infill", json=body, headers={"X-Request-Id": "a b"})
    assert bad.status_code == 400 and "X-Request-Id" in bad.json()["error"]["message"]


def test_models_report_the_context_as_vllm_does(client, http):
    """vLLM's model card field `max_model_len` (clients size prompts with it): the served context."""
    [card] = client.models.list().data
    assert card.max_model_len == CONTEXT and card.owned_by == "refusion-serve"
    assert http.get(f"/v1/models/{card.id}").json()["max_model_len"] == CONTEXT


def test_tokenize_counts_the_chat_prompt_the_server_runs(http, client, model):
    """vLLM's /tokenize with `messages`: the count is the prompt /v1/chat/completions runs (usage)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    counted = http.post("/tokenize", json={"messages": messages}).json()
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=2, extra_body={"mode": "ar"})
    assert counted["count"] == chat.usage.prompt_tokens == len(counted["tokens"])
    assert counted["max_model_len"] == CONTEXT
    text = http.post("/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]
    assert "def add(a, b):" in text and "Be brief." in text
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    with_tools = http.post("/tokenize", json={"messages": messages, "tools": tools}).json()
    chat = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=2,
                                          extra_body={"mode": "ar"})
    assert with_tools["count"] == chat.usage.prompt_tokens > counted["count"]
    for choice in ("none", "required"):  # tools left out; a forced call's opening added
        tokenized = http.post("/tokenize", json={"messages": messages, "tools": tools, "tool_choice": choice}).json()
        chat = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=choice,
                                              max_tokens=2, extra_body={"mode": "ar"})
        assert tokenized["count"] == chat.usage.prompt_tokens
    assert tokenized["count"] > with_tools["count"]
    # (add_generation_prompt false is taken: test_infill_llama_compat.py, beside /apply-template)
    for field, value in (("continue_final_message", True),
                         ("chat_template_kwargs", {"tools": []})):  # a name the server sets itself
        refused = http.post("/tokenize", json={"messages": messages, field: value})
        assert refused.status_code == 400 and field in refused.json()["error"]["message"]
    # vLLM's chat_template_kwargs: template variables, counted as chat runs them (this model's plain
    # template reads none; tests/integrations/test_request_limits.py renders a template that does)
    kwargs = {"enable_thinking": False}
    tokenized = http.post("/tokenize", json={"messages": messages, "chat_template_kwargs": kwargs}).json()
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=2,
                                          extra_body={"mode": "ar", "chat_template_kwargs": kwargs})
    assert tokenized["count"] == chat.usage.prompt_tokens == counted["count"]
    refused = http.post("/v1/chat/completions", json={"messages": messages, "chat_template_kwargs": {"tokenize": True}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"
    # /apply-template takes them as chat does (llama.cpp's takes chat_template_kwargs too)
    applied = http.post("/apply-template", json={"messages": messages, "chat_template_kwargs": kwargs})
    assert applied.json()["prompt"] == http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    refused = http.post("/apply-template", json={"messages": messages, "chat_template_kwargs": {"tools": []}})
    assert refused.status_code == 400 and "chat_template_kwargs" in refused.json()["error"]["message"]


def test_llama_cpp_props_and_apply_template(client, model, http):
    """llama.cpp's GET /props (what its clients read: the context, the decode defaults, the model's name)
    and POST /apply-template (the prompt chat runs, as text: /tokenize's tokens decoded)."""
    props = http.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == CONTEXT and props["model_alias"] == model
    engine = http.get("/v1/engine").json()
    params = props["default_generation_settings"]["params"]
    sampling = ("temperature", "top_k", "top_p", "min_p")
    assert {k: params[k] for k in engine["defaults"] if k not in sampling} == \
        {k: v for k, v in engine["defaults"].items() if k not in sampling}
    # what /completion applies to the fields it is not sent (it reported the model's temperature 0, top_k 0)
    applied = http.post("/completion", json={"prompt": "x", "n_predict": 1}).json()["generation_settings"]
    assert {k: params[k] for k in sampling} == {k: applied[k] for k in sampling} == \
        {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    assert props["modalities"] == {"vision": False, "audio": False} and props["eos_token"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    for extra in ({}, {"tools": tools}, {"tools": tools, "tool_choice": "required"}):
        prompt = http.post("/apply-template", json={"messages": messages} | extra).json()["prompt"]
        tokens = http.post("/tokenize", json={"messages": messages} | extra).json()["tokens"]
        assert prompt == http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert prompt.startswith("### Tools\n") and '<tool_call>{"name": "add"' in prompt  # the forced opening
    refused = http.post("/apply-template", json={"messages": []})
    assert refused.status_code == 400 and "messages" in refused.json()["error"]["message"]


def test_vllm_tokenizer_info_serves_lm_eval_remote_tokenizer(http, tiny_model_dir):
    """lm-evaluation-harness's remote tokenizer check (GET /tokenizer_info with an eos_token, then POST
    /tokenize {"prompt", "add_special_tokens": false} -> {"tokens"}) and its round trip through
    /detokenize; the values are the served tokenizer's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == CONTEXT
    assert info["pad_token"] == tok.pad_token and info["chat_template"] is None  # the plain template
    tokens = http.post("/tokenize", json={"prompt": "def f(x):\n", "add_special_tokens": False}).json()["tokens"]
    assert tokens == tok.encode("def f(x):\n", add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "def f(x):\n"


def test_continue_final_message_continues_the_assistant_text(client, model, http):
    """vLLM's continue_final_message: the prompt ends with the last (assistant) message's text, no new turn
    opened, and the chat answer is the completion of exactly that prompt (same seed, the template's
    turn-end stop); /tokenize counts it; without an assistant message last it is a 400."""
    messages = [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": "def add(a, b):\n"}]
    counted = http.post("/tokenize", json={"messages": messages, "continue_final_message": True}).json()
    prompt = http.post("/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]
    assert prompt.endswith("### User\nWrite add.\n### Assistant\ndef add(a, b):\n")
    sampled = {"mode": "ar", "continue_final_message": True}
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=1.0, seed=5,
                                          extra_body=sampled)
    plain = client.completions.create(model=model, prompt=counted["tokens"], max_tokens=10, temperature=1.0, seed=5,
                                      stop=[PLAIN_STOP], extra_body={"mode": "ar"})
    assert chat.choices[0].message.content and chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == counted["count"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=messages[:1], max_tokens=4, extra_body=sampled)
    assert err.value.body["param"] == "continue_final_message"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError) as err:  # a grammar would start inside the prefill
        client.chat.completions.create(model=model, messages=messages, max_tokens=4, tools=tools, extra_body=sampled)
    assert err.value.body["param"] == "continue_final_message"
    for fields in ({"tools": tools}, {"continue_final_message": "yes"}):  # /tokenize refuses as chat does
        refused = http.post("/tokenize", json={"messages": messages, "continue_final_message": True} | fields)
        assert refused.status_code == 400 and "continue_final_message" in refused.json()["error"]["message"], refused.text
    assert http.post("/tokenize", json={"messages": messages[:1], "continue_final_message": None}).status_code == 200
    # vLLM's clients send continue_final_message with add_generation_prompt false (vLLM refuses both true)
    paired = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=1.0, seed=5,
                                            extra_body=sampled | {"add_generation_prompt": False})
    assert paired.choices[0].message.content == chat.choices[0].message.content
    opened = client.chat.completions.create(model=model, messages=messages[:1], max_tokens=2,
                                            extra_body={"mode": "ar", "add_generation_prompt": True})
    assert opened.usage.prompt_tokens == http.post("/tokenize", json={"messages": messages[:1]}).json()["count"]
    for fields in ({"add_generation_prompt": True}, {"continue_final_message": False, "add_generation_prompt": False}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=messages, max_tokens=2, extra_body=sampled | fields)
        assert err.value.body["param"] == "add_generation_prompt"


def test_min_p_one_samples_only_the_most_likely_token(client, model):
    """vLLM's min_p: with 1.0 only tokens as likely as the top one survive, so any seed at any temperature
    gives the greedy text; 0.0 leaves sampling alone (some seed differs from greedy)."""
    greedy = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=8, temperature=0,
                                       extra_body={"mode": "ar"}).choices[0].text
    for seed in (1, 2, 3):
        out = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=8, temperature=1.8, seed=seed,
                                        extra_body={"mode": "ar", "min_p": 1.0})
        assert out.choices[0].text == greedy
    free = {client.completions.create(model=model, prompt="def f(x):\n", max_tokens=8, temperature=1.8, seed=seed,
                                      extra_body={"mode": "ar", "min_p": 0.0}).choices[0].text for seed in range(4)}
    assert free != {greedy}


def test_continuous_usage_stats_count_each_choice_and_its_own_prompt(http):
    """As vLLM's serving code: with n and several prompts, a chunk's usage is its choice's tokens so far and
    its own prompt's tokens (a chat's role chunk: 0); the final usage chunk sums the request."""
    prompts = ["def f(x):\n", "import os\nimport sys\nclass A:\n"]
    sizes = [len(http.post("/tokenize", json={"content": p}).json()["tokens"]) for p in prompts]
    body = {"prompt": prompts, "n": 2, "max_tokens": 6, "stream": True, "mode": "ar", "temperature": 1.0, "seed": 3,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    lines = http.post("/v1/completions", json=body).text.splitlines()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    final = chunks[-1]["usage"]
    seen: dict[int, list] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        seen.setdefault(choice["index"], []).append(chunk["usage"])
        assert chunk["usage"]["prompt_tokens"] == sizes[choice["index"] // 2]
    counts = {i: [u["completion_tokens"] for u in usages] for i, usages in seen.items()}
    assert sorted(counts) == [0, 1, 2, 3] and all(c == sorted(c) for c in counts.values())
    assert sum(c[-1] for c in counts.values()) == final["completion_tokens"]
    assert final["prompt_tokens"] == sum(sizes)
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4, "stream": True, "mode": "ar",
            "stream_options": {"include_usage": True, "continuous_usage_stats": True, "include_obfuscation": False}}
    chunks = [json.loads(line[6:]) for line in http.post("/v1/chat/completions", json=chat).text.splitlines()
              if line.startswith("data: {")]
    roles = [c["usage"]["completion_tokens"] for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert roles == [0, 0]  # each choice's role chunk: nothing generated yet (it counted the other choice's)


def test_continuous_usage_stats_give_the_usage_so_far_on_every_chunk(http):
    """vLLM's stream_options.continuous_usage_stats: each chunk's usage counts the tokens sent so far."""
    body = {"prompt": "def f(x):\n", "max_tokens": 8, "stream": True, "mode": "ar", "temperature": 0,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    alone = {**body, "stream_options": {"continuous_usage_stats": True}}  # as vLLM: only with include_usage
    assert '"usage"' not in http.post("/v1/completions", json=alone).text
    lines = [line[6:] for line in http.post("/v1/completions", json=body).text.splitlines()
             if line.startswith("data: {")]
    chunks = [httpx.Response(200, content=line).json() for line in lines]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in chunks)


def test_logit_bias_and_penalties_shape_the_text(client, model, http):
    """OpenAI's logit_bias forces a token (+100) or bans the greedy text's tokens (-100); penalties change a
    greedy text. Such requests run AR (the `refusion` block says so)."""
    base = dict(model=model, prompt="def f(x):\n", max_tokens=8, temperature=0)
    [x] = http.post("/tokenize", json={"content": "x"}).json()["tokens"]
    forced = client.completions.create(**base, logit_bias={str(x): 100})
    assert forced.choices[0].text == http.post("/detokenize", json={"tokens": [x] * 8}).json()["prompt"]
    assert forced.model_extra["refusion"]["mode"] == "ar"
    # The greedy text's ids (the random model writes byte tokens whose strings re-tokenize otherwise: ids,
    # from llama.cpp's /completion, which serves the same engine request)
    ids = {"prompt": base["prompt"], "n_predict": 8, "temperature": 0, "mode": "ar", "return_tokens": True}
    greedy = http.post("/completion", json=ids).json()["tokens"]
    banned = client.completions.create(**base, logit_bias={str(t): -100 for t in greedy})
    again = http.post("/completion", json=ids | {"logit_bias": [[t, -100] for t in greedy]}).json()
    assert again["content"] == banned.choices[0].text and len(again["tokens"]) == 8
    assert not set(again["tokens"]) & set(greedy)  # none of the greedy text's tokens
    plain = client.completions.create(**{**base, "max_tokens": 48}, extra_body={"mode": "ar"})
    varied = client.completions.create(**{**base, "max_tokens": 48}, frequency_penalty=2.0, presence_penalty=1.0)
    assert varied.choices[0].text != plain.choices[0].text


def test_openai_chat_fields_agent_frameworks_pass_through_are_accepted(client, model, http):
    """Documented OpenAI chat fields without effect here (the OpenAI Agents SDK and LangChain send them from
    their model settings: metadata, reasoning_effort, verbosity, ...) are accepted; the Responses API's
    truncation "auto" too; a value that asks for what is not offered is a 400 naming it; several unknown
    fields are named in one answer."""
    extra = {"metadata": {"k": "v"}, "reasoning_effort": "low", "verbosity": "low", "service_tier": "auto",
             "safety_identifier": "u-1", "prompt_cache_retention": "in-memory", "prompt_cache_key": "conv-7",
             "prediction": {"type": "content", "content": "x = 1"}, "modalities": ["text"]}
    out = client.chat.completions.create(model=model, messages=USER, max_tokens=4, extra_body={"mode": "ar", **extra})
    assert out.choices[0].finish_reason in ("stop", "length")
    responses = client.responses.create(model=model, input="def f():", max_output_tokens=8, truncation="auto",
                                        service_tier="auto", safety_identifier="u-1", prompt_cache_retention="24h",
                                        max_tool_calls=2, background=False, extra_body={"mode": "ar"})
    assert responses.status in ("completed", "incomplete")
    assert responses.truncation == "auto"  # echoed as sent (it said "disabled")
    assert client.responses.create(model=model, input="x", max_output_tokens=2).truncation == "disabled"  # default
    audio = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "modalities": ["text", "audio"]})
    assert audio.status_code == 400 and audio.json()["error"]["param"] == "modalities.1"
    unknown = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "bogus_a": 1, "bogus_b": 2})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "bogus_a"
    assert "bogus_b" in unknown.json()["error"]["message"]


def _streamed_usage(http, path: str, body: dict) -> dict:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()[:300]
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    return httpx.Response(200, content=lines[-1]).json()["usage"]


def test_what_vllm_bench_serve_sends_runs_to_exactly_max_tokens(http, model):
    """The bodies of `vllm bench serve --ignore-eos` (vllm/benchmarks/lib/endpoint_request_func.py: the
    completions body always carries repetition_penalty 1.0 and logprobs null) are served, and every
    request generates exactly its max_tokens (EOS never chosen; on chat the template's turn-end stop
    is not applied either); min_tokens holds EOS back that long."""
    completions = {"model": model, "prompt": "def f(x):\n", "repetition_penalty": 1.0, "max_tokens": 40,
                   "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat = {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 40, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    for path, body in (("/v1/completions", completions), ("/v1/chat/completions", chat)):
        for temperature in (0.0, 1.0):
            assert _streamed_usage(http, path, {**body, "temperature": temperature})["completion_tokens"] == 40
    plain = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 64, "temperature": 0, "mode": "ar"}).json()
    held = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 64, "temperature": 0, "min_tokens": 30}).json()
    assert held["usage"]["completion_tokens"] >= 30 and held["refusion"]["mode"] == "ar"
    assert held["choices"][0]["text"].startswith(plain["choices"][0]["text"]) or plain["usage"]["completion_tokens"] >= 30
    llama = http.post("/completion", json={"prompt": "x", "n_predict": 24, "ignore_eos": True}).json()
    assert llama["tokens_predicted"] == 24 and llama["stop_type"] == "limit"
    sampled = {"prompt": "x", "max_tokens": 12, "temperature": 1.0, "seed": 9, "mode": "ar"}
    off = [http.post("/v1/completions", json={**sampled, "top_k": k}).json()["choices"][0]["text"] for k in (-1, 0)]
    assert off[0] == off[1]  # `vllm bench serve --top-k -1`: -1 is vLLM's "off", as 0


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "max_tokens": 8, "min_tokens": 9}, "min_tokens"),
    ({"prompt": "x", "max_tokens": 8, "repetition_penalty": 1.3}, "repetition_penalty"),
    ({"prompt": "x", "max_tokens": 8, "ignore_eos": True, "mode": "refusion"}, "mode"),
    ({"prompt": "x", "max_tokens": 8, "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "max_tokens": 8, "min_tokens": -1}, "min_tokens"),
])
def test_vllm_sampling_extensions_name_their_field_when_refused(http, body, field):
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text[:300]


def test_the_last_text_and_finish_reason_share_a_chunk(http):
    """As vLLM: the chunk with finish_reason carries the last step's text (no empty trailing chunk, which
    benchmark clients time as a ~0 ms inter-token latency), on completions and chat."""
    for path, body in (("/v1/completions", {"prompt": "def f(x):\n"}),
                       ("/v1/chat/completions", {"messages": USER})):
        body = {**body, "max_tokens": 8, "ignore_eos": True, "stream": True, "temperature": 1.0, "seed": 5}
        with http.stream("POST", path, json=body) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
        chunks = [httpx.Response(200, content=line).json() for line in lines]
        choices = [c["choices"][0] for c in chunks if c.get("choices")]
        finishing = [c for c in choices if c.get("finish_reason")]
        text = (lambda c: c.get("text") if "text" in c else (c.get("delta") or {}).get("content"))
        assert len(finishing) == 1 and finishing[0]["finish_reason"] == "length" and text(finishing[0]), choices
        assert choices[-1] is finishing[0]


def test_vllm_fields_older_clients_send(http):
    """guided_choice / guided_regex / guided_json (vLLM's older names of structured_outputs) constrain the
    output; skip_special_tokens true and an empty stop_token_ids are its defaults, stop_token_ids naming
    EOS is taken (EOS is the stop token here), other values a 400 naming the field (not applied here)."""
    base = {"prompt": "x", "max_tokens": 8, "mode": "ar", "temperature": 1.0, "seed": 3}
    choice = http.post("/v1/completions", json={**base, "guided_choice": ["yes", "no"]}).json()
    assert choice["choices"][0]["text"] in ("yes", "no"), choice
    regex = http.post("/v1/completions", json={**base, "guided_regex": "[0-9]{3}"}).json()
    assert len(regex["choices"][0]["text"]) == 3 and regex["choices"][0]["text"].isdigit(), regex
    chat = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 24, "guided_json": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].startswith('{"ok": ')
    eos = http.post("/tokenize", json={"content": http.get("/tokenizer_info").json()["eos_token"]}).json()["tokens"][0]
    for stop_ids in ([], [eos]):  # EOS is the one stop token: naming it is taken (it was a 400)
        ok = http.post("/v1/completions", json={**base, "skip_special_tokens": True, "stop_token_ids": stop_ids})
        assert ok.status_code == 200, ok.text[:300]
    for field, value in (("skip_special_tokens", False), ("stop_token_ids", [eos, eos + 1])):
        refused = http.post("/v1/completions", json={**base, field: value})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text[:300]
    assert f"token {eos + 1} cannot stop the text here: only the model's end tokens ({eos}) do" in refused.json()["error"]["message"]
    both = http.post("/v1/chat/completions", json={"messages": USER, "stop_token_ids": [eos], "ignore_eos": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "stop_token_ids", both.text[:300]
    both = http.post("/v1/completions", json={**base, "guided_choice": ["a"], "structured_outputs": {"choice": ["b"]}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "structured_outputs"
    assert "guided_choice" in both.json()["error"]["message"]
    for extra, param in (({"guided_json": "not json"}, "guided_json"),  # named as sent (they named structured_outputs)
                         ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice")):
        refused = http.post("/v1/chat/completions", json={"messages": USER, **extra})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text[:300]
    legacy = http.post("/v1/chat/completions", json={"messages": USER, "function_call": "auto", "functions": [
        {"name": "f", "parameters": {"type": "object", "properties": {}}}]})
    error = legacy.json()["error"]
    assert legacy.status_code == 400 and error["param"] == "function_call" and "tools / tool_choice" in error["message"]


def _first_unique_pair(text: str) -> int:
    """The first index p >= 2 whose two characters first occur there (a stop string that cuts at p)."""
    return next(p for p in range(2, len(text) - 1) if text.find(text[p:p + 2]) == p)


def test_include_stop_str_in_output_returns_the_stop_string(client, model, http):
    """vLLM's include_stop_str_in_output: the text runs through the end of the client's stop string that
    ended it (streamed too), usage unchanged (the stop's tokens were generated either way); the chat
    template's own turn end is never returned; with suffix (infill) it is a 400 naming it."""
    seeded = {"temperature": 1.0, "seed": 7, "extra_body": {"mode": "ar", "ignore_eos": True}}  # seeded: repeatable
    full = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=24, **seeded).choices[0].text
    p = _first_unique_pair(full)
    stop = full[p:p + 2]
    cut = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=24, stop=[stop, "\x00"], **seeded)
    kept_body = {**seeded["extra_body"], "include_stop_str_in_output": True}
    kept = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=24, stop=[stop, "\x00"],
                                     temperature=1.0, seed=7, extra_body=kept_body)
    assert cut.choices[0].text == full[:p] and cut.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == full[:p + 2] and kept.choices[0].finish_reason == "stop"
    assert kept.usage.completion_tokens == cut.usage.completion_tokens
    chunks = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=24, stop=stop, stream=True,
                                       temperature=1.0, seed=7, extra_body=kept_body)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[:p + 2]

    messages = [{"role": "user", "content": "Write add."}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=24, **seeded)
    content = answer.choices[0].message.content
    q = _first_unique_pair(content)
    chat_kept = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=1.0,
                                               seed=7, stop=[content[q:q + 2]], extra_body=kept_body)
    assert chat_kept.choices[0].message.content == content[:q + 2]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="def f(x):\n", suffix="\n", max_tokens=8, stop=["\n"],
                                  extra_body={"include_stop_str_in_output": True})
    assert err.value.body["param"] == "include_stop_str_in_output"


def test_a_negative_seed_is_taken_as_vllm_takes_it(client):
    """vLLM takes any signed 64-bit seed; here a negative one is read as itself + 2^63 (the engine's
    0..2^63 - 1), so it repeats, and one below -2^63 is a 400 naming `seed`."""
    model = client.models.list().data[0].id
    texts = {}
    for seed in (-5, 2**63 - 5, -5, 6):
        out = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=12, seed=seed,
                                        extra_body={"mode": "ar", "temperature": 1.0})
        texts.setdefault(seed, set()).add(out.choices[0].text)
    assert texts[-5] == texts[2**63 - 5] and len(texts[-5]) == 1
    assert texts[6] != texts[-5]  # the seed is read, not dropped (12 sampled tokens at temperature 1)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x", max_tokens=1, seed=-2**63 - 1)
    assert err.value.body["param"] == "seed"
