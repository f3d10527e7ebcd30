"""`refusion serve` as a real process on a free port, its log captured: vLLM's flags reach the service, a
cancel storm logs no error, an
engine replica killed (SIGKILL or SIGTERM) mid-stream ends every client with a typed error, and SIGTERM
(to the process group) drains running streams to their normal end before the server exits.

One server for the module (starting one costs ~15 s here); the tests run in file order and the last
one stops it. Each also runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets
import yaml
from test_editor_serve import SLOW, Conn, complete, ws_url
from test_serve_openai import _metric

from ports import free_port
from serve_testbed import ENGINE_DEPLOYMENT, RUNNER_OPTIONS, wait_healthy
from integrations.editor import protocol as rpc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DRAIN_TIMEOUT_S = 60  # generous: the streams below need a few seconds; the test waits on them, not on this
ENGINE = {"max_queue": 32, "token_budget": 256, "routing": {"calibrate": False}}  # max_running: the flag below
# Runs for seconds on the random tiny model; several side by side (3000 tokens would queue behind each
# other: the engine admits by KV estimate).
LONG = {"prompt": "while True:\n", "max_tokens": 1000, "stream": True, "mode": "ar", "temperature": 0}
WAIT_S = 180.0  # bound on every wait below
ALIAS = "refusion-alias"  # the server's second --served-model-name
ERROR_LINE = re.compile(r"Traceback|\bERROR\b|\[error|\bCRITICAL\b|Exception")


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def log_since(self, offset: int) -> str:
        return self.log.read_text(errors="replace")[offset:]

    def log_size(self) -> int:
        return len(self.log.read_text(errors="replace"))


def wait_for_line(proc: subprocess.Popen, log: Path, text: str) -> None:
    """Until `refusion serve`'s output holds `text` (fails if it exits or WAIT_S passes first)."""
    deadline = time.monotonic() + WAIT_S
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def wait_ready(proc: subprocess.Popen, log: Path) -> None:
    """Until `refusion serve` says it is ready (its deploy check, which can come after /health answers:
    a signal before it removes the application and exits 130, another outcome than a drain's)."""
    wait_for_line(proc, log, "refusion serve: ready at")


def start_serve(model_dir: Path, config: dict, workdir: Path, *flags: str,
                under: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int, Path]:
    """`refusion serve` on a free port with `config` as its --config file, output in workdir/serve.log
    (its own local Ray: RAY_ADDRESS unset). `under`: a command that runs it as its child (the serve
    command is appended to it). Returns (process, port, log)."""
    (workdir / "serve.yaml").write_text(yaml.safe_dump(config))
    port, log = free_port(), workdir / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*under, sys.executable, "-m", "integrations.cli", "serve", "--model", str(model_dir), "--port", str(port),
             "--config", str(workdir / "serve.yaml"), *flags],
            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group, as a shell job's: signalled as a group below
    return proc, port, log


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve-process")
    config = {"runner": dict(RUNNER_OPTIONS), "engine": ENGINE, "drain_timeout_s": DRAIN_TIMEOUT_S,
              "engine_deployment": {**ENGINE_DEPLOYMENT, "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S + 5}}
    proc, port, log = start_serve(tiny_model_dir, config, workdir, "--max-num-seqs", "32", "--served-model-name",
                                  tiny_model_dir.name, ALIAS)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        wait_ready(proc, log)
        yield Server(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)  # a second one: stop without draining
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _until(check, what: str, pause_s: float = 0.1, details=None):
    """Poll `check()` (async, truthy when done) for at most WAIT_S seconds: a bound for a loaded
    machine, not a speed target (a condition that holds returns at once). `details()`: what the failure
    message adds (the state that did not come right)."""
    deadline = time.monotonic() + WAIT_S
    while not (result := await check()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {WAIT_S} s waiting: {what}" + (f"\n{details()}" if details else ""))
        await asyncio.sleep(pause_s)
    return result


async def _engine(http: httpx.AsyncClient) -> dict:
    return (await http.get("/v1/engine")).json()["engine"]


def test_vllm_flags_reach_the_service(server, tiny_model_dir):
    """--max-num-seqs 32 (the engine's default is 64) and --served-model-name DIR ALIAS, as vLLM's flags."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/v1/engine").json()["request_limits"]["max_sequences"] == 32 + ENGINE["max_queue"]
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [tiny_model_dir.name, ALIAS]
        out = http.post("/v1/completions", json={"model": ALIAS, "prompt": "x", "max_tokens": 2, "mode": "ar"})
        assert out.status_code == 200 and out.json()["model"] == tiny_model_dir.name, out.text


def _listening_sockets(root_pid: int) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every TCP socket listening in root_pid's process tree (the
    supervisor, the server and its local Ray: GCS, raylet, agents, workers)."""
    import ray  # noqa: F401  (puts the psutil that Ray bundles on sys.path)
    import psutil

    root = psutil.Process(root_pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            name = proc.name()
            found += [(proc.pid, name, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
    return found


def _loopback(ip: str) -> bool:
    """127.0.0.1, ::1, or 127.0.0.1 as a dual-stack socket writes it (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_the_local_ray_listens_on_loopback_only(server):
    """`refusion serve`'s local Ray bound every interface (Ray's Linux default: the node IP is the machine's
    address): its GCS, raylet, object manager, agents, metrics and workers' gRPC ports were open to the
    network, beside an HTTP port on 127.0.0.1. Now each binds 127.0.0.1 (integrations/serve_ray.py,
    local_ray_on_loopback). Ray Serve binds each replica's own gRPC server to [::] whatever the node IP
    (ray/serve/_private/replica.py; token-authenticated): that one socket per replica process is left."""
    found = _listening_sockets(server.proc.pid)
    port = int(server.url.rsplit(":", 1)[1])
    assert any(p == port and _loopback(ip) for _, _, ip, p in found), found  # the tree was found
    exposed = [entry for entry in found if not _loopback(entry[2])]
    replica_pids = [pid for pid, name, _, _ in exposed if name.startswith("ray::ServeReplica")]
    others = [entry for entry in exposed if not entry[1].startswith("ray::ServeReplica")]
    assert not others and len(replica_pids) == len(set(replica_pids)), exposed


async def test_cancel_storm_logs_no_errors(server):
    """30 streams left mid-way, half on /v1/completions, half on llama.cpp's /completion: every one is
    cancelled in the engine and logged once, as a 499, and nothing is logged as an error. (/infill's
    499 is tests/integrations/test_ingress_gate.py's: its editor rules end a completion too soon to
    leave it mid-way here.) The streams ignore EOS, so only running to max_tokens (300) ends one by
    itself: one that a loaded machine let do so before its disconnect reached the server is logged
    once as a 200 of finish_reason length (CI once saw fewer than 30 lines of 499 after 180 s)."""
    offset = server.log_size()

    async def open_then_leave(http: httpx.AsyncClient, i: int) -> int:
        route, body = [  # 30 of them fit in the KV cache
            ("/v1/completions", {**LONG, "max_tokens": 300, "prompt": f"def f{i}(x):\n", "ignore_eos": True}),
            ("/completion", {"prompt": f"def f{i}(x):\n", "n_predict": 300, "stream": True, "mode": "ar",
                             "temperature": 0, "ignore_eos": True}),
        ][i % 2]
        async with http.stream("POST", route, json=body, headers={"X-Request-Id": f"storm-{i}"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break  # leave mid-stream: the server sees the client disconnect
            return response.status_code

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        statuses = await asyncio.gather(*(open_then_leave(http, i) for i in range(30)))
        assert statuses == [200] * 30
        await _until(lambda: _zero_running(http), "the engine to cancel every request")

    def storm_lines() -> dict[str, list[dict]]:
        lines: dict[str, list[dict]] = {}
        for line in server.log_since(offset).splitlines():
            start = line.find('{"request_id": "storm-')
            if start >= 0:  # (the JSON object only: what comes before it is skipped, as is any tail)
                entry = json.JSONDecoder().raw_decode(line, start)[0]
                lines.setdefault(entry["request_id"], []).append(entry)
        return lines

    async def all_logged():
        return len(storm_lines()) >= 30

    def request_lines() -> str:  # what was logged, should the wait fail
        lines = [line for line in server.log_since(offset).splitlines() if '"event": "request"' in line]
        return f"{len(lines)} request-log lines:\n" + "\n".join(lines)

    # Ray forwards replica logs with a lag
    await _until(all_logged, "a request-log line of each of the 30 streams", details=request_lines)
    lines = storm_lines()
    assert sorted(lines) == sorted(f"storm-{i}" for i in range(30)) and all(len(v) == 1 for v in lines.values())
    for rid, [entry] in lines.items():
        assert entry["status"] == 499 or (entry["status"] == 200 and entry["finish_reason"] == ["length"]), entry
        assert entry["endpoint"] == ("completions" if int(rid.split("-")[1]) % 2 == 0 else "completion"), entry
    assert sum(entry["status"] == 499 for [entry] in lines.values()) >= 1  # (the storm is of disconnects)
    errors = [line for line in server.log_since(offset).splitlines() if ERROR_LINE.search(line)]
    assert not errors, "\n".join(errors[:20])


async def _zero_running(http: httpx.AsyncClient) -> bool:
    engine = await _engine(http)
    return engine["running"] == 0 and engine["waiting"] == 0


def _internals(message: str, pid: int) -> list[str]:
    """Fragments of Ray's raw failure text that must never reach a client."""
    lowered = message.lower()
    return [f for f in ("actor", "pid", "192.", "127.0", "worker", "raylet", str(pid)) if f in lowered]


async def _read_stream(http: httpx.AsyncClient, body: dict, started: asyncio.Event) -> list[str]:
    lines = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
                started.set()
    return lines


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_replica_killed_mid_stream_ends_every_client_cleanly(server, kill):
    """SIGTERM (what `kill`, systemd and Kubernetes send) ends the replica as SIGKILL does: Ray's own
    worker handler froze it for ~95 s, every stream stalled, until Ray's health checks gave up on it."""
    await asyncio.to_thread(wait_healthy, server.url)  # after the kill before, its replacement must be up
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        pid = (await http.get("/v1/engine")).json()["pid"]
        async with websockets.connect(ws_url(server.url), max_size=None) as ws:
            started = [asyncio.Event(), asyncio.Event()]
            # Streams no EOS ends (min_tokens) that run until the kill: 1,000 tokens could end before the
            # editor completion started under CI's load, and three never ran together (CI, 2026-12-07)
            body = {**LONG, "max_tokens": 3000, "min_tokens": 3000, "max_time_ms": 600_000}
            streams = [asyncio.create_task(_read_stream(http, body, event)) for event in started]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), WAIT_S)
            editor = Conn(ws)
            await editor.request(1, "complete", complete(**SLOW))  # seconds, beside the two streams

            async def three_running():
                assert not any(s.done() for s in streams), "a stream ended before the kill"
                engine = await _engine(http)
                # the editor's connection is a client of its own beside the streams' anonymous one: `running`
                # alone also counts Ray Serve's health probe, which could stand in for the editor's (helper-221)
                return engine["running"] >= 3 and engine["clients"]["running"] >= 2

            await _until(three_running, "the two streams and the editor completion to run together", pause_s=0)
            os.kill(pid, kill)
            results = await asyncio.wait_for(asyncio.gather(*streams), WAIT_S)
            _, _, error, result = await editor.response(1)
        for lines in results:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            body = json.loads(lines[-2].removeprefix("data: "))["error"]
            assert (body["type"], body["code"]) == ("server_error", "engine_unavailable"), body
            assert not _internals(body["message"], pid), body
        assert result is None and error["code"] == rpc.ENGINE_UNAVAILABLE and error["data"]["retry_after_s"] > 0
        assert not _internals(error["message"], pid), error

        async def gauge_idle():
            return await asyncio.to_thread(_metric, server.url, "refusion_api_requests_in_flight") == 0

        await _until(gauge_idle, "every cut request to leave the in-flight gauge")


def test_sigterm_drains_running_streams(server):
    wait_healthy(server.url)  # after the replica kill above, its replacement must be up
    asyncio.run(_drain_under_sigterm(server))
    assert server.proc.wait(DRAIN_TIMEOUT_S + 60) == 0
    said = server.log.read_text(errors="replace")
    assert "refusion serve: drained; shutting down" in said  # in time, none ended
    # Ray Serve's notice on each submission to a running Serve, read as --host/--port dropped (helper-184)
    assert "will not be applied" not in said
    with pytest.raises(httpx.ConnectError):  # gone: connections are refused
        httpx.get(server.url + "/health", timeout=5)


async def _drain_under_sigterm(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=DRAIN_TIMEOUT_S + 30) as http:
        # Each must still run when the signal comes and end by itself within the drain: 3,000 tokens that
        # no EOS can cut short (min_tokens; 8 streams of 500 that could all ended before the signal under
        # CI's load, 2026-12-05), ended by max_time_ms at 30 s on the slowest machine (60 s of drain).
        # Two: the KV cache holds two such streams at once, not three.
        started = [asyncio.Event() for _ in range(2)]
        bodies = [{**LONG, "max_tokens": 3000, "min_tokens": 3000, "max_time_ms": 30_000, "prompt": f"def g{i}(x):\n"}
                  for i in range(2)]
        streams = [asyncio.create_task(_read_stream(http, body, event)) for body, event in zip(bodies, started)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), WAIT_S)

        async def both_running():
            return (await _engine(http))["running"] >= 2 or any(s.done() for s in streams)

        await _until(both_running, "the 2 streams to run", pause_s=0)
        assert not all(s.done() for s in streams), "every stream ended before the signal: make them longer"
        # To the process group, as `kill %1`, `kill -- -PGID` and GNU timeout send it: it also reached the
        # local Ray's GCS and raylet, which exited at once, so the drain never reached the replicas (they
        # answered on until Ray's 60 s GCS timeout cut every stream); serve_supervisor keeps Ray apart
        os.killpg(server.proc.pid, signal.SIGTERM)

        async def refused():  # until the ingress notices the drain, a new request is still served
            response = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "mode": "ar"})
            return response if response.status_code == 503 else None

        late = await _until(refused, "a request after SIGTERM to be refused")  # by the ingress or the engine
        assert int(late.headers["retry-after"]) >= 1 and "shutting down" in late.json()["error"]["message"]
        results = await asyncio.gather(*streams)
    for lines in results:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2].removeprefix("data: "))
        assert "error" not in last and last["choices"][0]["finish_reason"] in ("length", "stop"), last


def test_a_signal_while_a_replica_waits_for_room_removes_the_app_at_once(tiny_model_dir, tmp_path):
    """An engine replica the cluster can never place (in a break-test, more replicas than CPUs, which a
    local Ray now refuses at start, as a resource no node has; here placement bundles spread over two
    nodes, which the start-up check leaves to Ray): serve.run waited forever and `refusion serve` ignored Ctrl-C
    and SIGTERM until kill -9, leaving the application half-deployed. Now the first signal removes it
    (no replica of it serves) and exits 130."""
    config = {"applications": [{"name": "refusion", "route_prefix": "/", "import_path": "integrations.serve_app:build_app",
                                "args": {"runner": dict(RUNNER_OPTIONS), "engine": ENGINE, "drain_timeout_s": 1,
                                         "engine_deployment": {**ENGINE_DEPLOYMENT, "graceful_shutdown_timeout_s": 5}},
                                "deployments": [{"name": "RefusionEngine", "placement_group_strategy": "STRICT_SPREAD",
                                                 "placement_group_bundles": [{"CPU": 0.5}, {"CPU": 0.1}]}]}]}
    proc, port, log = start_serve(tiny_model_dir, config, tmp_path)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:  # the ingress answers (no engine yet): the deploy is under way, the engine unplaced
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
                if health.status_code == 503 and health.json().get("status") == "unavailable":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert "stopped before the application was ready" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def refused_at_start(model_dir: Path, config: dict, workdir: Path, *flags: str) -> str:
    """`refusion serve` that must exit 2 (a setting refused at start, before any replica): its output."""
    proc, _, log = start_serve(model_dir, config, workdir, *flags)
    try:
        assert proc.wait(WAIT_S) == 2, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text(errors="replace")


def test_replicas_a_local_ray_cannot_place_are_refused_before_serving(tiny_model_dir, tmp_path):
    """More engine replicas than the local Ray's CPUs (helper-184: --replicas 3 of 1 CPU on 2 CPUs): Ray
    Serve placed two and waited for the third forever, the service answered but `refusion serve` was never
    ready, and a SIGTERM then removed it, cutting its streams. A local Ray never grows: refused at start,
    naming the flag, what is needed and what fits, before any replica starts (exit 2, Ray shut down).
    At --log-level warning, Ray's own INFO lines in this process are left out too."""
    config = {"runner": dict(RUNNER_OPTIONS), "engine": ENGINE, "drain_timeout_s": 1,
              "engine_deployment": {**ENGINE_DEPLOYMENT, "num_cpus": 1000, "graceful_shutdown_timeout_s": 5}}
    said = refused_at_start(tiny_model_dir, config, tmp_path, "--replicas", "2", "--log-level", "warning")
    assert "refusion serve: --replicas: the replicas at start need 2000 CPUs (2 engine x 1000)" in said, said[-3000:]
    assert "start at most 0 engine replicas" in said and "Deploying" not in said and "ready at" not in said, said[-3000:]
    assert "Started a local Ray instance" not in said, said[-3000:]  # ray.init's INFO line follows --log-level


def test_a_cuda_runner_without_a_gpu_is_refused_before_serving(tiny_model_dir, tmp_path):
    """runner.device cuda on a local Ray without a GPU: each engine replica failed in Ray's log (six
    tracebacks, then "Failed to update the deployments"); refused at start, naming the setting, and
    before Ray starts (it was after ray.init, ~16 s)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the setting is valid here")
    config = {"runner": {**RUNNER_OPTIONS, "device": "cuda"}, "engine": ENGINE, "drain_timeout_s": 1,
              "engine_deployment": {**ENGINE_DEPLOYMENT, "graceful_shutdown_timeout_s": 5}}
    said = refused_at_start(tiny_model_dir, config, tmp_path)
    assert "runner.device: cuda, but this machine has no GPU (torch finds no CUDA device)" in said, said[-3000:]
    assert "Traceback" not in said and "Started a local Ray instance" not in said, said[-3000:]


def test_the_config_files_runtime_env_reaches_the_replicas(tiny_model_dir, tmp_path):
    """An application's `runtime_env` in the config file was ignored by `refusion serve` without a word
    (keys for `serve deploy` in the same file never reached the replicas); it is this job's runtime_env
    now, which Serve gives the application's replicas: REFUSION_API_KEYS set there guards the API."""
    config = {"applications": [{"name": "refusion", "route_prefix": "/", "import_path": "integrations.serve_app:build_app",
                                "runtime_env": {"env_vars": {"REFUSION_API_KEYS": "k-from-runtime-env"}},
                                "args": {"runner": dict(RUNNER_OPTIONS), "engine": ENGINE, "drain_timeout_s": 1,
                                         "engine_deployment": {**ENGINE_DEPLOYMENT, "graceful_shutdown_timeout_s": 5}}}]}
    proc, port, log = start_serve(tiny_model_dir, config, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, log)
        assert httpx.get(url + "/v1/models", timeout=WAIT_S).status_code == 401
        keyed = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k-from-runtime-env"}, timeout=WAIT_S)
        assert keyed.status_code == 200, keyed.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_signal_cuts_the_drain_and_exits_130(tiny_model_dir, tmp_path):
    """The second Ctrl-C stops at once, dropping open streams: it exited 0 like a full drain, which told a
    script or service manager nothing was lost. The engine replica is stopped (SIGSTOP) with the stream
    open, so the drain cannot end before the second signal: a stream of 1,000 tokens could (a random-order
    run of the suite, under load, exited 0 here)."""
    config = {"runner": dict(RUNNER_OPTIONS), "engine": ENGINE, "drain_timeout_s": DRAIN_TIMEOUT_S,
              "engine_deployment": {**ENGINE_DEPLOYMENT, "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S + 5}}
    proc, port, log = start_serve(tiny_model_dir, config, tmp_path)
    replica = None
    try:
        wait_ready(proc, log)  # /health answers up to a status poll before this
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as http:
            pid = http.get("/v1/engine").json()["pid"]
            stream = http.send(http.build_request("POST", "/v1/completions", json=LONG), stream=True)
            assert next(line for line in stream.iter_lines() if line.startswith("data: ")) != "data: [DONE]"
            os.kill(pid, signal.SIGSTOP)
            replica = pid
            proc.send_signal(signal.SIGTERM)
            wait_for_line(proc, log, "refusion serve: draining")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT_S) == 130
            try:
                stream.close()
            except httpx.HTTPError:
                pass
        assert "refusion serve: drain cut short; shutting down" in log.read_text(errors="replace")
    finally:
        if replica is not None:  # (stopped, it would outlive its Ray)
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# A parent that passes SIGTERM on to its child, as GNU make does to a recipe's command (`make serve`) and
# GNU timeout to its command; exits with the child's status. It relays once the group's own copy has been
# taken from the child's pending signals (/proc/PID/status), so that the child gets two SIGTERMs, not one
# the kernel merges: make relays within milliseconds, which under load can go either way.
RELAYER = """\
import os, signal, subprocess, sys, time

child = subprocess.Popen(sys.argv[1:])


def sigterm_pending(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    except OSError:
        return False
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in masks)


def relay(signum, _frame):
    deadline = time.monotonic() + 30
    while sigterm_pending(child.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(child.pid, signum)


signal.signal(signal.SIGTERM, relay)
code = child.wait()
sys.exit(code if code >= 0 else 128 - code)
"""


def test_a_group_sigterm_a_parent_relays_drains(tiny_model_dir, tmp_path):
    """A SIGTERM to a process group that also holds a parent passing SIGTERM on to `refusion serve` (GNU
    make running `make serve`, GNU timeout signalled from outside) reached it twice, and the second was
    "stop now": every open stream was cut (`drain cut short`, exit 130). The supervisor now takes the
    parent's copy and the group's own as one signal (serve_supervisor.relay_echoes), so it drains: the
    open stream ends normally and the status is 0. The engine replica is stopped (SIGSTOP) until both
    copies have been taken, so the stream is open whatever the machine's speed."""
    config = {"runner": dict(RUNNER_OPTIONS), "engine": ENGINE, "drain_timeout_s": DRAIN_TIMEOUT_S,
              "engine_deployment": {**ENGINE_DEPLOYMENT, "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S + 5}}
    proc, port, log = start_serve(tiny_model_dir, config, tmp_path, under=(sys.executable, "-c", RELAYER))
    replica = None
    try:
        wait_ready(proc, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as http:
            pid = http.get("/v1/engine").json()["pid"]
            body = {**LONG, "min_tokens": LONG["max_tokens"]}  # only its length ends it
            with http.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
                os.kill(pid, signal.SIGSTOP)
                replica = pid
                os.killpg(proc.pid, signal.SIGTERM)  # the relayer and the supervisor, as `kill -- -PGID`
                wait_for_line(proc, log, "refusion serve: draining")
                wait_for_line(proc, log, "taken as one (the parent passes the group's signal on)")
                os.kill(pid, signal.SIGCONT)
                replica = None
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        last = json.loads(rest[-2].removeprefix("data: "))
        assert "error" not in last and last["choices"][0]["finish_reason"] == "length", last
        assert proc.wait(WAIT_S) == 0, log.read_text(errors="replace")[-3000:]
        said = log.read_text(errors="replace")
        assert "refusion serve: drained; shutting down" in said and "drain cut short" not in said, said[-3000:]
    finally:
        if replica is not None:  # (stopped, it would outlive its Ray)
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the relayer and the supervisor: the server then drains
            proc.wait()
