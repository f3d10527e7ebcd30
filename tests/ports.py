"""Ports for the servers tests start in other processes (Ray nodes, Serve's proxy, `refusion serve`)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now, drawn from below the kernel's ephemeral range and above Ray's worker
    ports (10002-19999). Every self-binding server (a Ray worker's or agent's, port 0) and every outgoing
    connection gets an ephemeral port, so none of them can take a port chosen here before its process
    binds it. A port found by binding port 0 and releasing it could be taken so (a Ray node then fails to
    start; the likely cause of the CI failure of 2026-12-02, tests/cluster's node-b never joining)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(20000, low))
    random.shuffle(candidates)
    chosen: list[int] = []
    held = []
    try:
        for port in candidates:
            if len(chosen) == count:
                return chosen
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)  # held until all are chosen: the ports are distinct
            chosen.append(port)
        if len(chosen) == count:
            return chosen
    finally:
        for s in held:
            s.close()
    raise RuntimeError(f"fewer than {count} free ports between 20000 and {low}")


def free_port() -> int:
    return free_ports(1)[0]
