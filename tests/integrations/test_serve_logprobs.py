"""Log probabilities through the real Ray Serve app with the openai SDK (completions `logprobs: N`, chat
`logprobs: true` + `top_logprobs: N`), checked against transformers on the served model's weights: greedy
AR's tokens, their log probabilities and the top alternatives are the model's own; streamed and whole
responses agree; the shapes are OpenAI's (integrations/openai_logprobs.py)."""

from __future__ import annotations

import math

import pytest

AR = {"mode": "ar", "temperature": 0.0}
USER = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy AR as the engine decodes it (the first token read from a MASK at the first generation
    position, dropped; then each from the previous token's row; the mask token never chosen), with each
    row's log_softmax (the mask's included: log probabilities are of the logits as the model gave them)."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    mask = hf.config.mask_token_id

    @torch.no_grad()
    def decode(prompt_ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
        ids, rows = [], []
        for i in range(n):
            context = prompt_ids + ids
            inputs = context + [mask] if i == 0 else context
            row = hf(input_ids=torch.tensor([inputs])).logits[0, -1].float().log_softmax(-1)
            ids.append(int(row.index_fill(0, torch.tensor([mask]), -math.inf).argmax()))
            rows.append(row)
            if ids[-1] == hf.config.eos_token_id:
                break
        return ids, rows

    return tok, decode


def _text(tok, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


def test_completion_logprobs_are_the_models(client, model, reference, tiny_model_dir):
    import torch
    from transformers import AutoConfig

    tok, decode = reference
    mask = AutoConfig.from_pretrained(tiny_model_dir).mask_token_id
    prompt = "def add(a, b):\n    return"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, extra_body=AR)
    ids, rows = decode(tok(prompt)["input_ids"], 8)
    lp = out.choices[0].logprobs
    ids = ids[: len(lp.tokens)]  # an EOS ends the text (not returned)
    assert lp.tokens == [_text(tok, t) for t in ids] and ids
    assert lp.token_logprobs == pytest.approx([r[t].item() for r, t in zip(rows, ids)], abs=1e-4)
    for top, row, token in zip(lp.top_logprobs, rows, ids):
        best = row.index_fill(0, torch.tensor([mask]), -math.inf).topk(3)  # the mask token is never listed
        want = {_text(tok, t): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
        want[_text(tok, token)] = row[token].item()  # OpenAI: the chosen token is always in, up to N + 1
        assert top.keys() == want.keys() and list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(out.choices[0].text)
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, stream=True,
                                              extra_body=AR))
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    # (two requests agree to float32 rounding, not bit for bit: a step shared with the replica's health
    # probe packs other shapes; 7e-7 seen, test_serve_responses)
    assert [v for p in pieces for v in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset


def test_chat_logprobs_have_openais_shape_and_the_models_values(client, model, reference):
    tok, _ = reference
    out = client.chat.completions.create(model=model, messages=USER, max_tokens=6, logprobs=True, top_logprobs=2,
                                         extra_body=AR)
    content = out.choices[0].logprobs.content
    assert content and len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the best one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = list(client.chat.completions.create(model=model, messages=USER, max_tokens=6, logprobs=True,
                                                   top_logprobs=2, stream=True, extra_body=AR))
    chunks = [c.choices[0].logprobs.content for c in streamed if c.choices and c.choices[0].logprobs]
    assert [e.token for part in chunks for e in part] == [e.token for e in content]
    plain = client.chat.completions.create(model=model, messages=USER, max_tokens=6, extra_body=AR)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content
    only = client.chat.completions.create(model=model, messages=USER, max_tokens=6, logprobs=True, extra_body=AR)
    assert [e.top_logprobs for e in only.choices[0].logprobs.content] == [[]] * len(content)


def test_refusion_and_sampled_requests_return_logprobs(client, model):
    for extra in ({"mode": "refusion"}, {"mode": "ar", "temperature": 1.0, "seed": 3, "top_k": 4}):
        out = client.completions.create(model=model, prompt="import os\n", max_tokens=8, logprobs=1, extra_body=extra)
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
        assert all(v <= 0 and math.isfinite(v) for v in lp.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)


@pytest.fixture(scope="module")
def prompt_rows(tiny_model_dir):
    """[P, V] log_softmax rows of transformers' causal forward of a prompt (row p: token p + 1)."""
    import torch
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def rows(prompt_ids: list[int]) -> torch.Tensor:
        return hf(input_ids=torch.tensor([prompt_ids])).logits[0].float().log_softmax(-1)

    return rows


@pytest.mark.parametrize("extra", [AR, {"mode": "refusion"}])
def test_echo_returns_the_prompt_and_its_tokens_logprobs(client, model, reference, prompt_rows, extra):
    """echo + logprobs 3 (OpenAI's legacy completions, vLLM): the text is the prompt then the completion
    the same request without echo returns; the logprobs list the prompt's tokens first, the first with
    null logprob and top_logprobs, each other one with transformers' causal log probability and top 3;
    every text_offset points at its token's text; streamed, the same text and entries."""
    tok, _ = reference
    prompt = "import os\n\ndef read(path):\n    with open(path) as f:\n"
    ids = tok(prompt)["input_ids"]
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, extra_body=extra)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, echo=True, extra_body=extra)
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert choice.text == prompt + plain.choices[0].text and choice.finish_reason == plain.choices[0].finish_reason
    assert out.usage.completion_tokens == plain.usage.completion_tokens
    assert lp.tokens == [_text(tok, t) for t in ids] + plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = prompt_rows(ids)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([rows[k, ids[k + 1]].item() for k in range(len(ids) - 1)],
                                                          abs=1e-4)
    for k in range(1, len(ids)):
        best = rows[k - 1].topk(3)
        want = {_text(tok, t): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
        want[_text(tok, ids[k])] = rows[k - 1, ids[k]].item()
        assert lp.top_logprobs[k].keys() == want.keys()
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    for k, (token, offset) in enumerate(zip(lp.tokens, lp.text_offset)):
        if k < len(ids) or token not in tok.all_special_tokens:  # generated special tokens have no text
            assert choice.text[offset:offset + len(token)] == token
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, echo=True,
                                            stream=True, extra_body=extra))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    pieces = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset


def test_lm_eval_loglikelihood_requests(client, model, reference, prompt_rows):
    """What lm-evaluation-harness's local-completions sends to score a continuation (a batch of token-id
    prompts, echo, logprobs 1, max_tokens 1, temperature 0) and how it reads the answer: the sum of
    token_logprobs[ctxlen:-1] is the continuation's log-likelihood under the causal model, and is_greedy
    compares each token's value with the best of its top_logprobs."""
    tok, _ = reference
    pairs = [("def add(a, b):\n    return", " a + b"), ("for i in range(10):\n", "    print(i)")]
    batch = [tok(c)["input_ids"] + tok(x)["input_ids"] for c, x in pairs]
    out = client.completions.create(model=model, prompt=batch, max_tokens=1, logprobs=1, echo=True, temperature=0,
                                    seed=1234)
    assert len(out.choices) == 2
    for choice, ids, (context, _) in zip(sorted(out.choices, key=lambda c: c.index), batch, pairs):
        ctxlen = len(tok(context)["input_ids"])
        rows = prompt_rows(ids)
        want = sum(rows[k - 1, ids[k]].item() for k in range(ctxlen, len(ids)))
        values = choice.logprobs.token_logprobs
        assert len(values) == len(ids) + 1  # the prompt, then the one generated token
        assert sum(values[ctxlen:-1]) == pytest.approx(want, abs=1e-3)
        greedy = all(rows[k - 1].argmax().item() == ids[k] for k in range(ctxlen, len(ids)))
        seen = all(v == max(top.values()) for v, top in zip(values[ctxlen:-1], choice.logprobs.top_logprobs[ctxlen:-1]))
        assert seen == greedy


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_returns_the_scored_prompt_alone(client, model, reference, prompt_rows, stream):
    tok, _ = reference
    prompt = "class Stack:\n    def push(self, item):"
    ids = tok(prompt)["input_ids"]
    out = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2, stream=stream,
                                    stream_options={"include_usage": True} if stream else None)
    chunks = list(out) if stream else [out]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    values = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert text == prompt and finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == len(ids)
    rows = prompt_rows(ids)
    assert values[0] is None
    assert values[1:] == pytest.approx([rows[k - 1, ids[k]].item() for k in range(1, len(ids))], abs=1e-4)


def test_echo_without_logprobs_and_echo_errors(client, model):
    import openai

    out = client.completions.create(model=model, prompt=[[5, 6, 7], [40, 41]], max_tokens=4, echo=True, n=2,
                                    extra_body={"mode": "ar"})
    assert len(out.choices) == 4 and all(c.logprobs is None for c in out.choices)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    for ids, choice_texts in (([5, 6, 7], texts[:2]), ([40, 41], texts[2:])):
        only = client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True)
        assert only.usage.completion_tokens == 0 and only.choices[0].logprobs is None
        assert only.choices[0].text and all(t.startswith(only.choices[0].text) for t in choice_texts)
    text = client.completions.create(model=model, prompt="x = 1\n", max_tokens=4, echo=True).choices[0].text
    assert text.startswith("x = 1\n")
    for kwargs, field in (({"max_tokens": 0}, "max_tokens"), ({"echo": True, "suffix": "\n"}, "echo"),
                          ({"max_tokens": -1, "echo": True}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt="x = ", **({"max_tokens": 4} | kwargs))
        assert err.value.body["param"] == field, err.value.body


def test_an_eos_ending_is_the_last_logprobs_entry(client, model, reference):
    """Text that ends on EOS (forced here with logit_bias, which leaves the reported log probabilities
    unbiased): completions list the EOS token last, with the model's log probability of it (its text is
    not returned and usage counts returned tokens), as OpenAI's legacy completions and vLLM do; echoed,
    that is the entry lm-evaluation-harness drops as the generated one (`token_logprobs[ctxlen:-1]`).
    A stop string or the token cap ends the text otherwise: no EOS entry."""
    tok, decode = reference
    eos = tok.eos_token_id
    prompt = "def add(a, b):\n    return a + b\n"
    ids = tok(prompt)["input_ids"]
    _, rows = decode(ids, 1)  # the first generated token is read from a MASK row (the AR decoder's rule)
    for stream in (False, True):
        out = client.completions.create(model=model, prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0,
                                        logit_bias={str(eos): 100}, stream=stream)
        chunks = list(out) if stream else [out]
        lps = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        tokens = [t for lp in lps for t in lp.tokens]
        values = [v for lp in lps for v in lp.token_logprobs]
        assert len(values) == len(ids) + 1 and tokens[-1] == _text(tok, eos)
        assert values[-1] == pytest.approx(rows[0][eos].item(), abs=1e-4)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    plain = client.completions.create(model=model, prompt=ids, max_tokens=4, logprobs=0, logit_bias={str(eos): 100})
    assert plain.choices[0].text == "" and plain.choices[0].logprobs.tokens == [_text(tok, eos)]
    assert plain.usage.completion_tokens == 0 and plain.choices[0].logprobs.text_offset == [0]
    capped = client.completions.create(model=model, prompt=prompt, max_tokens=3, logprobs=0, extra_body=AR)
    assert capped.choices[0].finish_reason == "length" and len(capped.choices[0].logprobs.tokens) == 3


def _check_prompt_logprobs(tok, plp, ids, rows, num_top):
    """vLLM's prompt_logprobs against transformers' causal rows: None first, then per token its own
    entry first (logprob, rank = 1 + the tokens more likely, decoded_token), then the num_top best."""
    assert len(plp) == len(ids) and plp[0] is None
    for k in range(1, len(ids)):
        row, position = rows[k - 1], plp[k]
        own = position[str(ids[k])]
        assert list(position)[0] == str(ids[k])
        assert own["logprob"] == pytest.approx(row[ids[k]].item(), abs=1e-4)
        value = row[ids[k]].item()  # rank: 1 + the tokens more likely (within float noise of transformers')
        assert 1 + int((row > value + 1e-4).sum()) <= own["rank"] <= 1 + int((row > value - 1e-4).sum())
        assert own["decoded_token"] == _text(tok, ids[k])
        best = row.topk(num_top).indices.tolist()
        assert set(position) == {str(ids[k])} | {str(t) for t in best}
        for r, t in enumerate(best, 1):
            if t != ids[k]:
                assert position[str(t)]["rank"] == r and position[str(t)]["logprob"] == pytest.approx(row[t].item(), abs=1e-4)


def test_vllm_prompt_logprobs(client, model, serve_base_url, reference, prompt_rows):
    """vLLM's `prompt_logprobs: N` (extra_body): completions give each choice the list (its own
    prompt's, in a batch), chat gives the response one; the values are transformers' causal log
    probabilities of the prompt as the server read it (a prompt ending in spaces is not healed), the
    generated text is the same as without it; streamed, 0 is accepted and returns none, N > 0 is a 400."""
    import httpx
    import openai

    tok, _ = reference
    prompts = ["def add(a, b):\n    ", "for i in range(3):\n"]
    out = client.completions.create(model=model, prompt=prompts, max_tokens=4, n=2, extra_body=AR | {"prompt_logprobs": 2})
    plain = client.completions.create(model=model, prompt=prompts, max_tokens=4, n=2, extra_body=AR)
    assert len(out.choices) == 4
    for choice, twin in zip(sorted(out.choices, key=lambda c: c.index), sorted(plain.choices, key=lambda c: c.index)):
        ids = tok(prompts[choice.index // 2])["input_ids"]  # read as sent: the trailing spaces too
        _check_prompt_logprobs(tok, choice.model_extra["prompt_logprobs"], ids, prompt_rows(ids), 2)
        assert choice.logprobs is None and "prompt_logprobs" not in twin.model_extra
    by_index = {c.index: c.model_extra["prompt_logprobs"] for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # one scoring per prompt, shared (as vLLM)
    assert out.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)

    echo = client.completions.create(model=model, prompt=prompts[1], max_tokens=2, echo=True, logprobs=1,
                                     extra_body=AR | {"prompt_logprobs": 4})
    ids = tok(prompts[1])["input_ids"]
    _check_prompt_logprobs(tok, echo.choices[0].model_extra["prompt_logprobs"], ids, prompt_rows(ids), 4)
    assert all(len(top) <= 2 for top in echo.choices[0].logprobs.top_logprobs[1:])  # echo's own count: 1 (+ chosen)

    messages = [{"role": "user", "content": "Write add(a, b)."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=4, n=2,
                                          extra_body=AR | {"prompt_logprobs": 0})
    ids = httpx.post(f"{serve_base_url}/tokenize", json={"model": model, "messages": messages}).json()["tokens"]
    plp = chat.model_extra["prompt_logprobs"]
    assert len(ids) == chat.usage.prompt_tokens
    _check_prompt_logprobs(tok, plp, ids, prompt_rows(ids), 0)
    assert all(len(position) == 1 for position in plp[1:])

    chunks = list(client.completions.create(model=model, prompt=prompts[1], max_tokens=2, stream=True,
                                            extra_body=AR | {"prompt_logprobs": 0}))
    assert all("prompt_logprobs" not in c.choices[0].model_extra for c in chunks if c.choices)
    for kwargs in ({"stream": True, "extra_body": {"prompt_logprobs": 1}}, {"extra_body": {"prompt_logprobs": -1}},
                   {"extra_body": {"prompt_logprobs": 21}}, {"suffix": "\n", "extra_body": {"prompt_logprobs": 1}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt="x = ", max_tokens=2, **kwargs)
        assert err.value.body["param"] == "prompt_logprobs", err.value.body
