"""A launched step's results, from the device to SegmentResults: `LaunchedStep` (what
ModelRunner.collect waits on), `copy_to_host` (the step's one device -> host copy) and, on the host,
`unpack_results` / `token_logprobs` (the values [2, R] float64, [4 + 2K, R] with log probabilities,
cut into one SegmentResult per segment).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.batch import LOGPROB_FLOOR, SegmentResult, TokenLogprob
from workers.step_layout import PackedStep


@dataclass
class LaunchedStep:
    """A step `ModelRunner.launch` queued: what `collect` needs to return its results. host: the values
    [2, R] ([4 + 2K, R] with log probabilities) float64, in pinned host memory on CUDA that the device
    fills once `done` (a CUDA event) has passed; on the CPU the values themselves, done at launch.
    deferred: while the step's deferred reads wait for ModelRunner.finish_reads, (the uploaded buffer, the
    device values, the kept logits [D, V], each segment's deferred_mask); host is None until then."""

    step: PackedStep
    seq_ids: list[str]
    logprobs: list[int | None]
    ranks: list[bool]
    host: torch.Tensor | None
    done: object | None
    logits: np.ndarray | None
    deferred: tuple | None = None
    staged: torch.Tensor | None = None


def copy_to_host(launched: LaunchedStep, values: torch.Tensor, device: torch.device) -> None:
    """Queue the step's one device -> host transfer (its values) and the event `collect` waits for."""
    if device.type == "cuda":
        launched.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        launched.host.copy_(values, non_blocking=True)
        launched.done = torch.cuda.Event()
        launched.done.record()
    else:
        launched.host = values.cpu()  # (the values themselves)


def unpack_results(step: PackedStep, seq_ids: list[str], values: np.ndarray,
                   logits: np.ndarray | None, top_wanted: list[int | None] | None = None,
                   ranks: list[bool] | None = None, hidden: int | None = None) -> list[SegmentResult]:
    """values [2, R] float64 (tokens, probs; [4 + 2K, R] with log probabilities) and optional logits
    [R, V] -> one SegmentResult per segment. top_wanted[i]: segment i's `logprobs` (None: none);
    ranks[i]: segment i's `ranks` (others get rank None even when the step computed the row);
    hidden: a token id never listed among the alternatives (token_logprobs)."""
    tokens = values[0, :step.num_reads].astype(np.int64).tolist()
    probs = values[1, :step.num_reads].tolist()
    starts, n_tok, n_log = step.read_starts.tolist(), step.num_token_reads.tolist(), step.num_logit_reads.tolist()
    results = []
    for i, seq_id in enumerate(seq_ids):
        a, b = starts[i], starts[i] + n_tok[i]
        rows = logits[b:b + n_log[i]].tolist() if n_log[i] else []
        result = SegmentResult(seq_id, tokens[a:b], probs[a:b], rows)
        if top_wanted is not None and top_wanted[i] is not None:  # no reads in the step: no values rows
            with_ranks = bool(ranks and ranks[i])
            result.logprobs = (token_logprobs(values[:, a:b], top_wanted[i], with_ranks, hidden)
                               if step.layout.logprobs else [])
        results.append(result)
    return results


def token_logprobs(values: np.ndarray, num_top: int, with_ranks: bool = False,
                   hidden: int | None = None) -> list[TokenLogprob]:
    """values [4 + 2K, n] of one segment's reads -> n TokenLogprob with num_top alternatives each
    (-inf as LOGPROB_FLOOR; alternatives of probability 0, which a grammar mask removed, left out) and,
    with_ranks, their rank (else None). `hidden` (the mask token: an input marker that AR never chooses
    and that is never text) is left out of the alternatives, and the next one takes its place (the
    reads compute one more than a request may ask for: workers.reads.READ_TOP_LOGPROBS); the log
    probabilities stay those of the model's logits, and a rank still counts it."""
    k = (values.shape[0] - 4) // 2
    wanted = min(num_top + (hidden is not None), k)
    chosen = np.maximum(values[2], LOGPROB_FLOOR).tolist()
    top_ids = values[3:3 + wanted].T.astype(np.int64).tolist()
    top_lps = values[3 + k:3 + k + wanted].T.tolist()
    token_ids = values[0].astype(np.int64).tolist()
    ranks = values[3 + 2 * k].astype(np.int64).tolist() if with_ranks else [None] * len(token_ids)
    return [TokenLogprob(token, lp, tuple((t, v) for t, v in zip(ids, lps) if v != -np.inf and t != hidden)[:num_top],
                         rank)
            for token, lp, ids, lps, rank in zip(token_ids, chosen, top_ids, top_lps, ranks)]
