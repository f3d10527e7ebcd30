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
behind the runner. The loop is scheduler/engine_loop.py (its steps launched ahead, engine_ahead.py);
streaming and ending requests, scheduler/engine_output.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator, Collection

import structlog

from decoding.api import DecodeParamError
from decoding.grammar import Grammar, GrammarSpec, GrammarTokenizer
from decoding.healing import Healing, HealingVocab
from decoding.params import AR_ONLY_PARAMS
from scheduler.api import (ENGINE_STOPPED, Delta, FinishReason, GenerationRequest, InvalidRequestError, Mode,
                           OverloadedError, merge_deltas)
from scheduler.calibration import calibrate
from scheduler.config import EngineConfig
from scheduler.log_format import plain_tracebacks
from scheduler.decoders import DecoderFactory, ModelDecoderFactory
from scheduler.client_view import client_view
from scheduler.detokenizer import TextStream
from scheduler.engine_ahead import EngineAhead
from scheduler.engine_loop import EngineLoop
from scheduler.engine_output import EngineOutput
from scheduler.grammars import GrammarCompiler
from scheduler.metrics import EngineMetrics
from scheduler.plan import StepPlan
from scheduler.request import Request, RequestStatus
from scheduler.request_ids import InFlightIds, in_flight_message
from scheduler.routing import CostCurve, Router
from scheduler.scheduler import Scheduler
from scheduler.validation import parse_params, validate_request, with_seed

log = structlog.get_logger("engine")
plain_tracebacks()  # every process that runs an engine (a Ray replica, a test, a CLI)


class EngineNotRunningError(OverloadedError):
    """submit() before start() or after stop(): the service is not taking requests (HTTP 503)."""


class Engine(EngineLoop, EngineAhead, EngineOutput):
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
        # token healing's bitmasks (decoding/healing.py): the vocabulary is walked at the first healed request
        self.healing_vocab = HealingVocab(tokenizer, runner.info.vocab_size, never=(runner.info.mask_token_id,))
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
        self._paused = False  # pause() .. resume(): no forward runs (engine_loop._hold)
        self._held: asyncio.Event | None = None  # set while a paused loop holds
        self._settled: asyncio.Event | None = None  # set once a pause holds or is overtaken by resume()
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
        self._wake, self._held, self._settled = asyncio.Event(), asyncio.Event(), asyncio.Event()
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
        elif request.healed and not self.healing_vocab.built:
            await asyncio.to_thread(self.healing_vocab.build)  # (once per engine; ~0.1 s for 150k tokens)
        req = self._admit(request, grammar)
        if req is None:  # an admission check that passed (GenerationRequest.admission_check)
            yield Delta(request.request_id, "", [], finished=True, finish_reason=FinishReason.LENGTH)
            return
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
        `every` (this replica is being removed, or is paused: none of them should start here now)."""
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

    async def pause(self) -> bool:
        """Run no forward until resume(); returns True once the step in progress (and one launched ahead
        of it) has been absorbed, so `forwards` holds still from then on (`paused`), or False when a
        resume() or stop() came first (the last call wins). Running requests keep their slots, KV and
        output so far; new requests are admitted and wait; cancels, deadlines (max_time_ms), the load
        gauges and release_waiting still act. A resumed request continues exactly as if never paused.
        vLLM's pause_generation(mode="keep") and Ray Serve LLM's LLMServer.pause (for a weight update,
        an inspection, a test that needs a replica held). Idempotent. Before start() it marks the engine
        to hold once started and returns False; during stop() it does nothing (the drain runs to its
        end)."""
        if self._stopping:
            return False
        if not self._paused:
            self._paused = True
            if self._settled is not None:
                self._settled.clear()
        if self._task is None or self._task.done():
            return False
        if self.paused:
            return True
        self._wake.set()
        settled = asyncio.ensure_future(self._settled.wait())  # (held by the loop, or resumed meanwhile)
        try:
            await asyncio.wait([settled, self._task], return_when=asyncio.FIRST_COMPLETED)  # (stop() ends the loop)
        finally:
            settled.cancel()
        return self.paused

    def resume(self) -> None:
        """End a pause (pause()): forwards run again, and a pause() still waiting returns False.
        Idempotent."""
        self._paused = False
        if self._held is not None:
            self._held.clear()
            self._settled.set()
            self._wake.set()

    @property
    def paused(self) -> bool:
        """Held: pause() was called, no resume() or stop() since, and the loop has absorbed every step
        in flight (no forward runs until resume()). False while a pause() still waits for the step in
        progress."""
        return self._paused and self._held is not None and self._held.is_set()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to drain_timeout_s, cancel the rest,
        stop the loop and release every KV block the engine holds (prefix cache included). It ends a
        pause (pause()): the drain runs forwards."""
        if self._task is None:
            return
        self._stopping = True
        self.resume()
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

    def _admit(self, spec: GenerationRequest, grammar: Grammar | None = None) -> Request | None:
        """Queue a request submit() validated (and whose grammar it compiled); None for an admission
        check that passed (it is not queued)."""
        if self._task is None or self._stopping:
            if not spec.internal:  # (health probes stay out of the request metrics)
                self.metrics.rejected.labels(reason="not_running").inc()
            why = "the engine is shutting down" if self._stopping else "engine is not running; call `await engine.start()` first"
            raise EngineNotRunningError(why, retry_after_s=5.0)
        if (running := self._ids.overlap(spec.request_id)) is not None:
            raise InvalidRequestError("request_id", in_flight_message(spec.request_id, running))
        params = parse_params(self.scheduler.factories["main"], with_seed(spec.params))
        if spec.admission_check:
            self.scheduler.fitted(spec, params)
            return None
        try:
            view = client_view(spec.tab_indent, spec.tab_indent_first_line, spec.crlf, spec.cr_only)
            stream = TextStream(self.tokenizer, spec.stop, min_tokens=getattr(params, "min_tokens", 0), healed=spec.healed,
                                view=view)
            req = self.scheduler.add(spec, params, stream)
        except OverloadedError:
            if not spec.internal:
                self.metrics.rejected.labels(reason="queue_full").inc()
            raise
        req.grammar = grammar
        if spec.healed and grammar is None:  # (the AR decoder writes the healed blanks under a mask)
            ends = getattr(params, "ends", frozenset((self.runner.info.eos_token_id,)))  # (fake factories' params)
            req.healing = Healing(self.healing_vocab, spec.healed, ends)
        self._requests[req.id] = req
        self._ids.add(req.id)
        self._wake.set()
        return req
