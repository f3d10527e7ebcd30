"""integrations/context_fit.py: prompt + what the engine really generates (max_tokens rounded up to whole
slots) must fit the model's context; the error names the field to change (issue 14, item 8)."""

from __future__ import annotations

import pytest

from integrations.context_fit import GenerationFit, fit_generation, whole_slots
from integrations.request_limits import InputError

CONTEXT = 4096


def test_requested_max_tokens_fits_or_names_its_field():
    assert fit_generation(CONTEXT, 4000, 16, requested=True) == GenerationFit(16)
    with pytest.raises(InputError, match="at most 6") as err:
        fit_generation(CONTEXT, 4090, 16, requested=True)
    assert err.value.field == "max_tokens"
    # The examples: 4200 with a 6-token prompt; 10**5; 1e9; 2**70. All name max_tokens.
    for asked in (4200, 100_000, 10**9, 2**70):
        with pytest.raises(InputError, match="maximum context length is 4,096") as err:
            fit_generation(CONTEXT, 6, asked, requested=True)
        assert err.value.field == "max_tokens"
    with pytest.raises(InputError) as err:
        fit_generation(CONTEXT, 14, 100_000, requested=True, max_tokens_field="max_completion_tokens")
    assert err.value.field == "max_completion_tokens" and "max_completion_tokens (100,000)" in str(err.value)


def test_a_default_shrinks_and_a_full_prompt_names_the_prompt():
    assert fit_generation(CONTEXT, 4090, 16, requested=False) == GenerationFit(6)
    with pytest.raises(InputError) as err:
        fit_generation(CONTEXT, 4096, 1, requested=False, prompt_field="messages")
    assert err.value.field == "messages"
    assert fit_generation(0, 10**6, 10**6, requested=True) == GenerationFit(10**6)  # context unknown: no check


def test_rounding_to_whole_slots_counts_against_the_context():
    assert whole_slots(4090, 64) == 4096 and whole_slots(13, 8) == 16
    # The model's slot (not the client's): a smaller slot is chosen so the rounded generation fits.
    fit = fit_generation(CONTEXT, 6, 4090, requested=True, slot_size=64)
    assert fit.gen_length == 4090 and whole_slots(4090, fit.slot_size) <= CONTEXT - 6
    assert fit_generation(CONTEXT, 4090, 16, requested=False, slot_size=8) == GenerationFit(6, 6)
    # The client's slot_size: refused naming slot_size, with one that fits.
    with pytest.raises(InputError, match="up to 4,096 generated tokens") as err:
        fit_generation(CONTEXT, 6, 4090, requested=True, slot_size=64, slot_requested=True)
    assert err.value.field == "slot_size"
    with pytest.raises(InputError, match="1,000,000") as err:  # the slot_size example
        fit_generation(CONTEXT, 6, 16, requested=False, slot_size=1_000_000, slot_requested=True)
    assert err.value.field == "slot_size"


def test_in_a_shape_the_client_set_the_hint_is_whole_steps_of_it():
    """A client's slot_size x serial_num_blocks: decoding.params takes only lengths of whole steps of it, so
    "ask for at most N" is such a length, a default shrinks to one, and a shape of which not one step fits
    names the shape; the room alone ("at most 107" in 32 x 4) was followed by a 400 on slot_size, then
    one on serial_num_blocks (helper-193)."""
    with pytest.raises(InputError, match="ask for at most 96 ") as err:  # room 100, steps of 32
        fit_generation(CONTEXT, 3996, 200, requested=True, slot_size=8, slot_requested=True, blocks=4)
    assert err.value.field == "max_tokens"
    assert fit_generation(CONTEXT, 3996, 96, requested=True, slot_size=8, slot_requested=True, blocks=4) == GenerationFit(96)
    assert fit_generation(CONTEXT, 3996, 256, requested=False, slot_size=8, slot_requested=True, blocks=4) == GenerationFit(96)
    with pytest.raises(InputError, match="ask for at most 96 "):  # the model's slot_size, the client's blocks
        fit_generation(CONTEXT, 3996, 200, requested=True, slot_size=4, blocks=8)
    with pytest.raises(InputError, match="ask for at most 96 "):  # the client's slot_size alone: whole slots
        fit_generation(CONTEXT, 3996, 200, requested=True, slot_size=32, slot_requested=True)
    with pytest.raises(InputError, match="a step of slot_size 32 x serial_num_blocks 4 is 128 tokens, more than "
                                         "the 107 ") as err:
        fit_generation(257, 150, 128, requested=True, slot_size=32, slot_requested=True, blocks=4)
    assert err.value.field == "serial_num_blocks"  # (its slot_size alone fits; the blocks do not)
    with pytest.raises(InputError, match="ask for at most 104 tokens"):  # the room holds it, its whole slots do not
        fit_generation(CONTEXT, 3989, 106, requested=True, slot_size=8, slot_requested=True)


def test_any_length_in_a_client_shape_is_generated_in_whole_steps_that_must_fit():
    """decode_params rounds gen_length up to whole steps of the client's slot_size x serial_num_blocks
    (the engine stops at max_tokens), so any max_tokens is taken whose steps fit the context: /v1/
    completions' default 16 in 32 x 4 and max_tokens 50 in 8 x 4 were 400s on serial_num_blocks, and a
    prompt leaving 57 tokens was told to try slot_size 28 in 32 x 4, then refused again (helper-195)."""
    from integrations.openai_models import CompletionRequest

    assert fit_generation(CONTEXT, 100, 16, requested=False, slot_size=32, slot_requested=True, blocks=4) == GenerationFit(16)
    body = CompletionRequest.model_validate({"prompt": "x", "slot_size": 32, "serial_num_blocks": 4})
    assert body.decode_params(16, {"slot_size": 4, "serial_num_blocks": 8})["gen_length"] == 128
    assert fit_generation(CONTEXT, 3996, 50, requested=True, slot_size=8, slot_requested=True, blocks=4) == GenerationFit(50)
    with pytest.raises(InputError, match="90 in whole steps of slot_size 8 x serial_num_blocks 4 is 96 generated "
                                         "tokens; .*: ask for at most 64,") as err:  # room 95
        fit_generation(CONTEXT, 4001, 90, requested=True, slot_size=8, slot_requested=True, blocks=4)
    assert err.value.field == "max_tokens"
    for requested in (True, False):  # room 57 < one 128-token step
        with pytest.raises(InputError, match="a step of slot_size 32 x serial_num_blocks 4 is 128 tokens") as err:
            fit_generation(257, 200, 50, requested=requested, slot_size=32, slot_requested=True, blocks=4)
        assert err.value.field == "serial_num_blocks"
    with pytest.raises(InputError, match="a step of slot_size 64 x serial_num_blocks 4") as err:
        fit_generation(257, 200, 50, requested=True, slot_size=64, slot_requested=True, blocks=4)
    assert err.value.field == "slot_size"  # (a slot of it alone does not fit)
