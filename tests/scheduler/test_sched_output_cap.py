"""What the engine returns at the token cap and which seed it samples with (fake runner, no torch).

Issue 14, item 1: text held back while it might still start a stop string was lost when max_tokens
ended the request. Item 2: a request without a seed sampled with seed 0 every time.
"""

from __future__ import annotations

import pytest
from sched_fakes import FakeRunner, collect, ids_of, make_engine

from scheduler.api import FinishReason, GenerationRequest, InvalidRequestError, Mode
from scheduler.validation import with_seed


def req(rid, *, gen=16, max_tokens=None, stop=(), mode=Mode.REFUSION):
    return GenerationRequest(rid, [5, 6, 7], {"gen_length": gen}, mode=mode, stop=list(stop), max_tokens=max_tokens)


def text_of(deltas) -> str:
    return "".join(d.text for d in deltas)


@pytest.mark.parametrize("mode", [Mode.REFUSION, Mode.AR])
async def test_a_stop_string_never_costs_text_at_the_token_cap(mode):
    # The shape: 13 tokens asked, ReFusion computes 16 (whole slots), an 8-character stop string
    # that never occurs holds back 7 characters until the end.
    engine, _ = make_engine(prefix_cache=False)
    await engine.start()
    plain = await collect(engine, req("plain", max_tokens=13, mode=mode))
    stopped = await collect(engine, req("stopped", max_tokens=13, stop=["QQQQQQQQ"], mode=mode))
    await engine.stop()
    assert len(ids_of(plain)) == 13 and ids_of(stopped) == ids_of(plain)
    assert len(text_of(plain)) == 13 and text_of(stopped) == text_of(plain)
    assert text_of(plain) == engine.tokenizer.decode(ids_of(plain))
    assert plain[-1].finish_reason is FinishReason.LENGTH and stopped[-1].finish_reason is FinishReason.LENGTH


async def test_the_cap_ends_the_request_and_frees_its_kv():
    engine, runner = make_engine(prefix_cache=False)
    await engine.start()
    deltas = await collect(engine, req("a", gen=64, max_tokens=3))
    await engine.stop()
    assert len(ids_of(deltas)) == 3 and deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].stats["generated_tokens"] < 64  # stopped, not decoded to gen_length
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


@pytest.mark.parametrize("mode", [Mode.AR, Mode.REFUSION])
async def test_eos_before_the_cap_is_a_stop_and_reaching_the_cap_is_length(mode):
    # ReFusion decodes the whole slot: it sees the EOS just past the cap, which the text never reaches
    # (it answered "stop" there, where AR, stopped at the cap, answered "length").
    engine, _ = make_engine(FakeRunner(eos_at=3 + 3), prefix_cache=False)  # prompt at 0..2: the 4th token is EOS
    await engine.start()
    early = await collect(engine, req("early", gen=8, max_tokens=4, mode=mode))
    at_cap = await collect(engine, req("at-cap", gen=8, max_tokens=3, mode=mode))
    await engine.stop()
    assert len(ids_of(early)) == 3 and early[-1].finish_reason is FinishReason.STOP
    # OpenAI / vLLM: max_tokens reached is "length", whatever the next token would have been.
    assert len(ids_of(at_cap)) == 3 and at_cap[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
async def test_max_tokens_must_be_a_positive_int(bad):
    engine, _ = make_engine()
    await engine.start()
    with pytest.raises(InvalidRequestError) as info:
        await collect(engine, req("a", max_tokens=bad))
    await engine.stop()
    assert info.value.field == "max_tokens"


def test_a_request_without_a_seed_gets_a_fresh_one_each_time():
    seeds = {with_seed({"temperature": 1.0})["seed"] for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**53 for s in seeds)  # exact as a JavaScript number
    assert with_seed({"seed": None})["seed"] is not None


def test_a_given_seed_is_kept():
    assert with_seed({"temperature": 1.0, "seed": 0}) == {"temperature": 1.0, "seed": 0}
    assert with_seed({"seed": 2**63 - 1})["seed"] == 2**63 - 1


@pytest.mark.parametrize("mode", [Mode.REFUSION, Mode.AR])
async def test_a_stop_string_ends_the_count_of_generated_tokens_where_it_ends_the_ids(mode):
    """ReFusion commits whole slots: a stop string in a slot's first token sent 1 id, while the final
    stats (the infill route's usage, the request log's tokens) counted the whole slot (helper-170)."""
    engine, _ = make_engine(prefix_cache=False)
    await engine.start()
    plain = await collect(engine, req("plain", mode=mode))
    stop = text_of(plain)[2]
    stopped = await collect(engine, req("stopped", stop=[stop], mode=mode))
    await engine.stop()
    kept = text_of(plain)[: text_of(plain).index(stop)]
    assert text_of(stopped) == kept and stopped[-1].finish_reason is FinishReason.STOP
    assert stopped[-1].stats["generated_tokens"] == len(ids_of(stopped)) < len(ids_of(plain))
