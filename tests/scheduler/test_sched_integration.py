"""The engine on a real ModelRunner and the real decoders (tiny random Qwen3 on CPU).

32 concurrent requests mixing ReFusion, AR and AUTO, greedy and seeded sampling, shared prompt
prefixes, stop strings, cancellations and deadlines. Every request that finishes on its own must
produce exactly its solo run's tokens; cancelled and expired ones a prefix of it; afterwards no KV
block may be held.
"""

from __future__ import annotations

import asyncio

import pytest
import structlog

from scheduler.api import FinishReason, GenerationRequest, Mode, Priority
from scheduler.config import EngineConfig, RoutingConfig

pytestmark = pytest.mark.slow

SNIPPETS = [
    "def parse(self, text):\n    return",
    "class Wrapper:\n    def __init__(self",
    "import json\n\ndef load(path):\n",
    "for i in range(10):\n    print(",
]
SHARED = "    def _split_chunks(self, text):\n        chunks = self.wordsep_re.split(text)\n"


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    from workers.runner import ModelRunner

    return ModelRunner(tiny_model_dir, num_blocks=512, block_size=16)


def _requests(tokenizer) -> list[GenerationRequest]:
    out = []
    for i in range(32):
        prompt = SHARED + SNIPPETS[i % 4] if i % 2 else SNIPPETS[i % 4] + " " * (i % 3)
        params = {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 4}
        if i % 5 == 4:
            params.update(temperature=0.8, seed=i)
        mode = (Mode.AR, Mode.REFUSION, Mode.AUTO)[i % 3]
        priority = Priority.INTERACTIVE if i % 4 == 0 else Priority.BATCH
        suffix = tokenizer.encode("\n    return result\n") if i in (28, 29, 30) else None  # infill
        out.append(GenerationRequest(f"r{i}", tokenizer.encode(prompt), params, mode=mode, priority=priority,
                                     suffix_ids=suffix))
    return out


def _solo(runner, factory, spec: GenerationRequest, mode: Mode) -> list[int]:
    from decoding.loop import decode_batch

    params = factory.parse_params(spec.params)
    decoder = factory.create(mode, f"solo-{spec.request_id}-{mode.value}", spec.prompt_ids, params, spec.suffix_ids)
    return decode_batch(runner, [decoder])[0]


def _pick_stop(tokenizer, specs, solo, exclude):
    """Give the first AR request whose solo text allows it a stop string; returns (id, expected text)."""
    for spec in specs:
        if spec.mode is not Mode.AR or spec.request_id in exclude:
            continue
        text = tokenizer.decode(solo[spec.request_id][Mode.AR], skip_special_tokens=True)
        for k in range(4, len(text) - 2):
            if text[k : k + 2].strip():
                spec.stop = [text[k : k + 2]]
                return spec.request_id, text[: text.index(spec.stop[0])]
    return None


async def _consume(engine, spec, action):
    """Collect deltas; `action` = "cancel" (engine.cancel after the first delta), "disconnect"
    (stop iterating after the first delta) or None. INTERACTIVE requests arrive a little later, when
    BATCH requests fill every running slot, so they preempt some."""
    if spec.priority is Priority.INTERACTIVE:
        await asyncio.sleep(0.3)
    deltas = []
    stream = engine.submit(spec)
    async for delta in stream:
        deltas.append(delta)
        if action == "cancel" and len(deltas) == 1 and not delta.finished:
            engine.cancel(spec.request_id)
        if action == "disconnect" and not delta.finished:
            await stream.aclose()
            break
    return deltas


async def test_32_concurrent_requests_match_their_solo_runs_and_leak_nothing(runner):
    from scheduler.decoders import ModelDecoderFactory
    from scheduler.engine import Engine

    tokenizer = runner.tokenizer
    factory = ModelDecoderFactory(runner)
    specs = _requests(tokenizer)
    actions = {"r3": "cancel", "r7": "cancel", "r10": "cancel", "r13": "disconnect", "r21": "disconnect"}
    for rid in ("r5", "r17", "r26"):
        specs[int(rid[1:])].max_time_ms = 1
    solo = {s.request_id: {m: _solo(runner, factory, s, m) for m in (Mode.AR, Mode.REFUSION)} for s in specs}
    # A stop string taken from an AR request's own solo text ends it early, at the same place (random
    # weights may generate only special tokens: then no request gets one; test_sched_detokenizer covers it).
    stopped = _pick_stop(tokenizer, specs, solo, exclude=set(actions) | {"r5", "r17", "r26"})
    assert runner.blocks.num_free == runner.blocks.num_total

    config = EngineConfig(token_budget=256, deadline_grace_ms=0, max_running=12,
                          routing=RoutingConfig(calibrate=True, calibration_tokens=(1, 64, 256), allow_switch=False))
    engine = Engine(runner, tokenizer, config, factory)
    await engine.start()
    results = await asyncio.gather(*[_consume(engine, s, actions.get(s.request_id)) for s in specs])

    reasons = {}
    for spec, deltas in zip(specs, results):
        rid, ids = spec.request_id, [t for d in deltas for t in d.token_ids]
        final = deltas[-1] if deltas and deltas[-1].finished else None
        reasons[rid] = final.finish_reason if final else "disconnected"
        mode = final.mode if final and final.mode else (Mode.AR if spec.mode is Mode.AR else Mode.REFUSION)
        expected = solo[rid][mode]
        if stopped and rid == stopped[0]:
            assert final.finish_reason is FinishReason.STOP
            assert "".join(d.text for d in deltas) == stopped[1]
        elif reasons[rid] in (FinishReason.LENGTH, FinishReason.STOP):
            assert ids == expected, f"{rid} ({mode.value}) differs from its solo run"
        else:
            assert ids == expected[: len(ids)], f"{rid}: partial output is not a prefix of the solo run"
    assert all(reasons[r] is FinishReason.CANCELLED for r in ("r3", "r7", "r10"))
    assert all(reasons[r] is FinishReason.DEADLINE for r in ("r5", "r17", "r26"))
    normal = [r for r, why in reasons.items() if why in (FinishReason.LENGTH, FinishReason.STOP)]
    assert len(normal) >= 24
    assert {d[-1].mode for d in results if d and d[-1].finished} >= {Mode.AR, Mode.REFUSION}
    assert engine.prefix_cache.hit_rate > 0
    assert sum(d[-1].stats.get("preemptions", 0) for d in results if d and d[-1].finished) > 0

    await engine.stop()  # clears the prefix cache too
    assert runner.blocks.num_free == runner.blocks.num_total
    assert runner.sequences() == []


def _step_until(runner, decoder, done) -> None:
    while not decoder.finished and not done(decoder):
        decoder.absorb(runner.execute([decoder.next_segment(8192)])[0])


async def test_auto_request_switching_to_ar_equals_a_solo_run_switched_at_the_same_boundary(runner):
    from scheduler.decoders import ModelDecoderFactory
    from scheduler.engine import Engine

    tokenizer, factory = runner.tokenizer, ModelDecoderFactory(runner)
    spec = GenerationRequest("sw", tokenizer.encode(SNIPPETS[0]), {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 4})
    routing = RoutingConfig(calibrate=False, cost_points=[(1, 0.01), (512, 0.0101)], switch_interval_tokens=1)
    engine = Engine(runner, tokenizer, EngineConfig(routing=routing), factory)
    await engine.start()
    engine.router.observe = lambda *args: None  # frozen estimates: ReFusion first, then AR wins
    with structlog.testing.capture_logs() as logs:
        stream = engine.submit(spec)
        deltas = [await stream.__anext__()]
        engine.router.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 0.2
        deltas += [d async for d in stream]
    await engine.stop()
    assert deltas[-1].stats["modes"] == ["refusion", "ar"] and deltas[-1].finish_reason is not FinishReason.ERROR
    switch_at = next(e["generated_tokens"] for e in logs if e["event"] == "mode_switch")

    params = factory.parse_params(spec.params)
    solo = factory.create(Mode.REFUSION, "solo-sw", spec.prompt_ids, params, None)
    _step_until(runner, solo, lambda d: d.at_block_boundary() and len(d.output_ids()) >= switch_at)
    assert len(solo.output_ids()) == switch_at
    solo = factory.from_handoff(Mode.AR, "solo-sw", solo.handoff(), params)
    _step_until(runner, solo, lambda d: False)
    runner.free("solo-sw")
    assert [t for d in deltas for t in d.token_ids] == solo.output_ids()
    assert runner.blocks.num_free == runner.blocks.num_total
