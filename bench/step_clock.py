"""The engine's step clock for bench scripts: when each forward started, read on the host."""

from __future__ import annotations

import time


def clock_steps(engine) -> list[float]:
    """Wrap `engine.runner.execute` so that each step's start (time.perf_counter(), seconds) is appended to
    the list returned; the gaps between consecutive starts are the engine's step times (host work and
    forward together). Clear the list between measured rounds."""
    starts: list[float] = []
    execute = engine.runner.execute

    def timed_execute(segments, tables):
        starts.append(time.perf_counter())
        return execute(segments, tables)

    engine.runner.execute = timed_execute
    return starts
