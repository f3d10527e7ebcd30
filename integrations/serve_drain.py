"""Draining a Ray Serve application before it is shut down, so no running request is cut.

    signal = drain_signal("refusion")                     # refusion serve, before serve.run: ready early
    drained = drain_app("refusion", signal, drain_timeout_s=20)   # on Ctrl-C / SIGTERM
    serve.shutdown()                                      # only now: it kills the HTTP proxy first

Ray Serve's own shutdown kills the HTTP proxy at once, severing every open stream. Draining first:

1. The drain signal is a named actor per application (`drain_signal`), created before the replicas so
   that signalling costs one call, not an actor start. Every replica finds it and waits on it with one
   long-poll call (`wait_for_drain_signal`; replicas started without it look again every DRAIN_POLL_S).
2. `drain_app` starts the drain: at once, an ingress replica refuses new requests (503 + Retry-After,
   integrations/ingress_gate.py) and an engine replica stops admitting, lets running requests finish for
   drain_timeout_s and ends the rest with a clean error (`scheduler.engine.Engine.stop`): a last SSE
   `data:` line holding the error, an editor error.
3. Each replica then reports the work it still holds to the signal (`report_open_work`): an ingress its
   HTTP requests not yet fully answered, an engine 1 until its engine has stopped.
4. `drain_app` returns once every running replica has reported and none holds work (True), or when the
   drain timeout plus a margin has passed or `give_up` is set (False). It removes the signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import ray

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.5  # replicas started before their drain signal exists look for it this often
DRAIN_REPORT_S = 0.1  # how often a draining replica reports, and the caller reads the reports
DRAIN_MARGIN_S = 5.0  # beyond drain_timeout_s: ending cancelled streams, reporting
DRAIN_RETRY_AFTER_S = 5  # Retry-After of requests refused while draining


def _drain_signal_name(app_name: str) -> str:
    return f"refusion-drain:{app_name}"


@ray.remote(num_cpus=0)
class DrainSignal:
    """An application's drain switch (async actor: replicas wait on it concurrently) and the work its
    draining replicas report."""

    def __init__(self):
        self._draining = asyncio.Event()
        self._open_work: dict[str, int] = {}
        self._over = False

    async def ready(self) -> bool:
        return True

    async def start(self) -> None:
        self._draining.set()

    async def wait(self) -> None:
        await self._draining.wait()

    async def report(self, member: str, open_work: int) -> bool:
        """Record a replica's open work; False once the drain is over (stop reporting)."""
        self._open_work[member] = open_work
        return not self._over

    async def finish(self) -> None:
        self._over = True

    async def open_work(self) -> dict[str, int]:
        return dict(self._open_work)


def drain_signal(app_name: str):
    """The drain signal of `app_name` (created if missing), not yet started. It lives as long as the
    process that created it, on that process's node: placed anywhere, it died with a worker node and
    the drain of `refusion serve` after a node loss failed, cutting every stream."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # A signal process that dies (killed, OOM) is restarted in place, and calls to it are retried there:
    # the handles of this driver and of the waiting replicas stay valid (a restarted one is not draining).
    signal = DrainSignal.options(name=_drain_signal_name(app_name), namespace="serve", get_if_exists=True,
                                 scheduling_strategy=here, max_restarts=-1, max_task_retries=-1).remote()
    ray.get(signal.ready.remote())
    return signal


def signal_drain(app_name: str):
    """Start draining `app_name` now and return the signal (keep it alive until the app is shut down)."""
    signal = drain_signal(app_name)
    ray.get(signal.start.remote())
    return signal


@dataclass
class DrainOutcome:
    """What `drain_app` saw: true when `drained`; `members` running replicas when it began, `open_work`
    the last reports (replica -> work it still held), for saying who did not finish."""

    drained: bool
    members: int
    open_work: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.drained

    def holdouts(self) -> str:
        """Who kept the drain from completing, in words ("" when it completed)."""
        if self.drained:
            return ""
        busy = [f"{member} holds {work}" for member, work in sorted(self.open_work.items()) if work]
        return f"{len(self.open_work)} of {self.members} replicas reported" + (f"; {', '.join(busy)}" if busy else "")


def drain_app(app_name: str, signal, drain_timeout_s: float, give_up: threading.Event | None = None) -> DrainOutcome:
    """Drain `app_name` (steps in the module docstring); drained when every running replica reported no
    open work within drain_timeout_s + DRAIN_MARGIN_S (and before `give_up` was set). Removes the signal."""
    members = _running_replicas(app_name)
    try:
        ray.get(signal.start.remote())
    except ray.exceptions.RayActorError:  # gone after all: a new one (replicas look it up again by name)
        signal = signal_drain(app_name)
    deadline = time.monotonic() + drain_timeout_s + DRAIN_MARGIN_S
    open_work: dict[str, int] = {}
    try:
        while time.monotonic() < deadline and not (give_up is not None and give_up.is_set()):
            open_work = ray.get(signal.open_work.remote())
            if len(open_work) >= members and not any(open_work.values()):
                return DrainOutcome(True, members, open_work)
            time.sleep(DRAIN_REPORT_S)
        return DrainOutcome(False, members, open_work)
    finally:
        # Reports still coming when the signal is killed failed in the replicas and were retried without
        # end, each failure a raylet log line ("infinite retries remaining"): their loops stop first
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(signal.finish.remote(), timeout=DRAIN_REPORT_S * 10)
            time.sleep(DRAIN_REPORT_S * 3)
        ray.kill(signal)


def answering(app_name: str) -> bool:
    """Whether `app_name` answers requests: a running replica of each of its deployments. It does so
    before Ray Serve calls the application RUNNING, while more replicas still start or wait for room."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    return app is not None and bool(app.deployments) and all(
        d.replica_states.get("RUNNING", 0) > 0 for d in app.deployments.values())


def _running_replicas(app_name: str) -> int:
    from ray import serve

    deployments = serve.status().applications[app_name].deployments.values()
    return sum(count for d in deployments for state, count in d.replica_states.items() if state == "RUNNING")


def start_drain_watch(watch: Awaitable, replica: str) -> asyncio.Task:
    """Run a replica's drain watch (wait for the signal, drain, report) as a task whose failure is logged:
    a watch that died silently never reported, and the whole drain then ran into its timeout."""
    task = asyncio.ensure_future(watch)

    def logged(done: asyncio.Task) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("drain watch of %s failed: the drain will wait for it until its timeout", replica,
                      exc_info=done.exception())

    task.add_done_callback(logged)
    return task


async def wait_for_drain_signal(app_name: str):
    """Return the drain signal's handle once the application's drain has started (may never happen)."""
    while True:
        try:
            signal = await asyncio.to_thread(ray.get_actor, _drain_signal_name(app_name), namespace="serve")
            await signal.wait.remote()
            return signal
        except (ValueError, ray.exceptions.RayActorError):  # not created yet, or its creator has exited
            await asyncio.sleep(DRAIN_POLL_S)


async def report_final(signal, member: str, open_work: int, timeout_s: float = 2.0) -> None:
    """A replica's last report as it shuts down during a drain (best effort: the drain may be over and its
    signal gone). Without it a replica Ray stops mid-drain leaves the report it made while it still held
    work, and the drain waits for a replica that no longer exists until its timeout."""
    try:  # (not retried: the signal may be gone, and its failure would be logged at each retry)
        await asyncio.wait_for(signal.report.options(max_task_retries=0).remote(member, open_work), timeout_s)
    except (ray.exceptions.RayError, asyncio.TimeoutError):
        pass


async def report_open_work(signal, member: str, open_work: Callable[[], int]) -> None:
    """Report `open_work()` to the drain signal every DRAIN_REPORT_S until the drain is over (the signal
    says so, or is gone)."""
    while True:
        try:
            if not await signal.report.remote(member, open_work()):
                return  # the drain is over (drain_app is about to remove the signal)
        except ray.exceptions.RayError:
            return  # the drain is over: the signal was removed (or Ray is shutting down)
        await asyncio.sleep(DRAIN_REPORT_S)


def die_on_sigterm() -> bool:
    """Make SIGTERM end this replica process at once, as SIGKILL does (the kernel's default action), so
    Ray Serve sees it die and replaces it: its streams end with a typed retryable error (`engine_unavailable`,
    README "Readiness, failures and shutdown") and new requests wait for the replacement. Ray's worker
    handler instead raises SystemExit in the main thread, where the task loop runs in C++: a break-test's
    `kill <engine pid>` (what `kill`, systemd and Kubernetes send) froze the only engine replica for ~95 s,
    every stream stalled and /health 503, until Ray's health check gave up on it three times. A drain is
    the `refusion serve` process's job (its SIGTERM); a replica's own SIGTERM means it is being killed.
    Set through libc: replica constructors do not run on the main thread, where Python's `signal.signal`
    must be called. Returns False where libc has no `signal` (not Linux or macOS)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    except (OSError, AttributeError):
        return False
    return libc.signal(int(signal.SIGTERM), ctypes.c_void_p(0)) != ctypes.c_void_p(-1).value  # SIG_DFL is 0
