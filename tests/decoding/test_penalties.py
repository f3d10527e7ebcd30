"""OpenAI's presence and frequency penalties and logit bias in the AR decoder (Segment.logit_bias, added on
the device before the token is chosen), against transformers on the same random weights: every greedy
token is the argmax of the model's logits minus the penalties of the text so far plus the bias."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from oracle import hf_forward
from refusion_cases import PROMPTS
from transformers import DynamicCache

from decoding.api import DecodeParamError
from decoding.ar import ARDecoder
from decoding.loop import decode_batch
from decoding.params import DecodeParams
from workers.batch import TOKEN_BAN, FeedbackPenalty, SegmentResult


def _params(runner, **kw) -> DecodeParams:
    return DecodeParams(eos_token_id=runner.info.eos_token_id, mask_token_id=runner.info.mask_token_id,
                        gen_length=24, slot_size=1, serial_num_blocks=1, **kw)


@torch.no_grad()
def _hf_penalized(hf, context: list[int], mask_id: int, n: int, presence: float, frequency: float,
                  bias: dict[int, float]) -> list[int]:
    """Greedy AR as the engine decodes it (first token from a MASK row), each step's logits adjusted."""
    cache, out = DynamicCache(), []
    hf_forward(hf, cache, context)
    p = len(context)
    logits = hf_forward(hf, cache, [mask_id], [p])
    cache.crop(-1)
    for i in range(n):
        row = logits[-1].clone()
        for token, count in Counter(out).items():
            row[token] -= presence + frequency * count
        for token, value in bias.items():
            row[token] += value
        out.append(int(row.argmax()))
        logits = hf_forward(hf, cache, [out[-1]], [p + i])
    return out


@pytest.mark.parametrize("presence, frequency", [(0.0, 0.0), (2.0, 0.0), (0.0, 1.5), (1.0, 2.0), (-2.0, 0.0)])
def test_penalties_and_bias_match_transformers(untied_runner, untied_hf, presence, frequency):
    for prompt in PROMPTS[:2]:
        ids = untied_runner.tokenizer(prompt)["input_ids"]
        plain = ARDecoder("plain", ids, _params(untied_runner))
        decode_batch(untied_runner, [plain])
        bias = {plain.output_ids()[0]: -100.0, 7: 3.0}  # the greedy first token banned, another favoured
        decoder = ARDecoder("p", ids, _params(untied_runner, presence_penalty=presence, frequency_penalty=frequency,
                                               logit_bias=bias))
        neighbour = ARDecoder("n", ids, _params(untied_runner))  # same batch, no bias: unchanged
        decode_batch(untied_runner, [decoder, neighbour])
        want = _hf_penalized(untied_hf, ids, untied_runner.info.mask_token_id, 24, presence, frequency, bias)
        assert decoder.output_ids() == want[: len(decoder.output_ids())] and len(decoder.output_ids()) >= 8
        assert decoder.output_ids()[0] != plain.output_ids()[0]
        assert neighbour.output_ids() == plain.output_ids()


def test_penalties_lower_repetition(untied_runner):
    ids = untied_runner.tokenizer(PROMPTS[0])["input_ids"]
    plain, penalized = ARDecoder("a", ids, _params(untied_runner)), ARDecoder("b", ids, _params(untied_runner, frequency_penalty=2.0))
    decode_batch(untied_runner, [plain, penalized])
    assert len(set(penalized.output_ids())) > len(set(plain.output_ids()))


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("presence_penalty", "1"),
                                          ("logit_bias", {1: 101}), ("logit_bias", {"1": 1.0}), ("logit_bias", {-1: 1.0}),
                                          ("logit_bias", [1, 2]), ("logit_bias", {i: 1.0 for i in range(301)})])
def test_penalty_and_bias_values_are_checked(untied_runner, field, value):
    with pytest.raises(DecodeParamError) as err:
        _params(untied_runner, **{field: value})
    assert err.value.field == field


def test_a_step_planned_ahead_carries_the_penalties_and_a_host_rerun_counts_the_fed_back_token():
    # Asynchronous scheduling: the step after the one in flight holds the penalties of the tokens on the
    # host in its logit bias and the fed-back token's own as Segment.feedback_penalty (the runner adds
    # it: tests/workers/test_feedback.py); re-run from the host (ARDecoder.host_segment, after a failed
    # step) its bias is the one a serial step states, with that token counted
    params = DecodeParams(eos_token_id=2, mask_token_id=3, gen_length=24, slot_size=1, serial_num_blocks=1,
                          presence_penalty=0.5, frequency_penalty=1.0, logit_bias={9: 2.0, 11: -1.0})
    piped, serial = ARDecoder("s", [5, 6, 7], params), ARDecoder("s", [5, 6, 7], params)
    for decoder in (piped, serial):
        decoder.next_segment(64)  # the first generation step
        decoder.absorb(SegmentResult("s", [9], [0.5]))
        decoder.next_segment(64)  # feeds 9, reads the next token
    ahead = piped.plan_ahead()
    # (11 not generated yet, and the mask token's ban: their pairs come first, FeedbackPenalty.unseen)
    assert ahead.feedback and ahead.feedback_penalty == FeedbackPenalty(0.5, 1.0, unseen=2)
    assert ahead.logit_bias == ((11, -1.0), (3, TOKEN_BAN), (9, 2.0 - 0.5 - 1.0))
    for decoder in (piped, serial):
        decoder.absorb(SegmentResult("s", [11], [0.5]))  # the step in flight read 11
    rerun = piped.host_segment(ahead)
    assert (rerun.token_ids, rerun.feedback, rerun.feedback_penalty) == ([11], False, None)
    assert rerun.logit_bias == serial.next_segment(64).logit_bias == ((3, TOKEN_BAN), (9, 0.5), (11, -2.5))
