"""KV ownership: the scheduler holds every KV block of every runner (style rule 13).

One `BlockTables` per runner key ("main", and "ar" for a separate AR model) over a pool of
`runner.info.num_kv_blocks` blocks, and the prefix cache over the main pool. Blocks are allocated
when a segment enters the plan (`prepare`): the sequence is truncated to the segment's context_len
(rolling back tentative KV) and grown by its kept tokens; the plan carries the resulting block table
to the runner, which only writes where it is told. Plain Python.

Admission promises each running request up to `Request.kv_blocks` blocks (its estimate); `available`
is what is left unpromised, less a reserve. Should a step still run short (estimates are bounds on
text, tentative KV can exceed them briefly), the scheduler evicts prefix-cache blocks and then
preempts at schedule time (scheduler.Scheduler._prepare_kv).
"""

from __future__ import annotations

import math

from scheduler.prefix_cache import PrefixCache, PrefixHit

from scheduler.request import Request
from workers.batch import Segment
from workers.kv_blocks import BlockPool, BlockTables


class KVOwner:
    """Block tables of every runner and the prefix cache of the main runner."""

    def __init__(self, runners: dict, *, prefix_cache: bool, reserve_fraction: float):
        self.tables = {key: BlockTables(BlockPool(r.info.num_kv_blocks, r.info.block_size)) for key, r in runners.items()}
        self.prefix_cache = PrefixCache(self.tables["main"].pool) if prefix_cache else None
        self.reserve_fraction = reserve_fraction

    def pool(self, key: str = "main") -> BlockPool:
        return self.tables[key].pool

    def reserve(self, key: str = "main") -> int:
        """Blocks never promised at admission (headroom for tentative KV)."""
        return int(self.reserve_fraction * self.pool(key).num_total)

    def capacity(self, key: str = "main") -> int:
        """Blocks one request may ever be promised (the pool less the reserve)."""
        return self.pool(key).num_total - self.reserve(key)

    def blocks_needed(self, prompt_len: int, suffix_len: int, params, *, ar_only: bool = False,
                      max_tokens: int | None = None) -> int:
        """Most blocks a request can hold: its text plus one ReFusion pool of tentative tokens (none
        for a request pinned to AR, whose only tentative token is the dropped first-step mask). ReFusion
        writes whole slots. A request pinned to AR writes one token a forward and stops at `max_tokens`
        (GenerationRequest.max_tokens), so its text counts that many, not gen_length: the ingress rounds
        gen_length up to split into blocks (openai_sampling.fitting_blocks), and the max_tokens a KV
        refusal named was refused again for the rounding (helper-154: "ask for at most 496", then 496
        was refused as 512); nor whole slots (helper-188: max_tokens 1 beside a 170-token prompt in a
        176-token cache was refused as 8, and an unset max_tokens got 6 tokens)."""
        gen = int(params.gen_length)
        slot = int(getattr(params, "slot_size", 1) or 1)
        gen = math.ceil(gen / slot) * slot
        if ar_only and max_tokens:
            gen = min(gen, max_tokens)
        pool = 0 if ar_only else math.ceil(gen / max(1, int(getattr(params, "serial_num_blocks", 1) or 1)))
        return math.ceil((prompt_len + suffix_len + gen + pool) / self.pool("main").block_size) + 1

    def runner_for(self, req: Request, ar: bool) -> str:
        """The runner a request runs on once routed: "ar" (the separate AR model, when there is one) for
        an AR route whose KV estimate (`Request.kv_blocks`, what starting it waits for in either pool)
        fits that model's pool, else "main" (whose weights run AR too). A request too long for the AR
        pool waited for it forever (nothing ever frees enough blocks there); it now runs AR on the
        main model, whose pool admission sized it for (Scheduler.add)."""
        return "ar" if ar and "ar" in self.tables and req.kv_blocks <= self.capacity("ar") else "main"

    def available(self, running: list[Request], key: str = "main") -> int:
        """Free blocks not yet promised to running requests, less the reserve."""
        tables = self.tables[key]
        promised = sum(max(0, r.kv_blocks - len(tables.table(r.id))) for r in running if r.runner_key == key)
        return tables.pool.num_free - promised - self.reserve(key)

    def start(self, req: Request, key: str, hit: PrefixHit, count: bool = True) -> None:
        """A request starts on `key`: a prefix-cache hit becomes the first blocks of its table. count:
        the lookup counts in the hit rate (not a preempted request's rerun: scheduler._try_start)."""
        if hit.block_ids:
            self.tables[key].adopt_prefix(req.id, hit.block_ids, hit.num_tokens)
        if key == "main" and self.prefix_cache is not None and not req.scores_prompt:
            # The server's own requests use a hit but are not counted in the hit rate (an idle server's
            # health probes would drag it towards 0); touching the blocks keeps them warm as for any use.
            self.prefix_cache.record(req.spec.prompt_ids, hit, count=count and not req.spec.internal)

    def shortfall(self, req: Request, segment: Segment) -> int:
        """Roll the sequence back to the segment's context_len; return the blocks its kept tokens still
        lack beyond the free ones (0: it fits now)."""
        tables = self.tables[req.runner_key]
        tables.truncate(req.id, segment.context_len)
        return max(0, tables.blocks_needed(req.id, segment.num_kept) - tables.pool.num_free)

    def grow(self, req: Request, segment: Segment) -> list[int]:
        """Allocate the segment's kept tokens (after `shortfall` returned 0); its block table."""
        tables = self.tables[req.runner_key]
        tables.grow(req.id, segment.num_kept)
        return tables.table(req.id)

    def evict_prefix_cache(self, blocks: int, key: str, protect: set[int] | None = None) -> None:
        if key == "main" and self.prefix_cache is not None and blocks > 0:
            self.prefix_cache.evict(blocks, protect=protect)

    def free(self, req: Request) -> None:
        """Release every block of the request's sequence. Idempotent."""
        self.tables[req.runner_key].free(req.id)

    def cached_len(self, req: Request) -> int:
        return self.tables[req.runner_key].length(req.id)

    def share_prompt_blocks(self, req: Request) -> None:
        """Offer the prompt's newly computed full blocks to the prefix cache (while prefill advances).
        Computed: absorbed by the decoder (its `cache_len`), not only allocated. Under asynchronous
        scheduling the table already holds the blocks of the chunk planned ahead, which a failed step may
        never compute; offered, a later request with the same prompt would read them."""
        cache = self.prefix_cache
        if cache is None or req.runner_key != "main":
            return
        tables = self.tables["main"]
        full_blocks = len(req.spec.prompt_ids) // cache.block_size
        cached_len = min(tables.length(req.id), req.decoder.cache_len)
        if req.prompt_blocks_shared < full_blocks and cached_len // cache.block_size > req.prompt_blocks_shared:
            req.prompt_blocks_shared = cache.insert(req.spec.prompt_ids, tables.table(req.id), cached_len)

    def prefill_in_flight(self, req: Request, hit: PrefixHit, running: list[Request], min_blocks: int) -> Request | None:
        """A running request still prefilling a prompt that shares at least `min_blocks` (> 0) more full
        blocks with `req`'s than the cache holds (`hit`), or None. Started now, `req` would compute those
        blocks a second time in parallel; started once they are cached, it reads them (SGLang's in-batch
        prefix caching: `n` choices, an editor's gap candidates, a chat's retries share whole prompts).
        Only a request of the same or a higher priority class that ran last step qualifies, so the wait
        is never on a prefill that is itself held back (an INTERACTIVE request never waits on a BATCH one
        that the interactive load starves)."""
        cache = self.prefix_cache
        if cache is None or min_blocks <= 0:
            return None
        have = len(hit.block_ids)
        names = cache.block_names(req.spec.prompt_ids)[: (len(req.spec.prompt_ids) - 1) // cache.block_size]
        if len(names) - have < min_blocks:
            return None
        for other in running:
            if other.runner_key != "main" or other.prompt_blocks_shared >= len(other.spec.prompt_ids) // cache.block_size:
                continue  # another runner's, or its full prompt blocks are in the cache already
            if other.priority > req.priority or other.skipped:
                continue  # a lower class, or passed over last step: its prefill may not advance, so never wait on it
            theirs = cache.block_names(other.spec.prompt_ids)
            common = have  # chained names: equal at a depth means equal up to it
            while common < min(len(names), len(theirs)) and names[common] == theirs[common]:
                common += 1
            if common - have >= min_blocks:
                return other
        return None

    def sequences(self) -> list[str]:
        """Every sequence holding blocks on any runner (empty when the engine is idle)."""
        return [seq for tables in self.tables.values() for seq in tables.seq_ids()]
