"""Spec rules of shared/refusion-spec.md that the engine-vs-oracle runs do not reach or cannot tell
apart (strict thresholds, ties, EOS as a slot's first token or in a middle branch, where temperature
noise goes, what TPF counts), driven by hand-made results (no model). Each test names the spec sentence
it checks."""

from __future__ import annotations

from test_state_machines import EOS, PROMPT, _answer, _params, _plan  # the same hand-made request and results

from decoding.refusion import Phase, RefusionDecoder
from workers.batch import Reads


# ---- step 1: "Choose every slot whose confidence exceeds slot_threshold" (strict) ----------------

def test_slot_confidence_equal_to_slot_threshold_is_not_chosen():
    d = RefusionDecoder("r", PROMPT, _params(slot_threshold=0.5))
    _plan(d, [([20, 21, 22, 23], 0.5), ([30, 31, 32, 33], 0.6)])
    verify = d.next_segment(1000)
    assert verify.positions == [9, 10, 11, 12]  # only the slot above; '>=' would verify both


def test_no_confident_slot_and_a_tie_chooses_the_first_slot_by_position():
    # Spec: "if none does, choose the single most confident slot" (ties unspecified; engine and oracle
    # both take the first, the reference's torch.topk(k=1) does not promise it)
    d = RefusionDecoder("r", PROMPT, _params())
    _plan(d, [([20, 21, 22, 23], 0.4), ([30, 31, 32, 33], 0.4)])
    assert d.next_segment(1000).positions == [5, 6, 7, 8]


def test_no_confident_slot_chooses_the_most_confident_not_the_first_or_the_least():
    """Spec step 1: 'if none does, choose the single most confident slot'."""
    d = RefusionDecoder("r", PROMPT, _params(gen_length=24, serial_num_blocks=2))  # slots 5, 9, 13
    _plan(d, [([20, 21, 22, 23], 0.3), ([30, 31, 32, 33], 0.6), ([40, 41, 42, 43], 0.5)])
    assert d.next_segment(1000).positions == [9, 10, 11, 12]


# ---- step 2 / 3: "A token passes if its probability exceeds token_threshold" (strict) --------------

def test_token_probability_equal_to_token_threshold_fails_at_verify_and_in_branches():
    d = RefusionDecoder("r", PROMPT, _params(token_threshold=0.5))
    _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2)])
    _answer(d, d.next_segment(1000), [(-1, 0.5), (-1, 0.9), (-1, 0.9)])
    assert d.phase is Phase.BRANCH_DRAFT and d.branches[0].verified == [True, False, False, False]
    _answer(d, d.next_segment(1000), [(41, 0.3), (42, 0.3), (43, 0.3)])
    verify = d.next_segment(1000)
    assert verify.reads == Reads(prob=(1, 2), prob_tokens=(42, 43))
    _answer(d, verify, [(-1, 0.5), (-1, 0.9)])  # token 2 at exactly the threshold: not verified
    assert d.branches[0].verified == [True, True, False, False]


# ---- step 2: EOS as a slot's first token, pool emptied by EOS --------------------------------------

def test_eos_as_first_token_of_the_lowest_slot_empties_the_pool_and_finishes_before_the_next_block():
    d = RefusionDecoder("r", PROMPT, _params())  # 2 blocks of 8
    _plan(d, [([EOS, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2)])
    _answer(d, d.next_segment(1000), [(-1, 0.1)] * 3)  # token 1 fails: prefix = 1 holds the EOS
    assert d.accepted == {5: EOS} and d.finished and d.output_ids() == [] and d.cache_len == 6
    assert d.next_segment(1000) is None  # block 2 never opened


# ---- step 3 + 4: EOS in a middle branch, an earlier branch unfinished ------------------------------

def _three_branches(d, b_tokens):
    """gen 40, blocks of 20 = slots 5, 9, 13, 17, 21; chosen 9, 13, 17; slot 9 fails at token 1."""
    _plan(d, [([20, 21, 22, 23], 0.2), ([50, 51, 52, 53], 0.95), (b_tokens, 0.95), ([70, 71, 72, 73], 0.95),
              ([80, 81, 82, 83], 0.2)])
    verify = d.next_segment(1000)
    assert verify.positions == list(range(9, 21))
    _answer(d, verify, [(-1, 0.1)] + [(-1, 0.1)] * 8)  # every non-first token fails
    assert d.phase is Phase.BRANCH_DRAFT and len(d.branches) == 3


def test_newly_verified_eos_in_a_middle_branch_stops_later_ones_and_the_earlier_one_finishes():
    d = RefusionDecoder("r", PROMPT, _params(gen_length=40, serial_num_blocks=2))
    _three_branches(d, [60, 61, 62, 63])
    draft = d.next_segment(1000)
    assert draft.branch_lens == [4, 4, 4] and not draft.sampling.gumbel
    # drafts: A 1..3, B 1..3 (EOS at B[1]), C 1..3
    _answer(d, draft, [(54, .3), (55, .3), (56, .3), (EOS, .3), (65, .3), (66, .3), (74, .3), (75, .3), (76, .3)])
    verify = d.next_segment(1000)
    # A token 2 fails, B token 1 (EOS) passes by rule, C anything
    _answer(d, verify, [(-1, 0.1), (-1, 0.1), (-1, 0.1), (-1, 0.1), (-1, 0.1), (-1, 0.1)])
    assert [b.start for b in d.branches] == [9, 13] and d.branches[1].complete  # C stopped
    assert d.branches[0].verified == [True, True, False, False]
    draft = d.next_segment(1000)
    assert draft.branch_lens == [4] and draft.positions == [9, 10, 11, 12]  # only A drafts
    _answer(d, draft, [(57, .3), (58, .3)])
    verify = d.next_segment(1000)
    assert verify.branch_lens == [4, 4] and verify.positions == list(range(9, 17))
    _answer(d, verify, [(-1, 0.9)])
    # commit: A whole, B up to and including its EOS; pool: 5 kept (before), 21 dropped (after the EOS slot)
    assert d.accepted == {9: 50, 10: 54, 11: 57, 12: 58, 13: 60, 14: EOS}
    assert d.pool.starts == [5] and d.cache_len == 5 + 6 and d.phase is Phase.PLAN
    _plan(d, [([20, 21, 22, 23], 0.2)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 3)
    assert d.finished and d.output_ids() == [20, 21, 22, 23, 50, 54, 57, 58, 60]


def test_eos_as_first_token_of_a_later_branch_counts_in_the_first_round():
    d = RefusionDecoder("r", PROMPT, _params(gen_length=40, serial_num_blocks=2))
    _three_branches(d, [EOS, 61, 62, 63])
    _answer(d, d.next_segment(1000), [(54, .3), (55, .3), (56, .3), (64, .3), (65, .3), (66, .3), (74, .3),
                                      (75, .3), (76, .3)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 6)  # A completes this round
    # B's first token (always verified) is EOS: B is the EOS branch from round 1, C stopped, 21 dropped
    assert d.accepted == {9: 50, 10: 54, 11: 55, 12: 56, 13: EOS} and d.pool.starts == [5]
    assert d.stats.forwards == 2 + 2 and d.finish_after_block


# ---- "Gumbel-max noise ... on the drafting argmax": the plan only, never slot completion's drafts ----

def test_temperature_leaves_slot_completion_drafts_plain_argmax():
    d = RefusionDecoder("r", PROMPT, _params(temperature=0.7, seed=5))
    plan = _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2)])
    assert plan.sampling.gumbel
    _answer(d, d.next_segment(1000), [(-1, 0.1)] * 3)
    draft = d.next_segment(1000)
    assert d.phase is Phase.BRANCH_DRAFT and draft.reads.argmax and not draft.sampling.gumbel
    _answer(d, draft, [(41, 0.3), (42, 0.3), (43, 0.3)])
    assert not d.next_segment(1000).sampling.gumbel


# ---- "TPF = generated tokens / model forwards": the decoding loop's forwards, not prompt chunks -------

def test_tokens_per_forward_counts_the_decoding_forwards_not_prompt_chunks():
    # The spec's TPF is a property of its decoding loop (plan, verify, completion); a prompt fed in
    # budget-sized chunks is counted apart (prefill_forwards), so TPF does not depend on the token budget
    d = RefusionDecoder("r", PROMPT, _params(gen_length=4, serial_num_blocks=1))
    runs = 0
    while not d.finished:
        seg = d.next_segment(2)
        runs += 1
        if d.phase is Phase.PREFILL:
            _answer(d, seg, [])
        elif d.phase is Phase.PLAN:
            _answer(d, seg, [(20, 0.95), (21, 0.5), (22, 0.5), (23, 0.5)])
        else:
            _answer(d, seg, [(-1, 0.9)] * 3)
    assert runs == 5 and d.stats.generated_tokens == 4  # 3 prompt chunks (2+2+1), the plan, the verify
    assert d.stats.prefill_forwards == 3 and d.stats.forwards == 2 and d.stats.tokens_per_forward == 2.0


# ---- steps 2 and 4: "drop every pool slot from the EOS slot on", not from the first chosen slot ------
# A pool slot positioned between the first chosen slot and the EOS slot was not chosen: it stays in the
# pool and is decoded, else the text has a hole there. (Found by a mutation audit: dropping from the
# first chosen slot passed every other test, engine-vs-oracle runs included.)

def test_eos_at_verify_keeps_unchosen_pool_slots_before_the_eos_slot():
    """Spec step 2, 'If prefix holds an EOS': drop every pool slot from the EOS slot on (by position:
    not from the first chosen slot, nor from the EOS slot's index among the chosen)."""
    d = RefusionDecoder("r", PROMPT, _params(gen_length=40, serial_num_blocks=2))  # block 1: slots 5..21
    _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2), ([40, 41, 42, 43], 0.2),
              ([60, EOS, 62, 63], 0.95), ([70, 71, 72, 73], 0.2)])
    verify = d.next_segment(1000)
    assert verify.positions == [5, 6, 7, 8, 17, 18, 19, 20]
    _answer(d, verify, [(-1, 0.9)] * 6)  # everything passes: the prefix holds slot 17's EOS
    assert d.accepted == {5: 20, 6: 21, 7: 22, 8: 23, 17: 60, 18: EOS}
    assert d.pool.starts == [9, 13] and d.phase is Phase.PLAN  # 21 dropped; 9 and 13 kept
    _plan(d, [([30, 31, 32, 33], 0.95), ([40, 41, 42, 43], 0.95)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 6)
    assert d.finished and d.output_ids() == [20, 21, 22, 23, 30, 31, 32, 33, 40, 41, 42, 43, 60]


def test_eos_in_completion_keeps_unchosen_pool_slots_before_the_eos_branch():
    """Spec step 4: if an EOS was committed, drop every pool slot positioned after the EOS slot (the
    EOS slot's position: not the first branch's, nor the EOS branch's index into the pool, the seed's bug)."""
    d = RefusionDecoder("r", PROMPT, _params(gen_length=40, serial_num_blocks=2))  # block 1: slots 5..21
    _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2), ([40, 41, 42, 43], 0.2),
              ([60, 61, 62, 63], 0.95), ([70, 71, 72, 73], 0.2)])
    verify = d.next_segment(1000)
    assert verify.positions == [5, 6, 7, 8, 17, 18, 19, 20]
    _answer(d, verify, [(-1, 0.1)] * 6)  # no whole slot: branches 5 and 17
    assert [b.start for b in d.branches] == [5, 17]
    _answer(d, d.next_segment(1000), [(24, .3), (25, .3), (26, .3), (EOS, .3), (65, .3), (66, .3)])
    _answer(d, d.next_segment(1000), [(-1, 0.9), (-1, 0.9), (-1, 0.1), (-1, 0.1)])  # 5 completes; 17: EOS
    assert d.accepted == {5: 20, 6: 24, 7: 25, 8: 26, 17: 60, 18: EOS}
    assert d.pool.starts == [9, 13] and d.phase is Phase.PLAN  # 21 dropped; 9 and 13 kept
    _plan(d, [([30, 31, 32, 33], 0.95), ([40, 41, 42, 43], 0.95)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 6)
    assert d.finished and d.output_ids() == [20, 24, 25, 26, 30, 31, 32, 33, 40, 41, 42, 43, 60]


# ---- "cut at the first EOS": with logprobs, the EOS entry reported is the first EOS's in the text -----

def test_eos_logprob_is_the_first_eos_in_text_order_when_a_slot_before_it_ends_on_eos_later():
    """Spec, end of the loop: 'sort accepted tokens by logical position and cut at the first EOS'. An EOS
    committed first (slot 13) finishes the request after the block, but a pool slot before it (5) is
    decoded later and ends on an EOS of its own: that one ends the text, and eos_logprob (Decoder API:
    the EOS the text ended on) is its entry, not the later-positioned EOS's."""
    from workers.batch import SegmentResult, TokenLogprob

    def answer(d, seg, values, logprob):
        rows = seg.reads.argmax or seg.reads.prob
        tokens = [t for t, _ in values] if seg.reads.argmax else list(seg.reads.prob_tokens)
        assert len(values) == len(rows)
        d.absorb(SegmentResult(seg.seq_id, [t for t, _ in values], [p for _, p in values],
                               logprobs=[TokenLogprob(t, logprob) for t in tokens]))

    def plan_values(drafts):
        return [(t, conf if j == 0 else 0.5) for tokens, conf in drafts for j, t in enumerate(tokens)]

    d = RefusionDecoder("r", PROMPT, _params(gen_length=24, serial_num_blocks=2, logprobs=1))  # slots 5, 9, 13
    answer(d, d.next_segment(1000), plan_values([([20, 21, 22, 23], 0.2), ([30, 31, 32, 33], 0.2),
                                                 ([60, EOS, 62, 63], 0.95)]), -3.0)
    answer(d, d.next_segment(1000), [(-1, 0.9)] * 3, -2.0)  # slot 13 up to its EOS at 14 (verify read)
    assert d.accepted == {13: 60, 14: EOS} and d.pool.starts == [5, 9] and d.finish_after_block
    answer(d, d.next_segment(1000), plan_values([([EOS, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2)]), -1.0)
    answer(d, d.next_segment(1000), [(-1, 0.1)] * 3, -2.5)  # prefix 1: slot 5's first token, an EOS
    assert d.finished and d.output_ids() == [] and sorted(p for p, t in d.accepted.items() if t == EOS) == [5, 14]
    assert d.eos_logprob() == TokenLogprob(EOS, -1.0)  # position 5's plan read, not position 14's


# ---- step 2: "If prefix holds an EOS" -- any of the model's end tokens is EOS (DecodeParams.ends) ----

def test_another_end_token_in_the_verify_prefix_ends_the_text_as_eos_does():
    """Spec step 2, EOS in the prefix; a model's other end tokens (end_token_ids) are EOS wherever the
    spec names it: slot 9 is cut just after it, the later slot 13 is dropped, the request finishes."""
    END = 7
    d = RefusionDecoder("r", PROMPT, _params(gen_length=24, serial_num_blocks=2, end_token_ids=(END,)))
    _plan(d, [([20, 21, 22, 23], 0.95), ([30, END, 32, 33], 0.95), ([40, 41, 42, 43], 0.2)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 6)
    assert d.accepted == {5: 20, 6: 21, 7: 22, 8: 23, 9: 30, 10: END} and d.pool.starts == []
    assert d.finished and d.output_ids() == [20, 21, 22, 23, 30]
