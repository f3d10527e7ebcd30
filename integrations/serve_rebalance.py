"""Queue rebalancing: waiting requests move from an engine replica with a queue to one with free slots.

Ray Serve routes a call once, when it is made. An engine replica takes up to max_ongoing_requests calls
(512 by default) and its engine queues what it cannot run yet, so the engine, not Ray, decides what runs
next (priorities, fair share, the overload answer). The price: a request routed to a busy replica stays
there. A burst that arrives before the autoscaler's new replica is up waits in the first replica's
queue while the new one idles (a second replica served nothing for 190 s while 28 requests waited in
the first: helper-144), and the prefix-affinity router keeps a hot key's requests on one replica.

Requests that have not started carry no state (no KV, no output), so moving one is re-sending it. Every
ingress replica runs a `Rebalancer` while one of its own streams has waited `ServeConfig.rebalance_after_s`
for a first answer; each `interval` it asks every live engine replica for its `load()` and, for each
replica with free slots, has the replica with the most movable requests release that many
(`EngineDeployment.release_waiting` -> `scheduler.engine.Engine.release_waiting`: first to start first,
only requests that never started, never the server's own). A released call ends with
`EngineFailure("moved", replica=<receiver>)` before any output; the ingress streaming it (whichever
ingress replica that is) sends it again, routed to the receiver first (`prefer=`; serve_router), and a
request moved once is not moved again. The client sees only the shorter wait.

This is the work stealing of a distributed task scheduler, restricted to queued work; it needs no
shared state beyond the load answers. Ingress replicas balance independently, so two may send the same
receiver its free slots' worth each: the extra requests queue there (and do not move again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 2.0  # a replica that does not answer load() or release_waiting() in this long is left out


@dataclass(frozen=True)
class ReplicaLoad:
    """One engine replica's answer to `load()`: `room` free running slots (max_running - running -
    waiting, at least 0), `movable` waiting requests it may release (never started, and only those past
    its running slots: running + waiting - max_running at most); both 0 while it drains. So a replica
    with free slots has nothing movable."""

    replica: str
    room: int
    movable: int


@dataclass(frozen=True)
class Move:
    """Release up to `count` waiting requests of replica `source` to start on replica `target`."""

    source: str
    target: str
    count: int


def plan_moves(loads: list[ReplicaLoad]) -> list[Move]:
    """Pair replicas with free slots with replicas holding movable requests: the most free slots take
    from the most movable requests first, each move as large as both allow (a replica is never both:
    ReplicaLoad). Deterministic: ties go by replica id."""
    takers = sorted(((l.room, l.replica) for l in loads if l.room > 0 and l.movable == 0), key=lambda t: (-t[0], t[1]))
    givers = sorted(([l.movable, l.replica] for l in loads if l.movable > 0), key=lambda t: (-t[0], t[1]))
    moves = []
    for room, target in takers:
        while room > 0 and givers and givers[0][0] > 0:
            give = givers[0]
            count = min(room, give[0])
            moves.append(Move(give[1], target, count))
            room -= count
            give[0] -= count
            givers.sort(key=lambda t: (-t[0], t[1]))
    return moves


class Rebalancer:
    """One ingress replica's rebalancing loop (module docstring).

    waiting_s(): how long this ingress's oldest stream has waited for its first answer (0 if none);
    replicas(): the live engine replica ids; call(method, replica, **kwargs): a call routed to exactly
    that replica (ServeEngineClient._call with replica=).
    """

    def __init__(self, after_s: float, waiting_s: Callable[[], float], replicas: Callable[[], tuple[str, ...]],
                 call, interval_s: float | None = None):
        self.after_s = after_s
        self.interval_s = interval_s if interval_s is not None else max(0.05, min(1.0, after_s / 2))
        self._waiting_s, self._replicas, self._call = waiting_s, replicas, call
        self.moved = 0  # requests released on this ingress's asking
        self.ticks = 0  # times the loop has looked whether to run a round

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.ticks += 1
            try:
                if self._waiting_s() >= self.after_s and len(self._replicas()) > 1:
                    await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed round (a replica going away) is tried again next time
                log.warning("queue rebalancing round failed", exc_info=True)

    async def round(self) -> list[Move]:
        """Ask every live replica for its load, then have the givers release. Returns the moves made."""
        async def ask(replica: str) -> ReplicaLoad | None:
            try:
                return ReplicaLoad(**await asyncio.wait_for(self._call("load", replica), CALL_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - unreachable or going away: not part of this round
                return None

        loads = [l for l in await asyncio.gather(*(ask(r) for r in self._replicas())) if l is not None]
        moves = plan_moves(loads)
        if not moves:
            return []
        started = time.monotonic()
        released = await asyncio.gather(*(asyncio.wait_for(self._call("release_waiting", m.source, limit=m.count,
                                                                      to=m.target), CALL_TIMEOUT_S)
                                          for m in moves), return_exceptions=True)
        made = []
        for move, count in zip(moves, released):
            if isinstance(count, BaseException):
                log.warning("queue rebalancing: replica %s did not release: %s", move.source,
                            type(count).__name__ if isinstance(count, asyncio.TimeoutError) else count)
            elif count > 0:
                made.append(Move(move.source, move.target, count))
                self.moved += count
                log.info("queue rebalancing: %d waiting request(s) moved from replica %s to %s (%.3f s)",
                         count, move.source, move.target, time.monotonic() - started)
        return made
