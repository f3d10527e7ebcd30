"""One step's segments and block tables packed into one int64 host buffer (numpy, no torch).

Everything the device needs for a step lives in one flat int64 array, copied to the device in one
transfer; the step function slices views out of it (`StepLayout.offsets`). Float parameters
(temperature, top_p) are stored bit-cast as float64 inside the same buffer, so one buffer and one copy
serve every dtype.

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
                     `attention_groups`): the sequence indices, group after group (padding sequences
                     in the last)
Padding tokens are token 0 at position 0 of sequence 0 writing the scratch slot; padding read rows read
row 0 greedily. Their outputs are never returned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from workers.batch import Segment
from workers.validation import SegmentError, as_int64

# Bucket minimums: small steps share a few buckets (every decode step of up to 16 requests has T = 16),
# which bounds how many graphs a capture per bucket needs; Q starts at 1 so decode attention stays [B, 1].
MIN_TOKENS, MIN_SEQS, MIN_QUERY, MIN_BLOCKS, MIN_READS = 16, 4, 1, 4, 8
KINDS = np.array([0, 1, 2, 3])  # argmax, prob, sample, logits-only: the order of a segment's read rows

TOKEN_FIELDS = ("token_ids", "positions", "slot_mapping", "seq_index", "query_index", "branch_start")
SEQ_FIELDS = ("query_start", "query_len", "context_len")
READ_FIELDS = ("read_rows", "temperature", "top_k", "top_p", "min_p", "gumbel", "sample", "given", "seed", "step",
               "read_position")
FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "bias_values", "bias_penalty"})
MIN_BIAS = 8  # bias pairs per row: buckets of powers of two from 8 (a few graph layouts, whatever the count)


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
    # field; () = one group of every sequence at [B, Q, NB] (`attention_groups`)
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


SEG_INT_FIELDS = ("n", "ctx", "kept", "table_len", "top_k", "seed", "step", "gumbel",
                  "n_argmax", "n_prob", "n_sample", "n_logits")


def _per_segment(segments: list[Segment], tables: list[list[int]], ids: list[str]) -> dict[str, np.ndarray]:
    """Per-segment scalars as arrays [n_seg] (one pass over the segments, no loop over tokens)."""
    if len(set(ids)) < len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SegmentError(dup, "seq_id", "appears twice in one step; send one segment per sequence")
    rows = [(len(g.token_ids), g.context_len, g.num_kept, len(t), g.sampling.top_k, g.sampling.seed,
             g.sampling.step, g.sampling.gumbel, len(g.reads.argmax), len(g.reads.prob), len(g.reads.sample),
             len(g.reads.logits)) for g, t in zip(segments, tables)]
    try:
        ints = np.array(rows, dtype=np.int64).reshape(len(rows), len(SEG_INT_FIELDS))
    except (OverflowError, TypeError, ValueError):
        for k, name in enumerate(SEG_INT_FIELDS):  # locate the value that does not fit (raises)
            as_int64([r[k] for r in rows], name, ids)
        raise
    floats = np.array([(g.sampling.temperature, g.sampling.top_p, g.sampling.min_p) for g in segments],
                      dtype=np.float64).reshape(len(segments), 3)
    seg = {name: ints[:, k] for k, name in enumerate(SEG_INT_FIELDS)}
    seg.update(temperature=floats[:, 0], top_p=floats[:, 1], min_p=floats[:, 2], gumbel=ints[:, 7] != 0)
    return seg


def _flat(lists: list, count: int, field: str, ids: list[str], owner: np.ndarray) -> np.ndarray:
    """The concatenation of `lists` (a list of int sequences) as int64 [count]; a value outside int64
    raises SegmentError naming its segment."""
    try:
        return np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=count)
    except (OverflowError, TypeError, ValueError):
        return as_int64(list(chain.from_iterable(lists)), field, ids, owner)


def pack_step(segments: list[Segment], tables: list[list[int]], block_size: int, scratch_block: int,
              pad: bool = True, group_attention: bool = False) -> PackedStep:
    """Pack a step. Raises SegmentError for a value that does not fit int64 or a repeated seq_id; range
    checks against the model are `workers.validation.validate_step`'s. pad: shapes padded to buckets
    (what CUDA graphs and compiled layers key on); False: exact shapes (at least 1), for an eager step
    on the CPU, where every padding row is computed (a 1-token step ran 16 rows through each layer).
    group_attention: split a step whose query lengths differ widely into attention groups
    (`attention_groups`; for workers.attention.StepAttention, which pads every sequence to the step's
    longest query and context)."""
    if len(tables) != len(segments):
        raise ValueError(f"{len(segments)} segments but {len(tables)} block tables; give one table per segment")
    ids = [g.seq_id for g in segments]
    seg = _per_segment(segments, tables, ids)
    counts = np.stack([seg["n_argmax"], seg["n_prob"], seg["n_sample"], seg["n_logits"]], axis=1)  # [n_seg, 4]
    index = np.arange(len(segments))
    tok_owner = np.repeat(index, seg["n"])
    t = len(tok_owner)
    tokens = _flat([g.token_ids for g in segments], t, "token_ids", ids, tok_owner)
    positions = _flat([g.positions for g in segments], t, "positions", ids, tok_owner)
    flat_tables = _flat(tables, int(seg["table_len"].sum()), "block_table", ids, np.repeat(index, seg["table_len"]))
    run_lens = np.fromiter(chain.from_iterable(g.branch_lens or (len(g.token_ids),) for g in segments), np.int64)
    n_reads = counts.sum(1)
    read_owner = np.repeat(index, n_reads)
    rows = np.fromiter(chain.from_iterable(g.reads.argmax + g.reads.prob + g.reads.sample + g.reads.logits
                                           for g in segments), dtype=np.int64, count=len(read_owner))
    prob_tokens = _flat([g.reads.prob_tokens for g in segments], int(counts[:, 1].sum()), "prob_tokens", ids,
                        np.repeat(index, counts[:, 1]))
    kinds = np.repeat(np.tile(KINDS, len(segments)), counts.ravel())
    masks = [g.token_bitmask for g in segments]
    mask_words = max(-(-len(m) // 8) for m in masks if m is not None) if any(m is not None for m in masks) else 0
    layout = _layout(seg, kinds, read_owner, block_size, mask_words if len(kinds) else 0, pad)
    if len(kinds) and any(g.logprobs is not None and len(g.reads) for g in segments):
        layout = dataclasses.replace(layout, logprobs=True,
                                     ranks=any(g.ranks and g.logprobs is not None and len(g.reads) for g in segments))
    widest_bias = max((len(g.logit_bias) + (g.feedback_penalty is not None) for g in segments
                       if g.reads.argmax or g.reads.sample), default=0)
    if len(kinds) and widest_bias:
        layout = dataclasses.replace(layout, bias_width=bucket(widest_bias, MIN_BIAS))
    groups, group_order = attention_groups(seg["n"], -(-seg["ctx"] // block_size), layout, pad) if group_attention \
        else ((), None)
    if groups:
        layout = dataclasses.replace(layout, attention_groups=groups)
    deferred = [i for i, g in enumerate(segments) if g.deferred_mask]
    if deferred and len(kinds):
        chosen = np.flatnonzero(np.isin(read_owner, deferred) & ((kinds == 0) | (kinds == 2)))
        layout = dataclasses.replace(layout, deferred_reads=bucket(len(chosen), 1) if pad else len(chosen))
    step = PackedStep(layout, np.zeros(layout.size, dtype=np.int64), t, len(rows),
                      np.concatenate(([0], np.cumsum(n_reads))), counts[:, :3].sum(1), counts[:, 3], seg,
                      np.append(flat_tables, scratch_block), kinds, read_owner)
    if layout.deferred_reads:
        step.deferred = chosen
        step.view("deferred_rows")[:len(chosen)] = chosen  # (padding: row 0, whose kept logits go unread)
    if groups:
        step.view("group_seqs")[:] = group_order
    q_start = _fill_tokens(step, tokens, positions, run_lens, scratch_block)
    _fill_sequences(step, q_start, scratch_block)
    _fill_reads(step, q_start, rows, kinds, read_owner, prob_tokens)
    if layout.mask_words:
        step.token_bitmasks = masks
        _fill_bitmask(step, masks, kinds, read_owner)
    if layout.bias_width:
        _fill_bias(step, segments, kinds, read_owner, ids)
    return step


MAX_GROUPS = 3  # attention groups per step (each is one more attention call per layer)
GROUP_SPLIT = 4  # a sequence starts a new group when its query is this many times shorter than the group's
GROUP_GAIN = 2  # groups are used only when they cut the attention's padded work at least this many times
GROUP_MIN_PAIRS = 1 << 16  # and only in steps whose padded work is this many query-key pairs or more (in a
# smaller step each group's few more kernels per layer would cost a GPU more than the work they save)


def attention_groups(n: np.ndarray, ctx_blocks: np.ndarray, layout: StepLayout,
                     pad: bool) -> tuple[tuple[tuple[int, int, int], ...], np.ndarray | None]:
    """The step's attention groups and the sequence order they take (see StepLayout.attention_groups).

    n, ctx_blocks [n_seg]: each sequence's query length and context blocks. The portable attention pads
    every sequence to the step's longest query Q and context C = NB * block_size, so one 434-token
    prompt chunk beside 63 one-token decode steps did 64 x 434 query rows of work over the longest
    context instead of 434 + 63 (6.0 s for that step on the CPU instead of 0.14 s: docs/benchmarks.md).
    Sequences sorted by query length, longest first, join the current group unless their query is
    GROUP_SPLIT times shorter than its (then they open the next, at most MAX_GROUPS); each group is
    padded to its own longest query and context (bucketed as the layout is when `pad`); padding
    sequences join the last. Returns ((), None), one group of all, unless the step's padded work
    (B x Q x (NB * block_size + Q) query-key pairs per head) is at least GROUP_MIN_PAIRS and the
    groups' (count x Qg x (NBg * block_size + Qg) summed) GROUP_GAIN times smaller."""
    bs = layout.block_size
    whole = layout.num_seqs * layout.max_query * (layout.max_blocks * bs + layout.max_query)
    if whole < GROUP_MIN_PAIRS:
        return (), None
    size = bucket if pad else (lambda count, minimum: max(count, 1))
    if size(int(n.min()), MIN_QUERY) * GROUP_SPLIT > size(int(n.max()), MIN_QUERY):
        return (), None  # (no query is GROUP_SPLIT times shorter than another: every decode step of a batch)
    order = np.argsort(-n, kind="stable")
    groups: list[list[int]] = []  # [count, Qg, NBg]
    for seq in order:
        q = size(int(n[seq]), MIN_QUERY)
        if not groups or (len(groups) < MAX_GROUPS and q * GROUP_SPLIT <= groups[-1][1]):
            groups.append([0, q, 0])
        group = groups[-1]
        group[0] += 1
        group[2] = max(group[2], size(int(ctx_blocks[seq]), MIN_BLOCKS))
    if len(groups) < 2:
        return (), None
    padding = layout.num_seqs - len(n)
    groups[-1][0] += padding
    grouped = sum(count * q * (nb * bs + q) for count, q, nb in groups)
    if grouped * GROUP_GAIN > whole:
        return (), None
    return tuple(tuple(g) for g in groups), np.concatenate((order, np.arange(len(n), len(n) + padding)))


def _layout(seg: dict, kinds: np.ndarray, read_owner: np.ndarray, block_size: int, mask_words: int,
            pad: bool = True) -> StepLayout:
    n, ctx = seg["n"], seg["ctx"]
    size = bucket if pad else (lambda count, minimum: max(count, 1))
    sample = (kinds == 2) & (seg["temperature"][read_owner] > 0)
    gumbel = (kinds == 0) & seg["gumbel"][read_owner] & (seg["temperature"][read_owner] > 0)
    sort = (sample | gumbel) & ((seg["top_k"][read_owner] > 0) | (seg["top_p"][read_owner] < 1)
                                | (seg["min_p"][read_owner] > 0))
    max_ctx_blocks = int(-(-ctx.max() // block_size)) if len(ctx) else 0
    return StepLayout(
        num_tokens=size(int(n.sum()), MIN_TOKENS), num_seqs=size(len(n), MIN_SEQS),
        max_query=size(int(n.max()), MIN_QUERY), max_blocks=size(max_ctx_blocks, MIN_BLOCKS),
        num_reads=size(len(kinds), MIN_READS) if len(kinds) else 0, block_size=block_size,
        needs_noise=bool((sample | gumbel).any()), needs_sort=bool(sort.any()), mask_words=mask_words,
    )


def _fill_tokens(step: PackedStep, tokens, positions, run_lens, scratch_block: int) -> np.ndarray:
    """Per-token fields; returns each segment's first packed row [n_seg]."""
    seg, t, bs = step.seg, step.num_tokens, step.layout.block_size
    q_start = np.cumsum(seg["n"]) - seg["n"]
    seq_index = np.repeat(np.arange(len(seg["n"])), seg["n"])  # [t]
    query_index = np.arange(t) - q_start[seq_index]
    run_start = np.repeat(np.cumsum(run_lens) - run_lens, run_lens)  # packed row where each token's run starts
    kept = query_index < seg["kept"][seq_index]
    p = seg["ctx"][seq_index] + query_index  # cache position of a kept token
    table_start = np.cumsum(seg["table_len"]) - seg["table_len"]
    entry = np.where(kept, table_start[seq_index] + p // bs, len(step.tables_flat) - 1)
    entry = np.minimum(entry, len(step.tables_flat) - 1)  # a too-short table is validate_step's to report
    slots = np.where(kept, step.tables_flat[entry] * bs + p % bs, scratch_block * bs)
    for name, values in (("token_ids", tokens), ("positions", positions), ("slot_mapping", slots),
                         ("seq_index", seq_index), ("query_index", query_index),
                         ("branch_start", run_start - q_start[seq_index])):
        step.view(name)[:t] = values
    step.view("slot_mapping")[t:] = scratch_block * bs
    return q_start


def _fill_sequences(step: PackedStep, q_start: np.ndarray, scratch_block: int) -> None:
    seg, lay = step.seg, step.layout
    b = len(seg["n"])
    step.view("query_start")[:b] = q_start
    step.view("query_len")[:b] = seg["n"]
    step.view("context_len")[:b] = seg["ctx"]
    tables = step.view("block_tables").reshape(lay.num_seqs, lay.max_blocks)
    tables[:] = scratch_block
    cols = np.minimum(seg["table_len"], lay.max_blocks)  # [b] columns copied per sequence
    owner = np.repeat(np.arange(b), cols)
    col = np.arange(int(cols.sum())) - np.repeat(np.cumsum(cols) - cols, cols)
    table_start = np.cumsum(seg["table_len"]) - seg["table_len"]
    tables[owner, col] = step.tables_flat[table_start[owner] + col]


def _fill_reads(step: PackedStep, q_start, rows, kinds, owner, prob_tokens) -> None:
    seg, r = step.seg, step.num_reads
    temperature = seg["temperature"][owner]
    sample = (kinds == 2) & (temperature > 0)
    gumbel = (kinds == 0) & seg["gumbel"][owner] & (temperature > 0)
    drawn = sample | gumbel  # (rows that draw: top-k / top-p / min-p restrict what they may draw)
    given = np.full(r, -1, dtype=np.int64)
    given[kinds == 1] = prob_tokens
    values = {
        "read_rows": q_start[owner] + rows, "temperature": temperature,
        "top_k": np.where(drawn, seg["top_k"][owner], 0), "top_p": np.where(drawn, seg["top_p"][owner], 1.0),
        "min_p": np.where(drawn, seg["min_p"][owner], 0.0),
        "gumbel": gumbel, "sample": sample, "given": given,
        "seed": seg["seed"][owner], "step": seg["step"][owner],
    }
    for name, value in values.items():
        step.view(name)[:r] = value
    step.view("read_position")[:r] = step.view("positions")[values["read_rows"]]
    if step.layout.num_reads:
        step.view("given")[r:] = -1
        step.view("top_p")[r:] = 1.0


def _fill_bias(step: PackedStep, segments: list[Segment], kinds: np.ndarray, owner: np.ndarray,
               ids: list[str]) -> None:
    """Each argmax and sample row's (token, bias) pairs: its segment's, padded with (0, 0.0) (adds
    nothing); prob and logits-only rows get none. In steps with a Segment.feedback_penalty also each
    pair's kind (1, or 2 for the pairs after that penalty's `unseen` first ones; padding 0) and each
    row's fed-back token's (presence, frequency) penalties."""
    w, r = step.layout.bias_width, step.num_reads
    tokens = np.zeros((len(segments), w), dtype=np.int64)
    values = np.zeros((len(segments), w), dtype=np.float64)
    pair_kinds = penalties = None
    for i, g in enumerate(segments):
        pairs, penalty = g.logit_bias, g.feedback_penalty
        if pairs:
            try:
                tokens[i, :len(pairs)] = [t for t, _ in pairs]
                values[i, :len(pairs)] = [v for _, v in pairs]
            except (OverflowError, TypeError, ValueError):
                raise SegmentError(ids[i], "logit_bias", "must be (token id, finite number) pairs") from None
        if penalty is not None:
            if pair_kinds is None:
                pair_kinds, penalties = np.zeros((len(segments), w), dtype=np.int64), np.zeros((len(segments), 2))
            try:
                unseen = min(max(int(penalty.unseen), 0), len(pairs))
                penalties[i] = (penalty.presence, penalty.frequency)
            except (TypeError, ValueError):
                raise SegmentError(ids[i], "feedback_penalty", "presence and frequency must be numbers and unseen "
                                   "an integer") from None
            pair_kinds[i, :unseen], pair_kinds[i, unseen:len(pairs)] = 1, 2
    chosen = (kinds == 0) | (kinds == 2)
    tables = [("bias_ids", tokens, 0), ("bias_values", values, 0.0)]
    if pair_kinds is not None:
        step.feedback_penalty = True
        tables += [("bias_kind", pair_kinds, 0)]
        step.view("bias_penalty").reshape(step.layout.num_reads, 2)[:r] = np.where(chosen[:, None], penalties[owner], 0.0)
    for name, table, pad in tables:
        step.view(name).reshape(step.layout.num_reads, w)[:r] = np.where(chosen[:, None], table[owner], pad)


def bitmask_words(mask: bytes, words: int) -> np.ndarray:
    """A token bitmask (Segment.token_bitmask: byte t // 8, bit t % 8) as `words` little-endian int64
    words [words], cut or zero-padded to that width (the step's token_bitmask rows)."""
    return np.frombuffer(mask[: words * 8].ljust(words * 8, b"\0"), dtype="<i8")


def _fill_bitmask(step: PackedStep, masks: list[bytes | None], kinds: np.ndarray, owner: np.ndarray) -> None:
    """Each read row's token bitmask: its segment's (argmax and sample rows of constrained segments,
    zero-padded to W words), else all bits set."""
    w = step.layout.mask_words
    table = np.full((len(masks), w), -1, dtype=np.int64)  # one row per segment
    for i, mask in enumerate(masks):
        if mask is not None:
            table[i] = bitmask_words(mask, w)
    rows = table[owner]  # [num_reads, W]
    rows[(kinds == 1) | (kinds == 3)] = -1  # prob rows read a given token; logits-only rows are raw
    step.view("token_bitmask").reshape(step.layout.num_reads, w)[: step.num_reads] = rows
    step.view("token_bitmask")[step.num_reads * w:] = -1
