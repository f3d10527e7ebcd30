"""Exact handoff and prefix-cache semantics on the random model, against transformers.

ReFusion -> AR: with thresholds 0 the whole first block is accepted at one verify, in position order,
so the cache equals a plain causal prefill of prompt + block and transformers can recompute the AR
continuation independently: a MASK at the next position (dropped) gives the first token, then greedy.
"""

from __future__ import annotations

import torch
from oracle import hf_forward, refusion_oracle
from refusion_cases import PROMPTS
from transformers import DynamicCache

from decoding.ar import ARDecoder
from decoding.loop import decode_batch
from decoding.params import DecodeParams
from decoding.refusion import RefusionDecoder
from workers.batch import Segment


def _params(runner, **kw) -> DecodeParams:
    base = dict(gen_length=32, slot_size=4, serial_num_blocks=2, slot_threshold=0.0, token_threshold=0.0)
    return DecodeParams(eos_token_id=runner.info.eos_token_id, mask_token_id=runner.info.mask_token_id, **(base | kw))


@torch.no_grad()
def _hf_ar_after_mask(hf, context: list[int], mask_id: int, n: int) -> list[int]:
    cache = DynamicCache()
    hf_forward(hf, cache, context)
    p = len(context)
    logits = hf_forward(hf, cache, [mask_id], [p])
    cache.crop(-1)  # the mask's KV is dropped
    out = [int(logits[-1].argmax())]
    for i in range(1, n):
        out.append(int(hf_forward(hf, cache, [out[-1]], [p + i - 1])[-1].argmax()))
    return out


def test_refusion_to_ar_handoff_matches_transformers(untied_runner, untied_hf):
    for prompt in PROMPTS[:3]:
        prompt_ids = untied_runner.tokenizer(prompt)["input_ids"]
        params = _params(untied_runner)
        first = RefusionDecoder("h", prompt_ids, params)
        while not (first.at_block_boundary() and first.output_ids()):
            first.absorb(untied_runner.execute([first.next_segment(8192)])[0])
        block = first.output_ids()
        assert first.stats.forwards == 2 and len(block) == 16  # one plan + one verify took the block
        oracle = refusion_oracle(untied_hf, prompt_ids, gen_length=16, slot_size=4, serial_num_blocks=1,
                                 slot_threshold=0.0, token_threshold=0.0, eos_id=params.eos_token_id,
                                 mask_id=params.mask_token_id)
        assert block == oracle.output_ids
        second = ARDecoder.from_handoff("h", first.handoff(), params)
        decode_batch(untied_runner, [second])
        want = _hf_ar_after_mask(untied_hf, prompt_ids + block, params.mask_token_id, 16)
        assert second.output_ids() == block + want
        assert second.stats.forwards == 2 + 16


def test_prefix_cache_hit_gives_the_same_tokens(untied_runner):
    tok = untied_runner.tokenizer
    prompt_ids = tok(PROMPTS[0] + " x\n" + PROMPTS[4] + "\n    y = x")["input_ids"]
    block = untied_runner.info.block_size
    assert len(prompt_ids) > block
    for cls in (RefusionDecoder, ARDecoder):
        params = _params(untied_runner, slot_threshold=0.5, token_threshold=0.3)
        fresh = cls("fresh", prompt_ids, params)
        decode_batch(untied_runner, [fresh])
        # another sequence holds the prompt's first full block; the new request adopts it
        untied_runner.execute([Segment("holder", 0, prompt_ids[:block], list(range(block)), block)])
        untied_runner.adopt_prefix("hit", untied_runner.block_table("holder")[:1], block)
        hit = cls("hit", prompt_ids, params)
        hit.skip_cached_prompt(block)
        first = hit.next_segment(8192)
        assert first.context_len == block and first.positions[0] == block
        hit.absorb(untied_runner.execute([first])[0])
        decode_batch(untied_runner, [hit])
        untied_runner.free("holder")
        assert hit.output_ids() == fresh.output_ids(), cls.__name__
    assert untied_runner.blocks.num_free == untied_runner.blocks.num_total
