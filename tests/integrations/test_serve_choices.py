"""OpenAI's `n` through the real Ray Serve app with the openai SDK: n choices, each its own engine
request (integrations/openai_choices.py), indexed 0..n-1, streamed interleaved; seeded choices differ
from each other and repeat across calls; usage sums the choices; a choice the engine refuses fails
the whole request before it starts, and no KV is left behind."""

from __future__ import annotations

import httpx
import openai
import pytest

SAMPLED = {"mode": "ar", "temperature": 1.0, "top_k": 0}
USER = [{"role": "user", "content": "Write a function."}]


def test_completion_choices_are_seeded_and_indexed(client, model):
    out = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=8, n=4, seed=11, extra_body=SAMPLED)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) > 1  # seeds 11..14: different draws
    again = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=8, n=4, seed=11, extra_body=SAMPLED)
    assert [c.text for c in again.choices] == texts
    for i in (0, 2):  # choice i is the single request with seed 11 + i
        one = client.completions.create(model=model, prompt="def f(x):\n", max_tokens=8, seed=11 + i, extra_body=SAMPLED)
        assert one.choices[0].text == texts[i]
    stream = list(client.completions.create(model=model, prompt="def f(x):\n", max_tokens=8, n=4, seed=11, stream=True,
                                            stream_options={"include_usage": True}, extra_body=SAMPLED))
    joined = {i: "".join(c.choices[0].text for c in stream if c.choices and c.choices[0].index == i) for i in range(4)}
    assert [joined[i] for i in range(4)] == texts
    finishes = [c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2, 3]
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == out.usage.completion_tokens
    assert out.usage.prompt_tokens == stream[-1].usage.prompt_tokens  # the prompt is counted once


def test_chat_choices_with_logprobs(client, model):
    out = client.chat.completions.create(model=model, messages=USER, max_tokens=6, n=3, seed=5, logprobs=True,
                                         top_logprobs=1, extra_body=SAMPLED)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert sum(len(c.logprobs.content) for c in out.choices) == out.usage.completion_tokens
    stream = list(client.chat.completions.create(model=model, messages=USER, max_tokens=6, n=3, seed=5, stream=True,
                                                 extra_body=SAMPLED))
    roles = [c.choices[0].index for c in stream if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1, 2]
    for choice in out.choices:
        text = "".join(c.choices[0].delta.content or "" for c in stream
                       if c.choices and c.choices[0].index == choice.index)
        assert text == choice.message.content


def test_greedy_choices_are_identical(client, model):
    out = client.completions.create(model=model, prompt="import os\n", max_tokens=6, n=3, temperature=0,
                                    extra_body={"mode": "ar"})
    assert len({c.text for c in out.choices}) == 1


def test_choices_that_can_never_be_admitted_are_a_400_and_leak_nothing(strict_base_url, wait_until):
    """The strict app runs one request at a time with no queue: n=2 can never be admitted whole, so
    the request is a 400 naming `n` before any choice starts (streamed too; not a 503 a client would
    retry for ever), and the engine is left idle. (A choice refused by a full engine, its admitted
    siblings cancelled: test_openai_choices.)"""
    from serve_testbed import API_KEY

    strict = openai.OpenAI(base_url=strict_base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    model = strict.models.list().data[0].id
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as err:
            result = strict.completions.create(model=model, prompt="x", max_tokens=4, n=2, stream=stream,
                                               extra_body={"mode": "ar"})
            list(result) if stream else None
        assert err.value.status_code == 400 and err.value.body["param"] == "n", err.value.body
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def idle() -> bool:
        engine = httpx.get(strict_base_url + "/v1/engine", headers=headers, timeout=30).json()["engine"]
        return engine["running"] == 0 and engine["waiting"] == 0

    wait_until.blocking(idle, "the engine to be idle")
    # (retried: Ray Serve's health probe, a one-token request, may hold the strict app's one slot: a 503)
    one = strict.with_options(max_retries=8).completions.create(model=model, prompt="x", max_tokens=4,
                                                                extra_body={"mode": "ar"})
    assert one.choices[0].finish_reason in ("stop", "length")


def test_a_batch_of_prompts_answers_in_prompt_order(client, model):
    """OpenAI's batch forms: a list of strings or of token-id lists; choice k * n + j is prompt k's
    choice j, equal to that prompt sent alone with seed + j; each prompt keeps its own style (a CRLF
    prompt's text comes back with CRLF); usage counts every prompt."""
    prompts = ["def f(x):\n", "import os\r\n", "class A:\n"]
    out = client.completions.create(model=model, prompt=prompts, max_tokens=6, n=2, seed=3, extra_body=SAMPLED)
    assert [c.index for c in out.choices] == list(range(6))
    for k, prompt in enumerate(prompts):
        for j in range(2):
            alone = client.completions.create(model=model, prompt=prompt, max_tokens=6, seed=3 + j, extra_body=SAMPLED)
            assert out.choices[2 * k + j].text == alone.choices[0].text, (k, j)
    singles = [client.completions.create(model=model, prompt=p, max_tokens=1, extra_body=SAMPLED) for p in prompts]
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    ids = [[5, 6, 7], [8, 9]]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, extra_body={"mode": "ar"})
    for k, prompt in enumerate(ids):
        alone = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"mode": "ar"})
        assert by_ids.choices[k].text == alone.choices[0].text
    streamed = list(client.completions.create(model=model, prompt=prompts, max_tokens=6, n=2, seed=3, stream=True,
                                              extra_body=SAMPLED))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(6)]
    assert texts == [c.text for c in out.choices]
