"""DecodeParams validation (typed errors naming the field) and per-model defaults."""

from __future__ import annotations

import json

import pytest

from decoding.api import DecodeParamError
from decoding.params import SERVING_DEFAULTS, DecodeParams, load_model_defaults

IDS = dict(eos_token_id=0, mask_token_id=2)


def test_defaults_are_the_documented_serving_settings():
    p = DecodeParams(**IDS)
    assert (p.gen_length, p.slot_size, p.serial_num_blocks, p.block_length) == (128, 8, 4, 32)
    assert (p.slot_threshold, p.token_threshold, p.temperature) == (0.9, 0.3, 0.0)


def test_gen_length_is_rounded_up_to_a_multiple_of_slot_size():
    p = DecodeParams(**IDS, gen_length=30, slot_size=8, serial_num_blocks=1)
    assert p.gen_length == 32 and p.block_length == 32


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(gen_length=0), "gen_length"),
        (dict(slot_size=0), "slot_size"),
        (dict(serial_num_blocks=0), "serial_num_blocks"),
        (dict(gen_length=64, slot_size=8, serial_num_blocks=3), "serial_num_blocks"),  # 64/3 not whole
        (dict(gen_length=64, slot_size=8, serial_num_blocks=16), "serial_num_blocks"),  # block 4 < S
        (dict(slot_threshold=1.5), "slot_threshold"),
        (dict(token_threshold=-0.1), "token_threshold"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(seed=-3), "seed"),
        (dict(gen_length="64"), "gen_length"),
        (dict(slot_size=4.0), "slot_size"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(slot_threshold=True), "slot_threshold"),
        (dict(eos_token_id=-1), "eos_token_id"),
    ],
)
def test_bad_values_raise_a_typed_error_naming_the_field(kwargs, field):
    with pytest.raises(DecodeParamError) as info:
        DecodeParams(**(IDS | kwargs))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_from_dict_rejects_unknown_names_and_missing_ids():
    with pytest.raises(DecodeParamError) as info:
        DecodeParams.from_dict(IDS | {"slot_treshold": 0.5})
    assert info.value.field == "slot_treshold" and "slot_threshold" in info.value.message
    with pytest.raises(DecodeParamError) as info:
        DecodeParams.from_dict({"gen_length": 32})
    assert info.value.field == "eos_token_id"
    assert DecodeParams.from_dict(IDS | {"gen_length": 32, "slot_size": 4}).to_dict()["gen_length"] == 32


def test_model_defaults_from_config_and_refusion_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 8], "mask_token_id": 9}))
    defaults = load_model_defaults(tmp_path)
    assert defaults == SERVING_DEFAULTS | {"eos_token_id": 7, "mask_token_id": 9}
    (tmp_path / "refusion.json").write_text(json.dumps({"gen_length": 512, "slot_size": 32}))
    p = DecodeParams.from_dict(load_model_defaults(tmp_path))
    assert (p.gen_length, p.slot_size, p.serial_num_blocks, p.eos_token_id) == (512, 32, 4, 7)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"gen_lenght": 3}',
                                     # AR-only settings: ReFusion requests silently dropped them, AR ones applied them
                                     '{"ignore_eos": true}', '{"presence_penalty": 1.5}', '{"logit_bias": {"3": -100}}'])
def test_bad_refusion_json_names_the_file(tmp_path, content):
    (tmp_path / "refusion.json").write_text(content)
    with pytest.raises(DecodeParamError) as info:
        load_model_defaults(tmp_path)
    assert info.value.field == "refusion.json"


@pytest.mark.parametrize("key, source", [("eos_token_id", "config.json"),
                                         ("mask_token_id", "config.json or its tokenizer's <|mask|>"),
                                         ("end_token_ids", "config.json's and generation_config.json's eos_token_id "
                                                           "and the tokenizer's eos_token")])
def test_refusion_json_may_not_set_the_models_token_ids(tmp_path, key, source):
    """They were accepted and had no effect: the engine decodes with the model's (config.json, the tokenizer)."""
    (tmp_path / "refusion.json").write_text(json.dumps({key: 7}))
    with pytest.raises(DecodeParamError) as info:
        load_model_defaults(tmp_path)
    assert info.value.field == "refusion.json" and str(info.value).endswith(
        f"'{key}' in {tmp_path / 'refusion.json'} is not a decode setting: the model's {key} comes from its "
        f"{source}; remove it")


@pytest.mark.parametrize("key, value", [("seed", 5), ("seed", 0), ("logprobs", 3), ("prompt_logprobs", 0)])
def test_refusion_json_may_not_set_per_request_settings(tmp_path, key, value):
    """A seed was accepted and replaced by a fresh one on each request (scheduler.validation.with_seed; the
    model card dropped it), logprobs and prompt_logprobs reach only the requests that ask for them: each
    was accepted and without effect (helper-248). Refused as the token ids are, in one line."""
    (tmp_path / "refusion.json").write_text(json.dumps({key: value}))
    with pytest.raises(DecodeParamError) as info:
        load_model_defaults(tmp_path)
    said = str(info.value)
    assert info.value.field == "refusion.json" and f"'{key}' in {tmp_path / 'refusion.json'} is set per request" in said
    assert "remove it and send it with the requests that want it" in said and "\n" not in said, said


def test_the_keys_an_unknown_key_message_offers_are_the_ones_refusion_json_takes(tmp_path):
    """The unknown-key message listed every DecodeParams field, eos_token_id, presence_penalty and seed
    among them, which the file then refuses (or takes and ignores); it lists the settings a model
    default has an effect with, and each of them is taken."""
    (tmp_path / "refusion.json").write_text(json.dumps({"gen_lenght": 3}))
    with pytest.raises(DecodeParamError) as info:
        load_model_defaults(tmp_path)
    offered = str(info.value).split("use one of ")[1]
    assert offered.startswith("gen_length, slot_size"), offered
    names = offered.split(", ")
    for refused in ("eos_token_id", "mask_token_id", "end_token_ids", "presence_penalty", "logit_bias", "ignore_eos",
                    "seed", "logprobs", "prompt_logprobs"):
        assert refused not in names, offered
    for name in names:
        (tmp_path / "refusion.json").write_text(json.dumps({name: SERVING_DEFAULTS[name]}))
        assert load_model_defaults(tmp_path)[name] == SERVING_DEFAULTS[name]


def test_refusion_json_may_state_ar_only_settings_at_their_off_value(tmp_path):
    (tmp_path / "refusion.json").write_text(json.dumps({"ignore_eos": False, "presence_penalty": 0.0}))
    assert load_model_defaults(tmp_path)["presence_penalty"] == 0.0


@pytest.mark.parametrize("field, value", [("seed", 2**63), ("seed", 18446744073709551616), ("seed", -1),
                                          ("temperature", 1e9), ("top_p", 1e-45), ("top_k", 2**63),
                                          ("top_k", -1)])
def test_values_the_engine_cannot_take_are_rejected_naming_the_field(field, value):
    from decoding.params import DecodeParams

    with pytest.raises(DecodeParamError) as err:
        DecodeParams.from_dict({"eos_token_id": 0, "mask_token_id": 1, field: value})
    assert err.value.field == field


def test_the_largest_seed_is_accepted_and_tiny_temperatures_are_greedy():
    from decoding.params import GREEDY_BELOW_TEMPERATURE, DecodeParams
    from workers.batch import SEED_MAX

    params = DecodeParams.from_dict({"eos_token_id": 0, "mask_token_id": 1, "seed": SEED_MAX, "temperature": 1e-300})
    assert params.seed == SEED_MAX and params.temperature == 0.0
    params = DecodeParams.from_dict({"eos_token_id": 0, "mask_token_id": 1, "temperature": GREEDY_BELOW_TEMPERATURE})
    assert params.temperature == GREEDY_BELOW_TEMPERATURE
