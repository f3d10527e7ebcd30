"""Block accounting for the paged KV cache. Plain Python (no torch): the scheduler can use it anywhere.

Whoever schedules a sequence owns its blocks (workers/batch.py, "Who owns what"): the engine's
scheduler, or a `workers.session.RunnerSession`. `BlockTables.prepare` readies a step's segments
(truncate to context_len, allocate room for the kept tokens, all or nothing) and returns the block
tables the runner writes through.

A `BlockPool` hands out fixed-size blocks and counts references: a sequence's block table holds one
reference per block, and a prefix cache holds more with `retain`. A block goes back to the free list
when its last reference is released. Blocks with more than one reference are shared and read-only:
`BlockTables` refuses to write into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BLOCK_SIZE = 16  # tokens per KV block: the runner's default (ModelRunner's block_size)
FLEX_BLOCK_SIZES = "a power of two of at least 16 (16, 32, 64, 128)"


def flex_tileable(block_size: int) -> bool:
    """Whether compiled flex attention (CUDA) can tile KV blocks of `block_size` tokens: its KV tile is
    the block or divides it (workers.attention_flex, BLOCK_N), and Triton's tiles are powers of two of
    at least 16 (tl.arange, tl.dot): FLEX_BLOCK_SIZES."""
    return block_size >= 16 and not block_size & (block_size - 1)


class KVCacheFullError(RuntimeError):
    """Not enough free KV blocks for the request; free sequences or give the runner more blocks."""

    def __init__(self, needed: int, free: int):
        super().__init__(f"need {needed} free KV blocks, only {free} free; finish or cancel sequences, "
                         "or raise num_blocks / kv_memory_bytes")
        self.needed, self.free = needed, free


class SharedBlockWriteError(RuntimeError):
    """A write would land in a block that is shared (refcount > 1), which must stay read-only."""


class BlockPool:
    """Fixed pool of `num_total` blocks of `block_size` tokens, reference-counted."""

    def __init__(self, num_total: int, block_size: int):
        if num_total <= 0 or block_size <= 0:
            raise ValueError(f"num_total and block_size must be positive, got {num_total}, {block_size}")
        self.num_total = num_total
        self.block_size = block_size
        self._refcount = [0] * num_total
        self._free = list(range(num_total - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcount[self._check(block_id)]

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, each with refcount 1. Raises KVCacheFullError (taking nothing) if short."""
        if n > len(self._free):
            raise KVCacheFullError(n, len(self._free))
        ids = [self._free.pop() for _ in range(n)]
        for b in ids:
            self._refcount[b] = 1
        return ids

    def retain(self, block_ids: list[int]) -> None:
        """One more reference to each (allocated) block, e.g. a prefix cache keeping it alive."""
        for b in block_ids:
            if self._refcount[self._check(b)] == 0:
                raise ValueError(f"block {b} is free; only allocated blocks can be retained")
        for b in block_ids:
            self._refcount[b] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        for b in block_ids:
            if self._refcount[self._check(b)] == 0:
                raise ValueError(f"block {b} is already free; release only what you retained")
        for b in block_ids:
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def _check(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_total:
            raise ValueError(f"block id {block_id} outside 0..{self.num_total - 1}")
        return block_id


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens cached


class BlockTables:
    """Per-sequence block tables over one pool: growth, truncation, shared prefixes, exact freeing."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self._seqs: dict[str, _Sequence] = {}

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list[str]:
        return list(self._seqs)

    def length(self, seq_id: str) -> int:
        seq = self._seqs.get(seq_id)
        return seq.length if seq else 0

    def table(self, seq_id: str) -> list[int]:
        seq = self._seqs.get(seq_id)
        return list(seq.blocks) if seq else []

    def adopt_prefix(self, seq_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Start `seq_id` on shared full blocks holding `num_tokens` tokens (one more reference each)."""
        if seq_id in self._seqs and self._seqs[seq_id].length > 0:
            raise ValueError(f"sequence {seq_id} already has cached tokens; adopt a prefix only on a new one")
        if num_tokens != len(block_ids) * self.pool.block_size:
            raise ValueError(f"num_tokens {num_tokens} must equal len(block_ids) * block_size "
                             f"({len(block_ids)} * {self.pool.block_size}): shared prefix blocks are full")
        self.pool.retain(block_ids)
        self.free(seq_id)
        self._seqs[seq_id] = _Sequence(list(block_ids), num_tokens)

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Keep the first num_tokens tokens; release blocks that become unused."""
        seq = self._seqs.setdefault(seq_id, _Sequence())
        if num_tokens > seq.length:
            raise ValueError(f"sequence {seq_id}: context_len {num_tokens} exceeds the {seq.length} cached tokens")
        keep_blocks = -(-num_tokens // self.pool.block_size)
        self.pool.release(seq.blocks[keep_blocks:])
        del seq.blocks[keep_blocks:]
        seq.length = num_tokens

    def blocks_needed(self, seq_id: str, num_new: int) -> int:
        """Fresh blocks an append of num_new tokens would allocate."""
        total = -(-(self.length(seq_id) + num_new) // self.pool.block_size)
        return max(0, total - len(self._seqs[seq_id].blocks if seq_id in self._seqs else []))

    def prepare(self, segments) -> list[list[int]]:
        """Ready one step: truncate each segment's sequence to its context_len, then grow it by its
        num_kept tokens. All or nothing: raises KVCacheFullError (and SharedBlockWriteError for a write
        into a shared block) leaving every table as it was after the truncation. Returns each segment's
        block table (covering context_len + num_kept tokens), in segment order."""
        for seg in segments:
            if seg.context_len > self.length(seg.seq_id):
                raise ValueError(f"sequence {seg.seq_id}: context_len {seg.context_len} exceeds the "
                                 f"{self.length(seg.seq_id)} cached tokens; it may only roll back")
        for seg in segments:
            self.truncate(seg.seq_id, seg.context_len)
        needed = sum(self.blocks_needed(seg.seq_id, seg.num_kept) for seg in segments)
        if needed > self.pool.num_free:
            raise KVCacheFullError(needed, self.pool.num_free)
        grown = []
        try:
            for seg in segments:
                self.grow(seg.seq_id, seg.num_kept)
                grown.append(seg)
        except SharedBlockWriteError:
            for seg in grown:
                self.truncate(seg.seq_id, seg.context_len)
            raise
        return [self.table(seg.seq_id) for seg in segments]

    def grow(self, seq_id: str, num_new: int) -> None:
        """Extend the sequence by num_new tokens, allocating blocks as needed (KVCacheFullError if short)."""
        seq = self._seqs.setdefault(seq_id, _Sequence())
        bs = self.pool.block_size
        if num_new and seq.length % bs and self.pool.refcount(seq.blocks[-1]) > 1:
            raise SharedBlockWriteError(
                f"sequence {seq_id}: appending at token {seq.length} would write into shared block "
                f"{seq.blocks[-1]}; shared prefix blocks are read-only (truncate to a block boundary)")
        seq.blocks.extend(self.pool.allocate(self.blocks_needed(seq_id, num_new)))
        seq.length += num_new

    def free(self, seq_id: str) -> None:
        """Release every block of the sequence and forget it. Idempotent."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.release(seq.blocks)
