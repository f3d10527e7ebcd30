"""BlockPool / BlockTables accounting (plain Python): refcounts, sharing, truncation, prepare (all or
nothing), exact freeing."""

from __future__ import annotations

import random

import pytest

from workers.batch import Segment
from workers.kv_blocks import BlockPool, BlockTables, KVCacheFullError, SharedBlockWriteError


def test_allocate_release_refcounts():
    pool = BlockPool(4, 8)
    a = pool.allocate(3)
    assert pool.num_free == 1 and all(pool.refcount(b) == 1 for b in a)
    pool.retain(a[:1])
    pool.release(a)
    assert pool.num_free == 3 and pool.refcount(a[0]) == 1
    pool.release(a[:1])
    assert pool.num_free == 4


def test_allocate_too_many_takes_nothing():
    pool = BlockPool(2, 8)
    with pytest.raises(KVCacheFullError) as err:
        pool.allocate(3)
    assert err.value.needed == 3 and err.value.free == 2 and pool.num_free == 2


@pytest.mark.parametrize("bad", ["retain_free", "release_free", "out_of_range"])
def test_misuse_is_refused(bad):
    pool = BlockPool(2, 8)
    with pytest.raises(ValueError):
        if bad == "retain_free":
            pool.retain([0])
        elif bad == "release_free":
            pool.release([1])
        else:
            pool.release([5])
    assert pool.num_free == 2


def test_grow_truncate_and_free():
    tables = BlockTables(BlockPool(8, 4))
    tables.grow("s", 6)
    blocks = tables.table("s")
    assert len(blocks) == 2 and tables.length("s") == 6 and tables.pool.num_free == 6
    tables.truncate("s", 4)  # second block becomes unused
    assert tables.table("s") == blocks[:1] and tables.pool.num_free == 7
    with pytest.raises(ValueError, match="exceeds"):
        tables.truncate("s", 5)
    tables.free("s")
    tables.free("s")  # idempotent
    assert tables.pool.num_free == 8 and tables.length("s") == 0 and tables.table("s") == []


def _seg(seq_id: str, context_len: int, n: int, num_kept: int | None = None) -> Segment:
    return Segment(seq_id, context_len, [1] * n, list(range(context_len, context_len + n)),
                   n if num_kept is None else num_kept)


def test_prepare_truncates_then_grows_by_the_kept_tokens():
    tables = BlockTables(BlockPool(8, 4))
    tables.grow("a", 9)
    a_blocks = tables.table("a")
    out = tables.prepare([_seg("a", 5, 4, num_kept=2), _seg("b", 0, 6, num_kept=5)])
    assert out == [tables.table("a"), tables.table("b")]
    assert out[0] == a_blocks[:2] and tables.length("a") == 7  # rolled back to 5, then 2 kept
    assert len(out[1]) == 2 and tables.length("b") == 5
    assert tables.pool.num_free == 4
    with pytest.raises(ValueError, match="exceeds"):
        tables.prepare([_seg("a", 8, 1)])


def test_prepare_is_all_or_nothing():
    tables = BlockTables(BlockPool(4, 4))
    tables.grow("a", 6)
    with pytest.raises(KVCacheFullError) as err:
        tables.prepare([_seg("a", 6, 2), _seg("b", 0, 9)])  # 0 + 3 blocks needed, 2 free
    assert err.value.needed == 3 and err.value.free == 2
    assert tables.length("a") == 6 and tables.length("b") == 0 and tables.pool.num_free == 2


def test_shared_prefix_is_read_only():
    tables = BlockTables(BlockPool(8, 4))
    tables.grow("owner", 8)
    shared = tables.table("owner")
    tables.adopt_prefix("child", shared, 8)
    assert all(tables.pool.refcount(b) == 2 for b in shared)
    tables.prepare([_seg("child", 8, 1)])  # a fresh block: fine
    assert tables.table("child")[:2] == shared and tables.length("child") == 9
    with pytest.raises(SharedBlockWriteError, match="shared block"):
        tables.prepare([_seg("other", 0, 2), _seg("child", 6, 1)])  # would write into shared[1]
    assert tables.length("child") == 6 and tables.length("other") == 0  # nothing grown
    assert tables.table("child") == shared
    tables.prepare([_seg("child", 6, 3, num_kept=0)])  # reading it is fine
    with pytest.raises(ValueError, match="full"):
        tables.adopt_prefix("other2", shared, 7)
    tables.free("owner")
    tables.free("other")
    assert all(tables.pool.refcount(b) == 1 for b in shared)
    tables.free("child")
    assert tables.pool.num_free == 8


def test_randomized_lifecycles_leak_nothing():
    """A few hundred sequence lifecycles (allocate, grow, share, truncate, finish, cancel) with a
    prefix-cache holder; every refcount matches an independent count, and all blocks come back."""
    rng = random.Random(7)
    pool = BlockPool(64, 4)
    tables = BlockTables(pool)
    held: list[list[int]] = []  # prefix-cache entries (retained block lists)
    live: list[str] = []
    created = shared = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.15 and len(live) < 12:
            seq = f"s{step}"
            if held and rng.random() < 0.5:
                prefix = rng.choice(held)
                tables.adopt_prefix(seq, prefix, len(prefix) * 4)
                shared += 1
            live.append(seq)
            created += 1
        elif op < 0.6 and live:
            seq = rng.choice(live)
            ctx = rng.randint(0, tables.length(seq))
            n = rng.randint(1, 9)
            try:
                tables.prepare([_seg(seq, ctx, n, num_kept=rng.randint(0, n))])
            except KVCacheFullError:
                assert tables.length(seq) == ctx
            except SharedBlockWriteError:
                tables.truncate(seq, ctx - ctx % 4)
        elif op < 0.7 and live:
            seq = rng.choice(live)
            full = tables.table(seq)[: tables.length(seq) // 4]
            if full:
                pool.retain(full)
                held.append(full)
        elif op < 0.75 and held:
            pool.release(held.pop(rng.randrange(len(held))))
        elif live:  # finish or cancel: both free everything
            tables.free(live.pop(rng.randrange(len(live))))
        _check_refcounts(pool, tables, live, held)
    for seq in live:
        tables.free(seq)
    for prefix in held:
        pool.release(prefix)
    assert pool.num_free == pool.num_total and len(tables) == 0
    assert created >= 300 and shared >= 30  # the walk really exercised lifecycles and sharing


def _check_refcounts(pool: BlockPool, tables: BlockTables, live: list[str], held: list[list[int]]) -> None:
    counts = [0] * pool.num_total
    for seq in live:
        for b in tables.table(seq):
            counts[b] += 1
    for prefix in held:
        for b in prefix:
            counts[b] += 1
    assert counts == [pool.refcount(b) for b in range(pool.num_total)]
    assert pool.num_free == counts.count(0)
