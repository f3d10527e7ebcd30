"""Keep/drop, truncation to context_len, shared prefixes and exact freeing through real steps: a
RunnerSession owns the blocks, the runner writes only the slots it is told (and its scratch block)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.batch import Reads, Sampling  # noqa: E402
from workers.kv_blocks import KVCacheFullError, SharedBlockWriteError  # noqa: E402
from workers.runner import ModelRunner, SegmentError  # noqa: E402
from workers.session import RunnerSession  # noqa: E402

TOL = 1e-4
NO_READS = Reads()


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(tiny_model_dir, device="cpu", block_size=4, num_blocks=64)


@pytest.fixture
def session(runner):
    session = RunnerSession(runner)
    yield session
    session.free_all()
    assert session.blocks.num_free == session.blocks.num_total


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def _owned_kv(runner) -> list[torch.Tensor]:
    """Copies of every block the owner can hand out (the scratch block excluded), all layers."""
    n = runner.info.num_kv_blocks
    return [t[:n].clone() for t in runner.kv.k + runner.kv.v]


def _cache_rows(session, seq_id: str) -> torch.Tensor:
    """K and V of every cached token of seq_id, all layers, in cache order: [L, 2, N, Hkv, D]."""
    runner, bs, table = session.runner, session.info.block_size, session.block_table(seq_id)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(session.cached_len(seq_id))])
    return torch.stack([torch.stack((runner.kv.flat_k(i)[slots], runner.kv.flat_v(i)[slots]))
                        for i in range(runner.info.num_layers)])


def test_dropped_tokens_leave_the_cache_unchanged(session, tiny_model_dir):
    ids, extra = _ids(6, 0), _ids(5, 1)
    session.execute([segment("s", 0, ids, reads=NO_READS)])
    before = _owned_kv(session.runner)
    session.execute([segment("s", 6, extra, keep=False)])
    assert session.cached_len("s") == 6
    assert all(torch.equal(a, b) for a, b in zip(before, _owned_kv(session.runner)))  # only scratch written
    [res] = session.execute([segment("s", 6, [extra[0]])])  # as if the dropped run never happened
    assert (result_logits(res)[0] - dense_logits(tiny_model_dir, ids + extra[:1])[6]).abs().max() < TOL


def test_kept_prefix_lands_in_query_order(session):
    ctx, new = _ids(5, 2), _ids(7, 3)
    for seq, kept in (("prefix", 4), ("all", 7)):
        session.execute([segment(seq, 0, ctx, reads=NO_READS)])
        session.execute([segment(seq, 5, new, keep=kept, reads=NO_READS)])
    assert session.cached_len("prefix") == 9
    full = _cache_rows(session, "all")
    torch.testing.assert_close(_cache_rows(session, "prefix"), full[:, :, :9], rtol=0, atol=0)


def test_truncation_to_context_len(session, tiny_model_dir):
    ids, new = _ids(10, 4), _ids(3, 5)
    session.execute([segment("t", 0, ids, reads=NO_READS)])
    assert len(session.block_table("t")) == 3
    free_before = session.blocks.num_free
    [res] = session.execute([segment("t", 4, new)])  # roll back 6 tokens, then append 3
    assert session.cached_len("t") == 7 and len(session.block_table("t")) == 2
    assert session.blocks.num_free == free_before + 1
    assert (result_logits(res) - dense_logits(tiny_model_dir, ids[:4] + new)[4:]).abs().max() < TOL
    session.execute([segment("t", 0, new[:1], keep=False, reads=NO_READS)])  # back to empty
    assert session.cached_len("t") == 0 and session.block_table("t") == []


def test_shared_prefix_reads_and_refuses_writes(session, tiny_model_dir):
    ids, new = _ids(8, 6), _ids(2, 7)
    session.execute([segment("owner", 0, ids, reads=NO_READS)])
    shared = session.block_table("owner")
    session.blocks.retain(shared)  # a prefix cache holding them
    session.free("owner")
    session.adopt_prefix("child", shared, 8)
    before = [t[shared].clone() for t in session.runner.kv.k + session.runner.kv.v]
    [res] = session.execute([segment("child", 8, new)])
    assert (result_logits(res) - dense_logits(tiny_model_dir, ids + new)[8:]).abs().max() < TOL
    assert session.block_table("child")[:2] == shared
    with pytest.raises(SharedBlockWriteError):
        session.execute([segment("child", 6, new)])  # would write into shared block shared[1]
    assert session.cached_len("child") == 6 and session.block_table("child") == shared
    session.execute([segment("child", 6, new, keep=False, reads=NO_READS)])  # reading is fine
    assert all(torch.equal(a, t[shared]) for a, t in zip(before, session.runner.kv.k + session.runner.kv.v))
    session.free("child")
    session.blocks.release(shared)


BAD_SEGMENTS = [
    (lambda: [segment("e", 3, [5]), segment("e", 3, [6])], "seq_id"),
    (lambda: [segment("e", 3, [384])], "token_ids"),
    (lambda: [segment("e", 3, [5], positions=[-1])], "positions"),
    (lambda: [segment("e", 3, [5], reads=Reads(prob=(0,), prob_tokens=(-1,)))], "prob_tokens"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(temperature=float("nan")))], "temperature"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(temperature=-1.0))], "temperature"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(top_p=0.0))], "top_p"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(top_p=1.5))], "top_p"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(top_k=-1))], "top_k"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(seed=-1))], "seed"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(seed=2**63))], "seed"),
    (lambda: [segment("e", 3, [5], sampling=Sampling(step=-1))], "step"),
]


@pytest.mark.parametrize("make, field", BAD_SEGMENTS, ids=[f for _, f in BAD_SEGMENTS])
def test_bad_segments_raise_typed_errors_and_change_nothing(session, make, field):
    session.execute([segment("ok", 0, _ids(2, 12), reads=NO_READS), segment("e", 0, _ids(3, 8), reads=NO_READS)])
    before = _owned_kv(session.runner)
    with pytest.raises(SegmentError) as err:
        session.execute([segment("ok", 2, [7])] + make())
    assert err.value.field == field and err.value.seq_id == "e"
    assert session.cached_len("e") == 3 and session.cached_len("ok") == 2
    assert all(torch.equal(a, b) for a, b in zip(before, _owned_kv(session.runner)))


def test_runner_checks_the_block_tables_it_is_given(runner):
    """The runner never allocates, but refuses a table that cannot hold the step or names a block it lacks."""
    seg = segment("x", 4, [5, 6], keep=2, reads=NO_READS)
    with pytest.raises(SegmentError, match="cannot hold") as err:
        runner.execute([seg], [[0]])  # 4 + 2 tokens need 2 blocks of 4
    assert err.value.field == "block_table" and err.value.seq_id == "x"
    with pytest.raises(SegmentError, match="block ids") as err:
        runner.execute([seg], [[0, runner.info.num_kv_blocks]])  # the scratch block is not the owner's
    assert err.value.field == "block_table"
    with pytest.raises(ValueError, match="one table per segment"):
        runner.execute([seg], [])


def test_context_len_beyond_the_cache_is_refused(session):
    session.execute([segment("c", 0, _ids(3, 13), reads=NO_READS)])
    with pytest.raises(ValueError, match="exceeds"):
        session.execute([segment("c", 4, [5])])
    assert session.cached_len("c") == 3


def test_out_of_blocks_raises_before_writing(session):
    session.execute([segment("big", 0, _ids(60 * 4, 9), reads=NO_READS)])  # 60 of 64 blocks
    with pytest.raises(KVCacheFullError):
        session.execute([segment("x", 0, _ids(10, 10), reads=NO_READS), segment("y", 0, _ids(9, 11), reads=NO_READS)])
    assert session.sequences() == ["big"] and session.blocks.num_free == 4  # x and y never started


def test_randomized_session_lifecycles_free_every_block(session):
    """Hundreds of sequences through real steps: grow, roll back, share, finish, cancel."""
    rng = random.Random(11)
    live: list[str] = []
    started = adopted = refused = 0
    for step in range(400):
        while len(live) < 6:
            seq, donors = f"r{started}", [d for d in live if session.cached_len(d) >= 4]
            if donors and rng.random() < 0.3:
                full = session.block_table(donor := rng.choice(donors))[: session.cached_len(donor) // 4]
                session.adopt_prefix(seq, full, 4 * len(full))
                adopted += 1
            live.append(seq)
            started += 1
        segs = []
        for seq in rng.sample(live, rng.randint(1, len(live))):
            ctx = rng.randint(max(0, session.cached_len(seq) - 5), session.cached_len(seq))
            n = rng.randint(1, 6)
            segs.append(segment(seq, ctx, _ids(n, step), keep=rng.randint(0, n), reads=NO_READS))
        try:
            session.execute(segs)
        except (KVCacheFullError, SharedBlockWriteError):
            refused += 1
            assert all(session.cached_len(s.seq_id) == s.context_len for s in segs)
        for seq in list(live):
            table = session.block_table(seq)
            assert len(table) == -(-session.cached_len(seq) // 4)
            if rng.random() < 0.15 or session.cached_len(seq) > 24:  # finish or cancel
                session.free(seq)
                live.remove(seq)
    for seq in live:
        session.free(seq)
    assert started >= 300 and adopted >= 30 and refused >= 1
    assert session.blocks.num_free == session.blocks.num_total and session.sequences() == []
