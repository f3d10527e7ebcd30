"""The contract between decoders, scheduler and model runner: one packed step. The source of truth for
visibility, KV and read semantics.

Plain Python (no torch), so `decoding/` and `scheduler/` can build and test against it anywhere.

Who owns what
-------------
A decoder states its next step as a `Segment` (query tokens after its committed cache). Whoever
schedules the sequence owns its KV blocks (`workers.kv_blocks.BlockTables`: the engine's scheduler, or
a `workers.session.RunnerSession` for the CLI, tests and benchmarks). Before a step it truncates the
sequence to `context_len` and allocates room for the kept tokens (`BlockTables.prepare`), then hands the
runner each segment with its block table. The runner never allocates and never refuses for lack of
KV: it only reads and writes the slots it is told.

Visibility of query token i of a segment (per segment; segments never see each other):
  - the sequence's committed cache: its first `context_len` cached tokens, all of them;
  - earlier query tokens j <= i of the same segment that lie in the same run: with `branch_lens`
    None the whole segment is one causal run; otherwise the segment is cut into consecutive runs of
    those lengths (ReFusion slot completion: one run per branch), and a token sees only the earlier
    tokens of its own run. Equivalently, with `branch_start(i)` the first query index of i's run,
    i sees j iff branch_start(i) <= j <= i.
  Attention depends on logical positions only through RoPE (`positions`), on physical order only
  through this rule.

KV lifecycle:
  - The cache is truncated to `context_len` tokens before the step (a decoder rolls back tentative KV
    by stating a shorter context than the cache holds); `context_len` never exceeds the cached length.
  - The first `num_kept` query tokens have their K/V appended to the cache in query order, at cache
    positions context_len .. context_len + num_kept - 1; the others leave no trace. (Every decoder
    keeps a prefix: context chunks and verified drafts first, dropped mask or draft tokens after.)
  - The block table handed to the runner covers context_len + num_kept tokens.

Reads (what comes back; computed on the device for all rows of all segments at once, moved to the
host in one transfer). `SegmentResult.tokens[k]` / `.probs[k]` answer the segment's reads in the order
argmax rows, then prob rows, then sample rows:
  - argmax: (token, softmax(logits)[token]). With Sampling.gumbel and temperature T > 0 the token is
    argmax(logits - T * log(-log u)) in float64 (ReFusion drafting, spec "Parameters"), over the
    logits top-k, top-p and min-p leave when Sampling sets them (the defaults leave all: the spec's
    draft); the probability is still the plain softmax of the chosen token.
  - prob: (the given token, softmax(logits)[token]) (verification), via logsumexp.
  - sample: temperature, top-k, top-p and min-p from Sampling, drawn as the Gumbel-max argmax of the
    filtered logits; (token, its probability under the filtered, tempered distribution). T == 0 is
    greedy. min-p (vLLM's): tokens whose tempered probability is below min_p x the top token's are out.
  - logits: full float32 rows in `SegmentResult.logits` (tests and debugging only).
  - log probabilities (only for segments with `Segment.logprobs` set): per token-and-probability row,
    `SegmentResult.logprobs[k]` = TokenLogprob(token, log softmax(logits)[token], the row's
    `Segment.logprobs` most likely tokens and their log probabilities, best first). These are of the
    model's distribution as the grammar mask leaves it, before temperature, top-k and top-p (vLLM's
    default `raw_logprobs`), whatever the row's kind; -inf is reported as -9999.0 (as vLLM), and top
    entries the grammar mask removed are left out.
Randomness is counter-based: u = uniform(hash(seed, step, position, vocab index)), with `step` the
request's own decode-step counter (decoders count forwards with reads) and `position` the logical
position of the read row. Both are intrinsic to the request: its draws depend on nothing else in the
batch nor on how its prompt was chunked, and a request restarted from scratch draws the same numbers.
(Its logits may still differ by float noise beside other sequences; a rerun that tips a near-tie the
other way continues the ids it streamed before: scheduler/replay.py.)
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

SEED_MAX = 2**63 - 1
"""Seeds are signed 64-bit on the device; the API rejects larger ones (a 400 naming `seed`)."""

MAX_TOP_LOGPROBS = 20
TOKEN_BAN = -1e9  # the logit bias that keeps a token from being chosen (decoding.ar: the mask token always;
# EOS under ignore_eos or min_tokens): finite, below any logit
"""Most alternatives a read returns per token (vLLM's default max_logprobs, OpenAI's top_logprobs bound);
a step with any log-probability segment computes this many for every read row."""

LOGPROB_FLOOR = -9999.0
"""The log probability reported for a token of probability 0 (JSON has no -inf; vLLM's value)."""


@dataclass(frozen=True)
class Sampling:
    """Randomness of a segment. temperature == 0 means greedy everywhere; `step` keys the draws."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # 0 = off; keep tokens whose probability is >= min_p x the most likely one's
    seed: int = 0  # 0 .. SEED_MAX
    gumbel: bool = False  # argmax reads use Gumbel-max noise (ReFusion drafting)
    step: int = 0  # the request's step counter (decoders count their segments)


@dataclass(frozen=True)
class Reads:
    """Rows of a segment to read, per kind (row indices into the segment's query tokens)."""

    argmax: tuple[int, ...] = ()
    prob: tuple[int, ...] = ()
    prob_tokens: tuple[int, ...] = ()  # the token whose probability each prob row gives
    sample: tuple[int, ...] = ()
    logits: tuple[int, ...] = ()  # tests and debugging only (a vocab-sized transfer per row)

    def __len__(self) -> int:
        return len(self.argmax) + len(self.prob) + len(self.sample)

    def rows(self) -> tuple[int, ...]:
        """Every token-and-probability row, in result order (argmax, prob, sample)."""
        return self.argmax + self.prob + self.sample


NO_READS = Reads()


@dataclass(frozen=True)
class FeedbackPenalty:
    """OpenAI's presence and frequency penalties of a fed-back token (Segment.feedback_penalty), which the
    host does not have when it states the step: the runner subtracts `frequency` from that token's logit,
    and `presence` too unless the token was generated before, on the device before the reads: the logits
    the host would have biased with that token counted (decoding.ar.ARDecoder._logit_bias).
    Segment.logit_bias holds the penalties of the tokens generated before it, after `unseen` pairs of
    tokens not generated yet (a logit_bias entry, a banned EOS): the pairs after those `unseen` name the
    tokens generated before."""

    presence: float
    frequency: float
    unseen: int = 0


@dataclass
class Segment:
    """The next step of one sequence: query tokens to run after its committed cache."""

    seq_id: str
    context_len: int
    token_ids: list[int]
    positions: list[int]
    num_kept: int
    reads: Reads = NO_READS
    branch_lens: list[int] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    # Grammar-constrained decoding: the tokens the segment's argmax and sample rows may produce, one bit
    # per token id (byte t // 8, bit t % 8, least significant first: llguidance's bitmask layout); bits
    # beyond the bytes given are 0. None: every token. Prob rows are not masked.
    token_bitmask: bytes | None = None
    # Log probabilities of the read tokens with this many alternatives each (0 .. MAX_TOP_LOGPROBS;
    # OpenAI `logprobs` / `top_logprobs`); None: none (the step's reads then skip that work).
    logprobs: int | None = None
    # (token, bias) pairs added to the logits of the segment's argmax and sample rows before the token is
    # chosen (OpenAI logit_bias and the presence/frequency penalties an AR decoder computes); prob rows
    # and log probabilities see the logits without them. Empty: none.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # With `logprobs`: each read token's rank too (1 + the tokens more likely; vLLM's `prompt_logprobs`
    # report it). One more pass over the vocabulary per read row of the step, so only prompt scoring asks.
    ranks: bool = False
    # Device-side token feedback (asynchronous scheduling, scheduler.engine): token_ids[0] is a stand-in
    # (any id in the vocab) for the token this sequence's first read returned in the runner's previous
    # step, which the runner substitutes on the device, so this step can be launched before that one's
    # results reach the host (ModelRunner.launch; vLLM's async scheduling, SGLang's overlap scheduler).
    feedback: bool = False
    # With `feedback`: the presence and frequency penalties of the fed-back token, applied on the device on
    # top of `logit_bias` (which holds those of the tokens before it), so that a request with penalties
    # plans ahead too. None: none.
    feedback_penalty: FeedbackPenalty | None = None
    # Grammar-constrained decoding under asynchronous scheduling: the bitmask of the segment's argmax and
    # sample rows is given after the step is launched (ModelRunner.finish_reads), once the host knows the
    # token in flight that the grammar's next state depends on; the runner keeps those rows' logits and
    # makes their reads then (vLLM applies its grammar bitmask after the forward the same way). Needs
    # token_bitmask None and no logits reads.
    deferred_mask: bool = False

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        name = f"segment {self.seq_id}"
        if n == 0:
            raise ValueError(f"{name}: token_ids is empty; a segment needs at least one query token")
        if len(self.positions) != n:
            raise ValueError(f"{name}: token_ids and positions must have equal lengths (got {n}, {len(self.positions)})")
        if not 0 <= self.num_kept <= n:
            raise ValueError(f"{name}: num_kept must lie in 0..{n}, got {self.num_kept}")
        if self.context_len < 0:
            raise ValueError(f"{name}: context_len must be >= 0, got {self.context_len}")
        if self.branch_lens is not None and (sum(self.branch_lens) != n or min(self.branch_lens, default=0) <= 0):
            raise ValueError(f"{name}: branch_lens {self.branch_lens} must be positive and sum to {n}")
        r = self.reads
        if len(r.prob) != len(r.prob_tokens):
            raise ValueError(f"{name}: reads.prob has {len(r.prob)} rows but {len(r.prob_tokens)} prob_tokens")
        for row in r.rows() + r.logits:
            if not 0 <= row < n:
                raise ValueError(f"{name}: read row {row} outside 0..{n - 1}")
        if self.feedback_penalty is not None and not self.feedback:
            raise ValueError(f"{name}: feedback_penalty is the penalty of a fed-back token; set feedback=True "
                             "or put the penalties in logit_bias")
        if self.deferred_mask and (self.token_bitmask is not None or r.logits or not (r.argmax or r.sample)):
            raise ValueError(f"{name}: deferred_mask needs argmax or sample reads, no logits reads and "
                             "token_bitmask None (the bitmask comes with ModelRunner.finish_reads)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"{name}: logprobs must lie in 0..{MAX_TOP_LOGPROBS} or be None, got {self.logprobs}")

    @property
    def num_query(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability and the most likely tokens at its place, best first
    (OpenAI's `logprobs`; semantics in "Reads" above). A token the grammar forced without a forward has
    logprob 0.0 and itself as its only alternative (probability 1 under the grammar's mask). An echoed
    prompt's first token has logprob None and no alternatives (nothing precedes it; the API makes it).
    rank: 1 + the number of tokens more likely than this one at its place (vLLM's `prompt_logprobs`
    report it; 1 for a forced token; None where no read made it or its segment did not set `ranks`)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None

    @classmethod
    def forced(cls, token: int, num_top: int) -> "TokenLogprob":
        return cls(token, 0.0, ((token, 0.0),) if num_top else (), 1)


@dataclass
class SegmentResult:
    """What came back for one segment: tokens[k] / probs[k] answer reads.rows()[k] (argmax, prob,
    sample order); logits[k] is the float32 row of reads.logits[k]; logprobs[k] (only when the segment
    set `logprobs`, else None) is the TokenLogprob of tokens[k]."""

    seq_id: str
    tokens: list[int]
    probs: list[float]
    logits: list[list[float]] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


STEP_LAUNCHED: ContextVar[Callable[[], None] | None] = ContextVar("step_launched", default=None)
"""Set by the caller of a runner's `execute` (scheduler.engine, in the worker thread running the
forward) to learn when the step's device work is queued: the engine streams the previous step's text
while the host then waits for this one's results. None: nobody asks."""


def notify_launched() -> None:
    """A runner calls this once a step's device work is queued, before it waits for the results (on a
    GPU that wait releases the GIL; on the CPU the work is done by then). Calls STEP_LAUNCHED's hook
    once per forward; a runner that never calls it is waited for to the end instead."""
    hook = STEP_LAUNCHED.get()
    if hook is not None:
        STEP_LAUNCHED.set(None)
        hook()
