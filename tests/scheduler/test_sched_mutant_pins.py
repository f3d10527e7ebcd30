"""Scheduler mutation audit (helper-267's survivors): each test pins a behaviour that a small change of
scheduler code left untested (fake runner, no torch). The scheduler's parts are driven directly on an
engine that is never started, so each situation is forced instead of waited for."""

from __future__ import annotations

import dataclasses

import pytest
from sched_fakes import MASK, FakeDecoder, FakeFactory, FakeRunner, make_engine

from scheduler.api import GenerationRequest, Mode, Priority
from scheduler.plan import StepPlan
from scheduler.prefix_cache import PrefixHit
from scheduler.routing import LoadSnapshot
from scheduler.request import Request, RequestStatus
from workers.batch import Segment


def _request(rid: str, kv_blocks: int, prompt=(5, 6, 7), priority=Priority.BATCH, order=0) -> Request:
    spec = GenerationRequest(rid, list(prompt), {"gen_length": 4}, mode=Mode.AR, priority=priority)
    return Request(spec, None, kv_blocks, None, order=order, status=RequestStatus.RUNNING, mode=Mode.AR)


def _holding(engine, req: Request, tokens: int) -> Request:
    """`req` running on the main runner with `tokens` tokens of KV allocated."""
    engine.kv.tables["main"].grow(req.id, tokens)
    engine.scheduler.running.append(req)
    return req


def test_a_request_holding_more_blocks_than_its_estimate_leaves_no_credit_to_the_free_count():
    """KVOwner.available: free blocks less what is still promised to each running request (its estimate
    `kv_blocks` less the blocks it holds), less the reserve. A request holding more than its estimate
    (tentative KV past the bound, kv.py's docstring) is promised nothing more: its excess is already out
    of the free count and must not be counted back as room. 16 blocks of 4 tokens: `over` holds 4 with an
    estimate of 2, `under` holds 1 of 5. Free 11, promised 0 + 4: 7 (with the excess credited, 9, and
    admission would promise two blocks that are not there)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=16, block_size=4), prefix_cache=False, kv_reserve_fraction=0.0)
    over = _holding(engine, _request("over", kv_blocks=2), tokens=16)
    under = _holding(engine, _request("under", kv_blocks=5), tokens=4)
    assert engine.kv.pool().num_free == 11
    assert engine.kv.available([over, under]) == 7
    assert engine.kv.available([over]) == 11  # over its estimate alone: every free block is unpromised


def test_a_step_short_of_kv_never_preempts_a_higher_ranked_request_left_out_of_the_step():
    """Scheduler._prepare_kv: KV victims are running requests ranked after the one short of blocks
    (Request.sort_key) and not in this step. An INTERACTIVE request that is running but not in this step's
    plan (sitting out a grammar turn, or held back) ranks before a BATCH one: the BATCH step waits (None)
    and the INTERACTIVE request keeps running with its blocks (with every running request a victim, it was
    sent back to the queue for the BATCH request's token)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=2, block_size=4), prefix_cache=False, kv_reserve_fraction=0.0)
    sched = engine.scheduler
    sched.before_requeue = sched.settle = None  # (the engine's streaming hooks: no stream here)
    first = _holding(engine, _request("first", kv_blocks=1, priority=Priority.INTERACTIVE, order=0), tokens=4)
    batch = _holding(engine, _request("batch", kv_blocks=1, order=1), tokens=4)
    assert engine.kv.pool().num_free == 0
    step = Segment("batch", 4, [9], [4], 1)  # its fifth token needs a second block
    assert sched._prepare_kv(batch, step, StepPlan()) is None
    assert sched.running == [first, batch] and sched.waiting == []
    assert len(engine.kv.tables["main"].table("first")) == 1


def test_a_step_short_of_kv_preempts_a_lower_ranked_request_left_out_of_the_step():
    """The converse of the test above (the victim filter lets a lower-ranked request go): the BATCH
    request is sent back to the queue and the INTERACTIVE step gets its block."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=2, block_size=4), prefix_cache=False, kv_reserve_fraction=0.0)
    sched = engine.scheduler
    sched.before_requeue = sched.settle = None
    first = _holding(engine, _request("first", kv_blocks=1, priority=Priority.INTERACTIVE, order=0), tokens=4)
    batch = _holding(engine, _request("batch", kv_blocks=1, order=1), tokens=4)
    table = sched._prepare_kv(first, Segment("first", 4, [9], [4], 1), StepPlan())
    assert table is not None and len(table) == 2
    assert sched.running == [first] and sched.waiting == [batch]


def test_no_prefix_wait_on_a_same_class_prefill_passed_over_last_step():
    """KVOwner.prefill_in_flight: a request may wait for a running request's prompt prefill only if that
    prefill advances: of the same or a higher class and not passed over last step (`skipped`, the budget
    spent before it). Two BATCH requests with one 12-token prompt (block size 4, nothing cached): while
    the running one ran its last step, `req` waits on it; once it was passed over (skipped 1), no wait (it
    may be passed over again, and `req` would wait on a prefill that does not move)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=16, block_size=4), prefix_cache=True, kv_reserve_fraction=0.0)
    prompt = list(range(4, 16))
    other = _request("other", kv_blocks=5, prompt=prompt, order=0)
    req = _request("req", kv_blocks=5, prompt=prompt, order=1)
    assert engine.kv.prefill_in_flight(req, PrefixHit(), [other], min_blocks=1) is other
    other.skipped = 1
    assert engine.kv.prefill_in_flight(req, PrefixHit(), [other], min_blocks=1) is None


class AheadDecoder(FakeDecoder):
    """A FakeDecoder that plans ahead as decoding.ar.ARDecoder does under asynchronous scheduling: its next
    decode step, the token of its step in flight fed back on the device (`ahead_asked`: the budgets asked)."""

    chunk_in_flight = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ahead_asked: list[int] = []

    def plan_ahead(self, budget: int) -> Segment:
        self.ahead_asked.append(budget)
        return Segment(self.seq_id, self.cached + 1, [MASK], [self.cached + 1], 1, feedback=True)

    def ends_with_step_in_flight(self) -> bool:
        return False

    def sits_out_ahead(self, budget: int) -> bool:
        return False

    def drop_ahead(self, segment: Segment) -> None:
        pass


def _decoding(engine, rid: str, order: int) -> Request:
    """A running AR request past its 3-token prompt (its KV holds it), decoding with an AheadDecoder."""
    req = _holding(engine, _request(rid, kv_blocks=4, order=order), tokens=3)
    req.decoder = AheadDecoder(rid, [5, 6, 7], 8, cached=2)
    return req


def _in_flight(engine, req: Request) -> StepPlan:
    """The step in flight: `req`'s decode step (its KV grown by its token)."""
    segment = req.decoder.next_segment(16)
    req.decoder._last = None  # (launched: the step ahead comes before its result is absorbed)
    req.in_flight = 1
    return StepPlan([(req, segment)], [engine.kv.grow(req, segment)])


def test_a_rerun_retracing_its_taken_ids_plans_no_step_ahead():
    """Scheduler.plan_ahead: a preempted request's rerun that has not yet made every id its stream took
    (`replay_ids`, scheduler/replay.py) sits out of the step planned ahead: where its own token diverges
    from the taken one, the host continues the taken id, so a token fed back on the device would be the
    wrong one. Alone in the step in flight, nothing is planned ahead (None: `schedule` plans from the
    host's view); the same request not retracing plans its step ahead (with the replay check dropped, the
    rerun planned ahead on its own token and no test failed)."""
    engine, _ = make_engine(prefix_cache=False, kv_reserve_fraction=0.0)
    req = _decoding(engine, "rerun", order=0)
    req.replay_ids = [9, 10]
    plan = _in_flight(engine, req)
    assert engine.scheduler.plan_ahead(plan) is None
    assert req.decoder.ahead_asked == []
    req.replay_ids = []
    ahead = engine.scheduler.plan_ahead(plan)
    assert ahead is not None and [(r.id, s.feedback) for r, s in ahead.items] == [("rerun", True)]


def test_a_running_request_passed_over_for_the_budget_drains_the_pipeline():
    """Scheduler.plan_ahead (`_host_plannable`): a running request with no step in flight joins the step
    planned ahead from the host, unless it was passed over for the budget (`skipped`): `schedule` must
    plan it, most-skipped first, so nothing is planned ahead (None). With skipped 0 it joins the plan
    (with the skipped check dropped, it was planned ahead after the others' steps and could be passed
    over again and again)."""
    engine, _ = make_engine(prefix_cache=False, kv_reserve_fraction=0.0)
    sched = engine.scheduler
    flying = _decoding(engine, "flying", order=0)
    apart = _decoding(engine, "apart", order=1)
    apart.skipped = 1
    plan = _in_flight(engine, flying)
    assert sched.plan_ahead(plan) is None
    assert apart.decoder.budgets == [] and flying.decoder.ahead_asked == []
    apart.skipped = 0
    ahead = sched.plan_ahead(plan)
    assert ahead is not None and sorted(r.id for r, _ in ahead.items) == ["apart", "flying"]


def test_a_request_admitted_ahead_with_no_budget_left_gets_no_step_in_it():
    """Scheduler._admit_ahead: waiting requests started ahead of the host's view get a first step only
    while the token budget lasts; with none left (0) the admitted request gets no step in the plan (it is
    planned from the host next time) and its decoder is not asked for one (with `budget < 0` as the test,
    a 0 budget still asked, and a 1-token prompt's decode step went into a plan with no budget left)."""
    engine, _ = make_engine(prefix_cache=False, kv_reserve_fraction=0.0)
    sched = engine.scheduler
    params = FakeFactory().parse_params({"gen_length": 4})
    arrival = sched.add(GenerationRequest("arrival", [5], {"gen_length": 4}, mode=Mode.AR), params, None)
    ahead = StepPlan()
    sched._admit_ahead(ahead, 0)
    assert sched.running == [arrival] and ahead.items == [] and ahead.tables == []
    assert arrival.decoder.budgets == []


def _host_costs(router) -> None:
    """One decode step of host work on the router's HostCost: an AR request 2 ms, a ReFusion one 5 ms, the
    step 10 ms in all (so 3 ms apart from its requests). The fakes' steps cost no measurable host time."""
    router.host.add_step([(Mode.AR, 0.002), (Mode.REFUSION, 0.005)], 0.010)
    assert router.host.per_request() == {Mode.AR: 0.002, Mode.REFUSION: 0.005}
    assert router.host.fixed_s == pytest.approx(0.003)


def test_the_load_a_route_is_decided_on_counts_each_request_in_its_class_with_its_host_time():
    """Scheduler.load_snapshot: each running request (but those re-routed together) adds its class's stats
    (mode and its own priority: Router.stats_for) and its decoder's host seconds per step
    (HostCost.per_request); the running AUTO requests weighed together with the re-routed one count in
    `arriving_auto`, and so does an arriving AUTO one, while an arriving preempted rerun counts in the mode
    it is pinned to. INTERACTIVE AR requests here pack 5.5 tokens a step, BATCH ones 1 (the prior)."""
    engine, _ = make_engine(prefix_cache=False)
    sched, router = engine.scheduler, engine.router
    _host_costs(router)
    router.stats_for(Mode.AR, Priority.INTERACTIVE).add(tokens=4, forwards=4, packed_tokens=40, decay=1.0)
    assert (router.stats_for(Mode.AR, Priority.INTERACTIVE).step_tokens, router.stats_for(Mode.AR, Priority.BATCH).step_tokens) == (5.5, 1.0)
    _holding(engine, _request("inter", kv_blocks=2, priority=Priority.INTERACTIVE), tokens=3)
    batch = _holding(engine, _request("batch", kv_blocks=2, order=1), tokens=3)
    together = [_holding(engine, _request(f"t{i}", kv_blocks=2, order=2 + i), tokens=3) for i in range(2)]
    for req in together:
        req.mode = Mode.REFUSION
    load = sched.load_snapshot(exclude=batch, together=together)
    assert load == LoadSnapshot(packed_tokens=5.5, tokens_per_forward=1.0, running=1, host_s=0.002, arriving_auto=2)
    load = sched.load_snapshot(together=together)
    assert load == LoadSnapshot(packed_tokens=6.5, tokens_per_forward=2.0, running=2, host_s=0.004, arriving_auto=2)
    auto = dataclasses.replace(_request("auto", kv_blocks=2, priority=Priority.INTERACTIVE).spec, mode=Mode.AUTO)
    rerun = Request(auto, None, 2, None, pinned_mode=Mode.AR)  # (preempted in AR: reruns in AR)
    fresh = Request(dataclasses.replace(auto, request_id="fresh"), None, 2, None)
    load = sched.load_snapshot(exclude=batch, arriving=[rerun, fresh])  # (t0, t1 running in ReFusion now)
    ref = router.stats_for(Mode.REFUSION, Priority.BATCH).step_tokens
    assert (load.packed_tokens, load.running, load.arriving_auto) == (5.5 + 2 * ref + 5.5, 4, 1)
    assert load.host_s == pytest.approx(0.002 + 2 * 0.005 + 0.002)


def test_a_routes_step_latencies_add_the_fixed_host_time_and_the_running_requests_host_time():
    """Router._gains: each option's step latency is the cost curve's forward at the packed tokens with
    the routed request, plus the step's host seconds apart from requests (HostCost.fixed_s), the running
    requests' (LoadSnapshot.host_s) and the routed request's in that mode; the engine's throughput now
    divides the running tokens per forward by the forward and host seconds without it."""
    engine, _ = make_engine(prefix_cache=False)
    router = engine.router
    _host_costs(router)
    load = LoadSnapshot(packed_tokens=6.0, tokens_per_forward=2.0, running=2, host_s=0.004)
    inputs = router.decide(Mode.AUTO, Priority.BATCH, load).inputs
    ref = router.stats_for(Mode.REFUSION, Priority.BATCH)
    latency = router.curve.latency
    assert inputs["latency_ar_s"] == pytest.approx(latency(7.0) + 0.003 + 0.004 + 0.002, abs=1e-9)
    assert inputs["latency_refusion_s"] == pytest.approx(latency(6.0 + ref.step_tokens) + 0.003 + 0.004 + 0.005, abs=1e-9)
    assert inputs["throughput_now"] == round(2.0 / (latency(6.0) + 0.007), 2)
