"""max_model_len (vLLM's --max-model-len; ServeConfig.max_model_len): the context served, below the model's.
An engine whose KV cache holds less than the model's context refused an editor's infill in a large
file with a 400 "shorten the prompt" that the editor cannot act on (the server builds that prompt to the
context); with max_model_len at what the KV cache holds, the prompt is built to fit and the completion
is served. The engine replica says so at start (engine_host.kv_short_of_context)."""

from __future__ import annotations

import argparse
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
    with pytest.raises(pydantic.ValidationError, match="max_model_len: 5000 exceeds the model's context .4096"):
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
    with pytest.raises(cli_serve.CLIError, match="--max-model-len: must be >= 1"):
        cli_serve.merged_config(parser.parse_args(["--max-model-len", "0"]))
