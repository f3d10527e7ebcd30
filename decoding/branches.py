"""Slot completion (spec step 3): each chosen slot is a branch over the same committed cache.

One segment holds every branch as a run of its own (tree attention: `Segment.branch_lens`, so a slot
sees the committed cache and itself, never a sibling). Each round is two forwards:

    draft:  branch tokens, verified ones as themselves, unverified ones as MASK; nothing kept;
            argmax reads (plain, no Gumbel noise) on the masked rows: a mask at p predicts the token at p.
    verify: branch tokens with the drafts filled in, clean, all branches in slot order; all kept;
            prob reads shifted by one (row j-1 scores token j).

Where the reference commits the branches' common verified prefix to per-branch cache rows, we re-feed
each branch's full slot every round. That is numerically the same KV: the same tokens (verified tokens
never change), the same positions and the same visibility (cache + earlier tokens of the branch). After
the last verify round the cache holds every slot in slot order, each computed in its own branch, which
is exactly the commit of spec step 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

from workers.batch import Reads, Sampling, Segment, TokenLogprob


@dataclass
class Branch:
    """One chosen slot: its first logical position, current tokens, and verified flags (a prefix)."""

    start: int
    tokens: list[int]
    verified: list[bool]
    # Log probability of each token from its latest read (params.logprobs set; else None): final once
    # the token is verified, since verified tokens are neither redrafted nor rescored.
    entries: list[TokenLogprob] | None = None

    @property
    def complete(self) -> bool:
        return all(self.verified)

    def first_verified(self, token_ids: Collection[int]) -> int | None:
        """Index of the first verified token of this slot that is one of token_ids, or None."""
        for j, (tok, ok) in enumerate(zip(self.tokens, self.verified)):
            if not ok:
                return None
            if tok in token_ids:
                return j
        return None


def draft_segment(seq_id: str, context_len: int, branches: list[Branch], mask_id: int, sampling: Sampling,
                  logprobs: int | None = None):
    """The draft forward of one round and the (branch, slot index) each read answers.

    Complete branches are left out: their draft would be discarded and nothing reads them.
    """
    tokens, positions, lens, rows, layout = [], [], [], [], []
    for b, br in enumerate(branches):
        if br.complete:
            continue
        for j, ok in enumerate(br.verified):
            if not ok:
                rows.append(len(tokens) + j)
                layout.append((b, j))
        tokens += [tok if ok else mask_id for tok, ok in zip(br.tokens, br.verified)]
        positions += range(br.start, br.start + len(br.tokens))
        lens.append(len(br.tokens))
    segment = Segment(seq_id, context_len, tokens, positions, 0, Reads(argmax=tuple(rows)), lens, sampling,
                      logprobs=logprobs)
    return segment, layout


def absorb_drafts(branches: list[Branch], layout: list[tuple[int, int]], values: list[tuple[int, float]],
                  entries: list[TokenLogprob] | None = None) -> None:
    """Write the argmax drafts (and their log probabilities, when asked for) into the unverified positions."""
    for k, ((b, j), (tok, _prob)) in enumerate(zip(layout, values)):
        branches[b].tokens[j] = tok
        if entries is not None:
            branches[b].entries[j] = entries[k]


def verify_segment(seq_id: str, context_len: int, branches: list[Branch], sampling: Sampling,
                   logprobs: int | None = None):
    """The verify forward of one round (all branches, slot order, kept) and each read's (branch, j).

    Token j of a branch needs a probability only when its predecessor is not verified yet; every
    other token passes by the rule "a token whose predecessor was verified passes".
    """
    tokens, positions, lens, rows, scored, layout = [], [], [], [], [], []
    for b, br in enumerate(branches):
        row0 = len(tokens)
        for j in range(1, len(br.tokens)):
            if not br.verified[j - 1]:
                rows.append(row0 + j - 1)
                scored.append(br.tokens[j])
                layout.append((b, j))
        tokens += br.tokens
        positions += range(br.start, br.start + len(br.tokens))
        lens.append(len(br.tokens))
    reads = Reads(prob=tuple(rows), prob_tokens=tuple(scored))
    segment = Segment(seq_id, context_len, tokens, positions, len(tokens), reads, lens, sampling, logprobs=logprobs)
    return segment, layout


def absorb_verification(
    branches: list[Branch], layout: list[tuple[int, int]], values: list[tuple[int, float]], token_threshold: float,
    entries: list[TokenLogprob] | None = None,
) -> None:
    """Grow each branch's verified prefix: token j passes if verified[j-1] held before this round,
    or its shifted probability exceeds token_threshold; verified = cumulative AND of passes. The scored
    tokens' log probabilities (when asked for) replace their draft reads'."""
    probs = {bj: prob for bj, (_tok, prob) in zip(layout, values)}
    for (b, j), entry in zip(layout, entries or ()):
        branches[b].entries[j] = entry
    for b, br in enumerate(branches):
        before = list(br.verified)
        ok = True
        for j in range(len(br.tokens)):
            passes = j == 0 or before[j - 1] or probs.get((b, j), 0.0) > token_threshold
            ok = ok and passes
            br.verified[j] = ok


def stop_after_eos(branches: list[Branch], ends: Collection[int]) -> int | None:
    """Spec: if a verified token is EOS (any of `ends`: DecodeParams.ends), keep branches up to the first
    one holding it (that branch counts as complete) and stop the others. Returns that branch's index, or
    None (no EOS)."""
    for b, br in enumerate(branches):
        if br.first_verified(ends) is not None:
            del branches[b + 1 :]
            br.verified = [True] * len(br.verified)
            return b
    return None
