"""Routing between ReFusion and AR: cost curves, live TPF, decisions, mode switches, calibration."""

from __future__ import annotations

import asyncio
import gc

import pytest
import structlog
from sched_fakes import FakeCpuClock, FakeRunner, ForwardGate, collect, ids_of, make_engine

from scheduler.api import GenerationRequest, Mode, Priority
from scheduler.calibration import CALIBRATION_SEQ, calibrate
from scheduler.config import RoutingConfig
from scheduler.routing import CostCurve, LoadSnapshot, RouteDecision, Router

FLAT = [(1, 0.010), (512, 0.0101)]  # overhead-bound: packed tokens are free
STEEP = [(1, 0.0001), (512, 0.0512)]  # compute-bound: latency ~ tokens
# overhead 10 ms, then 0.1 ms per packed token past 64
KNEE = [(1, 0.010), (64, 0.010), (512, 0.0548)]


def router(points, **cfg) -> Router:
    return Router(RoutingConfig(calibrate=False, **cfg), CostCurve(points))


def test_cost_curve_interpolates_and_extrapolates():
    curve = CostCurve(KNEE)
    assert curve.latency(32) == pytest.approx(0.010)
    assert curve.latency(288) == pytest.approx(0.010 + 224 * 0.0001)
    assert curve.latency(1024) == pytest.approx(0.0548 + 512 * 0.0001)
    assert curve.slope(32) == 0.0 and curve.slope(300) == pytest.approx(0.0001)
    assert curve.compute_bound_share(32) == 0.0
    assert CostCurve(STEEP).compute_bound_share(400) > 0.95


def test_cost_curve_is_made_non_decreasing():
    noisy = CostCurve([(1, 0.002), (8, 0.006), (32, 0.003), (128, 0.004)])  # a spike at 8 tokens
    assert [s for _, s in noisy.points] == [0.002, 0.003, 0.003, 0.004]
    assert noisy.latency(20) <= noisy.latency(30)


def test_idle_engine_routes_auto_to_refusion():
    decision = router(FLAT).decide(Mode.AUTO, Priority.BATCH, LoadSnapshot())
    assert decision.mode is Mode.REFUSION and decision.reason == "refusion_faster"
    assert decision.inputs["gain_refusion"] > decision.inputs["gain_ar"]


def test_compute_bound_batch_routes_to_ar():
    decision = router(STEEP).decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(packed_tokens=100, tokens_per_forward=10, running=10))
    # 24 more packed tokens cost 24% more latency for 2 tokens on top of 10: AR's 1 token costs 1%
    assert decision.mode is Mode.AR and decision.reason == "ar_faster"
    assert decision.inputs["compute_bound_share"] > 0.95


def near_tie(points, load: LoadSnapshot) -> float:
    """The ReFusion tpf at which both modes' gains are equal under `load` (AR: 1 token, 1 packed token)."""
    curve = CostCurve(points)
    base = load.tokens_per_forward / curve.latency(load.packed_tokens) if load.running else 0.0
    gain_ar = (load.tokens_per_forward + 1) / curve.latency(load.packed_tokens + 1) - base
    return (gain_ar + base) * curve.latency(load.packed_tokens + 24) - load.tokens_per_forward


def test_compute_bound_breaks_a_near_tie_toward_ar_and_nothing_more():
    load = LoadSnapshot(packed_tokens=100, tokens_per_forward=10, running=10)
    tie = near_tie(STEEP, load)
    tied = router(STEEP, refusion_tpf_prior=tie * 1.01).decide(Mode.AUTO, Priority.BATCH, load)
    assert tied.inputs["compute_bound_share"] > 0.8
    assert tied.mode is Mode.AR and tied.reason == "compute_bound"
    # The router audit's case: the batch is compute-bound, but ReFusion's estimated gain is twice AR's.
    # The curve already charges every packed token, so the gain decides (it was AR, "compute_bound").
    clear = router(STEEP, refusion_tpf_prior=tie * 2).decide(Mode.AUTO, Priority.BATCH, load)
    assert clear.inputs["compute_bound_share"] > 0.8 and clear.inputs["gain_refusion"] > 1.5 * clear.inputs["gain_ar"]
    assert clear.mode is Mode.REFUSION and clear.reason == "refusion_faster"
    # The same near tie on a batch that is not compute-bound goes to ReFusion.
    flat_tie = near_tie(FLAT, load)
    flat = router(FLAT, refusion_tpf_prior=flat_tie * 1.01).decide(Mode.AUTO, Priority.BATCH, load)
    assert flat.inputs["compute_bound_share"] < 0.8 and flat.mode is Mode.REFUSION and flat.reason == "near_tie"


def test_ar_must_beat_refusion_by_ar_margin_of_refusions_gain():
    """ar_margin 0.1 on an idle engine: AR's estimated gain 1.05x ReFusion's is a near tie (ReFusion on a
    batch that is not compute-bound), 1.105x is past the margin (AR); with no margin 1.05x is AR's. The
    margin is a share of ReFusion's gain, the side AR has to beat: taken of AR's own gain, 1.105x would
    still read as a tie (AR needed 1.11x), and dropped, any AR lead won."""
    curve = CostCurve(FLAT)

    def decide(ratio: float, margin: float):
        # idle: gain_ar = 1 / latency(1), gain_refusion = tpf / latency(24): this tpf puts AR at `ratio`x
        tpf = curve.latency(RoutingConfig().refusion_step_tokens_prior) / (ratio * curve.latency(1))
        return router(FLAT, ar_margin=margin, refusion_tpf_prior=tpf).decide(Mode.AUTO, Priority.BATCH, LoadSnapshot())

    tied = decide(1.05, 0.1)
    assert tied.inputs["gain_ar"] == pytest.approx(1.05 * tied.inputs["gain_refusion"], rel=1e-3)
    assert tied.inputs["compute_bound_share"] < 0.8
    assert tied.mode is Mode.REFUSION and tied.reason == "near_tie"
    past = decide(1.105, 0.1)
    assert past.mode is Mode.AR and past.reason == "ar_faster"
    no_margin = decide(1.05, 0.0)
    assert no_margin.mode is Mode.AR and no_margin.reason == "ar_faster"


def test_heavy_load_past_the_knee_routes_to_ar_on_throughput():
    # 20 ReFusion requests running (24 packed tokens, tpf 2 each) = 480 packed tokens.
    r = router(KNEE, compute_bound_share=1.0)
    load = LoadSnapshot(packed_tokens=480, tokens_per_forward=40, running=20)
    decision = r.decide(Mode.AUTO, Priority.BATCH, load)
    # now: 40 / latency(480); refusion: (40 + 2) / latency(504); ar: (40 + 1) / latency(481)
    curve = CostCurve(KNEE)
    now = 40 / curve.latency(480)
    gain_ref, gain_ar = 42 / curve.latency(504) - now, 41 / curve.latency(481) - now
    assert gain_ar > 1.05 * gain_ref > 0
    assert decision.mode is Mode.AR and decision.reason == "ar_faster"
    assert decision.inputs["gain_ar"] == pytest.approx(gain_ar, abs=0.01)
    light = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(packed_tokens=24, tokens_per_forward=2, running=1))
    assert light.mode is Mode.REFUSION


def test_live_tpf_below_one_sends_auto_to_ar_even_when_compute_is_free():
    r = router(FLAT)
    for step in range(600):  # plan steps yield nothing, verify steps a 4-token slot: tpf 0.5 overall
        r.observe(Mode.REFUSION, Priority.BATCH, tokens=0 if step % 4 else 2, forwards=1, packed_tokens=24)
    decision = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot())
    assert r.stats_for(Mode.REFUSION, Priority.BATCH).tpf == pytest.approx(0.5, abs=0.02)
    assert decision.mode is Mode.AR and decision.reason == "ar_faster"
    # another class keeps its own (prior) estimate
    assert r.decide(Mode.AUTO, Priority.INTERACTIVE, LoadSnapshot()).mode is Mode.REFUSION


def spread_keys(n: int) -> list[int]:
    """n request keys spread evenly over the 32 bits the router reads."""
    return [k * 2**32 // n for k in range(n)]


def test_one_in_explore_every_light_load_auto_requests_explores_the_other_mode():
    r = router(STEEP, explore_every=4)
    light = LoadSnapshot(packed_tokens=100, tokens_per_forward=2, running=2)
    keys = spread_keys(8)
    decisions = [r.decide(Mode.AUTO, Priority.BATCH, light, request_key=k) for k in keys]
    # ReFusion's gain is estimated ~1.26x AR's: the period is stretched to ~5, so 2 of 8 spread keys explore
    assert [d.reason for d in decisions] == ["explore"] * 2 + ["refusion_faster"] * 6
    assert [d.mode for d in decisions] == [Mode.AR] * 2 + [Mode.REFUSION] * 6
    # The same requests again are decided alike (a counter made every Nth repeat differ).
    assert [r.decide(Mode.AUTO, Priority.BATCH, light, request_key=k).mode for k in keys] == [d.mode for d in decisions]
    assert r.decide(Mode.AUTO, Priority.BATCH, light).reason == "refusion_faster"  # no key: never explores
    assert r.decide(Mode.AUTO, Priority.BATCH, light, current=Mode.REFUSION, request_key=0).reason != "explore"  # re-routing
    heavy = LoadSnapshot(packed_tokens=300, tokens_per_forward=20, running=20)
    assert all(r.decide(Mode.AUTO, Priority.BATCH, heavy, request_key=k).reason == "ar_faster" for k in keys)
    assert router(STEEP, explore_every=0).decide(Mode.AUTO, Priority.BATCH, light, request_key=0).reason == "refusion_faster"


def test_auto_requests_arriving_together_count_toward_the_light_load_that_explores():
    """explore_below_running 2, explore_every 1 (every light-load request with a key explores): nothing
    runs, yet a request starting with two or three AUTO ones is a burst of three or four, no light load,
    and takes the mode the gains pick; with one beside it (two in all) it still explores."""
    r = router(FLAT, explore_every=1, explore_below_running=2)
    reasons = [r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(arriving_auto=n), request_key=0).reason
               for n in range(4)]
    assert reasons == ["explore", "explore", "refusion_faster", "refusion_faster"]


def test_a_clearly_slower_mode_is_explored_less_often():
    r = router(FLAT, explore_every=4)
    for step in range(600):  # ReFusion measured at tpf 0.25 against AR's 1: AR's gain is ~4x
        r.observe(Mode.REFUSION, Priority.BATCH, tokens=0 if step % 8 else 2, forwards=1, packed_tokens=24)
    idle = LoadSnapshot()
    decisions = [r.decide(Mode.AUTO, Priority.BATCH, idle, request_key=k) for k in spread_keys(64)]
    period = decisions[0].inputs["explore_period"]
    gain_ar, gain_ref = decisions[0].inputs["gain_ar"], decisions[0].inputs["gain_refusion"]
    assert period == pytest.approx(4 * gain_ar / gain_ref, abs=0.1) and period > 12
    explored = [d for d in decisions if d.reason == "explore"]
    assert len(explored) == -(-64 // period) and all(d.mode is Mode.REFUSION for d in explored)
    capped = router(FLAT, explore_every=4, explore_max_stretch=2.0)
    for step in range(600):
        capped.observe(Mode.REFUSION, Priority.BATCH, tokens=0 if step % 8 else 2, forwards=1, packed_tokens=24)
    assert capped.decide(Mode.AUTO, Priority.BATCH, idle, request_key=0).inputs["explore_period"] == 8.0


def test_the_route_key_follows_what_decides_the_text():
    from decoding.params import DecodeParams
    from scheduler.request import Request

    def key(temperature: float, seed: int, prompt=(5, 6), logprobs=None) -> int:
        params = DecodeParams(eos_token_id=1, mask_token_id=2, temperature=temperature, seed=seed, logprobs=logprobs)
        return Request(GenerationRequest(f"k{seed}", list(prompt)), params, kv_blocks=1, stream=None).route_key

    assert key(0.0, 1) == key(0.0, 2)  # greedy reads no random numbers: a drawn seed changes nothing
    assert key(1.0, 1) != key(1.0, 2) and key(1.0, 1) == key(1.0, 1)
    assert key(0.0, 1) != key(0.0, 1, prompt=(5, 7))
    assert key(1.0, 3) == key(1.0, 3, logprobs=0) == key(1.0, 3, logprobs=20)  # reported, not decided: same route


async def test_a_repeated_request_is_routed_alike_and_distinct_ones_explore():
    # Issue 14: the same seeded /infill request on an idle server must give the same text; with a
    # per-class counter every Nth repeat explored the other decoder and answered differently.
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, explore_every=2, allow_switch=False)
    engine, _ = make_engine(routing=routing, prefix_cache=False)
    await engine.start()
    repeats = [await collect(engine, GenerationRequest(f"r{i}", [5, 6], {"gen_length": 4, "seed": 7}))
               for i in range(8)]
    assert len({d[-1].mode for d in repeats}) == 1 and len({tuple(ids_of(d)) for d in repeats}) == 1
    distinct = [await collect(engine, GenerationRequest(f"d{i}", [5, 6 + i], {"gen_length": 4, "seed": 7}))
                for i in range(16)]
    assert {d[-1].mode for d in distinct} == {Mode.REFUSION, Mode.AR}  # exploration still happens
    await engine.stop()


def test_forced_modes_are_obeyed_whatever_the_load():
    r = router(STEEP)
    heavy = LoadSnapshot(packed_tokens=500, tokens_per_forward=40, running=40)
    assert r.decide(Mode.REFUSION, Priority.BATCH, heavy).mode is Mode.REFUSION
    assert r.decide(Mode.AR, Priority.BATCH, LoadSnapshot()).reason == "forced"


def test_a_running_ar_request_leaves_ar_only_for_a_clear_gain():
    r = router(FLAT, refusion_tpf_prior=1.02)  # refusion barely better: within ar_margin
    assert r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot()).mode is Mode.REFUSION
    kept = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), current=Mode.AR)
    assert kept.mode is Mode.AR and kept.reason == "keep"
    # Beyond ar_margin but within switch_margin (0.2): a new request takes ReFusion, a running one stays
    r = router(FLAT, refusion_tpf_prior=1.15)
    assert r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot()).reason == "refusion_faster"
    assert r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), current=Mode.AR).reason == "keep"
    switched = router(FLAT, refusion_tpf_prior=1.3).decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), current=Mode.AR)
    assert switched.mode is Mode.REFUSION and switched.reason == "refusion_faster"


def test_a_running_refusion_request_leaves_refusion_only_for_a_clear_gain():
    # The router audit saw running requests flap refusion, ar, refusion, ar: only AR -> ReFusion had
    # hysteresis. Now AR must beat ReFusion's gain by switch_margin for a running ReFusion request too.
    r = router(FLAT, refusion_tpf_prior=0.9)  # AR's gain ~1.11x ReFusion's: past ar_margin, within switch_margin
    assert r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot()).reason == "ar_faster"
    kept = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), current=Mode.REFUSION)
    assert kept.mode is Mode.REFUSION and kept.reason == "keep"
    switched = router(FLAT, refusion_tpf_prior=0.7).decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), current=Mode.REFUSION)
    assert switched.mode is Mode.AR and switched.reason == "ar_faster"
    # switch_margin 0 leaves only ar_margin, as for new requests
    assert router(FLAT, refusion_tpf_prior=0.9, switch_margin=0.0).decide(
        Mode.AUTO, Priority.BATCH, LoadSnapshot(), current=Mode.REFUSION).mode is Mode.AR


async def test_engine_records_every_decision_in_metrics_and_logs():
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, explore_every=0)  # reasons without exploration
    engine, _ = make_engine(routing=routing, prefix_cache=False)
    await engine.start()
    with structlog.testing.capture_logs() as logs:
        auto = await collect(engine, GenerationRequest("a", [5, 6], {"gen_length": 4}))
        forced = await collect(engine, GenerationRequest("b", [5, 6], {"gen_length": 4}, mode=Mode.AR))
    assert auto[-1].mode is Mode.REFUSION and forced[-1].mode is Mode.AR
    text = engine.metrics.render().decode()
    assert 'refusion_mode_decisions_total{mode="refusion",reason="refusion_faster"} 1.0' in text
    assert 'refusion_mode_decisions_total{mode="ar",reason="forced"} 1.0' in text
    routes = [e for e in logs if e["event"] == "route"]
    assert [e["request_id"] for e in routes] == ["a", "b"]
    assert {"gain_refusion", "gain_ar", "packed_tokens", "refusion_tpf", "compute_bound_share"} <= set(routes[0])
    await engine.stop()


async def test_auto_request_switches_mode_at_a_block_boundary():
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, switch_interval_tokens=4, explore_every=0)
    engine, runner = make_engine(routing=routing, prefix_cache=False, runner=FakeRunner(num_blocks=128))
    # (host terms kept at 0: a full garbage collection, ~150 ms of the engine thread's CPU with torch
    # loaded, charged to one AR step after the switch sent the request back to ReFusion)
    engine.router.observe_step = lambda *args: None
    await engine.start()
    stream = engine.submit(GenerationRequest("a", [5, 6, 7], {"gen_length": 16}))
    deltas = [await stream.__anext__()]
    assert deltas[0].mode is Mode.REFUSION
    # ReFusion turns out poor for this class: the next boundary hands the request to AR.
    engine.router.observe = lambda *args: None  # freeze the estimates at the value set here
    engine.router.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 0.2
    deltas += [d async for d in stream]
    final = deltas[-1]
    assert final.stats["modes"] == ["refusion", "ar"] and final.mode is Mode.AR
    assert len(ids_of(deltas)) == 16  # no token lost or repeated across the handoff
    assert 'reason="ar_faster"' in engine.metrics.render().decode()
    assert engine.kv.pool().num_free == engine.kv.pool().num_total
    await engine.stop()


async def test_an_auto_request_with_a_healed_prompt_starts_in_ar_then_is_routed_as_any():
    """Token healing masks the first reads until the prompt's trailing blanks are written (decoding/healing.py),
    and only AR reads take a mask: an AUTO request with a healed prompt starts in AR (reason "healing")
    where the router would choose ReFusion, with its healing constraint; at a later block boundary the
    router moves it as any running request. Asked in mode "refusion", it gets no constraint."""
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, switch_interval_tokens=4, explore_every=0)
    engine, _ = make_engine(routing=routing, prefix_cache=False, runner=FakeRunner(num_blocks=128))
    engine.router.observe_step = lambda *args: None  # (host terms kept at 0, as above)
    await engine.start()
    with structlog.testing.capture_logs() as logs:
        healed = await collect(engine, GenerationRequest("h", [5, 6], {"gen_length": 16}, healed="    "))
        plain = await collect(engine, GenerationRequest("p", [5, 6], {"gen_length": 16}))
        forced = await collect(engine, GenerationRequest("r", [5, 6], {"gen_length": 16}, mode=Mode.REFUSION, healed=" "))
    routes = [(e["request_id"], e["mode"], e["reason"]) for e in logs if e["event"] == "route"]
    assert routes == [("h", "ar", "healing"), ("p", "refusion", "refusion_faster"), ("r", "refusion", "forced")]
    assert healed[0].mode is Mode.AR and healed[-1].stats["modes"] == ["ar", "refusion"]  # switched at a boundary
    assert len(ids_of(healed)) == 16 and plain[-1].stats["modes"] == ["refusion"]
    factory = engine.scheduler.factories["main"]
    assert factory.healings["h"].pending and factory.healings["h"].width == 4
    assert factory.healings["p"] is None and factory.healings["r"] is None and forced[-1].mode is Mode.REFUSION
    assert 'refusion_mode_decisions_total{mode="ar",reason="healing"} 1.0' in engine.metrics.render().decode()
    await engine.stop()


async def test_a_mode_switch_comes_at_the_first_boundary_switch_interval_tokens_past_the_route():
    """mode_switch.switch_due: re-routed "at a block boundary at least switch_interval_tokens after its last
    routing". The fake decoder reaches a boundary every 4 generated tokens and switch_interval_tokens is 4:
    once AR is the faster mode, the boundary at token 4 (exactly the interval) hands the request over, so
    its first 4 tokens are ReFusion's and the other 12 AR's (not 8 and 8, as waiting for the next one)."""
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, switch_interval_tokens=4, explore_every=0)
    engine, _ = make_engine(routing=routing, prefix_cache=False, runner=FakeRunner(num_blocks=128))
    engine.router.observe_step = lambda *args: None  # (as above: host terms kept at 0)
    await engine.start()
    stream = engine.submit(GenerationRequest("a", [5, 6, 7], {"gen_length": 16}))
    deltas = [await stream.__anext__()]
    assert deltas[0].mode is Mode.REFUSION
    engine.router.observe = lambda *args: None
    engine.router.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 0.2
    deltas += [d async for d in stream]
    per_mode = {mode: sum(len(d.token_ids) for d in deltas if d.mode is mode) for mode in (Mode.REFUSION, Mode.AR)}
    assert per_mode == {Mode.REFUSION: 4, Mode.AR: 12} and deltas[-1].stats["modes"] == ["refusion", "ar"]
    await engine.stop()


def test_calibration_times_each_count_and_uses_no_kv():
    runner = FakeRunner(num_blocks=8)
    curve = calibrate(runner, (1, 16, 64, 1024), repeats=2, max_tokens=256)
    assert [n for n, _ in curve.points] == [1, 16, 64, 256]
    assert all(s > 0 for _, s in curve.points)
    assert len(runner.calls) == 1 + 4 * 2  # warm-up + repeats
    assert all(seg.num_kept == 0 and seg.seq_id == CALIBRATION_SEQ for call in runner.calls for seg in call)
    assert all(tables == [[]] for tables in runner.tables)  # a scratch step needs no blocks


async def test_a_burst_is_routed_on_the_load_it_makes_together():
    # 10 ms a step plus 0.2 ms per packed token: one ReFusion request alone (tpf 2 for 24 packed tokens)
    # beats AR, but not beside seven AR requests. A burst of eight admitted in one step used to send its
    # first requests to ReFusion on an idle engine's costs; the requests behind them now count as load.
    slope = [(1, 0.010), (512, 0.010 + 0.0002 * 511)]
    routing = RoutingConfig(calibrate=False, cost_points=slope, explore_every=0, allow_switch=False)
    engine, _ = make_engine(routing=routing, prefix_cache=False, max_running=8)
    # The decisions weigh the curve alone: the host terms (HostCost, the engine thread's CPU time per step,
    # measured live) stay 0. A full garbage collection (~150 ms with torch loaded) or any 5 ms charged to
    # one of solo's steps sent the burst to ReFusion (forced by a thread_time that jumps once).
    engine.router.observe_step = lambda *args: None
    await engine.start()
    solo = await collect(engine, GenerationRequest("solo", [5, 6], {"gen_length": 8}))
    assert solo[-1].mode is Mode.REFUSION
    with structlog.testing.capture_logs() as logs:
        burst = await asyncio.gather(*[collect(engine, GenerationRequest(f"b{i}", [5, 6 + i], {"gen_length": 8}))
                                       for i in range(8)])
    assert [d[-1].mode for d in burst] == [Mode.AR] * 8
    routes = [e for e in logs if e["event"] == "route"]
    assert len(routes) == 8 and routes[0]["arriving_auto"] == 7  # the first one weighed the seven behind it
    await engine.stop()


async def test_requests_of_a_forced_mode_starting_with_an_auto_one_count_in_its_load(wait_until):
    """Scheduler.load_snapshot: "One in a forced mode counts in that mode's class". An AUTO request queued
    ahead of three AR ones (all four start in one step) is routed on a load of those three in AR, with
    their packed tokens and tokens per forward (priors: 1 and 1 each), and no AUTO one arriving. Left out,
    it was routed on an idle engine's load and no test failed."""
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, explore_every=0, allow_switch=False)
    engine, _ = make_engine(routing=routing, prefix_cache=False, runner=FakeRunner(num_blocks=256), max_running=4)
    await engine.pause()  # (held once started: all four wait for the same first step)
    await engine.start()
    with structlog.testing.capture_logs() as logs:
        specs = [GenerationRequest("auto", [5, 6], {"gen_length": 4})]
        specs += [GenerationRequest(f"ar{i}", [5, 7 + i], {"gen_length": 4}, mode=Mode.AR) for i in range(3)]
        tasks = []
        for spec in specs:  # (queued in this order: the AUTO request first)
            tasks.append(asyncio.create_task(collect(engine, spec)))
            await wait_until(lambda: len(engine.scheduler.waiting) == len(tasks), f"{spec.request_id} queued")
        engine.resume()
        await asyncio.gather(*tasks)
    await engine.stop()
    route = next(e for e in logs if e["event"] == "route" and e["request_id"] == "auto")
    assert (route["running"], route["arriving_auto"], route["packed_tokens"], route["running_tpf_sum"]) == (3, 0, 3.0, 3.0)


def test_a_burst_is_weighed_all_in_one_mode_against_all_in_the_other():
    # A curve whose marginal cost falls with size (a CPU's at small counts): 3 ms for the first 23
    # tokens, 1 ms for the next 72. One ReFusion request beside three AR ones loses to AR, but four in
    # ReFusion (8 tokens a step at 9 ms) beat four in AR (4 tokens at 5.4 ms). Routed one at a time on
    # the load of those before it, a burst of four never left AR.
    concave = [(1, 0.005), (24, 0.008), (96, 0.009)]
    r = router(concave, explore_every=0)
    one_beside_ar = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(packed_tokens=3, tokens_per_forward=3, running=3))
    assert one_beside_ar.mode is Mode.AR
    together = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(arriving_auto=3))
    assert together.mode is Mode.REFUSION and together.reason == "refusion_faster"
    assert together.inputs["gain_refusion"] == pytest.approx(8 / 0.009, rel=1e-3)
    assert together.inputs["gain_ar"] == pytest.approx(4 / CostCurve(concave).latency(4), rel=1e-3)


def test_host_cost_is_measured_per_decoder_and_per_step():
    from scheduler.routing import HostCost

    host = HostCost()
    assert host.per_request() == {Mode.REFUSION: 0.0, Mode.AR: 0.0} and host.fixed_s == 0.0
    for _ in range(10):  # AR alone: a decoder not seen yet takes the seen one's cost
        host.add_step([(Mode.AR, 0.001)] * 4, 0.005)
    assert host.per_request() == pytest.approx({Mode.REFUSION: 0.001, Mode.AR: 0.001})
    assert host.fixed_s == pytest.approx(0.001)
    for _ in range(400):  # 3 ms per ReFusion request, 1 ms per AR one, 2 ms for the step itself
        host.add_step([(Mode.REFUSION, 0.003), (Mode.AR, 0.001), (Mode.AR, 0.001)], 0.007)
    assert host.per_request() == pytest.approx({Mode.REFUSION: 0.003, Mode.AR: 0.001})
    assert host.fixed_s == pytest.approx(0.002, rel=1e-3)


async def test_the_engine_measures_host_cost_per_decoder_and_routes_on_it(monkeypatch):
    # Absorbing a ReFusion result costs 4 ms of the engine thread's CPU here, an AR one nothing: on a
    # flat 1 ms curve the router must price ReFusion's steps at 5 ms and send an AUTO request to AR,
    # though ReFusion's prior yields twice AR's tokens per forward. The CPU clock is a fake that only
    # the ReFusion absorb moves: on the real clock the 4 ms was a spin and AR's own work had to stay
    # under 2 ms, ~25x what it takes here, which a slower machine or a tracer (coverage) can exceed.
    cpu = FakeCpuClock(monkeypatch)
    routing = RoutingConfig(calibrate=False, cost_points=[(1, 0.001), (512, 0.001)], explore_every=0)
    engine, _ = make_engine(routing=routing, prefix_cache=False)
    absorb = engine._absorb

    def slow_refusion(req, segment, result, now):
        if req.mode is Mode.REFUSION:
            cpu.now += 0.004
        return absorb(req, segment, result, now)

    engine._absorb = slow_refusion
    await engine.start()
    await collect(engine, GenerationRequest("r", [5, 6], {"gen_length": 8}, mode=Mode.REFUSION))
    await collect(engine, GenerationRequest("a", [5, 7], {"gen_length": 8}, mode=Mode.AR))
    host = engine.stats()["host_s_per_request"]
    assert host["refusion"] == pytest.approx(0.004) and host["ar"] == pytest.approx(0.0, abs=1e-9), host
    with structlog.testing.capture_logs() as logs:
        auto = await collect(engine, GenerationRequest("auto", [5, 8], {"gen_length": 8}))
    route = next(e for e in logs if e["event"] == "route")
    assert route["latency_refusion_s"] == pytest.approx(0.005) and route["gain_ar"] > route["gain_refusion"]
    assert auto[-1].mode is Mode.AR
    await engine.stop()


async def test_a_garbage_collection_in_a_step_is_no_decoders_host_cost(monkeypatch):
    """HostCost reads decoding.cpu_clock: a collection that starts while a decoder's result is absorbed
    (a full one takes ~150 ms with torch and Ray loaded) was charged to that decoder and swayed the
    router for ~50 steps. The engine thread's CPU clock is a fake here that moves only where the test
    says: 4 ms of a ReFusion absorb's own work counts; 100 ms that a real gc.collect() takes in an AR
    absorb (FakeCpuClock.slow_collections) does not."""
    cpu = FakeCpuClock(monkeypatch)  # a collection: 100 ms
    routing = RoutingConfig(calibrate=False, cost_points=[(1, 0.001), (512, 0.001)], explore_every=0)
    engine, _ = make_engine(routing=routing, prefix_cache=False)
    absorb = engine._absorb

    def absorb_with_work(req, segment, result, now):
        if req.mode is Mode.REFUSION:
            cpu.now += 0.004
        else:
            gc.collect()
        return absorb(req, segment, result, now)

    engine._absorb = absorb_with_work
    await engine.start()
    with cpu.slow_collections():
        await collect(engine, GenerationRequest("r", [5, 6], {"gen_length": 8}, mode=Mode.REFUSION))
        await collect(engine, GenerationRequest("a", [5, 7], {"gen_length": 8}, mode=Mode.AR))
    await engine.stop()
    assert cpu.now >= 0.1 * 8  # the collections ran inside the AR steps, 100 ms each
    host = engine.stats()["host_s_per_request"]
    assert host["refusion"] == pytest.approx(0.004) and host["ar"] == pytest.approx(0.0, abs=1e-9), host


async def test_a_garbage_collection_in_a_steps_own_work_is_not_its_fixed_host_cost(monkeypatch):
    """HostCost's fixed part (host_s_per_step: a step's host work apart from its requests) reads the same
    clock: each step here does 1 ms of its own work and a real gc.collect() that the fake clock makes
    100 ms; the step is 1 ms (scheduling, the step and its postprocessing all time it with
    cpu_time_without_gc: one read on another clock mixes the two and the fixed part drops to 0)."""
    cpu = FakeCpuClock(monkeypatch)  # a collection: 100 ms
    routing = RoutingConfig(calibrate=False, cost_points=[(1, 0.001), (512, 0.001)], explore_every=0)
    engine, _ = make_engine(routing=routing, prefix_cache=False)
    expire = engine._expire_deadlines

    def expire_with_work(now):
        cpu.now += 0.001
        gc.collect()
        return expire(now)

    engine._expire_deadlines = expire_with_work
    await engine.start()
    with cpu.slow_collections():
        await collect(engine, GenerationRequest("a", [5, 7], {"gen_length": 8}, mode=Mode.AR))
    await engine.stop()
    assert engine.stats()["host_s_per_step"] == pytest.approx(0.001), engine.stats()


async def test_running_auto_requests_are_re_routed_with_their_herd():
    # Four AUTO requests start in AR (ReFusion's estimate poor), then ReFusion's estimate turns good. On
    # this concave curve one of them moving to ReFusion beside three in AR loses (gain 88 vs 176), but all
    # four in ReFusion beat all four in AR by 25%. Each weighed alone never moved; weighed with the AUTO
    # requests of its decoder, which decide alike at their own boundaries, each one moves.
    concave = [(1, 0.005), (24, 0.0075), (96, 0.0085)]
    routing = RoutingConfig(calibrate=False, cost_points=concave, switch_interval_tokens=4, explore_every=0)
    runner = FakeRunner(num_blocks=128)
    engine, _ = make_engine(routing=routing, prefix_cache=False, runner=runner)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    engine.router.observe = lambda *args: None  # estimates frozen at the values set here
    engine.router.observe_step = lambda *args: None
    engine.router.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 0.2
    await engine.start()
    tasks = [asyncio.create_task(collect(engine, GenerationRequest(f"h{i}", [5, 6 + i], {"gen_length": 16})))
             for i in range(4)]
    await asyncio.wait_for(asyncio.to_thread(gate.entered.wait), 30)  # all four admitted, in AR
    assert [r.mode for r in engine.scheduler.running] == [Mode.AR] * 4
    engine.router.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 2.0
    gate.release()
    results = await asyncio.gather(*tasks)
    assert [d[-1].stats["modes"] for d in results] == [["ar", "refusion"]] * 4
    assert all(len(ids_of(d)) == 16 for d in results)
    await engine.stop()


async def test_a_burst_counts_only_the_requests_the_kv_cache_lets_start_with_it():
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, explore_every=0, allow_switch=False)
    runner = FakeRunner(num_blocks=12, block_size=4)
    engine, _ = make_engine(routing=routing, prefix_cache=False, runner=runner, max_running=8)
    gate = ForwardGate(runner.execute)
    runner.execute = gate
    await engine.start()
    with structlog.testing.capture_logs() as logs:
        tasks = [asyncio.create_task(collect(engine, GenerationRequest(f"k{i}", [5, 6 + i], {"gen_length": 8})))
                 for i in range(8)]
        await asyncio.wait_for(asyncio.to_thread(gate.entered.wait), 30)
        started = len(engine.scheduler.running)
        gate.release()
        await asyncio.gather(*tasks)
    assert 1 < started < 8  # the KV cache, not the slots, limits who starts in the first step
    first = next(e for e in logs if e["event"] == "route")
    assert first["arriving_auto"] == started - 1
    await engine.stop()


async def test_a_burst_counts_only_the_requests_the_free_slots_let_start_with_it(wait_until):
    """Four running slots and six AUTO requests queued at once (plenty of KV): the first admission walk
    starts four, and each is routed with those that can still start behind it in the slots left after
    its own, 3, 2, 1 and 0 (Admission._arriving_with); the fifth and sixth wait for a slot."""
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, explore_every=0, allow_switch=False)
    engine, _ = make_engine(routing=routing, prefix_cache=False, runner=FakeRunner(num_blocks=256), max_running=4)
    await engine.pause()  # (held once started: all six wait for the same first step)
    await engine.start()
    with structlog.testing.capture_logs() as logs:
        tasks = [asyncio.create_task(collect(engine, GenerationRequest(f"s{i}", [5, 6 + i], {"gen_length": 4})))
                 for i in range(6)]
        await wait_until(lambda: len(engine.scheduler.waiting) == 6, "all six queued")
        engine.resume()
        await asyncio.gather(*tasks)
    await engine.stop()
    routes = [e for e in logs if e["event"] == "route"]
    assert [e["request_id"] for e in routes[:4]] == ["s0", "s1", "s2", "s3"]
    assert [e["arriving_auto"] for e in routes[:4]] == [3, 2, 1, 0]


def test_a_decoder_absent_from_the_steps_keeps_its_host_cost():
    from scheduler.routing import HostCost

    host = HostCost()
    for _ in range(50):
        host.add_step([(Mode.REFUSION, 0.003), (Mode.AR, 0.001)], 0.004)
    for _ in range(2000):  # a long AR-only stretch says nothing about ReFusion's cost
        host.add_step([(Mode.AR, 0.001)], 0.001)
    assert host.per_request() == pytest.approx({Mode.REFUSION: 0.003, Mode.AR: 0.001})


def test_a_step_timed_below_its_requests_sum_adds_no_negative_fixed_cost():
    """A step's fixed host part is what its whole CPU time leaves beyond its requests' (timers do not
    always add up: each is read apart). A step timed under that sum counts 0, not a negative part that
    would make every step look cheaper than its forward; it still counts as a step in the average."""
    from scheduler.routing import HostCost

    host = HostCost()
    host.add_step([(Mode.AR, 0.002), (Mode.AR, 0.001)], 0.001)
    assert host.fixed_s == 0.0 and host.per_request()[Mode.AR] == pytest.approx(0.0015)
    host.add_step([(Mode.AR, 0.001)], 0.003)  # 2 ms fixed, over 1.98 decayed steps
    assert host.fixed_s == pytest.approx(0.002 / (HostCost.DECAY + 1.0))


def test_a_repeated_request_keeps_its_decoder_while_the_estimates_drift_a_little():
    # A re-test sent one greedy prompt 100 times to an idle server: 4 came back in ReFusion with another
    # text, as AR's gain drifted by a few microseconds of host time across the 5% margin. A repeat (same
    # route key) now keeps its last decoder unless the other's gain beats it by switch_margin (20%).
    r = router(FLAT, explore_every=0, refusion_tpf_prior=0.9)  # AR's gain ~11% above ReFusion's
    first = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), request_key=7)
    assert first.mode is Mode.AR and first.reason == "ar_faster"
    r.admitted(7, first)
    r.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 1.1  # now ReFusion's is ~10% above AR's
    assert r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), request_key=8).mode is Mode.REFUSION  # a new one
    again = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), request_key=7)
    assert again.mode is Mode.AR and again.reason == "repeat"
    r.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 1.5  # a clear change: the repeat follows it
    moved = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), request_key=7)
    assert moved.mode is Mode.REFUSION and moved.reason == "refusion_faster"


def test_only_the_decision_a_request_starts_with_is_kept_for_its_repeats():
    # A request waiting for KV is decided again at each start attempt, on the load of that moment; those
    # attempts are not admissions. They overwrote the memory, so a repeat (or the request's own start)
    # was held to the mode of an attempt that never ran: a break-test saw a seeded AUTO request's text
    # differ with asynchronous scheduling on, which shifts the attempts by a step
    r = router(FLAT, explore_every=0, refusion_tpf_prior=0.9)  # AR's gain ~11% above ReFusion's
    attempt = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), request_key=7)
    assert attempt.mode is Mode.AR  # ... and the request waits for KV: not admitted
    r.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 1.1  # now ReFusion's is ~10% above AR's
    start = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), request_key=7)
    assert start.mode is Mode.REFUSION and start.reason == "refusion_faster"
    r.admitted(7, start)
    r.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 0.95  # drifts back a little: the repeat keeps its decoder
    again = r.decide(Mode.AUTO, Priority.BATCH, LoadSnapshot(), request_key=7)
    assert again.mode is Mode.REFUSION and again.reason == "repeat"


async def test_a_request_that_waits_for_kv_is_remembered_with_the_mode_it_started_in():
    # Engine level: a 2-block request waits behind one that holds the KV; its start attempts meanwhile
    # are decided while the holder runs, its admission once the engine is idle. Its repeat is routed as
    # its admission was
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, explore_every=0, allow_switch=False)
    engine, _ = make_engine(runner=FakeRunner(num_blocks=20, block_size=4), routing=routing, prefix_cache=False,
                            kv_reserve_fraction=0.0)
    admitted, decide = [], engine.scheduler.router.admitted

    def recording(key, decision):
        admitted.append((key, decision.mode))
        decide(key, decision)

    engine.scheduler.router.admitted = recording
    decisions, inner = [], engine.scheduler.router.decide

    def counting(*args, **kwargs):
        decisions.append(inner(*args, **kwargs))
        return decisions[-1]

    engine.scheduler.router.decide = counting
    await engine.start()
    holder = GenerationRequest("holder", [5, 6], {"gen_length": 24}, mode=Mode.AR)
    waiter = GenerationRequest("waiter", [7, 8], {"gen_length": 24, "seed": 3})
    await asyncio.gather(collect(engine, holder), collect(engine, waiter))
    await engine.stop()
    keyed = [d for d in decisions if d.reason != "forced"]
    assert len(keyed) > 1  # it was decided more than once: it waited
    assert len(admitted) == 1 and admitted[0][1] is keyed[-1].mode  # remembered once, as it started


def test_an_explored_request_repeated_on_a_light_load_explores_alike():
    r = router(FLAT, explore_every=1)  # every light-load request explores: ReFusion is picked, AR taken
    light, heavy = LoadSnapshot(), LoadSnapshot(packed_tokens=20, tokens_per_forward=20, running=20)
    explored = r.decide(Mode.AUTO, Priority.BATCH, light, request_key=3)
    assert explored.reason == "explore"
    r.admitted(3, explored)
    r.stats_for(Mode.REFUSION, Priority.BATCH).tpf = 4.0  # AR now far behind
    repeat = r.decide(Mode.AUTO, Priority.BATCH, light, request_key=3)
    assert repeat.mode is Mode.AR and repeat.reason == "repeat"
    r.admitted(3, repeat)  # (a repeat of an explored one stays marked explored)
    assert r.decide(Mode.AUTO, Priority.BATCH, light, request_key=3).reason == "repeat"
    assert r.decide(Mode.AUTO, Priority.BATCH, heavy, request_key=3).mode is Mode.REFUSION  # not under load


async def test_a_stay_decision_is_not_asked_again_until_switch_interval_tokens_later():
    """mode_switch.switch_due: re-routed "at a block boundary at least switch_interval_tokens after its last
    routing", and a re-route that keeps the mode is a routing too (maybe_switch sets tokens_at_last_route
    before asking). The fake decoder reaches a boundary every 4 generated tokens, switch_interval_tokens is
    8 and the router always says stay: the 24-token request is re-asked at tokens 8 and 16 only (with the
    stay not counted as a routing, at every boundary from 8 on: 8, 12, 16, 20)."""
    routing = RoutingConfig(calibrate=False, cost_points=FLAT, switch_interval_tokens=8, explore_every=0)
    engine, _ = make_engine(routing=routing, prefix_cache=False, runner=FakeRunner(num_blocks=128))
    factory = engine.scheduler.factories["main"]
    decide, asked_at = engine.router.decide, []

    def stay(requested, priority, load, current=None, request_key=None):
        if current is None:
            return decide(requested, priority, load, current=current, request_key=request_key)
        asked_at.append(len(factory.decoders["a"].out))  # generated tokens when re-asked
        return RouteDecision(current, "test_stay")

    engine.router.decide = stay
    await engine.start()
    deltas = await collect(engine, GenerationRequest("a", [5, 6, 7], {"gen_length": 24}))
    await engine.stop()
    assert len(ids_of(deltas)) == 24 and len(deltas[-1].stats["modes"]) == 1  # never switched
    assert asked_at == [8, 16]
