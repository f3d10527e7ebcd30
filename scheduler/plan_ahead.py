"""Asynchronous scheduling: the next step planned while the current one runs on the device.

With EngineConfig.async_scheduling the engine (scheduler/engine.py) asks for the step after the one in
flight before that one's results are back: AR decoders feed their sampled token back on the device
(decoding.ar.ARDecoder.plan_ahead), and waiting requests that can start join the step. Whatever cannot
be planned ahead of the host's view makes `plan_ahead` return None, and `Scheduler.schedule` plans the
next step once the pipeline drains.

`PlanAhead` is a part of `scheduler.scheduler.Scheduler` (its state and `_start_waiting`, `_grammar_turns`).
"""

from __future__ import annotations

import structlog

from scheduler.api import Priority
from scheduler.mode_switch import switch_may_follow
from scheduler.plan import StepPlan
from scheduler.request import Request, RequestStatus
from workers.batch import Segment

log = structlog.get_logger("scheduler")


class PlanAhead:
    """`plan_ahead` and what undoes it (`drop_ahead`)."""

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
        ahead, sits_out = StepPlan(), self._grammar_turns(self.running)
        budget = self._steps_in_flight_ahead(ahead, items, sits_out, self.config.token_budget)
        if budget is not None:
            budget = self._steps_apart_ahead(ahead, apart, sits_out, budget)
        if budget is None or not ahead.items:
            return self._abandon(ahead)
        if admit:
            self._admit_ahead(ahead, budget)
        return ahead

    def _steps_in_flight_ahead(self, ahead: StepPlan, items: list[tuple[Request, Segment]], sits_out,
                               budget: int) -> int | None:
        """`plan_ahead`'s first part: the next step of each request with a step in `plan` (`items`),
        planned from the device's view; decode steps first, prompt chunks with the budget they leave
        (vLLM's chunked prefill): a request whose chunk finds none left sits out and is planned from the
        host next time. Returns the budget left, or None when the plan must be abandoned."""
        chunks = [(getattr(req.decoder, "chunk_in_flight", False), req) for req, _ in items]
        for chunk, req in sorted(chunks, key=lambda entry: entry[0]):
            planner = getattr(req.decoder, "plan_ahead", None) if req.pending_segment is None else None
            if planner is not None and (chunk and budget <= 0 or req.decoder.ends_with_step_in_flight()
                                        or req.decoder.sits_out_ahead(budget) or switch_may_follow(self, req)
                                        or req in sits_out or req.replay_ids):
                continue  # sits out (no budget, its grammar's host view first, re-routed first, or not its
                # grammar turn), or its step in flight is its last
            try:
                segment = planner(budget) if planner is not None and budget > 0 else None
            except Exception:  # noqa: BLE001 - the host's view first: schedule() asks the decoder again
                log.exception("plan_ahead_failed", request_id=req.id)
                segment = None
            if segment is None or not self._grow_ahead(ahead, req, segment):
                return None
            budget -= len(segment.token_ids)
        return budget

    def _steps_apart_ahead(self, ahead: StepPlan, apart: list[Request], sits_out, budget: int) -> int | None:
        """`plan_ahead`'s second part: the running requests with no step in `plan`, planned from the host
        in rank order (a decoder's own failure ends its request only, as in `schedule`: `ahead.failed`).
        Returns the budget left, or None when the plan must be abandoned."""
        for req in sorted(apart, key=Request.rank_key):
            if req in sits_out:
                continue  # (not its grammar turn: planned from the host when it is)
            try:
                segment = req.decoder.next_segment(budget) if budget > 0 else None
            except Exception as exc:
                ahead.failed.append((req, exc))
                continue
            if segment is None:  # (finished without a step: the scheduler ends it)
                return None
            if not self._grow_ahead(ahead, req, segment):
                return None
            budget -= len(segment.token_ids)
        return budget

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
