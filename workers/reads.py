"""Every read row of a step in one batched pass on the device (semantics: workers/batch.py, "Reads").

Input: logits of the read rows only, [R, V] float32, and per-row parameters (`ReadParams`, views of the
packed step). Output: [2, R] float64, row 0 the token ids, row 1 the probabilities, so all results
come back to the host in one transfer. With `logprobs` (a segment of the step asks for them) the output
is [4 + 2K, R] (K = READ_TOP_LOGPROBS): then row 2 the chosen token's log probability, rows 3 .. 3+K the
K most likely token ids, rows 3+K .. 3+2K their log probabilities, and row 3+2K the chosen token's rank
(1 + the number of tokens more likely; vLLM's `prompt_logprobs` report it; 0 = not computed: only with
`ranks`, one more pass over the vocabulary per row), all under log_softmax of the logits as given (grammar mask applied; before temperature, top-k, top-p: vLLM's raw_logprobs).

  - probabilities via logsumexp: p = exp(logit[token] - logsumexp(logits)), no softmax over rows;
  - argmax rows: argmax(logits); with the gumbel flag (temperature T > 0) ReFusion's Gumbel-max draft
    argmax(logits - T * log(-log u)) in float64, over the top-k/top-p/min-p filtered logits when the
    request sets them (as a sample row; the spec's draft is unfiltered, the defaults leave it so);
    probability: the plain softmax of the chosen token (unfiltered: the confidence the spec's
    thresholds compare);
  - prob rows: the given token and its softmax probability;
  - sample rows (T > 0; a sample read at T == 0 is packed as greedy): the Gumbel-max argmax of the
    top-k/top-p filtered logits at temperature T, argmax(x - T * log(-log u)) = argmax(x / T + Gumbel),
    and the token's probability under softmax(x / T).
Padding rows are computed like the others (greedy on row 0) and ignored by the caller.

Randomness is counter-based: u = uniform(seed, step, position, vocab index) is a splitmix64-style hash
in int64 torch ops, identical on CPU and CUDA, with no torch.Generator and no state: a request's draws
depend only on its own (seed, step, logical position of the read row). The optional stages (noise,
the sort for top-k/top-p) run only when the packed step's host flags ask for them, so shapes stay
static per bucket.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.batch import MAX_TOP_LOGPROBS

# Alternatives each log-probability read computes: one more than a request may ask for, so that leaving
# the mask token out (workers.results.token_logprobs) still gives MAX_TOP_LOGPROBS
READ_TOP_LOGPROBS = MAX_TOP_LOGPROBS + 1

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 wraps the same way).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


class ReadParams(NamedTuple):
    """Per read row parameters, each [R] on the device (int64 unless stated)."""

    given: torch.Tensor  # prob rows: the token; else -1
    temperature: torch.Tensor  # float64
    top_k: torch.Tensor  # 0 = off (rows that draw nothing: 0)
    top_p: torch.Tensor  # float64 (rows that draw nothing: 1.0)
    min_p: torch.Tensor  # float64 (rows that draw nothing: 0.0)
    gumbel: torch.Tensor  # 1: Gumbel-max argmax row (T > 0)
    sample: torch.Tensor  # 1: sample row with T > 0
    seed: torch.Tensor
    step: torch.Tensor
    position: torch.Tensor  # logical position of the read row


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (>> is arithmetic on signed ints: mask the sign fill)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 step: z + golden ratio, then the finalizer (xor-shift-multiply). int64 -> int64."""
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def uniform(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R] int64 keys -> u [R, vocab] float64 in the open interval (0, 1): the top 53 bits of
    mix64(mix64(mix64(mix64(seed) ^ step) ^ position) ^ vocab index), plus half a unit."""
    key = mix64(mix64(mix64(seed) ^ step) ^ position)  # [R]
    bits = mix64(key[:, None] ^ torch.arange(vocab, device=key.device))  # [R, V]
    return _shift_right(bits, 11).double().add_(0.5).mul_(2.0**-53)


def gumbel_noise(params: ReadParams, vocab: int) -> torch.Tensor:
    """-log(-log u) [R, V] float64 for each row's (seed, step, position)."""
    return -torch.log(-torch.log(uniform(params.seed, params.step, params.position, vocab)))


def filter_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       temperature: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, V] logits (any float dtype) -> the same with tokens outside top-k / top-p / min-p set to -inf.

    top_k [R] (0 = off), top_p [R] float64 (1 = off), temperature [R] (the distribution top-p and min-p
    are measured on; 0 is treated as 1), min_p [R] float64 (0 = off). A token is kept when it ranks
    among the top k, the tokens ranked above it hold less than top_p of the tempered probability, and
    its tempered probability is at least min_p times the top token's (logit >= top + T log min_p); the
    first always stays. Ties at the thresholds are kept. Shapes are static: one sort of every row.
    """
    vocab = x.shape[-1]
    ordered = x.sort(dim=-1, descending=True).values  # [R, V]
    rank = torch.arange(vocab, device=x.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [R]
    in_top_k = rank[None, :] < k[:, None]  # [R, V]
    ordered = ordered.masked_fill(~in_top_k, float("-inf"))
    scale = torch.where(temperature > 0, temperature, 1.0)
    probs = (ordered / scale[:, None]).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass ranked above each token: nondecreasing, so keep is a prefix
    keep = in_top_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1))
    threshold = ordered.gather(1, (keep.sum(dim=-1, keepdim=True) - 1).clamp(min=0))  # [R, 1]
    if min_p is not None:  # relative to the top logit; min_p 0 gives -inf (off)
        floor = ordered[:, :1].double() + scale[:, None] * torch.log(min_p[:, None])  # [R, 1]
        threshold = torch.maximum(threshold, floor.to(threshold.dtype))
    return x.masked_fill(x < threshold, float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float32, words [R, W] int64 (bit t of the little-endian words = token t allowed,
    W * 64 >= V) -> logits with -inf at disallowed tokens (a new tensor). The reads then choose among
    the allowed tokens and give probabilities under the masked distribution, the one the token was
    drawn from (grammar-constrained decoding as in vLLM and llguidance: mask, then sample)."""
    packed = words.view(torch.uint8)  # [R, 8 W]: byte t // 8 holds token t at bit t % 8 (little-endian)
    shifts = torch.arange(8, device=logits.device, dtype=torch.uint8)
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : logits.shape[-1]]  # [R, V] uint8
    return logits.masked_fill(allowed == 0, float("-inf"))


def _chosen_logprob(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """log softmax(x)[token] per row: x [R, V], token [R] -> [R] (logsumexp, no full softmax)."""
    return x.gather(1, token[:, None])[:, 0] - torch.logsumexp(x, dim=-1)


def compute_reads(logits: torch.Tensor, params: ReadParams, needs_noise: bool, needs_sort: bool,
                  logprobs: bool = False, bias: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ranks: bool = False) -> torch.Tensor:
    """logits [R, V] float32 -> [2, R] float64: token ids (exact in float64) and probabilities; with
    `logprobs`, [4 + 2K, R]: plus the token's log probability, the top K and its rank (with `ranks`;
    else 0) (module docstring).
    bias: ([R, L] token ids, [R, L] float64 values) added to the logits the token is chosen from
    (Segment.logit_bias; padding pairs add 0); the log probabilities are of the logits without it, and
    `logits` is as given once this returns (the bias is added in place and taken out again)."""
    if bias is None:
        values = _token_and_prob(logits, params, needs_noise, needs_sort)
    else:
        # Added in place and the saved entries put back (the caller gets the raw logits, and the log
        # probabilities read them): a biased copy of [R, V] cost 13-18 ms a step at R = 32-64 with Qwen's
        # vocabulary on a CPU (page faults of a fresh 20-40 MB tensor), and every AR step has a bias
        saved = logits.gather(1, bias[0])
        logits.scatter_add_(1, bias[0], bias[1].to(logits.dtype))
        values = _token_and_prob(logits, params, needs_noise, needs_sort)
        logits.scatter_(1, bias[0], saved)
    if not logprobs:
        return values
    log_probs = logits.log_softmax(dim=-1)  # [R, V] float32
    top = log_probs.topk(min(READ_TOP_LOGPROBS, logits.shape[-1]), dim=-1)  # [R, K] each
    chosen = log_probs.gather(1, values[0].long()[:, None])[:, 0]  # [R]
    if ranks:  # an int32 count: summing the bool mask as int64 takes twice as long on the CPU
        rank = (log_probs > chosen[:, None]).sum(dim=-1, dtype=torch.int32) + 1  # [R]
    else:
        rank = torch.zeros_like(chosen)
    return torch.cat((values, chosen.double()[None], top.indices.double().T, top.values.double().T,
                      rank.double()[None]))


def _token_and_prob(logits: torch.Tensor, params: ReadParams, needs_noise: bool, needs_sort: bool) -> torch.Tensor:
    """[2, R]: the read's token and probability per row (module docstring, per row kind)."""
    given = params.given
    if not needs_noise and not needs_sort:  # greedy step: no float64 copy of the logits
        token = torch.where(given >= 0, given, logits.argmax(dim=-1))
        return torch.stack((token.double(), _chosen_logprob(logits, token).double().exp()))
    raw = logits
    sample = params.sample != 0
    if needs_sort:  # only drawing rows (sample, Gumbel draft) carry top-k / top-p; others pass unchanged
        logits = filter_top_k_top_p(logits, params.top_k, params.top_p, params.temperature, params.min_p)
    x = logits.double()  # [R, V]
    z = x
    if needs_noise:
        scale = torch.where(sample | (params.gumbel != 0), params.temperature, 0.0)  # [R]
        z = x + scale[:, None] * gumbel_noise(params, x.shape[-1])
    token = torch.where(given >= 0, given, z.argmax(dim=-1))
    # Sample rows: probability under softmax(filtered / T); every other row: plain softmax (T_eff = 1).
    tempered = x / torch.where(sample, params.temperature, 1.0)[:, None]
    logprob = _chosen_logprob(tempered, token)
    # Plain rows (greedy argmax, prob reads) take the float32 value of the greedy step above, so a greedy
    # request's probabilities, which its thresholds compare, do not depend on whether a sampled request
    # shares its step (the spec's batch invariance)
    plain = ~sample & (params.gumbel == 0)
    logprob = torch.where(plain, _chosen_logprob(raw, token).double(), logprob)
    if needs_sort:  # a filtered Gumbel draft's probability is still the unfiltered softmax's (its confidence)
        logprob = torch.where(params.gumbel != 0, _chosen_logprob(raw.double(), token), logprob)
    return torch.stack((token.double(), logprob.exp()))
