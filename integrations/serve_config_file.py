"""The Serve config file and the flags of `refusion serve`, merged into what it deploys.

`load_config_file` reads a Ray Serve config file (config/serve.yaml: `applications[0].args` and
`.deployments`, `http_options`, `proxy_location`) as `serve deploy` reads it, or a bare mapping of
ServeConfig fields, and names every key Ray Serve would drop or fail on, and every key it knows that
this command does not apply; `merged_config` applies the flags (flags win). Every problem is a CLIError
naming the flag or key and what to change.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from integrations.cli_generate import EMPTY_MODEL_FLAG
from integrations.serve_config import DEFAULT_MODEL, max_model_len_problem, served_names_problem
from integrations.serve_deployments import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, MAX_ONGOING_REQUESTS


class CLIError(ValueError):
    """A flag or config-file problem; the message names it and says what to change."""


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
    data = _read_config_mapping(path)
    if "applications" not in data:
        return ConfigFile(args=data)
    app = _checked_application(data)
    deployments = _checked_deployments(app)
    return ConfigFile(_section(app, "args"), _section(data, "http_options"), data.get("proxy_location"),
                      deployments, "applications[0].args.", _section(app, "runtime_env"))


def _read_config_mapping(path: Path) -> dict:
    """The --config file's YAML mapping; CLIError for a path that is no readable file, text that is not
    UTF-8 or not YAML (a key written twice included), an empty file or one that holds no mapping."""
    import yaml

    if path.is_dir():
        raise CLIError(f"--config: {path} is a directory; give the YAML file (e.g. config/serve.yaml)")
    if not path.exists():  # (a pipe, `--config <(...)`, is read as a file is)
        raise CLIError(f"--config: {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except PermissionError:
        raise CLIError(f"--config: {path}: permission denied; make it readable") from None
    except UnicodeDecodeError as exc:
        raise CLIError(f"--config: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        place = getattr(exc, "problem_mark", None)
        at = f" at line {place.line + 1}, column {place.column + 1}" if place else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CLIError(f"--config: {path} is not valid YAML{at}: {problem}") from None
    if data is None:  # (it started the server on the defaults without a word)
        raise CLIError(f"--config: {path} is empty; give a Serve config (config/serve.yaml) or a mapping of "
                       "settings, or drop --config for the defaults")
    if not isinstance(data, dict):
        raise CLIError(f"--config: {path} must hold a mapping")
    return data


def _checked_application(data: dict) -> dict:
    """The one application of a Serve config file, its top-level keys, http_options and application keys
    checked against Ray Serve's schemas and what `refusion serve` applies."""
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    _check_keys(data, ServeDeploySchema, "")
    _check_applied(data, "", ServeDeploySchema, _TOP_APPLIED, {})
    locations = [location.value for location in ProxyLocation]
    if data.get("proxy_location") is not None and data["proxy_location"] not in locations:
        raise CLIError(f"--config: proxy_location: expected one of {', '.join(locations)}, got {data['proxy_location']!r}")
    if isinstance(data.get("http_options"), dict):
        _check_keys(data["http_options"], HTTPOptionsSchema, "http_options.")
    apps = data["applications"] or []
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        found = f"{len(apps)} entries" if isinstance(apps, list) else repr(apps)
        raise CLIError(f"--config: applications: must be a list of exactly one application mapping, found {found}")
    _check_keys(apps[0], ServeApplicationSchema, "applications[0].")
    _check_applied(apps[0], "applications[0].", ServeApplicationSchema, _APP_APPLIED, _APP_FIXED)
    return apps[0]


def _checked_deployments(app: dict) -> dict[str, dict]:
    """The application's `deployments` entries by name (the name key dropped), each checked: one of this
    application's two deployments, listed once (`_check_deployment_entry`)."""
    entries = app.get("deployments") or []
    if not isinstance(entries, list):
        raise CLIError(f"--config: applications[0].deployments: must be a list of mappings with a name, got {entries!r}")
    deployments = {}
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in (ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT):
            raise CLIError(f"--config: applications[0].deployments: unknown deployment {name!r}; the "
                           f"application has {ENGINE_DEPLOYMENT} and {INGRESS_DEPLOYMENT}")
        if name in deployments:  # (the last entry won without a word)
            raise CLIError(f"--config: applications[0].deployments: {name} is listed twice; merge its settings "
                           "into one entry")
        _check_deployment_entry(name, entry)
        deployments[name] = {k: v for k, v in entry.items() if k != "name"}
    return deployments


def _check_deployment_entry(name: str, entry: dict) -> None:
    """CLIError for a deployment entry's key Ray Serve does not know (its autoscaling_config's too), a
    user_config, or a num_replicas or max_ongoing_requests out of range."""
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
    from ray.serve.schema import DeploymentSchema

    _check_keys(entry, DeploymentSchema, f"applications[0].deployments {name} ")
    scaling = entry.get("autoscaling_config")
    if isinstance(scaling, dict):  # Ray drops its unknown keys without a word
        _check_keys(scaling, AutoscalingConfig, f"applications[0].deployments {name} autoscaling_config.")
        if isinstance(scaling.get("policy"), dict):
            _check_keys(scaling["policy"], AutoscalingPolicy,
                        f"applications[0].deployments {name} autoscaling_config.policy.")
    if entry.get("user_config") is not None:  # Ray fails every replica on it, in a loop
        raise CLIError(f"--config: applications[0].deployments {name} user_config: not used by this application "
                       "(its deployments have no reconfigure); set engine and runner settings under args")
    replicas = entry.get("num_replicas")
    if replicas is not None and replicas != "auto" and (isinstance(replicas, bool) or not isinstance(replicas, int)
                                                         or replicas < 1):
        raise CLIError(f"--config: applications[0].deployments: {name} num_replicas: expected an integer >= 1 "
                       f"or \"auto\", got {replicas!r}")
    ongoing = entry.get("max_ongoing_requests")
    if ongoing is not None and (isinstance(ongoing, bool) or not isinstance(ongoing, int)
                                or not 1 <= ongoing <= MAX_ONGOING_REQUESTS):
        raise CLIError(f"--config: applications[0].deployments: {name} max_ongoing_requests: expected an integer "
                       f"from 1 to {MAX_ONGOING_REQUESTS}, got {ongoing!r} (a replica takes 1000 concurrent calls, "
                       f"and Ray Serve's own, its health check among them, need room)")


def _unique_key_loader():
    """yaml.SafeLoader refusing a key written twice in one mapping (PyYAML keeps the last value without a
    word, so `max_running: 8` above `max_running: 64` served 64; YAML 1.2 requires unique keys), an alias
    of a key included. Checked on the composed node tree before anything is constructed: constructing a
    merge (`<<: *base`) rewrites the merged mapping's node in place. Keys a merge brings in may be
    overridden, as YAML's merge-key spec allows."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_document(self, node):
            self._check_unique_keys(node)
            return super().construct_document(node)

        def _check_unique_keys(self, root) -> None:
            pending, visited = [root], set()
            while pending:
                node = pending.pop()
                if id(node) in visited:  # (an alias is its anchor's node: walked once)
                    continue
                visited.add(id(node))
                if isinstance(node, yaml.SequenceNode):
                    pending.extend(node.value)
                if not isinstance(node, yaml.MappingNode):
                    continue
                seen = {}
                for key_node, value_node in node.value:
                    pending.extend((key_node, value_node))
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = self.construct_object(key_node)
                    try:
                        first = seen.get(key)
                    except TypeError:  # (not hashable: SafeLoader's own error names it)
                        continue
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key_node.value!r} appears twice in one mapping (first at line "
                            f"{first.line + 1}); keep one", key_node.start_mark)
                    seen[key] = key_node.start_mark

    return UniqueKeyLoader


# What `refusion serve` applies of a Serve config file; the application's name, route prefix and import
# path are its own (the values config/serve.yaml holds, which `serve deploy` reads too)
_TOP_APPLIED = {"applications", "http_options", "proxy_location"}
_APP_APPLIED = {"args", "deployments", "runtime_env"}
_APP_FIXED = {"name": "refusion", "route_prefix": "/", "import_path": "integrations.serve_app:build_app"}
_INSTEAD = {  # what to do instead of a key `refusion serve` does not apply
    "logging_config": "use --log-level (args.log_level)",
    "host": "use http_options.host", "port": "use http_options.port",
}


def _check_applied(mapping: dict, where: str, schema, applied: set[str], fixed: dict) -> None:
    """Raise CLIError for a key Ray Serve knows that `refusion serve` would not apply (it ignored them
    without a word: a route_prefix of /api still served at /): set to another value than `fixed` holds
    for it, or, when it is neither applied nor fixed, to anything but Ray's default (`schema`'s: a file
    `serve build` writes spells the defaults out)."""
    for key, value in mapping.items():
        if key in applied or value is None or (key in fixed and value == fixed[key]):
            continue
        if key not in fixed and _is_default(schema, key, value):
            continue
        if key in fixed:
            raise CLIError(f"--config: {where}{key}: refusion serve deploys {fixed[key]!r}, got {value!r}; drop the "
                           "key, or deploy this file with `serve deploy` (Ray's CLI), which applies it")
        instead = _INSTEAD.get(key, "deploy this file with `serve deploy` (Ray's CLI), which applies it")
        raise CLIError(f"--config: {where}{key}: not applied by refusion serve; drop the key and {instead}")


def _is_default(schema, key: str, value) -> bool:
    """Whether `value` is what Ray's config `schema` gives `key` when it is left out."""
    default = schema.model_fields[key].default
    if hasattr(default, "model_validate"):  # a nested options model (grpc_options)
        try:
            return type(default).model_validate(value) == default
        except Exception:  # noqa: BLE001 - not even valid: not the default
            return False
    return value == default


def check_http_options(http: dict) -> None:
    """CLIError naming the `http_options` key Ray's HTTPOptions refuses (which failed serve.start with a
    traceback after Ray had started), or a TLS file that cannot be loaded (Ray's proxy then served
    nothing while "ready at" said https)."""
    import ssl

    from pydantic import ValidationError
    from ray.serve.config import HTTPOptions

    try:
        HTTPOptions(**http)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(["http_options", *(str(part) for part in error["loc"])])
        raise CLIError(f"--config: {where}: {error['msg']}") from None
    for key in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):  # (Ray checks that the first two come together)
        path = http.get(key)
        if path and not (Path(path).is_file() and os.access(path, os.R_OK)):
            why = "cannot be read by this user" if Path(path).is_file() else "is no file"
            raise CLIError(f"--config: http_options.{key}: {path} {why}; give a PEM file the user running "
                           "refusion serve can read")
    if http.get("ssl_certfile"):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(http["ssl_certfile"], http["ssl_keyfile"],
                                                                    http.get("ssl_keyfile_password"))
        except (OSError, ValueError) as exc:  # ssl.SSLError: not PEM, or a key that is not the certificate's
            raise CLIError(f"--config: http_options.ssl_certfile: the certificate and ssl_keyfile do not load as "
                           f"a pair ({exc}); give a PEM certificate and its private key") from None
    if http.get("ssl_ca_certs"):
        try:
            ssl.create_default_context(cafile=http["ssl_ca_certs"])
        except (OSError, ValueError) as exc:
            raise CLIError(f"--config: http_options.ssl_ca_certs: does not load ({exc}); give a PEM CA bundle") from None


def _check_keys(mapping: dict, schema, where: str) -> None:
    """Raise CLIError for a key Ray Serve's config schema does not have (a typo such as proxy_locaton was
    silently ignored); keys Serve knows and this command does not apply are refused by `_check_applied`."""
    known = set(getattr(schema, "model_fields", None) or schema.__fields__)
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise CLIError(f"--config: {where}{unknown[0]}: not a Ray Serve config key; the keys here are "
                       f"{', '.join(sorted(known))}")


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise CLIError(f"--autoscale: expected MIN:MAX like 1:4, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise CLIError(f"--autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def _section(config: dict, name: str) -> dict:
    """A copy of the config's mapping `name` ({} when absent), for a flag to set one key of."""
    value = config.get(name)
    if value is not None and not isinstance(value, dict):
        raise CLIError(f"--config: {name}: must be a mapping of settings, got {value!r}")
    return dict(value or {})


def merged_config(args: argparse.Namespace) -> ConfigFile:
    """The config file with the flags applied (flags win, also over the file's `deployments:` counts)."""
    file = load_config_file(args.config) if args.config else ConfigFile()
    config = file.args
    _apply_setting_flags(config, args)
    engine_override = file.deployments.get(ENGINE_DEPLOYMENT, {})
    config["engine_deployment"] = _apply_replica_flags(_section(config, "engine_deployment"), engine_override, args)
    drain_s, grace_s = config.get("drain_timeout_s", 20.0), engine_override.get("graceful_shutdown_timeout_s")
    if isinstance(grace_s, (int, float)) and isinstance(drain_s, (int, float)) and grace_s < drain_s + 2:
        raise CLIError(f"--config: deployments {ENGINE_DEPLOYMENT} graceful_shutdown_timeout_s ({grace_s}) must "
                       f"exceed drain_timeout_s ({drain_s}) by >= 2 s, or Ray kills replicas mid-drain")
    _apply_address_flags(file, args)
    return file


def _apply_setting_flags(config: dict, args: argparse.Namespace) -> None:
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
        config["engine"] = {**_section(config, "engine"), "max_running": args.max_num_seqs}
    if args.dtype:
        config["runner"] = {**_section(config, "runner"), "dtype": args.dtype}
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
    """Set file.http's host and port (--host and --port over the file's http_options), both checked, and
    check the http_options as Ray will take them (check_http_options)."""
    host = args.host if args.host is not None else file.http.get("host", "127.0.0.1")
    port = args.port if args.port is not None else file.http.get("port", 8000)
    if not isinstance(host, str) or not host.strip():
        where = "--host" if args.host is not None else "--config: http_options.host"
        raise CLIError(f"{where}: expected a host name or address such as 127.0.0.1 or 0.0.0.0, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise CLIError(f"--config: http_options.port: expected a port number 1-65535, got {port!r}")
    # TLS, root_path and timeouts as the file has them; null is Ray's default, as when left out
    file.http = {**{k: v for k, v in file.http.items() if v is not None}, "host": host, "port": port}
    check_http_options(file.http)
