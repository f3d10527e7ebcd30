"""The --config file of `refusion serve` read and checked as Ray Serve takes it (serve_config_file.py
applies it): YAML with every key once (`read_config_mapping`), the one application, its deployments and
http_options checked against Ray Serve's schemas and against what this command applies
(`checked_application`, `checked_deployments`, `check_http_options`), and a CUDA engine that reserves
no GPU (`check_engine_gpus`). Every problem is a CLIError naming
the flag or key and what to change.
"""

from __future__ import annotations

import os
from pathlib import Path

from integrations.serve_deployments import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, MAX_ONGOING_REQUESTS


class CLIError(ValueError):
    """A flag or config-file problem; the message names it and says what to change."""


def read_config_mapping(path: Path) -> dict:
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


def checked_application(data: dict) -> dict:
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
    _check_runtime_env(apps[0].get("runtime_env"), "applications[0].runtime_env.")
    return apps[0]


def checked_deployments(app: dict) -> dict[str, dict]:
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
    """CLIError for a deployment entry's key Ray Serve does not know (its autoscaling_config's and
    ray_actor_options' too, and a value its AutoscalingConfig refuses), a runtime_env Ray does not take
    (`_check_runtime_env`), a user_config, a num_replicas or max_ongoing_requests out of range, or any
    other value Ray Serve's DeploymentSchema refuses (health_check_period_s: -1)."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    _check_keys(entry, DeploymentSchema, f"applications[0].deployments {name} ")
    scaling = entry.get("autoscaling_config")
    if isinstance(scaling, dict):  # Ray drops its unknown keys without a word
        where = f"applications[0].deployments {name} autoscaling_config"
        _check_keys(scaling, AutoscalingConfig, where + ".")
        if isinstance(scaling.get("policy"), dict):
            _check_keys(scaling["policy"], AutoscalingPolicy, where + ".policy.")
        try:  # its values here: they were checked later, as args' and named there (helper-207)
            AutoscalingConfig(**{k: v for k, v in scaling.items() if k != "policy"})
        except ValidationError as exc:
            error = exc.errors()[0]
            key = "".join(f".{part}" for part in error["loc"])
            raise CLIError(f"--config: {where}{key}: {error['msg'].removeprefix('Value error, ')}") from None
    actor = entry.get("ray_actor_options")
    if isinstance(actor, dict):  # (an unknown key failed the deploy with a traceback after Ray had started)
        _check_keys(actor, RayActorOptionsSchema, f"applications[0].deployments {name} ray_actor_options.")
        _check_runtime_env(actor.get("runtime_env"), f"applications[0].deployments {name} ray_actor_options.runtime_env.")
        _check_actor_values(actor, f"applications[0].deployments {name} ray_actor_options")
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
    # The other values as Ray Serve's schema takes them (Deployment.options() refused them later, named as
    # applications[0].args.<key>, a place not in the file); the sections above have their own checks
    scalars = {k: v for k, v in entry.items() if k not in ("autoscaling_config", "ray_actor_options")}
    try:
        DeploymentSchema(**scalars)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = error["loc"][0] if error["loc"] else None
        got = f", got {entry[key]!r}" if key in entry and len(error["loc"]) == 1 else ""
        where = f"applications[0].deployments {name}" + (f" {key}" if key else "")
        raise CLIError(f"--config: {where}: {error['msg'].removeprefix('Value error, ')}{got}") from None


def _check_actor_values(actor: dict, where: str) -> None:
    """CLIError naming the ray_actor_options key whose value Ray Serve refuses (`num_cpus: "one"`, a
    negative memory, `resources: {CPU: 1}`): they failed the deploy after Ray had started, named only as
    `applications[0].deployments`. Checked as Ray Serve checks them: its schema's types and bounds, then
    the options of a deployment built with them (serve.deployment, which names the keyword). runtime_env
    is left to `_check_runtime_env`."""
    import copy
    import math

    from pydantic import ValidationError
    from ray import serve
    from ray.serve.schema import RayActorOptionsSchema

    values = {k: v for k, v in actor.items() if k != "runtime_env"}
    try:
        RayActorOptionsSchema(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = "".join(f".{part}" for part in error["loc"])
        raise CLIError(f"--config: {where}{key}: {error['msg']}, got {actor.get(error['loc'][0])!r}") from None
    for key in ("num_cpus", "num_gpus", "memory"):  # (.inf: Ray's OverflowError traceback)
        if isinstance(values.get(key), float) and not math.isfinite(values[key]):
            raise CLIError(f"--config: {where}.{key}: expected a finite number >= 0, got {values[key]!r}")
    for resource, amount in (values.get("resources") or {}).items():  # (Ray's own error: "'<' not supported")
        if not isinstance(resource, str):
            raise CLIError(f"--config: {where}.resources: a resource's name is a string, got {resource!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < math.inf:
            raise CLIError(f"--config: {where}.resources.{resource}: expected a finite number >= 0 (how much of that "
                           f"custom resource each replica takes), got {amount!r}")
    try:
        serve.deployment(ray_actor_options=copy.deepcopy(values))(_Probe)  # (it adds its defaults to the dict)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CLIError(f"--config: {where}: {exc}") from None


def check_engine_gpus(args: dict, deployments: dict[str, dict], runtime_env: dict, args_path: str) -> None:
    """CLIError when the engine runs on CUDA (`args` runner.device cuda or cuda:N) but its replicas reserve
    no GPU: num_gpus 0 in the engine's `deployments` entry ray_actor_options, or none there (that mapping
    replaces the engine's whole one, and Ray's default is 0), or else args engine_deployment.num_gpus 0 (left
    out, `refusion serve` asks for one GPU where the cluster has GPUs). Ray leaves CUDA_VISIBLE_DEVICES as
    the node has it for an actor that reserves no GPU (ray/_private/accelerators/accelerator.py,
    ray-project/ray#54868), so each such replica sees every GPU, unreserved, and two replicas (or another
    job) could load onto one GPU unplanned; num_gpus false (YAML no, off) is 0 to Ray too. A runtime_env
    (`runtime_env`, the application's, or the entry's) that sets CUDA_VISIBLE_DEVICES picks the GPUs by hand:
    passed. `args_path`: where args sit."""
    runner = args.get("runner")
    device = runner.get("device") if isinstance(runner, dict) else None
    if not (isinstance(device, str) and device.startswith("cuda")):
        return
    actor = (deployments.get(ENGINE_DEPLOYMENT) or {}).get("ray_actor_options")
    for env in (runtime_env, (actor or {}).get("runtime_env") if isinstance(actor, dict) else None):
        if isinstance(env, dict) and "CUDA_VISIBLE_DEVICES" in (env.get("env_vars") or {}):
            return
    if isinstance(actor, dict):
        gpus = actor.get("num_gpus", 0)
        where = (f"applications[0].deployments {ENGINE_DEPLOYMENT} ray_actor_options.num_gpus: "
                 + (_zero_said(gpus) if "num_gpus" in actor else "left out (Ray's default, 0; this mapping "
                    "replaces engine_deployment's num_gpus)"))
    else:
        engine = args.get("engine_deployment")
        gpus = engine.get("num_gpus") if isinstance(engine, dict) else None
        where = f"{args_path}engine_deployment.num_gpus: {_zero_said(gpus)}"
    if gpus != 0:  # (a YAML false is 0 to Ray and to ServeConfig: it reserves no GPU either)
        return
    raise CLIError(f"--config: {where}, but {args_path}runner.device is {device}: a replica that reserves no GPU "
                   "still sees every GPU of its node (Ray sets no CUDA_VISIBLE_DEVICES for it), so replicas could "
                   "share one unplanned; set num_gpus: 1 (a fraction such as 0.5 to share a GPU on purpose), or "
                   "runner.device: cpu")


def _zero_said(gpus) -> str:
    """A num_gpus equal to 0 as the file wrote it: `false` for YAML's false (no, off), else 0."""
    return "false" if gpus is False else "0"


class _Probe:
    """The class a deployment is built around to have Ray Serve check ray_actor_options (`_check_actor_values`)."""


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


def _check_runtime_env(env, where: str) -> None:
    """Raise CLIError for a runtime_env key the installed Ray does not know: RuntimeEnv takes any key as a
    plugin's, and the runtime env agent drops one no plugin claims with a warning in its
    runtime_env_setup log, so `{bogus: 1}` (or a typo such as env_var) was accepted and did nothing.
    Known: RuntimeEnv's fields and keyword names (nsight for _nsight), and the plugins RAY_RUNTIME_ENV_PLUGINS
    loads in this shell (a local Ray's agent inherits it). `config`'s keys are RuntimeEnvConfig's. Then a
    value RuntimeEnv refuses (env_vars that are not strings, pip beside conda, a working_dir that is no
    path) is named."""
    import inspect

    from ray._private.runtime_env.constants import RAY_RUNTIME_ENV_PLUGINS_ENV_VAR
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    if not isinstance(env, dict):
        return  # (not a mapping: named as Ray's schema check or _section names it)
    keywords = inspect.signature(RuntimeEnv.__init__).parameters
    known = set(RuntimeEnv.known_fields) | {k for k, p in keywords.items() if p.kind is p.KEYWORD_ONLY and k != "_validate"}
    if set(env) - known and os.environ.get(RAY_RUNTIME_ENV_PLUGINS_ENV_VAR):
        from ray._private.runtime_env.plugin import RuntimeEnvPluginManager

        try:
            known |= set(RuntimeEnvPluginManager().plugins)
        except (ValueError, RuntimeError, ImportError, AttributeError) as exc:
            raise CLIError(f"{RAY_RUNTIME_ENV_PLUGINS_ENV_VAR}: Ray cannot load its plugins ({exc})") from None
    if unknown := sorted(str(k) for k in env if k not in known):
        raise CLIError(f"--config: {where}{unknown[0]}: not a runtime_env field Ray knows (its runtime env agent "
                       f"would ignore it); the fields are {', '.join(sorted(k for k in known if not k.startswith('_')))} "
                       f"(Ray's own underscored ones left out; a runtime env plugin's field: "
                       f"load the plugin with {RAY_RUNTIME_ENV_PLUGINS_ENV_VAR} in this shell too)")
    if isinstance(env.get("config"), dict) and (unknown := sorted(str(k) for k in env["config"]
                                                                  if k not in RuntimeEnvConfig.known_fields)):
        raise CLIError(f"--config: {where}config.{unknown[0]}: not a runtime_env config field Ray knows (it ignores "
                       f"it); the fields are {', '.join(sorted(RuntimeEnvConfig.known_fields))}")
    # Its values as ray.init checks them, which it did after starting a local Ray: a TypeError traceback, or a
    # ValueError that start_ray reported as "cannot join the Ray cluster at None"
    try:
        RuntimeEnv(**env)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--config: {where.removesuffix('.')}: {str(exc).splitlines()[0]}") from None


def _check_keys(mapping: dict, schema, where: str) -> None:
    """Raise CLIError for a key Ray Serve's config schema does not have (a typo such as proxy_locaton was
    silently ignored); keys Serve knows and this command does not apply are refused by `_check_applied`."""
    known = set(getattr(schema, "model_fields", None) or schema.__fields__)
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise CLIError(f"--config: {where}{unknown[0]}: not a Ray Serve config key; the keys here are "
                       f"{', '.join(sorted(known))}")
