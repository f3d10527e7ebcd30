"""The engine: one asyncio loop turning many requests into a stream of packed forwards.

    engine = Engine(runner, tokenizer, EngineConfig())
    await engine.start()                      # calibrates the routing cost curve, starts the loop
    async for delta in engine.submit(request):
        ...
    await engine.stop(drain_timeout_s=10)

Each step: schedule (start waiting requests that fit, collect every running request's next segment
under the token budget) -> execute (ONE packed forward per runner, in a worker thread so the event
loop keeps serving) -> postprocess (decoders absorb, finished requests free their KV). The text a
step made final is detokenized, checked for stop strings and sent while the NEXT step's forward runs
(EngineConfig.overlap_streaming; see `_defer_stream`); for AR decoding the next step is planned
and launched before this one's results are back, its tokens fed back on the device, so the whole host
step overlaps the device (EngineConfig.async_scheduling; see `_execute`). Plain Python; torch lives
behind the runner. Streaming and ending requests are scheduler/engine_output.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import time
from typing import AsyncIterator, Collection

import structlog

from decoding.api import DecodeParamError
from decoding.grammar import Grammar, GrammarSpec, GrammarTokenizer
from decoding.params import AR_ONLY_PARAMS
from scheduler.api import (ENGINE_STOPPED, Delta, FinishReason, GenerationRequest, InvalidRequestError, Mode,
                           OverloadedError, merge_deltas)
from scheduler.calibration import calibrate
from scheduler.config import EngineConfig
from scheduler.log_format import plain_tracebacks
from scheduler.decoders import DecoderFactory, ModelDecoderFactory
from scheduler.detokenizer import TextStream
from scheduler.engine_output import EngineOutput
from scheduler.grammars import GrammarCompiler
from scheduler.metrics import EngineMetrics
from scheduler.mode_switch import maybe_switch
from scheduler.plan import StepPlan, collect_plan, execute_isolated, execute_plan, finish_plan, launch_plan
from scheduler.request import Request, RequestStatus
from scheduler.request_ids import InFlightIds, in_flight_message
from scheduler.routing import CostCurve, Router
from scheduler.scheduler import Scheduler
from scheduler.validation import parse_params, validate_request, with_seed
from workers.batch import STEP_LAUNCHED

log = structlog.get_logger("engine")
plain_tracebacks()  # every process that runs an engine (a Ray replica, a test, a CLI)
def _forward(runners: dict, plan: StepPlan, on_launch, launched=None, ahead: StepPlan | None = None,
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


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class EngineNotRunningError(OverloadedError):
    """submit() before start() or after stop(): the service is not taking requests (HTTP 503)."""


class Engine(EngineOutput):
    """Serves GenerationRequests on a runner (contract: scheduler/api.py, docs/architecture.md).

    ar_runner / ar_decoder_factory: optional separate AR model (a second Qwen-family checkpoint with
    the same tokenizer); requests routed to AR then run there, those its KV pool can hold (longer ones
    run AR on the main model: KVOwner.runner_for). By default AR uses the same weights.
    """

    def __init__(self, runner, tokenizer, config: EngineConfig | None = None, decoder_factory: DecoderFactory | None = None,
                 *, ar_runner=None, ar_decoder_factory: DecoderFactory | None = None):
        self.config = config or EngineConfig()
        self.runner = runner
        self.tokenizer = tokenizer
        self.grammars = GrammarCompiler(GrammarTokenizer(tokenizer, runner.info.vocab_size, runner.info.eos_token_id),
                                         self.config.grammar_token_ms)
        self.metrics = EngineMetrics()
        factory = decoder_factory or ModelDecoderFactory(runner, self.config.model_dir)
        runners, factories = {"main": runner}, {"main": factory}
        if ar_runner is not None:
            runners["ar"], factories["ar"] = ar_runner, ar_decoder_factory or ModelDecoderFactory(ar_runner)
        points = self.config.routing.cost_points or [(1, 1.0)]  # flat until calibrated
        self.router = Router(self.config.routing, CostCurve(points))
        self.scheduler = Scheduler(self.config, runners, factories, self.router, self.metrics)
        self.kv = self.scheduler.kv  # every KV block of every runner (scheduler/kv.py)
        self.prefix_cache = self.kv.prefix_cache
        self.metrics.update_gauges(0, 0, self.kv.pool(), self.prefix_cache)  # capacity known before a first step
        self._requests: dict[str, Request] = {}
        self._ids = InFlightIds()  # the keys of _requests, with their dotted prefixes (scheduler/request_ids.py)
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self.forwards = 0
        self._plan_items: list = []  # the step's (request, segment) pairs while its forward and postprocess run
        # request id -> (request, its decoder then, the time then): absorbed a step whose text is not
        # streamed yet (_defer_stream)
        self._unstreamed: dict[str, tuple[Request, object, float]] = {}
        self.scheduler.before_requeue, self.scheduler.settle = self._stream_deferred, self._settle_streams
        overlap, pipelined = self.config.overlap_streaming, self.config.async_scheduling
        # (None: where the forward runs on a device the host waits for; scheduler.config.EngineConfig)
        on_device = all(getattr(r, "asynchronous", False) for r in runners.values())
        self.overlap_streaming = on_device if overlap is None else overlap
        splits = [key for key, r in runners.items() if not (hasattr(r, "launch") and hasattr(r, "collect"))]
        if pipelined and splits:
            raise ValueError(f"async_scheduling: runner {splits[0]!r} has no launch/collect "
                             "(workers.runner.ModelRunner has); set async_scheduling to false or null")
        self.async_scheduling = (on_device and not splits) if pipelined is None else pipelined
        self._ahead: tuple[StepPlan, object] | None = None  # the next step, launched ahead, with its handles
        self.ahead_steps = 0  # steps launched before the previous one's results were collected

    # ---- public API --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Calibrate the routing cost curve on the device (unless disabled) and start the loop."""
        if self._task is not None:
            return
        routing = self.config.routing
        if routing.calibrate:
            self.router.curve = await asyncio.to_thread(
                calibrate, self.runner, routing.calibration_tokens, routing.calibration_repeats, self.config.token_budget
            )
            log.info("calibrated", points=self.router.curve.points)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def submit(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the request's output as Deltas; the last has finished=True. Deltas queued together are
        yielded as one (merge_deltas): a step's last text and the request's end come in one Delta, as
        vLLM puts finish_reason on the last token's chunk. Raises InvalidRequestError or
        OverloadedError on the first iteration. Closing the generator (or cancelling the consuming
        task) cancels the request and frees its KV."""
        validate_request(request, self.runner.info.vocab_size, self.config.max_stop_strings)  # once, before a compile
        request = self._ar_only(request)
        grammar = None
        if request.grammar is not None:
            request, grammar = await self._compile_grammar(request)
        req = self._admit(request, grammar)
        try:
            while True:
                pending = [await req.outbox.get()]
                while not req.outbox.empty():  # one step's text and its end, or deltas a slow reader let pile up
                    pending.append(req.outbox.get_nowait())
                delta = merge_deltas(pending)
                yield delta
                if delta.finished:
                    return
        finally:
            if not req.finished:
                self.cancel(req.id)

    def in_flight(self, request_id: str) -> str | None:
        """An id in flight here that `request_id` is, extends or is extended by (scheduler/request_ids.py:
        "a" and "a.0"); None when there is none."""
        return self._ids.overlap(request_id)

    def cancel(self, request_id: str) -> None:
        """End a request now (idempotent): no further forward; its KV is freed at once, or right after
        the forward in progress returns if its segment is inside it."""
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, FinishReason.CANCELLED)

    def movable(self, keep: Collection[str] = (), every: bool = False) -> list[Request]:
        """The waiting requests another replica could run instead of this engine, in the order they would
        start here (Request.rank_key): never started (no output, no KV, not preempted), not the server's
        own (GenerationRequest.internal), not in `keep` (ids moved here once already), and no more than
        wait past the running slots (running + waiting - max_running: the rest start here next), unless
        `every` (this replica is being removed: none of them should start here)."""
        scheduler = self.scheduler
        surplus = len(scheduler.running) + len(scheduler.waiting) - self.config.max_running
        if every:
            surplus = len(scheduler.waiting)
        if surplus <= 0:
            return []
        return sorted((req for req in scheduler.waiting
                       if req.status is RequestStatus.WAITING and req.preemptions == 0 and req.decoder is None
                       and not req.in_flight and not req.spec.internal and req.id not in keep),
                      key=Request.rank_key)[:surplus]

    def release_waiting(self, limit: int, keep: Collection[str] = (), every: bool = False) -> list[str]:
        """Take up to `limit` of `movable(keep, every)` out of the queue, first to start first, for
        another replica to run (queue rebalancing, integrations/serve_rebalance.py). Each one's stream ends
        at once with finish_reason CANCELLED and no text; it is counted in refusion_requests_moved_total,
        not as finished or cancelled, and its prompt tokens count where it starts. Returns their ids."""
        moved = self.movable(keep, every)[:max(0, limit)]
        for req in moved:
            self._finish(req, FinishReason.CANCELLED, counted=False)
            self.metrics.moved.inc()
            log.info("moved", request_id=req.id, waited_s=round(time.monotonic() - req.arrival_s, 3))
        return [req.id for req in moved]

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to drain_timeout_s, cancel the rest,
        stop the loop and release every KV block the engine holds (prefix cache included)."""
        if self._task is None:
            return
        self._stopping = True
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        while self.scheduler.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for req in list(self._requests.values()):
            self._finish(req, FinishReason.CANCELLED, error=ENGINE_STOPPED)
        self._wake.set()
        await self._task
        self._task = None
        self.grammars.close()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @property
    def stopping(self) -> bool:
        """True from stop() until the loop has ended: new requests are refused, running ones drain."""
        return self._stopping and self._task is not None

    def stats(self) -> dict:
        """A snapshot for health checks and benchmarks."""
        blocks = self.kv.pool()
        curve = self.router.curve
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            # the scheduling limits in force (EngineConfig; `refusion serve --max-num-seqs` sets max_running)
            "max_running": self.config.max_running,
            "max_queue": self.config.max_queue,
            "token_budget": self.config.token_budget,
            "fair_share": self.config.fair_share,
            "clients": self.scheduler.client_load(),
            "forwards": self.forwards,
            "kv_blocks_total": blocks.num_total,
            "kv_blocks_free": blocks.num_free,
            "prefix_cache_blocks": self.prefix_cache.num_blocks if self.prefix_cache else 0,
            "prefix_cache_hit_rate": self.prefix_cache.hit_rate if self.prefix_cache else 0.0,
            "cost_curve": list(curve.points),
            "class_stats": self.router.class_stats(),
            "host_s_per_request": {m.value: s for m, s in self.router.host.per_request().items()},
            "host_s_per_step": self.router.host.fixed_s,
            "overlap_streaming": self.overlap_streaming,
            "async_scheduling": self.async_scheduling,
            "ahead_steps": self.ahead_steps,
            "runner": self.runner.stats() if hasattr(self.runner, "stats") else {},
        }

    def clear_prefix_cache(self) -> None:
        """Release every block the prefix cache holds (blocks shared with running requests stay theirs)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    # ---- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        failed_steps = 0  # in a row
        while True:
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
                        self._finish_or_abort(req, "internal error in engine step")
            finally:
                self._plan_items = []

    async def _recover(self, failed_steps: int) -> None:
        """After a failed step: the step launched ahead is dropped and the running requests end with an
        error; the waiting ones too when the step failed again (a fault before anything runs, e.g. in
        scheduling, would otherwise spin the loop forever)."""
        await self._abandon_ahead()
        ended = list(self.scheduler.running) + (list(self.scheduler.waiting) if failed_steps > 1 else [])
        for req in ended:
            req.in_flight = 0
            self._finish_or_abort(req, "internal error in engine step")
        for req, _ in self._plan_items:  # cancelled while its segment ran: its KV waited for the forward
            if req.in_flight and req.finished:
                req.in_flight = 0
                self.kv.free(req)
                self.scheduler.blocks_freed()

    async def step(self) -> None:
        """One engine step: schedule -> execute -> postprocess. Under asynchronous scheduling the step the
        last one launched ahead is this step's plan (no scheduling), and `_execute` may launch the next."""
        host_start = time.thread_time()  # this thread's CPU seconds: the step's host work (routing.HostCost)
        self._expire_deadlines(time.monotonic())
        launched = None
        if self._ahead is not None:
            (plan, launched), self._ahead = self._ahead, None
            host_s = time.thread_time() - host_start
        else:
            plan = self.scheduler.schedule()
            host_s = time.thread_time() - host_start - self.scheduler.admission_host_s
        self._end_unplanned(plan)
        if plan.items:
            self._plan_items = plan.items  # (the loop frees what a failure here would strand)
            results = await self._execute(plan, launched)
            if results is not None:
                host_start = time.thread_time()
                decodes = self._postprocess(plan, results)
                if decodes is not None:  # a step of routed decode steps only: its host cost per decoder
                    self.router.observe_step(decodes, host_s + time.thread_time() - host_start)
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

        A failed forward is re-run item by item (scheduler.execute_isolated): requests whose own
        forward fails end with the error, the others continue with their results, so no request sees
        an error it did not cause."""
        bitmasks = self._deferred_bitmasks(plan) if launched is not None else None
        ahead = self.scheduler.plan_ahead(plan) if self.async_scheduling else None
        for req, _ in plan.items if launched is None else ():
            req.in_flight += 1
        for req, _ in ahead.items if ahead is not None else ():
            req.in_flight += 1
        ahead_launched = None
        start = time.perf_counter()
        try:
            # The last step's text is streamed once this step's device work is queued (the runner's
            # workers.batch.notify_launched), while the worker thread waits for the results with the
            # GIL released; streamed before the thread had packed and launched the step, it would
            # delay the launch instead (the thread needs the GIL for that)
            loop = asyncio.get_running_loop()
            launch_done = loop.create_future()

            def on_launch() -> None:
                loop.call_soon_threadsafe(_set_once, launch_done)

            forward = loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, _forward,
                                                                   self.scheduler.runners, plan, on_launch,
                                                                   launched, ahead, bitmasks))
            if self._unstreamed:
                await asyncio.wait([launch_done, forward], return_when=asyncio.FIRST_COMPLETED)
                self._flush_streams()
            results, ahead_launched = await forward
            return results
        except Exception as exc:
            log.warning("forward_failed", error=f"{type(exc).__name__}: {exc}", requests=[r.id for r, _ in plan.items])
            if ahead is not None:  # (not launched, or waited for and left out: it was fed by this step)
                self._drop_ahead(ahead)
                ahead = None
            if launched is not None:  # a step launched ahead: its fed-back tokens are on the host by now
                plan = StepPlan([(req, req.decoder.host_segment(seg) if seg.feedback and not req.finished else seg)
                                 for req, seg in plan.items], plan.tables)
            results = [exc] if len(plan.items) == 1 else await asyncio.to_thread(execute_isolated, self.scheduler.runners, plan)
            for i, ((req, _), result) in enumerate(zip(plan.items, results)):
                if isinstance(result, Exception):
                    self._segment_back(req)  # (cancelled meanwhile: its KV waited for the forward)
                    self._finish(req, FinishReason.ERROR, error=f"forward failed: {type(result).__name__}: {result}")
                    results[i] = None
            return results
        finally:
            if ahead is not None and ahead_launched is None:
                self._drop_ahead(ahead)  # its launch failed
            elif ahead is not None:
                self._ahead = (ahead, ahead_launched)
                self.ahead_steps += 1
            self.forwards += 1
            self.metrics.forward_time.observe(time.perf_counter() - start)

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
                    self._fail(req, exc)
            bitmasks.append(mask)
        return bitmasks

    def _end_unplanned(self, plan: StepPlan) -> None:
        """End the requests `plan` holds without a step: those that failed to start (their decoder could
        not be built) and those whose decoder is done without one (a grammar's forced text)."""
        for req, error in plan.failed:
            if isinstance(error, Exception):
                self._fail(req, error)
            else:
                self._finish(req, FinishReason.ERROR, error=error)
        for req in plan.done:
            self._stream(req, time.monotonic())  # a decoder done without a step (a grammar's forced text)
            self._finish(req, self._natural_reason(req))

    def _drop_ahead(self, ahead: StepPlan) -> None:
        """A step planned ahead that will not run (or ran and is abandoned): its decoders forget it, its KV
        shrinks back, and a request that ended meanwhile frees its KV once nothing of it is in flight.
        Requests it admitted stay running (their steps are held for `schedule`); those it ends without a
        step are ended now."""
        self.scheduler.drop_ahead(ahead)
        for req, _ in ahead.items:
            self._segment_back(req)
        self._end_unplanned(ahead)

    def _segment_back(self, req: Request) -> bool:
        """One launched step holding a segment of `req` is collected or dropped. True when `req` has
        finished meanwhile (a cancel, or its end in an earlier step); its KV is freed once no launched
        step holds it any more (Request.in_flight)."""
        req.in_flight -= 1
        if req.finished and not req.in_flight:
            self.kv.free(req)
            self.scheduler.blocks_freed()
        return req.finished

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

    def _postprocess(self, plan: StepPlan, results: list) -> list[tuple[Mode, float]] | None:
        """Absorb every result. Returns (decoder, host CPU seconds) per request when each item was a
        routed decode step (what the router's HostCost uses), else None (a prefill chunk, a grammar or
        internal request, a failed or cancelled item)."""
        now = time.monotonic()
        decodes: list[tuple[Mode, float]] | None = []
        for (req, segment), result in zip(plan.items, results):
            host_start, host_s, req.host_s = time.thread_time(), req.host_s, 0.0
            if result is None:  # its own forward failed: already finished with the error
                decodes = None
                continue
            if self._segment_back(req):  # cancelled (or ended by its last step) while this segment ran
                decodes = None
                continue
            mode = req.mode
            try:
                routed = self._absorb(req, segment, result, now)
            except DecodeParamError as exc:  # the request's own input at fault (e.g. its grammar)
                self._fail(req, exc)
                routed = False
            except Exception as exc:
                log.exception("absorb_failed", request_id=req.id)
                self._finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
                routed = False
            if decodes is not None and routed:
                decodes.append((mode, host_s + time.thread_time() - host_start))
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

    # ---- admission ---------------------------------------------------------------------------------
    def _ar_only(self, spec: GenerationRequest) -> GenerationRequest:
        """Penalties and a logit bias shape AR decoding (decoding/ar.py); ReFusion's plans and verifies
        are the spec's, so such a request runs AR: AUTO becomes AR, REFUSION is refused (as grammars).
        Raises InvalidRequestError naming "mode"."""
        params = spec.params if isinstance(spec.params, dict) else {}
        asked = [name for name in AR_ONLY_PARAMS if params.get(name)]
        if not asked:
            return spec
        if spec.mode is Mode.REFUSION:
            raise InvalidRequestError("mode", f"{asked[0]} applies to autoregressive decoding: use mode 'ar' or "
                                      f"'auto', or drop {asked[0]}")
        return dataclasses.replace(spec, mode=Mode.AR)

    async def _compile_grammar(self, spec: GenerationRequest) -> tuple[GenerationRequest, Grammar]:
        """A structured-output request runs on the AR path (decoding.grammar): AUTO becomes AR and
        REFUSION is refused. The grammar compiles off the engine loop, or comes from the compile cache
        (scheduler.grammars). Raises InvalidRequestError naming "mode" or "grammar"."""
        if not isinstance(spec.grammar, GrammarSpec):
            raise InvalidRequestError("grammar", f"must be a decoding.grammar.GrammarSpec, got {type(spec.grammar).__name__}")
        if spec.mode is Mode.REFUSION:
            raise InvalidRequestError("mode", "structured output (a grammar) is decoded autoregressively: "
                                      "use mode 'ar' or 'auto', or drop the grammar")
        gen_length = parse_params(self.scheduler.factories["main"], spec.params).gen_length
        # The forced start is fed in the first step, before the token cap is checked: no longer than the
        # cap, so an AR request's KV stays within its estimate (KVOwner.blocks_needed counts max_tokens)
        most = min(gen_length, spec.max_tokens) if spec.max_tokens else gen_length
        try:
            grammar = await self.grammars.compile(spec.grammar, spec.prompt_ids, max_forced=most)
        except DecodeParamError as exc:
            raise InvalidRequestError(exc.field, exc.message) from None
        return dataclasses.replace(spec, mode=Mode.AR), grammar

    def _admit(self, spec: GenerationRequest, grammar: Grammar | None = None) -> Request:
        """Queue a request submit() validated (and whose grammar it compiled)."""
        if self._task is None or self._stopping:
            if not spec.internal:  # (health probes stay out of the request metrics)
                self.metrics.rejected.labels(reason="not_running").inc()
            why = "the engine is shutting down" if self._stopping else "engine is not running; call `await engine.start()` first"
            raise EngineNotRunningError(why, retry_after_s=5.0)
        if (running := self._ids.overlap(spec.request_id)) is not None:
            raise InvalidRequestError("request_id", in_flight_message(spec.request_id, running))
        params = parse_params(self.scheduler.factories["main"], with_seed(spec.params))
        try:
            stream = TextStream(self.tokenizer, spec.stop, min_tokens=getattr(params, "min_tokens", 0), healed=spec.healed)
            req = self.scheduler.add(spec, params, stream)
        except OverloadedError:
            if not spec.internal:
                self.metrics.rejected.labels(reason="queue_full").inc()
            raise
        req.grammar = grammar
        self._requests[req.id] = req
        self._ids.add(req.id)
        self._wake.set()
        return req
