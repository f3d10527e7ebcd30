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
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from enum import Enum

from decoding.api import DecodeStats, Handoff
from decoding.context import start_context
from decoding.grammar import TokenConstraint
from decoding.params import DecodeParams
from workers.batch import TOKEN_BAN, FeedbackPenalty, Reads, Sampling, Segment, SegmentResult, TokenLogprob



class ARPhase(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


class ARDecoder:
    """Autoregressive state machine for one request (implements decoding.api.Decoder)."""

    def __init__(
        self,
        seq_id: str,
        prompt_ids: list[int],
        params: DecodeParams,
        *,
        suffix_ids: list[int] | None = None,
        constraint: TokenConstraint | None = None,
        _handoff: Handoff | None = None,
    ):
        self.seq_id = seq_id
        if constraint is not None and params.end_token_ids:
            # The grammar decides where its text ends (it allows EOS once complete and masks the model's other
            # special end tokens); an end id that is a plain token ("." in a generation_config) is its text
            params = dataclasses.replace(params, end_token_ids=())
        self.params = params
        self.constraint = constraint
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
        self._counts: Counter | None = None  # penalties: counts of prior_ids + generated[:_counted]
        self._counted = 0
        # penalties: the logit_bias entries of tokens not counted yet, and each counted token's bias
        self._uncounted: dict[int, float] = {}
        self._penalized: dict[int, float] = {}
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

    def plan_ahead(self, budget: int = 1) -> Segment | None:
        """The step after the one in flight, stated before that one's result is back (asynchronous
        scheduling, scheduler.engine; vLLM's async scheduling).

        After a decode step or the first generation step (its context and the mask that reads the first
        token): one token, at the next position, the token the step in flight reads, which the runner
        takes from that step's read on the device (Segment.feedback); its draws are keyed by the step
        counter that step will have (`_sampling`). A logit bias and an EOS ban (ignore_eos, min_tokens)
        carry over: they depend on how many tokens are generated, not on which (so benchmark clients that
        send vLLM's ignore_eos keep the pipeline). Presence and frequency penalties carry over too: those
        of the tokens on the host in the bias, the fed-back token's own added on the device
        (Segment.feedback_penalty).
        After a prompt chunk (a prompt longer than the step budget): the next chunk, or the first
        generation step, exactly as `next_segment(budget)` will state it once the chunk is absorbed (the
        prompt is on the host; `budget`: the step's tokens left).
        With a grammar, the step's bitmask is given after launch (Segment.deferred_mask), from
        `deferred_bitmask` once the step in flight is absorbed. When the step in flight feeds a token
        that brought forced tokens (its read is discarded), the step after it is known on the host: the
        forced run, kept, and a read after it under the grammar's bitmask, as `next_segment` will state
        it (no feedback). A grammar request sits the step out (`sits_out_ahead`) when the step in flight
        is a prompt chunk or a forced-token chunk, or when such a forced run does not fit `budget`.
        None when the next step depends on the step in flight's token on the host: prompt scoring (its
        chunks read the prompt); when the step in flight may be the last (it reads the span's last
        token); or when a step is planned ahead already. The next
        `absorb` takes the result of the step in flight; the one after takes this step's. If the step in
        flight ends the request (EOS), this step is wasted: the caller drops its result and frees its
        KV, as for a cancel."""
        seg, p = self._in_flight, self.params
        if seg is None or self._ahead is not None or self._catch_up or self.sits_out_ahead(budget):
            return None
        if self._moot:  # the forced run after the token the step in flight feeds, then a read
            forced = self.generated[self.gen_cached + 1:]
            start = self.gen_start + self.gen_cached + 1
            self._ahead = self._segment(forced, list(range(start, start + len(forced))), len(forced),
                                        seg.context_len + seg.num_kept)
            return self._ahead
        if self.phase is ARPhase.PREFILL and not self._first_step:
            return self._prefill_ahead(seg, budget)
        first = self.phase is ARPhase.PREFILL and self._first_step  # the first generation step is in flight
        decoding = self.phase is ARPhase.DECODE and bool(seg.reads)  # (a grammar's forced run fed before its read too)
        if not (first or decoding) or len(self.generated) + 1 >= self.span:
            return None
        position = self.gen_start + len(self.generated)  # the token the step in flight reads goes here
        reads = Reads(argmax=(0,)) if p.temperature == 0 else Reads(sample=(0,))
        sampling = Sampling(p.temperature, p.top_k, p.top_p, p.min_p, p.seed,
                            step=self.stats.forwards + 1 - self._catch_up_forwards)
        bias = self._logit_bias(in_flight=1)
        penalty = None
        if p.presence_penalty or p.frequency_penalty:  # (_logit_bias counted the tokens on the host)
            penalty = FeedbackPenalty(p.presence_penalty, p.frequency_penalty, len(bias) - len(self._penalized))
        # (the step in flight keeps its num_kept tokens: the last generated one, or the first step's context)
        self._ahead = Segment(self.seq_id, seg.context_len + seg.num_kept, [0], [position], 1, reads,
                              sampling=sampling, logprobs=p.logprobs, logit_bias=bias, feedback=True,
                              feedback_penalty=penalty, deferred_mask=self.constraint is not None)
        return self._ahead

    def sits_out_ahead(self, budget: int = 1) -> bool:
        """Whether a grammar request plans no step ahead now but can be planned from the host once its
        step in flight is absorbed (scheduler.Scheduler.plan_ahead leaves it out of the step planned
        ahead, and the others keep the pipeline): the step in flight is a prompt chunk or a chunk of
        forced tokens, or its read is discarded (the token it feeds brought forced tokens) and that
        forced run and a read do not fit `budget` (a catch-up chunk comes first)."""
        if self.constraint is None or self._in_flight is None:
            return False
        forced = len(self.generated) - self.gen_cached - 1  # (with _moot: the run after the fed token)
        return bool(self._catch_up) or self.chunk_in_flight or (self._moot and forced + 1 > budget)

    def deferred_bitmask(self, segment: Segment) -> bytes | None:
        """The token bitmask of `segment`, the step in flight that plan_ahead stated with deferred_mask,
        once the step before it is absorbed: the grammar's state after the token it feeds
        (workers.runner.ModelRunner.finish_reads). None (every token) when its read is discarded or the
        request finished. Raises RuntimeError for another segment; DecodeParamError when the grammar
        allows no token (decoding.grammar.TokenConstraint.bitmask)."""
        if segment is not self._in_flight or not segment.deferred_mask:
            raise RuntimeError(f"{self.seq_id}: deferred_bitmask asks for the step in flight with deferred_mask")
        if self._moot or self.finished:
            return None
        return self.constraint.bitmask()

    def _prefill_ahead(self, chunk: Segment, budget: int) -> Segment | None:
        """The step after the prompt chunk in flight (`plan_ahead`): next_segment's prefill branch on the
        context left once that chunk is consumed."""
        if self.feed.scoring or self.span <= 0:  # (scored chunks read the prompt from the feed's cursor)
            return None
        tokens, positions = self.feed.peek(self.feed.pending)
        tokens, positions = tokens[self._context_in_flight:], positions[self._context_in_flight:]
        # (no forced tokens: a grammar request sits prompt chunks out, sits_out_ahead)
        self._ahead, self._ahead_prefill = self._context_step(tokens, positions, [], [],
                                                              chunk.context_len + chunk.num_kept, max(1, budget))
        return self._ahead

    @property
    def chunk_in_flight(self) -> bool:
        """Whether the step in flight is a prompt chunk (before the first generation step)."""
        return self._in_flight is not None and self.phase is ARPhase.PREFILL and not self._first_step

    def ends_with_step_in_flight(self) -> bool:
        """Whether the step in flight reads the span's last token: nothing follows it (plan_ahead returns
        None; the scheduler then plans nothing for this request rather than drain the pipeline)."""
        return self._in_flight is not None and self.phase is not ARPhase.FINISHED and self._catch_up == 0 and (
            self.phase is ARPhase.DECODE or self._first_step) and len(self.generated) + 1 >= self.span

    def drop_ahead(self, segment: Segment) -> None:
        """Forget `segment`, a step `plan_ahead` stated that will not run (not launched, or abandoned); the next
        step is planned by next_segment from the state the absorbed results left."""
        if self._ahead is segment:
            self._ahead, self._ahead_prefill = None, None
        elif self._in_flight is segment:
            self._in_flight, self._moot = None, False  # (the token it fed is fed again, with the forced run)

    def host_segment(self, segment: Segment) -> Segment:
        """A step `plan_ahead` stated, with its fed-back token given from the host: the first generated
        token without KV, once the step before it is absorbed (the engine re-runs a failed step so), its
        logit bias counting it, and a deferred mask given (`deferred_bitmask`)."""
        mask = self.deferred_bitmask(segment) if segment.deferred_mask else None
        return dataclasses.replace(segment, token_ids=[self.generated[self.gen_cached]], feedback=False,
                                   feedback_penalty=None, logit_bias=self._logit_bias(), token_bitmask=mask,
                                   deferred_mask=False)

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
        return self._in_flight is None and not self.finished and remaining % self.params.block_length == 0

    def boundary_after_step(self) -> bool:
        """Whether absorbing the decode step in flight (one generated token) leaves the decoder at a block
        boundary (at_block_boundary then; scheduler.mode_switch.switch_may_follow asks before a step is
        planned ahead)."""
        return (self.span - len(self.generated) - 1) % self.params.block_length == 0

    def handoff(self) -> Handoff:
        if self.constraint is not None:
            raise RuntimeError(f"{self.seq_id}: a grammar-constrained request stays on the AR path")
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
        mask = self.constraint.bitmask() if self.constraint is not None else None
        return Segment(self.seq_id, context_len, tokens, positions, num_kept, reads, sampling=self._sampling(),
                       token_bitmask=mask, logprobs=self.params.logprobs, logit_bias=self._logit_bias())

    def _logit_bias(self, in_flight: int = 0) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias plus the presence and frequency penalties of the text so far (handed-off
        text included), and bans (TOKEN_BAN, replacing the token's bias): each generated token's logit
        loses presence + frequency x its count; the mask token is banned always (it is an input marker,
        never text: the shipped model sampled it at temperature 0.7; the runner leaves it out of the top
        alternatives too, workers.results.token_logprobs), and EOS under vLLM's ignore_eos or while fewer
        than min_tokens are generated.
        `in_flight`: generated tokens not yet on the host (plan_ahead's one), counted for min_tokens;
        the penalties are of the tokens on the host (the runner adds the one in flight's:
        Segment.feedback_penalty). With penalties, the pairs of tokens not generated come first."""
        p = self.params
        ban_eos = p.ignore_eos or len(self.generated) + in_flight < p.min_tokens
        banned = (p.mask_token_id, *p.ends) if ban_eos else (p.mask_token_id,)
        user = p.logit_bias or {}
        if not (p.presence_penalty or p.frequency_penalty):
            return tuple({**user, **dict.fromkeys(banned, TOKEN_BAN)}.items())
        # Counted as tokens arrive, and only their entries updated: recomputing every entry each step cost
        # O(distinct tokens) interpreted work per request per step (63 us at 128 tokens)
        if self._counts is None:
            self._counts, self._counted, self._uncounted = Counter(), 0, dict(user)
            new = self.prior_ids + self.generated
        else:
            new = self.generated[self._counted:]
        self._counted = len(self.generated)
        for token in new:
            count = self._counts[token] + 1
            self._counts[token] = count
            self._uncounted.pop(token, None)
            self._penalized[token] = user.get(token, 0.0) - p.presence_penalty - p.frequency_penalty * count
        uncounted, penalized = self._uncounted, self._penalized
        for token in banned:  # (the ban replaces the token's bias, wherever it is)
            if token in penalized:
                penalized = {**penalized, token: TOKEN_BAN}
            else:
                uncounted = {**uncounted, token: TOKEN_BAN}
        # The tokens not counted first, then the counted ones (FeedbackPenalty.unseen relies on the order)
        return tuple(uncounted.items()) + tuple(penalized.items())

    def _finish(self) -> None:
        self.phase = ARPhase.FINISHED
        self.stats.generated_tokens = len(self.output_ids())
        self.stats.finished_at = time.monotonic()
