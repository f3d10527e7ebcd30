"""Feedback tokens: a segment with `Segment.feedback` takes its first token from the previous launched
step's read on the device, so step N + 1 can be launched before step N's results reach the host
(the engine's asynchronous scheduling, EngineConfig.async_scheduling).

`mark_feedback` (host, after packing) writes each such token as -(1 + the previous step's read row);
`resolve_feedback` (device, after the upload) replaces the markers by the tokens those rows returned,
and adds the presence and frequency penalties of `Segment.feedback_penalty`. No host sync.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.batch import Segment
from workers.step_layout import PackedStep
from workers.validation import SegmentError


def mark_feedback(step: PackedStep, segments: list[Segment], reads: dict[str, int]) -> None:
    """Write each feedback segment's first token as -(1 + the previous step's read row to take it from)
    in the packed host buffer (validated already, with the stand-in ids in range). reads: {seq_id: its
    first read row} of the previous launched step. Raises SegmentError (field "feedback") for a segment
    whose sequence read nothing there."""
    rows = step.view("query_start")
    tokens = step.view("token_ids")
    for i, seg in enumerate(segments):
        if seg.feedback:
            if seg.seq_id not in reads:
                raise SegmentError(seg.seq_id, "feedback", "the runner's previous step read no token for this "
                                   "sequence; give the token itself (feedback=False)")
            tokens[rows[i]] = -1 - reads[seg.seq_id]
            if seg.feedback_penalty is not None and step.feedback_penalty:  # (a segment that chooses a token)
                # its penalty goes in the pair after the segment's own, in each row choosing a token
                bias = step.view("bias_ids").reshape(step.layout.num_reads, step.layout.bias_width)
                start, end = step.read_starts[i], step.read_starts[i] + step.num_token_reads[i]
                kinds = step.read_kinds[start:end]
                bias[start + np.flatnonzero((kinds == 0) | (kinds == 2)), len(seg.logit_bias)] = -1 - reads[seg.seq_id]


def resolve_feedback(buffer: torch.Tensor, step: PackedStep, previous: torch.Tensor) -> None:
    """On the device, replace each token id -(1 + r) of the uploaded buffer by the token the previous
    step's read row r returned (previous: its values row 0, [R]): a few small kernels, no host sync."""
    start, end = step.offsets["token_ids"]
    tokens = buffer[start:end]
    rows = (-1 - tokens).clamp_(min=0, max=previous.numel() - 1)
    tokens.copy_(torch.where(tokens < 0, previous[rows].to(torch.int64), tokens))
    if step.feedback_penalty:
        _resolve_feedback_penalty(buffer, step, previous)


def _resolve_feedback_penalty(buffer: torch.Tensor, step: PackedStep, previous: torch.Tensor) -> None:
    """On the device, the presence and frequency penalties of each fed-back token t (Segment.feedback_penalty):
    in each read row whose pair after its own holds -(1 + r), t = the token previous step's read row r
    returned; the row's pairs (workers.step_layout: bias_ids, bias_values, bias_kind, bias_penalty) gain
    -frequency, and -presence unless a pair of kind 2 names t (generated before), on t's own pair when
    the row has one (its first, should a caller name t twice; in float64, which the host's own sum matches
    to float64 rounding, below the float32 the reads add), else on that marker pair, which becomes (t, it).
    A few small [R, L] kernels, no host sync; only in steps with such a segment."""
    r, w = step.layout.num_reads, step.layout.bias_width
    (i0, i1), (v0, v1), (k0, k1), (p0, p1) = (step.offsets[f] for f in ("bias_ids", "bias_values", "bias_kind",
                                                                         "bias_penalty"))
    ids, kind = buffer[i0:i1].view(r, w), buffer[k0:k1].view(r, w)
    values, penalty = buffer[v0:v1].view(torch.float64).view(r, w), buffer[p0:p1].view(torch.float64).view(r, 2)
    marker = ids < 0  # [R, L]: at most one per row
    source = (-1 - ids).clamp_(min=0, max=previous.numel() - 1)
    token = torch.where(marker, previous[source].to(torch.int64), 0).sum(dim=1)  # [R] (0 in rows without one)
    match = (ids == token[:, None]) & (kind > 0) & marker.any(dim=1, keepdim=True)  # t's own pairs, if any
    seen = (match & (kind == 2)).any(dim=1)
    match &= match.cumsum(dim=1) == 1  # (the first: a decoder's pairs name each token once)
    delta = -penalty[:, 1] - torch.where(seen, 0.0, penalty[:, 0])  # [R] float64
    values.add_(torch.where(match, delta[:, None], 0.0))
    values.copy_(torch.where(marker & ~match.any(dim=1, keepdim=True), delta[:, None], values))
    ids.copy_(torch.where(marker, token[:, None], ids))
