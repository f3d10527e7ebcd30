"""`refusion serve`: start the Ray Serve application (OpenAI API, editor protocol, /metrics).

    refusion serve [--model DIR] [--host H] [--port P] [--replicas N | --autoscale MIN:MAX]
                   [--config FILE] [--address RAY_ADDRESS]

Without --address a local Ray instance is started (no dashboard); with it the app is deployed on that
cluster. --config reads a Ray Serve config file (config/serve.yaml: `applications[0].args` and
`http_options`) or a bare mapping of ServeConfig fields; flags override the file. Engine replicas ask
for one GPU when the cluster has GPUs and the config does not say otherwise.

Ctrl-C or SIGTERM drains, then shuts down (integrations/serve_drain.py): new requests get 503 +
Retry-After, running ones get drain_timeout_s to finish and the rest end with a clean error (an SSE
`error` event, an editor error answer); Ray Serve is shut down only when nothing is left open (or after
drain_timeout_s plus a margin). Once it has exited, connections are refused. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from integrations.serve_config import DEFAULT_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"model directory (default: {DEFAULT_MODEL.relative_to(DEFAULT_MODEL.parents[1])})")
    parser.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1, or the config's http_options)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of engine replicas")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale engine replicas between MIN and MAX")
    parser.add_argument("--config", type=Path, help="Ray Serve config YAML (see config/serve.yaml)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of a local Ray")


class CLIError(ValueError):
    """A flag or config-file problem; the message names it and says what to change."""


def load_config_file(path: Path) -> tuple[dict, dict]:
    """(ServeConfig args, http_options) from a Serve config file or a bare args mapping."""
    import yaml

    if not path.is_file():
        raise CLIError(f"--config: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise CLIError(f"--config: {path} must hold a mapping")
    if "applications" in data:
        apps = data["applications"] or []
        if len(apps) != 1:
            raise CLIError(f"--config: {path} must define exactly one application, found {len(apps)}")
        return dict(apps[0].get("args") or {}), dict(data.get("http_options") or {})
    return data, {}


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise CLIError(f"--autoscale: expected MIN:MAX like 1:4, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise CLIError(f"--autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def merged_config(args: argparse.Namespace) -> tuple[dict, dict]:
    """(ServeConfig args, http_options) from the config file and the flags (flags win)."""
    config, http = load_config_file(args.config) if args.config else ({}, {})
    if args.model:
        config["model"] = args.model
    deployment = dict(config.get("engine_deployment") or {})
    if args.replicas is not None:
        if args.replicas < 1:
            raise CLIError(f"--replicas: must be >= 1, got {args.replicas}")
        deployment["num_replicas"] = args.replicas
        deployment.pop("autoscaling", None)
    if args.autoscale:
        low, high = parse_autoscale(args.autoscale)
        deployment["autoscaling"] = {**(deployment.get("autoscaling") or {}), "min_replicas": low, "max_replicas": high}
        deployment.pop("num_replicas", None)  # the flag replaces the file's fixed count
    config["engine_deployment"] = deployment
    http = {"host": args.host or http.get("host", "127.0.0.1"), "port": args.port or http.get("port", 8000)}
    return config, http


def run(args: argparse.Namespace) -> int:
    import ray
    from pydantic import ValidationError
    from ray import serve

    from integrations.serve_app import build_app
    from integrations.serve_config import ServeConfig
    from integrations.serve_drain import drain_app, drain_signal

    try:
        config, http = merged_config(args)
        build_app(config)  # validate before starting Ray
    except CLIError as exc:
        print(f"refusion serve: {exc}")
        return 2
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "config"
            print(f"refusion serve: {where}: {error['msg']}")
        return 2
    if args.address:
        try:
            ray.init(address=args.address)
        except (ConnectionError, RuntimeError) as exc:
            print(f"refusion serve: --address: cannot join the Ray cluster at {args.address}: {exc}".splitlines()[0])
            print("refusion serve: check the address; a cluster with token authentication also needs "
                  "RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN in this shell (docs/cluster.md)")
            return 2
    else:
        ray.init(address="local", include_dashboard=False)
    if "num_gpus" not in config["engine_deployment"] and ray.cluster_resources().get("GPU", 0) >= 1:
        config["engine_deployment"]["num_gpus"] = 1
    stop, stop_now = threading.Event(), threading.Event()

    def on_signal(*_):  # the first signal drains; a second one stops without waiting
        (stop_now if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options=http)
        drain = drain_signal("refusion")  # before the replicas: draining then costs one call, no actor start
        serve.run(build_app(config), name="refusion", route_prefix="/")
        print(f"refusion serve: ready at http://{http['host']}:{http['port']} (Ctrl-C to stop)", flush=True)
        stop.wait()
        drain_s = ServeConfig.model_validate(config).drain_timeout_s
        print(f"refusion serve: draining: running requests get up to {drain_s:g} s (Ctrl-C again: stop now)", flush=True)
        drained = drain_app("refusion", drain, drain_s, give_up=stop_now)
        print(f"refusion serve: {'drained' if drained else 'drain incomplete'}; shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
