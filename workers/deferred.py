"""Deferred reads: the reads of Segment.deferred_mask segments, whose grammar bitmasks are known only
after the step is launched (vLLM's structured output: the bitmask applied to the kept logits after the
forward). The step keeps those rows' logits [D, V]; ModelRunner.finish_reads takes the bitmasks,
`bitmask_rows` checks and packs them on the host and `deferred_reads` makes the reads on the device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workers.packing import bitmask_words
from workers.reads import ReadParams, apply_token_bitmask, compute_reads
from workers.step import step_arrays
from workers.step_layout import PackedStep, StepLayout
from workers.validation import SegmentError, check_bitmask


def bitmask_rows(step: PackedStep, seq_ids: list[str], bitmasks: Sequence[bytes | None], deferred: list[bool],
                 vocab_size: int) -> np.ndarray:
    """Each deferred read row's bitmask as int64 words [D, ceil(V / 64)] (all bits set for a segment given
    None). bitmasks: one entry per segment, as ModelRunner.finish_reads takes them; deferred: each
    segment's deferred_mask. Raises ValueError for a list of the wrong length, SegmentError naming the
    segment for a bitmask that cannot be used (field "token_bitmask") or that is given for a segment
    without deferred_mask (field "deferred_mask")."""
    n = len(seq_ids)
    if not isinstance(bitmasks, (list, tuple)) or len(bitmasks) != n:
        given = f"{len(bitmasks)} bitmasks" if isinstance(bitmasks, (list, tuple)) else type(bitmasks).__name__
        raise ValueError(f"finish_reads: {given} for a step of {n} segments; give a list of one per segment")
    words = -(-vocab_size // 64)
    table = np.full((n, words), -1, dtype=np.int64)
    for i, (seq_id, mask) in enumerate(zip(seq_ids, bitmasks)):
        if mask is None:
            continue
        if not deferred[i]:
            raise SegmentError(seq_id, "deferred_mask", "is not set, so its reads were made at launch; give None")
        if not isinstance(mask, (bytes, bytearray, memoryview)):
            raise SegmentError(seq_id, "token_bitmask", f"must be bytes, one bit per token id (byte t // 8, bit "
                               f"t % 8; llguidance's layout), got {type(mask).__name__}")
        mask = bytes(mask)
        check_bitmask(seq_id, mask, vocab_size)
        table[i] = bitmask_words(mask, words)
    return table[step.read_owner[step.deferred]]  # [D, words]


def deferred_reads(buffer: torch.Tensor, layout: StepLayout, kept: torch.Tensor,
                   masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reads of the D deferred rows (masks [D, words] on the device, from bitmask_rows) over their kept
    logits (kept [>= D, V]) -> (their read rows [D], their values [2, D] or [4 + 2K, D]), which go into
    the step's values at those rows. The draws are those the step would have made with the bitmasks at
    launch (workers.reads keys them by seed, step and position, not by batch)."""
    d = masks.shape[0]
    a = step_arrays(buffer, layout)
    rows = a.deferred_rows[:d]
    reads = ReadParams(*(field.index_select(0, rows) for field in a.reads))
    bias = (a.bias_ids.index_select(0, rows), a.bias_values.index_select(0, rows)) if layout.bias_width else None
    out = compute_reads(apply_token_bitmask(kept[:d], masks), reads, layout.needs_noise, layout.needs_sort,
                        layout.logprobs, bias, layout.ranks)
    return rows, out
