"""Keep/drop, truncation to context_len, shared prefixes and exact freeing through ModelRunner.execute."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.kv_blocks import KVCacheFullError, SharedBlockWriteError  # noqa: E402
from workers.runner import ModelRunner, SegmentError  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(tiny_model_dir, device="cpu", block_size=4, num_blocks=64)


@pytest.fixture(autouse=True)
def all_blocks_back(runner):
    yield
    for seq in runner.sequences():
        runner.free(seq)
    assert runner.blocks.num_free == runner.blocks.num_total


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def _cache_rows(runner, seq_id: str) -> torch.Tensor:
    """K and V of every cached token of seq_id, all layers, in cache order: [L, 2, N, Hkv, D]."""
    bs, table = runner.info.block_size, runner.block_table(seq_id)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(runner.cached_len(seq_id))])
    return torch.stack([torch.stack((runner.kv.flat_k(i)[slots], runner.kv.flat_v(i)[slots]))
                        for i in range(runner.info.num_layers)])


def test_dropped_tokens_leave_the_cache_unchanged(runner, tiny_model_dir):
    ids, extra = _ids(6, 0), _ids(5, 1)
    runner.execute([segment("s", 0, ids, reads=[])])
    before = [t.clone() for t in runner.kv.k + runner.kv.v]
    runner.execute([segment("s", 6, extra, keep=False)])
    assert runner.cached_len("s") == 6
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv.k + runner.kv.v))
    [res] = runner.execute([segment("s", 6, [extra[0]])])  # as if the dropped run never happened
    assert (result_logits(res)[0] - dense_logits(tiny_model_dir, ids + extra[:1])[6]).abs().max() < TOL


def test_kept_tokens_land_in_query_order(runner):
    ctx, new = _ids(5, 2), _ids(7, 3)
    keep = [True, False, True, True, False, False, True]
    for seq, k in (("mixed", keep), ("all", [True] * 7)):
        runner.execute([segment(seq, 0, ctx, reads=[])])
        runner.execute([segment(seq, 5, new, keep=k, reads=[])])
    assert runner.cached_len("mixed") == 5 + sum(keep)
    kept_rows = [5 + i for i, k in enumerate(keep) if k]
    full = _cache_rows(runner, "all")
    torch.testing.assert_close(_cache_rows(runner, "mixed"), full[:, :, list(range(5)) + kept_rows], rtol=0, atol=0)


def test_truncation_to_context_len(runner, tiny_model_dir):
    ids, new = _ids(10, 4), _ids(3, 5)
    runner.execute([segment("t", 0, ids, reads=[])])
    assert len(runner.block_table("t")) == 3
    free_before = runner.blocks.num_free
    [res] = runner.execute([segment("t", 4, new)])  # roll back 6 tokens, then append 3
    assert runner.cached_len("t") == 7 and len(runner.block_table("t")) == 2
    assert runner.blocks.num_free == free_before + 1
    assert (result_logits(res) - dense_logits(tiny_model_dir, ids[:4] + new)[4:]).abs().max() < TOL
    runner.execute([segment("t", 0, new[:1], keep=False, reads=[])])  # back to empty
    assert runner.cached_len("t") == 0 and runner.block_table("t") == []


def test_shared_prefix_reads_and_refuses_writes(runner, tiny_model_dir):
    ids, new = _ids(8, 6), _ids(2, 7)
    runner.execute([segment("owner", 0, ids, reads=[])])
    shared = runner.block_table("owner")
    runner.blocks.retain(shared)  # a prefix cache holding them
    runner.free("owner")
    runner.adopt_prefix("child", shared, 8)
    [res] = runner.execute([segment("child", 8, new)])
    assert (result_logits(res) - dense_logits(tiny_model_dir, ids + new)[8:]).abs().max() < TOL
    assert runner.block_table("child")[:2] == shared
    with pytest.raises(SharedBlockWriteError):
        runner.execute([segment("child", 6, new)])  # would write into shared block shared[1]
    assert runner.cached_len("child") == 6 and runner.block_table("child") == shared
    runner.execute([segment("child", 6, new, keep=False, reads=[])])  # reading is fine
    runner.free("child")
    runner.blocks.release(shared)


def test_bad_segments_raise_typed_errors_and_change_nothing(runner):
    runner.execute([segment("e", 0, _ids(3, 8), reads=[])])
    cases = [
        ([segment("e", 4, [5])], "context_len"),
        ([segment("e", 3, [5]), segment("e", 3, [6])], "seq_id"),
        ([segment("e", 3, [384])], "token_ids"),
        ([segment("e", 3, [5], positions=[-1])], "positions"),
    ]
    for segs, field in cases:
        with pytest.raises(SegmentError) as err:
            runner.execute(segs)
        assert err.value.field == field and err.value.seq_id == "e"
    assert runner.cached_len("e") == 3


def test_out_of_blocks_raises_before_writing(runner):
    runner.execute([segment("big", 0, _ids(60 * 4, 9), reads=[])])  # 60 of 64 blocks
    with pytest.raises(KVCacheFullError):
        runner.execute([segment("x", 0, _ids(10, 10), reads=[]), segment("y", 0, _ids(9, 11), reads=[])])
    assert runner.sequences() == ["big"] and runner.blocks.num_free == 4  # x and y never started


def test_randomized_runner_lifecycles_free_every_block(runner):
    """Hundreds of sequences through real forwards: grow, roll back, share, finish, cancel."""
    rng = random.Random(11)
    live: list[str] = []
    started = adopted = refused = 0
    for step in range(400):
        while len(live) < 6:
            seq, donors = f"r{started}", [d for d in live if runner.cached_len(d) >= 4]
            if donors and rng.random() < 0.3:
                full = runner.block_table(donor := rng.choice(donors))[: runner.cached_len(donor) // 4]
                runner.adopt_prefix(seq, full, 4 * len(full))
                adopted += 1
            live.append(seq)
            started += 1
        segs = []
        for seq in rng.sample(live, rng.randint(1, len(live))):
            ctx = rng.randint(max(0, runner.cached_len(seq) - 5), runner.cached_len(seq))
            n = rng.randint(1, 6)
            segs.append(segment(seq, ctx, _ids(n, step), keep=[rng.random() < 0.7 for _ in range(n)], reads=[]))
        try:
            runner.execute(segs)
        except (KVCacheFullError, SharedBlockWriteError):
            refused += 1
            assert all(runner.cached_len(s.seq_id) == s.context_len for s in segs)
        for seq in list(live):
            table = runner.block_table(seq)
            assert len(table) == -(-runner.cached_len(seq) // 4)
            if rng.random() < 0.15 or runner.cached_len(seq) > 24:  # finish or cancel
                runner.free(seq)
                live.remove(seq)
    for seq in live:
        runner.free(seq)
    assert started >= 300 and adopted >= 30 and refused >= 1
    assert runner.blocks.num_free == runner.blocks.num_total and runner.sequences() == []
