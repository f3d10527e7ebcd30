"""Admission and step planning: who runs next, with how many query tokens, on which runner.

Plain Python. The engine calls `schedule()` once per step and executes the returned plan.

KV admission: a request may hold at most `kv_blocks` blocks (prompt + suffix + gen_length + one
ReFusion pool of tentative tokens, in blocks). A waiting request starts only when the runner's free
blocks, minus what running requests may still allocate up to their own estimates, minus a reserve,
cover its estimate (less the blocks it shares from the prefix cache). Prefix-cache blocks are evicted
(LRU) when that frees enough. Priority order: INTERACTIVE before BATCH, FCFS within a class; running
requests skipped for lack of budget go first in their class next step, so no one starves. A waiting
INTERACTIVE request that finds no running slot or KV preempts the youngest running BATCH request. Should
the runner still run short of KV blocks, the step is retried with the plan's youngest request requeued.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import structlog

from scheduler.api import InvalidRequestError, Mode, OverloadedError, Priority
from scheduler.config import EngineConfig
from scheduler.prefix_cache import PrefixCache, PrefixHit
from scheduler.request import Request, RequestStatus
from scheduler.routing import LoadSnapshot, RouteDecision, Router
from workers.batch import Segment

log = structlog.get_logger("scheduler")

MAX_REQUEUES = 3  # a request sent back to the queue this often for lack of KV fails on the next shortage


@dataclass
class StepPlan:
    """One step: the segments to run, requests whose decoders are done, requests that failed to start."""

    items: list[tuple[Request, Segment]] = field(default_factory=list)
    done: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def packed_tokens(self) -> int:
        return sum(len(seg.token_ids) for _, seg in self.items)


def execute_plan(runners: dict, plan: StepPlan) -> list:
    """Run the plan: one execute (one packed forward) per runner. Results aligned with plan.items.
    Called in a worker thread; touches nothing but the runners."""
    out: list = [None] * len(plan.items)
    groups: dict[str, list[int]] = {}
    for i, (req, _) in enumerate(plan.items):
        groups.setdefault(req.runner_key, []).append(i)
    for key, idxs in groups.items():
        results = runners[key].execute([plan.items[i][1] for i in idxs])
        by_seq = {r.seq_id: r for r in results}
        for i in idxs:
            out[i] = by_seq[plan.items[i][1].seq_id]
    return out


class Scheduler:
    """Waiting queue, running set, KV admission, routing at admission and the per-step token budget."""

    def __init__(self, config: EngineConfig, runners: dict, factories: dict, router: Router, prefix_cache: PrefixCache | None, metrics):
        self.config = config
        self.runners = runners  # "main" (and "ar" for a separate AR model) -> runner
        self.factories = factories  # same keys -> DecoderFactory
        self.router = router
        self.prefix_cache = prefix_cache
        self.metrics = metrics
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._arrivals = 0

    # ---- submit-time checks -------------------------------------------------------------------
    def kv_blocks_needed(self, prompt_len: int, suffix_len: int, params) -> int:
        """Most blocks a request can hold: its text plus one ReFusion pool of tentative KV."""
        gen = int(params.gen_length)
        slot = int(getattr(params, "slot_size", 1) or 1)
        gen = math.ceil(gen / slot) * slot
        pool = math.ceil(gen / max(1, int(getattr(params, "serial_num_blocks", 1) or 1)))
        tokens = prompt_len + suffix_len + gen + pool
        return math.ceil(tokens / self.runners["main"].blocks.block_size) + 1

    def kv_capacity(self, key: str = "main") -> int:
        """Blocks one request may ever be promised (the pool less the reserve)."""
        return self.runners[key].blocks.num_total - self._reserve(key)

    def add(self, spec, params, stream) -> Request:
        """Queue a validated request. Raises InvalidRequestError when it could never fit in the KV
        cache, OverloadedError (with a retry-after hint) when the bounded queue is full."""
        suffix_len = len(spec.suffix_ids or [])
        kv_blocks = self.kv_blocks_needed(len(spec.prompt_ids), suffix_len, params)
        capacity = self.kv_capacity()
        if kv_blocks > capacity:
            raise InvalidRequestError(
                "prompt_ids",
                f"prompt ({len(spec.prompt_ids)} tokens) + suffix ({suffix_len}) + gen_length ({params.gen_length}) "
                f"need {kv_blocks} KV blocks but the engine has {capacity}; shorten the prompt or lower gen_length",
            )
        free_slots = max(0, self.config.max_running - len(self.running))
        if len(self.waiting) >= self.config.max_queue + free_slots:
            raise OverloadedError(
                f"engine overloaded: {len(self.running)} running, {len(self.waiting)} waiting "
                f"(max_queue={self.config.max_queue}); retry later",
                retry_after_s=self.retry_after_s(),
            )
        self._arrivals += 1
        req = Request(spec=spec, params=params, kv_blocks=kv_blocks, stream=stream, order=self._arrivals)
        self.waiting.append(req)
        return req

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
        if not req.in_flight and req.decoder is not None:
            self.runners[req.runner_key].free(req.id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Start waiting requests that fit, then ask running ones for their next segment under the budget."""
        plan = StepPlan()
        self._start_waiting(plan)
        budget = self.config.token_budget
        for req in sorted(self.running, key=Request.sort_key):
            if budget <= 0:
                req.skipped += 1
                continue
            segment = req.pending_segment or req.decoder.next_segment(budget)
            if segment is None:
                plan.done.append(req)
                continue
            if len(segment.token_ids) > budget and plan.items:
                # An unsplittable step larger than what is left: hold it (the decoder already stated it)
                # and run it first in its class next step.
                req.pending_segment = segment
                req.skipped += 1
                continue
            req.pending_segment, req.skipped = None, 0
            plan.items.append((req, segment))
            budget -= len(segment.token_ids)
        return plan

    def load_snapshot(self, exclude: Request | None = None) -> LoadSnapshot:
        """Packed tokens and tokens per forward the running batch produces per step (class averages)."""
        load = LoadSnapshot()
        for req in self.running:
            if req is exclude or req.mode is None:
                continue
            stats = self.router.stats_for(req.mode, req.priority)
            load.packed_tokens += stats.step_tokens
            load.tokens_per_forward += stats.tpf
            load.running += 1
        return load

    def kv_available(self, key: str = "main") -> int:
        """Free blocks not yet promised to running requests, less the reserve."""
        runner = self.runners[key]
        promised = sum(
            max(0, r.kv_blocks - len(runner.block_table(r.id))) for r in self.running if r.runner_key == key
        )
        return runner.blocks.num_free - promised - self._reserve(key)

    def record_decision(self, req: Request, decision: RouteDecision, event: str, **context) -> None:
        """Every routing decision and its inputs go to the metrics and the log."""
        self.metrics.mode_decisions.labels(mode=decision.mode.value, reason=decision.reason).inc()
        log.info(event, request_id=req.id, mode=decision.mode.value, reason=decision.reason,
                 requested=req.spec.mode.value, priority=req.priority.name, **context, **decision.inputs)

    def share_prompt_blocks(self, req: Request) -> None:
        """Offer the prompt's newly computed full blocks to the prefix cache (only while prefill advances)."""
        cache = self.prefix_cache
        if cache is None or req.runner_key != "main":
            return
        runner = self.runners["main"]
        full_blocks = len(req.spec.prompt_ids) // cache.block_size
        cached_len = runner.cached_len(req.id)
        if req.prompt_blocks_shared < full_blocks and cached_len // cache.block_size > req.prompt_blocks_shared:
            req.prompt_blocks_shared = cache.insert(req.spec.prompt_ids, runner.block_table(req.id), cached_len)

    # ---- internals -----------------------------------------------------------------------------
    def _start_waiting(self, plan: StepPlan) -> None:
        self.waiting.sort(key=Request.sort_key)
        while self.waiting:
            req = self.waiting[0]
            try:
                started = len(self.running) < self.config.max_running and self._try_start(req)
            except Exception as exc:  # a decoder that cannot be built for this request: fail it alone
                log.exception("start_failed", request_id=req.id)
                self.waiting.pop(0)
                plan.failed.append((req, f"{type(exc).__name__}: {exc}"))
                continue
            if started:
                self.waiting.pop(0)
            elif not self._preempt_for(req):
                return  # head-of-line waits: later requests must not overtake a higher class

    def _preempt_for(self, req: Request) -> bool:
        """Make room for a waiting INTERACTIVE request by sending the youngest running BATCH request back
        to the queue (see `requeue`)."""
        if not self.config.preempt_for_interactive or req.priority is not Priority.INTERACTIVE:
            return False
        victims = [r for r in self.running if r.priority > req.priority and len(r.mode_history) == 1]
        if not victims:
            return False
        self.requeue(max(victims, key=lambda r: r.order), reason=f"for {req.id}")
        return True

    def recover_kv_full(self, plan: StepPlan) -> list[Request]:
        """The runner refused the plan for lack of KV blocks (admission estimates were short; the runner
        took nothing). Every segment is held to run again next step; the youngest restartable request
        of the plan goes back to the queue to free its blocks. Returns the requests that must fail
        instead: the youngest one when it cannot restart (it switched mode, or was already requeued
        MAX_REQUEUES times), so a request that never fits ends with an error instead of looping."""
        for req, segment in plan.items:
            req.pending_segment = segment
        live = [r for r, _ in plan.items if not r.finished]
        if not live:
            return []
        victim = max(live, key=lambda r: r.order)
        if len(victim.mode_history) == 1 and victim.preemptions < MAX_REQUEUES:
            self.requeue(victim, reason="kv cache full")
            return []
        return [victim]

    def requeue(self, victim: Request, reason: str) -> None:
        """Send a running request back to the queue: its KV is freed and it restarts from scratch later,
        in the same mode. Outputs are batch-independent and seeded per request, so the rerun yields the
        same tokens and its stream resumes where it stopped (nothing is sent twice). Only requests that
        never switched mode are requeued."""
        self.running.remove(victim)
        self.runners[victim.runner_key].free(victim.id)
        victim.pinned_mode, victim.mode_history = victim.mode, []
        victim.decoder, victim.pending_segment, victim.status = None, None, RequestStatus.WAITING
        victim.skipped, victim.tokens_at_last_route = 0, 0
        victim.preemptions += 1
        self.waiting.append(victim)
        self.waiting.sort(key=Request.sort_key)
        log.info("preempted", request_id=victim.id, reason=reason, mode=victim.pinned_mode.value)

    def _try_start(self, req: Request) -> bool:
        decision = self.router.decide(req.pinned_mode or req.spec.mode, req.priority, self.load_snapshot())
        key = "ar" if decision.mode is Mode.AR and "ar" in self.runners else "main"
        cache = self.prefix_cache if key == "main" else None
        hit = cache.lookup(req.spec.prompt_ids) if cache is not None else PrefixHit()
        need = req.kv_blocks - len(hit.block_ids)
        available = self.kv_available(key)
        if available < need and cache is not None:
            cache.evict(need - available, protect=set(hit.block_ids))
            available = self.kv_available(key)
        if available < need:
            return False
        runner, spec = self.runners[key], req.spec
        req.decoder = self.factories[key].create(decision.mode, req.id, spec.prompt_ids, req.params, spec.suffix_ids)
        if hit.block_ids:
            runner.adopt_prefix(req.id, hit.block_ids, hit.num_tokens)
            req.decoder.skip_cached_prompt(hit.num_tokens)
        if cache is not None:
            cache.record(spec.prompt_ids, hit)
        req.cached_prompt_tokens = hit.num_tokens
        req.mode, req.runner_key, req.status = decision.mode, key, RequestStatus.RUNNING
        req.started_s = time.monotonic()
        req.mode_history.append(decision.mode.value)
        self.running.append(req)
        self.metrics.queue_time.observe(req.started_s - req.arrival_s)
        self.record_decision(req, decision, "route")
        return True

    def _reserve(self, key: str) -> int:
        return int(self.config.kv_reserve_fraction * self.runners[key].blocks.num_total)

    def _typical_latency_s(self) -> float:
        hist = self.metrics.e2e
        total = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_sum"))
        count = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_count"))
        return total / count if count else 1.0

