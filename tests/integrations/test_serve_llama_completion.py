"""llama.cpp's POST /completion on the real Ray Serve app: the same text as /v1/completions for the same
request, streamed events that add up to it, completion_probabilities from n_probs, grammars and JSON
schemas enforced, llama.cpp's defaults and error shape with llama.cpp's field names."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError


@pytest.fixture(scope="module")
def http(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=60) as client:
        yield client


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_completion_is_the_openai_completion_in_llama_cpps_shape(http):
    prompt = "def add(a, b):\n"
    out = http.post("/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0, "mode": "ar",
                                         "n_probs": 2, "return_tokens": True}).json()
    same = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "mode": "ar"}).json()
    assert out["content"] == same["choices"][0]["text"] and out["stop"] is True
    assert out["tokens_predicted"] == same["usage"]["completion_tokens"] == len(out["completion_probabilities"])
    assert out["tokens_evaluated"] == same["usage"]["prompt_tokens"] and out["stop_type"] in ("eos", "limit")
    assert all(len(p["top_logprobs"]) == 2 and p["top_logprobs"][0]["id"] == p["id"]  # greedy: the best one
               for p in out["completion_probabilities"])
    settings = out["generation_settings"]
    assert (settings["top_k"], settings["top_p"], settings["min_p"]) == (40, 0.95, 0.05)  # llama.cpp's defaults
    streamed = _events(http.post("/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0,
                                                      "mode": "ar", "stream": True}).text)
    assert "".join(e["content"] for e in streamed) == out["content"]
    assert streamed[-1]["stop"] is True and all(e["stop"] is False for e in streamed[:-1])
    assert streamed[-1]["timings"]["predicted_n"] == out["tokens_predicted"]


def test_n_predict_0_is_ended_by_its_limit_whatever_the_token_it_decoded(http):
    """n_predict 0 evaluates the prompt only: the token decoded to do so is not shown, and its kind (an EOS
    here, forced by logit_bias) must not leak into stop_type (it read "eos")."""
    eos = http.get("/v1/engine").json()["defaults"]["eos_token_id"]
    out = http.post("/completion", json={"prompt": "x = 1\n", "n_predict": 0, "mode": "ar",
                                         "logit_bias": [[eos, 100]]}).json()
    assert (out["content"], out["tokens_predicted"], out["stop_type"]) == ("", 0, "limit")


def test_a_random_seed_is_reported_and_repeats_the_sample(http):
    """seed -1 (the default) is drawn when the body is read and reported in generation_settings, as /infill
    reports its own; it was reported as -1, so a sample could not be repeated."""
    body = {"prompt": "def add(a, b):\n", "n_predict": 12, "mode": "ar", "temperature": 1.5, "top_k": 0, "min_p": 0}
    first = http.post("/completion", json=body).json()
    seed = first["generation_settings"]["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = http.post("/completion", json={**body, "seed": seed}).json()
    assert again["content"] == first["content"] and again["generation_settings"]["seed"] == seed
    other = http.post("/completion", json={**body, "seed": -1}).json()["generation_settings"]["seed"]
    assert 0 <= other < 2**53 and other != seed  # 53 random bits each: exact as a JavaScript number


def test_a_negative_top_k_is_off_as_in_llama_cpp(http):
    # llama.cpp takes top_k <= 0 as off (its README's -1 too); /completion and /infill answered 400 (helper-125)
    body = {"prompt": "def add(a, b):\n", "n_predict": 8, "mode": "ar", "temperature": 1.5, "seed": 4, "min_p": 0}
    texts = {k: http.post("/completion", json={**body, "top_k": k}).json()["content"] for k in (-1, 0)}
    assert texts[-1] == texts[0]
    infill = {"input_prefix": "def add(a, b):\n", "input_suffix": "", "n_predict": 8, "mode": "ar", "temperature": 1.5,
              "seed": 4, "min_p": 0}
    filled = {k: http.post("/infill", json={**infill, "top_k": k}) for k in (-1, 0)}
    assert filled[-1].status_code == 200 and filled[-1].json()["content"] == filled[0].json()["content"]


def test_timings_are_llama_cpps_eight_and_count_only_the_prompt_tokens_processed(http):
    """llama.cpp's timings: prompt_n is the prompt tokens processed, so tokens the prefix cache served are
    not in it (they were; and /completion lacked the three per-token / per-second fields /infill has)."""
    prompt = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(12))
    body = {"prompt": prompt, "n_predict": 4, "temperature": 0, "mode": "ar"}
    http.post("/completion", json=body)
    again = http.post("/completion", json=body).json()
    assert set(again["timings"]) == {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
                                     "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
    assert again["tokens_cached"] > 0, again
    assert again["timings"]["prompt_n"] == again["tokens_evaluated"] - again["tokens_cached"]


def test_logit_bias_in_llama_cpps_form(http):
    """[[id, bias]] pairs; false bans a token (llama.cpp's form)."""
    [x] = http.post("/tokenize", json={"content": "x"}).json()["tokens"]
    forced = http.post("/completion", json={"prompt": "y", "n_predict": 4, "logit_bias": [[x, 100]]}).json()
    assert forced["content"] == http.post("/detokenize", json={"tokens": [x] * 4}).json()["content"]
    banned = http.post("/completion", json={"prompt": "y", "n_predict": 4, "temperature": 0,
                                            "logit_bias": [[x, 100], [x + 1, False]]}).json()
    assert banned["content"] == forced["content"]  # the +100 still wins: false bans only x + 1
    only_ban = http.post("/completion", json={"prompt": "y", "n_predict": 4, "temperature": 0, "n_probs": 1,
                                              "logit_bias": [[x, False]]}).json()
    assert all(p["id"] != x for p in only_ban["completion_probabilities"])
    # a token listed twice: the biases add up as llama.cpp adds them, and a false keeps it banned (the
    # last pair won, so a later +100 forced the banned token)
    ban_then_boost = http.post("/completion", json={"prompt": "y", "n_predict": 4, "temperature": 0, "n_probs": 1,
                                                    "logit_bias": [[x, False], [x, 100]]}).json()
    assert all(p["id"] != x for p in ban_then_boost["completion_probabilities"])
    # a text stands for the tokens it encodes to, in both forms (llama.cpp's [["Hello, World!", -0.5]])
    for by_text in ([["x", False]], {"x": False}):
        banned_text = http.post("/completion", json={"prompt": "y", "n_predict": 4, "temperature": 0, "n_probs": 1,
                                                     "logit_bias": by_text}).json()
        assert all(p["id"] != x for p in banned_text["completion_probabilities"]), by_text


def test_stop_takes_as_many_strings_as_infill():
    """llama.cpp's /completion has no limit on `stop` and Continue's llama.cpp provider sends its whole list:
    /completion takes as many as /infill (MAX_STOP_STRINGS), not OpenAI's 4, and names the limit past it."""
    from integrations.editor.protocol import MAX_STOP_STRINGS
    from integrations.llama_completion import LlamaCompletionBody
    from integrations.request_limits import InputError

    continues = ["\n\n", "```", "<|endoftext|>", "/src/", "#- coding: utf-8"]
    assert LlamaCompletionBody.model_validate({"prompt": "x", "stop": continues}).openai_body().stop == continues
    most = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert LlamaCompletionBody.model_validate({"prompt": "x", "stop": most}).openai_body().stop == most
    with pytest.raises((InputError, ValidationError), match=f"at most {MAX_STOP_STRINGS}"):
        LlamaCompletionBody.model_validate({"prompt": "x", "stop": most + ["one more"]}).openai_body()


@pytest.mark.parametrize("prompt, says", [
    ([261, 320, "return", 275], "mixes strings and token ids"),  # llama.cpp's mixed prompt
    (["abc", "def"], "a list of strings"),  # llama.cpp's several prompts
    ({"x": 1}, "must be one string"),
    ([1.5], "must be one string"),
])
def test_a_prompt_in_another_form_says_which_forms_are_taken(prompt, says):
    """A prompt is one string or one list of token ids here (llama.cpp also mixes them, or sends several):
    the 400 names those forms and what to send instead (it was pydantic's "Input should be a valid string")."""
    from integrations.llama_completion import LlamaCompletionBody

    with pytest.raises(ValidationError) as err:
        LlamaCompletionBody.model_validate({"prompt": prompt})
    [error] = err.value.errors()
    assert error["loc"] == ("prompt",) and says in error["msg"], error
    assert "one string or one list of token ids" in error["msg"] and "Input should be" not in error["msg"]


def test_a_token_listed_twice_in_logit_bias_gets_the_sum_of_its_biases():
    from integrations.llama_completion import LlamaCompletionBody
    from integrations.request_limits import InputError

    body = LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": [[5, False], [5, 1.0], [6, 30], [6, 30.5],
                                                                             [7, 80], [7, 80], [8, -3]]})
    assert body.openai_body().logit_bias == {"5": -100.0, "6": 60.5, "7": 100.0, "8": -3.0}
    with pytest.raises(InputError, match="bias 101.0 is outside"):  # each one in [-100, 100], as /v1/completions
        LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": [[5, 101]]}).openai_body()

    class Letters:  # a tokenizer of one token per character
        def encode(self, text, add_special_tokens=True, split_special_tokens=False):
            return [ord(c) for c in text]

    texts = LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": [["aba", -10], [98, 3], ["", 5], ["5", 1]]})
    assert texts.openai_body(Letters()).logit_bias == {"97": -20.0, "98": -7.0, "53": 1.0}  # in an array "5" is text
    assert LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": {"a": False, "0042": 1, " 7": 2}}).openai_body(
        Letters()).logit_bias == {"97": -100.0, "42": 1.0, "7": 2.0}  # an object key of digits is an id (strtol)
    odd = {"\x1c7": 1, "\u20037": 2, "+000000000000000000000005": 3}  # only C's blanks before an id (\x1c7 was a 500)
    assert LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": odd}).openai_body(Letters()).logit_bias == {
        "28": 1.0, "55": 3.0, "8195": 2.0, "5": 3.0}
    with pytest.raises(InputError, match="biases 400 tokens .* at most 300"):  # one text of 400 tokens
        LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": [["".join(map(chr, range(200, 600))), 1]]}
                                           ).openai_body(Letters())
    from workers.loader import load_tokenizer

    shipped = load_tokenizer(Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code")
    [eos] = shipped.encode("<|endoftext|>", add_special_tokens=False)
    plain = LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": [["<|endoftext|>", False]]})
    biased = plain.openai_body(shipped).logit_bias  # plain text, as llama.cpp tokenizes it (no parse_special)
    assert str(eos) not in biased and len(biased) > 1  # (it banned the EOS)
    for negative in ([[-1, 5]], {"-1": 5}):
        with pytest.raises(InputError, match="ids are 0 or more"):
            LlamaCompletionBody.model_validate({"prompt": "x", "logit_bias": negative}).openai_body(Letters())


def test_grammars_and_json_schemas_are_enforced(http):
    gbnf = http.post("/completion", json={"prompt": "x", "grammar": 'root ::= "yes" | "no"', "mode": "ar"}).json()
    assert gbnf["content"] in ("yes", "no")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    out = http.post("/completion", json={"prompt": "x", "json_schema": schema, "n_predict": 32}).json()
    assert set(json.loads(out["content"])) == {"ok"}


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "n_predict": 100000}, "n_predict"),
    ({"prompt": "x", "n_probs": 50}, "n_probs"),
    ({"prompt": "x", "repeat_penalty": 1.3}, "repeat_penalty"),
    ({"prompt": "x", "json_schema": {"type": "nope"}}, "json_schema"),
    ({"prompt": "x", "grammar": "root ::= ("}, "grammar"),
    ({"prompt": "x", "logit_bias": [[1]]}, "logit_bias"),
    ({"prompt": [10**9]}, "prompt"),
    ({"n_predict": 4}, "prompt"),
])
def test_bad_requests_are_llama_cpp_errors_naming_the_field(http, body, field):
    for stream in (False, True):
        response = http.post("/completion", json={**body, "stream": stream})
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == 400 and f"Field '{field}" in error["message"], error


def test_n_predict_follows_llama_cpp(http):
    """-1 (or absent): the server's default, shrunk to the room a long prompt leaves (not a 400); 0: the
    prompt evaluated into the cache, no token generated, streamed or not."""
    long = http.post("/completion", json={"prompt": [50] * 4000, "mode": "ar", "temperature": 0}).json()
    assert long["stop"] is True and 0 < long["tokens_predicted"] <= 96
    for stream in (False, True):
        response = http.post("/completion", json={"prompt": "def add(a, b):\n", "n_predict": 0, "stream": stream})
        final = _events(response.text)[-1] if stream else response.json()
        assert final["content"] == "" and final["tokens_predicted"] == 0
        assert not stream or len(_events(response.text)) == 1


def test_return_tokens_are_the_generated_ids_and_biases_ban_in_both_forms(http):
    body = {"prompt": "def add(a, b):\n", "n_predict": 8, "temperature": 0, "mode": "ar", "return_tokens": True}
    out = http.post("/completion", json=body).json()
    streamed = _events(http.post("/completion", json={**body, "stream": True}).text)
    assert out["tokens"] == [t for e in streamed[:-1] for t in e["tokens"]] and len(out["tokens"]) == out["tokens_predicted"]
    first = out["tokens"][0]
    for bias in ([[first, False]], {str(first): False}):
        banned = http.post("/completion", json={**body, "logit_bias": bias}).json()
        assert banned["tokens"][0] != first, bias
    for bad in ({"response_fields": [1]}, {"response_fields": 5}, {"post_sampling_probs": True}):
        response = http.post("/completion", json={**body, **bad})
        assert response.status_code == 400 and response.json()["error"]["code"] == 400, response.text[:200]
    assert http.post("/completion", json={**body, "stream": None, "stop": None, "mode": None}).status_code == 200


def test_errors_name_the_field_without_pydantic_union_members(http):
    for body, field in (({"prompt": {"x": 1}}, "prompt"), ({"prompt": "x", "logit_bias": [[1.5, False]]}, "logit_bias.0.0")):
        message = http.post("/completion", json=body).json()["error"]["message"]
        assert message.startswith(f"Field '{field}'"), message
