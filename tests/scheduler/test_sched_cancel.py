"""Cancellation (explicit, mid-forward, disconnect, task cancel) and deadlines (fake runner, no torch).

Nothing here races the clock. A forward is held (ForwardGate) when a test must act while it runs, and
the engine's clock is moved on (SkewedClock) when a deadline or the drain timeout must pass at a chosen
point, so every outcome is exact: which token a deadline cuts at, which request the drain lets finish.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from sched_fakes import NEWLINE, FakeRunner, ForwardGate, collect, ids_of, make_engine

import scheduler.engine as engine_module
import scheduler.engine_loop as engine_loop_module
import scheduler.engine_output as engine_output_module
from scheduler.api import FinishReason, GenerationRequest, Mode

# A deadline, grace or drain timeout that never passes by itself during a test; SkewedClock passes it.
NEVER_MS = 3_600_000


def req(rid, prompt=(5, 6, 7), gen=64, **kw):
    return GenerationRequest(rid, list(prompt), {"gen_length": gen}, **kw)


def forwards_of(runner, seq_id):
    return sum(1 for call in runner.calls for s in call if s.seq_id == seq_id)


class SkewedClock:
    """Stands in for the `time` module inside scheduler.engine: its monotonic() runs `skew_s` ahead of
    the real clock (which stamps a request's arrival), so `advance` makes a deadline pass at once."""

    def __init__(self):
        self.skew_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skew_s

    def perf_counter(self) -> float:
        return time.perf_counter()

    def thread_time(self) -> float:
        return time.thread_time()

    def advance(self, seconds: float) -> None:
        self.skew_s += seconds


@pytest.fixture
def clock(monkeypatch) -> SkewedClock:
    clock = SkewedClock()
    for module in (engine_module, engine_loop_module, engine_output_module):  # (every clock the engine reads)
        monkeypatch.setattr(module, "time", clock)
    return clock


def advancing_at(runner, clock: SkewedClock, moves: dict[int, float]):
    """Wrap runner.execute: before forward number n (0-based) the engine's clock moves on by moves[n]
    seconds, so a deadline passes between two known forwards whatever the machine's speed."""
    execute, calls = runner.execute, [0]

    def wrapped(segments, tables):
        clock.advance(moves.get(calls[0], 0.0))
        calls[0] += 1
        return execute(segments, tables)

    runner.execute = wrapped


async def reference_ids(request: GenerationRequest, **runner_options) -> list[int]:
    """The request's output without its deadline, on a fresh engine (the fake model is deterministic)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=512, **runner_options), prefix_cache=False)
    await engine.start()
    try:
        return ids_of(await collect(engine, req(request.request_id, prompt=request.prompt_ids,
                                                gen=request.params["gen_length"], mode=request.mode)))
    finally:
        await engine.stop()


async def test_cancel_ends_stream_frees_blocks_and_stops_forwards(wait_until):
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
    await wait_until(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total, "the KV to be freed")
    seen = forwards_of(runner, "a")
    # The engine keeps stepping (another request runs to its end) and never runs "a" again.
    assert (await collect(engine, req("b", mode=Mode.AR, gen=8)))[-1].finish_reason is FinishReason.LENGTH
    assert forwards_of(runner, "b") >= 8 and forwards_of(runner, "a") == seen
    await engine.stop()


async def test_cancel_during_the_forward_frees_right_after_it(wait_until):
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    task = asyncio.create_task(collect(engine, req("a", mode=Mode.AR)))
    try:
        await wait_until(gate.entered.is_set, "the first forward")  # held: "a"'s segment is inside it
        engine.cancel("a")
        assert engine.scheduler.running == []
        # Its blocks stay allocated while the forward that writes them runs.
        assert engine.kv.tables["main"].length("a") > 0
    finally:
        gate.release()
    deltas = await task
    assert deltas[-1].finish_reason is FinishReason.CANCELLED
    await wait_until(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total, "the KV to be freed")
    assert forwards_of(runner, "a") == 1
    await engine.stop()


async def test_a_step_failing_after_its_forward_still_frees_a_request_cancelled_during_it(wait_until, monkeypatch):
    """A bug after the forward (here in postprocessing) fails the step: the loop's catch-all ends the
    running requests, and a request cancelled while its segment was in that forward, no longer running
    but holding its KV for it, gets its blocks freed too (found by a soak review)."""
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    monkeypatch.setattr(engine, "_postprocess", lambda plan, results: 1 / 0)
    cancelled = asyncio.create_task(collect(engine, req("a", mode=Mode.AR)))
    running = asyncio.create_task(collect(engine, req("b", mode=Mode.AR)))
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        await wait_until(lambda: engine.kv.tables["main"].length("b") > 0, "b in the held forward")
        engine.cancel("a")
        assert engine.kv.tables["main"].length("a") > 0
    finally:
        gate.release()
    assert (await cancelled)[-1].finish_reason is FinishReason.CANCELLED
    assert (await running)[-1].finish_reason is FinishReason.ERROR
    await wait_until(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total, "every block to be freed")
    await engine.stop()


async def test_consumer_that_stops_iterating_cancels_the_request(wait_until):
    runner = FakeRunner(num_blocks=64, delay_s=0.002)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    stream = engine.submit(req("a", mode=Mode.AR))
    async for _ in stream:
        break
    await stream.aclose()
    await wait_until(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total, "the KV to be freed")
    assert engine.scheduler.running == [] and "a" not in engine._requests
    await engine.stop()


async def test_cancelled_consumer_task_cancels_the_request(wait_until):
    runner = FakeRunner(num_blocks=64, delay_s=0.002)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    task = asyncio.create_task(collect(engine, req("a", mode=Mode.AR)))
    await wait_until(lambda: engine.kv.tables["main"].length("a") > 0, "the request to hold KV")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: engine.kv.pool().num_free == engine.kv.pool().num_total, "the KV to be freed")
    assert engine.scheduler.running == []
    await engine.stop()


async def test_cancel_of_a_waiting_request_never_runs_it(wait_until):
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False)
    gate = ForwardGate(runner.execute)  # "a" holds the only slot while "b" is cancelled in the queue
    runner.execute = gate
    await engine.start()
    first = asyncio.create_task(collect(engine, req("a", mode=Mode.AR, gen=16)))
    second = asyncio.create_task(collect(engine, req("b", mode=Mode.AR)))
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        await wait_until(lambda: [r.id for r in engine.scheduler.waiting] == ["b"], "b to queue")
        engine.cancel("b")
    finally:
        gate.release()
    assert (await second)[-1].finish_reason is FinishReason.CANCELLED
    assert (await first)[-1].finish_reason is FinishReason.LENGTH
    assert forwards_of(runner, "b") == 0
    await engine.stop()


async def test_deadline_ends_at_the_next_newline(clock):
    # Newlines are tokens 8 and 18 (positions 10 and 20). The deadline passes before forward 12, after
    # 11 tokens: the newline already sent does not end the request, the next one does.
    request = req("a", mode=Mode.AR, gen=200, max_time_ms=NEVER_MS)
    full = await reference_ids(request, newline_every=10)
    runner = FakeRunner(num_blocks=512, newline_every=10)
    engine, _ = make_engine(runner=runner, prefix_cache=False, deadline_grace_ms=NEVER_MS)
    advancing_at(runner, clock, {12: NEVER_MS / 1000})
    await engine.start()
    deltas = await collect(engine, request)
    ids = ids_of(deltas)
    assert deltas[-1].finish_reason is FinishReason.DEADLINE
    assert NEWLINE in full[:11] and ids == full[: full.index(NEWLINE, 11) + 1]
    assert "".join(d.text for d in deltas).endswith("\n") and ids[-1] == NEWLINE
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_deadline_without_newline_ends_after_the_grace_period(clock):
    # The deadline passes before forward 6 (5 tokens out); decoding goes on through the grace period,
    # which passes before forward 10: the request ends with that forward's token, 10 tokens in all.
    request = req("a", mode=Mode.AR, gen=500, max_time_ms=NEVER_MS)
    full = await reference_ids(request)
    runner = FakeRunner(num_blocks=512)  # no newlines
    engine, _ = make_engine(runner=runner, prefix_cache=False, deadline_grace_ms=NEVER_MS)
    advancing_at(runner, clock, {6: NEVER_MS / 1000, 10: NEVER_MS / 1000})
    await engine.start()
    deltas = await collect(engine, request)
    assert deltas[-1].finish_reason is FinishReason.DEADLINE
    assert ids_of(deltas) == full[:10] and "\n" not in "".join(d.text for d in deltas)
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_deadline_expires_a_request_still_waiting_in_the_queue(clock, wait_until):
    # A queued request with nothing sent has no line end to reach: it ends at its deadline, not after the
    # grace (here never), which only lets a decoding request finish its line (helper-183: 1.1 s for 0.5).
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False, deadline_grace_ms=NEVER_MS)
    gate = ForwardGate(runner.execute)  # "a" holds the only slot: "b" waits in the queue
    runner.execute = gate
    await engine.start()
    first = asyncio.create_task(collect(engine, req("a", mode=Mode.AR, gen=40)))
    late = asyncio.create_task(collect(engine, req("b", mode=Mode.AR, max_time_ms=NEVER_MS)))
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        await wait_until(lambda: [r.id for r in engine.scheduler.waiting] == ["b"], "b to queue")
        clock.advance(NEVER_MS / 1000)  # b's deadline passes while it waits
    finally:
        gate.release()
    late_deltas = await late
    assert late_deltas[-1].finish_reason is FinishReason.DEADLINE and ids_of(late_deltas) == []
    assert forwards_of(runner, "b") == 0
    assert (await first)[-1].finish_reason is FinishReason.LENGTH
    await engine.stop()


async def test_stop_drains_then_cancels_the_rest_and_frees_everything(clock, wait_until):
    # Forward 0 prefills both requests, forwards 1 and 2 give each a token: quick is done after forward 2.
    # Forward 0 is held until the drain has begun, forward 3 until the drain timeout has ended slow.
    runner = FakeRunner(num_blocks=1100)
    engine, _ = make_engine(runner=runner)
    after_quick = ForwardGate(runner.execute, hold_from=3)
    at_start = ForwardGate(after_quick)
    runner.execute = at_start
    await engine.start()
    quick = asyncio.create_task(collect(engine, req("quick", mode=Mode.AR, gen=2)))
    slow = asyncio.create_task(collect(engine, req("slow", mode=Mode.AR, gen=2000, prompt=[5] * 3)))
    try:
        await wait_until(at_start.entered.is_set, "the first forward")
        assert {r.id for r in engine.scheduler.running} == {"quick", "slow"}
        stopping = asyncio.create_task(engine.stop(drain_timeout_s=NEVER_MS / 1000))
        await wait_until(lambda: engine.stopping, "the drain to begin")
        at_start.release()
        await wait_until(after_quick.entered.is_set, "forward 3")
        await wait_until(quick.done, "quick's consumer to read its last delta")
        assert (await quick)[-1].finish_reason is FinishReason.LENGTH  # the drain let it finish
        clock.advance(NEVER_MS / 1000)  # the drain timeout passes with slow's segment inside forward 3
        await wait_until(slow.done, "the drain timeout to end slow")
    finally:
        at_start.release()
        after_quick.release()
    await stopping
    slow_deltas = await slow
    assert slow_deltas[-1].finish_reason is FinishReason.CANCELLED and slow_deltas[-1].error == "engine stopped"
    assert len(ids_of(slow_deltas)) == 2
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
