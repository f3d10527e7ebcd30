"""The CUDA path of ModelRunner (batched SDPA over gathered pages). Skipped without a GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.batch import Read, ReadKind, Sampling  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402


def _mixed_batch(runner, mask_id: int):
    """Prefill two sequences, then one forward with a decode step, a dropped plan and branches."""
    runner.execute([segment("a", 0, list(range(5, 14)), reads=[]), segment("b", 0, list(range(20, 26)), reads=[])])
    return runner.execute([
        segment("a", 9, [14]),
        segment("b", 6, [26, 27, mask_id, mask_id], keep=[True, True, False, False]),
        segment("c", 0, [30, 31, 32, 33], branch=[-1, 0, 1, 1], keep=False),
    ])


def test_defaults_pick_cuda_bf16_and_batched(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, num_blocks=32)
    assert runner.device.type == "cuda" and runner.dtype == torch.bfloat16 and runner.attention == "batched"
    assert runner.kv.k[0].is_cuda


def test_float32_cuda_matches_transformers(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=32)
    ra, rb, rc = _mixed_batch(runner, runner.info.mask_token_id)
    mask = runner.info.mask_token_id
    tol = 1e-3  # cuBLAS/SDPA reduction order differs from the CPU oracle
    assert (result_logits(ra)[0] - dense_logits(tiny_model_dir, list(range(5, 15)))[9]).abs().max() < tol
    assert (result_logits(rb) - dense_logits(tiny_model_dir, list(range(20, 28)) + [mask, mask])[6:]).abs().max() < tol
    assert (result_logits(rc)[[0, 2, 3]] - dense_logits(tiny_model_dir, [30, 32, 33], [0, 2, 3])).abs().max() < tol
    assert [runner.cached_len(s) for s in "abc"] == [10, 8, 0]


def test_cuda_backends_agree_and_bf16_is_close(tiny_model_dir):
    outputs = {}
    for attention, dtype in (("batched", torch.float32), ("segment", torch.float32), ("batched", torch.bfloat16)):
        runner = ModelRunner(tiny_model_dir, device="cuda", dtype=dtype, block_size=4, num_blocks=32, attention=attention)
        outputs[attention, dtype] = torch.cat([result_logits(r) for r in _mixed_batch(runner, runner.info.mask_token_id)])
    f32 = outputs["batched", torch.float32]
    assert (f32 - outputs["segment", torch.float32]).abs().max() < 1e-4
    assert (f32 - outputs["batched", torch.bfloat16]).abs().max() < 0.5


def test_gumbel_draws_are_per_sequence_on_cuda(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, device="cuda", num_blocks=32)
    sampling = Sampling(temperature=1.0, seed=5, gumbel=True)
    reads = [Read(r, ReadKind.ARGMAX) for r in range(4)] + [Read(3, ReadKind.SAMPLE)]
    seg = lambda sid: segment(sid, 0, [40, 41, 42, 43], keep=False, reads=reads, sampling=sampling)  # noqa: E731
    [alone] = runner.execute([seg("x")])
    _, batched = runner.execute([segment("o", 0, [7, 8], reads=[Read(1, ReadKind.ARGMAX)], sampling=sampling), seg("y")])
    assert alone.values == batched.values
    runner.free("x")
    assert runner.execute([seg("x")])[0].values == alone.values
    for seq in ("x", "y", "o"):
        runner.free(seq)
    assert runner.blocks.num_free == runner.blocks.num_total
