"""Plan and verify bookkeeping for ReFusion (spec steps 1-2): blocks, the slot pool, slot choice.

Details the spec leaves implicit, settled by the reference implementation (ML-GSAI/ReFusion):
  - plan confidence is softmax(logits)[x0] without temperature, even when x0 came from Gumbel noise;
  - the slot threshold is strict (confidence > slot_threshold); with no confident slot the single
    most confident one is chosen (the first on a tie);
  - at verify the first token of every chosen slot passes unconditionally, others pass when their
    shifted probability is > token_threshold; the per-slot verified prefix (cumulative AND inside the
    slot) seeds the branches' verified flags when slot completion follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.batch import TokenLogprob


@dataclass
class Draft:
    """A planned slot: first logical position, argmax tokens and their softmax probabilities."""

    start: int
    tokens: list[int]
    probs: list[float]
    entries: list[TokenLogprob] | None = None  # the plan reads' log probabilities (params.logprobs set)

    @property
    def confidence(self) -> float:
        """Spec: a slot's confidence is the probability of its first token."""
        return self.probs[0]


@dataclass
class Verdict:
    """Result of a verify forward: passing prefix length (over the concatenation) and per-slot flags."""

    prefix: int
    slot_flags: list[list[bool]]


def split_blocks(span: int, block_length: int, block_done: int = 0) -> list[int]:
    """Block lengths covering `span` generated tokens: whole blocks, then the remainder if any. With
    `block_done` tokens of a block generated already (a handoff inside a block), the first block is
    that block's rest, so the boundaries after it stay where they were."""
    first = min(span, block_length - block_done % block_length) if block_done % block_length else 0
    rest = span - first
    blocks = ([first] if first else []) + [block_length] * (rest // block_length)
    if rest % block_length:
        blocks.append(rest % block_length)
    return blocks


class SlotPool:
    """The not-yet-generated slots of the current block, by first logical position (sorted)."""

    def __init__(self, gen_start: int, block_lengths: list[int], slot_size: int):
        self.slot_size = slot_size
        self.block_starts = []
        pos = gen_start
        for length in block_lengths:
            self.block_starts.append((pos, length))
            pos += length
        self.span_end = pos
        self.block_index = -1
        self.starts: list[int] = []
        if block_lengths:
            self.open_next_block()

    @property
    def is_last_block(self) -> bool:
        return self.block_index >= len(self.block_starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.starts) * self.slot_size

    def open_next_block(self) -> None:
        self.block_index += 1
        start, length = self.block_starts[self.block_index]
        self.starts = list(range(start, start + length, self.slot_size))

    def mask_positions(self) -> list[int]:
        return [s + j for s in self.starts for j in range(self.slot_size)]

    def remove(self, start: int) -> None:
        if start in self.starts:
            self.starts.remove(start)

    def drop_from(self, start: int) -> None:
        """Drop every pool slot positioned at or after `start` (an EOS slot: nothing after it is needed)."""
        self.starts = [s for s in self.starts if s < start]


def choose_slots(starts: list[int], values: list[tuple[int, float]], slot_size: int, threshold: float,
                 entries: list[TokenLogprob] | None = None) -> list[Draft]:
    """Spec step 1: drafts of every pool slot from the plan reads; keep the confident ones, in position
    order. `entries`: the reads' log probabilities, kept with each draft (None: not asked for)."""
    drafts = [
        Draft(start, [t for t, _ in values[i * slot_size : (i + 1) * slot_size]],
              [p for _, p in values[i * slot_size : (i + 1) * slot_size]],
              entries[i * slot_size : (i + 1) * slot_size] if entries is not None else None)
        for i, start in enumerate(starts)
    ]
    chosen = [d for d in drafts if d.confidence > threshold]
    if not chosen:
        best = max(range(len(drafts)), key=lambda i: (drafts[i].confidence, -i))
        chosen = [drafts[best]]
    return chosen


def verify_prefix(chosen: list[Draft], read_probs: list[float], slot_size: int, threshold: float) -> Verdict:
    """Spec step 2: read_probs score every token but each slot's first, in concatenation order."""
    probs = iter(read_probs)
    passes = []
    for d in chosen:
        for j in range(len(d.tokens)):
            passes.append(True if j == 0 else next(probs) > threshold)
    prefix = 0
    while prefix < len(passes) and passes[prefix]:
        prefix += 1
    slot_flags = []
    for i in range(len(chosen)):
        ok, flags = True, []
        for passed in passes[i * slot_size : (i + 1) * slot_size]:
            ok = ok and passed
            flags.append(ok)
        slot_flags.append(flags)
    return Verdict(prefix, slot_flags)
