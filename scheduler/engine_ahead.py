"""Asynchronous scheduling on the engine's side: the step's forward in the worker thread, with the step
launched ahead of it (`forward_step`), and what the loop does with a step launched ahead that fails or
is abandoned (`EngineAhead`). The scheduler's side, planning that step, is scheduler/plan_ahead.py.

`EngineAhead` is a part of `scheduler.engine.Engine` (its loop, scheduler/engine_loop.py, calls it), on
its state.
"""

from __future__ import annotations

import asyncio

import structlog

from scheduler.plan import StepPlan, collect_plan, execute_plan, finish_plan, launch_plan
from scheduler.request import Request
from workers.batch import STEP_LAUNCHED

log = structlog.get_logger("engine")


def forward_step(runners: dict, plan: StepPlan, on_launch, launched=None, ahead: StepPlan | None = None,
                 bitmasks: list | None = None):
    """The step's forward in the worker thread: (results aligned with plan.items, the launched `ahead`
    step or None). Tells `on_launch` once the step's device work is queued, or when it ended (a runner
    that never says, or a step that failed first).

    Without `launched` and `ahead`: execute_plan. Otherwise (asynchronous scheduling) `plan` is launched
    unless `launched` says it was, then `ahead` (the next step, its tokens fed back on the device from
    `plan`'s reads), then `plan`'s results are collected: the device has `ahead` queued while the host
    absorbs them. A failed launch of `ahead` only leaves it out (None; logged); when `plan` fails, a
    launched `ahead`, fed by it, is waited for and left out too, and the error raised. `bitmasks`
    (aligned with plan.items): the grammar bitmasks of `plan`'s deferred reads, which are finished
    (scheduler.finish_plan) before `ahead`, fed by them, is launched."""
    STEP_LAUNCHED.set(on_launch)
    try:
        if launched is None and ahead is None:
            return execute_plan(runners, plan), None
        if launched is None:
            launched = launch_plan(runners, plan)
        if bitmasks is not None:
            finish_plan(runners, plan, launched, bitmasks)
        ahead_launched = None
        if ahead is not None:
            try:
                ahead_launched = launch_plan(runners, ahead)
            except Exception:  # noqa: BLE001 - the step is planned again from the host's view
                log.exception("ahead_launch_failed")
        try:
            return collect_plan(runners, plan, launched), ahead_launched
        except Exception:
            if ahead_launched is not None:
                try:
                    collect_plan(runners, ahead, ahead_launched)
                except Exception:  # noqa: BLE001 - the device fault `plan` raises below
                    pass
            raise
    finally:
        if STEP_LAUNCHED.get() is not None:
            STEP_LAUNCHED.set(None)
            on_launch()


def set_once(future: asyncio.Future) -> None:
    """Resolve `future` (the loop's "step launched") with None unless done: `forward_step` may tell twice."""
    if not future.done():
        future.set_result(None)


class EngineAhead:
    """What the loop does with steps launched ahead (EngineConfig.async_scheduling)."""

    def _host_segment(self, req: Request, segment):
        """`segment` of a failed step launched ahead, its fed-back token given from the host for the re-run
        (decoding.ar_ahead host_segment); a request whose decoder fails at that ends alone (`_fault`),
        and its segment is re-run and dropped as a cancelled request's is."""
        if not segment.feedback or req.finished:
            return segment
        try:
            return req.decoder.host_segment(segment)
        except Exception as exc:  # (raised out of the step, it ended every running request)
            self._fault(req, exc, "host_segment_failed")
            return segment

    def _deferred_bitmasks(self, plan: StepPlan) -> list | None:
        """The bitmasks of a launched plan's grammar-constrained steps planned ahead (Segment.deferred_mask;
        decoding.ar.ARDecoder.deferred_bitmask), aligned with plan.items; None when it has none. A grammar
        that allows no token ends its own request (as in `_postprocess`), whose read is then unconstrained
        and dropped."""
        if not any(seg.deferred_mask for _, seg in plan.items):
            return None
        bitmasks: list = []
        for req, seg in plan.items:
            mask = None
            if seg.deferred_mask and not req.finished:
                try:
                    mask = req.decoder.deferred_bitmask(seg)
                except Exception as exc:  # the request's own grammar (DecodeParamError) or decoder
                    self._fault(req, exc, "bitmask_failed")
            bitmasks.append(mask)
        return bitmasks

    def _drop_ahead(self, ahead: StepPlan) -> None:
        """A step planned ahead that will not run (or ran and is abandoned): its decoders forget it, its KV
        shrinks back, and a request that ended meanwhile frees its KV once nothing of it is in flight.
        Requests it admitted stay running (their steps are held for `schedule`); those it ends without a
        step are ended now."""
        self.scheduler.drop_ahead(ahead)
        for req, _ in ahead.items:
            self._segment_back(req)
        self._end_unplanned(ahead)

    async def _abandon_ahead(self) -> None:
        """After a failed step: wait for the step launched ahead, if any, and drop it (`_drop_ahead`)."""
        if self._ahead is None:
            return
        (ahead, launched), self._ahead = self._ahead, None
        try:
            await asyncio.to_thread(collect_plan, self.scheduler.runners, ahead, launched)
        except Exception:  # noqa: BLE001 - the step is abandoned either way
            log.exception("ahead_collect_failed")
        self._drop_ahead(ahead)
