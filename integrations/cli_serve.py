"""`refusion serve`: start the Ray Serve application (OpenAI API, editor protocol, /metrics).

    refusion serve [--model DIR] [--served-model-name NAME ...] [--api-key KEY] [--max-num-seqs N]
                   [--max-model-len N] [--dtype D] [--host H] [--port P] [--replicas N | --autoscale MIN:MAX]
                   [--config FILE] [--address RAY_ADDRESS]

Without --address (or RAY_ADDRESS, which Ray's own tools read too) a local Ray instance is started (no
dashboard); with it the app is deployed on that cluster. --config reads a Ray Serve config file
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
(room_problem, exit 2). While the application is still starting, Ctrl-C or SIGTERM removes it and exits with 130, unless
its replicas up already answer requests (others waiting for room on a cluster): then they are drained
as above; a deploy Ray reports as failed exits with 1 (integrations/serve_start.py). On Linux with a
local Ray this runs under a supervisor process that forwards the signals
(integrations/serve_supervisor.py), so a signal to the process group drains as well.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from integrations.engine_host import RUNNER_DTYPES
from integrations.request_id_guard import PROXY_CALLBACK
from integrations.serve_config import DEFAULT_MODEL
from integrations.serve_config_file import CLIError, ConfigFile, merged_config


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
                        help="context served, in tokens (vLLM's flag): at most the model's; below what the KV cache holds")
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


def port_number(text: str) -> int:
    """argparse type of --port: an integer 1-65535 (0, which would mean "any free port", is refused: the
    service's address has to be known to print and to connect to)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {port}")
    return port


def check_bindable(host: str, port: int, where: str = "--host/--port") -> None:
    """Raise CLIError unless (host, port) can be bound here now.

    Ray Serve's HTTP proxy binds with SO_REUSEPORT, so a second `refusion serve` on a port another one
    already serves would start anyway and the kernel would split connections between the two services
    (each with its own --api-key). A plain bind (SO_REUSEADDR only, as uvicorn's: a port left in
    TIME_WAIT is free) fails on a listening port whatever options its owner set, so it catches that, an
    address this machine does not have, and a host name that does not resolve, before Ray starts.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise CLIError(f"{where}: cannot resolve host {host!r} ({exc}); give an address of this machine, "
                       f"e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CLIError(f"{where}: {host}:{port}: address already in use (another server listens there); "
                               f"stop it or choose another --port") from None
            if exc.errno == errno.EACCES:
                raise CLIError(f"{where}: {host}:{port}: permission denied (ports below 1024 need privileges); "
                               f"choose a port >= 1024") from None
            raise CLIError(f"{where}: cannot listen on {host}:{port}: {exc.strerror}; give an address of "
                           f"this machine, e.g. 127.0.0.1 or 0.0.0.0") from None


# How long --address may take to accept a TCP connection before it is called unreachable
ADDRESS_TIMEOUT_S = 5.0


def check_reachable(address: str, where: str = "--address") -> None:
    """--address HOST:PORT (a GCS) or ray://HOST:PORT (Ray Client) must accept a TCP connection within
    ADDRESS_TIMEOUT_S: ray.init retried a GCS address nobody listens on forever, with a warning every
    40 s. "auto" (and a bare host, which Ray resolves itself) is left to Ray. An http(s):// URL (the
    dashboard's, which `serve deploy` and `ray job` take) is named as such. `where`: the flag or variable
    that gave the address. Raises CLIError."""
    import socket

    scheme, sep, _ = address.partition("://")
    if sep and scheme != "ray":
        raise CLIError(f"{where}: {address} is a web URL (what `serve deploy` and `ray job` take: the dashboard's); "
                       "give the cluster's GCS address HOST:PORT (`ray start --head` prints it; port 6379 "
                       "by default), auto on a cluster node, or ray://HOST:10001 for Ray Client")
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    host = host.strip("[]")  # an IPv6 literal
    try:
        with socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S):
            return
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    unset = "unset RAY_ADDRESS" if where == "RAY_ADDRESS" else "omit --address"
    raise CLIError(f"{where}: nothing answers at {target} ({why}); start the cluster there (`ray start --head` "
                   f"prints the address to use) or give its address, or {unset} for a local Ray")


def http_url(host: str, port: int, tls: bool = False) -> str:
    """The service's URL: an IPv6 host in brackets (RFC 3986 section 3.2.2: http://[::1]:8000); https
    when `tls` (http_options.ssl_certfile)."""
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


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


def room_problem(demand: dict[str, tuple[int, dict[str, float]]], available: dict[str, float], where: str) -> str | None:
    """Why a local Ray (`available`: ray.cluster_resources(), which never grow there) cannot place the
    application's starting replicas (`demand`: serve_app.starting_demand), or None. Ray Serve would wait
    for room without end, serving with the replicas it placed, and `refusion serve` would never be ready
    (helper-184: --replicas 3 of 1 CPU on 2 CPUs); vLLM likewise refuses to start what cannot run.
    `where`: the flag or file that set the counts, named in the message."""
    from integrations.serve_config import ENGINE_DEPLOYMENT

    setting = {"CPU": "num_cpus", "GPU": "num_gpus"}
    names = {ENGINE_DEPLOYMENT: "engine_deployment"}
    for resource in sorted({r for _, per in demand.values() for r in per}, key=lambda r: (r not in setting, r)):
        asks = {name: (count, per[resource]) for name, (count, per) in demand.items() if count and per.get(resource)}
        need, have = sum(count * amount for count, amount in asks.values()), available.get(resource, 0.0)
        if need <= have + 1e-9:
            continue
        label = f"{resource}s" if resource in setting else f"of Ray resource {resource!r}"
        parts = ", ".join(f"{count} {'engine' if name == ENGINE_DEPLOYMENT else 'ingress'} x {amount:g}"
                          for name, (count, amount) in asks.items())
        key = setting.get(resource, f"resources.{resource}")
        keys = " or ".join(f"{names.get(name, 'ingress')}.{key}" for name in asks)
        if not have and resource not in setting:
            advice = f"no node here has it: remove it ({keys}), or join a cluster that has it with --address"
        else:
            advice = f"lower the replica counts or what each asks ({keys}, or ray_actor_options under deployments:)"
            count, per = asks.get(ENGINE_DEPLOYMENT, (0, 0.0))
            rest = need - count * per
            if per and rest <= have + 1e-9:
                fits = int((have - rest + 1e-9) // per)
                advice = f"start at most {fits} engine replica{'' if fits == 1 else 's'}, or {advice}"
            advice += ", or join a larger cluster with --address"
        return (f"{where}: the replicas at start need {need:g} {label} ({parts}) and this machine's Ray has "
                f"{have:g}, so Ray Serve would wait for room forever; {advice}")
    return None


def address_from_env(args: argparse.Namespace) -> str | None:
    """Without --address, the cluster RAY_ADDRESS names, as Ray's own tools (`serve run`, `ray job`, ray.init)
    read it (set to "auto" in a Ray job's driver): it was ignored, and on a cluster node `refusion serve`
    started a Ray of its own without a word (helper-184). Sets args.address and returns the name to
    blame for it ("RAY_ADDRESS"), or None when the address is the flag's or there is none. "local" (from
    either) is ray.init's word for a new local Ray: no address, the local Ray's checks and set-up apply."""
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
    otherwise)."""
    from ray._private import utils as ray_utils

    set_handler = getattr(ray_utils, "set_sigterm_handler", None)
    if set_handler is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        if not address:
            # Ray's processes inherit this environment: its HTTP proxy keeps malformed X-Request-Ids out
            # of its access log and responses (integrations/request_id_guard.py), unless one is set already
            os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
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


# ServeConfig setting -> (the flag that sets it, its argparse dest): an error in a value a flag gave names
# the flag (helper-184: --max-model-len 100000 was called max_model_len)
SETTING_FLAGS = {"model": ("--model", "model"), "max_model_len": ("--max-model-len", "max_model_len"),
                 "model_name": ("--served-model-name", "served_model_name"), "log_level": ("--log-level", "log_level"),
                 "api_keys": ("--api-key", "api_key")}


def _setting(args: argparse.Namespace, file, error: dict) -> tuple[str, str]:
    """(where, message) of a ServeConfig validation error: the flag that set the value (`--model`), else
    the config file and the key's place in it (`--config FILE: applications[0].args.bogus_key`); a
    setting's own prefix ("model: ...") is moved into `where`."""
    key = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix
    if not key and ": " in message:  # a model validator naming its setting, "model: ... does not exist"
        key, message = message.split(": ", 1)
    flag = next((flag for setting, (flag, dest) in SETTING_FLAGS.items()
                 if (key == setting or key.startswith(setting + ".")) and getattr(args, dest, None) is not None), None)
    if flag:
        return flag, message
    if args.config:  # (a check across settings names them in its message: the file is where they are)
        return f"--config {args.config}" + (f": {getattr(file, 'args_path', '')}{key}" if key else ""), message
    return key or "config", message


def checked_setup(args: argparse.Namespace) -> ConfigFile | None:
    """The flags and config file merged and checked before anything starts: the settings, the
    deployments' options, the model directory and its decode defaults, and the cluster address or the
    local port. None, after one line per problem on stderr naming the flag or key, when one is wrong."""
    from pydantic import ValidationError

    from decoding.params import DecodeParamError, DecodeParams, load_model_defaults
    from integrations.serve_app import application
    from integrations.serve_config import ServeConfig
    from workers.loader import ModelDirError, check_model_dir

    file = None
    try:
        file = merged_config(args)
        application(file.args, file.deployments)  # validate before starting Ray
    except CLIError as exc:
        print(f"refusion serve: {exc}", file=sys.stderr)
        return None
    except ValidationError as exc:
        for error in exc.errors():
            where, message = _setting(args, file, error)
            print(f"refusion serve: {where}: {message}", file=sys.stderr)
        return None
    except (TypeError, ValueError, ImportError) as exc:  # what Deployment.options() refuses, from `deployments:`
        # (ImportError: an autoscaling policy_function that does not import)
        print(f"refusion serve: --config: applications[0].deployments: {exc}".splitlines()[0], file=sys.stderr)
        return None
    try:  # seconds here, where a broken directory failed each replica after a minute of tracebacks
        model_dir = ServeConfig.model_validate(file.args).model
        check_model_dir(model_dir)
        DecodeParams.from_dict(load_model_defaults(model_dir))  # the decode defaults every request starts from
    except ModelDirError as exc:
        print(f"refusion serve: --model: {exc}", file=sys.stderr)
        return None
    except DecodeParamError as exc:
        print(f"refusion serve: --model: {Path(model_dir) / 'refusion.json'}: {str(exc).removeprefix('refusion.json: ')}",
              file=sys.stderr)
        return None
    try:
        if args.address:
            check_reachable(args.address, getattr(args, "address_from", None) or "--address")
        else:  # a local Ray: its proxy will listen here (on a cluster, on the cluster's nodes)
            check_bindable(file.http["host"], file.http["port"])
    except CLIError as exc:
        print(f"refusion serve: {exc}", file=sys.stderr)
        return None
    return file


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve import api as serve_api

    from integrations.serve_app import application, starting_demand
    from integrations.serve_config import ServeConfig
    from integrations.serve_drain import answering, drain_app, drain_signal
    from integrations.serve_start import DeployError, deploy, serve_status

    args.address_from = address_from_env(args)
    if args.address_from:
        print(f"refusion serve: joining the Ray cluster at {args.address} (RAY_ADDRESS, as Ray's tools read it; "
              "unset it for a local Ray)", flush=True)
    file = checked_setup(args)
    if file is None:
        return 2
    config, http = file.args, file.http
    stop, stop_now = threading.Event(), threading.Event()

    def on_signal(*_):  # the first signal drains; a second one stops without waiting
        (stop_now if stop.is_set() else stop).set()

    def handle_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    handle_signals()  # before Ray starts: a signal inside ray.init left its half-started agents running
    quiet = ServeConfig.model_validate(config).ray_logging()
    ray_level = logging.getLevelName(quiet["logging_config"]["log_level"]) if quiet else logging.INFO
    if quiet:  # this process's Ray and Serve lines follow --log-level as the replicas' do
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(ray_level)
    serving = ready = cut = False
    try:
        if not start_ray(ray, args.address, file.runtime_env, args.address_from or "--address", ray_level):
            return 2
        handle_signals()  # again: Ray's core worker installs a SIGTERM handler of its own as it connects
        if stop.is_set():
            print("refusion serve: stopped while Ray started", flush=True)
            return INTERRUPTED_EXIT_CODE
        if "num_gpus" not in config["engine_deployment"] and ray.cluster_resources().get("GPU", 0) >= 1:
            config["engine_deployment"]["num_gpus"] = 1
        if not args.address:  # a local Ray: what it cannot place now it never will
            where = ("--replicas" if args.replicas is not None else "--autoscale" if args.autoscale else
                     f"--config {args.config}" if args.config else "the default settings")
            if problem := room_problem(starting_demand(config, file.deployments), ray.cluster_resources(), where):
                print(f"refusion serve: {problem}", file=sys.stderr, flush=True)
                return 2
            device = str((config.get("runner") or {}).get("device") or "")
            if device.startswith("cuda") and ray.cluster_resources().get("GPU", 0) < 1:  # (each replica failed)
                print(f"refusion serve: {f'--config {args.config}: ' if args.config else ''}runner.device: {device}, "
                      "but this machine has no GPU that Ray sees; set cpu, or leave it unset (CUDA when there is "
                      "one)", file=sys.stderr, flush=True)
                return 2
        serving = True  # from here on Serve runs on the cluster
        # Serve's controller and proxies log as the replicas do (ServeConfig.ray_logging: --log-level warning
        # drops their INFO lines too)
        serve.start(http_options=http, **({"proxy_location": file.proxy_location} if file.proxy_location else {}),
                    **quiet)
        # serve.run's submission then says "New http_options ... will not be applied" whenever Serve runs,
        # though serve.start applied them just now (check_serve_http checks where the proxies listen)
        logging.getLogger("ray.serve").addFilter(_drop_applied_options_notice)
        try:
            check_serve_http(http)
        except CLIError as exc:  # Serve was running before: leave it and its applications as they are
            serving = False
            print(f"refusion serve: {exc}", file=sys.stderr)
            return 2
        drain = drain_signal("refusion")  # before the replicas: draining then costs one call, no actor start
        app = application(config, file.deployments)
        try:
            # serve.run's own wait blocks signals; the submission without it is Ray's private _run
            submit = lambda: serve_api._run(app, _blocking=False, name="refusion", route_prefix="/")  # noqa: E731
            ready = deploy(submit, lambda: serve_status("refusion"), stop,
                           notice=lambda text: print(f"refusion serve: {text}", flush=True))
        except DeployError as exc:
            print(f"refusion serve: the application failed to deploy: {exc} (Ray's log above says why)",
                  file=sys.stderr, flush=True)
            return 1
        if not ready and not answering("refusion"):
            print("refusion serve: stopped before the application was ready; removing it"
                  + (" (up to 30 s)" if args.address else ""), flush=True)
            return INTERRUPTED_EXIT_CODE
        if ready:
            url = http_url(http["host"], http["port"], tls=bool(http.get("ssl_certfile")))
            print(f"refusion serve: ready at {url} (Ctrl-C to stop)", flush=True)
            stop.wait()
        else:  # replicas up already answer requests (others still wait for room): their streams are drained
            print("refusion serve: stopped before every replica was up; the replicas running serve requests, "
                  "so they are drained", flush=True)
        drain_s = ServeConfig.model_validate(config).drain_timeout_s
        print(f"refusion serve: draining: running requests get up to {drain_s:g} s (Ctrl-C again: stop now)", flush=True)
        began = time.monotonic()
        drained = drain_app("refusion", drain, drain_s, give_up=stop_now)
        cut = stop_now.is_set() and not drained
        outcome = "drain cut short" if cut else f"drain incomplete ({drained.holdouts()})" if not drained else \
            "drained" if time.monotonic() - began < drain_s else \
            f"drained (after {drain_s:g} s, requests still running were ended with an error)"
        print(f"refusion serve: {outcome}; shutting down", flush=True)
    finally:
        # A local Ray goes with ray.shutdown; Serve's own shutdown there waits 30 s on replicas never placed,
        # and after a cut drain (a second signal: stop now) it took ~9 s more for streams already dropped.
        if serving if args.address else ready and not cut:
            serve.shutdown()
        ray.shutdown()
    # A second signal cut the drain (open streams were dropped): not a clean stop, as Ctrl-C's 130 says.
    # A drain that ran out of drain_timeout_s ended every stream with an error event: a clean stop.
    return INTERRUPTED_EXIT_CODE if cut else 0
