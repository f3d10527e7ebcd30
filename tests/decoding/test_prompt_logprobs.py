"""Prompt scoring (DecodeParams.prompt_logprobs; decoding/context.py): each prompt token but the first
gets its log probability given the tokens before it, with the most likely alternatives, in both
decoders, whatever the prefill chunking, against transformers' causal forward of the whole prompt on
the same random weights; asking for it never changes the generated text."""

from __future__ import annotations

import pytest
import torch
from refusion_cases import PROMPTS

from decoding.ar import ARDecoder
from decoding.context import ContextFeed
from decoding.loop import decode_batch
from decoding.params import DecodeParams
from decoding.refusion import RefusionDecoder


def _params(runner, **kw) -> DecodeParams:
    base = dict(gen_length=8, slot_size=4, serial_num_blocks=1, slot_threshold=0.0, token_threshold=0.0)
    return DecodeParams(eos_token_id=runner.info.eos_token_id, mask_token_id=runner.info.mask_token_id, **(base | kw))


@torch.no_grad()
def _prompt_rows(hf, prompt_ids: list[int]) -> torch.Tensor:
    """[P, V] log_softmax of each prompt row (row p: the distribution of token p + 1)."""
    return hf(input_ids=torch.tensor([prompt_ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("cls", [ARDecoder, RefusionDecoder])
@pytest.mark.parametrize("budget", [3, 8192])
def test_prompt_scores_are_the_causal_models(untied_runner, untied_hf, cls, budget):
    """Chunks of 3 tokens or the whole prompt at once: entry k is token k+1's log probability and the top
    5 of row k; the generated text equals that of a decoder that scores nothing (in the same batch)."""
    prompt_ids = untied_runner.tokenizer(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    plain = cls("plain", prompt_ids, _params(untied_runner))
    scored = cls("scored", prompt_ids, _params(untied_runner, prompt_logprobs=5))
    assert scored.prompt_scores() is None and plain.prompt_scores() is None
    decode_batch(untied_runner, [plain, scored], budget=budget)
    assert scored.output_ids() == plain.output_ids()
    entries, rows = scored.prompt_scores(), _prompt_rows(untied_hf, prompt_ids)
    assert [e.token for e in entries] == prompt_ids[1:]
    for k, entry in enumerate(entries):
        top = rows[k].topk(5)
        assert entry.logprob == pytest.approx(rows[k, prompt_ids[k + 1]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert plain.prompt_scores() is None


def test_scoring_feeds_the_prompt_apart_and_a_one_token_prompt_has_no_scores(untied_runner):
    """With room for prompt and plan in one step, a scoring decoder still prefills apart (its first
    segment holds the prompt only, with P - 1 reads); one prompt token: nothing to score, an empty list."""
    prompt_ids = untied_runner.tokenizer(PROMPTS[1])["input_ids"]
    decoder = RefusionDecoder("s", prompt_ids, _params(untied_runner, prompt_logprobs=0))
    segment = decoder.next_segment(8192)
    assert segment.token_ids == prompt_ids and segment.num_kept == len(prompt_ids)
    assert segment.reads.prob == tuple(range(len(prompt_ids) - 1)) and segment.reads.prob_tokens == tuple(prompt_ids[1:])
    assert segment.logprobs == 0
    one = ARDecoder("one", prompt_ids[:1], _params(untied_runner, prompt_logprobs=2))
    decode_batch(untied_runner, [one])
    assert one.prompt_scores() == [] and len(one.output_ids()) == 8


def test_a_scoring_feed_refuses_a_cached_start():
    """Scoring needs every prompt row: a prefix-cache skip (the scheduler never offers one) is an error."""
    feed = ContextFeed([5, 6, 7], gen_length=4, score_top=1)
    with pytest.raises(ValueError, match="cached prompt tokens"):
        feed.skip(2)
    feed.skip(0)
    with pytest.raises(ValueError, match="nothing cached"):
        ContextFeed([5, 6, 7], gen_length=4, cached_len=1, score_top=1)
