"""The CPU clock the engine's budgets and cost estimates read: this thread's CPU time less its garbage
collections.

time.thread_time counts a collection in the thread that triggered it, whatever work it interrupted: a
full collection in a process with torch and Ray loaded takes up to ~150 ms (helper-233), and landing in
a timed grammar call it failed a valid request with a 400 (decoding/grammar.py's per-token budget), and
landing in a routed step it was charged to that step's decoder (scheduler/routing.py HostCost) and
swayed the router's choice between AR and ReFusion for ~50 steps. A collection is neither the grammar's
cost nor a decoder's.
"""

from __future__ import annotations

import gc
import threading
import time


class _GcTime(threading.local):
    """Per thread: CPU seconds its garbage collections took, and when the one under way started."""

    seconds = 0.0
    started: float | None = None


_GC_TIME = _GcTime()


def _count_gc(phase: str, _info: dict) -> None:
    """A gc.callbacks hook: CPython calls it in the collecting thread as a collection starts and stops."""
    if phase == "start":
        _GC_TIME.started = time.thread_time()
    elif _GC_TIME.started is not None:
        _GC_TIME.seconds += time.thread_time() - _GC_TIME.started
        _GC_TIME.started = None


gc.callbacks.append(_count_gc)


def cpu_time_without_gc() -> float:
    """Seconds: this thread's CPU time (time.thread_time) less the time its garbage collections took
    since this module was imported."""
    return time.thread_time() - _GC_TIME.seconds
