"""Admission: validation errors, bounded queue, KV-block budget, max running (fake runner, no torch)."""

from __future__ import annotations

import asyncio
import re

import pytest
from sched_fakes import VOCAB, FakeRunner, ForwardGate, collect, ids_of, make_engine

from scheduler.admission import BACKFILL_SCAN
from scheduler.api import FinishReason, GenerationRequest, InvalidRequestError, Mode, OverloadedError, Priority
from scheduler.config import EngineConfig, EngineConfigError, RoutingConfig
from scheduler.engine import EngineNotRunningError
from scheduler.plan import StepPlan


def req(rid, prompt=(5, 6, 7), gen=6, **kw):
    return GenerationRequest(rid, list(prompt), {"gen_length": gen}, **kw)


async def test_streams_and_finishes_with_length_and_frees_kv():
    engine, runner = make_engine(prefix_cache=False)
    await engine.start()
    deltas = await collect(engine, req("a", mode=Mode.AR))
    assert deltas[-1].finished and deltas[-1].finish_reason is FinishReason.LENGTH
    assert len(ids_of(deltas)) == 6
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(ids_of(deltas))
    assert deltas[-1].stats["generated_tokens"] == 6 and deltas[-1].mode is Mode.AR
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt_ids": []}, "prompt_ids"),
        ({"prompt_ids": [5, 99999]}, "prompt_ids"),
        ({"prompt_ids": [5, "x"]}, "prompt_ids"),
        ({"params": {"gen_length": 0}}, "gen_length"),
        ({"params": {"bogus": 1}}, "bogus"),
        ({"params": "gen_length=5"}, "params"),
        ({"stop": [""]}, "stop"),
        ({"max_time_ms": -5}, "max_time_ms"),
        ({"max_time_ms": 10**400}, "max_time_ms"),  # (its deadline's float overflowed in the engine loop)
        ({"max_time_ms": 2**31}, "max_time_ms"),
        ({"mode": "fast"}, "mode"),
        ({"priority": 7}, "priority"),
        ({"suffix_ids": [-1]}, "suffix_ids"),
        ({"request_id": ""}, "request_id"),
        ({"tab_indent": 1}, "tab_indent"),
        ({"prompt_ids": [5, VOCAB]}, "prompt_ids"),  # (the first id past the vocabulary: helper-222's boundary)
        ({"suffix_ids": [VOCAB]}, "suffix_ids"),
        ({"stop": ["x"] * 25}, "stop"),  # EngineConfig.max_stop_strings is 24
        ({"tab_indent_first_line": "yes"}, "tab_indent_first_line"),
        ({"crlf": "yes"}, "crlf"),
    ],
)
async def test_bad_input_raises_invalid_request_naming_the_field(kwargs, field):
    engine, _ = make_engine()
    await engine.start()
    base = dict(request_id="r", prompt_ids=[5, 6], params={"gen_length": 4})
    base.update(kwargs)
    with pytest.raises(InvalidRequestError) as err:  # (bounded: an accepted bad value may wedge the engine)
        await asyncio.wait_for(collect(engine, GenerationRequest(**base)), 60)
    assert err.value.field == field
    await engine.stop()


async def test_prompt_that_can_never_fit_is_invalid_not_overloaded():
    engine, _ = make_engine(runner=FakeRunner(num_blocks=8, block_size=4), prefix_cache=False)
    await engine.start()
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, req("big", prompt=[5] * 40, gen=8))
    assert err.value.field == "prompt_ids" and str(err.value).endswith("; shorten the prompt")  # no shorter gen fits
    # The longest prompt that fits (the Messages route's "prompt is too long: P tokens > M maximum", on which
    # Claude Code compacts): M tokens are served beside the fewest tokens, M + 1 are refused again
    assert err.value.prompt_tokens == 40 and 0 < err.value.most < 40
    for mode in (Mode.AUTO, Mode.REFUSION, Mode.AR):
        with pytest.raises(InvalidRequestError) as err:
            await collect(engine, req(f"big-{mode.value}", prompt=[5] * 40, gen=8, mode=mode))
        longest = err.value.most
        assert len(ids_of(await collect(engine, req(f"m-{mode.value}", prompt=[5] * longest, gen=1, mode=mode)))) == 1
        with pytest.raises(InvalidRequestError) as again:
            await collect(engine, req(f"m1-{mode.value}", prompt=[5] * (longest + 1), gen=1, mode=mode))
        assert again.value.field == "prompt_ids" and again.value.most == longest
        with pytest.raises(InvalidRequestError) as unset:  # (no max_tokens set: fitted to the KV cache first)
            await collect(engine, req(f"fit-{mode.value}", prompt=[5] * 40, gen=8, mode=mode, fit_to_kv=True))
        assert unset.value.field == "prompt_ids" and unset.value.most == longest, str(unset.value)
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_a_default_gen_length_shrinks_to_the_kv_cache_a_requested_one_is_refused():
    """fit_to_kv (the client set no max_tokens): a generation the KV cache cannot hold is cut to the
    longest that fits, in whole blocks of whole slots, and ends with LENGTH; it was a 400 the client could
    only avoid by guessing a smaller max_tokens. Without fit_to_kv the request is refused as before, and
    a prompt that leaves no room is refused either way."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=8, block_size=4), prefix_cache=False)
    capacity = engine.kv.capacity()
    params = engine.scheduler.factories["main"]
    fits = max(g for g in range(1, 200) if engine.kv.blocks_needed(10, 0, params.parse_params({"gen_length": g}),
                                                                     ar_only=True) <= capacity)
    await engine.start()
    deltas = await collect(engine, req("default", prompt=[5] * 10, gen=64, mode=Mode.AR, fit_to_kv=True))
    assert 0 < fits < 64 and len(ids_of(deltas)) == fits and deltas[-1].finish_reason is FinishReason.LENGTH
    slots = await collect(engine, GenerationRequest("slots", [5] * 10, {"gen_length": 64, "slot_size": 4},
                                                    mode=Mode.AR, fit_to_kv=True))
    assert len(ids_of(slots)) == fits // 4 * 4  # whole slots
    # Room for less than one 16-token slot: one-token slots then (it was refused, blaming max_tokens)
    short = max(g for g in range(1, 200) if engine.kv.blocks_needed(20, 0, params.parse_params({"gen_length": g}),
                                                                      ar_only=True) <= capacity)
    assert short < 16
    tail = await collect(engine, GenerationRequest("tail", [5] * 20, {"gen_length": 64, "slot_size": 16},
                                                   mode=Mode.AR, fit_to_kv=True))
    assert len(ids_of(tail)) == short and tail[-1].finish_reason is FinishReason.LENGTH
    # A requested length is refused naming it, with the most that fits (it blamed the prompt)
    with pytest.raises(InvalidRequestError, match=f"; ask for at most {fits}$") as err:
        await collect(engine, req("asked", prompt=[5] * 10, gen=64, mode=Mode.AR))
    assert err.value.field == "gen_length"
    assert (err.value.asked, err.value.most, err.value.prompt_tokens) == (64, fits, 10)  # Messages' wording needs them
    assert len(ids_of(await collect(engine, req("at-most", prompt=[5] * 10, gen=fits, mode=Mode.AR)))) == fits
    # AR: the most is the tokens that fit, whatever the request's slots and semi-AR blocks (it was in steps
    # of slot_size x serial_num_blocks, then in whole slots: AR writes one token a forward, helper-188)
    shaped = {"gen_length": 64, "slot_size": 8, "serial_num_blocks": 4}
    with pytest.raises(InvalidRequestError, match=rf"gen_length \(61\).*; ask for at most {fits}$") as err:
        await collect(engine, GenerationRequest("slots8", [5] * 10, dict(shaped), mode=Mode.AR, max_tokens=61))
    assert (err.value.asked, err.value.most) == (61, fits)  # the client's cap
    assert fits % 8  # (so whole slots would have been refused)
    capped = await collect(engine, GenerationRequest("slots8-most", [5] * 10, dict(shaped), mode=Mode.AR, max_tokens=fits))
    assert len(ids_of(capped)) == fits
    with pytest.raises(InvalidRequestError, match="leaves no room to generate .* shorten the prompt") as err:
        await collect(engine, req("no-room", prompt=[5] * 40, gen=64, mode=Mode.AR, fit_to_kv=True))
    assert "gen_length" not in str(err.value)  # the client set none: the prompt is named, not a max_tokens
    assert "min_tokens" not in str(err.value)
    assert engine.kv.pool().num_free == engine.kv.pool().num_total  # nothing leaked
    await engine.stop()


async def test_an_ar_request_needs_kv_for_its_max_tokens_not_its_rounded_gen_length():
    """The ingress rounds gen_length up to whole semi-AR blocks (openai_sampling.fitting_blocks: 496 ->
    512); AR stops at max_tokens, so its KV need is max_tokens' (helper-154: a KV refusal said "ask for at
    most 496" and then refused 496, counted as 512)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=16, block_size=4), prefix_cache=False)
    capacity = engine.kv.capacity()
    params = engine.scheduler.factories["main"]
    prompt = 4 * (capacity - 1) - 24  # prompt + 24 tokens: exactly the cache; + 32: two blocks too many
    shaped = {"gen_length": 32, "slot_size": 8, "serial_num_blocks": 4}
    assert engine.kv.blocks_needed(prompt, 0, params.parse_params(shaped), ar_only=True) == capacity + 2
    await engine.start()
    deltas = await collect(engine, GenerationRequest("capped", [5] * prompt, dict(shaped), mode=Mode.AR, max_tokens=24))
    assert len(ids_of(deltas)) == 24 and deltas[-1].finish_reason is FinishReason.LENGTH
    with pytest.raises(InvalidRequestError, match="ask for at most 24$"):  # the hint is what fits, and it does
        await collect(engine, GenerationRequest("asked", [5] * prompt, dict(shaped), mode=Mode.AR, max_tokens=32))
    with pytest.raises(InvalidRequestError):  # ReFusion decodes whole slots past max_tokens: its own need
        await collect(engine, GenerationRequest("refusion", [5] * prompt, dict(shaped), mode=Mode.REFUSION, max_tokens=24))
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_the_servers_shape_shrinks_to_fit_a_clients_max_tokens_in_the_kv_cache():
    """default_shape (the client set no slot_size or serial_num_blocks): a max_tokens whose whole slots
    and ReFusion pool in the model's shape pass the KV cache is decoded in a smaller shape that holds it
    (one slot per block, then one-token slots), as an unset max_tokens was; it was a 400 telling the client
    to lower a max_tokens of 1 to "at most 3", or to shorten a prompt that an unset max_tokens answered
    (helper-188). The refusal's "at most" is the largest max_tokens admitted (it was up to 2x below), and
    a client's own shape is still refused."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=12, block_size=4), prefix_cache=False)
    capacity = engine.kv.capacity()
    shaped = {"gen_length": 64, "slot_size": 8, "serial_num_blocks": 4}
    prompt = 4 * (capacity - 1) - 6  # room for 6 tokens of text and pool: not one slot of 8
    await engine.start()

    def request(rid, max_tokens, **kw):
        return GenerationRequest(rid, [5] * prompt, dict(shaped), mode=Mode.REFUSION, max_tokens=max_tokens, **kw)

    with pytest.raises(InvalidRequestError, match="slot_size 1"):  # the client's shape (as before)
        await collect(engine, request("own", 1))
    most = None
    for max_tokens in range(1, 8):
        try:
            deltas = await collect(engine, request(f"m{max_tokens}", max_tokens, default_shape=True))
        except InvalidRequestError as exc:
            assert exc.field == "gen_length" and most is not None and (exc.asked, exc.most) == (max_tokens, most), exc
            assert str(exc).endswith(f"; ask for at most {most}")
            break
        assert len(ids_of(deltas)) == max_tokens and deltas[-1].finish_reason is FinishReason.LENGTH
        most = max_tokens
    else:
        pytest.fail("every max_tokens fitted: the cache is too large for the test")
    assert most == 5  # the 6 tokens of room: 5 of text and a pool of 1 (one-token slots, one token a block)
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_a_refusal_in_a_shape_the_server_keeps_names_one_the_resend_fits():
    """A request whose shape is not the server's to change (an infill gap's, gap_params; a client's) is
    refused with the most that fits in one block, then in one-token slots, and a resend of that shape and
    length is admitted. The one-token-block shapes of the server's default (`_smaller_shapes`) gave such a
    request "at most 9 fits with slot_size 1 and serial_num_blocks 9", which /infill cannot send: 9 was
    refused again (helper-189)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=12, block_size=4), prefix_cache=False)
    capacity = engine.kv.capacity()
    prompt = 4 * (capacity - 1) - 12  # room for 12 tokens of text, suffix and pool
    await engine.start()
    gap = {"gen_length": 32, "slot_size": 8, "serial_num_blocks": 4}
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, GenerationRequest("gap", [5] * prompt, dict(gap), mode=Mode.REFUSION, suffix_ids=[6, 7]))
    assert "steps of slot_size 8 x serial_num_blocks 4 tokens do not fit" in str(err.value)
    most = int(re.search(r"send slot_size 1 and serial_num_blocks 1 with gen_length at most (\d+)$",
                         str(err.value)).group(1))
    resend = {"gen_length": most, "slot_size": 1, "serial_num_blocks": 1}
    deltas = await collect(engine, GenerationRequest("resend", [5] * prompt, resend, mode=Mode.REFUSION, suffix_ids=[6, 7]))
    assert deltas[-1].finish_reason is not None and 0 < len(ids_of(deltas)) <= most
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def _a_running_b_queued(wait_until, **config):
    """An engine of one running slot and one queue place (`config` beside), batch a running with its first
    forward held, batch b waiting: the queue is full. Returns (engine, runner, gate, a's task, b's task)."""
    engine, runner = make_engine(max_running=1, max_queue=1, **config)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    first = asyncio.create_task(collect(engine, req("a", gen=6)))
    second = asyncio.create_task(collect(engine, req("b", gen=6)))
    await wait_until(gate.entered.is_set, "the first forward")
    await wait_until(lambda: len(engine.scheduler.waiting) == 1, "the second request to queue")
    return engine, runner, gate, first, second


async def test_full_queue_rejects_at_once_with_retry_after(wait_until):
    engine, runner, gate, first, second = await _a_running_b_queued(wait_until)
    try:
        assert [r.id for r in engine.scheduler.running] == ["a"] and engine.scheduler.waiting[0].id == "b"
        with pytest.raises(OverloadedError) as err:
            await collect(engine, req("c"))
        assert err.value.retry_after_s > 0
        assert str(err.value).startswith("engine overloaded: 1 of 1 running and 1 waiting, the most it queues "
                                         "(max_queue 1 + 0 free running slots)")
        with pytest.raises(OverloadedError):  # a health probe refused alike is not a request refused
            await collect(engine, GenerationRequest("probe", [5, 6], {"gen_length": 1}, internal=True))
    finally:
        gate.release()
    assert (await first)[-1].finish_reason is FinishReason.LENGTH
    assert (await second)[-1].finish_reason is FinishReason.LENGTH
    assert b'refusion_requests_rejected_total{reason="queue_full"} 1.0' in engine.metrics.render()
    await engine.stop()


async def test_batch_work_filling_the_queue_does_not_refuse_an_interactive_request(wait_until):
    """One running slot, one queue place: batch a runs, batch b fills the queue. Batch c is refused, but
    interactive i is queued (batch work, b aged into the first rank included, does not refuse an editor's
    completion), while interactive j, with interactive i already waiting, is refused. Found by the KV-pressure
    break-test: editors' completions got 503 while run-batch work filled the queue."""
    engine, runner, gate, a, b = await _a_running_b_queued(wait_until, preempt_for_interactive=False, aging_after=1)
    try:
        with pytest.raises(OverloadedError):
            await collect(engine, req("c"))
        engine.scheduler.waiting[0].passed_over = 1  # b has aged: it ranks with INTERACTIVE requests now,
        assert engine.scheduler.waiting[0].rank_class is Priority.INTERACTIVE  # but is batch work all the same
        i = asyncio.create_task(collect(engine, req("i", gen=6, priority=Priority.INTERACTIVE)))
        await wait_until(lambda: len(engine.scheduler.waiting) == 2, "i queued past b")
        with pytest.raises(OverloadedError) as err:
            await collect(engine, req("j", priority=Priority.INTERACTIVE))
        assert "an interactive request 1 more past waiting batch ones" in str(err.value)
    finally:
        gate.release()
    outs = await asyncio.gather(a, b, i)
    assert [out[-1].finish_reason for out in outs] == [FinishReason.LENGTH] * 3
    assert b'refusion_requests_rejected_total{reason="queue_full"} 2.0' in engine.metrics.render()
    await engine.stop()


async def test_interactive_requests_past_waiting_batch_work_stop_at_max_running_more(wait_until):
    """The queue's second bound: INTERACTIVE requests pass waiting BATCH work only by max_running places
    (config/serve.yaml sizes Ray's max_ongoing_requests for no more). One slot, two queue places, batch a
    running, b and c waiting: interactive i is queued (one interactive waiting, under the bound of 2),
    interactive j is refused though only one interactive request waits (3 waiting, the most)."""
    engine, runner = make_engine(max_running=1, max_queue=2, preempt_for_interactive=False)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, req("a", gen=6)))]
    try:
        await wait_until(gate.entered.is_set, "a's first forward")
        tasks += [asyncio.create_task(collect(engine, req(rid, gen=6))) for rid in ("b", "c")]
        await wait_until(lambda: len(engine.scheduler.waiting) == 2, "b and c queued")
        tasks.append(asyncio.create_task(collect(engine, req("i", gen=6, priority=Priority.INTERACTIVE))))
        await wait_until(lambda: len(engine.scheduler.waiting) == 3, "i queued past b and c")
        with pytest.raises(OverloadedError) as err:  # (raised at once; a wrongly admitted j fails in 30 s)
            await asyncio.wait_for(engine.submit(req("j", priority=Priority.INTERACTIVE)).__anext__(), 30)
        assert "3 waiting" in str(err.value) and "an interactive request 1 more past waiting batch ones" in str(err.value)
    finally:
        gate.release()
    assert [out[-1].finish_reason for out in await asyncio.gather(*tasks)] == [FinishReason.LENGTH] * 4
    await engine.stop()


async def test_kv_budget_holds_requests_until_blocks_free():
    # 10 blocks of 4 tokens; each request needs ceil((3 + 6 + 6) / 4) + 1 = 5 blocks: two fit at once.
    runner = FakeRunner(num_blocks=10, block_size=4)
    engine, _ = make_engine(runner=runner, kv_reserve_fraction=0.0, prefix_cache=False)
    await engine.start()
    peak = {"running": 0}
    original = runner.execute

    def watching(segments, tables):
        peak["running"] = max(peak["running"], len(engine.scheduler.running))
        return original(segments, tables)

    runner.execute = watching
    results = await asyncio.gather(*[collect(engine, req(f"r{i}", mode=Mode.AR)) for i in range(5)])
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    assert peak["running"] == 2
    assert engine.kv.pool().num_free == 10
    await engine.stop()


async def test_max_running_caps_concurrency():
    engine, runner = make_engine(max_running=3, prefix_cache=False)
    await engine.start()
    batch_sizes = []
    original = runner.execute
    runner.execute = lambda segs, tables: (batch_sizes.append(len(segs)), original(segs, tables))[1]
    await asyncio.gather(*[collect(engine, req(f"r{i}", mode=Mode.AR)) for i in range(7)])
    assert max(batch_sizes) == 3
    await engine.stop()


async def test_submit_before_start_and_after_stop_is_refused():
    engine, _ = make_engine()
    with pytest.raises(EngineNotRunningError):
        await collect(engine, req("a"))
    await engine.start()
    await engine.stop()
    with pytest.raises(OverloadedError):
        await collect(engine, req("b"))


async def test_duplicate_request_id_in_flight_is_invalid(wait_until):
    engine, runner = make_engine()
    gate = ForwardGate(runner.execute)  # "dup" stays in flight until the duplicate has been refused
    runner.execute = gate
    await engine.start()
    running = asyncio.create_task(collect(engine, req("dup", gen=6)))
    try:
        await wait_until(gate.entered.is_set, "the first forward")
        with pytest.raises(InvalidRequestError) as err:
            await collect(engine, req("dup"))
        assert err.value.field == "request_id"
    finally:
        gate.release()
    assert (await running)[-1].finish_reason is FinishReason.LENGTH  # the original is untouched
    await engine.stop()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_running": 0}, "max_running"), ({"token_budget": 0}, "token_budget"), ({"kv_reserve_fraction": 1.5}, "kv_reserve_fraction"),
     # types named, not compared (a YAML string was a TypeError from the first range check)
     ({"max_running": "lots"}, "max_running"), ({"max_queue": 2.5}, "max_queue"), ({"prefix_cache": 1}, "prefix_cache"),
     ({"grammar_token_ms": -1}, "grammar_token_ms"), ({"grammar_token_ms": "50ms"}, "grammar_token_ms")],
)
def test_engine_config_is_validated(kwargs, field):
    with pytest.raises(EngineConfigError) as err:
        EngineConfig(**kwargs)
    assert err.value.field == field


def test_routing_config_is_validated():
    with pytest.raises(EngineConfigError) as err:
        RoutingConfig(cost_points=[(0, 1.0)])
    assert err.value.field == "routing.cost_points"


async def test_a_request_pinned_to_ar_is_promised_no_refusion_pool():
    engine, _ = make_engine(prefix_cache=False)
    params = engine.scheduler.factories["main"].parse_params({"gen_length": 16, "slot_size": 1, "serial_num_blocks": 1})
    ar = engine.kv.blocks_needed(3, 0, params, ar_only=True)
    refusion = engine.kv.blocks_needed(3, 0, params)
    assert refusion - ar == 4  # the 16-token pool of tentative KV, 4-token blocks
    await engine.start()
    stream = engine.submit(req("a", gen=16, mode=Mode.AR))
    await stream.__anext__()
    assert engine.scheduler.running[0].kv_blocks == ar
    await stream.aclose()
    await engine.stop()


async def test_stopping_engine_says_it_is_shutting_down():
    engine, _ = make_engine(prefix_cache=False)
    await engine.start()
    stopping = asyncio.create_task(engine.stop(drain_timeout_s=5))
    await asyncio.sleep(0)
    assert engine.stopping
    with pytest.raises(EngineNotRunningError, match="shutting down"):
        await collect(engine, req("late"))
    await stopping
    assert not engine.stopping


async def _held_admission_walk(wait_until, behind: list[tuple[str, int, Priority]], check, head=Priority.BATCH) -> None:
    """20 blocks of 4 tokens. `a` (AR, 40 tokens, priority `head`) runs with its forwards held; the
    `behind` requests (id, tokens, priority; AR) are admitted behind it, the next step's admission walk
    runs while the forward is still held, and `check(scheduler)` reads the exact state it left. Then
    every request runs to its length and the KV comes back whole."""
    runner = FakeRunner(num_blocks=20, block_size=4)
    engine, _ = make_engine(runner=runner, kv_reserve_fraction=0.0, prefix_cache=False)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    sched = engine.scheduler
    tasks = {"a": asyncio.create_task(collect(engine, req("a", gen=40, mode=Mode.AR, priority=head)))}
    try:
        await wait_until(gate.entered.is_set, "a's first forward")
        for rid, gen, priority in behind:
            tasks[rid] = asyncio.create_task(collect(engine, req(rid, gen=gen, mode=Mode.AR, priority=priority)))
        await wait_until(lambda: len(sched.running) + len(sched.waiting) == 1 + len(behind), "every request admitted")
        sched._start_waiting(StepPlan())  # what the next step does first (the forward is still held)
        check(sched)
    finally:
        gate.release()
    results = {rid: await task for rid, task in tasks.items()}
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results.values())
    assert engine.kv.pool().num_free == 20
    await engine.stop()


async def test_short_requests_backfill_around_a_long_one_waiting_for_kv_but_never_starve_it(wait_until):
    """`a` (long) runs and holds its reservation; `b` (long) cannot fit and waits; `c` (short) fits in
    what is left and starts around `b`, since `b` waits for `a`'s blocks, not `c`'s. `d` (short) also
    fits, but now `b` would start were it not for `c`: backfilling stops and `d` queues behind `b`."""
    def check(sched):
        blocks = {r.id: r.kv_blocks for r in sched.running + sched.waiting}
        assert blocks == {"a": 12, "b": 12, "c": 4, "d": 4}  # b is 4 short while a runs; c holds those 4
        assert [r.id for r in sched.running] == ["a", "c"] and [r.id for r in sched.waiting] == ["b", "d"]
        assert sched.running[1].overtook and sched.waiting[0].kv_wait == ("main", 4)

    batch = Priority.BATCH
    await _held_admission_walk(wait_until, [("b", 40, batch), ("c", 6, batch), ("d", 6, batch)], check)


async def test_the_kv_reserve_is_never_promised_at_admission(wait_until):
    """kv_reserve_fraction's blocks are headroom for tentative KV: a request that fits beside a running one
    only by taking them waits for it (helper-222: with the reserve ignored, no test failed). 16 blocks of
    4 tokens, 4 reserved: a (AR, 14 + 6 tokens) is promised 6 blocks, b (18 + 6) needs 7 of the 6 left."""
    engine, runner = make_engine(runner=FakeRunner(num_blocks=16, block_size=4), kv_reserve_fraction=0.25,
                                 prefix_cache=False)
    assert engine.kv.reserve() == 4 and engine.kv.capacity() == 12
    await engine.pause()  # (held once started: both wait for the same first step)
    await engine.start()
    first = asyncio.ensure_future(collect(engine, req("a", prompt=[5] * 14, gen=6, mode=Mode.AR)))
    second = asyncio.ensure_future(collect(engine, req("b", prompt=[5] * 18, gen=6, mode=Mode.AR)))
    await wait_until(lambda: len(engine.scheduler.waiting) == 2, "both requests to wait")
    engine.resume()
    assert [len(ids_of(await task)) for task in (first, second)] == [6, 6]
    together = [call for call in runner.calls if {s.seq_id for s in call} >= {"a", "b"}]
    assert not together and any(s.seq_id == "b" for call in runner.calls for s in call)
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_a_batch_request_does_not_backfill_around_an_interactive_head_waiting_for_kv(wait_until):
    """Backfilling stays within a rank class: INTERACTIVE `b` waits 4 blocks short for INTERACTIVE `a`
    (no BATCH victim to preempt); BATCH `c` fits in the 8 blocks left, yet must not start ahead of `b`.
    The same layout with `b` BATCH lets `c` start around it (the backfill test above); here only the
    class differs."""
    def check(sched):
        blocks = {r.id: r.kv_blocks for r in sched.running + sched.waiting}
        assert blocks == {"a": 12, "b": 12, "c": 4}  # c fits in the 8 blocks b cannot use
        assert [r.id for r in sched.running] == ["a"] and [r.id for r in sched.waiting] == ["b", "c"]
        assert sched.waiting[0].kv_wait == ("main", 4)

    urgent = Priority.INTERACTIVE
    await _held_admission_walk(wait_until, [("b", 40, urgent), ("c", 6, Priority.BATCH)], check, head=urgent)


async def test_interactive_preempts_when_the_victims_blocks_make_exactly_the_room_it_needs(wait_until):
    """One running slot, 16 blocks: BATCH `b` holds 5, INTERACTIVE `i` needs all 16, so the 11 free and
    b's 5 are exactly its estimate. That is room (`_room_if_preempted`: room >= need): i preempts b at
    once instead of waiting out b's whole generation; the inverse case, one block short of room, is
    test_sched_order's test_interactive_does_not_preempt_a_batch_request_whose_blocks_could_not_make_room."""
    runner = FakeRunner(num_blocks=16, block_size=4)
    engine, _ = make_engine(runner=runner, prefix_cache=False, kv_reserve_fraction=0.0, max_running=1)
    parse = engine.scheduler.factories["main"].parse_params
    gen = max(g for g in range(1, 100) if engine.kv.blocks_needed(3, 0, parse({"gen_length": g}), ar_only=True) <= 16)
    assert engine.kv.blocks_needed(3, 0, parse({"gen_length": gen}), ar_only=True) == engine.kv.capacity() == 16
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    b = asyncio.create_task(collect(engine, req("b", gen=12, mode=Mode.AR)))  # 3 + 12 tokens and one: 5 blocks
    await wait_until(lambda: gate.entered.is_set() and len(engine.scheduler.running) == 1, "b running, forward held")
    assert engine.scheduler.running[0].kv_blocks == 5
    i = asyncio.create_task(collect(engine, req("i", gen=gen, mode=Mode.AR, priority=Priority.INTERACTIVE)))
    await wait_until(lambda: any(r.id == "i" for r in engine.scheduler.waiting), "i queued")
    gate.release()
    out_b, out_i = await asyncio.gather(b, i)
    await engine.stop()
    assert [d[-1].finish_reason for d in (out_b, out_i)] == [FinishReason.LENGTH] * 2
    assert out_b[-1].stats["preemptions"] == 1 and len(ids_of(out_b)) == 12
    assert b'refusion_preemptions_total{cause="interactive"} 1.0' in engine.metrics.render()
    i_first = next(n for n, call in enumerate(runner.calls) if any(s.seq_id == "i" for s in call))
    b_last = max(n for n, call in enumerate(runner.calls) if any(s.seq_id == "b" for s in call))
    assert i_first < b_last  # b finished after i started: it did not run to its end first
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


@pytest.mark.parametrize("fillers", [BACKFILL_SCAN - 1, BACKFILL_SCAN])
async def test_backfilling_looks_at_backfill_scan_requests_behind_the_head(wait_until, fillers):
    """Backfilling (scheduler/admission.py docstring): around a head waiting for KV, "up to BACKFILL_SCAN
    of them looked at per step". `b` waits 4 blocks short while `a` runs; `fillers` requests of 10 blocks,
    none of which fits in the 8 left, follow it, then `z` (4 blocks), which fits: as the BACKFILL_SCAN-th
    request behind `b` it starts around it, one further back it is not looked at and waits."""
    def check(sched):
        assert len(sched.running) + len(sched.waiting) == 3 + fillers
        assert ("z" in {r.id for r in sched.running}) is (fillers < BACKFILL_SCAN)
        assert sched.waiting[0].id == "b" and sched.waiting[0].kv_wait == ("main", 4)

    batch = Priority.BATCH
    behind = [("b", 40, batch), *((f"f{k}", 30, batch) for k in range(fillers)), ("z", 6, batch)]
    await _held_admission_walk(wait_until, behind, check)
