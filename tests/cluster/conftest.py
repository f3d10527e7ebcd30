"""Fixture `cluster`: the two-node Ray cluster of tests/cluster/ray_cluster.py, once per module (one
module uses it; torn down when it ends, so the rest of the suite does not share the 2 cores with an idle
cluster)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from ports import free_ports
from ray_cluster import BIN, NODE_PORTS, Cluster, start_node, wait_nodes


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """Head + node-b, started with `ray start --block`; torn down by killing both nodes' processes."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the `ray` CLI is not installed in this environment")
    work = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs_port, dashboard_port, client_port, http_port = free_ports(4)
    c = Cluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", http_port, tiny_model_dir, work)
    c.nodes["head"] = start_node(
        ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port), "--num-cpus", "1",
         "--resources", json.dumps({"refusion_head": 1}), "--node-name", "head", "--temp-dir", str(work / "ray"),
         *NODE_PORTS], work / "head.log")
    joined = False
    try:
        try:
            wait_nodes(c.gcs_address, 1, log_path=work / "head.log")
        except AssertionError as exc:
            pytest.skip(f"Ray cannot start a head node here: {exc}")
        c.nodes["node-b"] = start_node(
            ["--address", c.gcs_address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--node-name", "node-b",
             *NODE_PORTS], work / "node-b.log")
        wait_nodes(c.gcs_address, 2, log_path=work / "node-b.log")
        joined = True
        yield c
    finally:
        for name in list(c.nodes):
            try:
                c.stop_node(name)
            except Exception as exc:  # the other node must still go
                print(f"cluster teardown: {name}: {exc!r}")
        if joined:  # else the nodes' logs stay for a look (their path is in the failure)
            shutil.rmtree(work, ignore_errors=True)


