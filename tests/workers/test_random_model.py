"""Random-weight models built straight on the device (benchmarks) and runners over them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import result_logits, segment  # noqa: E402
from workers.loader import ModelConfig  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

CFG = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=1,
                  head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=0,
                  mask_token_id=1)


def test_random_model_is_on_device_in_dtype_and_tied():
    model = random_model(CFG, dtype=torch.bfloat16, device="cpu", seed=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.norm.weight, torch.ones(32, dtype=torch.bfloat16))
    assert 0.01 < model.model.layers[0].mlp.up_proj.weight.float().std() < 0.03
    again = random_model(CFG, dtype=torch.bfloat16, device="cpu", seed=1)
    assert torch.equal(again.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)


def test_batched_and_segment_backends_agree_on_a_mixed_batch():
    """The CUDA backend's logic (padded groups, GQA folded into the query axis) against the CPU one."""
    model = random_model(CFG, dtype=torch.float32, device="cpu", seed=2, std=0.2)
    runners = [ModelRunner.from_model(model, mask_token_id=1, block_size=4, num_blocks=32, attention=a)
               for a in ("segment", "batched")]
    outputs = []
    for runner in runners:
        runner.execute([segment("a", 0, list(range(2, 11)), reads=[]), segment("b", 0, [5, 6, 7], reads=[])])
        results = runner.execute([
            segment("a", 7, [40, 41, 1, 1], keep=[True, True, False, False]),
            segment("b", 3, [8, 9, 10, 11, 12], branch=[-1, 0, 0, 1, 1], keep=False),
            segment("c", 0, [3, 4, 5, 6, 7, 8], positions=[0, 1, 4, 5, 2, 3]),
        ])
        outputs.append([result_logits(r) for r in results])
        assert [runner.cached_len(s) for s in "abc"] == [9, 3, 6]
    for seg, pck in zip(*outputs):
        assert (seg - pck).abs().max() < 1e-4
