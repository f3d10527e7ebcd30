"""Random-weight models built straight on the device (benchmarks) and runners over them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import result_logits, segment  # noqa: E402
from workers.loader import ModelConfig  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.batch import Reads  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402

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


def test_a_mixed_batch_equals_each_segment_alone():
    """Padding to buckets and batching (GQA 4:1 folded into the query axis, runs, gaps in positions)
    change nothing: each segment of a mixed step gives the logits it gives alone."""
    model = random_model(CFG, dtype=torch.float32, device="cpu", seed=2, std=0.2)
    runner = ModelRunner.from_model(model, mask_token_id=1, block_size=4, num_blocks=32)
    outputs = []
    for batched in (True, False):
        session = RunnerSession(runner)
        session.execute([segment("a", 0, list(range(2, 11)), reads=Reads()), segment("b", 0, [5, 6, 7], reads=Reads())])
        segs = [
            segment("a", 7, [40, 41, 1, 1], keep=2),
            segment("b", 3, [8, 9, 10, 11, 12], keep=False, branch_lens=[1, 2, 2]),
            segment("c", 0, [3, 4, 5, 6, 7, 8], positions=[0, 1, 4, 5, 2, 3]),
        ]
        results = session.execute(segs) if batched else [session.execute([s])[0] for s in segs]
        outputs.append([result_logits(r) for r in results])
        assert [session.cached_len(s) for s in "abc"] == [9, 3, 6]
        session.free_all()
    for together, alone in zip(*outputs):
        assert (together - alone).abs().max() < 1e-4
