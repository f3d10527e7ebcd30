"""The engine client over Ray Serve: calls to `serve_engine.EngineDeployment` replicas through a deployment
handle, streamed with `handle.options(stream=True)` (the interface: integrations/engine_client.py).

Ray's failures become the typed errors front ends know (`replica_call_error`); a request a replica
releases to another (queue rebalancing, integrations/serve_rebalance.py) or hands back as Ray Serve
removes it is sent again, invisibly to the caller of `stream`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator

from integrations.engine_client import EngineFailure, EngineUnavailableError
from scheduler.api import Delta, EngineError, FinishReason, GenerationRequest, InvalidRequestError, OverloadedError
from scheduler.request_ids import InFlightIds, in_flight_message

log = logging.getLogger(__name__)

# How long a client should wait before retrying a call whose engine replica died: Ray Serve notices the
# death within a health-check period and routes to (or starts) another replica.
REPLICA_RETRY_AFTER_S = 2.0
# /metrics: how long an engine replica may take to send its metrics before it counts as unreachable
# (below the ingress's own ENGINE_METRICS_TIMEOUT_S for the whole fan-out).
REPLICA_METRICS_TIMEOUT_S = 1.5
# POST /pause, /resume, GET /is_paused: how long an engine replica may take to answer (a pause answers once
# the step in progress is absorbed: a long prefill's step on a loaded CPU takes seconds)
PAUSE_TIMEOUT_S = 30.0
# Times one request may be moved: by queue rebalancing once (an engine replica never releases a request
# moved to it), and handed back by replicas that Ray Serve removes a few times (a rolling update of several
# replicas, a router's stale choice of one being removed).
MAX_MOVES, MAX_HAND_BACKS = 1, 4
# How old a read of the engine deployment's autoscaling bounds, as Serve's controller holds them, may be
# before it is read again, in the background (`scaled_to_zero`: /health asks on every probe; a
# `serve deploy` may change them in place)
SCALING_CONFIG_TTL_S = 10.0


def replica_call_error(exc: Exception, what: str) -> Exception:
    """The typed error a front end sees for a failed call to an engine replica. Ray's own message goes
    to the log (one line: it names the actor, pid and node), never to a client."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    if isinstance(exc, serve_errors.BackPressureError):
        return OverloadedError("the engine deployment's queue is full: retry shortly", 1.0)
    lost = (ray_errors.RayActorError, ray_errors.WorkerCrashedError, ray_errors.NodeDiedError, ray_errors.ObjectLostError,
            serve_errors.DeploymentUnavailableError, serve_errors.ReplicaUnavailableError)
    if isinstance(exc, lost):
        log.warning("engine replica lost during %s: %s", what, str(exc).splitlines()[0])
        return EngineUnavailableError("the engine replica serving this request stopped; retry", REPLICA_RETRY_AFTER_S)
    if isinstance(exc, ray_errors.RayTaskError):  # raised by replica code: a bug there, logged there too
        log.error("engine replica failed during %s: %s", what, type(exc.cause).__name__ if exc.cause else exc)
        return EngineError("internal error in the engine replica")
    return exc


def engine_min_replicas(app_name: str, deployment_name: str) -> int | None:
    """The deployment's autoscaling min_replicas as Ray Serve's controller holds it (None: a fixed
    replica count). Blocking (a controller call); raises KeyError when Serve has no such deployment."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    config = details["applications"][app_name]["deployments"][deployment_name]["deployment_config"]
    scaling = config.get("autoscaling_config")
    return scaling.get("min_replicas") if isinstance(scaling, dict) else None


def call_alone(make_call):
    """`make_call()` (a deployment handle's `.remote(...)`) under an internal request id of its own.

    Ray Serve gives every call made while serving one HTTP request that request's internal id, and a
    request router that is not first-in-first-out (serve_router.EngineRouter) hands the replica it chose
    to the waiting call with that id: of several concurrent calls from one request (an editor
    completion's gap candidates, the /metrics fan-out) all but one would never be routed. The request
    id seen in logs is kept. Ray's private request context is read defensively: without it, nothing
    changes. Cancellation does not rely on Ray's parent-to-child link: `stream` cancels its call."""

    def fresh():
        try:
            from ray.serve import context
        except ImportError:
            return make_call()
        var = getattr(context, "_serve_request_context", None)
        current = var.get() if var is not None else None
        if current is not None and getattr(current, "_internal_request_id", ""):
            var.set(replace(current, _internal_request_id=uuid.uuid4().hex))
        return make_call()

    return contextvars.copy_context().run(fresh)


class ServeEngineClient:
    """Client over a Ray Serve handle to `EngineDeployment` (methods generate/info/metrics/check_health,
    load/release_waiting). Every Ray failure is translated by `replica_call_error`. A request an engine
    replica releases to another (queue rebalancing, integrations/serve_rebalance.py) is sent there
    again, invisibly to the caller of `stream`."""

    def __init__(self, handle, tokenizer, model_name: str, caller: str | None = None,
                 rebalance_after_s: float = 0.0):
        """caller: the Ray actor name of the ingress replica this client runs in, sent with each
        generate call (EngineDeployment cancels the requests of a caller that died).
        rebalance_after_s: run queue rebalancing while a stream of this client has waited this long for
        its first answer (0: never; ServeConfig.rebalance_after_s)."""
        self._handle = handle
        self._caller = caller
        self._streaming = handle.options(stream=True)
        self._inflight: dict[str, Any] = {}  # request_id -> DeploymentResponseGenerator
        self._inflight_ids = InFlightIds()  # its keys, with their dotted prefixes
        self._unanswered: dict[str, float] = {}  # request_id -> when it was sent (time.monotonic()), until its first answer
        self.rebalance_after_s = rebalance_after_s
        self.rebalancer = None  # serve_rebalance.Rebalancer, started with the first stream
        self._rebalancing: asyncio.Task | None = None
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._scaling_read: tuple[float, bool] | None = None  # (when, whether min_replicas is 0)
        self._scaling_reading: asyncio.Task | None = None  # that read in flight (scaled_to_zero)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException, RequestCancelledError

        # the engine refuses this too, but only on the same replica
        if (running := self._inflight_ids.overlap(req.request_id)) is not None:
            raise InvalidRequestError("request_id", in_flight_message(req.request_id, running))
        self._start_rebalancing()
        responses = call_alone(lambda: self._streaming.generate.remote(req, caller=self._caller))
        self._inflight[req.request_id] = responses
        self._inflight_ids.add(req.request_id)
        sent_s = self._unanswered[req.request_id] = time.monotonic()  # (when this call was made)
        finished, moves, hand_backs = False, 0, 0
        try:
            while True:
                async for item in responses:
                    self._unanswered.pop(req.request_id, None)
                    if isinstance(item, EngineFailure):
                        finished = True  # nothing runs in the engine for this request
                        if item.kind == "moved":
                            if item.replica is None and hand_backs < MAX_HAND_BACKS:
                                hand_backs += 1
                                break
                            if item.replica is not None and moves < MAX_MOVES:
                                moves += 1
                                break
                            raise OverloadedError("the engine replicas kept passing this request on: retry "
                                                  f"in {REPLICA_RETRY_AFTER_S:g} s", REPLICA_RETRY_AFTER_S)
                        raise item.to_exception()
                    finished = finished or item.finished
                    yield item
                    if finished:
                        return
                else:  # the call ended without a last delta: nothing more comes
                    return
                # released by its replica before it started: send it to the replica named (serve_router's
                # prefer; none: routed anew), with the time it waited (its arrival, max_time_ms and TTFT
                # count from the first)
                finished = False
                now = time.monotonic()
                req = replace(req, waited_s=req.waited_s + now - sent_s)
                responses = call_alone(lambda: self._streaming.generate.remote(req, caller=self._caller,
                                                                               prefer=item.replica, moved=True))
                self._inflight[req.request_id] = responses
                sent_s = self._unanswered[req.request_id] = now
        except RequestCancelledError:  # cancel(request_id): end like the engine's own cancel
            finished = True
            yield Delta(req.request_id, "", [], finished=True, finish_reason=FinishReason.CANCELLED)
        except (RayError, RayServeException) as exc:
            finished = True  # the replica is gone, and the request with it
            raise replica_call_error(exc, f"request {req.request_id}") from None
        finally:
            self._inflight.pop(req.request_id, None)
            self._inflight_ids.discard(req.request_id)
            self._unanswered.pop(req.request_id, None)
            if not finished:
                # Ray Serve cancels the replica-side generator, whose `finally` cancels in the engine.
                responses.cancel()

    def _oldest_unanswered_s(self) -> float:
        """Seconds the oldest stream of this client has waited for its first answer (0: none waits)."""
        return time.monotonic() - min(self._unanswered.values()) if self._unanswered else 0.0

    def _start_rebalancing(self) -> None:
        if self.rebalance_after_s <= 0 or self._rebalancing is not None:
            return
        from integrations.routing_state import live_replicas
        from integrations.serve_rebalance import Rebalancer

        where = (self._handle.app_name, self._handle.deployment_name)
        self.rebalancer = Rebalancer(self.rebalance_after_s, self._oldest_unanswered_s, lambda: live_replicas(*where),
                                     lambda method, replica, **kwargs: self._call(method, replica=replica, **kwargs))
        self._rebalancing = asyncio.get_running_loop().create_task(self.rebalancer.run(), name="queue-rebalancing")

    def in_flight(self, request_id: str) -> str | None:
        return self._inflight_ids.overlap(request_id)  # this ingress replica's ids: the check is per replica

    async def cancel(self, request_id: str) -> None:
        responses = self._inflight.get(request_id)
        if responses is not None:
            responses.cancel()

    async def info(self) -> dict:
        return await self._call("info")

    async def metrics(self) -> bytes:
        """Every live engine replica's metrics and their sums (integrations/service_metrics.py). The
        replicas are asked at once (each call routed to its replica by serve_router.EngineRouter); one
        not heard from within REPLICA_METRICS_TIMEOUT_S is counted unreachable. No replica is asked while
        the engine is scaled to zero (`scaled_to_zero`)."""
        from integrations.routing_state import live_replicas, routing_decisions
        from integrations.service_metrics import ReplicaMetrics, combine

        where = (self._handle.app_name, self._handle.deployment_name)
        # None: before the first routed call, any one replica; none at all while the engine is scaled to
        # zero (a scrape would wait for a replica to start, or start one)
        targets = live_replicas(*where) or (() if await self.scaled_to_zero() else (None,))

        async def ask(replica: str | None) -> ReplicaMetrics:
            kwargs = {"replica": replica} if replica else {}
            return ReplicaMetrics(**await asyncio.wait_for(self._call("metrics", **kwargs), REPLICA_METRICS_TIMEOUT_S))

        answers = await asyncio.gather(*(ask(r) for r in targets), return_exceptions=True)
        parts = [a for a in answers if isinstance(a, ReplicaMetrics)]
        return combine(parts, unreachable=len(answers) - len(parts), decisions=routing_decisions(*where))

    async def check_health(self) -> None:
        await self._call("check_health")

    async def pause(self) -> dict[str, bool]:
        return await self._every_replica("pause")

    async def resume(self) -> dict[str, bool]:
        return await self._every_replica("resume")

    async def is_paused(self) -> dict[str, bool]:
        return await self._every_replica("is_paused")

    async def _every_replica(self, method: str) -> dict[str, bool]:
        """Call `method` (EngineDeployment.pause, resume or is_paused) on every engine replica Ray lists
        now, each call routed to its replica (serve_router.EngineRouter); {replica id: paused}. Raises
        EngineUnavailableError when none is up or one fails to answer within PAUSE_TIMEOUT_S (a
        step of a long prefill may take that long; the call is safe to repeat)."""
        from integrations.routing_state import live_replicas

        targets = live_replicas(self._handle.app_name, self._handle.deployment_name)
        if not targets:
            raise EngineUnavailableError("no engine replica is up", retry_after_s=2.0)

        async def ask(replica: str) -> dict:
            return await asyncio.wait_for(self._call(method, replica=replica), PAUSE_TIMEOUT_S)

        try:
            answers = await asyncio.gather(*(ask(r) for r in targets))
        except asyncio.TimeoutError:
            raise EngineUnavailableError(f"an engine replica did not answer {method} within {PAUSE_TIMEOUT_S:g} s",
                                         retry_after_s=2.0) from None
        return {a["replica"]: a["paused"] for a in answers}

    async def scaled_to_zero(self) -> bool:
        """Whether no engine replica is up because the deployment autoscales down to zero (min_replicas
        0, as Ray Serve's controller holds its config now: args or a `serve deploy` file's
        `deployments:` entry). False while a replica is up, and when the config cannot be read.

        Only the first read waits for the controller (one read, shared by concurrent callers; the ingress
        starts it as it starts, `read_scaling_ahead`). After that
        the last read answers at once, and one older than SCALING_CONFIG_TTL_S is read again in the
        background (the next call sees it): /health and /metrics answer within their bounds however slow
        the controller is on a loaded head node (helper-242: a 15 s Prometheus scrape waited on it)."""
        from integrations.routing_state import live_replicas

        if live_replicas(self._handle.app_name, self._handle.deployment_name):
            return False
        if self._scaling_read is None:
            return await asyncio.shield(self._read_scaling())
        if time.monotonic() - self._scaling_read[0] > SCALING_CONFIG_TTL_S:
            self._read_scaling()
        return self._scaling_read[1]

    def read_scaling_ahead(self) -> None:
        """Start the first controller read of the autoscaling bounds now (the ingress replica's start),
        so the first /health or /metrics finds it done or under way rather than starting it. Needs a
        running event loop. A failed read here is not kept (the application may still be being
        deployed): the first `scaled_to_zero` then reads again."""
        self._read_scaling(ahead=True)

    def _read_scaling(self, ahead: bool = False) -> asyncio.Task:
        """The controller read of the engine deployment's min_replicas in flight, started if none is;
        it stores (when, whether min_replicas is 0) in `_scaling_read` and returns the latter. A failed
        `ahead` read stores nothing."""
        if self._scaling_reading is not None and not self._scaling_reading.done():
            return self._scaling_reading

        async def read() -> bool:
            try:
                low = await asyncio.to_thread(engine_min_replicas, self._handle.app_name, self._handle.deployment_name)
            except Exception as exc:  # noqa: BLE001 - an unreadable config: probe the engine, as for a fixed count
                if ahead:
                    log.debug("scaled_to_zero: the read ahead of the engine deployment's config failed: %s", exc)
                    return False
                log.warning("scaled_to_zero: the engine deployment's config could not be read: %s", exc)
                low = None
            self._scaling_read = (time.monotonic(), low == 0)
            return low == 0

        self._scaling_reading = asyncio.get_running_loop().create_task(read())
        return self._scaling_reading

    async def _call(self, method: str, **kwargs):
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        response = call_alone(lambda: getattr(self._handle, method).remote(**kwargs))
        try:
            return await response
        except (RayError, RayServeException) as exc:
            raise replica_call_error(exc, method) from None
        except asyncio.CancelledError:
            # A timeout or a cancelled caller: end the call in Ray too. Awaiting it does not, and a call
            # routed to a replica that has gone (replica=) would be retried by Ray's router without end
            # (helper-151).
            response.cancel()
            raise
