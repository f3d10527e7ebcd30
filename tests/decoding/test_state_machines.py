"""The decoders' segments and transitions, driven by hand-made results (no model, no torch)."""

from __future__ import annotations

import pytest

from decoding.api import DecodeParamError
from decoding.ar import ARDecoder
from decoding.loop import decode_batch
from decoding.params import DecodeParams
from decoding.refusion import Phase, RefusionDecoder
from workers.batch import Reads, SegmentResult

EOS, MASK = 0, 2
PROMPT = [10, 11, 12, 13, 14]  # positions 0..4; generation starts at 5


def _params(**kw) -> DecodeParams:
    base = dict(gen_length=16, slot_size=4, serial_num_blocks=2, slot_threshold=0.9, token_threshold=0.5)
    return DecodeParams(eos_token_id=EOS, mask_token_id=MASK, **(base | kw))


def _answer(decoder, segment, values):
    decoder.absorb(SegmentResult(segment.seq_id, [t for t, _ in values], [p for _, p in values]))


def _plan(decoder, drafts: list[tuple[list[int], float]]):
    """Answer a plan: per pool slot (tokens, first-token confidence)."""
    seg = decoder.next_segment(1000)
    values = [(t, conf if j == 0 else 0.5) for tokens, conf in drafts for j, t in enumerate(tokens)]
    assert len(values) == len(seg.reads)
    _answer(decoder, seg, values)
    return seg


def test_plan_verify_accepts_a_whole_slot_and_replans_the_rest():
    d = RefusionDecoder("r", PROMPT, _params())
    seg = _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2)])
    assert seg.token_ids == PROMPT + [MASK] * 8 and seg.positions == list(range(13))
    assert seg.num_kept == 5 and seg.context_len == 0
    assert seg.reads == Reads(argmax=tuple(5 + i for i in range(8)))
    assert not seg.sampling.gumbel
    seg = d.next_segment(1000)  # verify only the confident slot
    assert (seg.token_ids, seg.positions, seg.context_len) == ([20, 21, 22, 23], [5, 6, 7, 8], 5)
    assert seg.num_kept == 4 and seg.branch_lens is None
    assert seg.reads == Reads(prob=(0, 1, 2), prob_tokens=(21, 22, 23))
    _answer(d, seg, [(-1, 0.9)] * 3)
    assert d.accepted == {5: 20, 6: 21, 7: 22, 8: 23} and d.cache_len == 9
    assert d.stats.slots_accepted_at_verify == 1 and d.stream_ids() == [20, 21, 22, 23]
    seg = d.next_segment(1000)  # re-plan: only the remaining slot, after the committed cache
    assert seg.token_ids == [MASK] * 4 and seg.positions == [9, 10, 11, 12] and seg.context_len == 9


def test_a_verified_eos_counts_every_slot_up_to_the_one_it_is_in():
    """EOS inside the second verified slot: both slots are accepted at verify (stats), the text ends at
    the EOS and the block is the last."""
    d = RefusionDecoder("r", PROMPT, _params())
    _plan(d, [([20, 21, 22, 23], 0.95), ([30, EOS, 32, 33], 0.97)])
    verify = d.next_segment(1000)
    _answer(d, verify, [(-1, 0.9)] * 6)
    assert d.stats.slots_accepted_at_verify == 2 and d.stream_ids() == [20, 21, 22, 23, 30]
    assert d.finish_after_block


def test_no_whole_slot_goes_to_branches_with_tree_segments():
    d = RefusionDecoder("r", PROMPT, _params())
    _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.97)])
    verify = d.next_segment(1000)
    # slot 0: token 1 fails; slot 1: tokens 1, 2 pass, 3 fails
    _answer(d, verify, [(-1, p) for p in (0.1, 0.9, 0.9, 0.9, 0.9, 0.1)])
    assert d.phase is Phase.BRANCH_DRAFT and d.cache_len == 5  # verify KV rolled back
    assert [b.verified for b in d.branches] == [[True, False, False, False], [True, True, True, False]]
    draft = d.next_segment(1000)
    assert draft.token_ids == [20, MASK, MASK, MASK, 30, 31, 32, MASK]
    assert draft.branch_lens == [4, 4] and draft.num_kept == 0
    assert draft.reads == Reads(argmax=(1, 2, 3, 7)) and not draft.sampling.gumbel
    _answer(d, draft, [(41, 0.3), (42, 0.3), (43, 0.3), (44, 0.3)])
    verify = d.next_segment(1000)
    assert verify.token_ids == [20, 41, 42, 43, 30, 31, 32, 44] and verify.num_kept == 8
    assert verify.branch_lens == [4, 4]
    # token 1 of each branch whose predecessor was unverified needs a probability; others pass
    assert verify.reads == Reads(prob=(1, 2), prob_tokens=(42, 43))
    _answer(d, verify, [(-1, 0.1), (-1, 0.9)])
    assert [b.verified for b in d.branches] == [[True, True, False, False], [True] * 4]
    draft = d.next_segment(1000)
    assert draft.token_ids == [20, 41, MASK, MASK] and draft.branch_lens == [4]  # complete branch 1 left out
    _answer(d, draft, [(45, 0.3), (46, 0.3)])
    verify = d.next_segment(1000)
    _answer(d, verify, [(-1, 0.0)])  # token 3's predecessor was unverified and it fails: only token 2 gains
    assert d.branches[0].verified == [True, True, True, False]
    _answer(d, d.next_segment(1000), [(47, 0.3)])
    _answer(d, d.next_segment(1000), [])  # every token's predecessor is verified: no reads at all
    assert d.phase is Phase.NEXT_BLOCK and d.at_block_boundary()
    assert d.stream_ids() == [20, 41, 45, 47, 30, 31, 32, 44] and d.cache_len == 13
    assert d.stats.slots_accepted_after_completion == 2 and d.stats.forwards == 2 + 2 * 3


def test_eos_in_the_verify_prefix_drops_later_slots_and_finishes_after_the_block():
    d = RefusionDecoder("r", PROMPT, _params(gen_length=24, serial_num_blocks=2))  # blocks of 12: 3 slots
    _plan(d, [([20, 21, 22, 23], 0.2), ([30, EOS, 32, 33], 0.95), ([40, 41, 42, 43], 0.2)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 3)
    assert d.accepted == {9: 30, 10: EOS} and d.pool.starts == [5] and d.cache_len == 7
    _plan(d, [([20, 21, 22, 23], 0.95)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 3)
    assert d.finished and d.output_ids() == [20, 21, 22, 23, 30] == d.stream_ids()
    assert d.stats.generated_tokens == 5 and d.stats.forwards == 4
    assert d.next_segment(1000) is None


def test_stream_ids_only_grow_contiguously():
    d = RefusionDecoder("r", PROMPT, _params(gen_length=8, serial_num_blocks=1))
    _plan(d, [([20, 21, 22, 23], 0.2), ([30, 31, 32, 33], 0.95)])
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 3)
    assert d.stream_ids() == [] and d.output_ids() == [30, 31, 32, 33]  # slot 2 done, slot 1 not yet
    _plan(d, [([20, 21, 22, 23], 0.2)])  # fallback: the single slot left
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 3)
    assert d.finished and d.stream_ids() == [20, 21, 22, 23, 30, 31, 32, 33]


def test_prompt_prefill_is_chunked_by_budget_and_skips_a_cached_prefix():
    d = RefusionDecoder("r", list(range(10, 20)), _params(gen_length=8, serial_num_blocks=1))
    d.skip_cached_prompt(3)
    sizes = []
    while d.phase is Phase.PREFILL:
        seg = d.next_segment(4)
        if d.phase is not Phase.PREFILL:
            break
        sizes.append((seg.context_len, seg.positions, seg.reads))
        _answer(d, seg, [])
    assert sizes == [(3, [3, 4, 5, 6], Reads()), (7, [7, 8, 9], Reads())]
    assert seg.context_len == 10 and seg.token_ids == [MASK] * 8  # the plan may exceed the budget
    assert d.stats.prefill_forwards == 2
    with pytest.raises(ValueError):
        d.skip_cached_prompt(2)


def test_temperature_puts_gumbel_noise_on_the_plan_only():
    d = RefusionDecoder("r", PROMPT, _params(temperature=0.7, seed=5))
    seg = _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.2)])
    assert seg.sampling.gumbel and seg.sampling.temperature == 0.7 and seg.sampling.seed == 5
    assert not d.next_segment(1000).sampling.gumbel


def test_protocol_misuse_raises():
    d = RefusionDecoder("r", PROMPT, _params())
    with pytest.raises(RuntimeError):
        d.absorb(SegmentResult("r", [], []))
    seg = d.next_segment(1000)
    with pytest.raises(RuntimeError):
        d.next_segment(1000)
    with pytest.raises(RuntimeError):
        d.handoff()  # a plan is in flight: not a block boundary
    with pytest.raises(ValueError):
        _answer(d, seg, [(1, 0.5)])
    with pytest.raises(DecodeParamError) as info:
        RefusionDecoder("r", [], _params())
    assert info.value.field == "prompt_ids"


def test_ar_feeds_a_mask_first_then_one_token_per_step():
    d = ARDecoder("a", PROMPT, _params(gen_length=8, serial_num_blocks=1))
    seg = d.next_segment(1000)
    assert seg.token_ids == PROMPT + [MASK] and seg.positions == [0, 1, 2, 3, 4, 5]
    assert seg.num_kept == 5 and seg.reads == Reads(argmax=(5,))
    _answer(d, seg, [(30, 0.9)])
    seg = d.next_segment(1000)
    assert (seg.token_ids, seg.positions, seg.num_kept, seg.context_len) == ([30], [5], 1, 5)
    _answer(d, seg, [(31, 0.9)])
    _answer(d, d.next_segment(1000), [(EOS, 0.9)])
    assert d.finished and d.output_ids() == [30, 31] and d.stats.forwards == 3


def test_ar_sampling_reads_and_chunked_prefill():
    d = ARDecoder("a", PROMPT, _params(temperature=0.9, top_k=5, top_p=0.8, seed=3))
    seg = d.next_segment(2)
    assert seg.positions == [0, 1] and len(seg.reads) == 0
    _answer(d, seg, [])
    _answer(d, d.next_segment(2), [])
    seg = d.next_segment(2)
    assert seg.positions == [4, 5] and seg.reads == Reads(sample=(1,))
    assert (seg.sampling.temperature, seg.sampling.top_k, seg.sampling.top_p, seg.sampling.seed) == (0.9, 5, 0.8, 3)
    assert d.stats.prefill_forwards == 2


def test_ar_block_boundaries_and_handoff():
    d = ARDecoder("a", PROMPT, _params(gen_length=16, serial_num_blocks=2))  # blocks of 8
    for tok in range(30, 38):
        _answer(d, d.next_segment(1000), [(tok, 0.9)])
        assert d.at_block_boundary() == (tok == 37)
    h = d.handoff()
    assert (h.generated_ids, h.cached_len, h.remaining) == (list(range(30, 38)), 12, 8)
    r = RefusionDecoder.from_handoff("a", h, _params(gen_length=16, serial_num_blocks=2))
    seg = r.next_segment(1000)
    assert seg.context_len == 12 and seg.token_ids == [37] + [MASK] * 8 and seg.positions == list(range(12, 21))


class _FailingSession:
    def __init__(self):
        self.freed = []

    def execute(self, segments):
        raise RuntimeError("device lost")

    def free(self, seq_id):
        self.freed.append(seq_id)


def test_decode_batch_frees_sequences_when_the_forward_fails():
    runner = _FailingSession()
    with pytest.raises(RuntimeError):
        decode_batch(runner, [ARDecoder("a", PROMPT, _params()), RefusionDecoder("b", PROMPT, _params())])
    assert sorted(runner.freed) == ["a", "b"]
    with pytest.raises(ValueError):
        decode_batch(runner, [ARDecoder("a", PROMPT, _params()), ARDecoder("a", PROMPT, _params())])


def test_an_infill_handoff_counts_the_suffix_as_cached_suffix_not_prompt():
    """decoding.context: cache = [prompt] [suffix] [generated]; a handoff states what is cached of each,
    so the next decoder feeds nothing twice and nothing is missing: prompt + generated = cached_len, the
    whole suffix = suffix_cached_len. (A mutation audit found nothing pinned this split: counting the
    first suffix token as a prompt token passed every test, and made the AR continuation's feed invalid.)"""
    d = RefusionDecoder("r", PROMPT, _params(), suffix_ids=[90, 91])  # 2 blocks of 8
    seg = _plan(d, [([20, 21, 22, 23], 0.95), ([30, 31, 32, 33], 0.95)])
    assert seg.token_ids[:7] == PROMPT + [90, 91] and seg.positions[:7] == [0, 1, 2, 3, 4, 21, 22]
    _answer(d, d.next_segment(1000), [(-1, 0.9)] * 6)
    assert d.phase is Phase.NEXT_BLOCK and d.cache_len == 5 + 2 + 8
    h = d.handoff()
    assert (h.cached_len, h.suffix_ids, h.suffix_cached_len, h.remaining) == (5 + 8, [90, 91], 2, 8)
    ar = ARDecoder.from_handoff("r", h, _params())
    seg = ar.next_segment(1000)  # nothing left to feed: the mask at the first position left, after the cache
    assert (seg.context_len, seg.token_ids, seg.positions) == (15, [MASK], [13])


def test_a_first_step_that_fits_the_budget_exactly_carries_the_whole_prompt():
    """The first plan carries the prompt tail (decoding.refusion; AR's first step likewise, decoding.ar): a
    step of prompt + pool masks (AR: + one mask) that is exactly `budget` tokens fits it, so it is one
    forward, with no prompt chunk before it."""
    d = RefusionDecoder("r", PROMPT, _params())  # 5 prompt tokens + 8 masks of block 1
    seg = d.next_segment(13)
    assert d.phase is Phase.PLAN and seg.positions == list(range(13)) and seg.num_kept == 5
    d = RefusionDecoder("r", PROMPT, _params())
    seg = d.next_segment(12)  # one token short: a prompt chunk first
    assert d.phase is Phase.PREFILL and seg.positions == list(range(5))
    # AR: the first generation step is the prompt + one MASK (decoding.ar), 6 tokens
    ar = ARDecoder("a", PROMPT, _params())
    assert ar.next_segment(6).token_ids == PROMPT + [MASK]
    ar = ARDecoder("a", PROMPT, _params())
    assert ar.next_segment(5).token_ids == PROMPT  # a chunk first


def test_ar_boundary_after_step_foretells_at_block_boundary_after_the_step():
    """ARDecoder.boundary_after_step (asked with a decode step in flight, scheduler.mode_switch) is what
    at_block_boundary() says once that step is absorbed: True exactly for the token that ends a block."""
    d = ARDecoder("a", PROMPT, _params(gen_length=16, serial_num_blocks=2))  # blocks of 8
    foretold, seen = [], []
    for tok in range(30, 46):
        seg = d.next_segment(1000)
        foretold.append(d.boundary_after_step())
        _answer(d, seg, [(tok, 0.9)])
        seen.append(d.at_block_boundary() or d.finished)
    assert foretold == seen == [i in (7, 15) for i in range(16)]
