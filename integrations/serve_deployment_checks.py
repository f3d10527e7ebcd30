"""The `deployments` entries of a `refusion serve --config` file checked as Ray Serve takes them
(serve_config_file.py applies them; the rest of the file: serve_config_checks.py): each entry one of this
application's two deployments, listed once, with keys and values Ray Serve's schemas take
(`checked_deployments`), and a CUDA engine that reserves no GPU (`check_engine_gpus`). Every problem is a
CLIError naming the key and what to change.
"""

from __future__ import annotations

from integrations.serve_config_checks import CLIError, check_keys, check_runtime_env
from integrations.serve_deployments import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, MAX_ONGOING_REQUESTS


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
    (`serve_config_checks.check_runtime_env`), a user_config, a num_replicas or max_ongoing_requests out of range, or any
    other value Ray Serve's DeploymentSchema refuses (health_check_period_s: -1)."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    check_keys(entry, DeploymentSchema, f"applications[0].deployments {name} ")
    scaling = entry.get("autoscaling_config")
    if isinstance(scaling, dict):  # Ray drops its unknown keys without a word
        where = f"applications[0].deployments {name} autoscaling_config"
        check_keys(scaling, AutoscalingConfig, where + ".")
        if isinstance(scaling.get("policy"), dict):
            check_keys(scaling["policy"], AutoscalingPolicy, where + ".policy.")
        try:  # its values here: they were checked later, as args' and named there (helper-207)
            AutoscalingConfig(**{k: v for k, v in scaling.items() if k != "policy"})
        except ValidationError as exc:
            error = exc.errors()[0]
            key = "".join(f".{part}" for part in error["loc"])
            raise CLIError(f"--config: {where}{key}: {error['msg'].removeprefix('Value error, ')}") from None
    actor = entry.get("ray_actor_options")
    if isinstance(actor, dict):  # (an unknown key failed the deploy with a traceback after Ray had started)
        check_keys(actor, RayActorOptionsSchema, f"applications[0].deployments {name} ray_actor_options.")
        check_runtime_env(actor.get("runtime_env"), f"applications[0].deployments {name} ray_actor_options.runtime_env.")
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
    is left to `serve_config_checks.check_runtime_env`."""
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
