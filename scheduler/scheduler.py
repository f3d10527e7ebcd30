"""Admission and step planning: who runs next, with how many query tokens, on which runner.

Plain Python. The engine calls `schedule()` once per step and executes the returned plan.

KV admission: a request may hold at most `kv_blocks` blocks (prompt + suffix + gen_length + one
ReFusion pool of tentative tokens, in blocks). A waiting request starts only when the runner's free
blocks, minus what running requests may still allocate up to their own estimates, minus a reserve,
cover its estimate (less the blocks it shares from the prefix cache). Prefix-cache blocks are evicted
(LRU) when that frees enough. Priority order: INTERACTIVE before BATCH, FCFS within a class, but
client by client under the fair share (EngineConfig.fair_share; GenerationRequest.client): within a
class, the waiting requests of the client holding the fewest running slots start first; running
requests skipped for lack of budget go first in their class next step. Aging: a request passed over
`aging_after` times (steps in a row without budget, or later requests that started while it waited)
is ranked with the first class (Request.rank_class), so no one starves, a BATCH request under a
steady INTERACTIVE stream that fills the slots, the KV or the budget included. A request aged while
waiting keeps that rank to its end, so it is not preempted for an INTERACTIVE one; aging itself
never preempts. A waiting INTERACTIVE request that finds no running slot or KV preempts the youngest
running BATCH request that has been preempted fewer than `max_preemptions` times (a preempted request restarts from scratch, so
the bound is what lets a long BATCH request finish under a steady INTERACTIVE stream), and only when
the blocks such victims hold could make room for it (else it waits, and nobody loses progress).

Backfilling: when the first waiting request of a class cannot start for lack of KV (a running slot is
free), later requests of the same class that fit start around it (up to BACKFILL_SCAN of them looked
at per step), so one long request's reservation does not hold a short one back for minutes (with the
full gen_length reserved at admission, a few max_tokens=3000 requests would otherwise stall every
later request while most blocks are still free). The waiting request is not starved: backfilling stops
as soon as the blocks held by requests that overtook it would make it fit, so it waits at most for
those to finish. Never across classes (as ranked, aging included): a BATCH request does not overtake
a waiting INTERACTIVE one.

Prefix waits: a waiting request whose prompt shares at least `prefix_wait_blocks` more full blocks with
a prompt a running request is still prefilling than the prefix cache holds does not start yet; once
that prefill is cached it starts on the cached blocks. Copies of one prompt submitted together (OpenAI
`n`, an editor's gap candidates) so compute it once instead of once each, as SGLang's in-batch prefix
caching does. A waiter keeps a running slot and its KV estimate from later requests (which may start
around it with what is left), so the wait lasts the prefill, not some later request's generation. It
only waits on a running request of its own or a higher priority class that ran last step (never on a
prefill that is itself held back, nor on a request that is gone: the check is redone each step).

KV is the scheduler's (scheduler/kv.py): a segment's blocks are allocated when it enters the plan, and
the plan carries each segment's block table. Should a step run short of blocks (tentative KV beyond
the estimates), prefix-cache blocks are evicted, then running requests that come later in scheduling
order and are not in this step are sent back to the queue; failing that the segment waits a step. The
runner never allocates and never refuses for lack of KV.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace

import structlog

from scheduler.api import InvalidRequestError, Mode, OverloadedError, Priority
from scheduler.config import EngineConfig
from scheduler.kv import KVOwner
from scheduler.mode_switch import switch_may_follow
from scheduler.prefix_cache import PrefixHit
from scheduler.request import Request, RequestStatus
from scheduler.routing import LoadSnapshot, RouteDecision, Router
from workers.batch import Segment

log = structlog.get_logger("scheduler")
SLOW_GRAMMAR_MS = 1.0  # a grammar request whose last token's matching took longer takes turns (_grammar_turns)
BACKFILL_SCAN = 16  # later requests looked at per step around a head waiting for KV (each costs a route decision and a prefix lookup)


@dataclass
class StepPlan:
    """One step: the segments to run with their block tables (tables[i] belongs to items[i]),
    requests whose decoders are done, requests that failed to start."""

    items: list[tuple[Request, Segment]] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    done: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, str | Exception]] = field(default_factory=list)  # an exception: its decoder's

    @property
    def packed_tokens(self) -> int:
        return sum(len(seg.token_ids) for _, seg in self.items)


def execute_plan(runners: dict, plan: StepPlan, only: list[int] | None = None) -> list:
    """Run the plan (or the items at indices `only`): one execute (one packed forward) per runner.
    Results aligned with plan.items (None for items not run). Called in a worker thread; touches
    nothing but the runners."""
    out: list = [None] * len(plan.items)
    groups: dict[str, list[int]] = {}
    for i in range(len(plan.items)) if only is None else only:
        groups.setdefault(plan.items[i][0].runner_key, []).append(i)
    for key, idxs in groups.items():
        results = runners[key].execute([plan.items[i][1] for i in idxs], [plan.tables[i] for i in idxs])
        for i, result in zip(idxs, results):
            out[i] = result
    return out


def launch_plan(runners: dict, plan: StepPlan) -> list[tuple[str, list[int], object]]:
    """Launch the plan without waiting for it: one `launch` per runner (workers.runner.ModelRunner.launch).
    Returns what collect_plan needs. Called in a worker thread; touches nothing but the runners."""
    groups: dict[str, list[int]] = {}
    for i, (req, _) in enumerate(plan.items):
        groups.setdefault(req.runner_key, []).append(i)
    return [(key, idxs, runners[key].launch([plan.items[i][1] for i in idxs], [plan.tables[i] for i in idxs]))
            for key, idxs in groups.items()]


def collect_plan(runners: dict, plan: StepPlan, launched: list[tuple[str, list[int], object]]) -> list:
    """The results of a launched plan (launch_plan), aligned with plan.items; waits for the device."""
    out: list = [None] * len(plan.items)
    for key, idxs, step in launched:
        for i, result in zip(idxs, runners[key].collect(step)):
            out[i] = result
    return out


def finish_plan(runners: dict, plan: StepPlan, launched: list[tuple[str, list[int], object]],
                bitmasks: list) -> None:
    """Finish a launched plan's deferred reads (workers.runner.ModelRunner.finish_reads): `bitmasks`
    aligned with plan.items (a Segment.deferred_mask segment's grammar bitmask, or None). Runners whose
    part of the plan deferred nothing are skipped. Called in a worker thread; touches nothing but the
    runners."""
    for key, idxs, step in launched:
        if any(plan.items[i][1].deferred_mask for i in idxs):
            runners[key].finish_reads(step, [bitmasks[i] for i in idxs])


def execute_isolated(runners: dict, plan: StepPlan) -> list:
    """After a failed step: run every item alone, so a fault one request causes ends only that request.
    Returns, aligned with plan.items, each item's result or the exception its own forward raised.
    Re-running is safe: the items' block tables are unchanged, and a rerun writes the same K/V into
    the same slots."""
    out: list = []
    for i in range(len(plan.items)):
        try:
            out.append(execute_plan(runners, plan, only=[i])[i])
        except Exception as exc:  # noqa: BLE001 - the culprit's own error, reported to it alone
            out.append(exc)
    return out


class Scheduler:
    """Waiting queue, running set, KV admission, routing at admission and the per-step token budget."""

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

    # ---- submit-time checks -------------------------------------------------------------------
    def add(self, spec, params, stream) -> Request:
        """Queue a validated request. Raises InvalidRequestError when it could never fit in the KV
        cache, OverloadedError (with a retry-after hint) when the bounded queue is full."""
        suffix_len = len(spec.suffix_ids or [])
        kv_blocks = self.kv.blocks_needed(len(spec.prompt_ids), suffix_len, params, ar_only=spec.mode is Mode.AR,
                                          max_tokens=spec.max_tokens)
        capacity = self.kv.capacity()
        if kv_blocks > capacity and spec.fit_to_kv:
            fitted = self._fit_to_kv(spec, params, capacity)
            if fitted is None:  # the client set no generation length: the prompt (or min_tokens) does not fit
                least = int(getattr(params, "min_tokens", 0) or 0)
                raise InvalidRequestError(
                    "prompt_ids", f"prompt ({len(spec.prompt_ids)} tokens) + suffix ({suffix_len}) leaves no room to "
                    f"generate{f' min_tokens ({least}) tokens' if least > 1 else ''} in the engine's KV cache "
                    f"({capacity} blocks of {self.kv.pool().block_size} tokens; the runner's num_blocks or "
                    f"kv_memory_bytes); shorten the prompt" + (f" or lower min_tokens ({least})" if least > 1 else ""))
            params = fitted
            spec = replace(spec, max_tokens=min(spec.max_tokens or params.gen_length, params.gen_length))
            kv_blocks = self.kv.blocks_needed(len(spec.prompt_ids), suffix_len, params, ar_only=spec.mode is Mode.AR,
                                          max_tokens=spec.max_tokens)
        if kv_blocks > capacity:
            asked = params.gen_length if spec.max_tokens in (None, params.gen_length) else \
                f"{spec.max_tokens}, {params.gen_length} in whole slots" if params.gen_length > spec.max_tokens else \
                f"{spec.max_tokens}; this request decodes {params.gen_length}"  # an infill candidate's gap
            need = (f"prompt ({len(spec.prompt_ids)} tokens) + suffix ({suffix_len}) + gen_length ({asked}) "
                    f"need {kv_blocks} KV blocks but the engine's KV cache has {capacity} (the runner's num_blocks or "
                    f"kv_memory_bytes)")
            # AR: whole slots (the ingress rounds max_tokens so), in one block (AR needs no semi-AR blocks)
            fitted = self._fit_to_kv(spec, params, capacity, one_block=spec.mode is Mode.AR)
            if fitted is None:  # not even the shortest generation fits: the prompt is what to change
                least = int(getattr(params, "min_tokens", 0) or 0)  # what _fit_to_kv tried at the shortest
                raise InvalidRequestError("prompt_ids", f"{need}; shorten the prompt"
                                          + (f" or lower min_tokens ({least})" if least > 1 else ""))
            shape = ("slot_size", "serial_num_blocks")
            if spec.mode is Mode.AR or all(getattr(fitted, k, None) == getattr(params, k, None) for k in shape):
                raise InvalidRequestError("gen_length", f"{need}; ask for at most {fitted.gen_length}",
                                          asked=spec.max_tokens or params.gen_length, most=fitted.gen_length,
                                          prompt_tokens=len(spec.prompt_ids) + suffix_len)
            raise InvalidRequestError("gen_length", f"{need}; lower gen_length (at most {fitted.gen_length} fits with "
                                      f"slot_size {fitted.slot_size} and serial_num_blocks {fitted.serial_num_blocks})")
        self._check_queue_room(spec)
        self._arrivals += 1
        req = Request(spec=spec, params=params, kv_blocks=kv_blocks, stream=stream, order=self._arrivals,
                      aged_after=self.config.aging_after, queued_turn=self._starts,
                      arrival_s=time.monotonic() - max(0.0, spec.waited_s))  # (a moved request: when it first arrived)
        self.waiting.append(req)
        self._queue_changed = True
        return req

    def _check_queue_room(self, spec) -> None:
        """Raise OverloadedError (with a retry-after hint) when the bounded queue has no room for a request
        of `spec.priority`. The queue holds max_queue requests (plus those about to take a free running slot).
        An INTERACTIVE request counts only the waiting INTERACTIVE requests, so BATCH work filling the
        queue (aged or not: aged BATCH requests rank with INTERACTIVE ones, and counting them refused every
        editor completion once the queued batch work had aged) does not refuse an editor's completion; it
        may take max_running places beyond the bound for that. Under the fair share, a request whose
        client (GenerationRequest.client) has fewer requests of its class waiting than another client
        has may take max_running places more: one client's flood, filling the queue before anyone else
        came, does not get every other client refused (the flood is refused at the bound; the others
        start first, `_fair_order`). config/serve.yaml sizes the engine replica's Ray
        max_ongoing_requests to hold them all (3 x max_running + max_queue)."""
        priority, free_slots = spec.priority, max(0, self.config.max_running - len(self.running))
        bound, waiting = self.config.max_queue + free_slots, len(self.waiting)
        if priority is Priority.INTERACTIVE:
            interactive = sum(1 for r in self.waiting if r.priority is Priority.INTERACTIVE)
            most = bound + self.config.max_running  # (past waiting batch work)
            full = interactive >= bound or waiting >= most
            past = f"; an interactive request {self.config.max_running} more past waiting batch ones"
        else:
            most, full, past = bound, waiting >= bound, ""
        if full and self.config.fair_share and waiting < most + self.config.max_running:
            queued = Counter(r.spec.client for r in self.waiting if r.priority is priority)
            full = queued[spec.client] >= max(queued.values(), default=0)  # (not fewer than every other's)
        if full:
            fair = "; a client with fewer requests waiting than another's may queue past it" if self.config.fair_share else ""
            raise OverloadedError(  # waiting counts requests about to take a free running slot too
                f"engine overloaded: {len(self.running)} of {self.config.max_running} running and {waiting} "
                f"waiting, the most it queues (max_queue {self.config.max_queue} + {free_slots} free running "
                f"slots{past}){fair}; retry later",
                retry_after_s=self.retry_after_s(),
            )

    def _fit_to_kv(self, spec, params, capacity: int, one_block: bool = False):
        """A copy of `params` with the largest gen_length whose KV fits `capacity` blocks, at least
        min_tokens; None when none fits. gen_length is a whole number of blocks of whole slots (slot_size
        x serial_num_blocks); when not one such step fits, one block (serial_num_blocks 1), then slot_size
        1, are tried, so a short answer still fits where a 64-token step would not. one_block: the request's
        slot_size in one block only. Binary search per shape: blocks_needed grows with gen_length."""
        slot = int(getattr(params, "slot_size", 1) or 1)
        blocks = int(getattr(params, "serial_num_blocks", 1) or 1)
        least = int(getattr(params, "min_tokens", 0) or 0)
        shapes = ((slot, 1),) if one_block else dict.fromkeys(((slot, blocks), (slot, 1), (1, 1)))
        for slot_size, num_blocks in shapes:
            step = slot_size * num_blocks

            def trial(steps: int, slot_size=slot_size, num_blocks=num_blocks, step=step):
                shaped = copy.copy(params)
                shaped.gen_length, shaped.slot_size, shaped.serial_num_blocks = steps * step, slot_size, num_blocks
                return shaped

            def fits(steps: int) -> bool:
                return self.kv.blocks_needed(len(spec.prompt_ids), len(spec.suffix_ids or []), trial(steps),
                                             ar_only=spec.mode is Mode.AR, max_tokens=spec.max_tokens) <= capacity

            low, high = max(1, -(-least // step)), params.gen_length // step
            if high < low or not fits(low):
                continue
            while low < high:  # invariant: fits(low)
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits(mid) else (low, mid - 1)
            return trial(low)
        return None

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
        start = time.thread_time()
        self._queue_changed = False
        self._start_waiting(plan)
        # (admission is not a cost of the decode steps the router prices: routing.HostCost leaves it out)
        self.admission_host_s = time.thread_time() - start
        budget = self.config.token_budget
        stuck = None  # the first request refused KV before anything else was planned, long enough
        sits_out = self._grammar_turns(self.running)
        for req in sorted(self.running, key=Request.rank_key):
            if req.status is not RequestStatus.RUNNING or req in sits_out:
                continue  # sent back to the queue for KV earlier in this loop, or not its grammar turn
            if budget <= 0:
                req.skipped += 1
                continue
            host_start = time.thread_time()
            try:
                segment = req.pending_segment or req.decoder.next_segment(budget)
            except Exception as exc:  # the decoder's own failure (a grammar dead end) ends its request only
                plan.failed.append((req, exc))
                continue
            finally:
                req.host_s = time.thread_time() - host_start  # this step's, for routing.HostCost
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

    def plan_ahead(self, plan: StepPlan) -> StepPlan | None:
        """The step after `plan`, planned while `plan` runs and before its results reach the host
        (asynchronous scheduling, scheduler.engine): each request of `plan` that has not finished states
        its next decode step with its token fed back on the device (decoding.ar.ARDecoder.plan_ahead),
        and its KV grows by that token.

        An AUTO request that may switch mode once its step in flight is absorbed
        (mode_switch.switch_may_follow: its next token brings a block boundary) sits this step out: a
        step in flight would keep its decoder off the boundary, so the switch would never come. It is
        absorbed (and maybe switched) meanwhile, and the plan after this one takes its next step from the
        host (`_host_plannable`), so the others keep the pipeline (it drained at every such boundary: with
        requests arriving at random times, most steps of a batch of AUTO requests).

        Waiting requests that could start now (`_may_start_waiting`: the queue changed since it was last
        looked at) are admitted here as `schedule` would (`_start_waiting`: rank order, backfilling, prefix
        waits), and their first steps, stated from the host, join this one: an arrival no longer drains
        the pipeline. Not while an INTERACTIVE request waits and may preempt (a BATCH request runs that
        could be its victim, `_may_preempt_waiting`): a victim may be in `plan`.
        Admission comes last, after the running requests' steps, and once it ran the plan is returned
        (its `failed` carries requests whose decoder could not be built).

        None, with nothing planned or allocated, when the host's view of `plan`'s results must come
        first: an INTERACTIVE request waits that may preempt, a running request is neither in `plan` nor able to plan from
        the host (passed over for the budget, its KV short, a decoder other than AR), a decoder cannot
        plan ahead (prompt scoring, ReFusion), the budget runs out, every request
        sits out, or the KV for the new tokens is not free. Prompt chunks plan ahead: the prompt is on the
        host (ARDecoder.plan_ahead)."""
        items = [(req, seg) for req, seg in plan.items if not req.finished]
        admit = self._may_start_waiting()
        if not items or (admit and self._may_preempt_waiting()):
            return None
        in_plan = {req.id for req, _ in items}
        apart = [req for req in self.running if req.id not in in_plan]
        if len(in_plan) + len(apart) != len(self.running) or any(not self._host_plannable(req) for req in apart):
            return None  # (one of `plan` left the running set, or one apart needs the scheduler)
        ahead, budget = StepPlan(), self.config.token_budget
        sits_out = self._grammar_turns(self.running)
        # Decode steps first, prompt chunks with the budget they leave (vLLM's chunked prefill); a request
        # whose chunk finds none left sits out and is planned from the host next time
        chunks = [(getattr(req.decoder, "chunk_in_flight", False), req) for req, _ in items]
        for chunk, req in sorted(chunks, key=lambda entry: entry[0]):
            planner = getattr(req.decoder, "plan_ahead", None) if req.pending_segment is None else None
            if planner is not None and (chunk and budget <= 0 or req.decoder.ends_with_step_in_flight()
                                        or req.decoder.sits_out_ahead(budget) or switch_may_follow(self, req)
                                        or req in sits_out):
                continue  # sits out (no budget, its grammar's host view first, re-routed first, or not its
                # grammar turn), or its step in flight is its last
            try:
                segment = planner(budget) if planner is not None and budget > 0 else None
            except Exception:  # noqa: BLE001 - the host's view first: schedule() asks the decoder again
                log.exception("plan_ahead_failed", request_id=req.id)
                segment = None
            if segment is None:
                return self._abandon(ahead)
            if not self._grow_ahead(ahead, req, segment):
                return self._abandon(ahead)
            budget -= len(segment.token_ids)
        for req in sorted(apart, key=Request.rank_key):
            if req in sits_out:
                continue  # (not its grammar turn: planned from the host when it is)
            try:
                segment = req.decoder.next_segment(budget) if budget > 0 else None
            except Exception as exc:  # the decoder's own failure ends its request only, as in schedule()
                ahead.failed.append((req, exc))
                continue
            if segment is None:  # (finished without a step: the scheduler ends it)
                return self._abandon(ahead)
            if not self._grow_ahead(ahead, req, segment):
                return self._abandon(ahead)
            budget -= len(segment.token_ids)
        if not ahead.items:
            return self._abandon(ahead)
        if admit:
            self._admit_ahead(ahead, budget)
        return ahead

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

    def _abandon(self, ahead: StepPlan) -> None:
        """`plan_ahead` gives up: what it planned is dropped (`drop_ahead`), and the requests whose decoder
        failed meanwhile are carried to the next `schedule`, which ends them (None, for the caller)."""
        self.drop_ahead(ahead)
        self._carried_failed += ahead.failed
        return None

    def blocks_freed(self) -> None:
        """An ended request's KV came back after its last step in flight was collected (Engine._segment_back):
        a waiting request short of blocks may start now, as after an arrival or an end (`_may_start_waiting`;
        admission ahead of the host's view had looked at the queue while those blocks were still held)."""
        self._queue_changed = True

    def _may_preempt_waiting(self) -> bool:
        """Whether admitting the waiting requests could preempt a running one (`_preempt_for`: an
        INTERACTIVE request waits and a running request could be its victim): then only `schedule`,
        with nothing in flight, admits them. With no possible victim (every running request
        INTERACTIVE, aged, switched or preempted its most: an editor-only load) the steps stay
        pipelined while INTERACTIVE requests wait (each arrival and end drained them before)."""
        return (self.config.preempt_for_interactive and any(w.priority is Priority.INTERACTIVE for w in self.waiting)
                and any(self._preemptible(r, Priority.INTERACTIVE) for r in self.running))

    def _preemptible(self, running: Request, priority: Priority) -> bool:
        """Whether `running` may be preempted for a waiting request of `priority` (`_preempt_for`): of a
        lower class as ranked (an aged request is not), never switched mode, preempted fewer than
        max_preemptions times."""
        return (running.rank_class > priority and len(running.mode_history) == 1
                and running.preemptions < self.config.max_preemptions)

    def _admit_ahead(self, ahead: StepPlan, budget: int) -> None:
        """Start the waiting requests that can start (`_start_waiting`, into `ahead`) and add the first
        step of each, stated from the host, to `ahead` while the budget lasts. One whose step does not get
        its KV holds it (`pending_segment`) for `schedule`; one left without budget is planned from the
        host next time (`_host_plannable`)."""
        self._queue_changed = False  # (the queue is looked at now, as by schedule)
        before = len(self.running)
        self._start_waiting(ahead)
        for req in self.running[before:]:
            if budget <= 0:
                return
            try:
                segment = req.decoder.next_segment(budget)
            except Exception as exc:  # the decoder's own failure ends its request only, as in schedule()
                ahead.failed.append((req, exc))
                continue
            if segment is None:
                ahead.done.append(req)  # (nothing to generate: the engine ends it)
                continue
            if self.kv.shortfall(req, segment):  # (its blocks were promised when it started: not expected)
                req.pending_segment = segment
                continue
            ahead.items.append((req, segment))
            ahead.tables.append(self.kv.grow(req, segment))
            budget -= len(segment.token_ids)

    def _host_plannable(self, req: Request) -> bool:
        """Whether `req`, running but not in the step in flight, can join the step planned ahead with a
        step stated from the host: its results are all absorbed (nothing of it in flight), it holds no
        step back for KV, and it decodes AR (a request that sat out a step for a possible mode switch and
        stayed in AR, or one admitted ahead without budget left). Anything else (ReFusion, a request
        passed over for the budget) is scheduled by `schedule` once the pipeline drains."""
        return (req.status is RequestStatus.RUNNING and not req.finished and not req.in_flight
                and req.pending_segment is None and req.skipped == 0
                and getattr(req.decoder, "plan_ahead", None) is not None and not req.decoder.finished)

    def _grow_ahead(self, ahead: StepPlan, req: Request, segment: Segment) -> bool:
        """Add `segment` of `req` to `ahead` with its KV grown; False, with `ahead` and the segment dropped
        (`drop_ahead`), when the KV is not free (no eviction or preemption ahead of the host's view)."""
        if self.kv.shortfall(req, segment):
            self.drop_ahead(StepPlan([(req, segment)], []))
            self.drop_ahead(ahead)
            return False
        ahead.items.append((req, segment))
        ahead.tables.append(self.kv.grow(req, segment))
        return True

    def drop_ahead(self, plan: StepPlan) -> None:
        """Undo `plan_ahead` for a plan that will not run: its decoders forget the steps fed back on the
        device; a step stated from the host is held for `schedule` (`pending_segment`, as one short of
        KV); the KV shrinks back."""
        for req, segment in plan.items:
            if segment.feedback:
                req.decoder.drop_ahead(segment)
            else:
                req.pending_segment = segment
            self.kv.shortfall(req, segment)  # (rolls the sequence back to the step's context_len)

    def _may_start_waiting(self) -> bool:
        """Whether scheduling now could start a waiting request, or preempt a running one for it: some
        request waits and one arrived, ended or was sent back to the queue since schedule() last looked
        at the queue. Without such a change, what it left waiting (no running slot, no KV, no room by
        preemption) would be left waiting again (the running requests' blocks only grow meanwhile), but
        for one waiting on another's prompt prefill (Request.prefix_wait), which may be done now."""
        return bool(self.waiting) and (self._queue_changed or any(w.prefix_wait is not None for w in self.waiting))

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
                       and len(r.mode_history) == 1 and r.sort_key() > req.sort_key()]
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
              requested=req.spec.mode.value, priority=req.priority.name, **context, **decision.inputs)

    # ---- internals -----------------------------------------------------------------------------
    def _start_waiting(self, plan: StepPlan) -> None:
        """Start waiting requests in rank order, client by client within a class under the fair share
        (`_fair_order`); around a head waiting for KV, backfill (module docstring). Each request left
        waiting counts the later ones that started before it (aging), but for those of its class the
        fair share put ahead of it: the order among clients is the policy, not a pass-over (aging is
        what keeps a class's requests from starving behind the first class)."""
        self.waiting.sort(key=Request.rank_key)
        if self.config.fair_share:
            self._fair_order()
        ranked = list(self.waiting)  # (the order walked, for the pass-over counts below)
        started: list[Request] = []
        self._start_in_order(plan, started)
        if started and self.config.fair_share:
            for req in started:
                self._starts += 1
                self._client_turns[req.spec.client] = self._starts
            if len(self._client_turns) > 2 * (len(self.waiting) + len(self.running)) + 16:
                present = {req.spec.client for req in self.waiting} | {req.spec.client for req in self.running}
                self._client_turns = {c: turn for c, turn in self._client_turns.items() if c in present}
        if started:  # (most steps start nobody: no walk over the queue then)
            position = {req.id: i for i, req in enumerate(ranked)}
            last = len(position)  # (a request preempted meanwhile was not in the order: as if last)
            for req in self.waiting:
                mine = position.get(req.id, last)
                req.passed_over += sum(1 for r in started if r.order > req.order and not (
                    r.rank_class is req.rank_class and position.get(r.id, last) < mine))

    def _fair_order(self) -> None:
        """Reorder the (rank-ordered) waiting queue client by client within each rank class
        (EngineConfig.fair_share): repeatedly the next request of the client holding the fewest running
        slots, counting those it would take by starting ahead of the rest; among equals the client
        whose turn is oldest, then rank order; FCFS within a client. A client's turn is its latest start
        or, when later, its next request's arrival (both counted in starts, Request.queued_turn): clients
        take turns, and a client new to the queue, or back after a while, queues behind those already
        waiting among its equals instead of jumping ahead of them (a request from a client id never
        seen before went first among equals, so fresh ids, free on HTTP, could hold back another
        client's request for as long as they kept coming; helper-126). A client with nothing running
        goes first, however many requests other clients have queued. One client (or only anonymous
        requests) keeps the rank order."""
        if len({req.spec.client for req in self.waiting}) < 2:
            return
        held = Counter(req.spec.client for req in self.running)
        last_start = dict(self._client_turns)
        starts = self._starts
        order: list[Request] = []
        for _, group in itertools.groupby(self.waiting, key=lambda req: req.rank_class):
            queues: dict[str | None, deque[tuple[int, Request]]] = {}
            for i, req in enumerate(group):
                queues.setdefault(req.spec.client, deque()).append((i, req))
            def turn(client, slots: int) -> tuple:  # (slots held, its turn, rank of its next request, client)
                rank, head = queues[client][0]
                return slots, max(last_start.get(client, 0), head.queued_turn), rank, client  # (ranks are unique)

            turns = [turn(client, held[client]) for client in queues]
            heapq.heapify(turns)
            while turns:
                slots, _, _, client = heapq.heappop(turns)
                order.append(queues[client].popleft()[1])
                starts += 1
                held[client], last_start[client] = slots + 1, starts
                if queues[client]:
                    heapq.heappush(turns, turn(client, slots + 1))
        self.waiting[:] = order

    def _start_in_order(self, plan: StepPlan, started_now: list[Request]) -> None:
        """The waiting requests (in rank order) that can start now, moved to running and to `started_now`."""
        head: Request | None = None  # the first request left waiting for KV
        held_slots = held_blocks = 0  # what the prefix waiters met so far keep for themselves (below)
        i = 0
        while i < len(self.waiting):
            req = self.waiting[i]
            if head is not None and (req.rank_class is not head.rank_class or i > BACKFILL_SCAN
                                     or not self._may_overtake(head)):
                return
            req.prefix_wait = None
            slot_free = len(self.running) + held_slots < self.config.max_running
            arriving = self._arriving_with(i, held_slots, held_blocks) if slot_free else []
            try:
                started = slot_free and self._try_start(req, held_blocks, arriving)
            except Exception as exc:  # a decoder that cannot be built for this request: fail it alone
                log.exception("start_failed", request_id=req.id)
                self.waiting.pop(i)
                plan.failed.append((req, exc))  # the engine names the field of a DecodeParamError
                continue
            if started:
                self.waiting.pop(i)
                started_now.append(req)
                req.overtook = head is not None
                if head is not None:
                    log.info("backfilled", request_id=req.id, around=head.id)
            elif req.prefix_wait is not None:
                # It starts on the cached prompt once that prefill is done (a step or a few): later requests
                # may start now, but not in the slot and blocks it will take then
                held_slots, held_blocks = held_slots + 1, held_blocks + req.kv_blocks
                i += 1
            elif head is None and self._preempt_for(req, slot_free):
                continue
            elif not slot_free or req.kv_wait is None:
                return  # no running slot: nobody can start
            else:
                head = head or req
                i += 1

    def _arriving_with(self, i: int, held_slots: int, held_blocks: int) -> list[Request]:
        """The waiting requests behind waiting[i] that may start in the same step (the router weighs
        their load with its): as many as the free running slots and the KV left after waiting[i]
        allow, in rank order (an estimate: a prefix hit or a prefix wait can change who starts)."""
        slots = self.config.max_running - len(self.running) - held_slots - 1
        room = self.kv_available("main") - held_blocks - self.waiting[i].kv_blocks
        arriving = []
        for req in self.waiting[i + 1:]:
            if len(arriving) >= slots or req.kv_blocks > room:
                break
            arriving.append(req)
            room -= req.kv_blocks
        return arriving

    def _may_overtake(self, head: Request) -> bool:
        """Whether a later request may still start around `head`: only while `head` waits for blocks held
        by requests that were running before it could be overtaken, not by those that overtook it."""
        key, short = head.kv_wait
        held = sum(r.kv_blocks for r in self.running if r.overtook and r.runner_key == key)
        return held < short

    def _preempt_for(self, req: Request, slot_free: bool) -> bool:
        """Make room for a waiting INTERACTIVE request by sending the youngest running BATCH request back
        to the queue (see `requeue`): any one when it waits for a running slot, one on the runner whose
        KV it waits for when a slot is free (another runner's blocks are another pool)."""
        if not self.config.preempt_for_interactive or req.priority is not Priority.INTERACTIVE:
            return False
        kv_key = req.kv_wait[0] if slot_free and req.kv_wait is not None else None
        victims = [r for r in self.running if self._preemptible(r, req.priority) and kv_key in (None, r.runner_key)]
        if not victims or not self._room_if_preempted(req, victims, [kv_key] if kv_key else list(self.runners)):
            return False
        if self.settle is not None and self.settle(set()):
            return True  # a running request stopped and freed its slot and blocks: try `req` again
        if self.requeue(max(victims, key=lambda r: r.order), reason=f"for {req.id}"):
            self.metrics.preemptions.labels(cause="interactive").inc()
        return True

    def _room_if_preempted(self, req: Request, victims: list[Request], keys: list[str]) -> bool:
        """Whether sending every victim back could give `req` its KV on one of the runners `keys`: the KV
        left, the prefix-cache blocks no request holds and the victims' blocks, against its estimate less
        its prompt's cached blocks (an upper bound on the room). A preemption that cannot let `req` start
        loses the victim's progress for nothing: it waits instead for what it is short of."""
        for key in keys:
            cache = self.prefix_cache if key == "main" else None
            hit = cache.lookup(req.spec.prompt_ids) if cache is not None and not req.scores_prompt else PrefixHit()
            need = req.kv_blocks - len(hit.block_ids)
            # A victim's blocks that are also this request's hit stay (the hit holds them): not room, as
            # they are taken off `need` already; nor are the hit's idle blocks in the cache
            shared = set(hit.block_ids)
            tables = self.kv.tables[key]
            room = self.kv_available(key) + sum(v.kv_blocks - len(shared.intersection(tables.table(v.id)))
                                                for v in victims if v.runner_key == key)
            if cache is not None and room < need:
                room += cache.evictable(set(hit.block_ids), need - room)
            if room >= need:
                return True
        return False

    def requeue(self, victim: Request, reason: str) -> bool:
        """Send a running request back to the queue: its KV is freed and it restarts from scratch later,
        in the same mode. Outputs are batch-independent and seeded per request, so the rerun yields the
        same tokens and its stream resumes where it stopped (nothing is sent twice). Only requests that
        never switched mode are requeued. Returns False when the text it had absorbed but not sent ended
        it instead (`before_requeue`: a stop string; removed and its KV freed then), else True."""
        if self.before_requeue is not None:
            self.before_requeue(victim)
            if victim.finished:
                return False
        self.running.remove(victim)
        self.kv.free(victim)
        victim.tokens_before_requeue = max(victim.tokens_before_requeue, victim.generated_tokens())
        victim.pinned_mode, victim.mode_history = victim.mode, []
        victim.decoder, victim.pending_segment, victim.status = None, None, RequestStatus.WAITING
        victim.skipped, victim.tokens_at_last_route, victim.overtook = 0, 0, False
        victim.prompt_blocks_shared = 0  # the rerun offers its prompt blocks again (some may have been evicted)
        victim.preemptions += 1
        victim.queued_turn = self._starts
        # Appended, not sorted in: _start_in_order may be walking `waiting` (in rank order, which each
        # step sorts anew) when it preempts, so the victim is looked at last in this walk
        self.waiting.append(victim)
        self._queue_changed = True
        log.info("preempted", request_id=victim.id, reason=reason, mode=victim.pinned_mode.value)
        return True

    def _try_start(self, req: Request, held_blocks: int = 0, arriving: list[Request] = ()) -> bool:
        """Start `req` if a route, KV (beyond `held_blocks`, kept by prefix waiters ahead of it) and its
        prompt allow; False with `req.kv_wait` (short of KV) or `req.prefix_wait` (its prompt is being
        prefilled by a running request) set. `arriving`: waiting requests that may start in the same
        step, counted in the load the route is decided on."""
        requested = req.pinned_mode or req.spec.mode
        route_key = req.route_key if requested is Mode.AUTO else None  # only AUTO requests can explore
        load = self.load_snapshot(arriving=arriving)
        decision = self.router.decide(requested, req.priority, load, request_key=route_key)
        key = self.kv.runner_for(req, decision.mode is Mode.AR)
        cache = self.prefix_cache if key == "main" else None
        # A request scoring its prompt computes every prompt row: it neither starts on cached blocks nor
        # waits for another's prefill, but may evict the cache for room like any request
        lookup = cache is not None and not req.scores_prompt
        hit = cache.lookup(req.spec.prompt_ids) if lookup else PrefixHit()
        prefilling = (self.kv.prefill_in_flight(req, hit, self.running, self.config.prefix_wait_blocks)
                      if lookup else None)
        if prefilling is not None:  # its prompt is being computed right now: read it once cached
            req.prefix_wait, req.kv_wait = prefilling.id, None
            req.prefix_waits += 1
            if req.prefix_waits == 1 and not req.spec.internal:
                self.metrics.prefix_waits.inc()
                log.info("waits_for_prefix", request_id=req.id, prefilling=prefilling.id)
            return False
        need = req.kv_blocks - len(hit.block_ids)
        held = held_blocks if key == "main" else 0
        available = self.kv_available(key) - held
        # Evict only when that lets it start: evicting for a request that still cannot start emptied the
        # cache at every step it waited, and the requests backfilled meanwhile lost their hits
        short, protect = need - available, set(hit.block_ids)
        if short > 0 and cache is not None and cache.evictable(protect, short) >= short:
            cache.evict(short, protect=protect)
            available = self.kv_available(key) - held
        if available < need:
            req.kv_wait = (key, need - available)
            return False
        req.kv_wait = None
        spec = req.spec
        grammar = {"constraint": req.grammar.constraint()} if req.grammar is not None else {}  # fakes take none
        req.decoder = self.factories[key].create(decision.mode, req.id, spec.prompt_ids, req.params, spec.suffix_ids,
                                                 **grammar)
        # A preempted request starting again is not a new request to the metrics (its queue time, mode
        # decision and prefix-cache lookup were counted at its first start; its rerun hitting its own
        # prompt's blocks read as a cache hit rate where no two requests shared a prefix), and its usage
        # keeps the cached prompt tokens of its first start (the ones a client was told of)
        rerun = req.preemptions > 0
        self.kv.start(req, key, hit, count=not rerun)
        if hit.block_ids:
            req.decoder.skip_cached_prompt(hit.num_tokens)
        if not rerun:
            req.cached_prompt_tokens = hit.num_tokens
        req.mode, req.runner_key, req.status = decision.mode, key, RequestStatus.RUNNING
        req.started_s = time.monotonic()
        req.mode_history.append(decision.mode.value)
        self.running.append(req)
        if route_key is not None:
            self.router.admitted(route_key, decision)  # (for its repeats: decided now, started now)
        if not req.spec.internal and not rerun:
            self.metrics.queue_time.observe(req.started_s - req.arrival_s)
            # an infill's suffix is prompt too: the engine prefills it after the gap
            self.metrics.prompt_tokens.inc(len(spec.prompt_ids) + len(spec.suffix_ids or ()))
        self.record_decision(req, decision, "route", count=not rerun, rerun=rerun)
        return True

    def _typical_latency_s(self) -> float:
        hist = self.metrics.e2e
        total = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_sum"))
        count = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_count"))
        return total / count if count else 1.0

