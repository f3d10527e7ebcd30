"""The engine replica of the Ray Serve application (`RefusionEngine`): one scheduler Engine per replica.

The ingress (integrations/serve_app.py) calls it through a deployment handle: `generate` streams Delta
objects (an admission error travels as one EngineFailure record), plus info/metrics/check_health and
the queue-rebalancing calls load/release_waiting. It warms up (one short request per decoding path)
before it takes traffic; Ray Serve's health check runs a one-token request through its engine. On a
drain signal (integrations/serve_drain.py) it stops taking requests and finishes or ends the running
ones; a replica Ray Serve removes hands its queued requests back to be sent elsewhere, and one whose
caller (an ingress replica) died has that caller's requests cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import AsyncIterator

from ray import serve

from integrations.engine_client import EngineFailure, LocalEngineClient, coalesce_deltas, read_model_card
from integrations.engine_host import build_engine, engine_metrics_text, kv_short_of_context, one_token_probe, warm_up
from integrations.serve_config import ServeConfig
from integrations.serve_deployments import ENGINE_DEPLOYMENT
from integrations.serve_drain import DRAIN_RETRY_AFTER_S, die_on_sigterm, report_final, report_open_work, start_drain_watch, wait_for_drain_signal
from scheduler.api import Delta, EngineError, GenerationRequest

logger = logging.getLogger(__name__)

# How often an engine replica looks whether Ray Serve is removing it (EngineDeployment._hand_back_when_removed),
# and how many looks in a row it must be missing from Ray's list: a replica being reconfigured in place
# (a new max_ongoing_requests or autoscaling_config) leaves the list for a moment too (UPDATING).
REMOVAL_CHECK_S = 0.5
REMOVAL_LOOKS = 4


def node_name() -> str:
    """The Ray node this process runs on: its `ray start --node-name`, else its address."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), {})
    return node.get("NodeName") or node.get("NodeManagerAddress") or node_id[:12]


def set_log_level(level: str) -> None:
    """The replica's structlog lines at `level` and above (ServeConfig.log_level; the scheduler logs each
    routing decision at debug). Set in each replica's process only: tests that capture logs in their own
    process keep every level."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())))


class CallerRequests:
    """The engine requests each calling ingress replica (its Ray actor name) has running here, for
    EngineDeployment._cancel_orphans. Calls are counted per request id: a second call with an id already
    running (the engine refuses it) ends without dropping the running one's entry, which would leave that
    request uncancelled if its ingress then died."""

    def __init__(self):
        self._by_caller: dict[str, Counter] = {}

    def add(self, caller: str, request_id: str) -> None:
        self._by_caller.setdefault(caller, Counter())[request_id] += 1

    def discard(self, caller: str, request_id: str) -> None:
        ids = self._by_caller.get(caller)
        if ids is None or request_id not in ids:
            return
        ids[request_id] -= 1
        if ids[request_id] <= 0:
            del ids[request_id]
        if not ids:
            del self._by_caller[caller]

    def callers(self) -> list[str]:
        return list(self._by_caller)

    def pop(self, caller: str) -> list[str]:
        """The caller's request ids, forgotten (each is then cancelled once)."""
        return list(self._by_caller.pop(caller, ()))


@serve.deployment(name=ENGINE_DEPLOYMENT)
class EngineDeployment:
    """Hosts one scheduler Engine. Methods are called through deployment handles by the ingress."""

    async def __init__(self, config: dict):
        die_on_sigterm()  # `kill <pid>` ends this replica as `kill -9` does, not in a ~95 s freeze
        self.config = ServeConfig.model_validate(config)
        set_log_level(self.config.log_level)
        threads = self.config.engine_deployment.torch_threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        engine, tokenizer = build_engine(self.config.model, self.config.runner, self.config.engine)
        await engine.start()
        self.engine = engine
        card = read_model_card(self.config.model, tokenizer, self.config.max_model_len)
        self.client = LocalEngineClient(engine, tokenizer, self.config.served_model_names[0], card)
        if short := kv_short_of_context(engine, card["limits"]["context_length"]):
            logger.warning("engine replica: %s", short)
        # Before the replica takes traffic: Ray Serve routes to it (and /health passes) only after this.
        self.warmup = await warm_up(self.client)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.node = node_name()
        self.cancelled = 0
        self.orphaned = 0  # requests cancelled because the ingress replica streaming them died
        self._callers = CallerRequests()  # ingress replica (Ray actor name) -> its request ids here
        self._moved_in: set[str] = set()  # ids of requests moved here by queue rebalancing: they stay
        self._moving: dict[str, str] = {}  # request id -> the replica it was released to (serve_rebalance)
        self.removed = False  # Ray Serve is removing this replica (_hand_back_when_removed)
        self.draining, self._stopped, self._drain_signal = False, False, None
        self._drain_watch = start_drain_watch(self._drain_when_signalled(context.app_name), f"engine {self.replica}")
        self._caller_watch = asyncio.create_task(self._cancel_orphans())
        self._removal_watch = asyncio.create_task(self._hand_back_when_removed(context.app_name))

    async def _cancel_orphans(self) -> None:
        """An ingress replica that dies (killed, OOM) does not cancel its calls here: Ray neither ends the
        streaming call nor tells this replica, so its requests would decode to max_tokens for nobody,
        holding batch slots and KV. Every caller_check_s the ingress replicas with requests here are
        looked up by name (as Ray Serve's controller checks its replicas); a dead one's are cancelled."""
        import ray

        while True:
            await asyncio.sleep(self.config.caller_check_s)
            for caller in self._callers.callers():
                try:
                    await asyncio.to_thread(ray.get_actor, caller, namespace="serve")
                    continue
                except ValueError:  # no live actor by that name: it died
                    pass
                except Exception:  # noqa: BLE001 - the lookup itself failed (GCS busy): look again next round
                    logger.warning("could not look up ingress replica %s", caller, exc_info=True)
                    continue
                for request_id in self._callers.pop(caller):  # each request is cancelled once
                    self.orphaned += 1
                    await self.client.cancel(request_id)

    async def _hand_back_when_removed(self, app_name: str) -> None:
        """Ray Serve removes a replica (scale-down, a new version) by routing nothing more to it, waiting
        for its calls up to graceful_shutdown_timeout_s and then killing it, and it tells the replica's
        code nothing until then: the requests queued here would wait behind the running ones and be cut
        (helper-153: 6 of 10 lost on a 2 -> 1 scale while the other replica idled). A handle to this
        deployment here gets Ray's replica list like any router's (integrations/routing_state.py); once
        this replica has been missing from it for REMOVAL_LOOKS looks in a row (2 s) while others remain,
        every waiting request that never started is released at once, and any that still arrive (a
        router's stale choice) are sent back at once, to be routed anew by their ingress
        (EngineFailure("moved") naming no replica)."""
        from integrations.routing_state import live_replicas

        try:
            serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name).options()  # (initialized: its router follows Ray's list)
        except Exception:  # noqa: BLE001 - then this replica cannot tell; everything else works as before
            logger.warning("engine %s: no handle to its own deployment; a scale-down may cut its queue", self.replica,
                           exc_info=True)
            return
        listed, missing = False, 0
        while True:
            await asyncio.sleep(REMOVAL_CHECK_S)
            live = live_replicas(app_name, ENGINE_DEPLOYMENT)
            if self.replica in live:
                listed, missing, self.removed = True, 0, False
                continue
            missing += 1
            if listed and live and missing >= REMOVAL_LOOKS and not self.draining:
                self.removed = True
                self._release(len(self.engine.scheduler.waiting), to="", every=True)

    async def _drain_when_signalled(self, app_name: str) -> None:
        """Ray Serve waits for in-flight calls before shutting a replica down, and force-kills it after
        graceful_shutdown_timeout_s: a long generation would be severed. When the drain signal appears
        (integrations/serve_drain.py), the engine stops taking requests, lets running ones finish for
        drain_timeout_s and ends the rest with a clean error; the replica reports 1 until then."""
        signal = self._drain_signal = await wait_for_drain_signal(app_name)
        self.draining = True
        reporter = asyncio.create_task(report_open_work(signal, f"engine:{self.replica}", lambda: 0 if self._stopped else 1))
        await self.engine.stop(drain_timeout_s=self.config.drain_timeout_s)
        self._stopped = True
        await reporter

    async def generate(self, req: GenerationRequest, caller: str | None = None, prefer: str | None = None,
                       moved: bool = False) -> AsyncIterator[Delta | EngineFailure]:
        """Stream the request's deltas (merged when several are ready at once). Cancelling this call
        (client gone) cancels the request in the engine, and so does the death of `caller` (the calling
        ingress replica's Ray actor name; `_cancel_orphans`). `moved`: a request moved here by queue
        rebalancing, which is not moved again (unless this replica is removed); `prefer` is for the
        router (the replica it was released to, if one was named). A request released to another replica
        (`release_waiting`, `_hand_back_when_removed`) ends with EngineFailure("moved", replica=that one
        or None) and nothing before it."""
        if self.draining:
            yield EngineFailure("shutting_down", f"the server is shutting down: retry in {DRAIN_RETRY_AFTER_S:g} s",
                                retry_after_s=DRAIN_RETRY_AFTER_S)
            return
        if self.removed:  # a router's stale choice: straight back, to be routed anew
            yield EngineFailure("moved", "this engine replica is being removed", replica=None)
            return
        finished = False
        if caller:
            self._callers.add(caller, req.request_id)
        moved_in = moved and req.request_id not in self._moved_in
        if moved_in:
            self._moved_in.add(req.request_id)
        try:
            async for delta in coalesce_deltas(self.client.stream(req)):
                finished = finished or delta.finished
                target = self._moving.pop(req.request_id, None) if delta.finished else None
                if target is not None and not delta.text and not delta.token_ids:
                    yield EngineFailure("moved", f"moved to engine replica {target or '(any other)'}",
                                        replica=target or None)
                    return
                yield delta
        except EngineError as exc:
            finished = True
            yield EngineFailure.from_exception(exc)
        finally:
            if not finished:
                self.cancelled += 1
            if caller:
                self._callers.discard(caller, req.request_id)
            if moved_in:  # (what this call added only: a refused call with a running request's id leaves its entries)
                self._moved_in.discard(req.request_id)
            if not finished:  # released, but the caller went before it read the end
                self._moving.pop(req.request_id, None)

    async def load(self, replica: str | None = None) -> dict:
        """Queue rebalancing's view of this replica (integrations/serve_rebalance.ReplicaLoad): free
        running slots (max_running - running - waiting) and the waiting requests it may release
        (Engine.movable: never started, past the ones its own free slots start; so a replica is never
        both); neither while draining. A paused replica (pause) has no room, as it would run nothing it
        took, but its queue is movable, all of it (its free slots start nothing): what never started would
        wait here until resume, while a replica started after the pause (autoscaling) runs it now.
        `replica`: the id the router delivered the call by."""
        if self.draining or self.engine.stopping:
            return {"replica": self.replica, "room": 0, "movable": 0}
        busy = len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)
        room = 0 if self.engine.paused else max(0, self.engine.config.max_running - busy)
        # paused, its free slots start nothing: every waiting request is past them (Engine.movable's `every`)
        movable = self.engine.movable(keep=self._moved_in, every=self.engine.paused)
        return {"replica": self.replica, "room": room, "movable": len(movable)}

    async def release_waiting(self, limit: int, to: str, replica: str | None = None) -> int:
        """End up to `limit` waiting requests that never started (scheduler.engine.Engine.release_waiting)
        for replica `to` to run: their calls end with EngineFailure("moved", replica=to), which the
        ingress streaming each one sends there (from a paused replica too: load). Returns how many."""
        if self.draining or self.engine.stopping or to == self.replica:
            return 0
        return self._release(limit, to)

    def _release(self, limit: int, to: str, every: bool = False) -> int:
        """Engine.release_waiting, and each released call told where to go (`to`; "" for anywhere but
        here) before its generator reads the end (no await in between)."""
        released = self.engine.release_waiting(limit, keep=() if every else self._moved_in,
                                               every=every or self.engine.paused)  # (as load)
        for request_id in released:
            self._moving[request_id] = to
        if released and every:
            logger.info("engine %s: being removed; %d waiting request(s) handed back to be routed anew",
                        self.replica, len(released))
        return len(released)

    async def info(self) -> dict:
        info = await self.client.info()
        info.update(replica=self.replica, node=self.node, pid=os.getpid(), cancelled_by_client=self.cancelled,
                    cancelled_caller_died=self.orphaned, warmup=self.warmup)
        return info

    async def metrics(self, replica: str | None = None) -> dict:
        """{"replica", "node", "text"}: this engine's Prometheus text and where it runs. `replica` is the
        target id the ingress's router delivered the call by (integrations/serve_router.py)."""
        return {"replica": self.replica, "node": self.node, "text": engine_metrics_text(self.engine)}

    async def pause(self, replica: str | None = None) -> dict:
        """Run no forward until resume (scheduler.engine.Engine.pause: requests keep their slots and
        queue; Ray Serve LLM's LLMServer.pause). {"replica", "paused"} once the step in progress is
        absorbed ("paused" false when a resume or a drain came first). `replica`: the id the router
        delivered the call by (integrations/serve_router.py)."""
        return {"replica": self.replica, "paused": await self.engine.pause()}

    async def resume(self, replica: str | None = None) -> dict:
        """End a pause (Engine.resume); {"replica", "paused"}."""
        self.engine.resume()
        return {"replica": self.replica, "paused": self.engine.paused}

    async def is_paused(self, replica: str | None = None) -> dict:
        return {"replica": self.replica, "paused": self.engine.paused}

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy (it is replaced). A paused
        replica (pause) is healthy."""
        await one_token_probe(self.client, self.config.health_probe_timeout_s, forwards=lambda: self.engine.forwards,
                              paused=lambda: self.engine.paused)

    async def __del__(self):
        # Ray Serve has already waited for in-flight calls (graceful_shutdown_wait_loop_s); stop() drains
        # whatever is left within the timeout and ends the rest with a clean error delta.
        engine = getattr(self, "engine", None)  # absent when __init__ failed before it
        if engine is not None:
            for watch in (getattr(self, "_drain_watch", None), getattr(self, "_caller_watch", None),
                          getattr(self, "_removal_watch", None)):
                if watch is not None:  # absent when __init__ failed after the engine started (warm-up)
                    watch.cancel()
            await engine.stop(drain_timeout_s=self.config.drain_timeout_s)
            self._stopped = True
            if getattr(self, "_drain_signal", None) is not None:  # shut down by Ray while a drain runs
                await report_final(self._drain_signal, f"engine:{self.replica}", 0)
