"""Fair share between clients at admission (EngineConfig.fair_share, GenerationRequest.client): start
order over a fake runner, forced by holding forwards where arrival time matters (no torch)."""

from __future__ import annotations

import asyncio

import pytest
from sched_fakes import FakeFactory, FakeRunner, ForwardGate, collect, make_engine

from scheduler.api import FinishReason, GenerationRequest, InvalidRequestError, Mode, Priority
from scheduler.plan import StepPlan


def req(rid, client, priority=Priority.BATCH, gen=4):
    return GenerationRequest(rid, [5, 6, 7], {"gen_length": gen}, mode=Mode.AR, priority=priority, client=client)


async def _start_order(requests, **config) -> list[str]:
    """Queue every request before the loop's first step, run them all; the order they started in."""
    factory = FakeFactory()
    engine, _ = make_engine(factory=factory, prefix_cache=False, **config)
    await engine.start()
    try:
        tasks = [asyncio.create_task(collect(engine, r)) for r in requests]
        await asyncio.sleep(0)  # each task has submitted
        results = await asyncio.gather(*tasks)
    finally:
        await engine.stop()
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    return [seq_id for seq_id, _ in factory.created]


async def _start_order_of(engine, factory, tasks) -> list[str]:
    """Wait for `tasks` (collects) to end, stop the engine; the order the requests started in."""
    results = await asyncio.gather(*tasks)
    await engine.stop()
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    return [seq_id for seq_id, _ in factory.created]


@pytest.mark.parametrize("fair_share", [True, False])
async def test_a_client_with_nothing_running_starts_before_another_clients_queue(wait_until, fair_share):
    """Client A fills both running slots and queues four more; B's one request, arriving after them,
    takes the next free slot (B holds none, A one: a1 runs longer than a0). FCFS made it wait for all
    of A's."""
    factory = FakeFactory()
    runner = FakeRunner()
    engine, _ = make_engine(runner=runner, factory=factory, prefix_cache=False, max_running=2, fair_share=fair_share)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, req(f"a{k}", "A", gen=12 if k == 1 else 4))) for k in range(6)]
    try:
        await wait_until(gate.entered.is_set, "A's first forward")  # a0 and a1 run; a2..a5 wait
        tasks.append(asyncio.create_task(collect(engine, req("b0", "B"))))
        await wait_until(lambda: len(engine.scheduler.waiting) == 5, "b0 queued behind a2..a5")
        assert engine.stats()["clients"] == {"running": 1, "waiting": 2, "most_slots": 2}
        probe = GenerationRequest("probe", [5], {"gen_length": 1}, mode=Mode.AR, internal=True)
        tasks.append(asyncio.create_task(collect(engine, probe)))  # (the server's own: not a client)
        await wait_until(lambda: len(engine.scheduler.waiting) == 6, "the probe queued")
        assert engine.stats()["clients"] == {"running": 1, "waiting": 2, "most_slots": 2}
    finally:
        gate.release()
    order = await _start_order_of(engine, factory, tasks)
    order.remove("probe")  # (anonymous, it starts by the same rules: where is not this test's point)
    assert order == (["a0", "a1", "b0", "a2", "a3", "a4", "a5"] if fair_share else
                     ["a0", "a1", "a2", "a3", "a4", "a5", "b0"]), order


@pytest.mark.parametrize("fair_share", [True, False])
async def test_clients_queuing_many_requests_take_turns(fair_share):
    """One running slot, three clients' queues submitted one after the other: round robin (each start
    goes to the client whose latest start is oldest among those holding the fewest slots), FCFS within
    a client; without the fair share, FCFS."""
    requests = [req(f"{c}{k}", c) for c in "abc" for k in range(3)]
    order = await _start_order(requests, max_running=1, fair_share=fair_share)
    expected = ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"] if fair_share else [r.request_id for r in requests]
    assert order == expected


@pytest.mark.parametrize("priority", [Priority.INTERACTIVE, Priority.BATCH])
async def test_fresh_client_ids_do_not_overtake_a_waiting_clients_request(wait_until, priority):
    """B's b1 waits behind its running b0; eight requests with client ids never seen before arrive
    after it. Once b0 ends B holds no slot either, and b1, queued first, starts first: a fresh id
    counts its turn from its arrival (helper-126: it counted as never started and went first, so ids
    made up per request held b1 back for as long as they kept coming)."""
    factory = FakeFactory()
    runner = FakeRunner()
    engine, _ = make_engine(runner=runner, factory=factory, prefix_cache=False, max_running=1, aging_after=2)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, req("b0", "B", priority)))]
    try:
        await wait_until(gate.entered.is_set, "b0 runs")
        tasks.append(asyncio.create_task(collect(engine, req("b1", "B", priority))))
        await wait_until(lambda: len(engine.scheduler.waiting) == 1, "b1 queued")
        tasks += [asyncio.create_task(collect(engine, req(f"s{k}", f"fresh-{k}", priority))) for k in range(8)]
        await wait_until(lambda: len(engine.scheduler.waiting) == 9, "the fresh ids queued")
    finally:
        gate.release()
    assert await _start_order_of(engine, factory, tasks) == ["b0", "b1"] + [f"s{k}" for k in range(8)]


async def test_the_fair_order_ages_nobody():
    """aging_after 2: the requests the fair order starts ahead of a client's queue are not pass-overs.
    Counted as such, a1 and a2 aged once b0 and c0 started, ranked with the first class and ran both
    before b1 (a0, b0, c0, a1, a2, ...)."""
    requests = [req(f"{c}{k}", c) for c in "abc" for k in range(3)]
    order = await _start_order(requests, max_running=1, aging_after=2)
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


async def test_priority_classes_come_before_the_fair_share():
    """B has nothing running, but its BATCH request still waits for A's INTERACTIVE ones (their class
    first); the fair share orders clients within a class."""
    requests = [req("batch-b", "B")] + [req(f"i{k}", "A", priority=Priority.INTERACTIVE) for k in range(3)]
    order = await _start_order(requests, max_running=1)
    assert order == ["i0", "i1", "i2", "batch-b"]


async def test_anonymous_requests_share_one_client():
    """Requests without a client are one client's: three of them queued first, then C's one request,
    which goes second (C's turn after the anonymous client's first start), not fourth; among
    themselves the anonymous requests keep FCFS."""
    requests = [req(f"anon{k}", None) for k in range(3)] + [req("c0", "C")]
    assert await _start_order(requests, max_running=1) == ["anon0", "c0", "anon1", "anon2"]
    assert await _start_order(requests[:3], max_running=1) == ["anon0", "anon1", "anon2"]


async def _held_engine(wait_until, first, **config):
    """An engine on fakes (`config` beside) whose first forward, `first`'s alone, is held: admission walks
    are then the test's own (`_start_waiting`). Returns (engine, factory, gate, [first's task])."""
    factory = FakeFactory()
    runner = FakeRunner()
    engine, _ = make_engine(runner=runner, factory=factory, prefix_cache=False, **config)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, first))]
    await wait_until(gate.entered.is_set, f"{first.request_id} runs")
    return engine, factory, gate, tasks


async def test_the_fair_order_counts_the_slots_a_client_takes_by_starting_ahead(wait_until):
    """Four running slots, B's b0 running; B's b1..b3, then A's a0..a2, waiting. A holds no slot and goes
    first; starting a0 makes it hold one, as B does, and B's turn is the older: b1, then a1. With the slot
    a0 takes left uncounted, A kept the fewest and took all three free slots (a0, a1, a2)."""
    engine, factory, gate, tasks = await _held_engine(wait_until, req("b0", "B"), max_running=4)
    sched = engine.scheduler
    try:
        tasks += [asyncio.create_task(collect(engine, req(f"{c}{k}", c.upper()))) for c, k in
                  [("b", 1), ("b", 2), ("b", 3), ("a", 0), ("a", 1), ("a", 2)]]
        await wait_until(lambda: len(sched.waiting) == 6, "b1..b3 and a0..a2 queued")
        sched._start_waiting(StepPlan())  # one admission walk, the forward still held
        assert [r.id for r in sched.running] == ["b0", "a0", "b1", "a1"]
    finally:
        gate.release()
    assert (await _start_order_of(engine, factory, tasks))[:4] == ["b0", "a0", "b1", "a1"]


async def test_a_slot_taken_in_the_first_class_counts_in_the_next_classs_fair_order(wait_until):
    """Three running slots, B's b0 running; A's BATCH ab, B's BATCH bb and A's INTERACTIVE ai waiting.
    ai starts first (its class), so A holds a slot, as B does, when the BATCH requests are ordered: B's
    turn is the older and bb takes the last slot though ab came first. With ai's slot left out of A's
    count there, A held none and ab took it."""
    engine, factory, gate, tasks = await _held_engine(wait_until, req("b0", "B"), max_running=3)
    sched = engine.scheduler
    try:
        tasks += [asyncio.create_task(collect(engine, r)) for r in
                  (req("ab", "A"), req("bb", "B"), req("ai", "A", priority=Priority.INTERACTIVE))]
        await wait_until(lambda: len(sched.waiting) == 3, "ab, bb and ai queued")
        sched._start_waiting(StepPlan())
        assert [r.id for r in sched.running] == ["b0", "ai", "bb"] and [r.id for r in sched.waiting] == ["ab"]
    finally:
        gate.release()
    assert await _start_order_of(engine, factory, tasks) == ["b0", "ai", "bb", "ab"]


async def test_a_preempted_request_takes_its_turn_from_its_requeue(wait_until):
    """Four running slots: x0 runs, B's b0 starts, then A's a0 queues and INTERACTIVE i0 and j0 take the
    last slots; k0 (INTERACTIVE) preempts b0. When a slot frees, a0 and the requeued b0 hold none, and b0
    counts as queued at its requeue (Request.queued_turn), after a0's arrival: a0 starts first. With its
    turn left at its first arrival, B's turn was b0's start, a0's arrival tied it, and b0, the older, went
    first again."""
    engine, factory, gate, tasks = await _held_engine(wait_until, req("x0", "X"), max_running=4)
    sched = engine.scheduler
    try:
        tasks.append(asyncio.create_task(collect(engine, req("b0", "B"))))
        await wait_until(lambda: len(sched.waiting) == 1, "b0 queued")
        sched._start_waiting(StepPlan())  # b0 starts outside the held forward, so it can be preempted
        tasks += [asyncio.create_task(collect(engine, r)) for r in
                  (req("a0", "A"), req("i0", "I", Priority.INTERACTIVE), req("j0", "J", Priority.INTERACTIVE))]
        await wait_until(lambda: len(sched.waiting) == 3, "a0, i0 and j0 queued")
        sched._start_waiting(StepPlan())
        assert [r.id for r in sched.running] == ["x0", "b0", "i0", "j0"] and [r.id for r in sched.waiting] == ["a0"]
        tasks.append(asyncio.create_task(collect(engine, req("k0", "K", Priority.INTERACTIVE))))
        await wait_until(lambda: len(sched.waiting) == 2, "k0 queued")
        sched._start_waiting(StepPlan())
        assert [r.id for r in sched.running] == ["x0", "i0", "j0", "k0"]
        assert [r.id for r in sched.waiting] == ["a0", "b0"]  # b0 preempted, back in the queue
    finally:
        gate.release()
    order = await _start_order_of(engine, factory, tasks)
    assert order == ["x0", "b0", "i0", "j0", "k0", "a0", "b0"], order


@pytest.mark.parametrize("client", [5, "x" * 257])
async def test_a_bad_client_key_is_refused_naming_it(client):
    engine, _ = make_engine(prefix_cache=False)
    await engine.start()
    try:
        with pytest.raises(InvalidRequestError) as err:
            await collect(engine, req("r", client))
        assert err.value.field == "client" and "256 characters" in str(err.value)
    finally:
        await engine.stop()


@pytest.mark.parametrize("fair_share", [True, False])
async def test_a_flood_that_filled_the_queue_first_does_not_lock_others_out(wait_until, fair_share):
    """max_queue 4, one running slot (held): A's flood fills the queue before anyone else comes. B's
    request (fewer waiting than A's) still queues, up to max_running places past the bound (one here:
    C's is refused then), and takes its turn among A's; A's next is refused at the bound. Without the fair share B was refused while the flood
    waited (helper-127: 24 of 24 tries over 24 s). A cap of half the queue per client, tried first,
    left this case open: it applied only once another client had a request in."""
    from scheduler.api import OverloadedError

    factory = FakeFactory()
    runner = FakeRunner()
    engine, _ = make_engine(runner=runner, factory=factory, prefix_cache=False, max_running=1, max_queue=4,
                            fair_share=fair_share)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    sched = engine.scheduler

    async def submit(r):  # admission errors raise at once; an admitted request would wait for the held forward
        return await asyncio.wait_for(engine.submit(r).__anext__(), 30)  # (so a wrongly admitted one fails, not hangs)

    tasks = [asyncio.create_task(collect(engine, req(f"a{k}", "A"))) for k in range(5)]
    try:
        await wait_until(lambda: gate.entered.is_set() and len(sched.waiting) == 4, "a0 runs, a1..a4 wait")
        if fair_share:
            tasks.append(asyncio.create_task(collect(engine, req("b0", "B"))))
            await wait_until(lambda: len(sched.waiting) == 5, "b0 queued past the bound")
            with pytest.raises(OverloadedError, match="fewer requests waiting than another's may queue past it"):
                await submit(req("a5", "A"))
            with pytest.raises(OverloadedError):  # (max_running: 1 place past the bound, b0's)
                await submit(req("c0", "C"))
        else:
            with pytest.raises(OverloadedError, match="engine overloaded"):
                await submit(req("b0", "B"))
    finally:
        gate.release()
    order = await _start_order_of(engine, factory, tasks)
    # (b0 arrived after A's latest start: their turns tie and a1, queued first, goes first, then b0)
    assert order == (["a0", "a1", "b0", "a2", "a3", "a4"] if fair_share else [f"a{k}" for k in range(5)])


async def test_a_client_alone_may_fill_the_queue(wait_until):
    runner = FakeRunner()
    engine, _ = make_engine(runner=runner, prefix_cache=False, max_running=1, max_queue=4)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, req(f"a{k}", "A"))) for k in range(5)]
    try:
        await wait_until(lambda: len(engine.scheduler.waiting) == 4, "a1..a4 queued")
    finally:
        gate.release()
    results = await asyncio.gather(*tasks)
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    await engine.stop()
