"""`refusion serve`: start the Ray Serve application (OpenAI API, editor protocol, /metrics).

    refusion serve [--model DIR] [--served-model-name NAME ...] [--api-key KEY] [--max-num-seqs N]
                   [--max-model-len N] [--dtype D] [--host H] [--port P] [--replicas N | --autoscale MIN:MAX]
                   [--config FILE] [--address RAY_ADDRESS]

Without --address (or RAY_ADDRESS, which Ray's own tools read too) a local Ray instance is started (no
dashboard, listening on 127.0.0.1: integrations/serve_ray.py); with it the app is deployed on that
cluster. --config reads a Ray Serve config file
(config/serve.yaml: `applications[0].args` and `.deployments`, `http_options`, `proxy_location`), as
`serve deploy` does, or a bare mapping of ServeConfig fields; flags override the file
(integrations/serve_config_file.py). Engine replicas ask for one GPU when the cluster has GPUs and the
config does not say otherwise.

Ctrl-C or SIGTERM drains, then shuts down (integrations/serve_drain.py): new requests get 503 +
Retry-After, running ones get drain_timeout_s to finish and the rest end with a clean error (a last SSE
`data:` line holding the error, an editor error answer); Ray Serve is shut down only when nothing is left open (or after
drain_timeout_s plus a margin). Once it has exited, connections are refused (exit status 0). A second Ctrl-C
stops at once, dropping open streams, and exits with 130.
With a local Ray, replicas it has no CPUs, GPUs or custom resources for are refused before any starts
(integrations/serve_preflight.py: room_problem, exit 2), and runner settings that need CUDA (device cuda,
cuda_graphs, paged attention) on a machine without it before Ray starts. While the application is still starting, Ctrl-C
or SIGTERM removes it and exits with 130, unless
its replicas up already answer requests (others waiting for room on a cluster): then they are drained
as above; a deploy Ray reports as failed exits with 1 (integrations/serve_start.py). On Linux with a
local Ray this runs under a supervisor process that forwards the signals
(integrations/serve_supervisor.py), so a signal to the process group drains as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from integrations.engine_host import RUNNER_DTYPES
from integrations.serve_config import DEFAULT_MODEL
from integrations.serve_config_file import CLIError, ConfigFile, merged_config
from integrations.serve_deployments import ENGINE_DEPLOYMENT
from integrations.serve_preflight import (check_bindable, check_reachable, checked_setup, port_number, reserve_gpu,
                                          room_problem)
from integrations.serve_ray import address_from_env, local_ray_on_loopback, start_ray, start_serve

# Names tests and other modules import from here (their homes: serve_preflight, serve_ray, serve_config_file)
__all__ = ["CLIError", "add_arguments", "address_from_env", "check_bindable", "check_reachable", "http_url",
           "merged_config", "room_problem", "run", "start_ray"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"model directory (default: {DEFAULT_MODEL.relative_to(DEFAULT_MODEL.parents[1])})")
    parser.add_argument("--served-model-name", nargs="+", metavar="NAME",
                        help="the model id(s) clients use, as vLLM's: answers carry the first, requests may name "
                             "any (default: the model directory's name)")
    parser.add_argument("--api-key", action="append", metavar="KEY",
                        help="a Bearer key clients must send (vLLM's flag; repeat for more; REFUSION_API_KEYS, REFUSION_API_KEY and the "
                             "config's api_keys add more)")
    parser.add_argument("--max-num-seqs", type=int, metavar="N",
                        help="requests each engine replica decodes at once (vLLM's name; engine max_running)")
    parser.add_argument("--max-model-len", type=int, metavar="N",
                        help="context served, in tokens (vLLM's flag): at most the model's; set it to what the "
                             "KV cache holds when that is less (a replica logs it at start)")
    parser.add_argument("--log-level", type=str.lower, choices=("debug", "info", "warning", "error"),
                        help="the replicas' own log lines (default info; debug adds each routing decision)")
    parser.add_argument("--dtype", choices=RUNNER_DTYPES,
                        help="weights dtype (default: float32 on CPU, bfloat16 on CUDA; runner dtype)")
    parser.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1, or the config's http_options)")
    parser.add_argument("--port", type=port_number, default=None, help="HTTP port, 1-65535 (default 8000)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of engine replicas")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale engine replicas between MIN and MAX")
    parser.add_argument("--config", type=Path, help="Ray Serve config YAML (see config/serve.yaml)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of a local Ray")


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: stopped before the application was ready, or a drain cut short


def http_url(host: str, port: int, tls: bool = False) -> str:
    """The service's URL: an IPv6 host in brackets (RFC 3986 section 3.2.2: http://[::1]:8000); https
    when `tls` (http_options.ssl_certfile)."""
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class _StopSignals:
    """SIGINT and SIGTERM: the first drains (`stop`), a second one stops without waiting (`stop_now`)."""

    def __init__(self) -> None:
        self.stop, self.stop_now = threading.Event(), threading.Event()

    def on_signal(self, *_) -> None:
        (self.stop_now if self.stop.is_set() else self.stop).set()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)


@dataclass
class _Progress:
    """How far run() got, which decides what its shutdown does."""
    serving: bool = False  # Serve runs on the cluster
    ready: bool = False  # every replica came up
    cut: bool = False  # a second signal cut the drain


def run(args: argparse.Namespace) -> int:
    try:
        args.address_from = address_from_env(args)
    except CLIError as exc:
        print(f"refusion serve: {exc}", file=sys.stderr)
        return 2
    with local_ray_on_loopback(not args.address):  # before `ray` is imported: Ray reads it then
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """run's body, once the local Ray's listening address is set: check the setup, start, serve, drain."""
    import ray
    from ray import serve

    from integrations.serve_config import ServeConfig

    if args.address_from:
        print(f"refusion serve: joining the Ray cluster at {args.address} (RAY_ADDRESS, as Ray's tools read it; "
              "unset it for a local Ray)", flush=True)
    file = checked_setup(args)
    if file is None:
        return 2
    if not args.address and (problem := _no_cuda_problem(args, file)):  # (after ray.init it took ~16 s)
        print(f"refusion serve: {problem}", file=sys.stderr, flush=True)
        return 2
    signals = _StopSignals()
    signals.install()  # before Ray starts: a signal inside ray.init left its half-started agents running
    quiet = ServeConfig.model_validate(file.args).ray_logging()
    ray_level = logging.getLevelName(quiet["logging_config"]["log_level"]) if quiet else logging.INFO
    if quiet:  # this process's Ray and Serve lines follow --log-level as the replicas' do
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(ray_level)
    progress = _Progress()
    try:
        return _start_and_serve(args, file, signals, quiet, ray_level, progress)
    finally:
        # A local Ray goes with ray.shutdown; Serve's own shutdown there waits 30 s on replicas never placed,
        # and after a cut drain (a second signal: stop now) it took ~9 s more for streams already dropped.
        if progress.serving if args.address else progress.ready and not progress.cut:
            serve.shutdown()
        ray.shutdown()


def _start_and_serve(args: argparse.Namespace, file: ConfigFile, signals: _StopSignals, quiet: dict,
                     ray_level: int, progress: _Progress) -> int:
    """Start or join Ray, start Serve, then deploy, serve and drain (_deploy_and_drain); the exit status."""
    import ray
    from ray import serve

    config = file.args
    if not start_ray(ray, args.address, file.runtime_env, args.address_from or "--address", ray_level):
        return 2
    signals.install()  # again: Ray's core worker installs a SIGTERM handler of its own as it connects
    if signals.stop.is_set():
        print("refusion serve: stopped while Ray started", flush=True)
        return INTERRUPTED_EXIT_CODE
    reserve_gpu(config["engine_deployment"], ray.cluster_resources())
    if not args.address and (problem := _local_ray_problem(args, file, ray.cluster_resources())):
        print(f"refusion serve: {problem}", file=sys.stderr, flush=True)
        return 2
    progress.serving = True  # from here on Serve runs on the cluster
    try:
        start_serve(serve, file.http, file.proxy_location, quiet)
    except CLIError as exc:  # Serve was running before: leave it and its applications as they are
        progress.serving = False
        print(f"refusion serve: {exc}", file=sys.stderr)
        return 2
    return _deploy_and_drain(args, file, signals, progress)


def _local_ray_problem(args: argparse.Namespace, file: ConfigFile, resources: dict[str, float]) -> str | None:
    """Why a local Ray (`resources`: ray.cluster_resources()) cannot run the application: what it cannot
    place now it never will. None when it can."""
    from integrations.serve_app import starting_demand

    config = file.args
    where = ("--replicas" if args.replicas is not None else "--autoscale" if args.autoscale else
             f"--config {args.config}" if args.config else "the default settings")
    if problem := room_problem(starting_demand(config, file.deployments), resources, where):
        return problem
    if resources.get("GPU", 0) < 1:
        return _cpu_replica_problem(args, file, "this machine has no GPU that Ray sees")
    return None


# runtime_env keys that give the replicas a Python environment of their own (another torch, maybe with CUDA)
_OWN_PYTHON_KEYS = ("pip", "conda", "uv", "container", "image_uri", "py_executable")


def _no_cuda_problem(args: argparse.Namespace, file: ConfigFile) -> str | None:
    """Before a local Ray starts: the runner settings that need CUDA (_cpu_replica_problem) when torch here
    finds no CUDA device, as the replicas, run by this Python on this machine, will not either. Left to
    _local_ray_problem, once Ray says what it sees, when a runtime_env gives the replicas another Python
    environment or sets CUDA_VISIBLE_DEVICES."""
    import torch

    actor = ((file.deployments or {}).get(ENGINE_DEPLOYMENT) or {}).get("ray_actor_options") or {}
    for env in (file.runtime_env or {}, actor.get("runtime_env") or {}):
        if not isinstance(env, dict) or set(_OWN_PYTHON_KEYS) & set(env) \
                or "CUDA_VISIBLE_DEVICES" in (env.get("env_vars") or {}):
            return None
    if torch.cuda.is_available():
        return None
    return _cpu_replica_problem(args, file, "this machine has no GPU (torch finds no CUDA device)")


def _cpu_replica_problem(args: argparse.Namespace, file: ConfigFile, why: str) -> str | None:
    """Why engine replicas without a GPU (`why` says so, for the message) cannot run the runner settings:
    device cuda, or with no device (the runner's default is then the CPU) CUDA graphs, or paged attention
    without Triton's interpreter. Each failed every replica after Ray had started. None when they can."""
    runner = file.args.get("runner") or {}
    place = f"--config {args.config}: {file.args_path}runner" if args.config else "runner"
    device = str(runner.get("device") or "")
    if device.startswith("cuda"):  # (each replica failed)
        return f"{place}.device: {device}, but {why}; set cpu, or leave it unset (CUDA when there is one)"
    if device:  # (device cpu with CUDA graphs: refused when the config was read)
        return None
    # no device and no GPU: the replicas run on the CPU (ModelRunner's default), where these fail each one
    if runner.get("cuda_graphs") not in (None, False):
        return (f"{place}.cuda_graphs: needs a CUDA device, and {why}, so the replicas run on the CPU: remove "
                "cuda_graphs (or set it false)")
    env = {**os.environ, **((file.runtime_env or {}).get("env_vars") or {})}  # what a local Ray's replicas get
    if runner.get("attention") == "paged" and str(env.get("TRITON_INTERPRET", "")).lower() not in ("1", "true", "on"):
        return (f"{place}.attention: 'paged' runs on CUDA, and {why}, so the replicas run on the CPU, where it "
                "needs Triton's interpreter (TRITON_INTERPRET=1 in runtime_env.env_vars): use attention 'sdpa'")
    return None


def _deploy_and_drain(args: argparse.Namespace, file: ConfigFile, signals: _StopSignals, progress: _Progress) -> int:
    """Deploy the application, serve until the first signal, then drain; the exit status."""
    from ray.serve import api as serve_api

    from integrations.serve_app import application
    from integrations.serve_config import ServeConfig
    from integrations.serve_drain import answering, drain_app, drain_signal
    from integrations.serve_start import DeployError, deploy, serve_status

    config, http = file.args, file.http
    drain = drain_signal("refusion")  # before the replicas: draining then costs one call, no actor start
    app = application(config, file.deployments)
    try:
        # serve.run's own wait blocks signals; the submission without it is Ray's private _run
        submit = lambda: serve_api._run(app, _blocking=False, name="refusion", route_prefix="/")  # noqa: E731
        progress.ready = deploy(submit, lambda: serve_status("refusion"), signals.stop,
                                notice=lambda text: print(f"refusion serve: {text}", flush=True))
    except DeployError as exc:
        print(f"refusion serve: the application failed to deploy: {exc} (Ray's log above says why)",
              file=sys.stderr, flush=True)
        return 1
    if not progress.ready and not answering("refusion"):
        print("refusion serve: stopped before the application was ready; removing it"
              + (" (up to 30 s)" if args.address else ""), flush=True)
        return INTERRUPTED_EXIT_CODE
    if progress.ready and not signals.stop.is_set():
        url = http_url(http["host"], http["port"], tls=bool(http.get("ssl_certfile")))
        print(f"refusion serve: ready at {url} (Ctrl-C to stop)", flush=True)
        signals.stop.wait()
    elif progress.ready:  # the stop came as the last replica came up: "ready at" was followed by the drain at once
        print("refusion serve: stopped as every replica came up; they are drained", flush=True)
    else:  # replicas up already answer requests (others still wait for room): their streams are drained
        print("refusion serve: stopped before every replica was up; the replicas running serve requests, "
              "so they are drained", flush=True)
    drain_s = ServeConfig.model_validate(config).drain_timeout_s
    print(f"refusion serve: draining: running requests get up to {drain_s:g} s (Ctrl-C again: stop now)", flush=True)
    began = time.monotonic()
    drained = drain_app("refusion", drain, drain_s, give_up=signals.stop_now)
    progress.cut = signals.stop_now.is_set() and not drained
    outcome = "drain cut short" if progress.cut else f"drain incomplete ({drained.holdouts()})" if not drained else \
        "drained" if time.monotonic() - began < drain_s else \
        f"drained (after {drain_s:g} s, requests still running were ended with an error)"
    print(f"refusion serve: {outcome}; shutting down", flush=True)
    # A second signal cut the drain (open streams were dropped): not a clean stop, as Ctrl-C's 130 says.
    # A drain that ran out of drain_timeout_s ended every stream with an error event: a clean stop.
    return INTERRUPTED_EXIT_CODE if progress.cut else 0
