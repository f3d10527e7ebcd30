"""Batch invariance: 18 requests with different prompts, parameters and modes decoded together in one
decode_batch give each request the tokens (and forward counts) it gets when decoded alone."""

from __future__ import annotations

from refusion_cases import PROMPTS

from decoding.ar import ARDecoder
from decoding.loop import decode_batch
from decoding.params import DecodeParams
from decoding.refusion import RefusionDecoder

# (mode, prompt index, params, suffix text)
REQUESTS = [
    ("refusion", 0, dict(slot_size=4, serial_num_blocks=2, slot_threshold=0.0, token_threshold=0.0), None),
    ("refusion", 1, dict(slot_size=8, serial_num_blocks=2, slot_threshold=1.0, token_threshold=0.9), None),
    ("refusion", 2, dict(slot_size=4, serial_num_blocks=4, slot_threshold=0.0, token_threshold=0.9), None),
    ("refusion", 3, dict(slot_size=16, serial_num_blocks=1, slot_threshold=0.5, token_threshold=0.3), None),
    ("refusion", 4, dict(slot_size=8, serial_num_blocks=2, slot_threshold=0.3, token_threshold=0.5), None),
    ("refusion", 5, dict(slot_size=32, serial_num_blocks=1, gen_length=32), None),
    ("refusion", 0, dict(slot_size=4, serial_num_blocks=2, temperature=0.8, seed=1), None),
    ("refusion", 1, dict(slot_size=8, serial_num_blocks=1, temperature=1.0, seed=2, token_threshold=0.5), None),
    ("refusion", 2, dict(slot_size=4, serial_num_blocks=2, slot_threshold=0.3, token_threshold=0.5), "\nreturn y\n"),
    ("refusion", 3, dict(slot_size=8, serial_num_blocks=2, gen_length=16), None),
    ("ar", 0, dict(), None),
    ("ar", 1, dict(gen_length=24, slot_size=8, serial_num_blocks=1), None),
    ("ar", 2, dict(temperature=0.8, top_k=20, seed=3), None),
    ("ar", 3, dict(temperature=1.0, top_p=0.9, seed=4), None),
    ("ar", 4, dict(temperature=0.7, top_k=50, top_p=0.8, seed=5), None),
    ("ar", 5, dict(), "\n    pass\n"),
    ("refusion", 4, dict(slot_size=4, serial_num_blocks=8, slot_threshold=0.9, token_threshold=0.3), None),
    ("ar", 0, dict(temperature=1.5, seed=6, gen_length=40, slot_size=8, serial_num_blocks=5), None),
]


def _decoder(runner, i: int):
    mode, prompt, overrides, suffix = REQUESTS[i]
    values = dict(gen_length=32, slot_size=8, serial_num_blocks=2) | overrides
    params = DecodeParams(eos_token_id=runner.info.eos_token_id, mask_token_id=runner.info.mask_token_id, **values)
    tok = runner.tokenizer
    suffix_ids = tok(suffix)["input_ids"] if suffix else None
    cls = RefusionDecoder if mode == "refusion" else ARDecoder
    return cls(f"req{i}", tok(PROMPTS[prompt])["input_ids"], params, suffix_ids=suffix_ids)


def test_mixed_batch_equals_each_request_alone(untied_runner):
    alone = []
    for i in range(len(REQUESTS)):
        decoder = _decoder(untied_runner, i)
        decode_batch(untied_runner, [decoder])
        alone.append((decoder.output_ids(), decoder.stats.forwards))
    together = [_decoder(untied_runner, i) for i in range(len(REQUESTS))]
    decode_batch(untied_runner, together)
    assert len(together) >= 16
    for i, decoder in enumerate(together):
        assert (decoder.output_ids(), decoder.stats.forwards) == alone[i], f"request {i}: {REQUESTS[i]}"
    assert untied_runner.blocks.num_free == untied_runner.blocks.num_total  # every sequence freed
    # The mix really differs: sampled requests differ from greedy ones on the same prompt.
    assert alone[0][0] != alone[6][0] and alone[10][0] != alone[17][0]
