"""Fixture `cluster`: the two-node Ray cluster of tests/cluster/ray_cluster.py, once per session."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from ray_cluster import BIN, Cluster, free_port, node_ports, start_node, wait_nodes


@pytest.fixture(scope="session")
def cluster(tiny_model_dir):
    """Head + node-b, started with `ray start --block`; torn down by killing both nodes' processes."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the `ray` CLI is not installed in this environment")
    work = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs_port, dashboard_port = free_port(), free_port()
    c = Cluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", free_port(), tiny_model_dir, work)
    c.nodes["head"] = start_node(
        ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port()), "--num-cpus", "1",
         "--resources", json.dumps({"refusion_head": 1}), "--node-name", "head", "--temp-dir", str(work / "ray"),
         *node_ports()], work / "head.log")
    try:
        try:
            wait_nodes(c.gcs_address, 1)
        except AssertionError as exc:
            pytest.skip(f"Ray cannot start a head node here: {exc}; see {work / 'head.log'}")
        c.nodes["node-b"] = start_node(
            ["--address", c.gcs_address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--node-name", "node-b",
             *node_ports()], work / "node-b.log")
        wait_nodes(c.gcs_address, 2)
        yield c
    finally:
        for name in list(c.nodes):
            try:
                c.stop_node(name)
            except Exception as exc:  # the other node must still go
                print(f"cluster teardown: {name}: {exc!r}")
        shutil.rmtree(work, ignore_errors=True)


