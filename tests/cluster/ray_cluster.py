"""A real multi-process Ray cluster on this machine, started with Ray's own CLI (fixture `cluster` in
tests/cluster/conftest.py, once per test session).

    ray start --head --node-name head   --num-cpus 1 --resources '{"refusion_head": 1}' --block
    ray start --address HEAD            --node-name node-b --num-cpus 1 --block

Two raylets (two nodes), each with its own worker processes; the engine deployment asks for one CPU
per replica, so two replicas sit on the two nodes. Ports: every node's own servers bind a port of the
kernel's choosing (port 0; the dashboard agent's default is a fixed port, which two nodes on one host
would both take). The few ports a client must know in advance (GCS, dashboard, Ray client, Serve's HTTP
proxy) come from `free_ports`, outside the range the kernel hands to those self-binding servers, so no
Ray process can take one between choosing it and binding it. The test process never joins the
cluster (it may already hold the local Ray of tests/integrations): it deploys with `serve deploy` and
`refusion serve --address`, talks HTTP to Serve's proxy, and reads placement from /metrics.
The model is the random tiny model: greedy decoding of it never meets EOS, so a stream lasts exactly
max_tokens tokens, long enough to still be running when a node is stopped or a replica drained.

Skipped, with the reason, only when the `ray` CLI cannot start a head node here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's token authentication (on by default for `ray start`): every process of the cluster and every
    # client (ray.init, `serve deploy`, `refusion serve --address`) presents the same token.
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(16),
    "OMP_NUM_THREADS": "1",
    # A loaded 2-core machine starts Serve's proxy and replicas slowly (tests/integrations/conftest.py).
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}


# Every other server of a node binds port 0 by default (Ray >= 2.5x: "components self-bind").
NODE_PORTS = ["--dashboard-agent-listen-port", "0"]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


@dataclass
class Cluster:
    """Addresses of the running cluster and the processes that hold its nodes."""

    gcs_address: str
    dashboard_url: str
    http_port: int
    model_dir: Path
    work_dir: Path
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def app_config(self, deployments: list[dict] | None = None, engine: dict | None = None, args: dict | None = None,
                   **engine_deployment) -> dict:
        """A Serve config file (the shape of config/serve.yaml) for this cluster: the proxy on the head
        only (both nodes share one host and one port), the ingress pinned to the head node, one CPU per
        engine replica. `deployments`: Ray's per-deployment overrides (replica counts, as
        config/serve.yaml sets them); `engine`: EngineConfig settings over the ones below; `args`: other
        ServeConfig settings."""
        # Health probes are real one-token requests: rare here, so per-replica request counts move only
        # with the tests' own traffic (node loss is noticed from the actor's death, not from probes).
        deployment = {"num_cpus": 1, "torch_threads": 1, "health_check_period_s": 600, "health_check_timeout_s": 30,
                      "graceful_shutdown_timeout_s": 60, **engine_deployment}
        return {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "applications": [{
                "name": "refusion", "route_prefix": "/", "import_path": "integrations.serve_app:build_app",
                "args": {
                    "model": str(self.model_dir),
                    "runner": {"num_blocks": 1024},
                    "engine": {"max_running": 16, "max_queue": 64, "token_budget": 256, "routing": {"calibrate": False},
                               **(engine or {})},
                    "engine_deployment": deployment,
                    "ingress": {"resources": {"refusion_head": 0.01}},
                    "drain_timeout_s": 50,
                    "health_probe_timeout_s": 20,
                    **(args or {}),
                },
                **({"deployments": deployments} if deployments else {}),
            }],
        }

    def write_config(self, config: dict, name: str) -> Path:
        path = self.work_dir / name
        path.write_text(yaml.safe_dump(config))
        return path

    def serve_deploy(self, config: dict, name: str = "serve.yaml") -> None:
        """`serve deploy FILE --address DASHBOARD`: Ray's own CLI, as docs/cluster.md shows it."""
        path = self.write_config(config, name)
        subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard_url],
                       check=True, env=ENV, timeout=120, capture_output=True)

    def serve_details(self) -> dict:
        """Serve's REST API: the instance's applications (with per-deployment replica states) and proxies."""
        request = urllib.request.Request(self.dashboard_url + "/api/serve/applications/",
                                         headers={"Authorization": f"Bearer {ENV['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def serve_application(self) -> dict | None:
        return self.serve_details().get("applications", {}).get("refusion")

    def serve_proxies(self) -> dict:
        """{node id: proxy details} of Serve's HTTP proxies."""
        return self.serve_details().get("proxies") or {}

    def replicas_settled(self, deployment: str = "RefusionEngine") -> set[str] | None:
        """A deployment's replica ids when the application has settled on its latest config (application
        RUNNING, every replica of the deployment RUNNING: no old version still stopping, none starting),
        else None. Right after `serve deploy` the application is DEPLOYING until the new config's
        replicas replaced the old ones, so a replica seen then may be one that is about to go."""
        app = self.serve_application()
        if not app or app.get("status") != "RUNNING":
            return None
        states = [(r["replica_id"], r["state"]) for r in app["deployments"].get(deployment, {}).get("replicas", [])]
        if not states or any(state != "RUNNING" for _, state in states):
            return None
        return {replica_id.split("#")[-1] for replica_id, _ in states}

    def engine_replicas_settled(self) -> set[str] | None:
        return self.replicas_settled("RefusionEngine")

    def stop_node(self, name: str) -> None:
        """Node loss: every process of that node dies at once (SIGKILL), as when a machine goes away."""
        proc = self.nodes.pop(name)
        for _ in range(3):  # again: a raylet may fork a worker between listing and killing
            for pid in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the node's own session: strays that lost their parent
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def node_processes(self, name: str, title: str) -> list[int]:
        """Processes of node `name` whose command line contains `title` (e.g. a replica's actor name)."""
        return [pid for pid in descendants(self.nodes[name].pid) if title in cmdline(pid)]


def start_node(args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def wait_nodes(gcs_address: str, count: int, timeout_s: float = 180.0, log_path: Path | None = None) -> list[dict]:
    """The cluster's live nodes once there are `count` of them; AssertionError after `timeout_s`, with the
    tail of `log_path` (the `ray start` output of the node waited for) in the message."""
    code = ("import json, ray, time\n"
            f"ray.init(address={gcs_address!r}, logging_level='ERROR', log_to_driver=False)\n"
            f"deadline = time.time() + {timeout_s}\n"
            f"while len([n for n in ray.nodes() if n['Alive']]) < {count} and time.time() < deadline:\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps([{'name': n.get('NodeName'), 'alive': n['Alive'], 'resources': n['Resources']} for n in ray.nodes()]))\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=timeout_s + 60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"no answer from the cluster at {gcs_address} within {timeout_s + 60:.0f} s") from exc
    nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
    alive = [n for n in nodes if n["alive"]]
    log = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
    assert len(alive) >= count, (f"cluster has {len(alive)} live nodes, wanted {count}: {out.stderr[-600:]}"
                                 + (f"\n--- {log_path}:\n{log}" if log_path else ""))
    return alive


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll `predicate()` until it returns a truthy value (returned) or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError as exc:  # the proxy or app is still starting
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}")
