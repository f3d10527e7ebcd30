"""Draining a Ray Serve application before it is shut down, so no running request is cut.

    drained = drain_app("refusion", drain_timeout_s=20)   # refusion serve, on Ctrl-C / SIGTERM
    serve.shutdown()                                      # only now: it kills the HTTP proxy first

Ray Serve's own shutdown kills the HTTP proxy at once, severing every open stream. Draining first:

1. `signal_drain` creates a named actor, the drain signal; every replica of the application polls for
   it (`wait_for_drain_signal`, every DRAIN_POLL_S).
2. On seeing it, an ingress replica refuses new requests (503 + Retry-After, integrations/ingress_gate.py)
   and an engine replica stops admitting, lets running requests finish for drain_timeout_s and ends the
   rest with a clean error (`scheduler.engine.Engine.stop`): an SSE `error` event, an editor error.
3. Each replica then reports the work it still holds to the signal (`report_open_work`): an ingress its
   HTTP requests not yet fully answered, an engine 1 until its engine has stopped.
4. `drain_app` returns once every running replica has reported and none holds work (True), or when the
   drain timeout plus a margin has passed or `give_up` is set (False).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import ray

DRAIN_POLL_S = 0.5  # how often replicas look for the drain signal
DRAIN_REPORT_S = 0.1  # how often a draining replica reports, and the caller reads the reports
DRAIN_MARGIN_S = 5.0  # beyond drain_timeout_s: noticing the signal, ending cancelled streams, reporting
DRAIN_RETRY_AFTER_S = 5  # Retry-After of requests refused while draining


def _drain_signal_name(app_name: str) -> str:
    return f"refusion-drain:{app_name}"


@ray.remote(num_cpus=0)
class DrainSignal:
    """Exists while an application drains (a named actor: its existence is the signal). Draining
    replicas report the work they still hold."""

    def __init__(self):
        self._open_work: dict[str, int] = {}

    def ready(self) -> bool:
        return True

    def report(self, member: str, open_work: int) -> None:
        self._open_work[member] = open_work

    def open_work(self) -> dict[str, int]:
        return dict(self._open_work)


def signal_drain(app_name: str):
    """Tell every replica of `app_name` to drain now. Keep the returned handle alive until the
    application is shut down (the signal lives as long as the actor)."""
    signal = DrainSignal.options(name=_drain_signal_name(app_name), namespace="serve").remote()
    ray.get(signal.ready.remote())
    return signal


def drain_app(app_name: str, drain_timeout_s: float, give_up: threading.Event | None = None) -> bool:
    """Drain `app_name` (steps in the module docstring); True when every replica reported no open work
    within drain_timeout_s + DRAIN_MARGIN_S (and before `give_up` was set). The signal is removed after."""
    members = _running_replicas(app_name)
    signal = signal_drain(app_name)
    deadline = time.monotonic() + drain_timeout_s + DRAIN_MARGIN_S
    try:
        while time.monotonic() < deadline and not (give_up is not None and give_up.is_set()):
            open_work = ray.get(signal.open_work.remote())
            if len(open_work) >= members and not any(open_work.values()):
                return True
            time.sleep(DRAIN_REPORT_S)
        return False
    finally:
        ray.kill(signal)


def _running_replicas(app_name: str) -> int:
    from ray import serve

    deployments = serve.status().applications[app_name].deployments.values()
    return sum(count for d in deployments for state, count in d.replica_states.items() if state == "RUNNING")


async def wait_for_drain_signal(app_name: str):
    """The drain signal's actor handle, once `signal_drain` has created it (it may never come)."""
    while True:
        try:
            return await asyncio.to_thread(ray.get_actor, _drain_signal_name(app_name), namespace="serve")
        except ValueError:
            await asyncio.sleep(DRAIN_POLL_S)


async def report_open_work(signal, member: str, open_work: Callable[[], int]) -> None:
    """Report `open_work()` to the drain signal every DRAIN_REPORT_S until the signal is gone."""
    while True:
        try:
            await signal.report.remote(member, open_work())
        except ray.exceptions.RayError:
            return  # the drain is over: the signal was removed (or Ray is shutting down)
        await asyncio.sleep(DRAIN_REPORT_S)
