"""Prefix cache: reuse the committed KV of identical prompt prefixes across requests.

Every full block of prompt tokens is named by a chained hash (hash of the previous block's name and
this block's tokens), so one name fixes the whole prefix up to and including that block. The cache
holds one reference (BlockPool.retain on the scheduler's pool, scheduler/kv.py) to each named block;
a request that hits starts its sequence on the shared blocks (BlockTables.adopt_prefix, refcount +1)
and its decoder skips those prompt tokens (decoder.skip_cached_prompt). At least one prompt token always stays uncached so the request
still runs a forward that reads its prompt's last row.

Only prompt blocks are shareable: ReFusion commits generated slots out of text order, so generated
KV depends on the request's own decoding path. Eviction is LRU; on ties the deeper block goes first,
so a chain is evicted from its tail, and an entry evicted takes the entries below it along (which a
running request may still hold, so LRU order alone could leave them), so a cached block always has
its parent cached. The entries are
kept in eviction order (an OrderedDict; a touch moves a chain to the end, deepest block first), so an
eviction looks only at the entries it drops or skips, not at the whole cache (a GPU's pool holds tens
of thousands of blocks and evictions run on the engine loop).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from array import array

NAMES_MEMO = 512  # prompts whose block names are kept (about the requests running and waiting)


@dataclass
class PrefixHit:
    """The longest cached prefix of a prompt: shared block ids in order and the tokens they hold."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PrefixCache:
    """Chained-hash cache of full prompt blocks over a runner's block pool (see module docstring)."""

    def __init__(self, blocks):
        self._blocks = blocks  # workers.kv_blocks.BlockPool: block_size, num_free, retain, release
        self.block_size: int = blocks.block_size
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # block name -> block id, LRU first
        self._children: dict[bytes, set[bytes]] = {}  # block name -> the cached names one block deeper
        self._parent: dict[bytes, bytes] = {}  # block name -> the name one block shallower (not for depth 0)
        self._names: OrderedDict[bytes, list[bytes]] = OrderedDict()  # hash of the prompt -> its block names (LRU)
        self.lookup_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_blocks(self) -> int:
        """KV blocks the cache holds (one per entry)."""
        return len(self._entries)

    @property
    def evictable_blocks(self) -> int:
        """Cached blocks no running request holds: what `evict` could free now."""
        return self.evictable()

    def evictable(self, protect: set[int] | frozenset = frozenset(), at_most: int | None = None) -> int:
        """Cached blocks `evict` could free now, leaving `protect` (a waiting request's own hit): no
        running request holds them. Counted in eviction order up to `at_most` (None: all), so asking
        whether a few blocks can be had does not scan a cache of tens of thousands."""
        found = 0
        for block_id in self._entries.values():
            if at_most is not None and found >= at_most:
                break
            found += block_id not in protect and self._blocks.refcount(block_id) == 1
        return found

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from the cache."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def block_names(self, prompt_ids: list[int]) -> list[bytes]:
        """Chained hash of every full block of the prompt, in order. Memoized by prompt (a request's
        prompt is looked up at every start attempt, recorded, and inserted after every prefill step; a
        4,096-token prompt costs ~0.2 ms to hash, its memo key ~0.01 ms)."""
        data = array("q", prompt_ids).tobytes()
        key = hashlib.blake2b(data, digest_size=16).digest()  # one C call: small keys, whatever the prompt
        names = self._names.get(key)
        if names is not None:
            self._names.move_to_end(key)
            return names
        names, previous, step = [], b"", self.block_size * 8  # 8 bytes per int64 token
        for start in range(0, len(data) - step + 1, step):
            previous = hashlib.blake2b(previous + data[start : start + step], digest_size=16).digest()
            names.append(previous)
        self._names[key] = names
        if len(self._names) > NAMES_MEMO:
            self._names.popitem(last=False)
        return names

    def lookup(self, prompt_ids: list[int]) -> PrefixHit:
        """The longest cached prefix, leaving at least one prompt token uncached. No side effects:
        call `record(...)` once the request really starts on it."""
        usable = (len(prompt_ids) - 1) // self.block_size
        hit = PrefixHit()
        for name in self.block_names(prompt_ids)[:usable]:
            block_id = self._entries.get(name)
            if block_id is None:
                break
            hit.block_ids.append(block_id)
        hit.num_tokens = len(hit.block_ids) * self.block_size
        return hit

    def record(self, prompt_ids: list[int], hit: PrefixHit, count: bool = True) -> None:
        """Count a lookup in the hit rate (unless `count` is False) and mark the hit's blocks as just used."""
        if count:
            self.lookup_tokens += len(prompt_ids)
            self.hit_tokens += hit.num_tokens
        self._touch(self.block_names(prompt_ids)[: len(hit.block_ids)])

    def insert(self, prompt_ids: list[int], block_table: list[int], cached_len: int) -> int:
        """Name the prompt's full blocks that are computed in a sequence's cache (the first blocks of its
        block table, in prompt order); returns how many full prompt blocks are now cached."""
        names = self.block_names(prompt_ids)
        ready = min(len(names), cached_len // self.block_size, len(block_table))
        for depth in range(ready):
            if names[depth] not in self._entries:
                self._blocks.retain([block_table[depth]])
                self._entries[names[depth]] = block_table[depth]
                if depth:
                    self._children.setdefault(names[depth - 1], set()).add(names[depth])
                    self._parent[names[depth]] = names[depth - 1]
        self._touch(names[:ready])
        return ready

    def evict(self, blocks_wanted: int, protect: set[int] | None = None) -> int:
        """Drop least recently used entries until `blocks_wanted` more blocks are free in the pool (or
        nothing evictable is left). Blocks in `protect` are kept, and so are blocks a running request
        also holds: dropping those would free nothing and only lose the entry. Returns the blocks freed."""
        protect = protect or set()
        victims = []
        for name, block_id in self._entries.items():  # least recently used first
            if len(victims) >= blocks_wanted:
                break
            if block_id not in protect and self._blocks.refcount(block_id) == 1:
                victims.append(name)
        free_before = self._blocks.num_free
        self._blocks.release([self._entries.pop(name) for name in self._with_descendants(victims)])
        return self._blocks.num_free - free_before

    def _with_descendants(self, names: list[bytes]) -> list[bytes]:
        """`names` and every cached entry below them, unlinked from their parents. An entry whose parent
        is gone can never be hit (a lookup stops at the first missing block) and only held its block:
        that happened when two requests computed the same first block at once (the second's deeper
        blocks sat on the first's), and a running request held the deeper ones while the first's went.
        Such an entry goes with its parent; a block a running request holds is freed when it ends."""
        out, seen = list(names), set(names)
        for name in out:  # (grows while walked: each entry's children join the end)
            for child in self._children.pop(name, ()):
                if child not in seen and child in self._entries:
                    seen.add(child)
                    out.append(child)
            parent = self._parent.pop(name, None)
            if parent is not None and (siblings := self._children.get(parent)) is not None:
                siblings.discard(name)
        return out

    def clear(self) -> None:
        """Release every cached block (e.g. at shutdown or before counting leaks)."""
        self._blocks.release(list(self._entries.values()))
        self._entries.clear()
        self._children.clear()
        self._parent.clear()

    def _touch(self, names: list[bytes]) -> None:
        """Mark a chain (prompt order) as just used: it moves to the end of the eviction order, its
        deepest block before its shallower ones, so the chain is evicted tail first."""
        for name in reversed(names):
            self._entries.move_to_end(name)
