"""The engine on a real ModelRunner and the real decoders (tiny random Qwen3 on CPU).

32 concurrent requests mixing ReFusion, AR and AUTO, greedy and seeded sampling, shared prompt
prefixes, stop strings, cancellations and deadlines. Every request that finishes on its own must
produce exactly its solo run's tokens; cancelled and expired ones a prefix of it; afterwards no KV
block may be held.

Nothing here waits on wall-clock luck: the preemption is forced (see `_run_with_preemption`), cancels
and disconnects happen on a delta the request has already sent, and every test gets a fresh runner, so
one failure cannot leave KV blocks or sequences to the next.
"""

from __future__ import annotations

import asyncio

import pytest
import structlog
from sched_fakes import ForwardGate

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


@pytest.fixture
def runner(tiny_model_dir):
    """A fresh runner per test (milliseconds): a test that fails midway leaves nothing to the next."""
    from workers.runner import ModelRunner

    return ModelRunner(tiny_model_dir, device="cpu", num_blocks=512, block_size=16)


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
    from workers.session import RunnerSession

    params = factory.parse_params(spec.params)
    decoder = factory.create(mode, f"solo-{spec.request_id}-{mode.value}", spec.prompt_ids, params, spec.suffix_ids)
    return decode_batch(RunnerSession(runner), [decoder])[0]


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


def _pick_cancel(tokenizer, specs, solo) -> str:
    """The first BATCH AR request (no deadline, not disconnected) whose solo text starts with a whole
    character, so that its first delta comes before its end and a cancel on it lands: random weights
    may write only byte tokens that are no UTF-8 (the detokenizer holds those back to the end)."""
    for spec in specs:
        rid = spec.request_id
        if spec.mode is Mode.AR and spec.priority is Priority.BATCH and rid not in ("r5", "r17", "r21", "r26"):
            first = tokenizer.decode(solo[rid][Mode.AR][:1])
            if first and "\ufffd" not in first:
                return rid
    raise AssertionError("no AR request starts with a whole character: change the prompts or the model seed")


async def _consume(engine, spec, action):
    """Collect deltas; `action` = "cancel" (engine.cancel after the first delta), "disconnect"
    (stop iterating after the first delta) or None."""
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


async def _run_with_preemption(engine, runner, specs, actions, monkeypatch, wait_until) -> list[list]:
    """Run every request (results in the order of `specs`), the INTERACTIVE ones forced to preempt.

    The BATCH requests are submitted first; they all reach the queue before the engine loop wakes
    (asyncio runs ready tasks in order), so its first step fills every running slot. That first forward
    is held until the INTERACTIVE requests are queued. At the next step each of them finds the slots
    taken and sends the youngest running BATCH request back to the queue. Before that step a request
    can only end on its own (deadline, or EOS or a stop string in its first forward): cancels and
    disconnects need a delta that their consumer reads only during the next forward. So at least one
    preempts unless 8 of the 12 end after one forward; only the 3 deadline requests are set up to.
    """
    batch = [s for s in specs if s.priority is Priority.BATCH]
    interactive = [s for s in specs if s.priority is Priority.INTERACTIVE]
    gate = ForwardGate(runner.execute)
    monkeypatch.setattr(runner, "execute", gate)

    def consume(spec):
        return asyncio.create_task(_consume(engine, spec, actions.get(spec.request_id)))

    consumers = {s.request_id: consume(s) for s in batch}
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        assert len(engine.scheduler.running) == engine.config.max_running, "BATCH requests must fill every slot"
        consumers.update({s.request_id: consume(s) for s in interactive})
        queued = {s.request_id for s in interactive}
        await wait_until(lambda: queued <= {r.id for r in engine.scheduler.waiting}, "INTERACTIVE to queue")
    finally:
        gate.release()  # on failure too: engine.stop() must not wait on a held forward
    return [await consumers[s.request_id] for s in specs]


async def test_32_concurrent_requests_match_their_solo_runs_and_leak_nothing(runner, monkeypatch, wait_until):
    from scheduler.decoders import ModelDecoderFactory
    from scheduler.engine import Engine

    tokenizer = runner.tokenizer
    factory = ModelDecoderFactory(runner)
    specs = _requests(tokenizer)
    for rid in ("r5", "r17", "r26"):
        specs[int(rid[1:])].max_time_ms = 1
    solo = {s.request_id: {m: _solo(runner, factory, s, m) for m in (Mode.AR, Mode.REFUSION)} for s in specs}
    cancelled = (_pick_cancel(tokenizer, specs, solo), "r7", "r10")
    actions = {**dict.fromkeys(cancelled, "cancel"), "r13": "disconnect", "r21": "disconnect"}
    # A stop string taken from an AR request's own solo text ends it early, at the same place (random
    # weights may generate only special tokens: then no request gets one; test_sched_detokenizer covers it).
    stopped = _pick_stop(tokenizer, specs, solo, exclude=set(actions) | {"r5", "r17", "r26"})

    # prefix_wait_blocks 0: the requests sharing SHARED all start in the first step (the preemption set-up
    # below needs every slot filled at once); waiting for an in-flight prefill: test_sched_prefix_cache.py
    config = EngineConfig(token_budget=256, deadline_grace_ms=0, max_running=12, prefix_wait_blocks=0,
                          routing=RoutingConfig(calibrate=True, calibration_tokens=(1, 64, 256), allow_switch=False))
    engine = Engine(runner, tokenizer, config, factory)
    await engine.start()  # calibrates on the ungated runner
    try:
        results = await _run_with_preemption(engine, runner, specs, actions, monkeypatch, wait_until)
    finally:
        await engine.stop()  # clears the prefix cache too

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
    assert all(reasons[r] is FinishReason.CANCELLED for r in cancelled), reasons
    assert all(reasons[r] is FinishReason.DEADLINE for r in ("r5", "r17", "r26"))
    normal = [r for r, why in reasons.items() if why in (FinishReason.LENGTH, FinishReason.STOP)]
    assert len(normal) >= 24
    assert {d[-1].mode for d in results if d and d[-1].finished} >= {Mode.AR, Mode.REFUSION}
    assert engine.prefix_cache.hit_rate > 0
    assert sum(d[-1].stats.get("preemptions", 0) for d in results if d and d[-1].finished) > 0
    assert engine.kv.sequences() == []
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


def _step_until(session, decoder, done) -> None:
    while not decoder.finished and not done(decoder):
        decoder.absorb(session.execute([decoder.next_segment(8192)])[0])


async def test_auto_request_switching_to_ar_equals_a_solo_run_switched_at_the_same_boundary(runner):
    from scheduler.decoders import ModelDecoderFactory
    from scheduler.engine import Engine

    tokenizer, factory = runner.tokenizer, ModelDecoderFactory(runner)
    spec = GenerationRequest("sw", tokenizer.encode(SNIPPETS[0]), {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 4})
    routing = RoutingConfig(calibrate=False, cost_points=[(1, 0.01), (512, 0.0101)], switch_interval_tokens=1,
                            explore_every=0)  # the first route must be ReFusion: no exploration
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

    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total

    from workers.session import RunnerSession

    session = RunnerSession(runner)
    params = factory.parse_params(spec.params)
    solo = factory.create(Mode.REFUSION, "solo-sw", spec.prompt_ids, params, None)
    _step_until(session, solo, lambda d: d.at_block_boundary() and len(d.output_ids()) >= switch_at)
    assert len(solo.output_ids()) == switch_at
    solo = factory.from_handoff(Mode.AR, "solo-sw", solo.handoff(), params)
    _step_until(session, solo, lambda d: False)
    session.free("solo-sw")
    assert [t for d in deltas for t in d.token_ids] == solo.output_ids()
    assert session.blocks.num_free == session.blocks.num_total
