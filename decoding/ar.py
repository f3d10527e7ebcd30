"""Autoregressive decoding of one request on the same Decoder interface as ReFusion (the AR fallback).

    PREFILL (prompt chunks, kept, no reads unless scoring the prompt) -> DECODE (one token per forward) -> FINISHED

DECODE feeds the last generated token (clean, kept) at its position and reads the next one from its
row: an argmax read when temperature == 0, else a sample read (temperature, top-k, top-p; counter-based
draws keyed by the request's seed and step, so they do not depend on the batch).

The first generation step carries the uncached context plus a MASK token at the first generation
position p (a mask at p predicts the token at p itself; its KV is dropped), and the first token is read
from that mask row, never from the last context row. Three reasons: after a ReFusion handoff the whole
text is cached already and there is no last row to read; with an infill suffix the last row fed is a
suffix token; and ReFusion's training objective gives prompt tokens no labels, so "last prompt row ->
first response token" is never trained, while "mask at p -> token at p" is trained in every example.

With a grammar (decoding.grammar.TokenConstraint) every read carries the bitmask of the tokens the
grammar allows next, and the request ends when the grammar is complete (as on EOS). Tokens the grammar
forces (a JSON schema's next key, a tool call's fixed text) are appended without a forward of their
own ("jump-forward", as SGLang): the next step feeds every generated token without KV yet (kept) and
reads after the last, so one forward yields the forced run plus the next token. A step never feeds
more than the scheduler's budget: a longer run is fed in kept chunks without reads first.
Under asynchronous scheduling a grammar request plans its decode steps ahead too: the step's mask is
given after launch (Segment.deferred_mask; `deferred_bitmask`), once the token in flight is absorbed.
Should that token bring forced tokens, the step planned ahead has fed it at the wrong moment for a
read: its read is discarded (a forward without a read, as a forced-token chunk's), and the step after
it, planned ahead from the host, feeds the forced run and reads after it, as a serial step would.

Token healing (decoding.healing.HealingConstraint): after a prompt whose trailing blanks were left
out, every read while the output's blanks fall short of them carries the bitmask of the tokens that
write them (the detokenizer drops that much leading blank text); meanwhile the decoder is at no block
boundary (ReFusion, which takes no mask, waits until they are written), and a step planned ahead gets
its mask after launch, as a grammar's.

Parts: the states (decoding/ar_phase.py), steps planned ahead under asynchronous scheduling
(decoding/ar_ahead.py), the logit bias with penalties and bans (decoding/logit_bias.py).
"""

from __future__ import annotations

import dataclasses
import time

from decoding.api import DecodeStats, Handoff
from decoding.ar_ahead import ARPlanAhead
from decoding.ar_phase import ARPhase
from decoding.context import start_context
from decoding.grammar import TokenConstraint
from decoding.healing import HealingConstraint
from decoding.logit_bias import LogitBias
from decoding.params import DecodeParams
from workers.batch import Reads, Sampling, Segment, SegmentResult, TokenLogprob


class ARDecoder(ARPlanAhead):
    """Autoregressive state machine for one request (implements decoding.api.Decoder)."""

    def __init__(
        self,
        seq_id: str,
        prompt_ids: list[int],
        params: DecodeParams,
        *,
        suffix_ids: list[int] | None = None,
        constraint: TokenConstraint | None = None,
        healing: HealingConstraint | None = None,
        _handoff: Handoff | None = None,
    ):
        self.seq_id = seq_id
        if constraint is not None and healing is not None:
            raise ValueError(f"{seq_id}: token healing is not applied with a grammar (the grammar decides the text)")
        if constraint is not None and params.end_token_ids:
            # The grammar decides where its text ends (it allows EOS once complete and masks the model's other
            # special end tokens); an end id that is a plain token ("." in a generation_config) is its text
            params = dataclasses.replace(params, end_token_ids=())
        self.params = params
        self.constraint = constraint
        self.healing = healing  # the healed blanks not yet written (module doc); None without
        h = _handoff
        self.prompt_ids = list(prompt_ids)
        self.prior_ids, self.span, self.feed = start_context(prompt_ids, params.gen_length, suffix_ids, h,
                                                             params.prompt_logprobs)
        self.gen_start = len(self.prompt_ids) + len(self.prior_ids)
        self.stats = h.stats if h else DecodeStats()
        self.generated: list[int] = []
        self._end_at: int | None = None  # index in `generated` of the end token that ended the text
        # params.logprobs set: TokenLogprob of prior_ids + generated (the handed-off ones first)
        self.logprobs: list[TokenLogprob] = list(h.generated_logprobs) if h else []
        self.gen_cached = 0  # generated tokens whose KV is in the cache
        self._bias = LogitBias(params)  # the client's logit_bias, the penalties, the bans (_logit_bias)
        self.phase = ARPhase.PREFILL if self.span > 0 else ARPhase.FINISHED
        self._in_flight: Segment | None = None
        self._ahead: Segment | None = None  # planned while _in_flight runs (plan_ahead); in flight after it
        self._ahead_prefill: tuple[int, bool] | None = None  # _ahead's (_context_in_flight, _first_step)
        self._first_step = False
        self._context_in_flight = 0
        self._catch_up = 0  # generated tokens fed by the decode step in flight without a read (jump-forward)
        self._catch_up_forwards = 0  # such forwards so far: their number depends on the step budgets
        # the step in flight was planned ahead with a deferred mask before the token it feeds brought
        # forced tokens: its read is discarded (deferred_bitmask gives None; absorb keeps only its KV)
        self._moot = False
        self.ended_on_eos = False  # EOS read, or the grammar complete: a natural end even at gen_length
        if constraint is not None and self.phase is not ARPhase.FINISHED:  # a grammar may force its start
            self.generated = constraint.initial_forced[: self.span]  # consumed by the matcher already
            self._record_forced(self.generated)
            # Complete only if the whole forced start fits: the matcher consumed all of it, a cut one is not
            self.ended_on_eos = constraint.stopped and len(constraint.initial_forced) <= self.span
            if constraint.stopped or len(self.generated) >= self.span:
                self.phase = ARPhase.FINISHED
        if self.phase is ARPhase.FINISHED:
            self._finish()

    @classmethod
    def from_handoff(cls, seq_id: str, handoff: Handoff, params: DecodeParams) -> "ARDecoder":
        """Continue a request another decoder started (ReFusion -> AR at a block boundary)."""
        return cls(seq_id, handoff.prompt_ids, params, _handoff=handoff)

    @classmethod
    def resume(cls, seq_id: str, handoff: Handoff, params: DecodeParams,
               constraint: TokenConstraint | None = None, healing: HealingConstraint | None = None) -> "ARDecoder":
        """Continue ids this request's own run made, its context (prompt and infill suffix) in the cache and
        those ids not (a preempted rerun retracing what it streamed: scheduler/replay.py): the first step
        feeds them (kept) and reads the next token after the last one, as that run read each token, not
        from a mask row as after a mode switch (module doc); the next read's step (its random draws) is
        the one that run would have used (exact without a grammar: forced tokens count no step).
        `constraint`: a grammar request's matcher after those ids; `healing`: a healed prompt's
        constraint after them."""
        if handoff.cached_len != len(handoff.prompt_ids) or handoff.suffix_cached_len != len(handoff.suffix_ids):
            raise ValueError(f"{seq_id}: resume needs the whole context cached")
        made = list(handoff.generated_ids)
        dec = cls(seq_id, handoff.prompt_ids, params, suffix_ids=handoff.suffix_ids, constraint=constraint,
                  healing=healing)
        dec.feed.consume(dec.feed.pending)
        dec.generated, dec.gen_cached, dec.ended_on_eos = made, 0, False
        dec.logprobs, dec.stats = list(handoff.generated_logprobs), handoff.stats
        dec._catch_up_forwards = dec.stats.forwards - len(made)  # the unpreempted run read token len(made) at that step
        dec.phase = ARPhase.DECODE if len(made) < dec.span else ARPhase.FINISHED
        return dec

    @property
    def grammar_ms(self) -> float:
        """CPU milliseconds its grammar took to match the last token (decoding.grammar.TokenConstraint:
        consume, forced tokens, next bitmask): what its next step is expected to cost the engine loop
        (scheduler.Scheduler takes turns among the slow ones); 0 without a grammar."""
        return self.constraint.last_token_ms if self.constraint is not None else 0.0

    @property
    def finished(self) -> bool:
        return self.phase is ARPhase.FINISHED

    @property
    def cache_len(self) -> int:
        return self.feed.cache_len + self.gen_cached

    @property
    def next_position(self) -> int:
        return self.gen_start + len(self.generated)

    def skip_cached_prompt(self, num_tokens: int) -> None:
        self.feed.skip(num_tokens)

    def next_segment(self, budget: int) -> Segment | None:
        if self.finished:
            return None
        if self._in_flight is not None:
            raise RuntimeError(f"{self.seq_id}: absorb the result of the previous segment first")
        if not self.stats.started_at:
            self.stats.started_at = time.monotonic()
        # Generated tokens without KV: the last one read, plus any the grammar forced (jump-forward);
        # before the first read, only forced ones.
        forced = self.generated[self.gen_cached:]
        start = self.gen_start + self.gen_cached
        forced_positions = list(range(start, start + len(forced)))
        budget = max(1, budget)
        if self.phase is ARPhase.DECODE:
            if len(forced) > budget:
                return self._catch_up_segment(forced, forced_positions, budget)
            self._in_flight = self._segment(forced, forced_positions, len(forced), self.cache_len)
            return self._in_flight
        tokens, positions = self.feed.peek(self.feed.pending)
        step = self._context_step(tokens, positions, forced, forced_positions, self.cache_len, budget)
        if step is None:
            return self._catch_up_segment(forced, forced_positions, budget)
        self._in_flight, (self._context_in_flight, self._first_step) = step
        return self._in_flight

    def _context_step(self, tokens: list[int], positions: list[int], forced: list[int], forced_positions: list[int],
                      context_len: int, budget: int) -> tuple[Segment, tuple[int, bool]] | None:
        """The step that feeds context `tokens` (not yet cached, at `positions`) after `context_len` cached
        tokens: a prompt chunk (kept; no reads but those scoring the prompt, params.prompt_logprobs) when
        the context, the forced tokens and the read do not fit `budget`, else the first generation step
        ([context + forced tokens, kept] + [MASK at the first position to read, dropped]). With the
        context tokens it feeds and whether it is the first step; None when the forced tokens alone
        exceed the budget (a catch-up chunk comes first)."""
        if tokens and (len(tokens) + len(forced) + 1 > budget or self.feed.scoring):
            n = min(budget, len(tokens))
            chunk = Segment(self.seq_id, context_len, tokens[:n], positions[:n], n, self.feed.prompt_reads(n),
                            sampling=self._sampling(), logprobs=self.feed.score_top,
                            ranks=self.feed.score_top is not None)
            return chunk, (n, False)
        if len(forced) + 1 > budget:
            return None
        first = self._segment(tokens + forced + [self.params.mask_token_id],
                              positions + forced_positions + [self.next_position], len(tokens) + len(forced),
                              context_len)
        return first, (len(tokens), True)

    def _catch_up_segment(self, forced: list[int], positions: list[int], budget: int) -> Segment:
        """A run of forced tokens longer than the budget: its first `budget` tokens, kept, no reads."""
        self._catch_up = budget
        self._in_flight = Segment(self.seq_id, self.cache_len, forced[:budget], positions[:budget], budget,
                                  sampling=self._sampling())
        return self._in_flight

    def absorb(self, result: SegmentResult) -> None:
        segment, self._in_flight, self._ahead = self._in_flight, self._ahead, None
        if segment is None:
            raise RuntimeError(f"{self.seq_id}: absorb() without a segment in flight")
        context, first = self._context_in_flight, self._first_step  # (this segment's)
        if self._ahead_prefill is not None:  # the step now in flight is a prompt chunk or first step planned ahead
            (self._context_in_flight, self._first_step), self._ahead_prefill = self._ahead_prefill, None
        if result.seq_id != self.seq_id or len(result.tokens) != len(segment.reads):
            raise ValueError(f"{self.seq_id}: result has {len(result.tokens)} values for {len(segment.reads)} reads")
        if self._catch_up or self._moot:  # forced tokens, or a discarded read: a generation forward without a read
            self.gen_cached += self._catch_up or 1
            self._catch_up, self._moot = 0, False
            self.stats.forwards += 1
            self._catch_up_forwards += 1
            return
        if self.phase is ARPhase.PREFILL:
            self.feed.consume(context, None if first else result.logprobs)
            if not first:
                self.stats.prefill_forwards += 1
                return
        self.gen_cached = len(self.generated)  # every generated token so far was fed (the new one is not)
        self.stats.forwards += 1
        token = result.tokens[0]
        self.generated.append(token)
        if self.params.logprobs is not None:
            self.logprobs.append(result.logprobs[0])
        eos = token in self.params.ends
        if eos and self._end_at is None:
            self._end_at = len(self.generated) - 1
        if self.constraint is not None and not eos:
            self.constraint.consume(token)
            forced = self.constraint.fast_forward(self.span - len(self.generated))
            self.generated += forced
            self._record_forced(forced)
            eos = self.constraint.stopped  # the grammar is complete: it allows only EOS now
            # a step planned ahead feeds this token alone: its read would skip the forced run
            self._moot = bool(forced) and self._in_flight is not None
        if self.healing is not None:
            self.healing.consume(token)
        self.ended_on_eos = eos
        if eos or len(self.generated) >= self.span:
            self._finish()
        else:
            self.phase = ARPhase.DECODE

    def stream_ids(self) -> list[int]:
        return self.output_ids()

    def output_ids(self) -> list[int]:
        # Called a few times per step per request (streaming, token counts): no scan of the generated
        # tokens (an O(n) search per end id per call); the end token is known from when it was read.
        generated = self.generated if self._end_at is None else self.generated[: self._end_at]
        return self.prior_ids + generated

    def stream_logprobs(self, start: int, end: int) -> list[TokenLogprob]:
        return self.logprobs[start:end]

    def eos_logprob(self) -> TokenLogprob | None:
        if self.params.logprobs is None:
            return None
        n = len(self.output_ids())  # self.logprobs covers prior_ids + generated, the EOS included
        entry = self.logprobs[n] if n < len(self.logprobs) else None
        return entry if entry is not None and entry.token in self.params.ends else None

    def prompt_scores(self) -> list[TokenLogprob] | None:
        return self.feed.scores()

    def _record_forced(self, tokens: list[int]) -> None:
        """Tokens the grammar forced (no read): probability 1 under the grammar's mask."""
        if self.params.logprobs is not None:
            self.logprobs += [TokenLogprob.forced(t, self.params.logprobs) for t in tokens]

    def at_block_boundary(self) -> bool:
        """Between tokens, when the tokens left fill whole ReFusion blocks (so both modes share one grid)."""
        remaining = self.span - len(self.generated)
        return (self._in_flight is None and not self.finished and not self.healing_pending
                and remaining % self.params.block_length == 0)

    @property
    def healing_pending(self) -> bool:
        """Whether healed blanks are still to be written (every read masked: module doc)."""
        return self.healing is not None and self.healing.pending

    def boundary_after_step(self) -> bool:
        """Whether absorbing the decode step in flight (one generated token) leaves the decoder at a block
        boundary (at_block_boundary then; scheduler.mode_switch.switch_may_follow asks before a step is
        planned ahead)."""
        return (self.span - len(self.generated) - 1) % self.params.block_length == 0

    def handoff(self) -> Handoff:
        if self.constraint is not None:
            raise RuntimeError(f"{self.seq_id}: a grammar-constrained request stays on the AR path")
        if self.healing_pending:
            raise RuntimeError(f"{self.seq_id}: the healed blanks are not written yet (ReFusion takes no mask)")
        if not self.at_block_boundary():
            raise RuntimeError(f"{self.seq_id}: handoff only at a block boundary")
        return Handoff(
            prompt_ids=self.prompt_ids,
            generated_ids=self.prior_ids + self.generated,
            cached_len=self.feed.cached + self.gen_cached,
            remaining=self.span - len(self.generated),
            stats=self.stats,
            suffix_ids=self.feed.suffix_ids,
            suffix_cached_len=self.feed.suffix_in_cache,
            generated_logprobs=list(self.logprobs),
        )

    def _sampling(self) -> Sampling:
        """`step` = decode forwards with a read so far keys the draws (prefill and forced-token chunks,
        whose number depends on the step budgets and so on the load, do not count; carried across a
        handoff by the stats), so a seeded request draws the same numbers alone or in a busy batch."""
        p, st = self.params, self.stats
        return Sampling(p.temperature, p.top_k, p.top_p, p.min_p, p.seed, step=st.forwards - self._catch_up_forwards)

    def _segment(self, tokens: list[int], positions: list[int], num_kept: int, context_len: int) -> Segment:
        last = (len(tokens) - 1,)
        reads = Reads(argmax=last) if self.params.temperature == 0 else Reads(sample=last)
        return Segment(self.seq_id, context_len, tokens, positions, num_kept, reads, sampling=self._sampling(),
                       token_bitmask=self._bitmask(), logprobs=self.params.logprobs, logit_bias=self._logit_bias())

    def _bitmask(self) -> bytes | None:
        """The tokens the next read may produce, from the host's state: the grammar's, or token healing's
        while the healed blanks are not written; None (every token) otherwise."""
        if self.constraint is not None:
            return self.constraint.bitmask()
        return self.healing.bitmask() if self.healing_pending else None

    def _logit_bias(self, in_flight: int = 0) -> tuple[tuple[int, float], ...]:
        """The step's (token, bias) pairs (decoding.logit_bias.LogitBias): the client's logit_bias, the
        presence and frequency penalties of the text so far, and the bans. `in_flight`: generated tokens
        not yet on the host (plan_ahead's one), counted for min_tokens."""
        return self._bias.pairs(self.prior_ids, self.generated, in_flight)

    def _finish(self) -> None:
        self.phase = ARPhase.FINISHED
        self.stats.generated_tokens = len(self.output_ids())
        self.stats.finished_at = time.monotonic()
