"""What `refusion serve` checks before anything starts, so that a wrong flag or key fails in seconds with
one line naming it: the flags and config file merged and validated, the model directory and its decode
defaults, the runner's KV budget against the model, the port a local Ray's proxy will bind or the
cluster address to join, and whether a local Ray has room for the replicas at start."""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from integrations.serve_config_file import CLIError, ConfigFile, merged_config


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


def reserve_gpu(engine_deployment: dict, resources: dict[str, float]) -> bool:
    """`refusion serve`'s GPU default: an `engine_deployment` mapping (ServeConfig's, changed in place)
    that does not say `num_gpus` gets 1 when the cluster (`resources`: ray.cluster_resources()) has a
    GPU, so each replica reserves the GPU its runner picks (ModelRunner: CUDA when there is one); Ray's
    own default, 0, would leave a replica on a GPU it did not reserve (Ray 2.60 hides no GPU from such
    an actor: two replicas could load onto one). A `num_gpus` said (0 included) is kept. True when set.
    """
    if "num_gpus" in engine_deployment or resources.get("GPU", 0) < 1:
        return False
    engine_deployment["num_gpus"] = 1
    return True


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


def room_problem(demand: dict[str, tuple[int, dict[str, float]]], available: dict[str, float], where: str) -> str | None:
    """Why a local Ray (`available`: ray.cluster_resources(), which never grow there) cannot place the
    application's starting replicas (`demand`: serve_app.starting_demand), or None. Ray Serve would wait
    for room without end, serving with the replicas it placed, and `refusion serve` would never be ready
    (helper-184: --replicas 3 of 1 CPU on 2 CPUs); vLLM likewise refuses to start what cannot run.
    `where`: the flag or file that set the counts, named in the message."""
    from integrations.serve_deployments import ENGINE_DEPLOYMENT

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
    if (not key or message.startswith(key + ".")) and ": " in message:  # a validator naming its setting: a model
        key, message = message.split(": ", 1)  # validator's "model: ... does not exist", runner's "runner.dtype: ..."
    flag = next((flag for setting, (flag, dest) in SETTING_FLAGS.items()
                 if (key == setting or key.startswith(setting + ".")) and getattr(args, dest, None) is not None), None)
    if flag:
        return flag, message
    if args.config:  # (a check across settings names them in its message: the file is where they are)
        return f"--config {args.config}" + (f": {getattr(file, 'args_path', '')}{key}" if key else ""), message
    return key or "config", message


def _model_source(args: argparse.Namespace, file: ConfigFile) -> str:
    """Where the model directory came from, for its errors: --model, else the config file's `model:` (it
    blamed --model, a flag not given), else --model, the flag that replaces the shipped model."""
    if args.model is None and args.config and "model" in file.args:
        return _setting(args, file, {"loc": ("model",), "msg": ""})[0]
    return "--model"


def checked_setup(args: argparse.Namespace) -> ConfigFile | None:
    """The flags and config file merged and checked before anything starts: the settings, the
    deployments' options, the model directory, its decode defaults and the runner's KV budget
    (engine_host.check_kv_budget), and the cluster address or the local port. None, after one line per
    problem on stderr naming the flag or key, when one is wrong."""
    from pydantic import ValidationError

    from decoding.params import DecodeParamError, model_default_params
    from integrations.engine_host import check_kv_budget
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
        config = ServeConfig.model_validate(file.args)
        model_dir = config.model
        model_default_params(model_dir, check_model_dir(model_dir))  # the decode defaults every request starts from
        check_kv_budget(config.runner, model_dir)  # (a ValueError naming runner.kv_memory_bytes)
    except (ModelDirError, DecodeParamError) as exc:
        print(f"refusion serve: {_model_source(args, file)}: {exc}", file=sys.stderr)
        return None
    except ValueError as exc:
        where, message = _setting(args, file, {"loc": ("runner",), "msg": str(exc)})
        print(f"refusion serve: {where}: {message}", file=sys.stderr)
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
