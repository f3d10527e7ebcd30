"""PagedStepAttention (one Triton kernel per layer that reads the paged cache in place and writes the
step's K/V) equals the portable StepAttention on the CPU, run by Triton's interpreter (tests/conftest.py
switches it on without CUDA): logits of every row and every layer's cache, in float32 and float16, for
a prefill with partial blocks, decode beside a new sequence, a ReFusion plan (kept context + dropped
masks), a verify, branches, a sequence with no context, shared prefix blocks, the 8B head ratio over
several query and key tiles, forced context splits and their merge kernel, and whole engine runs. What
the interpreter cannot check, that the kernels compile for a GPU within its shared memory, paged_aot.py
checks without one; the kernels on a GPU are tests/gpu's. Skips where Triton 3.9 or newer is not
installed (CUDA builds of torch ship their own; the Makefile installs it for a CPU build, pyproject's
cpu-tests extra)."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", minversion="3.9")  # (3.6's interpreter cannot run the kernel; CUDA torch pins its own)

import asyncio  # noqa: E402

from attention_cases import compare, decoding_shapes, shared_prefix  # noqa: E402
from hf_oracle import segment  # noqa: E402
from scheduler.api import GenerationRequest, Mode  # noqa: E402
from scheduler.config import EngineConfig, RoutingConfig  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from workers import attention_paged  # noqa: E402
from workers.loader import load_tokenizer, read_config  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402


def _sessions(tiny_model_dir, heads_per_kv=None, num_layers=2, num_blocks=24, seed=2, dtype=torch.float32):
    base = read_config(tiny_model_dir)
    cfg = dataclasses.replace(base, num_layers=num_layers)
    if heads_per_kv:
        cfg = dataclasses.replace(cfg, num_heads=heads_per_kv * base.num_kv_heads)
    model = random_model(cfg, dtype=dtype, device="cpu", seed=seed, std=0.2)
    made = {name: RunnerSession(ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4,
                                                       num_blocks=num_blocks, attention=name))
            for name in ("sdpa", "paged")}
    return made, cfg.mask_token_id


def _both(sessions, segments, atol=1e-5):
    return compare(sessions, segments, "paged", atol)


def test_paged_equals_sdpa_over_decoding_shapes(tiny_model_dir):
    sessions, mask = _sessions(tiny_model_dir)
    decoding_shapes(sessions, "paged", mask)


def test_paged_equals_sdpa_with_shared_prefix_blocks(tiny_model_dir):
    shared_prefix(_sessions(tiny_model_dir)[0], "paged")


def test_paged_equals_sdpa_at_four_query_heads_per_kv_head_over_several_tiles(tiny_model_dir):
    """The 8B head ratio (4 query heads per KV head): a 40-token step spans three query tiles of 16, and a
    later context of 50 tokens spans two key tiles of 32 (BLOCK_N), beside a one-token decode."""
    sessions, mask = _sessions(tiny_model_dir, heads_per_kv=4, num_layers=1, num_blocks=40, seed=3)
    assert attention_paged.tile_shape(40, 4, 64, 4) == (16, 4, 64)  # float32
    _both(sessions, [segment("a", 0, list(range(5, 15))), segment("b", 0, [20, 21, 22])])
    _both(sessions, [segment("a", 10, list(range(40, 80))), segment("b", 3, [23])])
    _both(sessions, [segment("a", 50, [90, 91, mask, mask], keep=1), segment("b", 4, [24])])


def test_paged_in_half_precision_runs_the_low_precision_dots(tiny_model_dir):
    """Below float32 the kernel feeds tl.dot the cache's dtype (probabilities cast to it, float32
    accumulation), as bf16 does on a GPU; the interpreter's numpy has no bfloat16 (its bf16 dot is wrong,
    so bf16 is checked in tests/gpu), float16 takes the same code. Logits within float16 rounding of the
    sdpa runner's, and so is the cache (layers past the first get K/V from outputs that differ by rounding)."""
    sessions, mask = _sessions(tiny_model_dir, dtype=torch.float16)
    _both(sessions, [segment("a", 0, list(range(5, 45))), segment("b", 0, [20, 21, 22])], atol=0.05)
    _both(sessions, [segment("a", 40, [11, mask, mask], keep=1), segment("b", 3, [23])], atol=0.05)


ENGINE_PARAMS = {  # ReFusion: blocks of 16 tokens, 4 slots of 4: plans, verification, branches, remasks
    Mode.AR: {"gen_length": 12, "slot_size": 1, "serial_num_blocks": 1, "temperature": 0.0},
    Mode.REFUSION: {"gen_length": 16, "slot_size": 4, "serial_num_blocks": 1, "temperature": 0.0,
                    "slot_threshold": 0.05, "token_threshold": 0.01},
}


async def _engine_tokens(runner) -> dict:
    engine = Engine(runner, runner.tokenizer, EngineConfig(routing=RoutingConfig(calibrate=False)))
    await engine.start()

    async def one(mode: Mode, i: int, prompt: str) -> list[int]:
        spec = GenerationRequest(f"{mode.value}-{i}", runner.tokenizer.encode(prompt), ENGINE_PARAMS[mode], mode=mode)
        return [t async for delta in engine.submit(spec) for t in delta.token_ids]

    prompts = ["def add(a, b):\n    return", "import os\n\nclass Config:\n"]
    try:
        jobs = {(mode, i): one(mode, i, p) for mode in ENGINE_PARAMS for i, p in enumerate(prompts)}
        done = await asyncio.gather(*jobs.values())
    finally:
        await engine.stop()
    assert engine.kv.pool("main").num_free == engine.kv.pool("main").num_total  # no leaked KV block
    return dict(zip(jobs, done))


def test_the_engine_on_the_paged_kernel_gives_the_sdpa_engines_tokens(tiny_model_dir):
    """The decoders' real steps (chunked prefill, decode, ReFusion plans, verification, branches,
    remasking) in mixed batches of two AR and two ReFusion requests: greedy tokens equal on both
    backends (float32, a random model with varied output)."""
    cfg = read_config(tiny_model_dir)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=1, std=0.2)
    got = {name: asyncio.run(_engine_tokens(ModelRunner.from_model(
        model, mask_token_id=cfg.mask_token_id, tokenizer=load_tokenizer(tiny_model_dir), block_size=16,
        num_blocks=64, attention=name))) for name in ("sdpa", "paged")}
    assert got["paged"] == got["sdpa"]
    assert all(got["sdpa"].values()) and len(set(map(tuple, got["sdpa"].values()))) > 1


def test_tile_shape_keeps_tl_dot_legal_and_the_query_tile_bounded():
    """tl.dot needs at least 16 rows and a key dimension of at least 16: a decode step of a model with one
    query head per KV head still gets 16 folded rows. The query tile (rows x BLOCK_D x element size)
    stays within ROWS_PER_TILE rows of 128 bf16 values unless 16 rows or one query's heads alone exceed
    that (shared memory: paged_aot.py checks the compiled kernels against the GPUs' limits)."""
    bound = attention_paged.ROWS_PER_TILE * 128 * 2
    for elem in (2, 4):
        for d in (8, 64, 80, 128, 256):
            for g in (1, 2, 3, 4, 5, 8, 16, 128):
                for q in (1, 2, 3, 16, 17, 64, 256):
                    block_q, group, block_d = attention_paged.tile_shape(q, g, d, elem)
                    assert group >= g and group & (group - 1) == 0 and block_q & (block_q - 1) == 0
                    assert block_q * group >= 16 and block_d >= max(16, d) and block_d & (block_d - 1) == 0
                    assert block_q * group * block_d * elem <= max(bound, 16 * block_d * elem, group * block_d * elem)
                    assert block_q == 1 or block_q * group * block_d * elem <= max(bound, 16 * block_d * elem)


def test_paged_is_refused_on_the_cpu_without_the_interpreter(tiny_model_dir, monkeypatch):
    """Triton compiles for GPUs only; without its interpreter (tests/conftest.py sets it here) a CPU runner
    refuses the backend at construction, naming the way out."""
    monkeypatch.setattr(attention_paged, "_interpreted", lambda: False)
    with pytest.raises(ValueError, match="attention: 'paged' runs on CUDA; on cpu only under Triton's interpreter"):
        ModelRunner(tiny_model_dir, device="cpu", num_blocks=8, attention="paged")


def test_context_splits_cover_the_context_in_key_tiles():
    """flash-decoding's split: only when the grid is smaller than the device (the 8B shape's 8 KV heads
    at batch 1 on an H200's 132 SMs), never below MIN_SPLIT_KEYS keys a split, and the splits cover
    the layout's whole context capacity in whole key tiles."""
    split = attention_paged.context_splits
    assert split(8, 256, 132) == (1, 256)  # gpu_check's forward: 256 cached tokens, one split
    assert split(8, 4096, 132) == (16, 256)  # a long file at batch 1: 16 splits of 256 keys
    assert split(32 * 8, 4096, 132) == (1, 4096)  # 32 sequences fill the device already
    assert split(8, 7200, 132) == (15, 480)  # 16 splits rounded up to whole tiles cover it in 15
    assert split(0, 256, 132) == (1, 256)  # (no step has no program; no division by zero either)
    for programs in (1, 3, 8, 40):
        for capacity in (0, 16, 64, 300, 1000, 5000, 7200, 70000):
            n, per = split(programs, capacity, 132)
            assert 1 <= n <= attention_paged.MAX_SPLITS and n * per >= capacity
            # whole key tiles, none below MIN_SPLIT_KEYS, and no split that always starts past the context
            assert n == 1 or (per % attention_paged.BLOCK_N == 0 and per >= attention_paged.MIN_SPLIT_KEYS
                              and (n - 1) * per < capacity)


def test_paged_with_context_splits_equals_sdpa(tiny_model_dir, monkeypatch):
    """Splits forced on the CPU (the interpreter's default is none): each sequence's context in parts of
    32 keys, run by programs of their own and merged through their log-sum-exps; splits past a short
    sequence's context are empty. Steps of every kind as above, at two head ratios."""
    monkeypatch.setattr(attention_paged, "CPU_TARGET_PROGRAMS", 64)
    monkeypatch.setattr(attention_paged, "MIN_SPLIT_KEYS", 32)
    seen = []
    real = attention_paged.context_splits
    monkeypatch.setattr(attention_paged, "context_splits", lambda *a: seen.append(real(*a)) or seen[-1])
    for heads_per_kv in (None, 4):
        sessions, mask = _sessions(tiny_model_dir, heads_per_kv=heads_per_kv, num_layers=1, num_blocks=80)
        _both(sessions, [segment("a", 0, list(range(5, 145))), segment("b", 0, [20, 21, 22])])
        _both(sessions, [segment("a", 140, [11]), segment("b", 3, [23]), segment("c", 0, [30])])
        _both(sessions, [segment("a", 141, [12, 13, mask, mask], keep=2), segment("b", 4, [50, 51, 52, 53],
                                                                                 keep=False, branch_lens=[2, 2])])
        for s in sessions.values():
            s.adopt_prefix("d", s.block_table("a")[:32], 128)
        _both(sessions, [segment("d", 128, [60, 61]), segment("a", 143, [14])])
    # CPU steps are not padded: the prefill (no context) has one split; the others' 144 keys of capacity
    # make 4 splits of 36, rounded up to whole tiles of 32 (64 keys), which 3 splits cover
    assert [n for n, _ in seen] == [1, 3, 3, 3] * 2, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_splits_is_the_log_sum_exp_weighted_mean(dtype):
    """workers.paged_kernel.merge_splits against the merge written out in torch: 3 and 5 splits, a row
    count that is no multiple of MERGE_ROWS, a head_dim that is no power of two, splits that saw no key
    (lse -inf: weight 0; the paged kernel writes them for splits past a short context), a row no split
    saw (0, not NaN) and log-sum-exps whose exp overflows float32."""
    from workers.paged_kernel import merge_splits

    gen = torch.Generator().manual_seed(5)
    for splits, rows, head_dim in ((3, 37, 80), (5, 16, 64)):
        parts = torch.randn(splits, rows, head_dim, generator=gen)
        lse = torch.randn(splits, rows, generator=gen) * 4
        lse[1:, :5] = float("-inf")  # rows 0-4: only the first split saw keys
        lse[:, 7] = float("-inf")  # row 7: no split did
        lse[:, 9] += 200.0  # exp(lse) alone would overflow float32: the kernel subtracts the row's max
        out = torch.full((rows, head_dim), float("nan"), dtype=dtype)
        block_d = attention_paged.tile_shape(1, 1, head_dim)[2]  # the launcher's BLOCK_D
        merge_splits[(-(-rows // attention_paged.MERGE_ROWS),)](
            parts, lse, out, rows, parts.stride(0), lse.stride(0), SPLITS=splits, HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_R=attention_paged.MERGE_ROWS)
        weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).nan_to_num(0.0)  # row 7: -inf - -inf
        want = (parts * weights[..., None]).sum(dim=0)
        assert torch.equal(out[:5], parts[0, :5].to(dtype))
        assert torch.equal(out[7], torch.zeros(head_dim, dtype=dtype))
        torch.testing.assert_close(out.float(), want, rtol=1e-5 if dtype == torch.float32 else 1e-3,
                                   atol=1e-5 if dtype == torch.float32 else 1e-3)


def test_the_kernel_compiles_for_h100_h200_and_a100(tmp_path):
    """What the interpreter cannot check: that Triton lowers the kernel for a GPU (tl.dot's shape and
    dtype rules, loop-carried types, the constexpr branches). tests/workers/paged_aot.py compiles it to
    PTX and assembles it with Triton's bundled ptxas for sm_90 and sm_80 in the step shapes the runner
    produces (8B decode with and without context splits, a ReFusion block, a prefill chunk, the shipped
    model's heads, head_dim 80 and 256, float32), and the splits' merge kernel, each within the shared
    memory the GPU gives a block (an "over" line fails). Needs no GPU; a process of its own because this one
    interprets Triton (tests/conftest.py)."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, not a cached one
    script = Path(__file__).with_name("paged_aot.py")
    # Bounded in CPU seconds (about 35 alone), not wall time: on a loaded 2-core machine the niced worker
    # running it may get a tenth of a core (helper-177); the wall bound only catches a hang
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1800,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CPU, (300, 300)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 17 + 6 and {line.split()[1] for line in compiled} == {"sm_90", "sm_80"}, proc.stdout
    assert sum(" merge " in line for line in compiled) == 6, proc.stdout  # merge_splits, 3 shapes per GPU
