"""ReFusion decoding of one request as a state machine (shared/refusion-spec.md, "Decoding loop").

    PREFILL -> PLAN -> VERIFY -+-> (commit whole slots / EOS) -> PLAN | NEXT_BLOCK | FINISHED
                               +-> BRANCH_DRAFT <-> BRANCH_VERIFY -> (commit) -> PLAN | NEXT_BLOCK | FINISHED

Each state but NEXT_BLOCK and FINISHED is one forward; the decoder never calls the model. It states
the segment (`next_segment`) and advances on the result (`absorb`), so the scheduler can pack many
requests into one forward. Spec step by step:
  1 PLAN          pool slots as MASK tokens after the cache (drop); ARGMAX reads, Gumbel noise when
                  temperature > 0; confidence = softmax(logits)[x0] of a slot's first token.
  2 VERIFY        chosen drafts in position order, clean, kept; shifted PROB reads. Whole verified
                  slots (or up to an EOS) stay in the cache; context_len rolls back the rest.
  3 BRANCH_*      slot completion, see decoding.branches.
  4 commit        in absorb: accepted tokens extend the committed cache length.
Details the spec leaves implicit follow the reference implementation (see decoding.refusion_plan).

Stats: `forwards` counts every forward of the request except pure prompt chunks (`prefill_forwards`);
the first plan carries the prompt tail. Infill: `suffix_ids` are fed with the first segment, as clean
kept tokens right after the generation span (decoding.context). Handoff: `handoff()` at a block
boundary (PREFILL or NEXT_BLOCK, nothing in flight); `from_handoff` continues another decoder's text,
and output_ids()/stream_ids() then include the handed-off text.
"""

from __future__ import annotations

import time
from enum import Enum

from decoding.api import DecodeParamError, DecodeStats, Handoff
from decoding.branches import Branch, absorb_drafts, absorb_verification, draft_segment, stop_after_eos, verify_segment
from decoding.context import start_context
from decoding.params import DecodeParams, first_end
from decoding.refusion_plan import Draft, SlotPool, choose_slots, split_blocks, verify_prefix
from workers.batch import Reads, Sampling, Segment, SegmentResult, TokenLogprob


class Phase(Enum):
    PREFILL = "prefill"  # prompt chunks, kept, no reads (but those scoring the prompt: decoding.context)
    PLAN = "plan"  # spec step 1
    VERIFY = "verify"  # spec step 2
    BRANCH_DRAFT = "branch_draft"  # spec step 3, draft forward of a round
    BRANCH_VERIFY = "branch_verify"  # spec step 3, verify forward of a round
    NEXT_BLOCK = "next_block"  # block's pool empty; the next block opens at the next step
    FINISHED = "finished"


class RefusionDecoder:
    """ReFusion state machine for one request (implements decoding.api.Decoder)."""

    def __init__(
        self,
        seq_id: str,
        prompt_ids: list[int],
        params: DecodeParams,
        *,
        suffix_ids: list[int] | None = None,
        _handoff: Handoff | None = None,
    ):
        self.seq_id = seq_id
        self.params = params
        h = _handoff
        self.prompt_ids = list(prompt_ids)
        # prior_ids: generated before a handoff to us
        self.prior_ids, span, self.feed = start_context(prompt_ids, params.gen_length, suffix_ids, h,
                                                        params.prompt_logprobs)
        if span % params.slot_size:
            raise DecodeParamError("remaining", f"{span} tokens left is not a multiple of slot_size {params.slot_size}")
        self.gen_start = len(self.prompt_ids) + len(self.prior_ids)
        self.pool = SlotPool(self.gen_start, split_blocks(span, params.block_length, h.block_done if h else 0),
                             params.slot_size)
        self.stats = h.stats if h else DecodeStats()
        self.phase = Phase.PREFILL if span else Phase.FINISHED
        self.accepted: dict[int, int] = {}  # logical position -> token, every committed generated token
        self.accepted_logprobs: dict[int, TokenLogprob] = {}  # the same positions (params.logprobs set)
        self.prior_logprobs: list[TokenLogprob] = list(h.generated_logprobs) if h else []
        self._stream_run: list[int] = []  # accepted tokens contiguous from gen_start, EOS excluded (stream_ids)
        self._output: list[int] | None = None  # accepted tokens in position order up to EOS (output_ids), or None
        self.gen_cached = 0  # generated tokens in the cache (committed)
        self.finish_after_block = False
        self.chosen: list[Draft] = []
        self.branches: list[Branch] = []
        self._in_flight: Segment | None = None
        self._layout: list = []
        self._context_in_flight = 0
        if self.phase is Phase.FINISHED:
            self._finish()

    @classmethod
    def from_handoff(cls, seq_id: str, handoff: Handoff, params: DecodeParams) -> "RefusionDecoder":
        """Continue a request another decoder started (AR -> ReFusion at a block boundary)."""
        return cls(seq_id, handoff.prompt_ids, params, _handoff=handoff)

    # ---- Decoder protocol -------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def cache_len(self) -> int:
        """Committed tokens in the sequence's cache: context fed so far plus accepted generated tokens."""
        return self.feed.cache_len + self.gen_cached

    def skip_cached_prompt(self, num_tokens: int) -> None:
        self.feed.skip(num_tokens)

    def next_segment(self, budget: int) -> Segment | None:
        if self.finished:
            return None
        if self._in_flight is not None:
            raise RuntimeError(f"{self.seq_id}: absorb the result of the previous segment first")
        if not self.stats.started_at:
            self.stats.started_at = time.monotonic()
        if self.phase is Phase.NEXT_BLOCK:
            self.pool.open_next_block()
            self.phase = Phase.PLAN
        if self.phase is Phase.PREFILL:
            pending = self.feed.pending
            if pending and (pending + self.pool.num_tokens > max(1, budget) or self.feed.scoring):
                self._in_flight = self._prefill_segment(min(pending, max(1, budget)))
                return self._in_flight
            self.phase = Phase.PLAN
        build = {
            Phase.PLAN: self._plan_segment,
            Phase.VERIFY: self._verify_segment,
            Phase.BRANCH_DRAFT: self._branch_draft_segment,
            Phase.BRANCH_VERIFY: self._branch_verify_segment,
        }[self.phase]
        self._in_flight = build()
        return self._in_flight

    def absorb(self, result: SegmentResult) -> None:
        segment, self._in_flight = self._in_flight, None
        if segment is None:
            raise RuntimeError(f"{self.seq_id}: absorb() without a segment in flight")
        if result.seq_id != self.seq_id or len(result.tokens) != len(segment.reads):
            raise ValueError(
                f"{self.seq_id}: result for {result.seq_id} has {len(result.tokens)} values "
                f"for {len(segment.reads)} reads"
            )
        if self.phase is Phase.PREFILL:
            self.feed.consume(len(segment.token_ids), result.logprobs)
            self.stats.prefill_forwards += 1
            return
        self.stats.forwards += 1
        {
            Phase.PLAN: self._absorb_plan,
            Phase.VERIFY: self._absorb_verify,
            Phase.BRANCH_DRAFT: self._absorb_branch_draft,
            Phase.BRANCH_VERIFY: self._absorb_branch_verify,
        }[self.phase](list(zip(result.tokens, result.probs)), result.logprobs)

    def stream_ids(self) -> list[int]:
        # The contiguous run from gen_start only grows (accepted tokens are never taken back), so it is
        # extended from where the previous call stopped: per step O(new tokens), not O(generated).
        run, accepted, ends = self._stream_run, self.accepted, self.params.ends
        pos = self.gen_start + len(run)
        while pos in accepted and accepted[pos] not in ends:
            run.append(accepted[pos])
            pos += 1
        return self.prior_ids + run

    def output_ids(self) -> list[int]:
        # Asked several times per step (token counts, streaming, mode switches); `accepted` changes only
        # in _commit, which drops the cached list.
        if self._output is None:
            accepted = self.accepted
            tokens = [accepted[pos] for pos in sorted(accepted)]
            end = first_end(tokens, self.params.ends)
            self._output = tokens[:end] if end is not None else tokens
        return self.prior_ids + self._output

    def stream_logprobs(self, start: int, end: int) -> list[TokenLogprob]:
        prior, accepted = self.prior_logprobs, self.accepted_logprobs
        first = self.gen_start - len(prior)  # logical position of stream index 0's generated twin
        return prior[start:end] + [accepted[first + i] for i in range(max(start, len(prior)), end)]

    def eos_logprob(self) -> TokenLogprob | None:
        if self.params.logprobs is None:
            return None
        ends = self.params.ends
        first = min((pos for pos, token in self.accepted.items() if token in ends), default=None)
        return self.accepted_logprobs.get(first) if first is not None else None

    def prompt_scores(self) -> list[TokenLogprob] | None:
        return self.feed.scores()

    def at_block_boundary(self) -> bool:
        return self._in_flight is None and self.phase in (Phase.PREFILL, Phase.NEXT_BLOCK)

    def handoff(self) -> Handoff:
        if not self.at_block_boundary():
            raise RuntimeError(f"{self.seq_id}: handoff only at a block boundary (phase {self.phase.value})")
        generated = self.output_ids()
        return Handoff(
            prompt_ids=self.prompt_ids,
            generated_ids=generated,
            cached_len=self.feed.cached + self.gen_cached,
            remaining=self.pool.span_end - (len(self.prompt_ids) + len(generated)),
            stats=self.stats,
            suffix_ids=self.feed.suffix_ids,
            suffix_cached_len=self.feed.suffix_in_cache,
            generated_logprobs=self.stream_logprobs(0, len(generated)) if self.params.logprobs is not None else [],
        )

    # ---- segments ---------------------------------------------------------------------------------

    def _sampling(self, gumbel: bool) -> Sampling:
        """The segment's randomness. `step` = decode forwards so far (prefill chunks, which depend on the
        budget, do not count; carried across a handoff by the stats) keys the counter-based draws, so a
        request rerun from scratch, or batched differently, draws the same numbers."""
        p, st = self.params, self.stats
        return Sampling(p.temperature, p.top_k, p.top_p, p.min_p, p.seed, gumbel=gumbel and p.temperature > 0,
                        step=st.forwards)

    def _prefill_segment(self, n: int) -> Segment:
        tokens, positions = self.feed.peek(n)
        return Segment(self.seq_id, self.cache_len, tokens, positions, n, self.feed.prompt_reads(n),
                       sampling=self._sampling(False), logprobs=self.feed.score_top,
                       ranks=self.feed.score_top is not None)

    def _plan_segment(self) -> Segment:
        """Spec step 1: [uncached context, keep] + [every pool slot as MASK tokens, drop]."""
        ctx_tokens, ctx_positions = self.feed.peek(self.feed.pending)
        self._context_in_flight = len(ctx_tokens)
        mask_positions = self.pool.mask_positions()
        n_ctx, n_mask = len(ctx_tokens), len(mask_positions)
        return Segment(
            self.seq_id,
            self.cache_len,
            ctx_tokens + [self.params.mask_token_id] * n_mask,
            ctx_positions + mask_positions,
            n_ctx,
            Reads(argmax=tuple(range(n_ctx, n_ctx + n_mask))),
            sampling=self._sampling(gumbel=True),
            logprobs=self.params.logprobs,
        )

    def _verify_segment(self) -> Segment:
        """Spec step 2: chosen drafts concatenated in position order, clean, kept; row k-1 scores token k."""
        tokens = [t for d in self.chosen for t in d.tokens]
        positions = [d.start + j for d in self.chosen for j in range(len(d.tokens))]
        s = self.params.slot_size
        scored = [k for k in range(len(tokens)) if k % s]
        reads = Reads(prob=tuple(k - 1 for k in scored), prob_tokens=tuple(tokens[k] for k in scored))
        return Segment(self.seq_id, self.cache_len, tokens, positions, len(tokens), reads,
                       sampling=self._sampling(False), logprobs=self.params.logprobs)

    def _branch_draft_segment(self) -> Segment:
        segment, self._layout = draft_segment(
            self.seq_id, self.cache_len, self.branches, self.params.mask_token_id, self._sampling(False),
            self.params.logprobs,
        )
        return segment

    def _branch_verify_segment(self) -> Segment:
        segment, self._layout = verify_segment(self.seq_id, self.cache_len, self.branches, self._sampling(False),
                                               self.params.logprobs)
        return segment

    # ---- absorbing results ------------------------------------------------------------------------

    def _absorb_plan(self, values: list[tuple[int, float]], logprobs: list[TokenLogprob] | None) -> None:
        self.feed.consume(self._context_in_flight)
        self.chosen = choose_slots(self.pool.starts, values, self.params.slot_size, self.params.slot_threshold,
                                   logprobs)
        self.phase = Phase.VERIFY

    def _absorb_verify(self, values: list[tuple[int, float]], logprobs: list[TokenLogprob] | None) -> None:
        p = self.params
        tokens = [t for d in self.chosen for t in d.tokens]
        entries = None
        if p.logprobs is not None:  # a slot's first token: its plan read; the others: their verify read
            scored = iter(logprobs or ())
            entries = [d.entries[0] if j == 0 else next(scored) for d in self.chosen for j in range(len(d.tokens))]
        verdict = verify_prefix(self.chosen, [prob for _, prob in values], p.slot_size, p.token_threshold)
        eos_at = next((k for k in range(verdict.prefix) if tokens[k] in p.ends), None)
        if eos_at is not None:
            last = eos_at // p.slot_size  # chosen slot holding the first EOS
            self._commit(tokens[: eos_at + 1], self.chosen[: last + 1], entries)
            self.pool.drop_from(self.chosen[last].start)
            self.finish_after_block = True
            self.stats.slots_accepted_at_verify += last + 1
        elif verdict.prefix >= p.slot_size:
            whole = verdict.prefix // p.slot_size
            self._commit(tokens[: whole * p.slot_size], self.chosen[:whole], entries)
            self.stats.slots_accepted_at_verify += whole
        else:
            # No whole slot verified: the verify KV is rolled back (context_len stays), complete in branches.
            s = p.slot_size
            slot_entries = [entries[i * s:(i + 1) * s] for i in range(len(self.chosen))] if entries is not None else None
            self.branches = [Branch(d.start, list(d.tokens), list(v), slot_entries[i] if slot_entries else None)
                             for i, (d, v) in enumerate(zip(self.chosen, verdict.slot_flags))]
            self.phase = Phase.BRANCH_DRAFT
            return
        self._after_commit()

    def _absorb_branch_draft(self, values: list[tuple[int, float]], logprobs: list[TokenLogprob] | None) -> None:
        absorb_drafts(self.branches, self._layout, values, logprobs)
        self.phase = Phase.BRANCH_VERIFY

    def _absorb_branch_verify(self, values: list[tuple[int, float]], logprobs: list[TokenLogprob] | None) -> None:
        p = self.params
        absorb_verification(self.branches, self._layout, values, p.token_threshold, logprobs)
        eos_branch = stop_after_eos(self.branches, p.ends)
        if not all(br.complete for br in self.branches):
            self.phase = Phase.BRANCH_DRAFT
            return
        # Spec step 4: the last verify forward left every slot in the cache, in slot order.
        tokens = [t for br in self.branches for t in br.tokens]
        if eos_branch is not None:
            tokens = tokens[: first_end(tokens, p.ends) + 1]
        entries = [e for br in self.branches for e in br.entries] if p.logprobs is not None else None
        self._commit(tokens, self.branches, entries)
        for d in self.chosen:
            self.pool.remove(d.start)
        if eos_branch is not None:
            self.pool.drop_from(self.branches[eos_branch].start)
            self.finish_after_block = True
        self.stats.slots_accepted_after_completion += len(self.branches)
        self.branches = []
        self._after_commit()

    def _commit(self, tokens: list[int], slots, entries: list[TokenLogprob] | None = None) -> None:
        """Accept `tokens` (the slots' tokens in slot order; `entries` their log probabilities, when
        asked for); they are the first KV rows just kept."""
        positions = [s.start + j for s in slots for j in range(self.params.slot_size)]
        for pos, tok in zip(positions, tokens):
            self.accepted[pos] = tok
        for pos, entry in zip(positions, entries or ()):
            self.accepted_logprobs[pos] = entry
        self._output = None
        for s in slots:
            self.pool.remove(s.start)
        self.gen_cached += len(tokens)

    def _after_commit(self) -> None:
        self.chosen = []
        if self.pool.starts:
            self.phase = Phase.PLAN
        elif self.finish_after_block or self.pool.is_last_block:
            self._finish()
        else:
            self.phase = Phase.NEXT_BLOCK

    def _finish(self) -> None:
        self.phase = Phase.FINISHED
        self.stats.generated_tokens = len(self.output_ids())
        self.stats.finished_at = time.monotonic()
