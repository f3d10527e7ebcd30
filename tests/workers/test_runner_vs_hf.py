"""ModelRunner.execute against transformers' Qwen3ForCausalLM, float32: max |logit diff| < 1e-4."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.batch import Reads, Sampling  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", params=["tied_gqa", "untied_mha"])
def model_dir(request, tiny_model_dir, tiny_untied_model_dir):
    return tiny_model_dir if request.param == "tied_gqa" else tiny_untied_model_dir


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner(model_dir, device="cpu", block_size=4, num_blocks=256)


@pytest.fixture
def session(runner):
    session = RunnerSession(runner)
    yield session
    session.free_all()
    assert session.blocks.num_free == session.blocks.num_total


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_prefill_matches_dense(session, model_dir):
    ids = _tokens(13, 0, session.info.vocab_size)
    [res] = session.execute([segment("prefill", 0, ids)])
    assert _max_diff(result_logits(res), dense_logits(model_dir, ids)) < TOL
    assert session.cached_len("prefill") == 13


def test_decode_steps_with_cache(session, model_dir):
    ids = _tokens(11, 1, session.info.vocab_size)
    expected = dense_logits(model_dir, ids)
    session.execute([segment("dec", 0, ids[:6], reads=Reads())])  # prefill 6 (crosses a block), no reads
    for i in range(6, 11):
        [res] = session.execute([segment("dec", i, [ids[i]])])
        assert _max_diff(result_logits(res)[0], expected[i]) < TOL
    assert session.cached_len("dec") == 11


def test_out_of_order_positions(session, model_dir):
    """Physical order != logical order (slot reordering): RoPE uses the given positions only."""
    ids = _tokens(12, 2, session.info.vocab_size)
    positions = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7]
    expected = dense_logits(model_dir, ids, positions)
    session.execute([segment("ooo", 0, ids[:8], positions[:8], reads=Reads())])
    [res] = session.execute([segment("ooo", 8, ids[8:], positions[8:])])
    assert _max_diff(result_logits(res), expected[8:]) < TOL


def test_branch_runs_equal_their_dense_runs(session, model_dir):
    """Four runs in one segment (branch_lens): each equals cache + itself run densely, never a sibling."""
    vocab = session.info.vocab_size
    ctx = _tokens(7, 3, vocab)
    runs = [_tokens(2, 4, vocab)] + [_tokens(3, 10 + b, vocab) for b in range(3)]
    starts = [7, 9, 13, 17]  # logical positions of each run (gaps: other slots)
    session.execute([segment("tree", 0, ctx, reads=Reads())])
    ids = [t for run in runs for t in run]
    positions = [s + j for s, run in zip(starts, runs) for j in range(len(run))]
    [res] = session.execute([segment("tree", 7, ids, positions, keep=False, branch_lens=[2, 3, 3, 3])])
    got, at = result_logits(res), 0
    for start, run in zip(starts, runs):
        dense = dense_logits(model_dir, ctx + run, list(range(7)) + list(range(start, start + len(run))))
        assert _max_diff(got[at:at + len(run)], dense[7:]) < TOL
        at += len(run)
    assert session.cached_len("tree") == 7  # all dropped


def test_mixed_batch_matches_each_dense_run(session, model_dir):
    """Sequences at different cache lengths and segment kinds in ONE step, each equal to its own run."""
    vocab = session.info.vocab_size
    a, b, c = _tokens(10, 20, vocab), _tokens(9, 21, vocab), _tokens(6, 22, vocab)
    session.execute([segment("a", 0, a[:9], reads=Reads()), segment("b", 0, b[:5], reads=Reads())])
    mask = session.info.mask_token_id
    segs = [
        segment("a", 9, a[9:]),  # decode step at cache 9
        segment("b", 5, b[5:] + [mask, mask], keep=4),  # chunk + dropped plan rows
        segment("c", 0, c),  # fresh prefill
        segment("d", 0, c[:4], keep=False, branch_lens=[2, 2]),  # branches on an empty cache
    ]
    ra, rb, rc, rd = session.execute(segs)
    assert _max_diff(result_logits(ra), dense_logits(model_dir, a)[9:]) < TOL
    assert _max_diff(result_logits(rb), dense_logits(model_dir, b + [mask, mask])[5:]) < TOL
    assert _max_diff(result_logits(rc), dense_logits(model_dir, c)) < TOL
    assert _max_diff(result_logits(rd)[:2], dense_logits(model_dir, c[:2])) < TOL
    assert _max_diff(result_logits(rd)[2:], dense_logits(model_dir, c[2:4], [2, 3])) < TOL
    assert [session.cached_len(s) for s in "abcd"] == [10, 9, 6, 0]


SYNCING = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero")


def test_one_host_transfer_and_head_on_read_rows_only(session, monkeypatch):
    """A step moves results to the host once, calls nothing that syncs, and only the (bucketed) read
    rows go through the LM head."""
    ids = _tokens(9, 5, session.info.vocab_size)
    head_rows = []
    hook = session.runner.model.lm_head.register_forward_hook(lambda mod, inp, out: head_rows.append(inp[0].shape[0]))
    calls = {name: 0 for name in SYNCING}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    reads = Reads(argmax=(2,), prob=(5,), prob_tokens=(3,), sample=(8,))
    try:
        session.execute([segment("sync", 0, ids, reads=reads, sampling=Sampling(temperature=1.0, gumbel=True)),
                         segment("sync2", 0, ids[:4], reads=Reads())])
    finally:
        monkeypatch.undo()
        hook.remove()
    assert head_rows == [3]  # the 3 read rows (an eager CPU step is not padded to a read bucket)
    assert calls == {**{name: 0 for name in SYNCING}, "cpu": 1, "numpy": 1}
