"""Checks of a packed step before any device work (numpy, no torch): vectorized min/max over the packed
arrays; the culprit segment is located only when a check fails.

Every failure is a `SegmentError(seq_id, field, message)` (a ValueError) naming the segment and the
field to change: token_ids / prob_tokens outside the vocab, negative positions, a block table too short
for context_len + num_kept or naming a block the runner does not have, sampling out of range
(temperature finite and >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, top_k >= 0, 0 <= seed <= SEED_MAX, step >= 0).
"""

from __future__ import annotations

import numpy as np

from workers.batch import SEED_MAX

INT64_MAX = 2**63 - 1


class SegmentError(ValueError):
    """A segment cannot run as given. `seq_id` and `field` name the culprit; the message says what to change."""

    def __init__(self, seq_id: str, field_name: str, message: str):
        super().__init__(f"segment {seq_id}: {field_name}: {message}")
        self.seq_id, self.field, self.message = seq_id, field_name, message


def as_int64(values: list, field: str, seq_ids: list[str], owner: np.ndarray | None = None) -> np.ndarray:
    """values as an int64 array; a value outside int64 raises SegmentError naming its segment.
    owner[i] is the segment index of values[i] (default: one value per segment)."""
    try:
        return np.array(values, dtype=np.int64).reshape(-1)
    except (OverflowError, TypeError, ValueError):
        for i, v in enumerate(values):
            if not isinstance(v, (int, np.integer)) or not -INT64_MAX - 1 <= v <= INT64_MAX:
                culprit = seq_ids[i if owner is None else int(owner[i])]
                limit = f"0..{SEED_MAX}" if field == "seed" else "a 64-bit integer"
                raise SegmentError(culprit, field, f"{v!r} is not {limit}") from None
        raise


def _first(bad: np.ndarray, owner: np.ndarray | None = None) -> int:
    """Segment index of the first True in `bad` (owner maps an entry to its segment)."""
    i = int(np.argmax(bad))
    return i if owner is None else int(owner[i])


def validate_step(step, seq_ids: list[str], vocab_size: int, num_kv_blocks: int) -> None:
    """Raise SegmentError for the first segment of a packed step (workers.step_layout.PackedStep) that the
    runner cannot run against a vocab of `vocab_size` and `num_kv_blocks` KV blocks."""
    t, r = step.num_tokens, step.num_reads
    tok_owner = step.view("seq_index")[:t]
    checks = [
        ("token_ids", step.view("token_ids")[:t], tok_owner, 0, vocab_size - 1, f"ids must lie in 0..{vocab_size - 1}"),
        ("positions", step.view("positions")[:t], tok_owner, 0, None, "positions must be >= 0"),
    ]
    is_prob = step.read_kinds == 1
    checks.append(("prob_tokens", np.where(is_prob, step.view("given")[:r], 0), step.read_owner, 0,
                   vocab_size - 1, f"prob tokens must lie in 0..{vocab_size - 1}"))
    for name, values, owner, low, high, message in checks:
        if len(values) and (values.min() < low or (high is not None and values.max() > high)):
            bad = (values < low) | (values > high if high is not None else False)
            raise SegmentError(seq_ids[_first(bad, owner)], name, message)
    _check_tables(step, seq_ids, num_kv_blocks)
    _check_sampling(step.seg, seq_ids)
    for seq_id, mask in zip(seq_ids, step.token_bitmasks):
        if mask is not None:
            check_bitmask(seq_id, mask, vocab_size)
    if step.layout.bias_width:
        w = step.layout.bias_width
        ids = step.view("bias_ids").reshape(step.layout.num_reads, w)[:r]
        values = step.view("bias_values").reshape(step.layout.num_reads, w)[:r]
        bad = ((ids < 0) | (ids >= vocab_size) | ~np.isfinite(values)).any(axis=1)
        if bad.any():
            raise SegmentError(seq_ids[_first(bad, step.read_owner)], "logit_bias",
                               f"token ids must lie in 0..{vocab_size - 1} and biases be finite numbers")
        bad = ~np.isfinite(step.view("bias_penalty").reshape(step.layout.num_reads, 2)[:r]).all(axis=1)
        if bad.any():
            raise SegmentError(seq_ids[_first(bad, step.read_owner)], "feedback_penalty",
                               "presence and frequency must be finite numbers")


def check_bitmask(seq_id: str, mask: bytes, vocab_size: int) -> None:
    """A token bitmask has a bit for every token id and allows some id below vocab_size (else a read
    has nothing to choose)."""
    if len(mask) * 8 < vocab_size:
        raise SegmentError(seq_id, "token_bitmask", f"has {len(mask) * 8} bits for a vocab of {vocab_size}; "
                           f"give one bit per token id ({-(-vocab_size // 8)} bytes or more)")
    full, rem = divmod(vocab_size, 8)
    if mask[:full].count(0) < len(mask[:full]):
        return
    if rem and len(mask) > full and mask[full] & ((1 << rem) - 1):
        return
    raise SegmentError(seq_id, "token_bitmask", f"allows no token id in 0..{vocab_size - 1}; set at least one bit")


def _check_tables(step, seq_ids: list[str], num_kv_blocks: int) -> None:
    seg, bs = step.seg, step.layout.block_size
    short = seg["table_len"] * bs < seg["ctx"] + seg["kept"]
    if short.any():
        i = _first(short)
        raise SegmentError(seq_ids[i], "block_table", f"{seg['table_len'][i]} blocks of {bs} tokens cannot hold "
                           f"context_len + num_kept = {seg['ctx'][i] + seg['kept'][i]}; prepare the step first")
    blocks = step.tables_flat[:-1]  # the last entry is the scratch sentinel
    if len(blocks) and (blocks.min() < 0 or blocks.max() >= num_kv_blocks):
        owner = np.repeat(np.arange(len(seq_ids)), seg["table_len"])
        i = _first((blocks < 0) | (blocks >= num_kv_blocks), owner)
        raise SegmentError(seq_ids[i], "block_table", f"block ids must lie in 0..{num_kv_blocks - 1}")


def _check_sampling(seg: dict, seq_ids: list[str]) -> None:
    temperature, top_p, min_p = seg["temperature"], seg["top_p"], seg["min_p"]
    rules = [
        ("temperature", ~(np.isfinite(temperature) & (temperature >= 0)), "must be finite and >= 0"),
        ("top_p", ~((top_p > 0) & (top_p <= 1)), "must satisfy 0 < top_p <= 1"),
        ("min_p", ~((min_p >= 0) & (min_p <= 1)), "must satisfy 0 <= min_p <= 1 (0 = off)"),
        ("top_k", seg["top_k"] < 0, "must be >= 0 (0 = off)"),
        ("seed", seg["seed"] < 0, f"must lie in 0..{SEED_MAX}"),
        ("step", seg["step"] < 0, "must be >= 0"),
    ]
    for name, bad, message in rules:
        if bad.any():
            raise SegmentError(seq_ids[_first(bad)], name, message)
