"""Priority order, the per-step token budget, chunked prefill and fairness (fake runner, no torch)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from sched_fakes import FakeFactory, FakeRunner, FakeTokenizer, ForwardGate, collect, ids_of, make_engine

from scheduler.api import FinishReason, GenerationRequest, Mode, Priority
from scheduler.config import EngineConfig, RoutingConfig
from scheduler.engine import Engine
from scheduler.plan import StepPlan


def req(rid, prompt=(5, 6, 7), gen=4, **kw):
    return GenerationRequest(rid, list(prompt), {"gen_length": gen}, **kw)


async def _submit_all_then_run(engine, requests):
    """Queue every request before the loop takes its first step, then run them all."""
    tasks = [asyncio.create_task(collect(engine, r)) for r in requests]
    await asyncio.sleep(0)  # each task has submitted (first __anext__ ran up to its queue wait)
    return await asyncio.gather(*tasks)


async def test_interactive_starts_before_earlier_batch_requests():
    runner = FakeRunner()
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False)
    await engine.start()
    requests = [req("batch1", mode=Mode.AR), req("batch2", mode=Mode.AR), req("inter", mode=Mode.AR, priority=Priority.INTERACTIVE)]
    await _submit_all_then_run(engine, requests)
    order = []
    for call in runner.calls:
        if call[0].seq_id not in order:
            order.append(call[0].seq_id)
    assert order == ["inter", "batch1", "batch2"]
    await engine.stop()


async def test_interactive_segments_come_first_in_the_budget():
    # budget 9: the INTERACTIVE refusion step (8 tokens) goes first, the BATCH one waits a step.
    runner = FakeRunner()
    engine, _ = make_engine(runner=runner, token_budget=9, prefix_cache=False)
    await engine.start()
    await _submit_all_then_run(engine, [
        req("b", prompt=[5], mode=Mode.REFUSION),
        req("i", prompt=[5], mode=Mode.REFUSION, priority=Priority.INTERACTIVE),
    ])
    assert all(sum(len(s.token_ids) for s in call) <= 9 for call in runner.calls)
    firsts = [call[0].seq_id for call in runner.calls]
    assert firsts[0] == "i"
    await engine.stop()


async def test_token_budget_bounds_every_forward_and_nobody_starves():
    runner = FakeRunner(num_blocks=256)
    engine, _ = make_engine(runner=runner, token_budget=20, prefix_cache=False)
    await engine.start()
    results = await _submit_all_then_run(engine, [req(f"r{i}", mode=Mode.REFUSION, gen=8) for i in range(6)])
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    sizes = [sum(len(s.token_ids) for s in call) for call in runner.calls]
    assert max(sizes) <= 20
    # At most two 8-token decode steps share 20 tokens: the skipped ones ran in later forwards.
    assert max(sum(1 for s in call if s.reads) for call in runner.calls) == 2
    await engine.stop()


async def test_long_prompt_is_prefilled_in_chunks_alongside_running_requests():
    runner = FakeRunner(num_blocks=256)
    factory = FakeFactory()
    engine, _ = make_engine(runner=runner, factory=factory, token_budget=16, prefix_cache=False)
    await engine.start()
    short = engine.submit(req("short", mode=Mode.AR, gen=12))
    first = await short.__anext__()  # short is decoding now
    long_prompt = [4 + i % 30 for i in range(100)]
    long = asyncio.create_task(collect(engine, req("long", prompt=long_prompt, mode=Mode.AR, gen=4)))
    rest = [d async for d in short]
    assert len(ids_of([first] + rest)) == 12 and len(ids_of(await long)) == 4
    long_chunks = [s for call in runner.calls for s in call if s.seq_id == "long" and not s.reads]
    assert len(long_chunks) >= 99 // 15  # 99 prompt tokens before the first read, <= 15 per step
    assert all(len(s.token_ids) <= 16 for s in long_chunks)
    # The short request kept decoding while the long prompt was being prefilled.
    mixed = [call for call in runner.calls if {s.seq_id for s in call} == {"short", "long"}]
    assert mixed
    await engine.stop()


async def test_oversized_step_is_held_and_run_first_next_step():
    # budget 10: the AR request takes 1 token, the REFUSION step (8) fits; a second REFUSION step does
    # not fit beside them and is held (not re-asked) for the next forward.
    runner = FakeRunner(num_blocks=256)
    engine, _ = make_engine(runner=runner, token_budget=10, prefix_cache=False)
    await engine.start()
    results = await _submit_all_then_run(engine, [
        req("ar", prompt=[5], mode=Mode.AR, gen=8),
        req("rf1", prompt=[5], mode=Mode.REFUSION, gen=8),
        req("rf2", prompt=[5], mode=Mode.REFUSION, gen=8),
    ])
    assert all(len(ids_of(r)) == 8 for r in results)
    assert max(sum(len(s.token_ids) for s in call) for call in runner.calls) <= 10
    decode_steps = [{s.seq_id for s in call if s.reads} for call in runner.calls]
    assert not any({"rf1", "rf2"} <= steps for steps in decode_steps)  # never both in one forward
    assert sum("rf2" in steps for steps in decode_steps) == 4  # yet rf2 ran all its 4 steps (held, not lost)
    await engine.stop()


async def test_output_does_not_depend_on_the_batch():
    runner = FakeRunner(num_blocks=256)
    engine, _ = make_engine(runner=runner, token_budget=24, prefix_cache=False)
    await engine.start()
    solo = ids_of(await collect(engine, req("solo", prompt=[9, 8, 7], mode=Mode.REFUSION, gen=10)))
    crowd = await _submit_all_then_run(
        engine, [req(f"c{i}", prompt=[9, 8, 7], mode=Mode.REFUSION, gen=10) for i in range(5)]
    )
    assert all(ids_of(r) == solo for r in crowd)
    await engine.stop()


async def test_interactive_preempts_the_youngest_batch_request_which_reruns_without_resending():
    """Admission.requeue: a preempted request goes back to the queue with "its KV freed" (it restarts from
    scratch later): right after its requeue the victim holds no block. (Kept, its blocks sat idle while it
    waited, and a pool they filled deadlocked: test_sched_prefix_cache's preemption test hung.)"""
    runner = FakeRunner(num_blocks=256, delay_s=0.002)
    engine, _ = make_engine(runner=runner, max_running=2, prefix_cache=False)
    requeue, held_when_requeued = engine.scheduler.requeue, []

    def spy(victim, reason):
        requeued = requeue(victim, reason)
        held_when_requeued.append((victim.id, engine.kv.tables[victim.runner_key].table(victim.id)))
        return requeued

    engine.scheduler.requeue = spy
    await engine.start()
    solo = ids_of(await collect(engine, req("solo", prompt=[9, 8], mode=Mode.REFUSION, gen=24)))
    old = asyncio.create_task(collect(engine, req("old", prompt=[9, 8], mode=Mode.AR, gen=24)))
    await asyncio.sleep(0)  # old is submitted first
    young = engine.submit(req("young", prompt=[9, 8], mode=Mode.REFUSION, gen=24))
    first = [await young.__anext__()]  # young is running and has streamed something
    inter = await collect(engine, req("inter", mode=Mode.AR, priority=Priority.INTERACTIVE, gen=4))
    rest = [d async for d in young]
    deltas = first + rest
    assert inter[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].stats["preemptions"] == 1 and deltas[-1].stats["modes"] == ["refusion"]
    assert b'refusion_preemptions_total{cause="interactive"} 1.0' in engine.metrics.render()
    assert ids_of(deltas) == solo  # same tokens, each sent once
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(solo)
    assert (await old)[-1].stats["preemptions"] == 0  # the older BATCH request kept running
    assert held_when_requeued == [("young", [])], f"a requeued victim kept its KV blocks: {held_when_requeued}"
    inter_first = next(i for i, call in enumerate(runner.calls) if any(s.seq_id == "inter" for s in call))
    assert not any(s.seq_id == "young" for s in runner.calls[inter_first])
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_without_preemption_interactive_waits_for_a_slot():
    runner = FakeRunner(num_blocks=256, delay_s=0.002)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False, preempt_for_interactive=False)
    await engine.start()
    batch = engine.submit(req("batch", mode=Mode.AR, gen=12))
    await batch.__anext__()
    inter = await collect(engine, req("inter", mode=Mode.AR, priority=Priority.INTERACTIVE, gen=2))
    rest = [d async for d in batch]
    assert rest[-1].stats["preemptions"] == 0 and inter[-1].finish_reason is FinishReason.LENGTH
    first_inter = next(i for i, call in enumerate(runner.calls) if any(s.seq_id == "inter" for s in call))
    assert all(s.seq_id != "batch" for call in runner.calls[first_inter:] for s in call)  # batch had finished
    await engine.stop()


async def test_a_batch_request_is_preempted_at_most_max_preemptions_times():
    """One running slot, a long BATCH request and a steady INTERACTIVE stream (each one submitted once the
    previous has finished, so one always waits while the batch request runs): the first two preempt it;
    then it runs to its end, the third interactive request waiting for it, and its text is unchanged."""
    runner = FakeRunner(num_blocks=256, delay_s=0.002)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False, max_preemptions=2)
    await engine.start()
    solo = ids_of(await collect(engine, req("solo", prompt=[9, 8], mode=Mode.AR, gen=40)))
    batch = engine.submit(req("batch", prompt=[9, 8], mode=Mode.AR, gen=40))
    deltas = [await batch.__anext__()]  # running, one token streamed
    rest = asyncio.create_task(collect_rest(batch))
    inters = []
    for i in range(3):
        inters.append(await collect(engine, req(f"i{i}", mode=Mode.AR, priority=Priority.INTERACTIVE, gen=2)))
    deltas += await rest
    assert deltas[-1].stats["preemptions"] == 2 and ids_of(deltas) == solo
    batch_last = max(i for i, call in enumerate(runner.calls) if any(s.seq_id == "batch" for s in call))
    i2_first = min(i for i, call in enumerate(runner.calls) if any(s.seq_id == "i2" for s in call))
    assert i2_first > batch_last  # the third waited for the batch request to finish
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in inters)
    await engine.stop()


async def collect_rest(stream) -> list:
    return [d async for d in stream]


@pytest.mark.parametrize("aging_after", [8, 0])
async def test_a_running_batch_request_is_not_starved_by_a_steady_interactive_stream(aging_after):
    """Budget 8, every step 8 tokens: interactive steps alone would fill every forward until the last
    interactive request ended. Aging (Request.rank_class) plans the batch request with the first class
    once it has been passed over `aging_after` steps in a row, so it runs while they still do; with
    aging off (0), strict classes: it runs only after the last interactive step."""

    runner = FakeRunner(num_blocks=512)
    engine, _ = make_engine(runner=runner, token_budget=8, prefix_cache=False, aging_after=aging_after)
    await engine.start()
    batch = req("batch", prompt=[5], mode=Mode.REFUSION, gen=16)
    interactive = [req(f"i{k}", prompt=[5], mode=Mode.REFUSION, gen=16, priority=Priority.INTERACTIVE)
                   for k in range(6)]
    await _submit_all_then_run(engine, [batch, *interactive])
    steps = [{s.seq_id for s in call if s.reads} for call in runner.calls]
    batch_steps = [k for k, ids in enumerate(steps) if "batch" in ids]
    last_interactive = max(k for k, ids in enumerate(steps) if ids - {"batch"})
    if not aging_after:  # strict classes: the batch steps all come after the interactive ones
        assert batch_steps[0] > last_interactive, steps
    else:
        assert batch_steps and batch_steps[0] < last_interactive, steps
        gaps = [b - a for a, b in zip([-1] + batch_steps, batch_steps) if b < last_interactive]
        assert gaps and max(gaps) <= aging_after + 1 + len(interactive), (gaps, steps)
    await engine.stop()


@pytest.mark.parametrize("preempt", [False, True])
async def test_a_waiting_batch_request_is_not_starved_by_later_interactive_ones(preempt):
    """One running slot: a batch request queued first and 30 interactive ones behind it. Strict classes
    would start all 30 before it; aged after `aging_after` later requests started first, it is ranked with
    them and, the oldest, starts next, and (aged) is not preempted by the next interactive request: it
    runs to its end before the interactive stream does, with preemption on or off."""
    runner = FakeRunner(num_blocks=512)
    engine, _ = make_engine(runner=runner, max_running=1, prefix_cache=False, preempt_for_interactive=preempt)
    await engine.start()
    requests = [req("batch", mode=Mode.AR)] + [req(f"i{k}", mode=Mode.AR, priority=Priority.INTERACTIVE) for k in range(30)]
    results = await _submit_all_then_run(engine, requests)
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    firsts = []
    for call in runner.calls:
        for segment in call:
            if segment.seq_id not in firsts:
                firsts.append(segment.seq_id)
    last_batch = max(k for k, call in enumerate(runner.calls) if any(s.seq_id == "batch" for s in call))
    first_of_last = min(k for k, call in enumerate(runner.calls) if any(s.seq_id == "i29" for s in call))
    assert last_batch < first_of_last
    assert firsts.index("batch") == engine.config.aging_after == 8, firsts  # after exactly 8 interactive starts
    batch_calls = [k for k, call in enumerate(runner.calls) if any(s.seq_id == "batch" for s in call)]
    assert batch_calls == list(range(batch_calls[0], batch_calls[-1] + 1))  # one slot: never preempted
    await engine.stop()


async def test_interactive_short_of_kv_preempts_only_on_the_runner_whose_kv_it_waits_for(wait_until):
    """With a separate AR runner (its own KV pool), an INTERACTIVE request short of the main runner's KV
    with a running slot free preempted the youngest BATCH request whatever its runner: the AR runner's
    request lost its progress and a preemption, and freed nothing the INTERACTIVE request could use."""
    main, ar = FakeRunner(num_blocks=8, block_size=4), FakeRunner(num_blocks=64, block_size=4)
    engine = Engine(main, FakeTokenizer(), EngineConfig(routing=RoutingConfig(calibrate=False), prefix_cache=False,
                                                        kv_reserve_fraction=0.0, max_running=8),
                    FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory())
    gate = ForwardGate(main.execute, hold_from=0)
    main.execute = gate
    await engine.start()
    params = {"gen_length": 8}  # 3 + 8 tokens and one pool of 8: 6 of the main runner's 8 blocks
    b_main = asyncio.create_task(collect(engine, GenerationRequest("b_main", [5, 6, 7], params, mode=Mode.REFUSION)))
    b_ar = asyncio.create_task(collect(engine, GenerationRequest("b_ar", [5, 6, 7], params, mode=Mode.AR)))
    await wait_until(lambda: len(engine.scheduler.running) == 2 and gate.entered.is_set(), "both running, forward held")
    assert {r.id: r.runner_key for r in engine.scheduler.running} == {"b_main": "main", "b_ar": "ar"}
    urgent = asyncio.create_task(collect(engine, GenerationRequest("i", [5, 6, 7], params, mode=Mode.REFUSION,
                                                                   priority=Priority.INTERACTIVE)))
    await wait_until(lambda: any(r.id == "i" for r in engine.scheduler.waiting), "i queued")
    gate.release()
    out_main, out_ar, out_i = await asyncio.gather(b_main, b_ar, urgent)
    await engine.stop()
    assert [d[-1].finish_reason for d in (out_main, out_ar, out_i)] == [FinishReason.LENGTH] * 3
    assert out_main[-1].stats["preemptions"] == 1  # b_main holds the blocks "i" needs
    assert out_ar[-1].stats["preemptions"] == 0
    assert len(ids_of(out_ar)) == len(ids_of(out_main)) == 8


async def test_interactive_does_not_preempt_a_batch_request_whose_blocks_could_not_make_room(wait_until):
    """Two running slots, both taken: INTERACTIVE i1 (11 of 16 blocks) and BATCH b (5). INTERACTIVE i2 also
    needs 11: preempting b frees a slot but only 5 blocks, so i2 could not start anyway. It used to
    preempt b all the same (b lost its progress, i2 still waited for i1); now i2 waits for i1 and b runs
    on. Found by the KV-pressure break-test over HTTP."""
    runner = FakeRunner(num_blocks=16, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0, max_running=2)
    gate = ForwardGate(runner.execute, hold_from=0)
    runner.execute = gate
    await engine.start()
    big = {"gen_length": 36}  # AR: 3 + 36 tokens in blocks of 4, plus one: 11 blocks
    i1 = asyncio.create_task(collect(engine, GenerationRequest("i1", [5, 6, 7], big, mode=Mode.AR, priority=Priority.INTERACTIVE)))
    b = asyncio.create_task(collect(engine, GenerationRequest("b", [5, 6, 7], {"gen_length": 12}, mode=Mode.AR)))  # 5 blocks
    await wait_until(lambda: len(engine.scheduler.running) == 2 and gate.entered.is_set(), "i1 and b running, forward held")
    i2 = asyncio.create_task(collect(engine, GenerationRequest("i2", [5, 6, 7], big, mode=Mode.AR, priority=Priority.INTERACTIVE)))
    await wait_until(lambda: any(r.id == "i2" for r in engine.scheduler.waiting), "i2 queued")
    gate.release()
    out_i1, out_b, out_i2 = await asyncio.gather(i1, b, i2)
    await engine.stop()
    assert [d[-1].finish_reason for d in (out_i1, out_b, out_i2)] == [FinishReason.LENGTH] * 3
    assert out_b[-1].stats["preemptions"] == 0
    assert b'refusion_preemptions_total{cause="interactive"} 0.0' in engine.metrics.render()
    i2_first = next(n for n, call in enumerate(runner.calls) if any(s.seq_id == "i2" for s in call))
    assert not any(s.seq_id == "i1" for call in runner.calls[i2_first:] for s in call)  # i2 started once i1 ended
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


async def test_a_preempted_request_ended_while_requeued_keeps_its_generated_count_and_mode(wait_until):
    """Its final stats said it generated nothing in no mode (the rerun's decoder did not exist yet);
    the infill route's usage is stats["generated_tokens"]."""
    runner = FakeRunner(num_blocks=64, delay_s=0.01)
    engine, _ = make_engine(runner=runner, prefix_cache=False, max_running=1)
    gate = ForwardGate(runner.execute, hold_from=4)
    runner.execute = gate
    await engine.start()
    deltas = []

    async def consume():
        async for d in engine.submit(GenerationRequest("b", [5, 6, 7], {"gen_length": 32}, mode=Mode.AR)):
            deltas.append(d)

    b = asyncio.create_task(consume())
    await wait_until(gate.entered.is_set, "b decoding, its 5th forward held")
    urgent = asyncio.create_task(collect(engine, GenerationRequest("i", [8, 9], {"gen_length": 64}, mode=Mode.AR,
                                                                    priority=Priority.INTERACTIVE)))
    await wait_until(lambda: any(r.id == "i" for r in engine.scheduler.waiting), "i queued")
    gate.release()
    await wait_until(lambda: any(r.id == "b" for r in engine.scheduler.waiting), "b preempted, waiting")
    streamed = len(ids_of(deltas))
    engine.cancel("b")
    await b
    await urgent
    await engine.stop()
    final = deltas[-1]
    assert final.finish_reason is FinishReason.CANCELLED and final.stats["preemptions"] == 1
    assert final.stats["modes"] == ["ar"]
    assert final.stats["generated_tokens"] >= streamed > 0, (final.stats["generated_tokens"], streamed)


async def test_an_aged_request_short_of_kv_waits_while_the_request_holding_it_runs():
    """A step short of KV (admission estimates forced short, as test_sched_errors does) failed an aged
    BATCH request as "does not fit even alone" while the INTERACTIVE request holding the blocks, which it
    cannot preempt, still ran: aged, it was ranked first, so it was looked at while the plan was empty."""
    runner = FakeRunner(num_blocks=5, block_size=16)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0, max_running=2, aging_after=4)
    alone, _ = make_engine(runner=FakeRunner(num_blocks=5, block_size=16), prefix_cache=False, kv_reserve_fraction=0.0)
    b = GenerationRequest("b", list(range(5, 35)), {"gen_length": 32}, mode=Mode.AR)  # 4 of 5 blocks alone
    i = GenerationRequest("i", [5], {"gen_length": 30}, mode=Mode.AR, priority=Priority.INTERACTIVE)  # 2 blocks
    await alone.start()
    solo_b = await collect(alone, b)
    await alone.stop()
    assert solo_b[-1].finish_reason is FinishReason.LENGTH
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    await engine.start()
    out_b, out_i = await asyncio.gather(collect(engine, b), collect(engine, i))
    await engine.stop()
    assert out_i[-1].finish_reason is FinishReason.LENGTH
    assert out_b[-1].error is None and out_b[-1].finish_reason is FinishReason.LENGTH, out_b[-1].error
    assert ids_of(out_b) == ids_of(solo_b)
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


async def test_requests_short_of_kv_that_none_can_free_fail_one_rather_than_wait_forever(wait_until):
    """Two requests short of KV, neither a preemption victim (a victim ranks after the request short of
    blocks; here their sort keys are made equal, as no two requests' are): nothing can run, so after
    max_running such steps the first is failed; the other then finishes."""
    runner = FakeRunner(num_blocks=5, block_size=16)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0, max_running=2)
    gate = ForwardGate(runner.execute, hold_from=0)
    runner.execute = gate
    b = GenerationRequest("b", list(range(5, 35)), {"gen_length": 32}, mode=Mode.AR)  # 4 blocks alone
    i = GenerationRequest("i", [5], {"gen_length": 62}, mode=Mode.AR)  # 4 blocks
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, r)) for r in (b, i)]
    await wait_until(lambda: len(engine.scheduler.running) == 2 and gate.entered.is_set(), "both running")
    for req in engine.scheduler.running:  # neither ranks after the other (Scheduler._prepare_kv's victims do)
        req.sort_key = lambda: (0,)
    gate.release()
    out_b, out_i = await asyncio.gather(*tasks)
    await engine.stop()
    ends = sorted([(out_b[-1].finish_reason, out_b[-1].error), (out_i[-1].finish_reason, out_i[-1].error)],
                  key=lambda end: end[0].value)
    assert ends[0] == (FinishReason.ERROR, "KV cache full: its step does not fit beside the running requests, "
                                           "and none of them can run to free blocks"), ends
    assert ends[1] == (FinishReason.LENGTH, None), ends
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


async def test_a_preemption_during_the_admission_walk_keeps_its_order(wait_until):
    """`requeue` sorted the waiting list by sort_key while _start_in_order walked it in rank order: an
    aged BATCH prefix waiter ranked before the INTERACTIVE request it sorts after moved behind it, was
    looked at (and its slot held) twice, and the INTERACTIVE request a BATCH request was just preempted
    for did not start in that step. One admission walk with forwards held, so the state is exact."""
    runner = FakeRunner(num_blocks=64, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, max_running=3)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    sched = engine.scheduler
    tasks = [asyncio.create_task(collect(engine, req("v1", gen=8, mode=Mode.AR)))]
    try:
        await wait_until(gate.entered.is_set, "v1's first forward")
        tasks.append(asyncio.create_task(collect(engine, req("v2", gen=8, mode=Mode.AR))))
        await wait_until(lambda: len(sched.waiting) == 1, "v2 waiting")
        sched._start_waiting(StepPlan())  # v2 starts, outside the held forward (so it can be preempted)
        assert [r.id for r in sched.running] == ["v1", "v2"]
        tasks += [asyncio.create_task(collect(engine, req("a", gen=8, mode=Mode.AR))),
                  asyncio.create_task(collect(engine, req("i", gen=8, mode=Mode.AR, priority=Priority.INTERACTIVE)))]
        await wait_until(lambda: len(sched.waiting) == 2, "a and i waiting")
        a = next(r for r in sched.waiting if r.id == "a")
        a.aged_after, a.passed_over = 1, 1  # aged: ranked with INTERACTIVE requests, sorted as BATCH
        try_start = sched._try_start

        def a_waits_for_a_prefix(r, held_blocks=0, arriving=()):
            if r is a:
                r.prefix_wait = "v1"  # as if v1 were prefilling a's prompt
                return False
            return try_start(r, held_blocks, arriving)

        sched._try_start = a_waits_for_a_prefix
        sched._start_waiting(StepPlan())
        sched._try_start = try_start
        assert sorted(r.id for r in sched.running) == ["i", "v1"], [r.id for r in sched.running]
        assert sorted(r.id for r in sched.waiting) == ["a", "v2"]
    finally:
        gate.release()
    results = await asyncio.gather(*tasks)
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)


async def test_of_two_eligible_victims_the_latest_arrival_is_preempted_not_the_latest_started(wait_until):
    """Admission: a waiting INTERACTIVE request "preempts the youngest running BATCH request", youngest by
    arrival (Request.order), whatever order the victims started in. The fair share starts `b1` (client B,
    nothing running) before `a2` (client A, which holds `a1`'s slot) though `a2` arrived first, so the
    running list is a1, b1, a2; `i` finds no free slot and must send back `b1`, the latest arrival (taking
    the last started, `a2`, passed every other test). Admission walks with forwards held: the state is exact."""
    runner = FakeRunner(num_blocks=64, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, max_running=3)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    sched = engine.scheduler
    tasks = [asyncio.create_task(collect(engine, req("a1", gen=8, mode=Mode.AR, client="A")))]
    try:
        await wait_until(gate.entered.is_set, "a1's first forward")
        for rid, client in (("a2", "A"), ("b1", "B")):
            tasks.append(asyncio.create_task(collect(engine, req(rid, gen=8, mode=Mode.AR, client=client))))
            await wait_until(lambda: rid in {r.id for r in sched.waiting}, f"{rid} waiting")
        sched._start_waiting(StepPlan())
        assert [(r.id, r.order) for r in sched.running] == [("a1", 1), ("b1", 3), ("a2", 2)]
        tasks.append(asyncio.create_task(collect(engine, req("i", gen=8, mode=Mode.AR, priority=Priority.INTERACTIVE))))
        await wait_until(lambda: [r.id for r in sched.waiting] == ["i"], "i waiting")
        sched._start_waiting(StepPlan())
        assert [r.id for r in sched.running] == ["a1", "a2", "i"] and [r.id for r in sched.waiting] == ["b1"]
    finally:
        gate.release()
    results = dict(zip(("a1", "a2", "b1", "i"), await asyncio.gather(*tasks)))
    assert {rid: r[-1].stats["preemptions"] for rid, r in results.items()} == {"a1": 0, "a2": 0, "b1": 1, "i": 0}
    assert all(r[-1].finish_reason is FinishReason.LENGTH and len(ids_of(r)) == 8 for r in results.values())
    await engine.stop()
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


@pytest.mark.parametrize("moved", [False, True])
async def test_a_step_short_of_kv_preempts_the_latest_in_scheduling_order_of_several_victims(wait_until, moved):
    """Scheduler._prepare_kv: a step short of KV sends back the running request latest in scheduling order
    (Request.sort_key: lowest class, least skipped, latest arrival) among those ranked after it, whatever
    order they started in. Four 1-block requests fill a 4-block pool (admission's estimate forced to one
    block, as test_sched_errors does); the fair share started them a1, b1, c1, a2 (client A's a2 arrived
    before b1 and c1 but A held a1's slot). At a1's fourth token it needs a second block: of b1, c1, a2,
    c1 (the latest arrival, neither the first nor the last started) must go. With the first or last
    eligible victim taken, or the earliest, every other scheduler test passed. `moved`: a1 is INTERACTIVE
    and c1 was moved here after waiting 5 s on another replica (GenerationRequest.waited_s): its first
    arrival is the earliest of the victims, so b1 goes (with sort_key's arrival_s left out, c1 went and no
    test failed)."""
    runner = FakeRunner(num_blocks=4, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0, max_running=4)
    sched = engine.scheduler
    requeue, requeued = sched.requeue, []

    def spy(victim, reason):
        requeued.append((victim.id, reason, [r.id for r in sched.running]))
        return requeue(victim, reason)

    sched.requeue = spy
    specs = {rid: req(rid, gen=4, mode=Mode.AR, client=rid[0].upper()) for rid in ("a1", "a2", "b1", "c1")}
    if moved:
        specs["a1"] = dataclasses.replace(specs["a1"], priority=Priority.INTERACTIVE)
        specs["c1"] = dataclasses.replace(specs["c1"], waited_s=5.0)
    await engine.start()
    alone = {rid: ids_of(await collect(engine, spec)) for rid, spec in specs.items()}
    engine.kv.blocks_needed = lambda *args, **kwargs: 1
    gate = ForwardGate(runner.execute, hold_from=1)  # a1's second forward (its first decode)
    runner.execute = gate
    tasks = {"a1": asyncio.create_task(collect(engine, specs["a1"]))}
    try:
        await wait_until(gate.entered.is_set, "a1 decoding")
        for rid in ("a2", "b1", "c1"):
            tasks[rid] = asyncio.create_task(collect(engine, specs[rid]))
            await wait_until(lambda: rid in {r.id for r in sched.waiting}, f"{rid} waiting")
    finally:
        gate.release()
    outs = dict(zip(tasks, await asyncio.wait_for(asyncio.gather(*tasks.values()), 60)))
    started = ["a1", "c1", "b1", "a2"] if moved else ["a1", "b1", "c1", "a2"]
    assert requeued[0] == ("b1" if moved else "c1", "kv cache full (for a1)", started), requeued
    for rid, deltas in outs.items():
        assert deltas[-1].finish_reason is FinishReason.LENGTH and ids_of(deltas) == alone[rid]
    await engine.stop()
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
