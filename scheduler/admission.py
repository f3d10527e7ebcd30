"""Admission: which waiting requests start, in which order, and who is preempted for whom.

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

`Admission` is a part of `scheduler.scheduler.Scheduler` (its state: `waiting`, `running`, `kv`, `router`,
`config`, `metrics`); `Scheduler.schedule` and `PlanAhead._admit_ahead` call `_start_waiting`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from collections import Counter, deque

import structlog

from scheduler.api import Mode, Priority
from scheduler.plan import StepPlan
from scheduler.prefix_cache import PrefixHit
from scheduler.request import Request, RequestStatus
from scheduler.routing import RouteDecision

log = structlog.get_logger("scheduler")
BACKFILL_SCAN = 16  # later requests looked at per step around a head waiting for KV (each costs a route decision and a prefix lookup)


class Admission:
    """Starting waiting requests (rank order, fair share, backfilling, prefix waits) and preemption."""

    def _preemptible(self, running: Request, priority: Priority) -> bool:
        """Whether `running` may be preempted for a waiting request of `priority` (`_preempt_for`): of a
        lower class as ranked (an aged request is not), preempted fewer than max_preemptions times. One
        that switched mode is too: its rerun, in the mode it had last, retraces the ids it sent
        (scheduler/replay.py)."""
        return running.rank_class > priority and running.preemptions < self.config.max_preemptions

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
        in the same mode. Its draws are seeded per request and position, so the rerun yields the same
        tokens and its stream resumes where it stopped (nothing is sent twice); where the rerun's logits
        tip a near-tie the other way, it continues the ids already taken instead (scheduler/replay.py,
        `replay_ids`). A request that switched mode reruns in the mode it had last: its first run's
        ids from the other mode are retraced the same way (its rerun parts from them at once, as a
        rule). Its `mode_history` is kept (the rerun's start adds nothing when its mode is the last
        one). Returns False when the text
        it had absorbed but not sent ended it instead (`before_requeue`: a stop string; removed and its
        KV freed then), else True."""
        if self.before_requeue is not None:
            self.before_requeue(victim)
            if victim.finished:
                return False
        self.running.remove(victim)
        self.kv.free(victim)
        # what its stream took (a ReFusion decoder may hold committed slots past them, which its rerun redoes)
        taken = victim.stream.ids if victim.stream is not None else victim.stream_ids()
        victim.tokens_before_requeue = max(victim.tokens_before_requeue, len(taken))
        if len(taken) > len(victim.replay_ids):
            victim.replay_ids = taken
        victim.pinned_mode = victim.mode
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
        if req.kv_fit_ar:  # (asked AUTO, held only as AR: not the client's choice)
            decision = dataclasses.replace(decision, reason="kv_fit")
        elif requested is Mode.AUTO and req.healing is not None:
            # The healed blanks are written under a token mask, which only AR reads take (decoding/healing.py);
            # once they are written the router may move it to ReFusion at a block boundary (mode_switch.py)
            decision = dataclasses.replace(decision, mode=Mode.AR, reason="healing")
        key = self.kv.runner_for(req, decision.mode is Mode.AR)
        cache = self.prefix_cache if key == "main" else None
        # A request scoring its prompt computes every prompt row: it neither starts on cached blocks nor
        # waits for another's prefill, but may evict the cache for room like any request
        lookup = cache is not None and not req.scores_prompt
        hit = cache.lookup(req.spec.prompt_ids) if lookup else PrefixHit()
        prefilling = (self.kv.prefill_in_flight(req, hit, self.running, self.config.prefix_wait_blocks)
                      if lookup else None)
        if prefilling is not None:  # its prompt is being computed right now: read it once cached
            self._wait_for_prefill(req, prefilling)
            return False
        if not self._make_room(req, key, hit, held_blocks if key == "main" else 0):
            return False
        self._start_running(req, key, decision, hit, route_key)
        return True

    def _wait_for_prefill(self, req: Request, prefilling: Request) -> None:
        """`req` waits for the prompt `prefilling` is computing (req.prefix_wait), counted and logged at
        its first wait."""
        req.prefix_wait, req.kv_wait = prefilling.id, None
        req.prefix_waits += 1
        if req.prefix_waits == 1 and not req.spec.internal:
            self.metrics.prefix_waits.inc()
            log.info("waits_for_prefix", request_id=req.id, prefilling=prefilling.id)

    def _make_room(self, req: Request, key: str, hit: PrefixHit, held: int) -> bool:
        """Whether runner `key` has KV for `req` (its estimate less the blocks of its prefix `hit`) beyond
        `held` blocks, evicting prefix-cache blocks when that makes it fit; else False with
        `req.kv_wait` = (key, blocks short)."""
        cache = self.prefix_cache if key == "main" else None
        need = req.kv_blocks - len(hit.block_ids)
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
        return True

    def _start_running(self, req: Request, key: str, decision: RouteDecision, hit: PrefixHit,
                       route_key: int | None) -> None:
        """`req` starts on runner `key` in `decision.mode`: its decoder is built, its KV (on the blocks of
        its prefix `hit`) taken, and it joins `running`; a first start is counted in the metrics."""
        spec = req.spec
        constraints = {}  # (fakes take none)
        if req.grammar is not None:
            constraints["constraint"] = req.grammar.constraint()
        if req.healing is not None and decision.mode is Mode.AR:  # (ReFusion takes no mask: docs/api.md)
            constraints["healing"] = req.healing.constraint()
        req.decoder = self.factories[key].create(decision.mode, req.id, spec.prompt_ids, req.params, spec.suffix_ids,
                                                 **constraints)
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
        if not req.mode_history or req.mode_history[-1] != decision.mode.value:  # (a rerun: in its last mode)
            req.mode_history.append(decision.mode.value)
        self.running.append(req)
        if route_key is not None:
            self.router.admitted(route_key, decision)  # (for its repeats: decided now, started now)
        if not req.spec.internal and not rerun:
            self.metrics.queue_time.observe(req.started_s - req.arrival_s)
            # an infill's suffix is prompt too: the engine prefills it after the gap
            self.metrics.prompt_tokens.inc(len(spec.prompt_ids) + len(spec.suffix_ids or ()))
        self.record_decision(req, decision, "route", count=not rerun, rerun=rerun)
