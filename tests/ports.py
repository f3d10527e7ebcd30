"""Ports for the servers tests start (Ray nodes, Serve's proxy, `refusion serve`, uvicorn in a thread).

A server in this process takes its port from `server_socket` (bound at once, port 0: nothing else can
take it). A server in another process needs its port chosen in advance: `free_ports`, which two pytest
workers of one run never both hand out. A port nothing may answer on is `refused_port`.
"""

from __future__ import annotations

import os
import random
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FIRST = 20000  # above Ray's worker ports (10002-19999)
_handed_out: set[int] = set()  # by this process: a server may not have bound its port yet


def _span() -> range:
    """This process's share of the ports between FIRST and the kernel's ephemeral range: in a pytest-xdist
    run (PYTEST_XDIST_WORKER gwN of PYTEST_XDIST_WORKER_COUNT) worker N's slice, disjoint from the other
    workers', so no two workers can hand out one port; all of it in a serial run."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and workers.isdigit() and int(worker[2:]) < int(workers):
        size = (low - FIRST) // int(workers)
        start = FIRST + int(worker[2:]) * size
        return range(start, start + size)
    return range(FIRST, low)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now, for servers in other processes, drawn from this process's share
    (`_span`) below the kernel's ephemeral range and above Ray's worker ports (10002-19999). Every
    self-binding server (a Ray worker's or agent's, port 0) and every outgoing connection gets an
    ephemeral port, so none of them can take a port chosen here before its process binds it. A port found
    by binding port 0 and releasing it could be taken so (a Ray node then fails to start; the likely cause
    of the CI failure of 2026-12-02, tests/cluster's node-b never joining). The other pytest worker draws
    from a slice of its own, and this process never hands out a port twice (its server may still be
    starting), so between choosing and binding only a process outside the test run could take it."""
    span = _span()
    first = random.randrange(len(span))  # a random start: another test run on this machine rarely meets it
    chosen: list[int] = []
    held = []
    try:
        for i in range(len(span)):
            if len(chosen) == count:
                break
            port = span[(first + i) % len(span)]
            if port in _handed_out:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)  # held until all are chosen: the ports are distinct
            chosen.append(port)
    finally:
        for s in held:
            s.close()
    if len(chosen) < count:
        raise RuntimeError(f"fewer than {count} free ports in {span.start}-{span.stop - 1}")
    _handed_out.update(chosen)
    return chosen


def free_port() -> int:
    return free_ports(1)[0]


def server_socket(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a port of the kernel's choosing (port 0), for a server in this process to listen
    on (uvicorn's `sockets=`); the port is `getsockname()[1]`. Held from the start, it cannot be taken
    between choosing and listening."""
    sock = socket.socket()
    sock.bind((host, 0))
    return sock


@contextmanager
def refused_port() -> Iterator[int]:
    """A port every connection to is refused for the block's duration: bound (port 0) and never listened
    on, so no server can bind it meanwhile (a port merely free when chosen could be serving by the time a
    test connects, and the test would talk to that server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
