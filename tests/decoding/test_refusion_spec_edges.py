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
