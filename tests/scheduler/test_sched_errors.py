"""Failures inside a step end only the requests they cause, free their KV and leave the engine serving;
a step short of KV preempts at schedule time (the runner never refuses)."""

from __future__ import annotations

import asyncio

from sched_fakes import FakeDecoder, FakeFactory, FakeRunner, FakeTokenizer, ForwardGate, collect, ids_of, make_engine

from decoding.api import DecodeParamError
from scheduler.api import FinishReason, GenerationRequest, Mode, Priority


BROKEN = 99  # a token BrokenTokenizer cannot decode


def req(rid, gen=6):
    return GenerationRequest(rid, [5, 6, 7], {"gen_length": gen}, mode=Mode.AR)


def fail_execute_when(runner, failure):
    """Wrap runner.execute: `failure(segments)` returns the exception to raise instead, or None to run."""
    original = runner.execute

    def execute(segments, tables):
        exc = failure(segments)
        if exc is not None:
            raise exc
        return original(segments, tables)

    runner.execute = execute


def faulty_absorb(factory, seq_id, fault) -> None:
    """`factory`'s decoder for `seq_id` calls fault(decoder) in place of absorbing a result (fault raises)."""
    original_create = factory.create

    def create(mode, rid, *args):
        decoder = original_create(mode, rid, *args)
        if rid == seq_id:
            decoder.absorb = lambda result: fault(decoder)
        return decoder

    factory.create = create


def assert_idle(engine):
    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total


async def test_a_forward_that_keeps_failing_errors_its_requests_and_the_engine_keeps_serving():
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    broken = [True]
    fail_execute_when(runner, lambda segments: RuntimeError("device lost") if broken[0] else None)
    failed = await asyncio.gather(collect(engine, req("a")), collect(engine, req("b")))
    for deltas in failed:
        assert deltas[-1].finish_reason is FinishReason.ERROR and "device lost" in deltas[-1].error
    assert_idle(engine)
    broken[0] = False
    after = await collect(engine, req("c"))
    assert after[-1].finish_reason is FinishReason.LENGTH and len(ids_of(after)) == 6
    await engine.stop()


async def test_a_request_that_breaks_the_shared_forward_fails_alone():
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    solo = {rid: await collect(engine, req(rid, gen=12)) for rid in ("a", "b")}
    fail_execute_when(runner, lambda segs: ValueError("bad input") if any(s.seq_id == "bad" for s in segs) else None)
    calls_before = len(runner.calls)
    a, bad, b = await asyncio.gather(collect(engine, req("a", gen=12)), collect(engine, req("bad")),
                                     collect(engine, req("b", gen=12)))
    assert bad[-1].finish_reason is FinishReason.ERROR and "bad input" in bad[-1].error
    for rid, deltas in (("a", a), ("b", b)):  # innocents never see the error and lose nothing
        assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].error is None
        assert ids_of(deltas) == ids_of(solo[rid])
    assert any(len(call) > 1 for call in runner.calls[calls_before:]), "the three never shared a forward"
    assert_idle(engine)
    await engine.stop()


async def test_a_decoder_that_raises_errors_only_its_own_request():
    factory = FakeFactory()
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, factory=factory, prefix_cache=False)
    await engine.start()

    def corrupt(decoder):
        raise ValueError("corrupt result")

    faulty_absorb(factory, "bad", corrupt)
    bad, good = await asyncio.gather(collect(engine, req("bad")), collect(engine, req("good")))
    assert bad[-1].finish_reason is FinishReason.ERROR and "corrupt result" in bad[-1].error
    assert good[-1].finish_reason is FinishReason.LENGTH and len(ids_of(good)) == 6
    assert_idle(engine)
    await engine.stop()


async def test_a_decoder_that_cannot_be_built_fails_that_request_at_start():
    factory = FakeFactory()
    engine, runner = make_engine(factory=factory, prefix_cache=False)
    await engine.start()

    def create(*args):
        raise ValueError("no decoder for this request")

    factory.create = create
    deltas = await collect(engine, req("x"))
    assert deltas[-1].finish_reason is FinishReason.ERROR and "no decoder" in deltas[-1].error
    assert engine.scheduler.running == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_a_step_short_of_kv_preempts_at_schedule_time_and_loses_nothing():
    # Admission estimates that fall short (forced here: one block per request) let three requests in
    # that need 4 blocks each (3 prompt + 10 generated tokens) from a pool of 8; the scheduler preempts the youngest when a step's KV
    # does not fit, the rerun yields the same tokens, and the runner only ever sees complete tables.
    runner = FakeRunner(num_blocks=8, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0)
    await engine.start()
    solo = [await collect(engine, req(f"solo{i}", gen=10)) for i in range(3)]
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    outs = await asyncio.gather(*(collect(engine, req(f"r{i}", gen=10)) for i in range(3)))
    for deltas, alone in zip(outs, solo):
        assert deltas[-1].finish_reason is FinishReason.LENGTH and ids_of(deltas) == ids_of(alone)
    preempted = sum(d[-1].stats["preemptions"] for d in outs)
    assert preempted > 0
    assert f'refusion_preemptions_total{{cause="kv"}} {float(preempted)}'.encode() in engine.metrics.render()
    assert engine.metrics.finished.labels(reason="error")._value.get() == 0
    assert_idle(engine)
    await engine.stop()


async def test_a_step_short_of_kv_evicts_idle_cached_prefixes_before_preempting():
    # KV ownership (docs/architecture.md; Scheduler._prepare_kv): "if blocks are short, prefix-cache blocks
    # are evicted, then running requests later in scheduling order ... are sent back to the queue". A pool
    # of 8 blocks of 4 with a 9-token prompt's 2 blocks cached and idle; r0 and r1 (estimates forced short,
    # as above) need 4 blocks each (3 prompt + 13 generated tokens, the last never fed): the cache gives up
    # its 2 and nobody is preempted.
    runner = FakeRunner(num_blocks=8, block_size=4)
    engine, _ = make_engine(runner=runner, kv_reserve_fraction=0.0)
    await engine.start()
    solo = [await collect(engine, req(f"solo{i}", gen=13)) for i in range(2)]
    await collect(engine, GenerationRequest("warm", list(range(10, 19)), {"gen_length": 1}, mode=Mode.AR))
    assert len(engine.prefix_cache) == 2 and engine.kv.pool().num_free == 6
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    outs = await asyncio.gather(*(collect(engine, req(f"r{i}", gen=13)) for i in range(2)))
    for deltas, alone in zip(outs, solo):
        assert deltas[-1].finish_reason is FinishReason.LENGTH and ids_of(deltas) == ids_of(alone)
    assert [d[-1].stats["preemptions"] for d in outs] == [0, 0]
    assert len(engine.prefix_cache) == 0
    await engine.stop()
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


async def test_a_request_preempted_while_its_step_waits_for_kv_reruns_from_its_prompt():
    # The scheduler holds a step the decoder stated but whose KV did not fit (`pending_segment`) and runs
    # it first next time; a request preempted while holding one gets a fresh decoder, whose first step is
    # its prompt's prefill, so the held step must go with the old decoder. Forced with 4-token KV blocks
    # and a pool of 3 (admission's estimate cut to one block, so both start): BATCH "y" (an 8-token
    # prompt) needs its third block a step before INTERACTIVE "x" (3 tokens) needs its second, finds none
    # free and no one ranked below it, and holds its step; the next step "x" is planned first and
    # preempts "y", step still held. Each output is the one it has alone.
    runner = FakeRunner(num_blocks=3, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0)
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    x = GenerationRequest("x", [5, 6, 7], {"gen_length": 5}, mode=Mode.AR, priority=Priority.INTERACTIVE)
    y = GenerationRequest("y", [5, 6, 7, 8, 9, 10, 11, 12], {"gen_length": 2}, mode=Mode.AR)
    await engine.start()
    alone = [await collect(engine, r) for r in (x, y)]
    held_at_requeue = []
    requeue = engine.scheduler.requeue

    def spy(victim, reason):
        held_at_requeue.append((victim.id, victim.pending_segment is not None))
        return requeue(victim, reason)

    engine.scheduler.requeue = spy
    outs = await asyncio.wait_for(asyncio.gather(collect(engine, x), collect(engine, y)), 30)
    assert held_at_requeue == [("y", True)]  # the situation this test is for
    for deltas, solo in zip(outs, alone):
        assert deltas[-1].finish_reason is FinishReason.LENGTH, deltas[-1]
        assert ids_of(deltas) == ids_of(solo)
    assert outs[1][-1].stats["preemptions"] == 1
    assert_idle(engine)
    await engine.stop()


async def test_a_request_that_never_fits_fails_alone_instead_of_looping():
    runner = FakeRunner(num_blocks=2, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0)
    await engine.start()
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    big = await asyncio.wait_for(collect(engine, req("big", gen=12)), 10)  # 15 tokens: 4 blocks
    assert big[-1].finish_reason is FinishReason.ERROR and "KV cache full" in big[-1].error
    small = await asyncio.wait_for(collect(engine, req("small", gen=4)), 10)
    assert small[-1].finish_reason is FinishReason.LENGTH and len(ids_of(small)) == 4
    assert_idle(engine)
    await engine.stop()


async def test_a_request_alone_and_refused_kv_fails_on_its_max_running_plus_first_refusal():
    """Scheduler.schedule: a step refused KV is held and its request `skipped` once more; the first one
    refused before anything else was planned fails with "KV cache full" once skipped exceeds max_running
    (`req.skipped > max_running`) and nothing else runs or ends that step. With max_running 3, the request
    alone in a 2-block pool (its estimate forced to one block so it starts; it needs 4) is refused on 3
    steps in a row and fails on the 4th (failed on the 3rd, it got one step fewer to be given room)."""
    runner = FakeRunner(num_blocks=2, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0, max_running=3)
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    schedule, refusals = engine.scheduler.schedule, []  # per plan in which "big" was refused: (skipped, failed)

    def spy():
        plan = schedule()
        big = next((r for r in engine.scheduler.running if r.id == "big"), None)
        if big is not None and big.pending_segment is not None:
            refusals.append((big.skipped, [r.id for r, _ in plan.failed]))
        return plan

    engine.scheduler.schedule = spy
    await engine.start()
    big = await asyncio.wait_for(collect(engine, req("big", gen=12)), 10)  # 15 tokens: 4 blocks
    await engine.stop()
    assert big[-1].finish_reason is FinishReason.ERROR and "KV cache full" in big[-1].error
    assert refusals == [(1, []), (2, []), (3, []), (4, ["big"])]
    assert_idle(engine)


async def test_a_request_done_without_a_step_is_never_a_kv_victim():
    # A decoder can be done without a step (a grammar that forces the rest of the text); such a request is
    # in the step's `done` list while the scheduler looks for KV for a later one. Aged (ranked first) and
    # BATCH (a worse sort key than the INTERACTIVE one short of KV), it was requeued there: its decoder
    # dropped, and the engine then ended it with no text of its own and a preemption it never had.
    runner = FakeRunner(num_blocks=2, block_size=4)
    engine, _ = make_engine(runner=runner, factory=(factory := FakeFactory()), prefix_cache=False,
                            kv_reserve_fraction=0.0, preempt_for_interactive=False)
    engine.kv.blocks_needed = lambda *args, **kwargs: 1  # both start: admission's estimate falls short
    schedule = engine.scheduler.schedule

    def schedule_forcing_the_end():
        batch, interactive = factory.decoders.get("batch"), factory.decoders.get("interactive")
        started = batch is not None and interactive is not None
        if started and interactive.cached >= 4 and not batch.hit_eos:  # the interactive's next token needs a block
            batch.hit_eos = True  # done without a step, as a grammar's forced end
            next(r for r in engine.scheduler.running if r.id == "batch").skipped = 100  # aged: ranked first
        return schedule()

    engine.scheduler.schedule = schedule_forcing_the_end
    await engine.start()
    batch = GenerationRequest("batch", [5], {"gen_length": 8}, mode=Mode.AR)  # one block holds it a while
    interactive = GenerationRequest("interactive", [5, 6, 7], {"gen_length": 4}, mode=Mode.AR,
                                    priority=Priority.INTERACTIVE)
    done, other = await asyncio.gather(collect(engine, batch), collect(engine, interactive))
    assert done[-1].finish_reason is FinishReason.STOP and done[-1].stats["preemptions"] == 0
    assert len(ids_of(done)) == done[-1].stats["generated_tokens"] >= 1
    assert other[-1].finish_reason is FinishReason.LENGTH and len(ids_of(other)) == 4
    assert_idle(engine)
    await engine.stop()


async def test_a_step_that_fails_before_anything_runs_ends_the_waiting_requests_instead_of_spinning():
    # A fault in scheduling itself (here: every schedule() raises) left the waiting requests waiting and
    # the loop retrying at full CPU forever. The second failure in a row ends them with the error.
    engine, _ = make_engine(prefix_cache=False)
    await engine.start()
    schedule, calls = engine.scheduler.schedule, [0]

    def broken():
        calls[0] += 1
        raise RuntimeError("scheduler bug")

    engine.scheduler.schedule = broken
    deltas = await asyncio.wait_for(collect(engine, req("a")), timeout=30)
    assert deltas[-1].finish_reason is FinishReason.ERROR and "internal error" in deltas[-1].error
    assert calls[0] == 2
    engine.scheduler.schedule = schedule
    after = await collect(engine, req("b"))
    assert after[-1].finish_reason is FinishReason.LENGTH
    assert_idle(engine)
    await engine.stop()


async def test_a_request_whose_deadline_cannot_be_computed_fails_alone_and_the_engine_keeps_serving(monkeypatch):
    # A max_time_ms of 400 digits (refused at submit since; scheduler.validation) overflowed the deadline's
    # float at the top of every step: the step failed, ending every running request, and the recovery,
    # closing that request, raised again, which killed the engine loop (every stream of the replica hung
    # until Ray Serve replaced it). Its own fault now ends it alone, and the recovery survives a request
    # it cannot close (Engine._finish, which never raises).
    from scheduler.request import Request

    deadline = Request.deadline_s

    def broken_for_bad(self):
        if self.id == "bad":
            raise OverflowError("int too large to convert to float")
        return deadline.fget(self)

    engine, _ = make_engine(prefix_cache=False)
    await engine.start()
    monkeypatch.setattr(Request, "deadline_s", property(broken_for_bad))
    good, bad = await asyncio.wait_for(asyncio.gather(collect(engine, req("good", gen=12)), collect(engine, req("bad"))), 30)
    assert bad[-1].finish_reason is FinishReason.ERROR and "max_time_ms" in bad[-1].error
    assert good[-1].finish_reason is FinishReason.LENGTH and len(ids_of(good)) == 12
    # The step's own recovery: a step fails (schedule raises once) while "bad", which cannot be closed
    # normally, waits; the second failure in a row ends the waiting requests, "bad" taken out anyway
    schedule, calls = engine.scheduler.schedule, [0]

    def failing_schedule():
        calls[0] += 1
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(engine, "_expire_deadlines", lambda now: None)  # (so that only the recovery meets it)
    engine.scheduler.schedule = failing_schedule
    bad = await asyncio.wait_for(collect(engine, req("bad")), 30)
    assert bad[-1].finish_reason is FinishReason.ERROR and "internal error" in bad[-1].error and calls[0] == 2
    engine.scheduler.schedule = schedule
    after = await asyncio.wait_for(collect(engine, req("after")), 30)  # the loop is alive
    assert after[-1].finish_reason is FinishReason.LENGTH
    assert_idle(engine)
    await engine.stop()


async def test_a_fault_in_the_recovery_from_a_failed_step_ends_the_requests_and_the_loop_keeps_serving(monkeypatch):
    # A step fails (here: scheduling raises) and the recovery itself raises (here: dropping the step
    # launched ahead): the loop ended then, and every stream of the engine hung. Now every request ends
    # with the error and the loop goes on.
    engine, _ = make_engine(prefix_cache=False)
    await engine.start()
    schedule = engine.scheduler.schedule

    def broken():
        raise RuntimeError("scheduler bug")

    async def broken_abandon():
        raise RuntimeError("recovery bug")

    engine.scheduler.schedule = broken
    monkeypatch.setattr(engine, "_abandon_ahead", broken_abandon)
    failed = await asyncio.wait_for(asyncio.gather(collect(engine, req("a")), collect(engine, req("b"))), 30)
    assert all(d[-1].finish_reason is FinishReason.ERROR and "internal error" in d[-1].error for d in failed)
    engine.scheduler.schedule = schedule
    after = await asyncio.wait_for(collect(engine, req("c")), 30)
    assert after[-1].finish_reason is FinishReason.LENGTH
    assert_idle(engine)
    await engine.stop()


async def test_a_request_that_ends_without_a_step_and_fails_to_stream_fails_alone():
    """A request whose decoder is done without a step (a grammar's forced text: Scheduler.schedule's
    plan.done) and whose text cannot be streamed (here: the tokenizer fails on its token) ends alone
    with that error; a request running beside it goes on. It was streamed outside any guard, so the
    step failed and the recovery ended every running request with "internal error in engine step"
    (helper-191)."""
    class BrokenTokenizer(FakeTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            if BROKEN in ids:
                raise ValueError("cannot decode this token")
            return super().decode(ids, skip_special_tokens)

    factory = FakeFactory()
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, factory=factory, tokenizer=BrokenTokenizer(), prefix_cache=False)
    gate = ForwardGate(runner.execute, hold_from=2)
    runner.execute = gate
    original_create = factory.create

    def create(mode, seq_id, prompt_ids, params, suffix_ids):
        if seq_id == "done":  # its whole text is there before any step
            return FakeDecoder(seq_id, prompt_ids, 1, generated=[BROKEN])
        return original_create(mode, seq_id, prompt_ids, params, suffix_ids)

    factory.create = create
    await engine.start()
    good = asyncio.create_task(collect(engine, req("good", gen=12)))
    await asyncio.to_thread(gate.entered.wait, 30)  # good is decoding, its next forward held
    done = asyncio.create_task(collect(engine, req("done")))
    while not engine.scheduler.waiting:
        await asyncio.sleep(0.001)
    gate.release()
    done, good = await asyncio.wait_for(asyncio.gather(done, good), 30)
    assert done[-1].finish_reason is FinishReason.ERROR and "cannot decode this token" in done[-1].error
    assert good[-1].finish_reason is FinishReason.LENGTH and good[-1].error is None and len(ids_of(good)) == 12
    assert_idle(engine)
    await engine.stop()


async def test_a_request_whose_input_fault_cannot_even_be_closed_fails_alone():
    """A decoder raising DecodeParamError (its grammar at a dead end) whose request then cannot be closed
    (here: its stream fails to flush) is taken out with the error all the same, and a request beside it
    goes on; the close was unguarded, so the step failed and every running request ended with "internal
    error in engine step" (helper-193)."""
    factory = FakeFactory()
    engine, _ = make_engine(runner=FakeRunner(num_blocks=64), factory=factory, prefix_cache=False)

    def dead_end(decoder):
        def finish(**kwargs):
            raise RuntimeError("cannot flush this stream")
        engine._requests["victim"].stream.finish = finish
        raise DecodeParamError("grammar", "no text can continue (injected)")

    faulty_absorb(factory, "victim", dead_end)
    await engine.start()
    victim, good = await asyncio.gather(collect(engine, req("victim")), collect(engine, req("good", gen=12)))
    assert victim[-1].finish_reason is FinishReason.ERROR and "no text can continue" in victim[-1].error
    assert good[-1].finish_reason is FinishReason.LENGTH and good[-1].error is None and len(ids_of(good)) == 12
    assert_idle(engine)
    await engine.stop()


async def test_a_request_whose_last_delta_cannot_be_built_still_gets_one():
    """Closing a request marks it finished before its last delta is built; when building that raises
    (here: its stats), the request is taken out with one final ERROR delta all the same. It got none: the
    fallback saw the request finished and returned, and its stream waited forever (helper-194)."""
    class BrokenStats:
        def __getattr__(self, name):
            raise RuntimeError("stats broken")

    factory = FakeFactory()
    engine, _ = make_engine(runner=FakeRunner(num_blocks=64), factory=factory, prefix_cache=False)

    def boom(decoder):
        decoder.stats = BrokenStats()
        raise RuntimeError("boom")

    faulty_absorb(factory, "victim", boom)
    await engine.start()
    victim, good = await asyncio.wait_for(asyncio.gather(collect(engine, req("victim")),
                                                         collect(engine, req("good", gen=12))), 30)
    assert [d.finished for d in victim] == [True] and victim[-1].finish_reason is FinishReason.ERROR
    assert "boom" in victim[-1].error
    assert good[-1].finish_reason is FinishReason.LENGTH and len(ids_of(good)) == 12
    assert_idle(engine)
    await engine.stop()


async def test_a_queued_request_whose_close_fails_at_its_deadline_ends_alone(monkeypatch):
    """A queued request reaching its deadline (max_time_ms) is closed outside any request's guard
    (_expire_deadlines; likewise a failed forward, a pause, stop(), a move to another replica): when
    building its last delta raises, it still gets one final ERROR delta and the running request goes
    on. The close raised out of the step: the queued request's stream waited forever and the recovery
    ended the running one with "internal error in engine step" (helper-195)."""
    from scheduler.request import Request

    final_stats = Request.final_stats

    def broken(self):
        if self.id == "victim":
            raise RuntimeError("stats broken")
        return final_stats(self)

    monkeypatch.setattr(Request, "final_stats", broken)
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False)
    gate = ForwardGate(runner.execute, hold_from=1)
    runner.execute = gate
    await engine.start()
    good = asyncio.create_task(collect(engine, req("good", gen=12)))
    await asyncio.to_thread(gate.entered.wait, 30)  # good runs, its second forward held
    victim = asyncio.create_task(collect(engine, GenerationRequest("victim", [5, 6, 7], {"gen_length": 6},
                                                                   mode=Mode.AR, max_time_ms=1)))
    while not engine.scheduler.waiting:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # past its deadline, still queued
    gate.release()
    victim, good = await asyncio.wait_for(asyncio.gather(victim, good), 30)
    assert [d.finished for d in victim] == [True] and victim[-1].finish_reason is FinishReason.ERROR
    assert "stats broken" in victim[-1].error
    assert good[-1].finish_reason is FinishReason.LENGTH and good[-1].error is None and len(ids_of(good)) == 12
    assert_idle(engine)
    await engine.stop()
