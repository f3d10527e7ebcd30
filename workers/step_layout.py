"""The packed step's format: bucketed shapes (`StepLayout`, the CUDA-graph key), where each field sits
in the one int64 host buffer, and the host-side `PackedStep` with its views (numpy, no torch).

Everything the device needs for a step lives in one flat int64 array, copied to the device in one
transfer; the step function slices views out of it (`StepLayout.offsets`). Float parameters
(temperature, top_p) are stored bit-cast as float64 inside the same buffer, so one buffer and one copy
serve every dtype. `workers.packing.pack_step` fills it.

Shapes are padded to buckets (`bucket`): tokens T, sequences B, max query length Q, context blocks per
sequence NB and read rows R are powers of two with a minimum, and the host flags (needs_noise,
needs_sort, logprobs) switch optional read stages. `StepLayout` is therefore the key under which a later issue
can capture one CUDA graph per bucket.

Fields (one row per entry; "row" = packed token index):
    per token [T]    token_ids, positions, slot_mapping (kept rows: their cache slot
                     table[p // bs] * bs + p % bs for p = context_len + i; dropped rows and padding: the
                     scratch slot), seq_index, query_index, branch_start (query index where the token's
                     run starts; 0 for plain causal)
    per sequence [B] query_start, query_len, context_len (padding sequences: 0, 0, 0)
    block_tables     [B, NB] the first NB blocks of each table, padded with the scratch block
    per read [R]     read_rows, temperature (f64 bits), top_k, top_p, min_p (f64 bits), gumbel, sample, given
                     (prob rows: the token, else -1), seed, step, read_position (the row's logical
                     position: with seed and step it keys the row's random draws)
    token_bitmask    [R, W] only in steps with a grammar-constrained segment (W = layout.mask_words > 0):
                     each read row's allowed tokens as W little-endian int64 words of bits
                     (Segment.token_bitmask); unconstrained and prob rows: all bits set
    bias_ids, bias_values, bias_kind [R, L], bias_penalty [R, 2]
                     only in steps with a logit bias (L = layout.bias_width > 0): each argmax and sample
                     row's (token, bias) pairs (Segment.logit_bias, f64 bits); in steps with a
                     Segment.feedback_penalty (else zeros) each pair's kind (0 padding, 1 a bias, 2 the
                     penalty of a generated token) and the row's (presence, frequency) penalties of its
                     fed-back token (f64 bits; 0 without). Such a row's pair after its own is where the
                     runner puts that token's penalty (ModelRunner.launch); the step function reads ids
                     and values only
    deferred_rows    [D] only in steps with a Segment.deferred_mask (D = layout.deferred_reads > 0): the
                     read rows (indices into R) of those segments' argmax and sample rows, whose logits
                     the step keeps for the reads ModelRunner.finish_reads makes once their bitmasks are
                     known; padding: row 0
    group_seqs       [B] only in steps split into attention groups (layout.attention_groups non-empty:
                     workers.attention_groups): the sequence indices, group after group (padding sequences
                     in the last)
Padding tokens are token 0 at position 0 of sequence 0 writing the scratch slot; padding read rows read
row 0 greedily. Their outputs are never returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Bucket minimums: small steps share a few buckets (every decode step of up to 16 requests has T = 16),
# which bounds how many graphs a capture per bucket needs; Q starts at 1 so decode attention stays [B, 1].
MIN_TOKENS, MIN_SEQS, MIN_QUERY, MIN_BLOCKS, MIN_READS = 16, 4, 1, 4, 8

TOKEN_FIELDS = ("token_ids", "positions", "slot_mapping", "seq_index", "query_index", "branch_start")
SEQ_FIELDS = ("query_start", "query_len", "context_len")
READ_FIELDS = ("read_rows", "temperature", "top_k", "top_p", "min_p", "gumbel", "sample", "given", "seed", "step",
               "read_position")
FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "bias_values", "bias_penalty"})


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= n, at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class StepLayout:
    """Static shape of one packed step (the CUDA-graph key) and where each field sits in the buffer."""

    num_tokens: int  # T
    num_seqs: int  # B
    max_query: int  # Q
    max_blocks: int  # NB: context blocks gathered per sequence
    num_reads: int  # R (0 when no segment reads anything: the LM head is skipped)
    block_size: int
    needs_noise: bool  # some row draws Gumbel noise (gumbel argmax or sample with temperature > 0)
    needs_sort: bool  # some drawing row (sample, or a Gumbel-max draft) uses top-k, top-p or min-p
    mask_words: int = 0  # int64 words of token bitmask per read row (0: no segment is constrained)
    logprobs: bool = False  # some segment asks for log probabilities: reads add MAX_TOP_LOGPROBS alternatives
    ranks: bool = False  # some segment with logprobs asks for ranks (Segment.ranks): reads fill the rank row
    bias_width: int = 0  # (token, bias) pairs per read row (0: no segment has Segment.logit_bias)
    deferred_reads: int = 0  # D: read rows whose logits the step keeps for reads made later (Segment.deferred_mask)
    # Attention groups ((count, Qg, NBg), ...): the step's sequences in groups of similar query length,
    # each attended at its own shapes (workers.attention.StepAttention), in the order of the group_seqs
    # field; () = one group of every sequence at [B, Q, NB] (workers.attention_groups)
    attention_groups: tuple[tuple[int, int, int], ...] = ()

    def sizes(self) -> list[tuple[str, int]]:
        t, b, r = self.num_tokens, self.num_seqs, self.num_reads
        return ([(f, t) for f in TOKEN_FIELDS] + [(f, b) for f in SEQ_FIELDS]
                + [("block_tables", b * self.max_blocks)] + [(f, r) for f in READ_FIELDS]
                + [("token_bitmask", r * self.mask_words)]
                + [("bias_ids", r * self.bias_width), ("bias_values", r * self.bias_width),
                   ("bias_kind", r * self.bias_width), ("bias_penalty", r * 2 * (self.bias_width > 0)),
                   ("deferred_rows", self.deferred_reads), ("group_seqs", b * bool(self.attention_groups))])

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Field -> (start, end) in the buffer."""
        out, at = {}, 0
        for name, size in self.sizes():
            out[name] = (at, at + size)
            at += size
        return out

    @property
    def size(self) -> int:
        return sum(size for _, size in self.sizes())


@dataclass
class PackedStep:
    """The host side of one step: the buffer plus what validation and unpacking need."""

    layout: StepLayout
    buffer: np.ndarray  # [layout.size] int64
    num_tokens: int  # real tokens (<= T)
    num_reads: int  # real read rows (<= R)
    read_starts: np.ndarray  # [n_seg + 1] first read row of each segment
    num_token_reads: np.ndarray  # [n_seg] len(seg.reads): rows with a token and a probability
    num_logit_reads: np.ndarray  # [n_seg] len(seg.reads.logits)
    seg: dict[str, np.ndarray]  # per-segment arrays (context_len, num_kept, table_len, sampling ...)
    tables_flat: np.ndarray  # every table's blocks, concatenated, then the scratch block
    read_kinds: np.ndarray  # [num_reads] 0 argmax, 1 prob, 2 sample, 3 logits only
    read_owner: np.ndarray  # [num_reads] segment index of each read row
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # layout.offsets(), computed once
    token_bitmasks: list = field(default_factory=list)  # [n_seg] Segment.token_bitmask (validation)
    feedback_penalty: bool = False  # some segment has Segment.feedback_penalty (the runner resolves it)
    deferred: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [d] read rows, deferred

    def __post_init__(self) -> None:
        self.offsets = self.layout.offsets()

    def view(self, name: str) -> np.ndarray:
        start, end = self.offsets[name]
        arr = self.buffer[start:end]
        return arr.view(np.float64) if name in FLOAT_FIELDS else arr

    @property
    def wants_logits(self) -> bool:
        return bool(self.num_logit_reads.any())

