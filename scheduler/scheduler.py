"""Admission and step planning: who runs next, with how many query tokens, on which runner.

Plain Python. The engine calls `schedule()` once per step and executes the returned plan.

Admission (who starts, in which order, preemption) is scheduler/admission.py; the submit-time checks are
scheduler/submission.py; planning the next step while one runs is scheduler/plan_ahead.py; the plan and
its execution on the runners are scheduler/plan.py.

KV is the scheduler's (scheduler/kv.py): a segment's blocks are allocated when it enters the plan, and
the plan carries each segment's block table. Should a step run short of blocks (tentative KV beyond
the estimates), prefix-cache blocks are evicted, then running requests that come later in scheduling
order and are not in this step are sent back to the queue; failing that the segment waits a step. The
runner never allocates and never refuses for lack of KV.
"""

from __future__ import annotations

from collections import Counter

import structlog

from decoding.cpu_clock import cpu_time_without_gc
from scheduler.admission import Admission
from scheduler.api import Mode
from scheduler.config import EngineConfig
from scheduler.kv import KVOwner
from scheduler.plan import StepPlan
from scheduler.plan_ahead import PlanAhead
from scheduler.request import Request, RequestStatus
from scheduler.routing import LoadSnapshot, RouteDecision, Router
from scheduler.submission import Submission
from workers.batch import Segment

log = structlog.get_logger("scheduler")
SLOW_GRAMMAR_MS = 1.0  # a grammar request whose last token's matching took longer takes turns (_grammar_turns)


class Scheduler(Submission, Admission, PlanAhead):
    """Waiting queue, running set, KV admission, routing at admission and the per-step token budget:
    the submit-time checks (`add`, scheduler/submission.py), admission (scheduler/admission.py) and
    planning ahead (scheduler/plan_ahead.py) are its parts, on its state."""

    def __init__(self, config: EngineConfig, runners: dict, factories: dict, router: Router, metrics):
        self.config = config
        self.runners = runners  # "main" (and "ar" for a separate AR model) -> scheduler.api.Runner
        self.factories = factories  # same keys -> DecoderFactory
        self.router = router
        self.kv = KVOwner(runners, prefix_cache=config.prefix_cache, reserve_fraction=config.kv_reserve_fraction)
        self.prefix_cache = self.kv.prefix_cache
        self.metrics = metrics
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._arrivals = 0
        self.admission_host_s = 0.0  # engine-thread CPU seconds the last schedule() spent starting requests
        # Hooks of the engine's deferred streaming (scheduler.engine, EngineConfig.overlap_streaming): text
        # a running request absorbed but has not sent may hold a stop string that ends it.
        # before_requeue(req): called with a request about to be sent back to the queue, while it still
        #   has its decoder (which holds that text); a request it ends is not requeued.
        # settle(exclude) -> bool: stream every such text now but that of the requests in `exclude`
        #   (ids planned into this step already); True when that ended a request. Called before any
        #   preemption, so that no request is preempted for room a stopped request was about to free.
        self.before_requeue = None
        self.settle = None
        # A request arrived, ended or was sent back to the queue since schedule() last looked at the queue:
        # until then, whoever it left waiting would be left waiting again (_may_start_waiting)
        self._queue_changed = False
        self._carried_failed: list[tuple[Request, Exception]] = []  # (plan_ahead's, for the next schedule)
        # Fair share (_fair_order): starts so far (the clock of turns), and the start number of each
        # client's latest start (kept for the clients with requests waiting or running, and some more)
        self._starts = 0
        self._client_turns: dict[str | None, int] = {}

    def retry_after_s(self) -> float:
        """Rough wait before a slot frees: queue length times the typical request time per slot."""
        typical = self._typical_latency_s()
        return round(min(60.0, max(0.5, typical * (len(self.waiting) + 1) / self.config.max_running)), 2)

    def remove(self, req: Request) -> None:
        """Forget a finished request; free its KV unless its segment is inside the running forward."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self._queue_changed = True
        if not req.in_flight and req.decoder is not None:
            self.kv.free(req)

    def client_load(self) -> dict:
        """For /v1/engine: distinct clients (GenerationRequest.client; the anonymous one counts once) with
        requests running and waiting, and the most running slots one client holds; the server's own
        requests (health probes, warm-up: GenerationRequest.internal) left out."""
        held = Counter(req.spec.client for req in self.running if not req.spec.internal)
        waiting = {req.spec.client for req in self.waiting if not req.spec.internal}
        return {"running": len(held), "waiting": len(waiting), "most_slots": max(held.values(), default=0)}

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Start waiting requests that fit, then ask running ones for their next segment under the
        budget and allocate its KV (see the module docstring)."""
        plan = StepPlan(failed=self._carried_failed)
        self._carried_failed = []
        start = cpu_time_without_gc()
        self._queue_changed = False
        self._start_waiting(plan)
        # (admission is not a cost of the decode steps the router prices: routing.HostCost leaves it out)
        self.admission_host_s = cpu_time_without_gc() - start
        budget = self.config.token_budget
        stuck = None  # the first request refused KV before anything else was planned, long enough
        sits_out = self._grammar_turns(self.running)
        for req in sorted(self.running, key=Request.rank_key):
            if req.status is not RequestStatus.RUNNING or req in sits_out:
                continue  # sent back to the queue for KV earlier in this loop, or not its grammar turn
            if budget <= 0:
                req.skipped += 1
                continue
            host_start = cpu_time_without_gc()
            try:
                segment = req.pending_segment or req.decoder.next_segment(budget)
            except Exception as exc:  # the decoder's own failure (a grammar dead end) ends its request only
                plan.failed.append((req, exc))
                continue
            finally:
                req.host_s = cpu_time_without_gc() - host_start  # this step's, for routing.HostCost
            if segment is None:
                plan.done.append(req)
                continue
            # An unsplittable step larger than what is left, or one whose KV does not fit yet: hold it
            # (the decoder already stated it) and run it first in its class next step.
            table = None if len(segment.token_ids) > budget and plan.items else self._prepare_kv(req, segment, plan)
            if table is None:
                req.pending_segment = segment
                req.skipped += 1
                if stuck is None and not plan.items and req.skipped > self.config.max_running:
                    stuck = req
                continue
            req.pending_segment, req.skipped = None, 0
            plan.items.append((req, segment))
            plan.tables.append(table)
            budget -= len(segment.token_ids)
        if stuck is not None and not (plan.items or plan.done or plan.failed):
            # Nothing runs or ends this step, so no block will be freed for it: fail it rather than wait
            # forever. While others run (an aged request ranked first waits on blocks an INTERACTIVE one
            # holds and cannot be made to give up), it waits: they end and free their blocks.
            plan.failed.append((stuck, "KV cache full: its step does not fit beside the running requests, "
                                       "and none of them can run to free blocks"))
        return plan

    def _grammar_turns(self, running: list[Request]) -> set[Request]:
        """The requests that sit this step out to keep its grammar time within grammar_step_ms
        (EngineConfig): among the running requests whose grammar took over SLOW_GRAMMAR_MS for its last
        token (ARDecoder.grammar_ms, the cost its next step is expected to add to the engine loop), those
        that waited longest go first, then rank order, while their predicted costs fit; the first always
        goes (no starvation: one that waits goes first next time). Fast grammars never wait. Each request
        left out counts a wait; each let in, none. When every running request is slow nobody sits out:
        turns would protect no one and only add steps (fewer slow requests per forward)."""
        if not self.config.grammar_step_ms:
            return set()
        active = [req for req in running if req.status is RequestStatus.RUNNING and req.decoder is not None
                  and not req.finished]
        slow = [req for req in active if getattr(req.decoder, "grammar_ms", 0.0) > SLOW_GRAMMAR_MS]
        if len(slow) == len(active):
            return set()
        spent, out = 0.0, set()
        for req in sorted(slow, key=lambda r: (-r.grammar_waits, r.rank_key())):
            cost = req.decoder.grammar_ms
            if spent and spent + cost > self.config.grammar_step_ms:
                out.add(req)
                req.grammar_waits += 1
            else:
                spent += cost
                req.grammar_waits = 0
        return out

    def _prepare_kv(self, req: Request, segment: Segment, plan: StepPlan) -> list[int] | None:
        """Allocate the segment's kept tokens; evict prefix-cache blocks, then preempt, when short.
        Returns the block table, or None when the blocks cannot be had this step."""
        short = self.kv.shortfall(req, segment)
        if short:
            self.kv.evict_prefix_cache(short, req.runner_key)
            short = self.kv.shortfall(req, segment)
        # victims: none already in this step (planned, done without a step, or failed); built only when short
        in_plan = short and {r.id for r, _ in plan.items} | {r.id for r in plan.done} | {r.id for r, _ in plan.failed}
        if short and self.settle is not None and self.settle(in_plan | {req.id}):
            short = self.kv.shortfall(req, segment)  # a request that stopped freed its blocks
        while short:
            victims = [r for r in self.running if r is not req and r.id not in in_plan and r.runner_key == req.runner_key
                       and r.sort_key() > req.sort_key()]
            if not victims:
                return None
            if self.requeue(max(victims, key=Request.sort_key), reason=f"kv cache full (for {req.id})"):
                self.metrics.preemptions.labels(cause="kv").inc()
            short = self.kv.shortfall(req, segment)
        return self.kv.grow(req, segment)

    def load_snapshot(self, exclude: Request | None = None, arriving: list[Request] = (),
                      together: list[Request] = ()) -> LoadSnapshot:
        """Packed tokens and tokens per forward the running batch produces per step (class averages).

        `arriving`: waiting requests about to start with the one being routed (a burst admitted in one
        step). One in a forced mode counts in that mode's class; AUTO ones are counted apart
        (`arriving_auto`): the router weighs them in the mode it weighs for this request, as it
        will decide them alike. Without them a burst's first requests were routed on an idle engine's
        costs (on long outputs six of 16 went to ReFusion and slowed the batch until they switched);
        counting them as AR instead left a burst of four in AR where four in ReFusion are faster.
        `together`: running AUTO requests weighed with the one re-routed (mode_switch), counted in
        `arriving_auto` instead of their class."""
        load, host = LoadSnapshot(arriving_auto=len(together)), self.router.host.per_request()
        apart = {id(r) for r in together} | {id(exclude)}
        members = [(r.mode, r) for r in self.running if id(r) not in apart and r.mode is not None]
        for r in arriving:
            mode = r.pinned_mode or r.spec.mode
            if mode is Mode.AUTO:
                load.arriving_auto += 1
            else:
                members.append((mode, r))
        for mode, req in members:
            stats = self.router.stats_for(mode, req.priority)
            load.packed_tokens += stats.step_tokens
            load.tokens_per_forward += stats.tpf
            load.host_s += host[mode]
            load.running += 1
        return load

    def kv_available(self, key: str = "main") -> int:
        """Free blocks not yet promised to running requests, less the reserve."""
        return self.kv.available(self.running, key)

    def record_decision(self, req: Request, decision: RouteDecision, event: str, count: bool = True, **context) -> None:
        """Every routing decision and its inputs go to the log, and to the metrics unless `count` is False
        (a preempted request's rerun: its request was counted at its first start); not those of the
        server's own requests (a health probe every few seconds). A request's first route is logged at
        debug (~600 bytes a request: ServeConfig.log_level), a later decision (a mode switch) at info."""
        if req.spec.internal:
            return
        if count:
            self.metrics.mode_decisions.labels(mode=decision.mode.value, reason=decision.reason).inc()
        write = log.debug if event == "route" else log.info
        write(event, request_id=req.id, mode=decision.mode.value, reason=decision.reason,
              requested=Mode.AUTO.value if req.kv_fit_ar else req.spec.mode.value, priority=req.priority.name,
              **context, **decision.inputs)

    def _typical_latency_s(self) -> float:
        hist = self.metrics.e2e
        total = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_sum"))
        count = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_count"))
        return total / count if count else 1.0
