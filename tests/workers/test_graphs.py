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
from workers.batch import Reads  # noqa: E402
from workers.graphs import CapturedStep, GraphPolicy, StepGraphs  # noqa: E402
from workers.loader import read_config  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402
from workers.step import step_forward  # noqa: E402


def recording_capture(step_fn, state, buffer, layout):
    """Like workers.graphs.cuda_capture: one real eager run, then a 'graph' whose replay recomputes from
    its static input into fixed output tensors."""
    model, kv = state
    static = buffer.clone()
    outputs = step_fn(model, kv, static, layout)
    values, logits = torch.empty_like(outputs[0]), torch.empty_like(outputs[1])

    def replay():
        v, lg = step_fn(model, kv, static, layout)
        values.copy_(v)
        logits.copy_(lg)

    return CapturedStep(static, replay, values, logits), outputs


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
    session.execute([segment("long", 37, [41])])
    session.execute([segment("x", 0, [3, 4]), segment("y", 0, [5, 6]), segment("z", 0, [7, 8]),
                     segment("w", 0, [9, 10]), segment("v", 0, [11, 12])])  # a second layout: over max_graphs
    assert len(graphs.graphs) == 1 and graphs.eager_steps == 2
    graphs.policy = GraphPolicy(memory_budget_bytes=0)
    assert not graphs.policy.admits(next(iter(graphs.graphs)), 0, 0)


def test_cuda_graphs_option_needs_cuda(tiny_model_dir):
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device"):
        ModelRunner(tiny_model_dir, device="cpu", num_blocks=16, cuda_graphs=True)


def test_capture_runs_the_step_once_and_writes_its_kv(runners):
    """The capture's eager run is the step's real execution: KV is written once, as eager would."""
    eager, graphed = runners
    before = copy.deepcopy(graphed.kv.k[0])
    RunnerSession(graphed).execute([segment("a", 0, [5, 6, 7], reads=Reads())])
    RunnerSession(eager).execute([segment("a", 0, [5, 6, 7], reads=Reads())])
    assert not torch.equal(before[:-1], graphed.kv.k[0][:-1])
    torch.testing.assert_close(graphed.kv.k[0][:-1], eager.kv.k[0][:-1])
