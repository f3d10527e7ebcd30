"""Joining or starting the Ray cluster `refusion serve` runs on, and starting Serve's HTTP proxies where
the flags say (Ray keeps the options Serve first started with)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Iterator

from integrations.request_id_guard import PROXY_CALLBACK
from integrations.serve_config_file import CLIError

# Ray's switch between a Ray that other machines may join and one that only this machine reaches ("0" is
# its default on macOS and Windows). Ray reads it once, when `ray` is first imported. At "0" a local Ray's
# node IP is 127.0.0.1, and its GCS, raylet, object manager, workers' gRPC servers, agents and metrics
# servers bind 127.0.0.1 (they check for that IP); on Linux by default the node IP is the machine's
# address and they bind every interface. `_node_ip_address="127.0.0.1"` does not do it: ray.init swaps a
# loopback address for the machine's one. Serve replicas' own gRPC servers bind [::] regardless.
LOOPBACK_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def local_ray_on_loopback(local: bool) -> Iterator[None]:
    """For a local Ray (`local`), entered before `ray` is imported: every port it opens listens on
    127.0.0.1 only (as `refusion serve`'s HTTP port does by default), not on the network (an exposed Ray
    runs code sent to it). A value of LOOPBACK_ONLY_VARIABLE set already is kept ("1": Ray's Linux
    default). Once `ray` is imported, setting it changes nothing, so it is left unset (start_ray then
    warns). Ray's processes inherit it as they start; on exit it is taken out of this process's
    environment again, so that a caller in the same process (a test) does not pass it to a `ray start
    --address` of its own, which it would make refuse to join ("Multi-node Ray clusters are not
    supported")."""
    set_here = local and "ray" not in sys.modules and LOOPBACK_ONLY_VARIABLE not in os.environ
    if set_here:
        os.environ[LOOPBACK_ONLY_VARIABLE] = "0"
    try:
        yield
    finally:
        if set_here:
            os.environ.pop(LOOPBACK_ONLY_VARIABLE, None)


def address_from_env(args: argparse.Namespace) -> str | None:
    """Without --address, the cluster RAY_ADDRESS names, as Ray's own tools (`serve run`, `ray job`, ray.init)
    read it (set to "auto" in a Ray job's driver): it was ignored, and on a cluster node `refusion serve`
    started a Ray of its own without a word (helper-184). Sets args.address and returns the name to
    blame for it ("RAY_ADDRESS"), or None when the address is the flag's or there is none. "local" (from
    either) is ray.init's word for a new local Ray: no address, the local Ray's checks and set-up apply.
    An empty --address (`--address "$HEAD"` with HEAD unset) is a CLIError: it started a local Ray, or
    joined RAY_ADDRESS's cluster, without a word."""
    if args.address is not None and not args.address.strip():
        raise CLIError("--address: is empty; give the cluster's address (HOST:PORT, auto, ray://HOST:10001), "
                       "or leave --address out (or give local) for a local Ray")
    if args.address == "local":
        args.address = None
        return None
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if args.address or not env or env == "local":
        return None
    args.address = env
    return "RAY_ADDRESS"


def start_ray(ray, address: str | None, runtime_env: dict | None = None, where: str = "--address",
              logging_level: int = logging.INFO) -> bool:
    """Join the cluster at `address`, or start a local Ray (no dashboard); False, after saying why, when
    the cluster cannot be joined. The caller's SIGTERM handler stays in force meanwhile: ray.init sets one
    that exits at once (sys.exit inside ray.init), which left the agents it had started running.
    `runtime_env` (the config file's application `runtime_env`) is this job's: Serve gives it to the
    application's replicas as their default (serve.run's default_runtime_env), as `serve deploy` gives
    the application the one its file names. `logging_level` is ray.init's for this process's "ray"
    logger, which ray.init sets up again (at INFO, "Started a local Ray instance." at --log-level warning
    otherwise). A local Ray listens on 127.0.0.1 only when local_ray_on_loopback was entered before `ray` was
    imported (or Ray's platform default says so); otherwise, unless LOOPBACK_ONLY_VARIABLE=1 asked for it,
    this warns that it listens on every interface."""
    from ray._private import ray_constants
    from ray._private import utils as ray_utils

    set_handler = getattr(ray_utils, "set_sigterm_handler", None)
    if set_handler is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        if not address:
            # Ray's processes inherit this environment: its HTTP proxy keeps malformed X-Request-Ids out
            # of its access log and responses (integrations/request_id_guard.py), unless one is set already
            os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
            if ray_constants.ENABLE_RAY_CLUSTER and os.environ.get(LOOPBACK_ONLY_VARIABLE) != "1":
                print(f"refusion serve: warning: this local Ray listens on every interface (Ray was imported "
                      f"before {LOOPBACK_ONLY_VARIABLE}=0 could be set)", file=sys.stderr)
            ray.init(address="local", include_dashboard=False, runtime_env=runtime_env or None,
                     logging_level=logging_level)
            return True
        ray.init(address=address, runtime_env=runtime_env or None, logging_level=logging_level)
    except (ConnectionError, RuntimeError, ValueError) as exc:  # (ValueError: "Invalid address format")
        print(f"refusion serve: {where}: cannot join the Ray cluster at {address}: {exc}".splitlines()[0],
              file=sys.stderr)
        print("refusion serve: check the address; a cluster with token authentication also needs "
              "RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN in this shell (docs/cluster.md)", file=sys.stderr)
        return False
    finally:
        if set_handler is not None:
            ray_utils.set_sigterm_handler = set_handler
    return True


def check_serve_http(http: dict) -> None:
    """CLIError when Serve's proxies listen elsewhere than `http` asks: on a cluster where Serve already
    runs, Ray keeps the HTTP options it started with and ignores new ones with a warning in its log, and
    the application would be served where "ready at" did not say (helper-144)."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (http["host"], http["port"]):
        raise CLIError(f"--host/--port: Serve already runs on this cluster, its proxies on {running.host}:"
                       f"{running.port} (Ray fixes them when Serve starts); pass --host {running.host} --port "
                       f"{running.port}, or stop Serve there first (`serve shutdown`)")


def _drop_applied_options_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for Ray Serve's notice that new http_options "will not be applied", which
    it logs on every submission to a running Serve (helper-184: read as --host/--port being dropped)."""
    return "will not be applied" not in record.getMessage()


def start_serve(serve, http: dict, proxy_location: str | None, quiet: dict) -> None:
    """Start Serve's controller and proxies with `http` (http_options) and `proxy_location`, logging as
    the replicas do (`quiet`: ServeConfig.ray_logging()). CLIError when Serve already ran on the cluster
    with its proxies elsewhere (check_serve_http): Serve and its applications are then left as they are."""
    # Serve's controller and proxies log as the replicas do (ServeConfig.ray_logging: --log-level warning
    # drops their INFO lines too)
    serve.start(http_options=http, **({"proxy_location": proxy_location} if proxy_location else {}),
                **quiet)
    # serve.run's submission then says "New http_options ... will not be applied" whenever Serve runs,
    # though serve.start applied them just now (check_serve_http checks where the proxies listen)
    logging.getLogger("ray.serve").addFilter(_drop_applied_options_notice)
    check_serve_http(http)
