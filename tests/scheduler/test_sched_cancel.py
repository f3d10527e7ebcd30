"""Cancellation (explicit, mid-forward, disconnect, task cancel) and deadlines (fake runner, no torch)."""

from __future__ import annotations

import asyncio
import time

import pytest
from sched_fakes import NEWLINE, FakeRunner, collect, ids_of, make_engine

from scheduler.api import FinishReason, GenerationRequest, Mode


def req(rid, prompt=(5, 6, 7), gen=64, **kw):
    return GenerationRequest(rid, list(prompt), {"gen_length": gen}, **kw)


def forwards_of(runner, seq_id):
    return sum(1 for call in runner.calls for s in call if s.seq_id == seq_id)


async def _wait_for(predicate, timeout=2.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.002)


async def test_cancel_ends_stream_frees_blocks_and_stops_forwards():
    runner = FakeRunner(num_blocks=64, delay_s=0.002)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    stream = engine.submit(req("a", mode=Mode.AR))
    first = await stream.__anext__()
    assert not first.finished and engine.kv.tables["main"].length("a") > 0
    engine.cancel("a")
    engine.cancel("a")  # idempotent
    engine.cancel("never-submitted")
    rest = [d async for d in stream]
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.CANCELLED
    await _wait_for(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total)
    seen = forwards_of(runner, "a")
    await asyncio.sleep(0.02)
    assert forwards_of(runner, "a") == seen
    await engine.stop()


async def test_cancel_during_the_forward_frees_right_after_it():
    runner = FakeRunner(num_blocks=64, delay_s=0.05)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    task = asyncio.create_task(collect(engine, req("a", mode=Mode.AR)))
    await _wait_for(lambda: runner.calls)  # the first forward is running now (50 ms)
    engine.cancel("a")
    assert engine.scheduler.running == []
    deltas = await task
    assert deltas[-1].finish_reason is FinishReason.CANCELLED
    await _wait_for(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total)
    assert forwards_of(runner, "a") == 1
    await engine.stop()


async def test_consumer_that_stops_iterating_cancels_the_request():
    runner = FakeRunner(num_blocks=64, delay_s=0.002)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    stream = engine.submit(req("a", mode=Mode.AR))
    async for _ in stream:
        break
    await stream.aclose()
    await _wait_for(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total)
    assert engine.scheduler.running == [] and "a" not in engine._requests
    await engine.stop()


async def test_cancelled_consumer_task_cancels_the_request():
    runner = FakeRunner(num_blocks=64, delay_s=0.002)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    task = asyncio.create_task(collect(engine, req("a", mode=Mode.AR)))
    await _wait_for(lambda: engine.kv.tables["main"].length("a") > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_for(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total)
    assert engine.scheduler.running == []
    await engine.stop()


async def test_cancel_of_a_waiting_request_never_runs_it():
    runner = FakeRunner(num_blocks=64, delay_s=0.002)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False)
    await engine.start()
    first = asyncio.create_task(collect(engine, req("a", mode=Mode.AR, gen=16)))
    second = asyncio.create_task(collect(engine, req("b", mode=Mode.AR)))
    await _wait_for(lambda: runner.calls)
    engine.cancel("b")
    assert (await second)[-1].finish_reason is FinishReason.CANCELLED
    assert (await first)[-1].finish_reason is FinishReason.LENGTH
    assert forwards_of(runner, "b") == 0
    await engine.stop()


async def test_deadline_ends_at_the_next_newline():
    runner = FakeRunner(num_blocks=128, delay_s=0.004, newline_every=10)
    engine, _ = make_engine(runner=runner, prefix_cache=False, deadline_grace_ms=5000)
    await engine.start()
    start = time.monotonic()
    deltas = await collect(engine, req("a", mode=Mode.AR, gen=200, max_time_ms=60))
    elapsed = time.monotonic() - start
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason is FinishReason.DEADLINE
    assert text.endswith("\n") and ids_of(deltas)[-1] == NEWLINE
    assert 0.06 <= elapsed < 2.0 and len(ids_of(deltas)) < 200
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_deadline_without_newline_ends_after_the_grace_period():
    runner = FakeRunner(num_blocks=512, delay_s=0.004)
    engine, _ = make_engine(runner=runner, prefix_cache=False, deadline_grace_ms=40)
    await engine.start()
    start = time.monotonic()
    deltas = await collect(engine, req("a", mode=Mode.AR, gen=500, max_time_ms=30))
    elapsed = time.monotonic() - start
    assert deltas[-1].finish_reason is FinishReason.DEADLINE
    assert 0.07 <= elapsed < 1.0
    assert "\n" not in "".join(d.text for d in deltas) and 0 < len(ids_of(deltas)) < 500
    await engine.stop()


async def test_deadline_expires_a_request_still_waiting_in_the_queue():
    runner = FakeRunner(num_blocks=64, delay_s=0.004)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False, deadline_grace_ms=0)
    await engine.start()
    first = asyncio.create_task(collect(engine, req("a", mode=Mode.AR, gen=40)))
    await _wait_for(lambda: runner.calls)
    late = await collect(engine, req("b", mode=Mode.AR, max_time_ms=20))
    assert late[-1].finish_reason is FinishReason.DEADLINE and ids_of(late) == []
    assert forwards_of(runner, "b") == 0
    await first
    await engine.stop()


async def test_stop_drains_then_cancels_the_rest_and_frees_everything():
    runner = FakeRunner(num_blocks=1100, delay_s=0.003)
    engine, _ = make_engine(runner=runner)
    await engine.start()
    quick = asyncio.create_task(collect(engine, req("quick", mode=Mode.AR, gen=2)))
    slow = asyncio.create_task(collect(engine, req("slow", mode=Mode.AR, gen=2000, prompt=[5] * 3)))
    await _wait_for(lambda: runner.calls)
    await engine.stop(drain_timeout_s=0.1)
    assert (await quick)[-1].finish_reason is FinishReason.LENGTH
    assert (await slow)[-1].finish_reason is FinishReason.CANCELLED
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
