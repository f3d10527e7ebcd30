"""The device half of a step compiles as ONE graph: torch.compile(step_forward, fullgraph=True) on the
CPU (inductor) at fixed bucket sizes, for a decode-shaped and a plan-shaped step, with outputs equal to
eager. fullgraph=True fails on any graph break, i.e. on anything that would sync with the host (a
.item(), a boolean-mask index, nonzero, a data-dependent shape): what a per-bucket CUDA graph needs.

Compile time is the cost here (~50 CPU-s cold, seconds with inductor's on-disk cache warm): the model
is the tiny test model's shape with ONE layer (layers are identical code, more would only lengthen
tracing), inductor compiles in-process (compile_threads=1: no worker pool on a 2-core machine) and emits
scalar C++ (simdlen 0: much faster gcc; the test checks semantics, not kernel speed)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import segment  # noqa: E402
from workers.batch import Reads, Sampling  # noqa: E402
from workers.loader import read_config  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.packing import pack_step  # noqa: E402
from workers.reads import READ_TOP_LOGPROBS  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402
from workers.step import step_forward  # noqa: E402


@pytest.fixture(scope="module")
def session(tiny_model_dir):
    cfg = dataclasses.replace(read_config(tiny_model_dir), num_layers=1)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=4, std=0.2)
    runner = ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4, num_blocks=128)
    session = RunnerSession(runner)
    rng = random.Random(0)
    for i in range(8):  # eight sequences with 5..20 cached tokens
        n = 5 + 2 * i
        session.execute([segment(f"s{i}", 0, [rng.randrange(3, 384) for _ in range(n)], reads=Reads())])
    return session


def _decode_step(session) -> list:
    """8 sequences x 1 query, AR: greedy, sampled (temperature, top-k, top-p) and greedy-sampled rows."""
    samplings = [Sampling(), Sampling(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=3, step=4),
                 Sampling(temperature=1.0, seed=5), Sampling(temperature=0.0)]
    segs = []
    for i in range(8):
        ctx = session.cached_len(f"s{i}")
        s = samplings[i % 4]
        reads = Reads(argmax=(0,)) if s.temperature == 0 and i % 4 == 0 else Reads(sample=(0,))
        segs.append(segment(f"s{i}", ctx, [10 + i], reads=reads, sampling=s))
    return segs


def _plan_step(session, mask_id: int) -> list:
    """ReFusion shapes: plans (new context kept + S mask tokens dropped, Gumbel-max argmax on the masks),
    a verify (clean drafts kept, prob reads) and a branch draft (runs via branch_lens, nothing kept)."""
    segs = []
    for i in range(3):  # plans with S = 4 masks in 2 slots
        ctx = session.cached_len(f"s{i}")
        tokens = [20 + i, 21 + i] + [mask_id] * 8
        positions = [ctx, ctx + 1] + list(range(ctx + 2, ctx + 10))
        segs.append(segment(f"s{i}", ctx, tokens, positions, keep=2, reads=Reads(argmax=tuple(range(2, 10))),
                            sampling=Sampling(temperature=1.0, gumbel=True, seed=i, step=2)))
    ctx = session.cached_len("s3")
    segs.append(segment("s3", ctx, [30, 31, 32, 33], keep=4, reads=Reads(prob=(0, 1, 2), prob_tokens=(31, 32, 33))))
    ctx = session.cached_len("s4")
    tokens = [40, mask_id, mask_id, 41, mask_id, mask_id]
    positions = [ctx + 4, ctx + 5, ctx + 6, ctx, ctx + 1, ctx + 2]
    segs.append(segment("s4", ctx, tokens, positions, keep=False, branch_lens=[3, 3],
                        reads=Reads(argmax=(1, 2, 4, 5))))
    return segs


def _run_both(session, segs, group_attention: bool = False):
    runner = session.runner
    tables = session.tables.prepare(segs)
    # the bucketed shapes compiled steps and CUDA graphs run at (an eager CPU runner packs exact shapes)
    step = pack_step(segs, tables, runner.info.block_size, runner.scratch_block, pad=True,
                     group_attention=group_attention)
    buffer = torch.from_numpy(step.buffer)
    kv_eager, kv_compiled = copy.deepcopy(runner.kv), copy.deepcopy(runner.kv)
    compiled = torch.compile(step_forward, fullgraph=True, dynamic=False)
    with torch.inference_mode(), torch._inductor.config.patch({"compile_threads": 1, "cpp.simdlen": 0}):
        eager = step_forward(runner.model, kv_eager, buffer, step.layout)
        graph = compiled(runner.model, kv_compiled, buffer, step.layout)
    for seg in segs:  # the step ran on copies: leave the session's sequences as they were
        session.tables.truncate(seg.seq_id, seg.context_len)
    return step, eager, graph, kv_eager, kv_compiled


def _masked(segs: list) -> list:
    """Grammar-constrained decode rows (Segment.token_bitmask) on every other sequence: tokens 3..130;
    log probabilities asked for on sequences 1 and 2 (one constrained, one not): the step's reads then
    add the top-K stage (StepLayout.logprobs), compiled in the same graph; sequence 4 has a logit bias;
    sequence 6's bitmask comes after launch (Segment.deferred_mask: the step keeps its logits row)."""
    mask = bytes([0b11111000] + [0xFF] * 15 + [0b111]) + bytes(31)  # 48 bytes: 384 tokens
    segs = [dataclasses.replace(g, token_bitmask=mask) if i % 2 else g for i, g in enumerate(segs)]
    segs = [dataclasses.replace(g, logit_bias=((10, 50.0), (77, -5.0))) if i == 4 else g for i, g in enumerate(segs)]
    segs = [dataclasses.replace(g, logprobs=5) if i in (1, 2) else g for i, g in enumerate(segs)]
    segs = [dataclasses.replace(g, deferred_mask=True) if i == 6 else g for i, g in enumerate(segs)]
    return [dataclasses.replace(g, ranks=True) if i == 1 else g for i, g in enumerate(segs)]


@pytest.mark.parametrize("shape", ["decode", "decode_masked", "plan", "plan_grouped"])
def test_step_compiles_fullgraph_and_matches_eager(session, shape, monkeypatch):
    """plan_grouped: the plan step split into attention groups (workers.attention_groups; its
    thresholds lifted for a step this small): one graph too, no host sync."""
    torch._dynamo.reset()
    grouped = shape == "plan_grouped"
    monkeypatch.setattr("workers.attention_groups.GROUP_MIN_PAIRS", 0)
    monkeypatch.setattr("workers.attention_groups.GROUP_GAIN", 1)
    segs = _plan_step(session, session.info.mask_token_id) if shape.startswith("plan") else _decode_step(session)
    segs = _masked(segs) if shape == "decode_masked" else segs
    step, (values, logits, kept), (values_c, logits_c, kept_c), kv_eager, kv_compiled = _run_both(session, segs,
                                                                                                    grouped)
    lay = step.layout
    assert lay.attention_groups == (((4, 16, 4), (4, 4, 4)) if grouped else ())
    if grouped:
        shape = "plan"
    assert (lay.num_tokens, lay.num_seqs, lay.max_query, lay.num_reads) == (
        (64, 8, 16, 32) if shape == "plan" else (16, 8, 1, 8))
    assert lay.needs_noise and lay.needs_sort == (shape != "plan")
    assert lay.mask_words == (6 if shape == "decode_masked" else 0)
    assert lay.logprobs == lay.ranks == (shape == "decode_masked") and lay.bias_width == (8 if shape == "decode_masked" else 0)
    if shape == "decode_masked":  # the +50 bias wins the greedy read of sequence 4
        assert values[0, 4].item() == 10
    k = READ_TOP_LOGPROBS
    assert values.shape[0] == (4 + 2 * k if lay.logprobs else 2)
    if shape == "decode_masked":  # the constrained rows chose among tokens 3..130
        tokens = values[0, : step.num_reads].tolist()
        assert all(3 <= tokens[i] <= 130 for i in range(1, 8, 2)), tokens
    r = step.num_reads
    assert torch.equal(values_c[0, :r], values[0, :r])  # tokens
    torch.testing.assert_close(values_c[1, :r], values[1, :r], rtol=1e-4, atol=1e-6)  # probabilities
    if lay.logprobs:  # chosen log probability, top-K ids (exact) and log probabilities
        torch.testing.assert_close(values_c[2, :r], values[2, :r], rtol=1e-4, atol=1e-5)
        assert torch.equal(values_c[3:3 + k, :r], values[3:3 + k, :r])
        finite = values[3 + k:3 + 2 * k, :r].isfinite()
        assert torch.equal(values_c[3 + k:3 + 2 * k, :r].isfinite(), finite)
        torch.testing.assert_close(values_c[3 + k:3 + 2 * k, :r][finite], values[3 + k:3 + 2 * k, :r][finite],
                                   rtol=1e-4, atol=1e-5)
        assert torch.equal(values_c[3 + 2 * k, :r], values[3 + 2 * k, :r])  # ranks (computed: segment 1 asks)
        assert (values[3 + 2 * k, :r] >= 1).all()
    torch.testing.assert_close(logits_c, logits, rtol=1e-4, atol=1e-4)
    assert lay.deferred_reads == kept.shape[0] == (1 if shape == "decode_masked" else 0)
    torch.testing.assert_close(kept_c, kept, rtol=1e-4, atol=1e-4)
    if shape == "decode_masked":  # sequence 6's read row's logits, kept as they were before any mask
        assert torch.equal(kept[0], logits[int(step.deferred[0])])
    for a, b in zip(kv_compiled.k + kv_compiled.v, kv_eager.k + kv_eager.v):  # same K/V written, same slots
        torch.testing.assert_close(a[:-1], b[:-1], rtol=1e-4, atol=1e-5)
