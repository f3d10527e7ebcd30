"""Per-token log probabilities (DecodeParams.logprobs) of the AR decoder and across handoffs, against
transformers on the same random weights (ReFusion's are checked against the spec oracle in
test_refusion_oracle.py).

Semantics (workers/batch.py, "Reads"): log_softmax of the read's logits, before temperature, top-k and
top-p (vLLM's raw_logprobs), best alternatives first; asking for them never changes the text.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import hf_forward
from refusion_cases import PROMPTS
from transformers import DynamicCache

from decoding.ar import ARDecoder
from decoding.loop import decode_batch
from decoding.params import DecodeParams
from decoding.refusion import RefusionDecoder


def _params(runner, **kw) -> DecodeParams:
    base = dict(gen_length=16, slot_size=4, serial_num_blocks=2, slot_threshold=0.0, token_threshold=0.0)
    return DecodeParams(eos_token_id=runner.info.eos_token_id, mask_token_id=runner.info.mask_token_id, **(base | kw))


@torch.no_grad()
def _hf_rows(hf, context: list[int], mask_id: int, generated: list[int]) -> list[torch.Tensor]:
    """log_softmax rows that read each generated token as the AR decoder does: the first from a MASK at
    the first generation position (its KV dropped), the others from the previous token's row."""
    cache = DynamicCache()
    hf_forward(hf, cache, context)
    p = len(context)
    logits = hf_forward(hf, cache, [mask_id], [p])
    cache.crop(-1)
    rows = [logits[-1].log_softmax(-1)]
    for i in range(1, len(generated)):
        rows.append(hf_forward(hf, cache, [generated[i - 1]], [p + i - 1])[-1].log_softmax(-1))
    return rows


def _assert_entries_match(entries, tokens, rows, num_top, mask: int):
    """The model's log probabilities; the alternatives its top num_top but the mask token (never listed)."""
    assert [e.token for e in entries] == tokens
    for entry, token, row in zip(entries, tokens, rows):
        top = row.index_fill(0, torch.tensor([mask]), -math.inf).topk(num_top)
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 5, "seed": 3}, {"temperature": 2.0, "seed": 9}])
def test_ar_logprobs_are_the_models_raw_distribution(untied_runner, untied_hf, sampling):
    """Greedy and sampled AR: each token's log probability and top 4 are transformers' log_softmax of the
    row that read it, untempered and unfiltered, and the text is the one decoded without logprobs."""
    for prompt in PROMPTS[:2]:
        prompt_ids = untied_runner.tokenizer(prompt)["input_ids"]
        plain = ARDecoder("plain", prompt_ids, _params(untied_runner, **sampling))
        decoder = ARDecoder("lp", prompt_ids, _params(untied_runner, logprobs=4, **sampling))
        decode_batch(untied_runner, [plain, decoder])  # one batch: the other row must not matter
        out = decoder.output_ids()
        assert out == plain.output_ids() and len(out) == 16
        assert plain.stream_logprobs(0, 16) == []
        rows = _hf_rows(untied_hf, prompt_ids, untied_runner.info.mask_token_id, out)
        _assert_entries_match(decoder.stream_logprobs(0, 16), out, rows, 4, untied_runner.info.mask_token_id)
        if sampling.get("temperature"):  # a sampled token's tempered probability is not what is reported
            tempered = [(r / sampling["temperature"]).log_softmax(-1)[t].item() for r, t in zip(rows, out)]
            assert any(abs(e.logprob - t) > 1e-2 for e, t in zip(decoder.stream_logprobs(0, 16), tempered))


def test_logprobs_travel_across_a_refusion_to_ar_handoff(untied_runner, untied_hf):
    """ReFusion takes the first block (thresholds 0: one plan and one verify), AR the second: the AR
    decoder reports the handed-off tokens' log probabilities first, then its own, each the model's."""
    prompt_ids = untied_runner.tokenizer(PROMPTS[0])["input_ids"]
    params = _params(untied_runner, logprobs=2)
    first = RefusionDecoder("h", prompt_ids, params)
    while not (first.at_block_boundary() and first.output_ids()):
        first.absorb(untied_runner.execute([first.next_segment(8192)])[0])
    block = first.output_ids()
    handed = first.stream_logprobs(0, len(block))
    second = ARDecoder.from_handoff("h", first.handoff(), params)
    decode_batch(untied_runner, [second])
    out = second.output_ids()
    assert out[:len(block)] == block and len(out) == 16
    entries = second.stream_logprobs(0, 16)
    assert entries[:len(block)] == handed
    rows = _hf_rows(untied_hf, prompt_ids + block, params.mask_token_id, out[len(block):])
    _assert_entries_match(entries[len(block):], out[len(block):], rows, 2, untied_runner.info.mask_token_id)
    back = RefusionDecoder.from_handoff("h2", ARDecoder("a", prompt_ids, params).handoff(), params)
    assert back.stream_logprobs(0, 0) == []  # nothing generated yet: nothing handed over


def test_logprobs_param_is_validated(untied_runner):
    from decoding.api import DecodeParamError

    for bad in (-1, 21, 2.5, True):
        with pytest.raises(DecodeParamError) as err:
            _params(untied_runner, logprobs=bad)
        assert err.value.field == "logprobs"
