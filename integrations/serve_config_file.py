"""The Serve config file and the flags of `refusion serve`, merged into what it deploys.

`load_config_file` reads a Ray Serve config file (config/serve.yaml: `applications[0].args` and
`.deployments`, `http_options`, `proxy_location`) as `serve deploy` reads it, or a bare mapping of
ServeConfig fields, and names every key Ray Serve would drop or fail on, and every key it knows that
this command does not apply (those checks: serve_config_checks.py, serve_deployment_checks.py);
`merged_config` applies the flags (flags win). Every problem is a CLIError naming the flag or key and what to change.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from integrations.cli_generate import EMPTY_MODEL_FLAG
from integrations.serve_config import DEFAULT_MODEL, max_model_len_problem, served_names_problem
from integrations.serve_config_checks import CLIError, check_http_options, checked_application, read_config_mapping
from integrations.serve_deployment_checks import check_engine_gpus, checked_deployments
from integrations.serve_deployments import ENGINE_DEPLOYMENT

__all__ = ["CLIError", "ConfigFile", "check_http_options", "load_config_file", "merged_config", "parse_autoscale"]


@dataclass
class ConfigFile:
    """What `refusion serve` reads of a Serve config file (the keys `serve deploy` also reads)."""

    args: dict = field(default_factory=dict)  # applications[0].args: ServeConfig
    http: dict = field(default_factory=dict)  # http_options
    proxy_location: str | None = None  # EveryNode / HeadOnly / Disabled (Ray's default when None)
    deployments: dict[str, dict] = field(default_factory=dict)  # applications[0].deployments, by name
    args_path: str = ""  # where `args` sit in the file, for errors: "applications[0].args." or "" (a bare mapping)
    runtime_env: dict = field(default_factory=dict)  # applications[0].runtime_env: the replicas' (start_ray)


def load_config_file(path: Path) -> ConfigFile:
    """A Serve config file (or a bare args mapping) as `refusion serve` uses it."""
    data = read_config_mapping(path)
    if "applications" not in data:
        check_engine_gpus(data, {}, {}, "")
        return ConfigFile(args=data)
    app = checked_application(data)
    deployments = checked_deployments(app)
    file = ConfigFile(_section(app, "args", "applications[0]."), _section(data, "http_options"),
                      data.get("proxy_location"), deployments, "applications[0].args.",
                      _section(app, "runtime_env", "applications[0]."))
    check_engine_gpus(file.args, deployments, file.runtime_env, file.args_path)
    return file


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise CLIError(f"--autoscale: expected MIN:MAX like 1:4, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise CLIError(f"--autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def _section(config: dict, name: str, where: str = "") -> dict:
    """A copy of the config's mapping `name` ({} when absent), for a flag to set one key of. `where`: the
    place of `config` in the file, for the error ("applications[0]." or "applications[0].args.")."""
    value = config.get(name)
    if value is not None and not isinstance(value, dict):
        raise CLIError(f"--config: {where}{name}: must be a mapping of settings, got {value!r}")
    return dict(value or {})


def merged_config(args: argparse.Namespace) -> ConfigFile:
    """The config file with the flags applied (flags win, also over the file's `deployments:` counts)."""
    file = load_config_file(args.config) if args.config else ConfigFile()
    config = file.args
    _apply_setting_flags(config, args, file.args_path)
    engine_override = file.deployments.get(ENGINE_DEPLOYMENT, {})
    config["engine_deployment"] = _apply_replica_flags(_section(config, "engine_deployment", file.args_path), engine_override, args)
    drain_s, grace_s = config.get("drain_timeout_s", 20.0), engine_override.get("graceful_shutdown_timeout_s")
    if isinstance(grace_s, (int, float)) and isinstance(drain_s, (int, float)) and grace_s < drain_s + 2:
        raise CLIError(f"--config: deployments {ENGINE_DEPLOYMENT} graceful_shutdown_timeout_s ({grace_s}) must "
                       f"exceed drain_timeout_s ({drain_s}) by >= 2 s, or Ray kills replicas mid-drain")
    _apply_address_flags(file, args)
    return file


def _apply_setting_flags(config: dict, args: argparse.Namespace, where: str = "") -> None:
    """Set the ServeConfig fields the flags give in `config` (the file's args): --model,
    --served-model-name, --api-key (added to the file's keys), --max-num-seqs, --dtype, --max-model-len,
    --log-level; CLIError naming a flag whose value cannot be served."""
    if args.model is not None:
        if not args.model.strip():  # (it served the shipped model)
            raise CLIError(f"--model: {EMPTY_MODEL_FLAG}")
        config["model"] = args.model
    if args.served_model_name:
        if problem := served_names_problem(args.served_model_name):
            raise CLIError(f"--served-model-name: {problem}")
        config["model_name"] = args.served_model_name
    if args.api_key:
        if any(not key.strip() for key in args.api_key):
            raise CLIError("--api-key: an empty key would let in a request with an empty Bearer token; give a key")
        keys = config.get("api_keys")  # not a list: left for the config check to name
        config["api_keys"] = [*keys, *args.api_key] if isinstance(keys, list) else keys or args.api_key
    if args.max_num_seqs is not None:
        if args.max_num_seqs < 1:
            raise CLIError(f"--max-num-seqs: must be >= 1, got {args.max_num_seqs}")
        config["engine"] = {**_section(config, "engine", where), "max_running": args.max_num_seqs}
    if args.dtype:
        config["runner"] = {**_section(config, "runner", where), "dtype": args.dtype}
    if getattr(args, "max_model_len", None) is not None:
        if problem := max_model_len_problem(args.max_model_len, config.get("model") or DEFAULT_MODEL):
            raise CLIError(f"--max-model-len: {problem}")
        config["max_model_len"] = args.max_model_len
    if getattr(args, "log_level", None):
        config["log_level"] = args.log_level


def _apply_replica_flags(deployment: dict, engine_override: dict, args: argparse.Namespace) -> dict:
    """`deployment` (args.engine_deployment) with --replicas or --autoscale applied; the same flags take the
    place of the counts in the file's engine deployment entry (`engine_override`, changed in place)."""
    if args.replicas is not None:
        if args.replicas < 1:
            raise CLIError(f"--replicas: must be >= 1, got {args.replicas}")
        deployment["num_replicas"] = args.replicas
        deployment.pop("autoscaling", None)
    if args.autoscale:
        low, high = parse_autoscale(args.autoscale)
        deployment["autoscaling"] = {**(deployment.get("autoscaling") or {}), "min_replicas": low, "max_replicas": high}
        deployment.pop("num_replicas", None)  # the flag replaces the file's fixed count
    if args.replicas is not None:  # the flag replaces the file's count or autoscaling
        for key in ("num_replicas", "autoscaling_config"):
            engine_override.pop(key, None)
    if args.autoscale:  # the flag sets min and max of the file's autoscaling (its other settings stay)
        engine_override.pop("num_replicas", None)
        if isinstance(engine_override.get("autoscaling_config"), dict):
            engine_override["autoscaling_config"] = {**engine_override["autoscaling_config"],
                                                     "min_replicas": low, "max_replicas": high}
    return deployment


def _apply_address_flags(file: ConfigFile, args: argparse.Namespace) -> None:
    """Set file.http's host and port (--host and --port over the file's http_options), each checked, and
    check the http_options as Ray will take them (check_http_options). The file's own host and port are
    checked also when a flag overrides them, with the same message: a config file must be valid on its
    own, as Ray Serve validates a whole file whatever overrides it (a port of 0 passed beside --port)."""
    host, port = file.http.get("host", "127.0.0.1"), file.http.get("port", 8000)
    for where, value in (("--config: http_options.host", host), ("--host", args.host)):
        if (value is not None or where != "--host") and (not isinstance(value, str) or not value.strip()):
            raise CLIError(f"{where}: expected a host name or address such as 127.0.0.1 or 0.0.0.0, got {value!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:  # (--port: port_number)
        raise CLIError(f"--config: http_options.port: expected a port number 1-65535, got {port!r}")
    host = args.host if args.host is not None else host
    port = args.port if args.port is not None else port
    # TLS, root_path and timeouts as the file has them; null is Ray's default, as when left out
    file.http = {**{k: v for k, v in file.http.items() if v is not None}, "host": host, "port": port}
    check_http_options(file.http)
