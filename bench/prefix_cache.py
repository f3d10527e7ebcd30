"""Host time of the prefix cache's operations on a full cache, at the sizes a GPU's KV pool reaches.

The engine loop calls `PrefixCache.evict` when a request needs blocks the free list lacks, and
`lookup` + `record` when a request starts; both run between two forwards, so their time adds to the
step (scheduler/prefix_cache.py). A full cache of `--blocks` 16-token blocks is built from prompts of
`--prompt-blocks` blocks each, every block idle (held only by the cache); then, per size:

    evict(1) / evict(16) / evict(64)   ms to free that many blocks (median of --repeats, cache refilled)
    lookup+record                      ms for one prompt that hits its whole cached chain
    evictable(64) / evictable(all)     ms to count what eviction could free: up to 64 blocks (the
                                       scheduler's check before it evicts or preempts for a waiting
                                       request) and the whole cache (what that preemption check cost)

    OMP_NUM_THREADS=1 python bench/prefix_cache.py                       # 1,000 / 10,000 / 50,000 blocks
    ... --sizes 1000 --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_args import append_section, positive_int, positive_ints, writable_file  # noqa: E402
from scheduler.prefix_cache import PrefixCache  # noqa: E402
from workers.kv_blocks import BlockPool  # noqa: E402

BLOCK = 16
EVICTS = (1, 16, 64)


def full_cache(num_blocks: int, prompt_blocks: int, seed: int = 0) -> tuple[PrefixCache, BlockPool, list[list[int]]]:
    """A pool of num_blocks whose every block is a cached prompt block (refcount 1: the cache's)."""
    pool = BlockPool(num_blocks, BLOCK)
    cache = PrefixCache(pool)
    rng = random.Random(seed)
    prompts = []
    while pool.num_free >= prompt_blocks:
        prompt = [rng.randrange(8_000) for _ in range(prompt_blocks * BLOCK + 1)]
        table = pool.allocate(prompt_blocks)
        cache.insert(prompt, table, len(prompt))
        pool.release(table)  # the request finished: only the cache holds them
        prompts.append(prompt)
    return cache, pool, prompts


def measure(num_blocks: int, prompt_blocks: int, repeats: int) -> dict:
    row = {"blocks": num_blocks}
    for want in EVICTS:
        times = []
        for r in range(repeats):
            cache, _, _ = full_cache(num_blocks, prompt_blocks, seed=r)
            start = time.perf_counter()
            freed = cache.evict(want)
            times.append(time.perf_counter() - start)
            assert freed == want, (freed, want)
        row[f"evict{want}"] = statistics.median(times) * 1e3
    cache, _, prompts = full_cache(num_blocks, prompt_blocks)
    times = []
    for prompt in prompts[-repeats:]:
        start = time.perf_counter()
        hit = cache.lookup(prompt)
        cache.record(prompt, hit)
        times.append(time.perf_counter() - start)
        assert len(hit.block_ids) == prompt_blocks
    row["lookup"] = statistics.median(times) * 1e3
    for key, at_most in (("evictable64", 64), ("evictable_all", None)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cache.evictable(at_most=at_most)
            times.append(time.perf_counter() - start)
        row[key] = statistics.median(times) * 1e3
    return row


def table(rows: list[dict], args) -> str:
    lines = [f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}; "
             f"{BLOCK}-token blocks, prompts of {args.prompt_blocks} blocks, every block cached and idle; "
             f"median of {args.repeats}.", "",
             "| cached blocks | evict(1) ms | evict(16) ms | evict(64) ms | lookup+record ms | evictable(64) ms "
             "| evictable(all) ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['blocks']:,} | {r['evict1']:.3f} | {r['evict16']:.3f} | {r['evict64']:.3f} | "
                     f"{r['lookup']:.3f} | {r['evictable64']:.3f} | {r['evictable_all']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=positive_ints, default=[1_000, 10_000, 50_000],
                        help=f"cached blocks per row, comma-separated (each holding at least {max(EVICTS)} blocks of "
                             "whole prompts)")
    parser.add_argument("--prompt-blocks", type=positive_int, default=100, help="blocks per cached prompt")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--append", type=writable_file, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    least = -(-max(EVICTS) // args.prompt_blocks) * args.prompt_blocks  # whole prompts, evict(64)'s blocks
    if small := [n for n in args.sizes if n < least]:
        parser.error(f"--sizes {small[0]} with --prompt-blocks {args.prompt_blocks}: the cache holds whole prompts "
                     f"only, {small[0] // args.prompt_blocks * args.prompt_blocks} blocks, fewer than the "
                     f"{max(EVICTS)} evict({max(EVICTS)}) frees; use sizes of at least {least} or fewer --prompt-blocks")
    rows = [measure(n, args.prompt_blocks, args.repeats) for n in args.sizes]
    text = table(rows, args)
    print(text)
    append_section(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
