"""The default decoder factory: request params over model defaults (refusion.json), typed errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from decoding.api import DecodeParamError
from scheduler.api import Mode
from scheduler.decoders import ModelDecoderFactory, find_model_dir


def _runner(model_dir=None, via_tokenizer=False):
    info = SimpleNamespace(eos_token_id=0, mask_token_id=2)
    if via_tokenizer:
        return SimpleNamespace(info=info, tokenizer=SimpleNamespace(name_or_path=str(model_dir)))
    return SimpleNamespace(info=info, model_dir=model_dir)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0, "mask_token_id": 2}))
    (tmp_path / "refusion.json").write_text(json.dumps({"gen_length": 16, "slot_size": 4, "serial_num_blocks": 2}))
    return tmp_path


@pytest.mark.parametrize("via_tokenizer", [False, True])
def test_model_defaults_come_from_refusion_json(model_dir, via_tokenizer):
    runner = _runner(model_dir, via_tokenizer)
    assert find_model_dir(runner) == model_dir
    params = ModelDecoderFactory(runner).parse_params({"token_threshold": 0.5})
    assert (params.gen_length, params.slot_size, params.serial_num_blocks) == (16, 4, 2)
    assert params.token_threshold == 0.5 and params.eos_token_id == 0 and params.mask_token_id == 2


def test_without_a_model_dir_the_serving_defaults_apply():
    params = ModelDecoderFactory(_runner()).parse_params({})
    assert params.gen_length == 128 and params.slot_size == 8


@pytest.mark.parametrize("bad, field", [({"eos_token_id": 5}, "eos_token_id"), ({"temprature": 1.0}, "temprature"),
                                        ({"gen_length": 8, "slot_size": 8}, "serial_num_blocks")])
def test_bad_params_name_the_field(bad, field):
    with pytest.raises(DecodeParamError) as err:
        ModelDecoderFactory(_runner()).parse_params(bad)
    assert err.value.field == field


def test_factory_builds_both_decoders():
    factory = ModelDecoderFactory(_runner())
    params = factory.parse_params({"gen_length": 16, "slot_size": 4, "serial_num_blocks": 2})
    ar = factory.create(Mode.AR, "a", [5, 6], params, None)
    rf = factory.create(Mode.REFUSION, "b", [5, 6], params, [7])
    assert type(ar).__name__ == "ARDecoder" and type(rf).__name__ == "RefusionDecoder"
    assert ar.next_segment(8).token_ids[:2] == [5, 6]
