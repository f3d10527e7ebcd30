"""workers.graphs.StepGraphs on the CPU, with a capture that records the step the way a CUDA graph does
(a static input buffer, output tensors owned by the graph and overwritten by each replay): a decode
loop through the graphs equals the eager runner token for token and KV for KV, replays read the
current step's buffer, and admission (token bound, graph count, memory budget) sends the rest eagerly.
The real capture (torch.cuda.CUDAGraph) is checked against eager in tests/gpu/test_cuda_runner.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import segment  # noqa: E402
from workers.batch import TOKEN_BAN, Reads  # noqa: E402
from workers.graphs import CapturedStep, GraphPolicy, StepGraphs, startup_steps  # noqa: E402
from workers.loader import read_config  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402
from workers.step import step_forward  # noqa: E402


def recording_capture(step_fn, state, buffer, layout):
    """Like workers.graphs.CudaCapture: one real eager run, then a 'graph' whose replay recomputes from
    its static input into a fixed values tensor (no logits, as a real graph keeps none)."""
    model, kv = state
    static = buffer.clone()
    outputs = step_fn(model, kv, static, layout)
    values, kept = torch.empty_like(outputs[0]), torch.empty_like(outputs[2])

    def replay():
        out = step_fn(model, kv, static, layout)
        values.copy_(out[0])
        kept.copy_(out[2])

    return CapturedStep(static, replay, values, kept), outputs


@pytest.fixture()
def runners(tiny_model_dir):
    cfg = dataclasses.replace(read_config(tiny_model_dir), num_layers=2)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=1, std=0.2)
    eager = ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4, num_blocks=64)
    graphed = ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4, num_blocks=64)
    graphed.step_fn = StepGraphs(step_forward, GraphPolicy(max_tokens=16), capture=recording_capture)
    return eager, graphed


def _decode(session, seqs: dict[str, list[int]], steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        segs = [segment(s, session.cached_len(s), [toks[-1]], reads=Reads(argmax=(0,))) for s, toks in seqs.items()]
        results = session.execute(segs)
        for r in results:
            seqs[r.seq_id].append(r.tokens[0])
        out.append([r.tokens[0] for r in results])
    return out


def test_decode_through_graphs_equals_eager(runners):
    eager, graphed = runners
    tokens = {}
    for runner in (eager, graphed):
        session = RunnerSession(runner)
        prompts = {"a": [5, 6, 7, 8, 9], "b": [20, 21, 22], "c": [40]}
        session.execute([segment(s, 0, p, reads=Reads()) for s, p in prompts.items()])  # prefill: 9 tokens
        tokens[runner is graphed] = _decode(session, {s: list(p) for s, p in prompts.items()}, 6)
    assert tokens[True] == tokens[False]
    assert len(set(map(tuple, tokens[True]))) > 1  # the steps differ: replays read each step's buffer
    for a, b in zip(graphed.kv.k, eager.kv.k):
        torch.testing.assert_close(a[:-1], b[:-1])  # the scratch block aside, the same K written
    graphs = graphed.step_fn
    assert graphs.replays >= 5 and len(graphs.graphs) >= 1
    assert graphed.stats()["cuda_graphs"]["graphs"] == len(graphs.graphs)


def test_admission_bounds(runners):
    _, graphed = runners
    graphs = StepGraphs(step_forward, GraphPolicy(max_tokens=16, max_graphs=1), capture=recording_capture)
    graphed.step_fn = graphs
    session = RunnerSession(graphed)
    session.execute([segment("long", 0, list(range(3, 40)), reads=Reads())])  # 37 tokens: T bucket 64 > 16
    assert graphs.eager_steps == 1 and not graphs.graphs
    argmax = Reads(argmax=(0,))
    session.execute([segment("long", 37, [41], reads=argmax)])
    session.execute([segment(s, 0, [t, t + 1], reads=argmax) for s, t in zip("xyzwv", range(3, 13, 2))])
    assert len(graphs.graphs) == 1 and graphs.eager_steps == 2  # the second layout: over max_graphs
    graphs.policy = GraphPolicy(memory_budget_bytes=0)
    assert not graphs.policy.admits(next(iter(graphs.graphs)), 0, 0)


def test_a_step_reading_logits_runs_eagerly(runners):
    """Graphs keep no logits rows (their memory returns to the pool): a step that reads them runs eagerly,
    with the eager runner's logits, and captures nothing."""
    eager, graphed = runners
    seg = segment("a", 0, [5, 6, 7])  # logits reads on every row
    [got] = RunnerSession(graphed).execute([seg])
    [want] = RunnerSession(eager).execute([seg])
    assert graphed.step_fn.eager_steps == 1 and not graphed.step_fn.graphs
    assert len(got.logits) == 3
    torch.testing.assert_close(torch.tensor(got.logits), torch.tensor(want.logits))


@pytest.mark.parametrize("option", [True, {}, {"max_graphs": 8}])  # {} is the default policy, not "off"
def test_cuda_graphs_option_needs_cuda(tiny_model_dir, option):
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device"):
        ModelRunner(tiny_model_dir, device="cpu", num_blocks=16, cuda_graphs=option)


def test_the_cpu_defaults_stay_eager(tiny_model_dir):
    """cuda_graphs and compile_layers left None are on for CUDA only (workers.runner)."""
    stats = ModelRunner(tiny_model_dir, device="cpu", num_blocks=16).stats()
    assert stats["cuda_graphs"] is None and stats["compile_layers"] is False


def test_capture_runs_the_step_once_and_writes_its_kv(runners):
    """The capture's eager run is the step's real execution: KV is written once, as eager would."""
    eager, graphed = runners
    before = copy.deepcopy(graphed.kv.k[0])
    RunnerSession(graphed).execute([segment("a", 0, [5, 6, 7], reads=Reads())])
    RunnerSession(eager).execute([segment("a", 0, [5, 6, 7], reads=Reads())])
    assert not torch.equal(before[:-1], graphed.kv.k[0][:-1])
    torch.testing.assert_close(graphed.kv.k[0][:-1], eager.kv.k[0][:-1])


STARTUP = GraphPolicy(max_tokens=64, startup_query_lens=(1, 4), startup_max_seqs=6, startup_max_context=64)


def test_startup_capture_covers_decode_and_slot_steps_and_touches_no_kv(tiny_model_dir):
    """After capture_startup_graphs, AR decode steps (1 token per sequence) and single-slot steps (4
    tokens per sequence, every row read) of 1-6 sequences with contexts up to 64 tokens all replay:
    serving captures nothing new. The synthetic steps write only the scratch block."""
    cfg = dataclasses.replace(read_config(tiny_model_dir), num_layers=2)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=1, std=0.2)
    eager, graphed = (ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4, num_blocks=128)
                      for _ in range(2))
    graphs = StepGraphs(step_forward, STARTUP, capture=recording_capture)
    graphed.step_fn = graphs
    kv_before = [t[:-1].clone() for t in graphed.kv.k + graphed.kv.v]
    startup = graphed.capture_startup_graphs()
    assert startup["graphs"] == len(graphs.graphs) > 0 and graphs.replays == 0
    assert graphed.stats()["cuda_graphs"]["startup"] == startup
    for before, after in zip(kv_before, graphed.kv.k + graphed.kv.v):
        assert torch.equal(before, after[:-1])
    captured = len(graphs.graphs)

    outputs, ar_ban = {}, ((cfg.mask_token_id, TOKEN_BAN),)  # what every AR decode step carries
    for runner in (eager, graphed):
        session, got = RunnerSession(runner), []
        prompts = {f"s{i}": list(range(10 + i, 10 + i + 3 + 6 * i)) for i in range(6)}  # contexts 3..33 tokens
        session.execute([segment(s, 0, p, reads=Reads()) for s, p in prompts.items()])  # prefill
        for n in range(1, 7):  # AR decode of n sequences, then one 4-token slot each
            seqs = list(prompts)[:n]
            got.append([r.tokens for r in session.execute(
                [segment(s, session.cached_len(s), [7], reads=Reads(argmax=(0,)), logit_bias=ar_ban) for s in seqs])])
            got.append([r.tokens for r in session.execute(
                [segment(s, session.cached_len(s), [3, 4, 5, 6], reads=Reads(argmax=(0, 1, 2, 3))) for s in seqs])])
        outputs[runner is graphed] = got
    assert outputs[True] == outputs[False]
    assert len(graphs.graphs) == captured  # nothing new (the prefill, 108 tokens > max_tokens 64, ran eagerly)
    assert graphs.replays == 12 and graphs.eager_steps == 1


def test_startup_steps_and_policy_fields():
    steps = startup_steps(STARTUP, block_size=4, max_context=1 << 20)
    assert {ctx for _, _, ctx in steps} == {16, 32, 64}  # context-block buckets 4, 8, 16 blocks of 4 tokens
    assert {(n, q) for n, q, _ in steps} == {(n, q) for q in (1, 4) for n in range(1, 7)}
    assert [q for _, q, _ in steps][:3] == [1, 1, 1]  # AR decode first
    assert {ctx for _, _, ctx in startup_steps(STARTUP, 4, max_context=40)} == {16, 32}  # capped by the KV cache
    assert startup_steps(GraphPolicy(startup_query_lens=[]), 16, 4096) == []
    assert GraphPolicy(startup_query_lens=[1, 8]).startup_query_lens == (1, 8)
    with pytest.raises(ValueError, match="cuda_graphs.startup_query_lens"):
        GraphPolicy(startup_query_lens=[0])
    with pytest.raises(ValueError, match="cuda_graphs.startup_max_seqs"):
        GraphPolicy(startup_max_seqs="8")
