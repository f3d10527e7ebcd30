"""Qwen3.fuse_projections (serving: q/k/v and gate/up merged into one GEMM each) changes no result: a
prefill and a decode step give the same logits as the unfused model, and unfused_state_dict gives back
the checkpoint's tensors as views of the merged ones."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import result_logits, segment  # noqa: E402
from workers.loader import read_config  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402


def test_fused_model_gives_the_same_logits(tiny_model_dir):
    cfg = dataclasses.replace(read_config(tiny_model_dir), num_layers=2)
    plain = random_model(cfg, dtype=torch.float32, device="cpu", seed=3, std=0.2)
    fused = random_model(cfg, dtype=torch.float32, device="cpu", seed=3, std=0.2)
    original = {k: v.clone() for k, v in fused.state_dict().items()}
    sessions = [RunnerSession(ModelRunner.from_model(m, mask_token_id=cfg.mask_token_id, block_size=4, num_blocks=16,
                                                     fuse_projections=f)) for m, f in ((plain, False), (fused, True))]
    assert fused.model.layers[0].self_attn.qkv_proj is not None and plain.model.layers[0].self_attn.qkv_proj is None
    for step in ([segment("a", 0, [5, 6, 7, 8, 9])], [segment("a", 5, [10])]):
        a, b = (s.execute(step) for s in sessions)
        torch.testing.assert_close(result_logits(b[0]), result_logits(a[0]), rtol=1e-5, atol=1e-5)
    unfused = fused.unfused_state_dict()
    assert unfused.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(unfused[name], tensor), name
    qkv = fused.model.layers[1].self_attn.qkv_proj.weight
    assert unfused["model.layers.1.self_attn.k_proj.weight"].data_ptr() > qkv.data_ptr()  # a view, not a copy
    assert unfused["model.layers.1.self_attn.q_proj.weight"].data_ptr() == qkv.data_ptr()
