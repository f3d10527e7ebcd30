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
    position, dropped; then each from the previous token's row), with each row's log_softmax."""
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
            ids.append(int(row.argmax()))
            rows.append(row)
            if ids[-1] == hf.config.eos_token_id:
                break
        return ids, rows

    return tok, decode


def _text(tok, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


def test_completion_logprobs_are_the_models(client, model, reference):
    tok, decode = reference
    prompt = "def add(a, b):\n    return"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, extra_body=AR)
    ids, rows = decode(tok(prompt)["input_ids"], 8)
    lp = out.choices[0].logprobs
    ids = ids[: len(lp.tokens)]  # an EOS ends the text (not returned)
    assert lp.tokens == [_text(tok, t) for t in ids] and ids
    assert lp.token_logprobs == pytest.approx([r[t].item() for r, t in zip(rows, ids)], abs=1e-4)
    for top, row, token in zip(lp.top_logprobs, rows, ids):
        best = row.topk(3)
        want = {_text(tok, t): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
        want[_text(tok, token)] = row[token].item()  # OpenAI: the chosen token is always in, up to N + 1
        assert top.keys() == want.keys() and list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(out.choices[0].text)
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, stream=True,
                                              extra_body=AR))
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [v for p in pieces for v in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
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
