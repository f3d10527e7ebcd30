"""max_model_len (vLLM's --max-model-len; ServeConfig.max_model_len): the context served, below the model's.
An engine whose KV cache holds less than the model's context refused an editor's infill in a large
file with a 400 "shorten the prompt" that the editor cannot act on (the server builds that prompt to the
context); with max_model_len at what the KV cache holds, the prompt is built to fit and the completion
is served. The engine replica says so at start (engine_host.kv_short_of_context)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import httpx
import pydantic
import pytest
from serve_testbed import local_app

from integrations import cli_serve
from integrations.engine_client import read_model_card
from integrations.engine_host import kv_short_of_context
from integrations.serve_config import ServeConfig

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present")
PREFIX = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300))  # ~3,000 tokens each side
SUFFIX = "".join(f"def g{i}(y):\n    return y * {i}\n\n" for i in range(300))
SMALL_KV = {"num_blocks": 48}  # 46 usable blocks of 16 tokens: 720 tokens, below the model's 4,096


def _infill(url: str) -> httpx.Response:
    return httpx.post(url + "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 16}, timeout=120)


def test_an_infill_in_a_large_file_fits_a_small_kv_cache_once_max_model_len_says_so():
    with local_app(SHIPPED_MODEL, runner_options=SMALL_KV) as app:
        short = kv_short_of_context(app.engine, 4096)
        assert short and "set max_model_len to at most 720" in short
        refused = _infill(app.url)
        assert refused.status_code == 400 and "KV cache" in refused.json()["error"]["message"]  # (the old outcome)
    with local_app(SHIPPED_MODEL, runner_options=SMALL_KV, max_model_len=512) as app:
        assert kv_short_of_context(app.engine, 512) is None
        answer = _infill(app.url)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["tokens_predicted"] == 16 and body["generation_settings"]["n_ctx"] == 512
        assert body["tokens_evaluated"] + 16 <= 512  # the prompt was built to the context served
        [model] = httpx.get(app.url + "/v1/models", timeout=30).json()["data"]
        assert model["max_model_len"] == 512
        assert httpx.get(app.url + "/v1/engine", timeout=30).json()["request_limits"]["context_length"] == 512
        too_long = httpx.post(app.url + "/v1/completions", json={"prompt": PREFIX[:3500], "max_tokens": 4}, timeout=60)
        assert too_long.status_code == 400 and "512" in too_long.json()["error"]["message"]  # a client's own prompt


def test_max_model_len_is_at_most_the_models_context_and_the_flag_sets_it():
    with pytest.raises(pydantic.ValidationError, match="max_model_len: got 5000; give 1 to 4096 .the model's context"):
        ServeConfig(model=str(SHIPPED_MODEL), max_model_len=5000)
    with pytest.raises(pydantic.ValidationError, match="max_model_len"):
        ServeConfig(model=str(SHIPPED_MODEL), max_model_len=0)
    assert ServeConfig(model=str(SHIPPED_MODEL), max_model_len=4096).max_model_len == 4096
    assert read_model_card(SHIPPED_MODEL, max_model_len=1000)["limits"]["context_length"] == 1000
    assert read_model_card(SHIPPED_MODEL, max_model_len=9000)["limits"]["context_length"] == 4096
    assert read_model_card(SHIPPED_MODEL)["limits"]["context_length"] == 4096
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    config = cli_serve.merged_config(parser.parse_args(["--model", str(SHIPPED_MODEL), "--max-model-len", "1024"])).args
    assert ServeConfig.model_validate(config).max_model_len == 1024
    with pytest.raises(cli_serve.CLIError, match="--max-model-len: got 0; give 1 to 4096"):
        cli_serve.merged_config(parser.parse_args(["--max-model-len", "0"]))


def _editor_complete(url: str, **params) -> list:
    import asyncio

    import msgpack
    import websockets

    from integrations.editor import protocol as rpc

    async def run() -> list:
        async with websockets.connect(url.replace("http://", "ws://") + "/v1/editor", max_size=None) as ws:
            await ws.send(rpc.encode_request(1, "complete", {"uri": "file:///a.py", "prefix": "def f(x):\n",
                                                             "suffix": "\n", "multiline": True, **params}))
            while True:
                frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60), raw=False)
                if frame[0] == rpc.RESPONSE:
                    return frame

    return asyncio.run(run())


def test_an_infill_without_a_cap_shrinks_its_gaps_to_a_small_context_and_a_cap_past_it_is_named():
    """An infill's default gaps (32 and 64 tokens) do not fit a 24-token context: without a cap the infill
    decodes one gap that does, within half the context (8: whole slots of 8), as vLLM shrinks an unset
    max_tokens to the room left, and the 7-token prompt is kept whole (a 16-token gap cut it to 8); a cap
    past the context is a 400 naming the field the client sent (the editor named `gen_length`, no
    protocol field) and the most that fits; llama.cpp's n_predict is a most: it shrinks as unset does."""
    with local_app(SHIPPED_MODEL, max_model_len=24) as app:
        for n_predict in ({}, {"n_predict": 17}, {"n_predict": 4000}):  # (-1, unset, or past the context)
            llama = httpx.post(app.url + "/infill", json={"input_prefix": "def f(x):\n", "input_suffix": "\n",
                                                          "temperature": 0, **n_predict}, timeout=60)
            assert llama.status_code == 200, llama.text
            assert 0 < llama.json()["tokens_predicted"] <= 8 and llama.json()["tokens_evaluated"] == 7
            assert not llama.json()["truncated"]
        fim = httpx.post(app.url + "/v1/completions", json={"prompt": "def f(x):\n", "suffix": "\n"}, timeout=60)
        assert fim.status_code == 200, fim.text
        assert 0 < fim.json()["usage"]["completion_tokens"] <= 8 and fim.json()["usage"]["prompt_tokens"] == 7
        [_, _, error, result] = _editor_complete(app.url)
        assert error is None and result["text"] and not result["truncated"], (error, result)

        over = httpx.post(app.url + "/v1/completions", json={"prompt": "a", "suffix": "b", "max_tokens": 17},
                          timeout=60)
        assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
        assert "at most 16 tokens" in over.json()["error"]["message"]
        fits = httpx.post(app.url + "/v1/completions", json={"prompt": "a", "suffix": "b", "max_tokens": 16}, timeout=60)
        assert fits.status_code == 200, fits.text  # the number the 400 gave works
        too_long = httpx.post(app.url + "/v1/completions", json={"prompt": "a", "suffix": "b", "min_tokens": 17},
                              timeout=60)
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "min_tokens"
        both = httpx.post(app.url + "/v1/completions", json={"prompt": "a", "suffix": "b", "max_tokens": 17,
                                                             "min_tokens": 17}, timeout=60)
        assert both.status_code == 400 and both.json()["error"]["param"] == "max_tokens"  # one retry does (helper-182)
        assert "send max_tokens 16 or less and min_tokens 16 or less" in both.json()["error"]["message"]
        retry = httpx.post(app.url + "/v1/completions", json={"prompt": "a", "suffix": "b", "max_tokens": 16,
                                                              "min_tokens": 16}, timeout=60)
        assert retry.status_code == 200, retry.text
        [_, _, error, _] = _editor_complete(app.url, max_tokens=17)
        assert error["data"]["field"] == "max_tokens" and "max_tokens 16 or less" in error["message"]
        [_, _, error, _] = _editor_complete(app.url, gaps=[24])
        assert error["data"]["field"] == "gaps"
    with local_app(SHIPPED_MODEL, max_model_len=2) as app:  # no gap at all: a prompt token and a suffix token
        none = httpx.post(app.url + "/infill", json={"input_prefix": "a", "input_suffix": "b"}, timeout=60)
        assert none.status_code == 400 and "holds no completion" in none.json()["error"]["message"]


@pytest.mark.parametrize("context", [18, 34, 66])
def test_one_more_token_of_context_never_cuts_a_short_prompt(context):
    """A strategy gap that only just fitted was decoded, cutting a 10-token prompt to a token of prefix and
    one of suffix: at 18 (n_predict 16), 34 and 66 (gaps 32 and 64) the completion was worse than at one
    token less (helper-182). Gaps keep within half the context, so a prompt of up to the other half stays."""
    prefix, suffix = "def add(a, b):\n    return", "\n"
    with local_app(SHIPPED_MODEL, max_model_len=context) as app:
        for body in ({}, {"n_predict": 16}):
            llama = httpx.post(app.url + "/infill", json={"input_prefix": prefix, "input_suffix": suffix,
                                                          "temperature": 0, **body}, timeout=60)
            assert llama.status_code == 200 and not llama.json()["truncated"], (body, llama.text)
            assert llama.json()["tokens_evaluated"] == 10
        fim = httpx.post(app.url + "/v1/completions", json={"prompt": prefix, "suffix": suffix}, timeout=60)
        assert fim.status_code == 200 and fim.json()["usage"]["prompt_tokens"] == 10, fim.text
        [_, _, error, result] = _editor_complete(app.url, prefix=prefix, suffix=suffix)
        assert error is None and not result["truncated"], (error, result)


KV_SHORT = {"num_blocks": 12}  # 11 blocks of 16 tokens for a request's text and tentative tokens: 176, not 4,096
KV_CAPS = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "max_completion_tokens"),
           ("/v1/responses", {"input": "hi"}, "max_output_tokens"),
           ("/v1/completions", {"prompt": "hi"}, "max_tokens"),
           ("/completion", {"prompt": "hi"}, "n_predict")]


def test_a_cap_over_the_context_is_told_the_most_a_smaller_kv_cache_takes():
    """A cap over the context was told "at most N" for the context (4,082), and N was refused again with
    the KV cache's smaller number (161): the first 400 names that number, which is then served; the
    Messages route's "P + M > C" (which Claude Code parses) is the KV cache's too. Where the KV cache
    holds the context's number, that number stands and the check queues nothing."""
    with local_app(SHIPPED_MODEL, runner_options=KV_SHORT) as app:
        for path, body, cap in KV_CAPS:
            over = httpx.post(app.url + path, json={**body, cap: 5000, "temperature": 0}, timeout=60)
            assert over.status_code == 400, over.text
            message = over.json()["error"]["message"]
            assert over.json()["error"].get("param", cap) == cap and cap in message, message
            assert "4,096" in message and "the engine's KV cache holds at most" in message, message
            most = int(message.rsplit("ask for at most ", 1)[1].split()[0].replace(",", ""))
            assert most < 176, message
            again = httpx.post(app.url + path, json={**body, cap: most, "temperature": 0}, timeout=120)
            assert again.status_code == 200, (path, cap, most, again.text)
        messages = {"model": SHIPPED_MODEL.name, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
        over = httpx.post(app.url + "/v1/messages", json={**messages, "max_tokens": 5000}, timeout=60)
        assert over.status_code == 400 and "KV cache" in over.json()["error"]["message"], over.text
        limit = int(over.json()["error"]["message"].split(" > ")[1].split(",")[0])
        answer = httpx.post(app.url + "/v1/messages", json={**messages, "max_tokens": limit - 14}, timeout=120)
        assert answer.status_code == 200, (limit, answer.text)  # (14: the prompt's tokens, "14 + 5000 > ...")
        assert "14 + 5000" in over.json()["error"]["message"]
    with local_app(SHIPPED_MODEL, max_model_len=64) as app:
        over = httpx.post(app.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 100}, timeout=60)
        assert over.status_code == 400 and "ask for at most 63 or" in over.json()["error"]["message"], over.text
        assert "KV cache" not in over.json()["error"]["message"]
        stats = httpx.get(app.url + "/v1/engine", timeout=30).json()["engine"]
        assert stats["running"] == stats["waiting"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def _most(response: httpx.Response) -> int:
    return int(response.json()["error"]["message"].rsplit("ask for at most ", 1)[1].split()[0].replace(",", ""))


def test_a_batch_a_full_prompt_and_min_tokens_get_one_400_on_a_smaller_kv_cache():
    """What still took two 400s where the KV cache holds less than the context: a batch's number came
    from its first prompt (a longer one was refused again at it), a prompt filling the KV cache was told
    the context's number and then "shorten the prompt", and min_tokens near the cap was told a number
    the check refused because it counted from min_tokens. Each is now one 400 naming what to change."""
    longer = "def f(x):\n    return x + 1\n" * 3  # 33 tokens: the KV cache leaves it fewer than "hi"
    fills = "x = 1\n" * 44  # 176 tokens: no generated token fits beside it
    with local_app(SHIPPED_MODEL, runner_options=KV_SHORT) as app:
        completions = app.url + "/v1/completions"
        for prompts in (["hi", longer], [longer, "hi"]):
            for cap in (5000, 174):  # over the context; within it but over the KV cache for the longer prompt
                over = httpx.post(completions, json={"prompt": prompts, "max_tokens": cap}, timeout=60)
                assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens", over.text
                most = _most(over)
                again = httpx.post(completions, json={"prompt": prompts, "max_tokens": most}, timeout=120)
                assert again.status_code == 200, (prompts, cap, most, again.text)
                assert [c["finish_reason"] for c in again.json()["choices"]] in (["length"] * 2, ["stop", "length"],
                                                                                 ["length", "stop"], ["stop"] * 2)
        for path, body, prompt_field in [("/v1/completions", {"prompt": fills, "max_tokens": 5000}, "prompt"),
                                         ("/v1/completions", {"prompt": ["hi", fills], "max_tokens": 10}, "prompt.1"),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": fills}],
                                                                   "max_tokens": 5000}, "messages"),
                                         ("/v1/responses", {"input": fills, "max_output_tokens": 5000}, "input")]:
            full = httpx.post(app.url + path, json=body, timeout=60)
            assert full.status_code == 400 and full.json()["error"]["param"] == prompt_field, (path, full.text)
            assert "shorten the prompt" in full.json()["error"]["message"], full.text
        low = httpx.post(completions, json={"prompt": "hi", "max_tokens": 5000, "min_tokens": 4000}, timeout=60)
        message = low.json()["error"]["message"]
        assert low.status_code == 400 and "KV cache" in message and "lower min_tokens (4,000)" in message, low.text
        again = httpx.post(completions, json={"prompt": "hi", "max_tokens": _most(low), "min_tokens": _most(low)},
                           timeout=120)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == _most(low), again.text
        # within the context, a min_tokens the KV cache cannot hold beside a 33-token prompt was "shorten the
        # prompt"; a client shape whose steps do not fit got the context's number, then the KV cache's shape
        # (helper-217); a batch with no max_tokens started its short prompt before the long one was refused
        low = httpx.post(completions, json={"prompt": ["hi", longer], "max_tokens": 150, "min_tokens": 150}, timeout=60)
        assert low.status_code == 400 and low.json()["error"]["param"] == "min_tokens", low.text
        most = int(low.json()["error"]["message"].rsplit("to at most ", 1)[1])
        again = httpx.post(completions, json={"prompt": ["hi", longer], "max_tokens": most, "min_tokens": most},
                           timeout=120)
        assert again.status_code == 200, again.text
        shape = {"prompt": "hi", "max_tokens": 5000, "slot_size": 64, "mode": "refusion"}
        shaped = httpx.post(completions, json=shape, timeout=60)
        hint = re.search(r"send slot_size (\d+) and serial_num_blocks (\d+) with max_tokens at most (\d+)", shaped.text)
        assert shaped.status_code == 400 and "4,096" in shaped.text and hint, shaped.text
        again = httpx.post(completions, json={**shape, "max_tokens": int(hint[3]), "slot_size": int(hint[1]),
                                              "serial_num_blocks": int(hint[2])}, timeout=120)
        assert again.status_code == 200, again.text
        auto = httpx.post(completions, json={**shape, "mode": "auto"}, timeout=60)  # (AR's number: served AR)
        again = httpx.post(completions, json={**shape, "mode": "auto", "max_tokens": _most(auto)}, timeout=120)
        assert again.status_code == 200 and again.json()["refusion"]["mode"] == "ar", again.text
        forwards = httpx.get(app.url + "/v1/engine", timeout=30).json()["engine"]["forwards"]
        full = httpx.post(completions, json={"prompt": ["hi", fills]}, timeout=60)
        assert full.status_code == 400 and full.json()["error"]["param"] == "prompt.1", full.text
        stats = httpx.get(app.url + "/v1/engine", timeout=30).json()["engine"]
        assert stats["running"] == stats["waiting"] == 0 and stats["forwards"] == forwards  # ("hi" never started)
        # A prompt beside which only AR (no block of tentative tokens) fits: mode auto runs it AR (it was told
        # to shorten the prompt); min_tokens (AR-only) keeps the check AR, so its number is AR's (helper-219)
        near = {"prompt": [87] * 175}
        auto = httpx.post(completions, json=near, timeout=120)
        assert auto.status_code == 200 and auto.json()["refusion"]["mode"] == "ar", auto.text
        refused = httpx.post(completions, json={**near, "mode": "refusion"}, timeout=60)
        assert refused.status_code == 400 and "shorten the prompt" in refused.text, refused.text
        low = httpx.post(completions, json={**near, "max_tokens": 5000, "min_tokens": 2}, timeout=60)
        assert low.status_code == 400 and _most(low) == 1 and "lower min_tokens (2)" in low.text, low.text
        # one that fits neither way is told AR's most, which is served (ReFusion's had none left: "shorten the
        # prompt", helper-220); the decision is counted as the KV cache's, not the client's
        over = httpx.post(completions, json={**near, "max_tokens": 2}, timeout=60)
        assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens", over.text
        assert over.json()["error"]["message"].endswith("ask for at most 1"), over.text
        metrics = httpx.get(app.url + "/metrics", timeout=30).text
        counted = re.search(r'^refusion_mode_decisions_total\{mode="ar",reason="kv_fit"\} (\d+)\.0$', metrics, re.M)
        assert counted and int(counted[1]) >= 2, metrics  # (the 175-token prompt, the slot_size 64 retry)


def test_messages_prompt_over_the_kv_cache_is_too_long_with_the_longest_it_holds():
    """A Messages prompt the KV cache cannot hold beside one token (though within the context) was told
    "shorten the prompt" in words Claude Code does not read; it is now Anthropic's "prompt is too long: P
    tokens > M maximum" (on which Claude Code compacts the conversation), M the longest prompt served, with
    the engine's reason after it; with max_tokens over the context too. A prompt of M tokens is served."""
    def body(content: str, max_tokens: int) -> dict:
        return {"model": SHIPPED_MODEL.name, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": content}]}

    with local_app(SHIPPED_MODEL, runner_options=KV_SHORT) as app:
        url = app.url
        fills = "x = 1\n" * 44
        found = []
        for cap in (10, 5000):
            over = httpx.post(url + "/v1/messages", json=body(fills, cap), timeout=60)
            message = over.json()["error"]["message"]
            match = re.match(r"prompt is too long: (\d+) tokens > (\d+) maximum \((.*KV cache.*)\)$", message)
            assert over.status_code == 400 and match and int(match[2]) < int(match[1]), over.text
            found.append(int(match[2]))
        assert found[0] == found[1], found  # one number whatever the cap
        longest = found[0]
        # A prompt over the context too gets the KV cache's number, not the context's 4,095, which the KV cache
        # refused again (helper-223); /v1/completions names it beside the context's
        over = httpx.post(url + "/v1/messages", json=body("x = 1\n" * 1000, 1), timeout=60)
        assert over.status_code == 400 and re.match(rf"prompt is too long: \d+ tokens > {longest} maximum \(",
                                                     over.json()["error"]["message"]), over.text
        plain = httpx.post(url + "/v1/completions", json={"prompt": "x = 1\n" * 1100, "max_tokens": 1}, timeout=60)
        assert plain.status_code == 400 and "maximum context length is 4,096" in plain.text, plain.text
        assert f"KV cache holds at most {longest} prompt tokens" in plain.text, plain.text

        def counted(content: str) -> int:
            count = {"model": SHIPPED_MODEL.name, "messages": [{"role": "user", "content": content}]}
            answer = httpx.post(url + "/v1/messages/count_tokens", json=count, timeout=60)
            return answer.json()["input_tokens"]

        lines = next(k for k in range(44) if counted("x = 1\n" * (k + 1)) > longest)
        fitting = next(content for j in range(longest) if counted(content := "x = 1\n" * lines + " a" * j) >= longest)
        assert counted(fitting) == longest, (longest, counted(fitting))
        served = httpx.post(url + "/v1/messages", json=body(fitting, 1), timeout=120)
        assert served.status_code == 200 and served.json()["usage"]["input_tokens"] == longest, served.text
        refused = httpx.post(url + "/v1/messages", json=body(fitting + " a" * 3, 1), timeout=60)
        assert refused.status_code == 400 and "prompt is too long" in refused.text, refused.text
        stats = httpx.get(url + "/v1/engine", timeout=30).json()["engine"]
        assert stats["running"] == stats["waiting"] == 0
