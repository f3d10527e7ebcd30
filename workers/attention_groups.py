"""Attention groups: a step's sequences split by query length, each group attended at its own padded
shapes (workers.attention.StepAttention), so a prompt chunk beside many one-token decode steps is not
padded into every sequence. `workers.packing.pack_step` asks for them (group_attention) and records
them in `StepLayout.attention_groups` (numpy, no torch).
"""

from __future__ import annotations

import numpy as np

from workers.step_layout import MIN_BLOCKS, MIN_QUERY, StepLayout, bucket

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
