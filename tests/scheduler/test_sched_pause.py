"""Engine.pause / resume (vLLM's pause_generation(mode="keep")) on a real ModelRunner and the real decoders
(the shipped model on the CPU): a paused engine runs no forward while requests keep their slots and
queue, cancels and deadlines still end requests, the health probe passes, stop() drains, and a resumed
request ends exactly as if never paused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sched_fakes import ForwardGate, ids_of

from integrations.engine_client import LocalEngineClient
from integrations.engine_host import one_token_probe
from scheduler.api import FinishReason, GenerationRequest, Mode
from scheduler.config import EngineConfig, RoutingConfig
from scheduler.engine import Engine
from scheduler.engine_loop import PAUSED_POLL_S

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(),
                                                   reason="models/refusion-tiny-code not present")]

HELD_S = 10 * PAUSED_POLL_S  # how long a test watches a paused engine (ten of its looks)


@pytest.fixture(scope="module")
def runner():
    from workers.runner import ModelRunner

    return ModelRunner(SHIPPED_MODEL, device="cpu", num_blocks=256, block_size=16)


async def _engine(runner, pipelined: bool = False, max_running: int = 4) -> Engine:
    config = EngineConfig(max_running=max_running, routing=RoutingConfig(calibrate=False), async_scheduling=pipelined,
                          overlap_streaming=pipelined)
    engine = Engine(runner, runner.tokenizer, config)
    await engine.start()
    return engine


def _spec(runner, rid: str, mode: Mode, max_tokens: int = 40, **kwargs) -> GenerationRequest:
    params = {"gen_length": 64, "slot_size": 8, "serial_num_blocks": 1, "temperature": 0.0}
    if mode is Mode.AR:
        params["ignore_eos"] = True  # (AR only; ReFusion's plan may end early: the reference ends there too)
    return GenerationRequest(rid, runner.tokenizer.encode("from typing import"), params, mode=mode,
                             max_tokens=max_tokens, **kwargs)


async def _until(check, what: str, timeout_s: float = 60.0) -> None:
    async def poll():
        while not check():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _reference(runner, mode: Mode, pipelined: bool) -> tuple[list[int], FinishReason]:
    engine = await _engine(runner, pipelined)
    try:
        deltas = [d async for d in engine.submit(_spec(runner, "x", mode))]
        return ids_of(deltas), deltas[-1].finish_reason
    finally:
        await engine.stop()


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("mode", [Mode.AR, Mode.REFUSION])
async def test_a_paused_engine_runs_no_forward_queues_requests_and_resumes_exactly(runner, mode, pipelined):
    want, reason = await _reference(runner, mode, pipelined)
    assert len(want) > 8
    engine = await _engine(runner, pipelined)
    got: list[int] = []
    ends: dict = {}
    paused = asyncio.Event()

    async def read(spec):
        async for delta in engine.submit(spec):
            if spec.request_id == "x":
                got.extend(delta.token_ids)
                if got and not paused.is_set():  # (its reader pauses at its first token: x cannot have ended)
                    await engine.pause()
                    paused.set()
            if delta.finished:
                ends[spec.request_id] = delta.finish_reason

    try:
        first = asyncio.create_task(read(_spec(runner, "x", mode)))
        await asyncio.wait_for(paused.wait(), 60)
        assert engine.paused
        forwards = engine.forwards
        [x] = engine.scheduler.running
        made = x.generated_tokens()
        second = asyncio.create_task(read(_spec(runner, "y", mode, max_tokens=8)))
        await _until(lambda: any(r.id == "y" for r in engine.scheduler.waiting), "y to be admitted")
        await asyncio.sleep(HELD_S)
        assert engine.forwards == forwards and x.generated_tokens() == made < len(want)  # held: no forward, no id
        assert engine.scheduler.running == [x] and [r.id for r in engine.scheduler.waiting] == ["y"] and not ends
        gauges = engine.metrics.render().decode()
        assert "refusion_requests_waiting 1.0" in gauges and "refusion_requests_running 1.0" in gauges
        assert got == want[:len(got)]
        engine.resume()
        await asyncio.wait_for(asyncio.gather(first, second), 120)
    finally:
        await engine.stop()
    assert not engine.paused and engine.forwards > forwards
    assert got == want  # as if never paused
    assert ends["x"] is reason and set(ends) == {"x", "y"}
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


async def test_cancels_and_deadlines_end_requests_while_paused_and_free_their_kv(runner):
    engine = await _engine(runner)
    free = engine.kv.pool().num_free
    try:
        deltas = engine.submit(_spec(runner, "x", Mode.AR, max_tokens=400))
        first = await deltas.__anext__()  # (x runs: it holds KV)
        await engine.pause()
        assert engine.kv.pool().num_free < free
        late = asyncio.create_task(asyncio.wait_for(_last(engine.submit(_spec(runner, "d", Mode.AR, max_time_ms=50))), 30))
        engine.cancel("x")
        rest = [d async for d in deltas]
        assert rest[-1].finished and rest[-1].finish_reason is FinishReason.CANCELLED
        last = await late  # its deadline passes while paused: it ends, never having run
        assert last.finish_reason is FinishReason.DEADLINE and not ids_of([last])
        assert engine.paused and engine.kv.pool().num_free == free and first.token_ids
    finally:
        await engine.stop()


async def _last(deltas):
    last = None
    async for last in deltas:
        pass
    return last


async def test_the_health_probe_passes_while_paused(runner):
    engine = await _engine(runner, max_running=1)
    client = LocalEngineClient(engine, runner.tokenizer, "m")
    try:
        await engine.pause()
        forwards = engine.forwards
        await asyncio.wait_for(one_token_probe(client, timeout_s=1.0, forwards=lambda: engine.forwards,
                                               paused=lambda: engine.paused), 10)
        await asyncio.wait_for(client.check_health(), 10)  # (the local client's own probe)
        assert engine.forwards == forwards and not engine.scheduler.waiting  # no probe was queued
        engine.resume()
        await asyncio.wait_for(client.check_health(), 60)  # a real probe again
        assert engine.forwards > forwards
    finally:
        await engine.stop()


async def test_stop_ends_a_pause_and_drains_the_running_requests(runner):
    engine = await _engine(runner)
    deltas = engine.submit(_spec(runner, "x", Mode.AR, max_tokens=24))
    await deltas.__anext__()
    await engine.pause()
    rest = asyncio.create_task(_last(deltas))
    await engine.stop(drain_timeout_s=60)
    last = await rest
    assert last.finish_reason is FinishReason.LENGTH and last.error is None  # drained, not cut
    assert not engine.paused


async def test_a_pause_holds_only_once_the_step_in_progress_is_absorbed_and_a_resume_overtakes_it(runner):
    """`paused` (GET /is_paused) is true only once the loop holds; a resume() while a pause() waits for
    that makes the pause return False at once (it waited for a later pause, or stop(), before: a POST
    /pause overtaken by a POST /resume never answered, helper-175)."""
    engine = await _engine(runner)
    gate = ForwardGate(runner.execute, hold_from=10**9)
    runner.execute = gate
    try:
        deltas = engine.submit(_spec(runner, "x", Mode.AR, max_tokens=400))
        await deltas.__anext__()  # (x runs: the loop steps)
        gate.hold_from = gate.calls  # x's next forward waits in its thread: the loop is inside that step
        await _until(gate.entered.is_set, "the next forward")
        waiting = asyncio.ensure_future(engine.pause())
        await asyncio.sleep(HELD_S)
        assert not engine.paused and not waiting.done()  # asked, not held: a forward is in flight
        engine.resume()
        assert await asyncio.wait_for(waiting, 10) is False and not engine.paused
        gate.release()
        more = await asyncio.wait_for(deltas.__anext__(), 30)  # not held: x goes on
        assert more.token_ids
        assert await asyncio.wait_for(engine.pause(), 30) is True and engine.paused  # and a pause now holds
        engine.resume()
        await deltas.aclose()
    finally:
        gate.release()
        runner.__dict__.pop("execute", None)
        await engine.stop()
    assert await engine.pause() is False  # (after stop(): nothing to hold)


async def test_pause_and_resume_are_idempotent(runner):
    engine = await _engine(runner)
    try:
        engine.resume()  # (not paused: nothing to do)
        assert await engine.pause() is True
        assert await asyncio.wait_for(engine.pause(), 5) is True  # (already held: at once)
        engine.resume()
        engine.resume()
        last = await asyncio.wait_for(_last(engine.submit(_spec(runner, "x", Mode.AR, max_tokens=4))), 60)
        assert last.finish_reason is FinishReason.LENGTH
    finally:
        await engine.stop()
