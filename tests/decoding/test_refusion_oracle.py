"""Engine ReFusion (RefusionDecoder + ModelRunner) vs the literal spec oracle, float32 on CPU.

Random weights make confident drafts rare, so thresholds and EOS ids force each path:
slot_threshold 1.0 forces the single-slot fallback, 0.0 chooses every slot; token_threshold 0.0 makes
every token pass at verify (whole slots accepted), 0.9+ makes completion crawl token by token; a token
the model drafts often, used as EOS, puts EOS into verify prefixes and into slot completion.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from oracle import refusion_oracle
from refusion_cases import PROMPTS

from decoding.loop import decode_batch
from decoding.params import DecodeParams
from decoding.refusion import RefusionDecoder

# (slot_size, serial_num_blocks, gen_length, slot_threshold, token_threshold, eos: index into frequent_tokens)
PARAM_SETS = [
    (4, 2, 32, 0.0, 0.0, 0),  # every slot chosen, every token passes: whole slots / EOS at verify
    (8, 2, 32, 1.0, 0.9, 0),  # single-slot fallback, completion token by token
    (4, 4, 32, 0.0, 0.9, 1),  # many branches at once, EOS inside completion
    (16, 1, 32, 0.5, 0.3, None),  # EOS never drafted: runs to the end of the span
    (32, 2, 64, 0.9, 0.3, 0),  # the paper's code slot size
    (8, 2, 32, 0.3, 0.5, 1),
]


def _run_both(runner, hf, prompt_ids, params: DecodeParams, *, suffix=(), budget=8192, ends=None):
    oracle = refusion_oracle(
        hf, prompt_ids, gen_length=params.gen_length, slot_size=params.slot_size,
        serial_num_blocks=params.serial_num_blocks, slot_threshold=params.slot_threshold,
        token_threshold=params.token_threshold, eos_id=ends or params.eos_token_id, mask_id=params.mask_token_id,
        suffix_ids=suffix,
    )
    decoder = RefusionDecoder("req", prompt_ids, params, suffix_ids=list(suffix))
    decode_batch(runner, [decoder], budget=budget)
    return decoder, oracle


def _params(runner, frequent_tokens, S, blocks, gen, st, tt, eos_idx) -> DecodeParams:
    # eos None: the EOS id of the model, which the random weights never draft
    eos = runner.info.eos_token_id if eos_idx is None else frequent_tokens[eos_idx]
    return DecodeParams(eos_token_id=eos, mask_token_id=runner.info.mask_token_id, gen_length=gen, slot_size=S,
                        serial_num_blocks=blocks, slot_threshold=st, token_threshold=tt)


def test_engine_matches_oracle_over_prompts_and_params(untied_runner, untied_hf, frequent_tokens):
    events, slot_sizes, cases = Counter(), Counter(), 0
    for prompt in PROMPTS:
        prompt_ids = untied_runner.tokenizer(prompt)["input_ids"]
        for S, blocks, gen, st, tt, eos_idx in PARAM_SETS:
            params = _params(untied_runner, frequent_tokens, S, blocks, gen, st, tt, eos_idx)
            decoder, oracle = _run_both(untied_runner, untied_hf, prompt_ids, params)
            label = f"prompt={prompt!r} S={S} blocks={blocks} st={st} tt={tt} eos={params.eos_token_id}"
            assert decoder.output_ids() == oracle.output_ids, label
            assert decoder.stats.forwards == oracle.forwards, label
            assert decoder.finished and untied_runner.cached_len("req") == 0
            events += oracle.events
            slot_sizes[S] += 1
            cases += 1
    assert cases >= 30
    # Every path the acceptance list names actually ran (counted in the oracle, not assumed).
    for event in ("eos_in_verify_prefix", "eos_in_completion", "single_slot_fallback",
                  "whole_slots_at_verify", "slot_completion"):
        assert events[event] >= 2, (event, events)
    assert events["blocks"] > cases  # several blocks per request
    assert set(slot_sizes) == {4, 8, 16, 32}


def test_eos_from_the_models_own_text_drops_later_pool_slots(untied_runner, untied_hf):
    """EOS = a token the model writes early in its own output: EOS lands mid-block, in the verify prefix
    or inside slot completion, and the pool slots positioned after the EOS slot must be dropped (the
    spec's fix of the reference's branch-index bug)."""
    events = Counter()
    for prompt in PROMPTS[:3]:
        prompt_ids = untied_runner.tokenizer(prompt)["input_ids"]
        for S, st, tt in [(4, 1.0, 0.9), (8, 0.3, 0.5), (4, 0.0, 0.0)]:
            params = _params(untied_runner, [], S, 1, 32, st, tt, None)
            free_run, _ = _run_both(untied_runner, untied_hf, prompt_ids, params)
            for eos in list(dict.fromkeys(free_run.output_ids()))[:3]:
                params = _params(untied_runner, [eos], S, 1, 32, st, tt, 0)
                decoder, oracle = _run_both(untied_runner, untied_hf, prompt_ids, params)
                assert decoder.output_ids() == oracle.output_ids, (prompt, S, st, tt, eos)
                assert decoder.stats.forwards == oracle.forwards, (prompt, S, st, tt, eos)
                assert len(decoder.output_ids()) < 32  # the EOS really ended the text early
                events += oracle.events
    assert events["pool_slots_dropped_after_completion_eos"] >= 2, events
    assert events["pool_slots_dropped_after_verify_eos"] >= 2, events


def test_any_of_the_models_end_tokens_ends_the_text_as_eos_does(untied_runner, untied_hf):
    """A model with several end tokens (generation_config.json's eos_token_id list: DecodeParams
    end_token_ids): each is EOS wherever the spec names it. The end tokens are tokens the model writes in
    its own text, the model's EOS id (never drafted by these weights) first; engine and oracle agree."""
    import dataclasses

    events, ended_early = Counter(), 0
    for prompt in PROMPTS[:3]:
        prompt_ids = untied_runner.tokenizer(prompt)["input_ids"]
        for S, st, tt in [(4, 1.0, 0.9), (8, 0.3, 0.5), (4, 0.0, 0.0)]:
            params = _params(untied_runner, [], S, 1, 32, st, tt, None)
            free_run, _ = _run_both(untied_runner, untied_hf, prompt_ids, params)
            written = list(dict.fromkeys(free_run.output_ids()))
            params = dataclasses.replace(params, end_token_ids=tuple(written[1:3]))
            decoder, oracle = _run_both(untied_runner, untied_hf, prompt_ids, params, ends=params.ends)
            assert decoder.output_ids() == oracle.output_ids, (prompt, S, st, tt)
            assert decoder.stats.forwards == oracle.forwards, (prompt, S, st, tt)
            assert not set(decoder.output_ids()) & set(params.end_token_ids)
            ended_early += len(decoder.output_ids()) < 32
            events += oracle.events
    assert ended_early >= 6 and events["eos_in_verify_prefix"] + events["eos_in_completion"] >= 6, events


def test_engine_counts_accepted_slots_like_the_oracle(untied_runner, untied_hf, frequent_tokens):
    prompt_ids = untied_runner.tokenizer(PROMPTS[2])["input_ids"]
    params = _params(untied_runner, frequent_tokens, 4, 2, 32, 0.0, 0.0, None)
    decoder, oracle = _run_both(untied_runner, untied_hf, prompt_ids, params)
    assert decoder.stats.slots_accepted_at_verify == oracle.events["whole_slots_at_verify"] == 8
    assert decoder.stats.generated_tokens == len(oracle.output_ids) == 32
    assert decoder.stats.tokens_per_forward == pytest.approx(32 / oracle.forwards)


@pytest.mark.parametrize("case", PARAM_SETS[:4])
def test_infill_suffix_matches_oracle(untied_runner, untied_hf, frequent_tokens, case):
    prompt_ids = untied_runner.tokenizer(PROMPTS[0])["input_ids"]
    suffix = untied_runner.tokenizer("\n\nprint(foo(3))\n")["input_ids"]
    params = _params(untied_runner, frequent_tokens, *case)
    with_suffix, oracle = _run_both(untied_runner, untied_hf, prompt_ids, params, suffix=suffix)
    assert with_suffix.output_ids() == oracle.output_ids
    without, _ = _run_both(untied_runner, untied_hf, prompt_ids, params)
    assert without.output_ids() != with_suffix.output_ids()  # the suffix is actually seen


@pytest.mark.parametrize("temperature, seed, case", [(0.7, 1, PARAM_SETS[1]), (1.5, 2, PARAM_SETS[4])])
def test_gumbel_planning_matches_oracle(untied_runner, untied_hf, frequent_tokens, temperature, seed, case):
    """temperature > 0: noise on the plan's argmax only (drafts inside branches stay plain argmax)."""
    changed, events = 0, Counter()
    for prompt in PROMPTS[:3]:
        prompt_ids = untied_runner.tokenizer(prompt)["input_ids"]
        params = _params(untied_runner, frequent_tokens, *case)
        greedy = RefusionDecoder("greedy", prompt_ids, params)
        decode_batch(untied_runner, [greedy])
        params.temperature, params.seed = temperature, seed
        oracle = refusion_oracle(
            untied_hf, prompt_ids, gen_length=params.gen_length, slot_size=params.slot_size,
            serial_num_blocks=params.serial_num_blocks, slot_threshold=params.slot_threshold,
            token_threshold=params.token_threshold, eos_id=params.eos_token_id, mask_id=params.mask_token_id,
            temperature=temperature, seed=seed,
        )
        decoder = RefusionDecoder("req", prompt_ids, params)
        decode_batch(untied_runner, [decoder])
        assert decoder.output_ids() == oracle.output_ids, prompt
        assert decoder.stats.forwards == oracle.forwards
        changed += decoder.output_ids() != greedy.output_ids()
        events += oracle.events
    assert changed > 0  # the noise really changed the text
    assert events["gumbel_plans"] > 0 and events["slot_completion"] > 0


@pytest.mark.parametrize("budget", [1, 3, 7])
def test_chunked_prompt_prefill_matches_oracle(untied_runner, untied_hf, frequent_tokens, budget):
    prompt_ids = untied_runner.tokenizer(PROMPTS[5])["input_ids"]
    params = _params(untied_runner, frequent_tokens, 8, 2, 32, 0.3, 0.5, 1)
    decoder, oracle = _run_both(untied_runner, untied_hf, prompt_ids, params, budget=budget)
    assert decoder.output_ids() == oracle.output_ids
    assert decoder.stats.prefill_forwards == -(-len(prompt_ids) // budget)


def _expected_entry(row, token: int, num_top: int, mask: int):
    """The oracle row's log probability of `token` and its top num_top but the mask token (never listed)."""
    top = row.index_fill(0, torch.tensor([mask]), -math.inf).topk(num_top)
    return row[token].item(), list(zip(top.indices.tolist(), top.values.tolist()))


@pytest.mark.parametrize("case", PARAM_SETS)
def test_logprobs_are_the_accepting_reads_of_the_oracle(untied_runner, untied_hf, frequent_tokens, case):
    """params.logprobs: every output token's log probability and top alternatives are those of the read
    that accepted it in the literal spec oracle (plan, verify, or the token's last read in slot
    completion), on every path; asking for them does not change the text."""
    prompt_ids = untied_runner.tokenizer(PROMPTS[1])["input_ids"]
    params = _params(untied_runner, frequent_tokens, *case)
    params.logprobs = 3
    decoder, oracle = _run_both(untied_runner, untied_hf, prompt_ids, params)
    out = decoder.output_ids()
    assert out == oracle.output_ids and out
    entries = decoder.stream_logprobs(0, len(out))
    assert [e.token for e in entries] == out
    for pos, (token, entry) in enumerate(zip(out, entries), start=len(prompt_ids)):
        logprob, top = _expected_entry(oracle.logprob_rows[pos], token, 3, untied_runner.info.mask_token_id)
        assert entry.logprob == pytest.approx(logprob, abs=1e-4), (case, pos)
        assert [t for t, _ in entry.top] == [t for t, _ in top], (case, pos)
        assert [v for _, v in entry.top] == pytest.approx([v for _, v in top], abs=1e-4)


def test_top_k_one_makes_a_sampled_refusion_request_greedy(untied_runner, frequent_tokens):
    # top_k / top_p / min_p restrict the Gumbel-max drafts (workers/reads.py); they had no effect in
    # ReFusion mode (helper-124). top_k 1 leaves the argmax alone: the greedy text at any temperature,
    # with the same forwards (the confidences, unfiltered, are the greedy run's)
    changed = 0
    for prompt in PROMPTS[:3]:
        prompt_ids = untied_runner.tokenizer(prompt)["input_ids"]
        params = _params(untied_runner, frequent_tokens, *PARAM_SETS[4])
        greedy = RefusionDecoder("greedy", prompt_ids, params)
        decode_batch(untied_runner, [greedy])
        params.temperature, params.seed = 1.5, 2
        sampled = RefusionDecoder("sampled", prompt_ids, params)
        decode_batch(untied_runner, [sampled])
        params.top_k = 1
        truncated = RefusionDecoder("top1", prompt_ids, params)
        decode_batch(untied_runner, [truncated])
        assert truncated.output_ids() == greedy.output_ids() and truncated.stats.forwards == greedy.stats.forwards
        changed += sampled.output_ids() != greedy.output_ids()
    assert changed > 0  # (the temperature does change the text without top_k)
