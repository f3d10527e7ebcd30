"""Fair share between clients at admission (EngineConfig.fair_share, GenerationRequest.client): start
order over a fake runner, forced by holding forwards where arrival time matters (no torch)."""

from __future__ import annotations

import asyncio

import pytest
from sched_fakes import FakeFactory, FakeRunner, ForwardGate, collect, make_engine

from scheduler.api import FinishReason, GenerationRequest, InvalidRequestError, Mode, Priority


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

    async def submit(r):
        return await engine.submit(r).__anext__()  # admission errors raise here

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
