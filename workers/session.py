"""RunnerSession: a runner plus block tables of its own, the simplest owner of KV (CLI, tests, benches).

The engine's scheduler owns KV blocks itself (scheduler/kv.py); everything else that drives a runner
directly goes through a session, which has the runner's old one-call interface:

    session = RunnerSession(runner)
    [result] = session.execute([segment])     # prepare KV (truncate, allocate) + one packed step
    session.free(seq_id)

A session must be the only owner of the runner's KV while it runs steps: two owners would hand out
the same blocks. Plain Python; the tensors stay behind the runner.
"""

from __future__ import annotations

from workers.batch import Segment, SegmentResult
from workers.kv_blocks import BlockPool, BlockTables


class RunnerSession:
    """Block tables over the runner's KV cache (`runner.info.num_kv_blocks` blocks of `block_size`)."""

    def __init__(self, runner):
        self.runner = runner
        self.info = runner.info
        self.tokenizer = runner.tokenizer
        self.blocks = BlockPool(runner.info.num_kv_blocks, runner.info.block_size)
        self.tables = BlockTables(self.blocks)

    def execute(self, segments: list[Segment]) -> list[SegmentResult]:
        """Prepare KV for the segments and run them as one step. Raises KVCacheFullError (nothing
        allocated), SharedBlockWriteError, or whatever the runner raises; on any error new sequences are
        freed and old ones are left at their segment's context_len."""
        new = [s.seq_id for s in segments if s.seq_id not in self.tables]
        try:
            tables = self.tables.prepare(segments)
            return self.runner.execute(segments, tables)
        except BaseException:
            for seg in segments:
                if seg.seq_id in new:
                    self.tables.free(seg.seq_id)
                elif seg.seq_id in self.tables and self.tables.length(seg.seq_id) > seg.context_len:
                    self.tables.truncate(seg.seq_id, seg.context_len)
            raise

    def free(self, seq_id: str) -> None:
        """Release every block of the sequence (finish or cancel). Idempotent."""
        self.tables.free(seq_id)

    def cached_len(self, seq_id: str) -> int:
        """Tokens in the sequence's cache (0 for unknown ids)."""
        return self.tables.length(seq_id)

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's block ids, in cache order."""
        return self.tables.table(seq_id)

    def adopt_prefix(self, seq_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Start a new sequence on shared full blocks (one more reference each; read-only)."""
        self.tables.adopt_prefix(seq_id, block_ids, num_tokens)

    def sequences(self) -> list[str]:
        """Ids of every sequence holding a block table."""
        return self.tables.seq_ids()

    def free_all(self) -> None:
        """Release every sequence (test teardown)."""
        for seq in self.sequences():
            self.free(seq)
