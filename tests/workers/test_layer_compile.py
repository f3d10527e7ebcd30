"""`ModelRunner(compile_layers=True)`: the work around attention runs through torch.compile
(workers.model.compiled_kernels, inductor on the CPU here) and gives the eager runner's results on the
same weights, step after step: prefills of different lengths, AR decode, a ReFusion plan (masks dropped)
and a verify, with K/V written by one step read by the next. Token counts vary from step to step, and
one dynamic-shape compile per function serves them all. And what a GPU's compile would make of them,
built without one (bench/layer_kernels.py): eight launches per layer, no addmm.

Inductor compiles in-process (compile_threads=1) and emits scalar C++ (simdlen 0: much faster gcc); the
model is the tiny test model's shape with two layers (the compiled functions are shared by every layer)."""

from __future__ import annotations

import copy
import dataclasses

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import result_logits, segment  # noqa: E402
from workers.batch import Reads  # noqa: E402
from workers.loader import read_config  # noqa: E402
from workers.model import compiled_kernels, random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402

INDUCTOR_CPU = {"compile_threads": 1, "cpp.simdlen": 0}


@pytest.fixture(scope="module")
def sessions(tiny_model_dir):
    cfg = dataclasses.replace(read_config(tiny_model_dir), num_layers=2)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=7, std=0.2)
    eager = ModelRunner.from_model(copy.deepcopy(model), mask_token_id=cfg.mask_token_id, block_size=4, num_blocks=96)
    compiled = ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4, num_blocks=96,
                                      compile_layers=True)
    return RunnerSession(eager), RunnerSession(compiled)


def _steps(mask_id: int):
    """(name, segments builder) in order; each builder gets the session to read context lengths from."""
    prompts = {"a": list(range(3, 13)), "b": list(range(40, 47)), "c": [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]}

    def prefill(session):
        return [segment(s, 0, ids) for s, ids in prompts.items()]

    def decode(session):  # one token per sequence: the AR shape, T = 3
        return [segment(s, session.cached_len(s), [50 + i]) for i, s in enumerate(prompts)]

    def decode_one(session):
        return [segment("a", session.cached_len("a"), [60])]

    def long_prefill(session):  # a new sequence: 60 tokens, padded to 64
        return [segment("d", 0, [(7 * i) % 300 + 3 for i in range(60)])]

    def plan(session):  # 2 new context tokens kept + 2 slots of 3 masks dropped, argmax on the masks
        out = []
        for i, s in enumerate(("a", "b")):
            ctx = session.cached_len(s)
            out.append(segment(s, ctx, [70 + i, 71 + i] + [mask_id] * 6, keep=2, reads=Reads(argmax=tuple(range(2, 8)))))
        return out

    def verify(session):  # clean drafts kept, probabilities of the drafted tokens
        ctx = session.cached_len("c")
        return [segment("c", ctx, [30, 31, 32, 33], keep=4, reads=Reads(prob=(0, 1, 2), prob_tokens=(31, 32, 33)))]

    return [("prefill", prefill), ("decode", decode), ("decode_one", decode_one), ("plan", plan), ("verify", verify),
            ("long_prefill", long_prefill)]


def test_compiled_layers_match_eager_step_by_step(sessions):
    eager, compiled = sessions
    assert compiled.runner.step_fn.keywords["kernels"] is compiled_kernels()
    assert eager.runner.stats()["compile_layers"] is False and compiled.runner.stats()["compile_layers"] is True
    assert eager.runner.stats()["dtype"] == "float32" and eager.runner.stats()["device"] == "cpu"  # (/v1/engine)
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._inductor.config.patch(INDUCTOR_CPU):
        for name, build in _steps(eager.runner.info.mask_token_id):
            want, got = eager.execute(build(eager)), compiled.execute(build(compiled))
            for w, g in zip(want, got, strict=True):
                assert g.seq_id == w.seq_id
                if w.logits:
                    torch.testing.assert_close(result_logits(g), result_logits(w), rtol=1e-4, atol=1e-4,
                                               msg=lambda m: f"{name} {w.seq_id}: {m}")
                else:
                    assert g.tokens == w.tokens, (name, w.seq_id)
                    assert g.probs == pytest.approx(w.probs, rel=1e-4, abs=1e-6), (name, w.seq_id)
    for s in ("a", "b", "c", "d"):  # both caches hold the same sequences, written by the same steps
        assert compiled.cached_len(s) == eager.cached_len(s)
    for a, b in zip(compiled.runner.kv.k + compiled.runner.kv.v, eager.runner.kv.k + eager.runner.kv.v):
        # the scratch block (the last) aside: padding rows write there, and only the compiled runner pads
        torch.testing.assert_close(a[:-1], b[:-1], rtol=1e-4, atol=1e-5)
    # steps padded to 32, 16, 16, 16, 16, 64 tokens (28, 3, 1, 16, 4 and 60 real ones; the first count
    # matches no model dimension, see compiled_kernels): each of the three functions compiles once, for a
    # symbolic count, and keeps one dynamo cache entry (fullgraph=True makes passing recompile_limit an
    # error: first_attention_inputs is a function of its own so that no None guard doubles the entries)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before
    assert graphs == 3, graphs
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from workers.model import KERNELS_TO_COMPILE
    for fn in KERNELS_TO_COMPILE:
        assert len(_debug_get_cache_entry_list(fn.__code__)) == 1, fn


def test_one_process_compiles_more_model_shapes_than_dynamos_default_limit():
    """Weights are parameters, whose shapes dynamo keeps static: every model shape a process compiles for
    is one more cache entry of each compiled function, and with fullgraph=True the 9th (past dynamo's
    default recompile_limit of 8) failed hard, as tests/gpu or a benchmark building runners for several
    shapes would (a break-test helper's finding). compiled_kernels raises the limit."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from workers.model import KERNELS_TO_COMPILE, RECOMPILE_LIMIT

    first = compiled_kernels().first_attention_inputs
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    torch._dynamo.reset()

    def weight(*shape):
        return torch.nn.Parameter(torch.randn(*shape), requires_grad=False)

    t, d, heads, kv_heads = 5, 8, 2, 1
    with torch._inductor.config.patch(INDUCTOR_CPU):
        for hidden in (24, 40, 48, 56, 72, 88, 96, 104, 112):  # nine model shapes
            q, k, v, x = first(torch.randn(t, hidden), weight(hidden), weight((heads + 2 * kv_heads) * d, hidden),
                               weight(d), weight(d), torch.randn(t, d), torch.randn(t, d), 1e-6, heads, kv_heads)
            assert q.shape == (t, heads, d) and x.shape == (t, hidden)
    assert len(_debug_get_cache_entry_list(KERNELS_TO_COMPILE.first_attention_inputs.__code__)) == 9


def test_compile_layers_must_be_a_bool(tiny_model_dir):
    with pytest.raises(ValueError, match="compile_layers"):
        ModelRunner(tiny_model_dir, compile_layers="yes", num_blocks=8)


def test_compile_layers_needs_merged_projections(tiny_model_dir):
    cfg = read_config(tiny_model_dir)
    model = random_model(cfg, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="compile_layers"):
        ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, num_blocks=8, fuse_projections=False,
                               compile_layers=True)


def test_compiled_layer_functions_launch_eight_times_a_layer_on_cuda(tmp_path):
    """What the compiled functions launch on a GPU, from inductor's CUDA wrapper built without one
    (bench/layer_kernels.py, in a process of its own: it patches torch.cuda's device queries). Per layer:
    attention_inputs = residual add + RMSNorm, the QKV GEMM, q and k norm + RoPE in one kernel;
    attention_output_mlp = o_proj, residual add + RMSNorm, gate/up, SiLU x up, down_proj. No addmm: on
    CUDA inductor makes `x + mm` one, and ATen copies its [T, hidden] input into the output first (the
    H200 profile's "Memcpy DtoD", two per layer before the residual crossed the layer boundary and the
    o_proj add was written in float32; q and k were two kernels). And the float32 add rounds to the
    plain add's bf16 values."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from workers.model import EAGER_KERNELS, KERNELS_TO_COMPILE

    script = Path(__file__).resolve().parents[2] / "bench" / "layer_kernels.py"
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(script), "--config", "small", "--tokens", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    calls = {row["function"]: row["calls"] for row in json.loads(out.read_text())}
    triton = "triton"
    for name in ("attention_inputs", "first_attention_inputs"):
        assert [c.split()[0] for c in calls[name]] == [triton, "mm", triton], calls[name]
    assert [c.split()[0] for c in calls["attention_output_mlp"]] == ["mm", triton, "mm", triton, "mm"], calls

    gen = torch.Generator().manual_seed(0)
    t, hidden, heads, head_dim, inter = 16, 256, 4, 64, 512
    shapes = [(t, hidden), (t, heads * head_dim), (hidden, heads * head_dim), (hidden,), (2 * inter, hidden),
              (hidden, inter)]
    args = [torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in shapes]
    assert all(torch.equal(a, b) for a, b in zip(KERNELS_TO_COMPILE.attention_output_mlp(*args, 1e-6),
                                                 EAGER_KERNELS.attention_output_mlp(*args, 1e-6)))
