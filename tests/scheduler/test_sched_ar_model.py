"""A separate AR model (second runner) served by the same engine: routing, switching, KV on both."""

from __future__ import annotations

import asyncio

from sched_fakes import FakeFactory, FakeRunner, FakeTokenizer, collect, ids_of

from scheduler.api import GenerationRequest, Mode, Priority
from scheduler.config import EngineConfig, RoutingConfig
from scheduler.engine import Engine
from scheduler.routing import RouteDecision

FLAT = [(1, 0.010), (512, 0.0101)]


def _engine(**routing):
    main, ar = FakeRunner(num_blocks=128), FakeRunner(num_blocks=128)
    config = EngineConfig(routing=RoutingConfig(calibrate=False, cost_points=FLAT, **routing))
    engine = Engine(main, FakeTokenizer(), config, FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory())
    return engine, main, ar


def _seqs(runner):
    return {s.seq_id for call in runner.calls for s in call}


async def test_ar_requests_run_on_the_ar_model_and_refusion_on_the_main_one():
    engine, main, ar = _engine()
    await engine.start()
    a = await collect(engine, GenerationRequest("a", [5, 6, 7], {"gen_length": 6}, mode=Mode.AR))
    r = await collect(engine, GenerationRequest("r", [5, 6, 7], {"gen_length": 6}, mode=Mode.REFUSION))
    assert len(ids_of(a)) == 6 and len(ids_of(r)) == 6
    assert _seqs(ar) == {"a"} and _seqs(main) == {"r"}
    await engine.stop()
    assert engine.kv.pool("main").num_free == engine.kv.pool("main").num_total
    assert engine.kv.pool("ar").num_free == engine.kv.pool("ar").num_total


async def test_switch_to_the_ar_model_moves_the_request_and_frees_the_main_runner():
    engine, main, ar = _engine(switch_interval_tokens=4, explore_every=0)  # the first route must be ReFusion
    await engine.start()
    stream = engine.submit(GenerationRequest("s", [5, 6, 7], {"gen_length": 16}))
    deltas = [await stream.__anext__()]
    engine.router.observe = lambda *args: None
    engine.router.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 0.2
    deltas += [d async for d in stream]
    assert deltas[-1].stats["modes"] == ["refusion", "ar"] and len(ids_of(deltas)) == 16
    assert "s" in _seqs(main) and "s" in _seqs(ar)
    # the AR model had none of the KV: it prefilled the prompt and the text generated so far
    first_ar = next(s for call in ar.calls for s in call if s.seq_id == "s")
    assert first_ar.context_len == 0 and first_ar.token_ids[:3] == [5, 6, 7] and not first_ar.reads
    assert engine.kv.tables["main"].length("s") == 0
    assert engine.kv.pool("main").num_free == engine.kv.pool("main").num_total
    await engine.stop()
    assert engine.kv.pool("ar").num_free == engine.kv.pool("ar").num_total


async def test_a_request_too_long_for_the_ar_pool_runs_ar_on_the_main_model():
    """The AR model's KV pool holds 8 blocks of 4 tokens: an AR request of 40 prompt + 6 generated
    tokens can never fit there (it waited forever), so it runs AR on the main model, whose pool admitted
    it; a short one still runs on the AR model, and both pools end empty."""
    main, ar = FakeRunner(num_blocks=128), FakeRunner(num_blocks=8)
    config = EngineConfig(routing=RoutingConfig(calibrate=False, cost_points=FLAT))
    engine = Engine(main, FakeTokenizer(), config, FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory())
    await engine.start()
    long = await asyncio.wait_for(
        collect(engine, GenerationRequest("long", [5, 6, 7, 8] * 10, {"gen_length": 6}, mode=Mode.AR)), 60)
    short = await collect(engine, GenerationRequest("short", [5, 6, 7], {"gen_length": 6}, mode=Mode.AR))
    assert len(ids_of(long)) == 6 and long[-1].stats["modes"] == ["ar"] and len(ids_of(short)) == 6
    assert _seqs(main) == {"long"} and _seqs(ar) == {"short"}
    await engine.stop()
    for key in ("main", "ar"):
        assert engine.kv.pool(key).num_free == engine.kv.pool(key).num_total


async def test_an_ar_request_whose_estimate_fills_the_ar_pool_exactly_runs_there():
    """A KV estimate equal to the AR pool's capacity fits it (runner_for: kv_blocks <= capacity): the
    request runs on the AR model, not the main one."""
    main, ar = FakeRunner(num_blocks=128), FakeRunner(num_blocks=8)
    config = EngineConfig(routing=RoutingConfig(calibrate=False, cost_points=FLAT))
    engine = Engine(main, FakeTokenizer(), config, FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory())
    await engine.start()
    params = engine.scheduler.factories["main"].parse_params({"gen_length": 6})
    capacity = engine.kv.capacity("ar")
    [length] = [n for n in range(1, 64) if engine.kv.blocks_needed(n, 0, params, ar_only=True) == capacity][-1:]
    exact = await asyncio.wait_for(
        collect(engine, GenerationRequest("exact", [5] * length, {"gen_length": 6}, mode=Mode.AR)), 60)
    assert len(ids_of(exact)) == 6 and _seqs(ar) == {"exact"} and not main.calls
    await engine.stop()
    for key in ("main", "ar"):
        assert engine.kv.pool(key).num_free == engine.kv.pool(key).num_total


async def test_an_auto_request_routed_to_ar_goes_where_its_kv_estimate_fits():
    """An AUTO request's KV estimate counts a ReFusion pool (Request.kv_blocks: what starting it waits
    for): routed to AR, it must fit the AR pool by that estimate, else it waited there forever (helper-160:
    9 blocks against a pool of 8). It runs AR on the main model instead."""
    main, ar = FakeRunner(num_blocks=128), FakeRunner(num_blocks=8)
    config = EngineConfig(routing=RoutingConfig(calibrate=False, cost_points=FLAT, explore_every=0))
    engine = Engine(main, FakeTokenizer(), config, FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory())
    engine.router.observe = lambda *args: None
    engine.router.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 0.2  # AR wins the route
    await engine.start()
    auto = await asyncio.wait_for(collect(engine, GenerationRequest("auto", [5, 6, 7, 8] * 5, {"gen_length": 6})), 60)
    assert len(ids_of(auto)) == 6 and auto[-1].stats["modes"] == ["ar"] and _seqs(main) == {"auto"} and not ar.calls
    await engine.stop()


def _refusion_then_ar(engine) -> None:
    """Route every AUTO request to ReFusion when it starts and to AR at each re-route; others as the router does."""
    original = engine.router.decide

    def decide(requested, priority, load, current=None, request_key=None):
        if requested is not Mode.AUTO:
            return original(requested, priority, load, current=current, request_key=request_key)
        return RouteDecision(Mode.REFUSION if current is None else Mode.AR, "test")

    engine.router.decide = decide


async def test_requests_switch_to_the_ar_model_only_while_its_pool_has_room_for_them():
    """Two AUTO requests start in ReFusion on the main model and both want AR at their first re-route.
    The AR pool holds one of them: moved anyway, the second overcommitted it and, never preempted (it
    switched mode), failed with "KV cache full" (helper-170). The second stays on the main model."""
    main, ar = FakeRunner(num_blocks=128), FakeRunner(num_blocks=16)
    config = EngineConfig(max_running=2, routing=RoutingConfig(calibrate=False, cost_points=FLAT,
                                                               switch_interval_tokens=4))
    engine = Engine(main, FakeTokenizer(), config, FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory())
    need = engine.scheduler.kv.blocks_needed(3, 0, FakeFactory().parse_params({"gen_length": 16}))
    assert need <= engine.kv.capacity("ar") < 2 * need
    _refusion_then_ar(engine)
    await engine.start()
    results = await asyncio.wait_for(asyncio.gather(
        *[collect(engine, GenerationRequest(n, [5, 6, 7], {"gen_length": 16})) for n in ("x", "y")]), 60)
    for deltas in results:
        assert deltas[-1].error is None and len(ids_of(deltas)) == 16, deltas[-1]
    assert sorted(tuple(d[-1].stats["modes"]) for d in results) == [("refusion",), ("refusion", "ar")]
    await engine.stop()
    for key in ("main", "ar"):
        assert engine.kv.pool(key).num_free == engine.kv.pool(key).num_total


async def test_a_switch_that_needs_exactly_the_free_blocks_of_the_ar_pool_moves_there():
    """mode_switch.maybe_switch moves a request to a separate AR model "only when that model's pool has
    room for it" (KVOwner.available, its free unpromised blocks): room for exactly its estimate is room.
    An AUTO request starts in ReFusion on the main model and wants AR at its first re-route; the AR pool
    (no reserve) holds exactly its estimate and nothing else runs there: it moves and ends there."""

    def build(ar_blocks):
        main, ar = FakeRunner(num_blocks=128), FakeRunner(num_blocks=ar_blocks)
        config = EngineConfig(kv_reserve_fraction=0.0, routing=RoutingConfig(calibrate=False, cost_points=FLAT,
                                                                             switch_interval_tokens=4))
        return Engine(main, FakeTokenizer(), config, FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory()), main, ar

    need = build(128)[0].scheduler.kv.blocks_needed(3, 0, FakeFactory().parse_params({"gen_length": 16}))
    engine, main, ar = build(need)
    _refusion_then_ar(engine)
    await engine.start()
    deltas = await asyncio.wait_for(collect(engine, GenerationRequest("x", [5, 6, 7], {"gen_length": 16})), 60)
    assert engine.kv.available([], "ar") == need  # the exact fit this test is for (the pool is empty again)
    assert deltas[-1].error is None and len(ids_of(deltas)) == 16
    assert deltas[-1].stats["modes"] == ["refusion", "ar"] and "x" in _seqs(ar)
    await engine.stop()
    for key in ("main", "ar"):
        assert engine.kv.pool(key).num_free == engine.kv.pool(key).num_total


async def test_a_prompt_prefilled_on_the_ar_model_is_not_waited_for_on_the_main_one():
    """Prefix waits (KVOwner.prefill_in_flight) are for a prompt the main model's prefix cache will hold:
    a request prefilling on the separate AR model never offers its blocks there (another pool). `a`
    (AR, on the AR model) and `r` (ReFusion, on the main one) share a 64-token prompt fed in 8-token
    chunks: r starts at once instead of waiting out a's whole run (with the AR model's requests taken
    as prefills in flight, r waited and no other test failed)."""
    main, ar = FakeRunner(num_blocks=128), FakeRunner(num_blocks=128)
    config = EngineConfig(token_budget=8, routing=RoutingConfig(calibrate=False, cost_points=FLAT))
    engine = Engine(main, FakeTokenizer(), config, FakeFactory(), ar_runner=ar, ar_decoder_factory=FakeFactory())
    prompt = list(range(4, 36)) * 2
    await engine.start()
    a, r = await asyncio.gather(collect(engine, GenerationRequest("a", prompt, {"gen_length": 8}, mode=Mode.AR)),
                                collect(engine, GenerationRequest("r", prompt, {"gen_length": 8}, mode=Mode.REFUSION)))
    assert _seqs(ar) == {"a"} and _seqs(main) == {"r"} and len(ids_of(a)) == len(ids_of(r)) == 8
    assert r[-1].stats["prefix_waits"] == 0
    await engine.stop()
