"""ModelRunner.execute against transformers' Qwen3ForCausalLM, float32: max |logit diff| < 1e-4."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", params=["tied_gqa", "untied_mha"])
def model_dir(request, tiny_model_dir, tiny_untied_model_dir):
    return tiny_model_dir if request.param == "tied_gqa" else tiny_untied_model_dir


@pytest.fixture(scope="module", params=["segment", "batched"])
def runner(request, model_dir):
    return ModelRunner(model_dir, device="cpu", block_size=4, num_blocks=256, attention=request.param)


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_prefill_matches_dense(runner, model_dir):
    ids = _tokens(13, 0, runner.info.vocab_size)
    [res] = runner.execute([segment("prefill", 0, ids)])
    assert _max_diff(result_logits(res), dense_logits(model_dir, ids)) < TOL
    assert runner.cached_len("prefill") == 13
    runner.free("prefill")


def test_decode_steps_with_cache(runner, model_dir):
    ids = _tokens(11, 1, runner.info.vocab_size)
    expected = dense_logits(model_dir, ids)
    runner.execute([segment("dec", 0, ids[:6], reads=[])])  # prefill 6 (crosses a block), no reads
    for i in range(6, 11):
        [res] = runner.execute([segment("dec", i, [ids[i]])])
        assert _max_diff(result_logits(res)[0], expected[i]) < TOL
    assert runner.cached_len("dec") == 11
    runner.free("dec")
    assert runner.blocks.num_free == runner.blocks.num_total


def test_out_of_order_positions(runner, model_dir):
    """Physical order != logical order (slot reordering): RoPE uses the given positions only."""
    ids = _tokens(12, 2, runner.info.vocab_size)
    positions = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7]
    expected = dense_logits(model_dir, ids, positions)
    runner.execute([segment("ooo", 0, ids[:8], positions[:8], reads=[])])
    [res] = runner.execute([segment("ooo", 8, ids[8:], positions[8:])])
    assert _max_diff(result_logits(res), expected[8:]) < TOL
    runner.free("ooo")


def test_tree_branches_equal_their_dense_runs(runner, model_dir):
    """Trunk + three branches in one segment: each branch equals cache + trunk + itself run densely."""
    vocab = runner.info.vocab_size
    ctx, trunk = _tokens(7, 3, vocab), _tokens(2, 4, vocab)
    branches = [_tokens(3, 10 + b, vocab) for b in range(3)]
    runner.execute([segment("tree", 0, ctx, reads=[])])
    ids = trunk + [t for br in branches for t in br]
    branch_ids = [-1, -1] + [b for b in range(3) for _ in range(3)]
    positions = [7, 8] + [p for b in range(3) for p in range(9 + 4 * b, 12 + 4 * b)]
    [res] = runner.execute([segment("tree", 7, ids, positions, keep=False, branch=branch_ids)])
    got = result_logits(res)
    assert _max_diff(got[:2], dense_logits(model_dir, ctx + trunk)[7:]) < TOL
    for b, br in enumerate(branches):
        dense = dense_logits(model_dir, ctx + trunk + br, list(range(9)) + positions[2 + 3 * b:5 + 3 * b])
        assert _max_diff(got[2 + 3 * b:5 + 3 * b], dense[9:]) < TOL
    assert runner.cached_len("tree") == 7  # all dropped
    runner.free("tree")


def test_mixed_batch_matches_each_dense_run(runner, model_dir):
    """Sequences at different cache lengths and segment kinds in ONE forward, each equal to its own run."""
    vocab = runner.info.vocab_size
    a, b, c = _tokens(10, 20, vocab), _tokens(9, 21, vocab), _tokens(6, 22, vocab)
    runner.execute([segment("a", 0, a[:9], reads=[]), segment("b", 0, b[:5], reads=[])])
    mask = runner.info.mask_token_id
    segs = [
        segment("a", 9, a[9:]),  # decode step at cache 9
        segment("b", 5, b[5:] + [mask, mask], keep=[True] * 4 + [False] * 2),  # chunk + dropped plan rows
        segment("c", 0, c),  # fresh prefill
        segment("d", 0, c[:4], branch=[-1, 0, 1, 1], keep=False),  # branches on an empty cache
    ]
    ra, rb, rc, rd = runner.execute(segs)
    assert _max_diff(result_logits(ra), dense_logits(model_dir, a)[9:]) < TOL
    assert _max_diff(result_logits(rb), dense_logits(model_dir, b + [mask, mask])[5:]) < TOL
    assert _max_diff(result_logits(rc), dense_logits(model_dir, c)) < TOL
    assert _max_diff(result_logits(rd)[[0, 2, 3]], dense_logits(model_dir, [c[0], c[2], c[3]], [0, 2, 3])) < TOL
    assert _max_diff(result_logits(rd)[1], dense_logits(model_dir, c[:2])[1]) < TOL
    assert [runner.cached_len(s) for s in "abcd"] == [10, 9, 6, 0]
    for s in "abcd":
        runner.free(s)
    assert runner.blocks.num_free == runner.blocks.num_total


SYNCING = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__")


def test_one_host_transfer_and_head_on_read_rows_only(runner, monkeypatch):
    """execute() moves results to the host once, and only rows with reads go through the LM head."""
    ids = _tokens(9, 5, runner.info.vocab_size)
    head_rows = []
    hook = runner.model.lm_head.register_forward_hook(lambda mod, inp, out: head_rows.append(inp[0].shape[0]))
    calls = {name: 0 for name in SYNCING}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    from workers.batch import Read, ReadKind, Sampling

    reads = [Read(2, ReadKind.ARGMAX), Read(8, ReadKind.SAMPLE), Read(5, ReadKind.PROB, token=3)]
    try:
        runner.execute([segment("sync", 0, ids, reads=reads, sampling=Sampling(temperature=1.0, gumbel=True)),
                        segment("sync2", 0, ids[:4], reads=[])])
    finally:
        monkeypatch.undo()
        hook.remove()
        runner.free("sync")
        runner.free("sync2")
    assert head_rows == [3]
    assert calls == {**{name: 0 for name in SYNCING}, "cpu": 1, "tolist": 1}
