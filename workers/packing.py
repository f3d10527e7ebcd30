"""One step's segments and block tables packed into one int64 host buffer (numpy, no torch): `pack_step`.

The buffer's format (bucketed shapes, the fields and what each holds, the views) is
`workers.step_layout`'s; the split of a step into attention groups is `workers.attention_groups`'.
"""

from __future__ import annotations

import dataclasses
from itertools import chain

import numpy as np

from workers.attention_groups import attention_groups
from workers.batch import Segment
from workers.step_layout import (MIN_BLOCKS, MIN_QUERY, MIN_READS, MIN_SEQS, MIN_TOKENS, PackedStep, StepLayout,
                                 bucket)
from workers.validation import SegmentError, as_int64

KINDS = np.array([0, 1, 2, 3])  # argmax, prob, sample, logits-only: the order of a segment's read rows
MIN_BIAS = 8  # bias pairs per row: buckets of powers of two from 8 (a few graph layouts, whatever the count)


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
    tokens, positions, flat_tables, run_lens = _flat_tokens(segments, tables, ids, seg, index)
    n_reads = counts.sum(1)
    rows, kinds, read_owner, prob_tokens = _flat_reads(segments, ids, counts, n_reads, index)
    masks = [g.token_bitmask for g in segments]
    layout, group_order, chosen = _plan_layout(segments, seg, kinds, read_owner, masks, block_size, pad,
                                               group_attention)
    step = PackedStep(layout, np.zeros(layout.size, dtype=np.int64), len(tokens), len(rows),
                      np.concatenate(([0], np.cumsum(n_reads))), counts[:, :3].sum(1), counts[:, 3], seg,
                      np.append(flat_tables, scratch_block), kinds, read_owner)
    if layout.deferred_reads:
        step.deferred = chosen
        step.view("deferred_rows")[:len(chosen)] = chosen  # (padding: row 0, whose kept logits go unread)
    if layout.attention_groups:
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


def _flat_tokens(segments: list[Segment], tables: list[list[int]], ids: list[str], seg: dict,
                 index: np.ndarray) -> tuple[np.ndarray, ...]:
    """The step's tokens and positions [t], block tables [sum of table lengths] and branch run lengths
    [runs] (a segment without branch_lens is one run), each concatenated over the segments."""
    tok_owner = np.repeat(index, seg["n"])
    t = len(tok_owner)
    tokens = _flat([g.token_ids for g in segments], t, "token_ids", ids, tok_owner)
    positions = _flat([g.positions for g in segments], t, "positions", ids, tok_owner)
    flat_tables = _flat(tables, int(seg["table_len"].sum()), "block_table", ids, np.repeat(index, seg["table_len"]))
    run_lens = np.fromiter(chain.from_iterable(g.branch_lens or (len(g.token_ids),) for g in segments), np.int64)
    return tokens, positions, flat_tables, run_lens


def _flat_reads(segments: list[Segment], ids: list[str], counts: np.ndarray, n_reads: np.ndarray,
                index: np.ndarray) -> tuple[np.ndarray, ...]:
    """The step's reads [r], each segment's in KINDS order (argmax, prob, sample, logits-only rows): each
    read's row within its segment's query, its kind and its segment; and the prob reads' given tokens."""
    read_owner = np.repeat(index, n_reads)
    rows = np.fromiter(chain.from_iterable(g.reads.argmax + g.reads.prob + g.reads.sample + g.reads.logits
                                           for g in segments), dtype=np.int64, count=len(read_owner))
    prob_tokens = _flat([g.reads.prob_tokens for g in segments], int(counts[:, 1].sum()), "prob_tokens", ids,
                        np.repeat(index, counts[:, 1]))
    kinds = np.repeat(np.tile(KINDS, len(segments)), counts.ravel())
    return rows, kinds, read_owner, prob_tokens


def _plan_layout(segments: list[Segment], seg: dict, kinds: np.ndarray, read_owner: np.ndarray,
                 masks: list[bytes | None], block_size: int, pad: bool,
                 group_attention: bool) -> tuple[StepLayout, np.ndarray | None, np.ndarray | None]:
    """The step's layout: the shapes (`_layout`) and what its segments ask for besides (token bitmasks,
    logprobs and ranks, logit bias pairs, attention groups, reads whose bitmask is deferred). Returns
    (layout, the sequences in attention-group order or None, the deferred read rows or None)."""
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
    deferred, chosen = [i for i, g in enumerate(segments) if g.deferred_mask], None
    if deferred and len(kinds):
        chosen = np.flatnonzero(np.isin(read_owner, deferred) & ((kinds == 0) | (kinds == 2)))
        layout = dataclasses.replace(layout, deferred_reads=bucket(len(chosen), 1) if pad else len(chosen))
    return layout, group_order, chosen


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
