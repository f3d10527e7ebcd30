"""ModelRunner.execute against transformers' Qwen3ForCausalLM, float32: max |logit diff| < 1e-4."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", params=["tied_gqa", "untied_mha"])
def model_dir(request, tiny_model_dir, tiny_untied_model_dir):
    return tiny_model_dir if request.param == "tied_gqa" else tiny_untied_model_dir


@pytest.fixture(scope="module", params=["segment", "packed"])
def runner(request, model_dir):
    return ModelRunner(model_dir, device="cpu", block_size=4, num_blocks=256, attention=request.param)


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_prefill_matches_dense(runner, model_dir):
    ids = _tokens(13, 0, runner.info.vocab_size)
    [res] = runner.execute([segment("prefill", 0, ids)])
    assert _max_diff(result_logits(res), dense_logits(model_dir, ids)) < TOL
    assert runner.cached_len("prefill") == 13
    runner.free("prefill")


def test_decode_steps_with_cache(runner, model_dir):
    ids = _tokens(11, 1, runner.info.vocab_size)
    expected = dense_logits(model_dir, ids)
    runner.execute([segment("dec", 0, ids[:6], reads=[])])  # prefill 6 (crosses a block), no reads
    for i in range(6, 11):
        [res] = runner.execute([segment("dec", i, [ids[i]])])
        assert _max_diff(result_logits(res)[0], expected[i]) < TOL
    assert runner.cached_len("dec") == 11
    runner.free("dec")
    assert runner.blocks.num_free == runner.blocks.num_total
