"""The AR decoder's part in asynchronous scheduling (scheduler/plan_ahead.py; vLLM's async scheduling):
the step after the one in flight, stated before that one's result is back, its token fed back on the
device (`plan_ahead`), and what undoes or completes such a step (`drop_ahead`, `host_segment`,
`deferred_bitmask` for a grammar's or token healing's mask given after launch). `ARPlanAhead` is a part of
decoding.ar.ARDecoder, on its state; serial decoding (decoding/ar.py) never calls it.
"""

from __future__ import annotations

import dataclasses

from decoding.ar_phase import ARPhase
from workers.batch import FeedbackPenalty, Reads, Sampling, Segment


class ARPlanAhead:
    """Steps planned ahead of the host's view (see the module docstring)."""

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
        With a grammar, or healed blanks not yet written (decoding.healing: the step in flight's token may
        write them, or only some), the step's bitmask is given after launch (Segment.deferred_mask),
        from `deferred_bitmask` once the step in flight is absorbed. When the step in flight feeds a token
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
            penalty = FeedbackPenalty(p.presence_penalty, p.frequency_penalty, len(bias) - self._bias.counted)
        # (the step in flight keeps its num_kept tokens: the last generated one, or the first step's context)
        self._ahead = Segment(self.seq_id, seg.context_len + seg.num_kept, [0], [position], 1, reads,
                              sampling=sampling, logprobs=p.logprobs, logit_bias=bias, feedback=True,
                              feedback_penalty=penalty,
                              deferred_mask=self.constraint is not None or self.healing_pending)
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
        once the step before it is absorbed: the grammar's state after the token it feeds, or token
        healing's (workers.runner.ModelRunner.finish_reads). None (every token) when its read is
        discarded, the request finished, or that token wrote the last healed blanks. Raises RuntimeError
        for another segment; DecodeParamError when the grammar allows no token
        (decoding.grammar.TokenConstraint.bitmask)."""
        if segment is not self._in_flight or not segment.deferred_mask:
            raise RuntimeError(f"{self.seq_id}: deferred_bitmask asks for the step in flight with deferred_mask")
        if self._moot or self.finished:
            return None
        return self._bitmask()

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
