"""The --config file of `refusion serve` read and checked as Ray Serve takes it (serve_config_file.py
applies it): YAML with every key once (`read_config_mapping`), the one application and its http_options
checked against Ray Serve's schemas and against what this command applies (`checked_application`,
`check_http_options`; the `deployments` entries: serve_deployment_checks.py). Every problem is a CLIError
naming the flag or key and what to change.
"""

from __future__ import annotations

import os
from pathlib import Path


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

    check_keys(data, ServeDeploySchema, "")
    _check_applied(data, "", ServeDeploySchema, _TOP_APPLIED, {})
    locations = [location.value for location in ProxyLocation]
    if data.get("proxy_location") is not None and data["proxy_location"] not in locations:
        raise CLIError(f"--config: proxy_location: expected one of {', '.join(locations)}, got {data['proxy_location']!r}")
    if isinstance(data.get("http_options"), dict):
        check_keys(data["http_options"], HTTPOptionsSchema, "http_options.")
    apps = data["applications"] or []
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        found = f"{len(apps)} entries" if isinstance(apps, list) else repr(apps)
        raise CLIError(f"--config: applications: must be a list of exactly one application mapping, found {found}")
    check_keys(apps[0], ServeApplicationSchema, "applications[0].")
    _check_applied(apps[0], "applications[0].", ServeApplicationSchema, _APP_APPLIED, _APP_FIXED)
    check_runtime_env(apps[0].get("runtime_env"), "applications[0].runtime_env.")
    return apps[0]


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


def check_runtime_env(env, where: str) -> None:
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


def check_keys(mapping: dict, schema, where: str) -> None:
    """Raise CLIError for a key Ray Serve's config schema does not have (a typo such as proxy_locaton was
    silently ignored); keys Serve knows and this command does not apply are refused by `_check_applied`."""
    known = set(getattr(schema, "model_fields", None) or schema.__fields__)
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise CLIError(f"--config: {where}{unknown[0]}: not a Ray Serve config key; the keys here are "
                       f"{', '.join(sorted(known))}")
