"""Engine.release_waiting: waiting requests taken out of the queue for another replica to run
(integrations/serve_rebalance.py; fake runner, no torch). Nothing races the clock: a held forward
(ForwardGate) keeps the only running slot busy while the queue is examined and released."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from sched_fakes import FakeRunner, ForwardGate, collect, make_engine

from scheduler.api import FinishReason, GenerationRequest, Mode, Priority


def req(rid, gen=16, **kw):
    return GenerationRequest(rid, [5, 6, 7], {"gen_length": gen}, mode=Mode.AR, **kw)


def samples(engine) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(engine.metrics.render().decode()) for s in f.samples}


async def test_release_takes_never_started_requests_first_to_start_first(wait_until):
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False)
    gate = ForwardGate(runner.execute)  # "a" holds the only slot while the queue is released
    runner.execute = gate
    await engine.start()
    running = asyncio.create_task(collect(engine, req("a")))
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        waiting = {rid: asyncio.create_task(collect(engine, req(rid, **kw))) for rid, kw in (
            ("b", {}), ("c", {"priority": Priority.INTERACTIVE}), ("probe", {"internal": True}), ("d", {}))}
        await wait_until(lambda: len(engine.scheduler.waiting) == 4, "four waiting")
        # "c" (interactive) starts first here, then b, d; the health probe is the server's own, and
        # "d" came here by a move already (keep): neither leaves
        assert [r.id for r in engine.movable(keep={"d"})] == ["c", "b"]
        assert engine.release_waiting(1, keep={"d"}) == ["c"]
        assert engine.release_waiting(5, keep={"d"}) == ["b"]
        assert engine.release_waiting(5, keep={"d"}) == []
        moved = await waiting.pop("c")
        assert len(moved) == 1 and moved[0].finished and moved[0].finish_reason is FinishReason.CANCELLED
        assert moved[0].token_ids == [] and moved[0].text == ""
        assert (await waiting.pop("b"))[-1].token_ids == []
        assert sorted(r.id for r in engine.scheduler.waiting) == ["d", "probe"]
        assert engine.in_flight("c") is None  # the id is free here again
    finally:
        gate.release()
    await running
    for rid, task in waiting.items():
        deltas = await task
        assert deltas[-1].finish_reason is FinishReason.LENGTH and sum(len(d.token_ids) for d in deltas) == 16, rid
    m = samples(engine)
    assert m[("refusion_requests_moved_total", ())] == 2
    # moved requests are neither finished nor cancelled here, and their prompts count where they start
    assert m[("refusion_requests_finished_total", (("reason", "cancelled"),))] == 0
    assert m[("refusion_requests_finished_total", (("reason", "length"),))] == 2  # a and d (the probe is internal)
    assert m[("refusion_prompt_tokens_total", ())] == 2 * 3
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_a_started_or_preempted_request_is_never_released(wait_until):
    """Only a request that produced nothing may move: a running one has streamed text, and so has a
    preempted one back in the queue (its rerun makes the same text again, here)."""
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False)
    execute = runner.execute
    first = runner.execute = ForwardGate(execute, hold_from=2)
    await engine.start()
    batch = asyncio.create_task(collect(engine, req("a", gen=32, priority=Priority.BATCH)))
    try:
        await wait_until(first.entered.is_set, "a's third forward")
        assert engine.movable() == [] and engine.release_waiting(4) == []  # "a" runs: it stays
        urgent = asyncio.create_task(collect(engine, req("i", priority=Priority.INTERACTIVE)))
        second = runner.execute = ForwardGate(execute)  # the forward after the preemption
    finally:
        first.release()
    try:
        await wait_until(second.entered.is_set, "the forward after the preemption")
        assert [(r.id, r.preemptions) for r in engine.scheduler.waiting] == [("a", 1)]
        assert engine.movable() == [] and engine.release_waiting(4) == []
    finally:
        second.release()
    assert (await urgent)[-1].finish_reason is FinishReason.LENGTH
    assert (await batch)[-1].finish_reason is FinishReason.LENGTH
    assert samples(engine)[("refusion_requests_moved_total", ())] == 0
    await engine.stop()


async def test_only_requests_past_the_running_slots_may_move(wait_until):
    """A replica does not give away what its own free slots start next step (helper-152: 5 waiting
    with 11 free slots read as 5 movable)."""
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, max_running=3, prefix_cache=False)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, req("a")))]
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        tasks += [asyncio.create_task(collect(engine, req(rid))) for rid in ("b", "c", "d", "e")]
        await wait_until(lambda: len(engine.scheduler.waiting) == 4, "four waiting")
        # 1 running + 4 waiting on 3 slots: b and c start next step; d and e would wait for a slot
        assert [r.id for r in engine.movable()] == ["b", "c"]  # first to start first, as many as wait past
        # a replica being removed hands back every waiting request, its free slots' share too
        assert [r.id for r in engine.movable(every=True)] == ["b", "c", "d", "e"]
        engine.cancel("e")
        assert [r.id for r in engine.movable()] == ["b"]
        assert engine.release_waiting(5) == ["b"] and engine.movable() == []
    finally:
        gate.release()
    for task in tasks:
        await task
    await engine.stop()


async def test_a_moved_request_keeps_its_first_arrival():
    """GenerationRequest.waited_s (set by the serving layer on a moved request): its deadline, time to
    first token and queue time count from when it first arrived, not from its arrival here."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=64), prefix_cache=False)
    await engine.start()
    late = await collect(engine, req("late", gen=64, max_time_ms=1000, waited_s=3600.0))
    assert late[-1].finish_reason is FinishReason.DEADLINE and sum(len(d.token_ids) for d in late) < 64
    assert late[-1].stats["queue_time_s"] >= 3600.0
    await engine.stop()


async def test_a_moved_request_keeps_its_place_in_line(wait_until):
    """FCFS goes by first arrival: a request moved here after waiting 5 s on another replica starts
    before one that came here (first) a moment ago, in the same class."""
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False)
    gate = ForwardGate(runner.execute)  # "a" holds the only slot while the two queue
    runner.execute = gate
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, req("a")))]
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        tasks.append(asyncio.create_task(collect(engine, req("fresh"))))
        await wait_until(lambda: len(engine.scheduler.waiting) == 1, "fresh waiting")
        tasks.append(asyncio.create_task(collect(engine, req("moved", waited_s=5.0))))
        await wait_until(lambda: len(engine.scheduler.waiting) == 2, "both waiting")
    finally:
        gate.release()
    await asyncio.gather(*tasks)
    first_seen = list(dict.fromkeys(s.seq_id for call in runner.calls for s in call))
    assert first_seen == ["a", "moved", "fresh"]
    await engine.stop()
