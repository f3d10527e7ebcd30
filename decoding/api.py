"""What every decoder offers the engine, and the typed errors of bad decoding parameters.

Engine step for one request (the scheduler packs many of these into one forward):

    segment = decoder.next_segment(budget)     # None: nothing to run this step (finished)
    result = runner.execute([... segment ...])  # one packed forward for all requests
    decoder.absorb(result)                      # advance the state machine

`budget` is the most query tokens the scheduler grants this step. Decoders honour it for prompt
prefill (chunked: a long prompt is fed in budget-sized kept chunks with no reads) and may exceed it
only for a step that cannot be split (a ReFusion plan of the whole pool); the scheduler then decides
whether to run it now or next step. A segment once returned is the decoder's next step: the scheduler
runs exactly that segment (holding it across steps when needed) before it calls next_segment again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from workers.batch import Segment, SegmentResult, TokenLogprob


class DecodeParamError(ValueError):
    """A decoding parameter is invalid. `field` names it; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass
class DecodeStats:
    """Per-request counters. tokens_per_forward = generated_tokens / forwards (the spec's TPF): `forwards`
    counts the decoding loop's forwards (plan, verify, slot completion; AR steps), not pure prompt chunks,
    which `prefill_forwards` counts, so TPF does not depend on the prefill token budget."""

    forwards: int = 0
    prefill_forwards: int = 0
    generated_tokens: int = 0
    slots_accepted_at_verify: int = 0
    slots_accepted_after_completion: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forwards if self.forwards else 0.0

    @property
    def wall_time_s(self) -> float:
        return max(0.0, self.finished_at - self.started_at) if self.finished_at else 0.0


@dataclass
class Handoff:
    """The state one decoder hands to another at a block boundary (AR <-> ReFusion switch).

    prompt_ids + generated_ids is the text so far, contiguous from position 0; the first `cached_len`
    of those tokens have KV in the sequence's cache (in any physical order). The receiving decoder
    feeds what is not cached yet and continues for `remaining` more tokens.

    Infill: `suffix_ids` sit at logical positions right after the generation span
    (len(prompt_ids) + len(generated_ids) + remaining, ...); the first `suffix_cached_len` of them are
    in the cache too (the cache then holds cached_len + suffix_cached_len tokens).
    """

    prompt_ids: list[int]
    generated_ids: list[int]
    cached_len: int
    remaining: int
    stats: DecodeStats = field(default_factory=DecodeStats)
    suffix_ids: list[int] = field(default_factory=list)
    suffix_cached_len: int = 0
    # TokenLogprob of each generated id, when the request asks for log probabilities (else empty).
    generated_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Tokens of the current semi-AR block generated before the handoff: ReFusion's next block boundary
    # stays where it was (0 at a boundary: a mode switch; a preempted rerun retracing its sent text
    # may hand off inside a block, scheduler/replay.py)
    block_done: int = 0


class Decoder(Protocol):
    """A per-request decoding state machine (see decoding.refusion and decoding.ar)."""

    seq_id: str
    stats: DecodeStats

    @property
    def finished(self) -> bool: ...

    @property
    def cache_len(self) -> int:
        """Tokens whose KV is computed and absorbed (context fed so far plus accepted generated tokens);
        a step launched ahead is not counted until absorbed (scheduler.kv.share_prompt_blocks)."""

    def next_segment(self, budget: int) -> Segment | None:
        """The query tokens this request needs run next, or None once finished."""

    def absorb(self, result: SegmentResult) -> None:
        """Take the runner's answer to the last segment and advance."""

    def skip_cached_prompt(self, num_tokens: int) -> None:
        """The first num_tokens prompt tokens are already in the cache (prefix-cache hit): don't feed them."""

    def stream_ids(self) -> list[int]:
        """Generated ids in text order that are final and contiguous from the generation start
        (excludes EOS and anything after it). Grows monotonically; the engine streams its deltas."""

    def output_ids(self) -> list[int]:
        """All generated ids in text order, up to and excluding the first EOS (final once finished)."""

    def stream_logprobs(self, start: int, end: int) -> list[TokenLogprob]:
        """The TokenLogprob of stream_ids()[start:end] (params.logprobs set; else empty): each token's
        log probability under the read that accepted it (AR: its read; ReFusion: a slot's first token
        its plan read, the others their verify read, or in slot completion the last read of the token)."""

    def eos_logprob(self) -> TokenLogprob | None:
        """params.logprobs set and the text ended on an EOS token: that EOS's TokenLogprob (the token is
        not part of stream_ids/output_ids; OpenAI's completions list it last, as vLLM does); else None."""

    def prompt_scores(self) -> list[TokenLogprob] | None:
        """params.prompt_logprobs set and the whole prompt scored: the TokenLogprob of prompt tokens
        1 .. P-1 (token k given tokens 0 .. k-1; decoding.context); else None (not asked, not scored
        yet, or a decoder continuing a handoff, which has nothing of the prompt to score)."""

    def at_block_boundary(self) -> bool:
        """True when a mode switch may happen now (no slot, branch or tentative KV in flight)."""

    def handoff(self) -> Handoff:
        """Export the state for another decoder; only valid at a block boundary."""
