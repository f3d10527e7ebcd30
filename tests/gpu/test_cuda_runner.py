"""The CUDA path of ModelRunner (step v2: packed buffer, one SDPA per layer, batched reads). Skipped
without a GPU."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.batch import TOKEN_BAN, Reads, Sampling  # noqa: E402
from workers.reads import uniform  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402
from workers.step import step_forward  # noqa: E402

# Runners here are eager unless a test names graphs or compiled layers (the CUDA defaults turn both on:
# test_defaults_pick_cuda_bf16_graphs_and_compiled_layers)
EAGER = {"cuda_graphs": False, "compile_layers": False}


def _mixed_batch(session, mask_id: int):
    """Prefill two sequences, then one step with a decode step, a dropped plan and branches."""
    session.execute([segment("a", 0, list(range(5, 14)), reads=Reads()),
                     segment("b", 0, list(range(20, 26)), reads=Reads())])
    return session.execute([
        segment("a", 9, [14]),
        segment("b", 6, [26, 27, mask_id, mask_id], keep=2),
        segment("c", 0, [30, 31, 32, 33], keep=False, branch_lens=[2, 2]),
    ])


def test_defaults_pick_cuda_bf16_graphs_and_compiled_layers(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, num_blocks=32)
    assert runner.device.type == "cuda" and runner.dtype == torch.bfloat16
    assert runner.kv.k[0].is_cuda and runner.kv.k[0].shape[0] == 33  # + the scratch block
    stats = runner.stats()
    assert stats["compile_layers"] and stats["cuda_graphs"]["startup"]["graphs"] > 0, stats
    seqs = {"a": list(range(5, 35)), "b": [7]}  # float32: the defaults' tokens equal the eager runner's
    assert _greedy_decode_tokens(tiny_model_dir, seqs, cuda_graphs=None, compile_layers=None) == \
        _greedy_decode_tokens(tiny_model_dir, seqs)


def test_float32_cuda_matches_transformers(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=32, **EAGER)
    session = RunnerSession(runner)
    ra, rb, rc = _mixed_batch(session, runner.info.mask_token_id)
    mask = runner.info.mask_token_id
    tol = 1e-3  # cuBLAS/SDPA reduction order differs from the CPU oracle
    assert (result_logits(ra)[0] - dense_logits(tiny_model_dir, list(range(5, 15)))[9]).abs().max() < tol
    assert (result_logits(rb) - dense_logits(tiny_model_dir, list(range(20, 28)) + [mask, mask])[6:]).abs().max() < tol
    assert (result_logits(rc)[:2] - dense_logits(tiny_model_dir, [30, 31])).abs().max() < tol
    assert (result_logits(rc)[2:] - dense_logits(tiny_model_dir, [32, 33], [2, 3])).abs().max() < tol
    assert [session.cached_len(s) for s in "abc"] == [10, 8, 0]


def test_bf16_is_close_to_float32(tiny_model_dir):
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = ModelRunner(tiny_model_dir, device="cuda", dtype=dtype, block_size=4, num_blocks=32, **EAGER)
        results = _mixed_batch(RunnerSession(runner), runner.info.mask_token_id)
        outputs[dtype] = torch.cat([result_logits(r) for r in results])
    assert (outputs[torch.float32] - outputs[torch.bfloat16]).abs().max() < 0.5


def test_uniforms_are_identical_on_cpu_and_cuda():
    keys = [torch.tensor([0, 7, 2**62, 2**63 - 1]), torch.tensor([0, 3, 9, 1]), torch.tensor([0, 5, 100, 2**40])]
    cpu = uniform(*keys, 1000)
    cuda = uniform(*(k.cuda() for k in keys), 1000)
    assert torch.equal(cpu, cuda.cpu())


def test_gumbel_draws_do_not_depend_on_the_batch_on_cuda(tiny_model_dir):
    session = RunnerSession(ModelRunner(tiny_model_dir, device="cuda", num_blocks=32, **EAGER))
    sampling = Sampling(temperature=1.0, seed=5, gumbel=True, step=2)
    reads = Reads(argmax=(0, 1, 2, 3))
    seg = lambda sid: segment(sid, 0, [40, 41, 42, 43], keep=False, reads=reads, sampling=sampling)  # noqa: E731
    [alone] = session.execute([seg("x")])
    _, batched = session.execute([segment("o", 0, [7, 8], reads=Reads(sample=(1,)), sampling=sampling), seg("y")])
    assert alone.tokens == batched.tokens
    assert session.execute([seg("x")])[0].tokens == alone.tokens
    session.free_all()
    assert session.blocks.num_free == session.blocks.num_total


def _assert_mixed_batch_matches_transformers(tiny_model_dir, runner, tol: float = 1e-3) -> None:
    """_mixed_batch on `runner` against the dense transformers oracle, row by row."""
    ra, rb, rc = _mixed_batch(RunnerSession(runner), runner.info.mask_token_id)
    mask = runner.info.mask_token_id
    assert (result_logits(ra)[0] - dense_logits(tiny_model_dir, list(range(5, 15)))[9]).abs().max() < tol
    assert (result_logits(rb) - dense_logits(tiny_model_dir, list(range(20, 28)) + [mask, mask])[6:]).abs().max() < tol
    assert (result_logits(rc)[:2] - dense_logits(tiny_model_dir, [30, 31])).abs().max() < tol
    assert (result_logits(rc)[2:] - dense_logits(tiny_model_dir, [32, 33], [2, 3])).abs().max() < tol


def _assert_step_never_syncs(runner, tokens: list[int], table: list[int]) -> None:
    """One prefill step of `tokens` through runner.step_fn, run once to compile and warm, then again with
    CUDA's sync debug mode on: any host sync inside the step raises."""
    step = runner.pack([segment("q", 0, tokens)], [table])
    buffer = runner._uploader.upload(step.buffer)
    with torch.inference_mode():
        runner.step_fn(runner.model, runner.kv, buffer, step.layout)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            runner.step_fn(runner.model, runner.kv, buffer, step.layout)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _greedy_decode_tokens(tiny_model_dir, prompts: dict[str, list[int]], steps: int = 5, **options) -> dict:
    """Prefill `prompts`, then `steps` greedy AR decode steps of all of them; the ids per sequence. With
    cuda_graphs in `options` the decode steps must have replayed."""
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, num_blocks=64, **{**EAGER, **options})
    session = RunnerSession(runner)
    seqs = {s: list(p) for s, p in prompts.items()}
    session.execute([segment(s, 0, p, reads=Reads()) for s, p in seqs.items()])
    for _ in range(steps):
        results = session.execute([segment(s, session.cached_len(s), [t[-1]], reads=Reads(argmax=(0,)))
                                   for s, t in seqs.items()])
        for r in results:
            seqs[r.seq_id].append(r.tokens[0])
    if options.get("cuda_graphs"):
        assert runner.stats()["cuda_graphs"]["replays"] >= steps - 2
    return seqs


def _packed(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=32, **EAGER)
    session = RunnerSession(runner)
    session.execute([segment("a", 0, list(range(5, 14)), reads=Reads())])
    segs = [segment("a", 9, [14, 1, 1], keep=1, reads=Reads(argmax=(1, 2), sample=(0,)),
                    sampling=Sampling(temperature=0.8, top_k=20, top_p=0.9, gumbel=True, seed=3)),
            segment("b", 0, [30, 31, 32, 33], keep=False, branch_lens=[2, 2], reads=Reads(argmax=(1, 3)))]
    step = runner.pack(segs, session.tables.prepare(segs))
    return runner, step, torch.from_numpy(step.buffer).cuda()


def test_step_forward_never_syncs_with_the_host(tiny_model_dir):
    runner, step, buffer = _packed(tiny_model_dir)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside the step raises
    try:
        with torch.inference_mode():
            values, _, _ = step_forward(runner.model, runner.kv, buffer, step.layout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert values.shape == (2, step.layout.num_reads)


def _captured(runner, kv, buffer, layout):
    """step_forward captured as a CUDA graph writing `kv` (after a warm-up on a copy of the runner's
    cache, on a side stream) and replayed once: its values tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_forward(runner.model, copy.deepcopy(runner.kv), buffer, layout)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _, _ = step_forward(runner.model, kv, buffer, layout)
    graph.replay()
    return captured


def test_step_forward_captures_as_a_cuda_graph(tiny_model_dir):
    """The step replays from a CUDA graph with the same results as eager (the later per-bucket capture)."""
    runner, step, buffer = _packed(tiny_model_dir)
    kv_eager, kv_graph = copy.deepcopy(runner.kv), copy.deepcopy(runner.kv)
    with torch.inference_mode():
        expected, _, _ = step_forward(runner.model, kv_eager, buffer, step.layout)
        captured = _captured(runner, kv_graph, buffer, step.layout)
    torch.cuda.synchronize()
    r = step.num_reads
    assert torch.equal(captured[0, :r], expected[0, :r])
    torch.testing.assert_close(captured[1, :r], expected[1, :r])
    for a, b in zip(kv_graph.k, kv_eager.k):
        torch.testing.assert_close(a[:-1], b[:-1])


def test_runner_with_cuda_graphs_equals_eager(tiny_model_dir):
    """cuda_graphs=True (workers.graphs): a prefill, six greedy decode steps of three sequences and a
    mixed ReFusion-shaped step give the same tokens and KV as the eager runner (start-up capture left
    the KV cache alone); decode steps replay graphs captured at start-up."""
    eager = ModelRunner(tiny_model_dir, device="cuda", dtype="float32", num_blocks=64, **EAGER)
    graphed = ModelRunner(tiny_model_dir, device="cuda", dtype="float32", num_blocks=64, **{**EAGER, "cuda_graphs": True})
    outputs = {}
    for runner in (eager, graphed):
        session = RunnerSession(runner)
        seqs = {"a": [5, 6, 7, 8, 9], "b": [20, 21, 22], "c": [40]}
        session.execute([segment(s, 0, p, reads=Reads()) for s, p in seqs.items()])
        steps = []
        for _ in range(6):
            # (as an AR decode step: its one bias pair, the mask token's ban, decoding.ar)
            results = session.execute([segment(s, session.cached_len(s), [t[-1]], reads=Reads(argmax=(0,)),
                                               logit_bias=((runner.info.mask_token_id, TOKEN_BAN),))
                                       for s, t in seqs.items()])
            for r in results:
                seqs[r.seq_id].append(r.tokens[0])
            steps.append([r.tokens[0] for r in results])
        mixed = session.execute([segment("a", session.cached_len("a"), [14], reads=Reads(argmax=(0,))),
                                 segment("d", 0, [30, 31, 32, 33], keep=False, branch_lens=[2, 2],
                                         reads=Reads(argmax=(0, 1, 2, 3)))])
        outputs[runner is graphed] = (steps, [r.tokens for r in mixed])
    torch.cuda.synchronize()
    assert outputs[True] == outputs[False]
    for a, b in zip(graphed.kv.k, eager.kv.k):
        torch.testing.assert_close(a[:-1], b[:-1])
    stats = graphed.stats()["cuda_graphs"]
    assert stats["graphs"] >= 1 and stats["replays"] >= 5, stats
    # start-up capture (GraphPolicy.startup_*) already held the decode steps' layout: only the prefill and
    # the mixed step were captured while serving
    assert stats["startup"]["graphs"] > 0 and stats["graphs"] - stats["startup"]["graphs"] <= 2, stats


@pytest.mark.parametrize("block_size", [16, 64])  # Triton tiles want KV blocks of 16+ tokens
def test_flex_attention_on_cuda_matches_transformers(tiny_model_dir, block_size):
    """attention="flex" (workers.attention_flex: the paged cache read in place by compiled flex_attention)
    against the dense transformers oracle, as the sdpa path is above."""
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=block_size, num_blocks=32,
                         attention="flex", **EAGER)
    _assert_mixed_batch_matches_transformers(tiny_model_dir, runner)


def test_compiled_flex_at_four_query_heads_per_kv_head_compiles_for_a_tall_step(tiny_model_dir):
    """The 8B head ratio (4 query heads per KV head) with a 64-token step beside a decode row: compiled flex
    runs its decoding kernel, whose tile (next_pow2(64 x 4) = 256 rows) must divide the mask's query block
    (workers.attention_flex.query_block); with a fixed 128 no kernel config compiled. Float32 logits equal
    the sdpa runner's on the same weights."""
    import dataclasses

    from workers.loader import read_config
    from workers.model import random_model

    base = read_config(tiny_model_dir)
    cfg = dataclasses.replace(base, num_layers=2, num_heads=4 * base.num_kv_heads)
    model = random_model(cfg, dtype=torch.float32, device="cuda", seed=3, std=0.2)
    got = {}
    for name in ("sdpa", "flex"):
        session = RunnerSession(ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=16,
                                                       num_blocks=32, attention=name, **EAGER))
        session.execute([segment("a", 0, list(range(5, 25))), segment("b", 0, [20, 21, 22])])
        got[name] = session.execute([segment("a", 20, list(range(40, 104))), segment("b", 3, [23])])
    for a, b in zip(got["sdpa"], got["flex"]):
        assert (result_logits(a) - result_logits(b)).abs().max() < 1e-3


def test_flex_long_prefill_no_sync_and_graphs(tiny_model_dir):
    """attention="flex" at block_size 16: a 200-token prefill (the main flex kernel, not the decoding
    one) matches transformers; its steps never wait for the host; and with cuda_graphs the decode steps
    replay and give what the sdpa runner gives."""
    prompt = [5 + (i * 7) % 300 for i in range(200)]
    flex = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=16, num_blocks=64,
                       attention="flex", **EAGER)
    got = RunnerSession(flex).execute([segment("p", 0, prompt)])
    expected = dense_logits(tiny_model_dir, prompt)
    assert (result_logits(got[0]) - expected).abs().max() < 1e-3
    _assert_step_never_syncs(flex, prompt[:40], [0, 1, 2])  # the first run compiles flex for this shape
    seqs = {"a": prompt[:30], "b": prompt[30:45]}
    assert (_greedy_decode_tokens(tiny_model_dir, seqs, block_size=16, attention="flex", cuda_graphs=True)
            == _greedy_decode_tokens(tiny_model_dir, seqs, block_size=16))


def test_compiled_layers_on_cuda_match_transformers_and_replay(tiny_model_dir):
    """compile_layers=True (workers.model.compiled_kernels: inductor's Triton kernels around attention)
    against the dense transformers oracle; no host sync inside a compiled step; and with cuda_graphs
    the decode steps replay and give what the eager runner gives."""
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, num_blocks=32,
                         **{**EAGER, "compile_layers": True})
    _assert_mixed_batch_matches_transformers(tiny_model_dir, runner)
    _assert_step_never_syncs(runner, list(range(5, 45)), [20, 21, 22])
    seqs = {"a": list(range(5, 35)), "b": list(range(60, 75)), "c": [7]}
    assert (_greedy_decode_tokens(tiny_model_dir, seqs, compile_layers=True, cuda_graphs=True)
            == _greedy_decode_tokens(tiny_model_dir, seqs))


def test_compiled_layers_in_bf16_are_close_to_eager(tiny_model_dir):
    """bf16, the CUDA default: inductor keeps fused intermediates in float32 where eager rounds each op
    to bf16, so the two are close, not equal; the bound is test_bf16_is_close_to_float32's."""
    outputs = {}
    for compiled in (False, True):
        runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.bfloat16, block_size=4, num_blocks=32,
                             **{**EAGER, "compile_layers": compiled})
        results = _mixed_batch(RunnerSession(runner), runner.info.mask_token_id)
        outputs[compiled] = torch.cat([result_logits(r) for r in results])
    assert (outputs[True] - outputs[False]).abs().max() < 0.5


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_steps_launched_ahead_with_fed_back_tokens_equal_serial_steps(tiny_model_dir, cuda_graphs):
    # ModelRunner.launch before the previous step is collected, tokens taken on the device from that
    # step's values (with graphs: a graph's own output buffer, read before the next replay overwrites it)
    from test_feedback import assert_pipelined_equals_serial

    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=64,
                         cuda_graphs=cuda_graphs, compile_layers=False)
    assert_pipelined_equals_serial(runner, steps=8)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_the_first_generation_steps_read_feeds_the_step_launched_behind_it_on_cuda(tiny_model_dir, cuda_graphs):
    # (asynchronous scheduling after a request's first step: a multi-row step whose last row is read)
    from test_feedback import assert_first_step_feedback_equals_serial

    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=64,
                         cuda_graphs=cuda_graphs, compile_layers=False)
    assert_first_step_feedback_equals_serial(runner)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_fed_back_tokens_penalties_are_added_on_the_device_on_cuda(tiny_model_dir, cuda_graphs):
    # (asynchronous scheduling of a request with presence and frequency penalties: Segment.feedback_penalty
    # resolved on the device before the graph's input copy)
    from test_feedback import assert_feedback_penalties_equal_serial

    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=64,
                         cuda_graphs=cuda_graphs, compile_layers=False)
    for rotation in range(3):
        assert_feedback_penalties_equal_serial(runner, rotation)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_grammar_bitmasks_given_after_launch_equal_bitmasks_at_launch_on_cuda(tiny_model_dir, cuda_graphs):
    # (asynchronous scheduling of grammar requests: Segment.deferred_mask; with graphs, the kept logits are a
    # graph's own output, read by ModelRunner.finish_reads before the next replay)
    from test_deferred_masks import assert_deferred_masks_equal_masks_at_launch

    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=64,
                         cuda_graphs=cuda_graphs, compile_layers=False)
    assert_deferred_masks_equal_masks_at_launch(runner, steps=6)


@pytest.mark.parametrize("block_size", [4, 16, 64])
def test_paged_attention_on_cuda_matches_transformers(tiny_model_dir, block_size):
    """attention="paged" (workers.attention_paged: one Triton kernel per layer reads the paged cache in
    place and writes the step's K/V; float32 runs its IEEE dot) against the dense transformers oracle,
    as the sdpa path is above; its steps never wait for the host."""
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=block_size, num_blocks=32,
                         attention="paged", **EAGER)
    _assert_mixed_batch_matches_transformers(tiny_model_dir, runner)
    _assert_step_never_syncs(runner, list(range(5, 45)), list(range(20, 20 - (-40 // block_size))))


def test_paged_attention_at_the_8b_head_ratio_with_long_steps_equals_sdpa(tiny_model_dir):
    """The 8B head ratio (4 query heads per KV head, 16 folded rows per decode program), a 200-token
    prefill (13 query tiles, 7 key tiles), a 64-token step over that context beside a decode row, and
    bf16 (the CUDA default: bf16 dots, float32 softmax) close to the sdpa runner's bf16 (the bound of
    test_bf16_is_close_to_float32)."""
    import dataclasses

    from workers.loader import read_config
    from workers.model import random_model

    base = read_config(tiny_model_dir)
    cfg = dataclasses.replace(base, num_layers=2, num_heads=4 * base.num_kv_heads)
    prompt = [5 + (i * 7) % 300 for i in range(200)]
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.5)):
        model = random_model(cfg, dtype=dtype, device="cuda", seed=3, std=0.2)
        got = {}
        for name in ("sdpa", "paged"):
            session = RunnerSession(ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=16,
                                                           num_blocks=40, attention=name, **EAGER))
            first = session.execute([segment("a", 0, prompt), segment("b", 0, [20, 21, 22])])
            got[name] = first + session.execute([segment("a", 200, list(range(40, 104))), segment("b", 3, [23])])
        for a, b in zip(got["sdpa"], got["paged"]):
            assert (result_logits(a).float() - result_logits(b).float()).abs().max() < tol, dtype


def test_paged_attention_replays_from_graphs_and_compiles_with_the_layers(tiny_model_dir):
    """attention="paged" under cuda_graphs and compile_layers (the CUDA defaults): greedy decode of three
    sequences replays graphs captured at start-up and gives the eager sdpa runner's tokens."""
    seqs = {"a": list(range(5, 35)), "b": list(range(60, 75)), "c": [7]}
    assert (_greedy_decode_tokens(tiny_model_dir, seqs, attention="paged", compile_layers=True, cuda_graphs=True)
            == _greedy_decode_tokens(tiny_model_dir, seqs))


def test_paged_attention_splits_a_long_context_on_cuda(tiny_model_dir, monkeypatch):
    """A 1,000-token context at batch 1 leaves most SMs idle, so the kernel splits the context
    (workers.attention_paged.context_splits, flash-decoding) and merges the parts: decode and a short
    verify-shaped step equal the sdpa runner's in float32."""
    from workers import attention_paged

    seen = []
    real = attention_paged.context_splits
    monkeypatch.setattr(attention_paged, "context_splits", lambda *a: seen.append(real(*a)) or seen[-1])
    prompt = [5 + (i * 11) % 300 for i in range(1000)]
    got = {}
    for name in ("sdpa", "paged"):
        session = RunnerSession(ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=16,
                                            num_blocks=80, attention=name, **EAGER))
        session.execute([segment("a", 0, prompt, reads=Reads())])
        got[name] = session.execute([segment("a", 1000, [7])]) + session.execute([segment("a", 1001, [8, 9, 10, 11])])
    for a, b in zip(got["sdpa"], got["paged"]):
        assert (result_logits(a) - result_logits(b)).abs().max() < 1e-3
    assert max(n for n, _ in seen) >= 3, seen  # 1,008-1,024 keys of context capacity: 3-4 splits of 256+


def _grouped_step(tiny_model_dir, monkeypatch):
    """A 40-token prompt chunk after 40 cached tokens beside three one-token decode steps, packed in
    attention groups (workers.attention_groups; the size threshold lifted for this small step)."""
    from workers import attention_groups

    monkeypatch.setattr(attention_groups, "GROUP_MIN_PAIRS", 0)
    runner = ModelRunner(tiny_model_dir, device="cuda", dtype=torch.float32, block_size=4, num_blocks=64, **EAGER)
    session = RunnerSession(runner)
    session.execute([segment("long", 0, list(range(5, 45)), reads=Reads())]
                    + [segment(s, 0, [20 + i, 21 + i, 22 + i], reads=Reads()) for i, s in enumerate("abc")])
    segs = [segment("a", 3, [50], reads=Reads(argmax=(0,))), segment("long", 40, list(range(60, 100))),
            segment("b", 3, [51], reads=Reads(argmax=(0,))), segment("c", 3, [52], reads=Reads(argmax=(0,)))]
    tables = session.tables.prepare(segs)
    grouped = runner.pack(segs, tables)
    assert len(grouped.layout.attention_groups) == 2, grouped.layout
    runner.group_attention = False
    whole = runner.pack(segs, tables)
    assert not whole.layout.attention_groups
    return runner, grouped, whole


def test_attention_groups_on_cuda_equal_the_whole_step_without_a_sync_and_replay(tiny_model_dir, monkeypatch):
    """The grouped step equals the same step attended whole (logits, K/V), syncs nothing with the host,
    and replays from a CUDA graph with the eager results."""
    runner, grouped, whole = _grouped_step(tiny_model_dir, monkeypatch)
    kv_whole, kv_grouped, kv_graph = (copy.deepcopy(runner.kv) for _ in range(3))
    g_buffer, w_buffer = torch.from_numpy(grouped.buffer).cuda(), torch.from_numpy(whole.buffer).cuda()
    with torch.inference_mode():
        _, logits_whole, _ = step_forward(runner.model, kv_whole, w_buffer, whole.layout)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            values, logits, _ = step_forward(runner.model, kv_grouped, g_buffer, grouped.layout)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        captured = _captured(runner, kv_graph, g_buffer, grouped.layout)
    torch.cuda.synchronize()
    torch.testing.assert_close(logits, logits_whole, rtol=1e-3, atol=1e-3)
    r = grouped.num_reads
    assert torch.equal(captured[0, :r], values[0, :r])
    for a, b, c in zip(kv_grouped.k + kv_grouped.v, kv_whole.k + kv_whole.v, kv_graph.k + kv_graph.v):
        torch.testing.assert_close(a[:-1], b[:-1], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(c[:-1], a[:-1])
