"""Turning logits rows into the values segments asked for, on the device, with one host transfer.

Randomness comes from each sequence's own torch.Generator (seeded from Sampling.seed the first time
the runner sees the sequence), so a request's draws do not depend on what else is batched.

Gumbel-max (ReFusion drafting): token = argmax exp(logits) / (-log u)**T, computed in float64 as the
equivalent argmax(logits - T * log(-log u)); u ~ U(0, 1) from the sequence's generator, one draw of
vocab size per ARGMAX row of the segment in row order (drawn as one [rows, vocab] tensor, which the
generator fills in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.batch import Read, ReadKind, Sampling, Segment, SegmentResult
from workers.transfer import to_device


@dataclass
class ReadRequest:
    """All reads of one segment; `first` is the index of its first read in the packed logits."""

    segment: Segment
    first: int
    generator: torch.Generator


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """logits [N, V] -> token ids [N] of argmax(logits - T*log(-log u)) in float64."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(dim=-1)


def sampling_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [N, V] -> the sampling distribution [N, V] after temperature, top-k and top-p."""
    scaled = logits.float() / s.temperature
    if 0 < s.top_k < scaled.shape[-1]:
        kth = scaled.topk(s.top_k, dim=-1).values[:, -1:]  # [N, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= s.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.softmax(dim=-1)


def _segment_values(logits: torch.Tensor, probs: torch.Tensor, req: ReadRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [R], probabilities [R]) for one segment's reads; logits/probs are its rows [R, V]."""
    reads, s = req.segment.reads, req.segment.sampling
    tokens = torch.full((len(reads),), -1, dtype=torch.long, device=logits.device)
    kinds = lambda *ks: [i for i, r in enumerate(reads) if r.kind in ks]  # noqa: E731
    argmax = sorted(kinds(ReadKind.ARGMAX), key=lambda i: reads[i].row)
    if argmax:
        idx = to_device(argmax, logits.device)
        if s.gumbel and s.temperature > 0:
            tokens[idx] = gumbel_argmax(logits[idx], s.temperature, req.generator)
        else:
            tokens[idx] = logits[idx].argmax(dim=-1)
    prob_rows = kinds(ReadKind.PROB)
    if prob_rows:
        prob_idx = to_device(prob_rows, logits.device)
        tokens[prob_idx] = to_device([reads[i].token for i in prob_rows], logits.device)
    chosen = probs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]  # [R] softmax prob of each token
    sample = kinds(ReadKind.SAMPLE)
    if sample:
        idx = to_device(sample, logits.device)
        if s.temperature > 0:
            dist = sampling_probs(logits[idx], s)  # [N, V]
            drawn = torch.multinomial(dist, 1, generator=req.generator)  # [N, 1]
            tokens[idx] = drawn[:, 0]
            chosen[idx] = dist.gather(1, drawn)[:, 0]
        else:  # greedy: argmax and its softmax probability
            tokens[idx] = logits[idx].argmax(dim=-1)
            chosen[idx] = probs[idx].gather(1, tokens[idx][:, None])[:, 0]
    logits_rows = kinds(ReadKind.LOGITS)
    if logits_rows:
        chosen[to_device(logits_rows, logits.device)] = float("nan")
    if prob_rows:
        tokens[prob_idx] = -1
    return tokens, chosen


def compute_results(logits: torch.Tensor, requests: list[ReadRequest]) -> list[SegmentResult]:
    """logits [R_total, V] float32 (every read of every segment, packed) -> results, one host transfer."""
    probs = logits.softmax(dim=-1)  # [R_total, V] float32
    token_parts, prob_parts, logit_parts = [], [], []
    for req in requests:
        n = len(req.segment.reads)
        if n == 0:
            continue
        rows = slice(req.first, req.first + n)
        tokens, chosen = _segment_values(logits[rows], probs[rows], req)
        token_parts.append(tokens.double())
        prob_parts.append(chosen.double())
        for k, read in enumerate(req.segment.reads):
            if read.kind is ReadKind.LOGITS:
                logit_parts.append(logits[req.first + k].double())
    parts = token_parts + prob_parts + logit_parts
    host = torch.cat(parts).cpu().tolist() if parts else []  # the one device -> host transfer
    return _unpack(host, requests, logits.shape[-1])


def _unpack(host: list[float], requests: list[ReadRequest], vocab: int) -> list[SegmentResult]:
    """Split the flat host list [tokens..., probs..., logits rows...] back into per-segment results."""
    total = sum(len(r.segment.reads) for r in requests)
    results, k, logits_at = [], 0, 2 * total
    for req in requests:
        values, logit_rows = [], {}
        for j, read in enumerate(req.segment.reads):
            values.append((int(host[k + j]), host[total + k + j]))
            if read.kind is ReadKind.LOGITS:
                logit_rows[j] = host[logits_at:logits_at + vocab]
                logits_at += vocab
        k += len(req.segment.reads)
        results.append(SegmentResult(req.segment.seq_id, values, logit_rows))
    return results


__all__ = ["Read", "ReadRequest", "compute_results", "gumbel_argmax", "sampling_probs"]
