"""The engine loop: schedule -> execute -> postprocess, one step after another.

Each step the scheduler (scheduler/scheduler.py) returns a plan; it runs as ONE packed forward per
runner in a worker thread (scheduler/plan.py), so the event loop keeps serving, or, under asynchronous
scheduling, is launched while the next step is planned (`_execute`); the decoders absorb the results
and finished requests free their KV (`_postprocess`). A step that fails reruns each request alone, so
a fault ends only the request that caused it (`_recover`). A paused engine (Engine.pause) runs no
step: the loop holds (`_hold`). A step launched ahead is run and dropped by scheduler/engine_ahead.py.
`EngineLoop` is a part of `scheduler.engine.Engine`, on its state.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time

import structlog

from decoding.cpu_clock import cpu_time_without_gc
from scheduler.api import FinishReason, Mode
from scheduler.engine_ahead import forward_step, set_once
from scheduler.mode_switch import maybe_switch
from scheduler.plan import StepPlan, execute_isolated
from scheduler.request import Request

log = structlog.get_logger("engine")
PAUSED_POLL_S = 0.05  # a paused loop's look at deadlines and the load gauges, at least this often


class EngineLoop:
    """The loop task and one step of it."""

    async def _run(self) -> None:
        failed_steps = 0  # in a row
        while True:
            if self._paused and self._ahead is None:
                try:
                    await self._hold()
                except Exception:  # noqa: BLE001 - nor a fault while paused (it ended the loop: every stream hung)
                    log.exception("hold_failed")
                    await asyncio.sleep(PAUSED_POLL_S)
                continue
            if not self.scheduler.has_work() and self._ahead is None:
                self._flush_streams()
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.step()
                failed_steps = 0
            except Exception:  # keep serving: a bug in one step must not kill every stream
                log.exception("step_failed")
                failed_steps += 1
                try:
                    await self._recover(failed_steps)
                except Exception:  # noqa: BLE001 - the recovery's own fault must not end the loop either
                    log.exception("recovery_failed")
                    for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                        req.in_flight = 0
                        self._finish(req, FinishReason.ERROR, error="internal error in engine step")
            finally:
                self._plan_items = []

    async def _hold(self) -> None:
        """One look of a paused loop (Engine.pause), once the step in progress and any launched ahead of it
        are absorbed: no forward runs, but the text already made is streamed, deadlines end their
        requests (max_time_ms) and the load gauges follow the queue (requests still arrive, are
        cancelled or handed to another replica). Returns when woken (a request, resume(), stop()) or
        after PAUSED_POLL_S."""
        self._flush_streams()
        self._expire_deadlines(time.monotonic())
        s = self.scheduler
        self.metrics.update_gauges(len(s.running), len(s.waiting), self.kv.pool(), self.prefix_cache)
        self._wake.clear()
        self._held.set()
        self._settled.set()
        try:
            await asyncio.wait_for(self._wake.wait(), PAUSED_POLL_S)
        except asyncio.TimeoutError:
            pass

    async def _recover(self, failed_steps: int) -> None:
        """After a failed step: the step launched ahead is dropped and the running requests end with an
        error; the waiting ones too when the step failed again (a fault before anything runs, e.g. in
        scheduling, would otherwise spin the loop forever)."""
        await self._abandon_ahead()
        ended = list(self.scheduler.running) + (list(self.scheduler.waiting) if failed_steps > 1 else [])
        for req in ended:
            req.in_flight = 0
            self._finish(req, FinishReason.ERROR, error="internal error in engine step")
        for req, _ in self._plan_items:  # cancelled while its segment ran: its KV waited for the forward
            if req.in_flight and req.finished:
                req.in_flight = 0
                self.kv.free(req)
                self.scheduler.blocks_freed()

    async def step(self) -> None:
        """One engine step: schedule -> execute -> postprocess. Under asynchronous scheduling the step the
        last one launched ahead is this step's plan (no scheduling), and `_execute` may launch the next."""
        host_start = cpu_time_without_gc()  # CPU seconds less collections: the step's host work (routing.HostCost)
        self._expire_deadlines(time.monotonic())
        launched = None
        if self._ahead is not None:
            (plan, launched), self._ahead = self._ahead, None
            host_s = cpu_time_without_gc() - host_start
        else:
            plan = self.scheduler.schedule()
            host_s = cpu_time_without_gc() - host_start - self.scheduler.admission_host_s
        self._end_unplanned(plan)
        if plan.items:
            self._plan_items = plan.items  # (the loop frees what a failure here would strand)
            results = await self._execute(plan, launched)
            if results is not None:
                host_start = cpu_time_without_gc()
                decodes = self._postprocess(plan, results)
                if decodes is not None:  # a step of routed decode steps only: its host cost per decoder
                    self.router.observe_step(decodes, host_s + cpu_time_without_gc() - host_start)
        else:
            self._flush_streams()
            await asyncio.sleep(0.002)  # everyone is waiting on KV: don't spin
        s = self.scheduler
        self.metrics.update_gauges(len(s.running), len(s.waiting), self.kv.pool(), self.prefix_cache)

    async def _execute(self, plan: StepPlan, launched=None):
        """One forward per runner, off the event loop. Returns results aligned with plan.items, or None.
        While it runs, the text the previous step made final is streamed (`_flush_streams`).
        `launched`: the plan was launched ahead by the last step (asynchronous scheduling, below).

        Asynchronous scheduling (EngineConfig.async_scheduling): the step after this one is planned now,
        before this one's results reach the host (Scheduler.plan_ahead: AR decoding only, its
        tokens fed back from this step's reads on the device), launched behind this one, and kept in
        `_ahead` as the next step's plan; the host absorbs this step's results while the device runs it
        (vLLM's async scheduling, SGLang's overlap scheduler). A request this step ends (EOS, a stop
        string, a cancel) wastes its segment of that step: the result is dropped and its KV freed
        after it, as for a cancel. A grammar request's step planned ahead gets its bitmask once the step
        before is absorbed, here, before the step after it is planned (`_deferred_bitmasks`); the device
        runs that step's forward meanwhile and makes its reads when the bitmask arrives (vLLM's
        structured outputs under async scheduling).

        A failed forward is re-run item by item (`_rerun_isolated`): requests whose own
        forward fails end with the error, the others continue with their results, so no request sees
        an error it did not cause."""
        bitmasks = self._deferred_bitmasks(plan) if launched is not None else None
        ahead = self.scheduler.plan_ahead(plan) if self.async_scheduling and not self._paused else None
        for req, _ in plan.items if launched is None else ():
            req.in_flight += 1
        for req, _ in ahead.items if ahead is not None else ():
            req.in_flight += 1
        ahead_launched = None
        start = time.perf_counter()
        try:
            results, ahead_launched = await self._forward_off_loop(plan, launched, ahead, bitmasks)
            return results
        except Exception as exc:
            log.warning("forward_failed", error=f"{type(exc).__name__}: {exc}", requests=[r.id for r, _ in plan.items])
            if ahead is not None:  # (not launched, or waited for and left out: it was fed by this step)
                self._drop_ahead(ahead)
                ahead = None
            return await self._rerun_isolated(plan, launched, exc)
        finally:
            if ahead is not None and ahead_launched is None:
                self._drop_ahead(ahead)  # its launch failed
            elif ahead is not None:
                self._ahead = (ahead, ahead_launched)
                self.ahead_steps += 1
            self.forwards += 1
            self.metrics.forward_time.observe(time.perf_counter() - start)

    async def _forward_off_loop(self, plan: StepPlan, launched, ahead: StepPlan | None, bitmasks):
        """Run `plan` (and launch `ahead` behind it) in a worker thread (engine_ahead.forward_step),
        streaming the previous step's text once this step is launched. Returns (results, the launched
        `ahead`, or None); raises what the forward raised."""
        # The last step's text is streamed once this step's device work is queued (the runner's
        # workers.batch.notify_launched), while the worker thread waits for the results with the
        # GIL released; streamed before the thread had packed and launched the step, it would
        # delay the launch instead (the thread needs the GIL for that)
        loop = asyncio.get_running_loop()
        launch_done = loop.create_future()

        def on_launch() -> None:
            loop.call_soon_threadsafe(set_once, launch_done)

        forward = loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, forward_step,
                                                               self.scheduler.runners, plan, on_launch,
                                                               launched, ahead, bitmasks))
        if self._unstreamed:
            await asyncio.wait([launch_done, forward], return_when=asyncio.FIRST_COMPLETED)
            self._flush_streams()
        return await forward

    async def _rerun_isolated(self, plan: StepPlan, launched, exc: Exception) -> list:
        """After the forward of `plan` raised `exc`: each item re-run alone (scheduler.execute_isolated; a
        one-item plan's error is its own). Requests whose own forward fails end with the error (their
        result None); the others keep their results."""
        if launched is not None:  # a step launched ahead: its fed-back tokens are on the host by now
            plan = StepPlan([(req, self._host_segment(req, seg)) for req, seg in plan.items], plan.tables)
        results = [exc] if len(plan.items) == 1 else await asyncio.to_thread(execute_isolated, self.scheduler.runners, plan)
        for i, ((req, _), result) in enumerate(zip(plan.items, results)):
            if isinstance(result, Exception):
                self._segment_back(req)  # (cancelled meanwhile: its KV waited for the forward)
                self._finish(req, FinishReason.ERROR, error=f"forward failed: {type(result).__name__}: {result}")
                results[i] = None
        return results

    def _end_unplanned(self, plan: StepPlan) -> None:
        """End the requests `plan` holds without a step: those that failed to start (their decoder could
        not be built) and those whose decoder is done without one (a grammar's forced text)."""
        for req, error in plan.failed:
            if isinstance(error, Exception):
                self._fail(req, error)
            else:
                self._finish(req, FinishReason.ERROR, error=error)
        for req in plan.done:  # a decoder done without a step (a grammar's forced text)
            try:
                self._stream(req, time.monotonic())
                if not req.finished and req.decoder.finished:  # (a rerun may have been given a new decoder: replay.py)
                    self._finish(req, self._natural_reason(req))
            except Exception as exc:  # (raised out of the step, it ended every running request)
                self._fault(req, exc, "end_failed")

    def _segment_back(self, req: Request) -> bool:
        """One launched step holding a segment of `req` is collected or dropped. True when `req` has
        finished meanwhile (a cancel, or its end in an earlier step); its KV is freed once no launched
        step holds it any more (Request.in_flight)."""
        req.in_flight -= 1
        if req.finished and not req.in_flight:
            self.kv.free(req)
            self.scheduler.blocks_freed()
        return req.finished

    def _postprocess(self, plan: StepPlan, results: list) -> list[tuple[Mode, float]] | None:
        """Absorb every result. Returns (decoder, host CPU seconds) per request when each item was a
        routed decode step (what the router's HostCost uses), else None (a prefill chunk, a grammar or
        internal request, a failed or cancelled item)."""
        now = time.monotonic()
        decodes: list[tuple[Mode, float]] | None = []
        for (req, segment), result in zip(plan.items, results):
            host_start, host_s, req.host_s = cpu_time_without_gc(), req.host_s, 0.0
            if result is None:  # its own forward failed: already finished with the error
                decodes = None
                continue
            if self._segment_back(req):  # cancelled (or ended by its last step) while this segment ran
                decodes = None
                continue
            mode = req.mode
            try:
                routed = self._absorb(req, segment, result, now)
            except Exception as exc:
                self._fault(req, exc, "absorb_failed")
                routed = False
            if decodes is not None and routed:
                decodes.append((mode, host_s + cpu_time_without_gc() - host_start))
            else:
                decodes = None
        return decodes

    def _absorb(self, req: Request, segment, result, now: float) -> bool:
        """Fold a result into its request; True when it was a decode step the router observed."""
        before, forwards = req.generated_tokens(), req.decoder.stats.forwards
        req.decoder.absorb(result)
        if req.scores_prompt and req.prompt_logprobs is None:
            req.prompt_logprobs = req.decoder.prompt_scores()  # None until the whole prompt is scored
        # A decode step (a prefill chunk, scoring the prompt or not, counts no forward) of a request the
        # router chose a mode for: grammar requests run AR by necessity and jump-forward lifts their
        # tokens per forward, which would misstate what AR gives the requests it chooses for. A decode
        # forward without reads counts too: a ReFusion slot's last branch verify reads nothing and
        # commits the slot (gating on reads hid ~40% of ReFusion's tokens from the router).
        decoded = req.decoder.stats.forwards > forwards
        routed = decoded and req.grammar is None and not req.spec.internal
        if routed:
            self.router.observe(req.mode, req.priority, req.generated_tokens() - before, 1, len(segment.token_ids))
        self.kv.share_prompt_blocks(req)
        if self._defer_stream(req, now):  # (not when a mode switch is due: maybe_switch would do nothing)
            self._unstreamed[req.id] = (req, req.decoder, now)
            return routed
        self._stream(req, now)
        if req.finished:
            return routed
        if req.decoder.finished:
            self._finish(req, self._natural_reason(req))
        else:
            maybe_switch(self.scheduler, req)
        return routed
