"""Penalties and logit bias through the engine on a real ModelRunner (the shipped model): they make a
request AR (AUTO runs AR, REFUSION is refused naming `mode`), a bias outside the vocabulary is refused
naming `logit_bias`, and a request with them shares forwards with others without changing them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scheduler.api import GenerationRequest, InvalidRequestError, Mode

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="models/refusion-tiny-code not present")
PROMPT = "class Wrapper:\n    def __init__(self"


@pytest.fixture(scope="module")
def runner():
    from workers.runner import ModelRunner

    return ModelRunner(SHIPPED_MODEL, num_blocks=256)


async def _run(engine, spec):
    ids, last = [], None
    async for delta in engine.submit(spec):
        ids, last = ids + delta.token_ids, delta
    return ids, last


async def test_penalties_run_ar_and_change_only_their_request(engine_factory, runner):
    engine = await engine_factory()
    prompt = runner.tokenizer.encode(PROMPT, add_special_tokens=False)
    base = {"gen_length": 64, "temperature": 0.0}
    plain_ids, _ = await _run(engine, GenerationRequest("plain", prompt, dict(base), mode=Mode.AR))
    banned = {plain_ids[0]: -100.0}
    (ids, last), (again, _) = await asyncio.gather(
        _run(engine, GenerationRequest("p", prompt, base | {"frequency_penalty": 1.5, "logit_bias": banned})),
        _run(engine, GenerationRequest("again", prompt, dict(base), mode=Mode.AR)))
    assert last.mode is Mode.AR and last.stats["modes"] == ["ar"]  # AUTO ran AR
    assert ids and ids[0] != plain_ids[0] and again == plain_ids


async def test_refusion_mode_and_out_of_vocabulary_biases_are_refused(engine_factory, runner):
    engine = await engine_factory()
    prompt = runner.tokenizer.encode(PROMPT, add_special_tokens=False)
    cases = [({"presence_penalty": 0.5}, Mode.REFUSION, "mode"),
             ({"logit_bias": {10**6: 1.0}}, Mode.AR, "logit_bias"),
             ({"frequency_penalty": 9.0}, Mode.AR, "frequency_penalty")]
    for params, mode, field in cases:
        with pytest.raises(InvalidRequestError) as err:
            await _run(engine, GenerationRequest(f"bad-{field}", prompt, {"gen_length": 64, **params}, mode=mode))
        assert err.value.field == field
