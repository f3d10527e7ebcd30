"""A spec path test_refusion_oracle.py's runs never reach (a coverage probe counted 0): step 3, "if a
newly verified token is EOS, keep branches up to the first branch holding it (that branch counts as
complete) and stop the others", with an EARLIER branch still unfinished, which must go on to completion
and be committed."""

from __future__ import annotations

import dataclasses
from collections import Counter

import decoding.refusion as R
from oracle import refusion_oracle
from refusion_cases import PROMPTS

from decoding.loop import decode_batch
from decoding.params import DecodeParams


def test_eos_in_a_middle_branch_with_earlier_branches_unfinished_matches_oracle(untied_runner, untied_hf,
                                                                                 monkeypatch):
    seen = Counter()
    stop0 = R.stop_after_eos

    def counting_stop(branches, ends):
        n, unfinished = len(branches), [not b.complete for b in branches]
        b = stop0(branches, ends)
        if b is not None and b < n - 1 and any(unfinished[:b]):
            seen["eos_mid_branch_earlier_unfinished"] += 1
        return b

    monkeypatch.setattr(R, "stop_after_eos", counting_stop)
    mask, model_eos = untied_runner.info.mask_token_id, untied_runner.info.eos_token_id
    for prompt in PROMPTS[:2]:
        ids = untied_runner.tokenizer(prompt)["input_ids"]
        for S in (4, 8):
            base = DecodeParams(eos_token_id=model_eos, mask_token_id=mask, gen_length=32, slot_size=S,
                                serial_num_blocks=1, slot_threshold=0.0, token_threshold=0.9)
            free = R.RefusionDecoder("free", ids, base)
            decode_batch(untied_runner, [free])
            for eos in list(dict.fromkeys(free.output_ids()))[1:5]:
                params = dataclasses.replace(base, eos_token_id=eos)
                decoder = R.RefusionDecoder("req", ids, params)
                decode_batch(untied_runner, [decoder])
                oracle = refusion_oracle(untied_hf, ids, gen_length=32, slot_size=S, serial_num_blocks=1,
                                         slot_threshold=0.0, token_threshold=0.9, eos_id=eos, mask_id=mask)
                label = (prompt, S, eos)
                assert decoder.output_ids() == oracle.output_ids, label
                assert decoder.stats.forwards == oracle.forwards, label
    assert seen["eos_mid_branch_earlier_unfinished"] >= 3, seen
