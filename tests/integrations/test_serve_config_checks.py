"""integrations/serve_config_checks.py: the runtime_env of a `refusion serve --config` file, the
application's and a deployment's (ray_actor_options, whose keys are checked too), is checked against what
the installed Ray takes; no Ray starts here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from integrations.serve_config_checks import CLIError
from integrations.serve_config_file import load_config_file

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, app: dict | None = None, engine_entry: dict | None = None) -> Path:
    """config/serve.yaml with `app` merged into its application and `engine_entry` as its engine
    deployment's entry, written to tmp_path."""
    shipped = yaml.safe_load((REPO / "config" / "serve.yaml").read_text())
    shipped["applications"][0].update(app or {})
    if engine_entry is not None:
        shipped["applications"][0]["deployments"] = [{"name": "RefusionEngine", **engine_entry}]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(shipped))
    return path


def _ray_fields() -> set[str]:
    """The runtime_env keys the installed Ray's RuntimeEnv names: its fields and keyword arguments."""
    import inspect

    from ray.runtime_env import RuntimeEnv

    keywords = inspect.signature(RuntimeEnv.__init__).parameters
    return set(RuntimeEnv.known_fields) | {k for k, p in keywords.items() if p.kind is p.KEYWORD_ONLY} - {"_validate"}


@pytest.mark.parametrize("app, engine_entry, place", [
    ({"runtime_env": {"env_vars": {"A": "1"}, "bogus": 1}}, None, "applications[0].runtime_env.bogus"),
    ({"runtime_env": {"env_var": {"A": "1"}}}, None, "applications[0].runtime_env.env_var"),  # a typo of env_vars
    (None, {"ray_actor_options": {"runtime_env": {"bogus": 1}}},
     "applications[0].deployments RefusionEngine ray_actor_options.runtime_env.bogus"),
    ({"runtime_env": {"config": {"setup_timeout_seconds": 60, "bogus": 1}}}, None,
     "applications[0].runtime_env.config.bogus"),
])
def test_a_runtime_env_key_ray_does_not_know_is_named_with_the_ones_it_does(tmp_path, app, engine_entry, place):
    """Ray's RuntimeEnv takes any key as a plugin's, and its runtime env agent drops one no plugin claims
    with a warning in a session log file: `runtime_env: {bogus: 1}` was accepted and did nothing."""
    with pytest.raises(CLIError) as err:
        load_config_file(_config(tmp_path, app, engine_entry))
    said = str(err.value)
    assert said.startswith(f"--config: {place}: not a runtime_env "), said
    if not place.endswith("config.bogus"):
        assert "env_vars, " in said and "working_dir" in said and "RAY_RUNTIME_ENV_PLUGINS" in said, said
        assert ", _" not in said and "are _" not in said, said  # (Ray's private _ray_release, ... are accepted, not offered)
    else:
        assert "setup_timeout_seconds" in said, said


def test_every_runtime_env_key_ray_knows_passes(tmp_path):
    """Every field and keyword name of the installed Ray's RuntimeEnv (env_vars, pip, uv, conda,
    container, image_uri, nsight and _nsight, ...) passes, at the application and in ray_actor_options."""
    fields = _ray_fields()
    assert {"env_vars", "pip", "uv", "conda", "working_dir", "py_modules", "nsight", "config"} <= fields
    every = {key: None for key in fields}  # (the check here is of keys)
    file = load_config_file(_config(tmp_path, {"runtime_env": every}, {"ray_actor_options": {"runtime_env": every}}))
    assert file.runtime_env == every


def test_a_plugin_that_ray_runtime_env_plugins_loads_passes(tmp_path, monkeypatch):
    """A runtime env plugin's field passes when RAY_RUNTIME_ENV_PLUGINS in this shell loads the plugin
    (as a local Ray's agent, which inherits the variable, does); an unloadable list is named."""
    (tmp_path / "my_plugin.py").write_text(
        "from ray._private.runtime_env.plugin import RuntimeEnvPlugin\n\n\n"
        "class MyPlugin(RuntimeEnvPlugin):\n    name = 'my_plugin'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _config(tmp_path, {"runtime_env": {"my_plugin": {"level": 1}}})
    with pytest.raises(CLIError, match="applications\\[0\\].runtime_env.my_plugin: not a runtime_env field"):
        load_config_file(path)
    monkeypatch.setenv("RAY_RUNTIME_ENV_PLUGINS", '[{"class": "my_plugin.MyPlugin"}]')
    assert load_config_file(path).runtime_env == {"my_plugin": {"level": 1}}
    monkeypatch.setenv("RAY_RUNTIME_ENV_PLUGINS", '[{"class": "no_such_module.Plugin"}]')
    with pytest.raises(CLIError, match="^RAY_RUNTIME_ENV_PLUGINS: Ray cannot load its plugins"):
        load_config_file(path)


@pytest.mark.parametrize("env, said", [
    ({"env_vars": {"A": 1}}, "applications[0].runtime_env: runtime_env['env_vars'] must be of type Dict[str, str]"),
    ({"pip": ["requests"], "conda": "base"}, "applications[0].runtime_env: The 'pip' field, 'uv' field, and 'conda' "
                                             "field of runtime_env cannot be specified at the same time."),
    ({"working_dir": "/nonexistent/dir"}, "applications[0].runtime_env: /nonexistent/dir is not a valid path"),
])
def test_a_runtime_env_value_ray_refuses_is_named_before_ray_starts(tmp_path, env, said):
    """ray.init checks the job's runtime_env only after it has started a local Ray: env_vars that are not
    strings were a TypeError traceback, pip beside conda a ValueError that start_ray reported as "cannot
    join the Ray cluster at None"; each is named at the config check now (a deployment's too)."""
    with pytest.raises(CLIError) as err:
        load_config_file(_config(tmp_path, {"runtime_env": env}))
    assert str(err.value).startswith(f"--config: {said}"), str(err.value)
    with pytest.raises(CLIError, match="^--config: applications\\[0\\].deployments RefusionEngine "
                                       "ray_actor_options.runtime_env: "):
        load_config_file(_config(tmp_path, engine_entry={"ray_actor_options": {"runtime_env": env}}))
    assert load_config_file(_config(tmp_path, {"runtime_env": {"env_vars": {"A": "1"}, "pip": ["requests"],
                                                               "working_dir": str(tmp_path)}})).runtime_env


def test_a_ray_actor_options_key_ray_serve_does_not_know_is_named(tmp_path):
    """An unknown ray_actor_options key passed the config check and failed the deploy with a ValueError
    traceback after Ray had started (application() builds the deployment options)."""
    with pytest.raises(CLIError) as err:
        load_config_file(_config(tmp_path, engine_entry={"ray_actor_options": {"num_cpus": 1, "num_cpu": 2}}))
    said = str(err.value)
    assert said.startswith("--config: applications[0].deployments RefusionEngine ray_actor_options.num_cpu: not a "
                           "Ray Serve config key; the keys here are "), said
    assert "num_cpus" in said and "runtime_env" in said, said
    entry = {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0, "memory": 10**9, "resources": {}, "runtime_env": {}}}
    assert load_config_file(_config(tmp_path, engine_entry=entry)).deployments["RefusionEngine"] == entry


@pytest.mark.parametrize("options, place, said", [
    ({"num_cpus": "one"}, "num_cpus", "valid number, unable to parse string as a number, got 'one'"),
    ({"num_gpus": -1}, "num_gpus", "greater than or equal to 0, got -1"),
    ({"memory": "1G"}, "memory", "got '1G'"),
    ({"resources": {"accel": "two"}}, "resources.accel", "expected a finite number >= 0"),
    ({"resources": {"CPU": 1}}, "", "Use the 'num_cpus' and 'num_gpus' keyword instead"),
    ({"num_cpus": float("inf")}, "num_cpus", "expected a finite number >= 0, got inf"),  # (helper-217: a traceback)
    ({"memory": float("inf")}, "memory", "expected a finite number >= 0, got inf"),
    ({"resources": {"accel": float("nan")}}, "resources.accel", "expected a finite number >= 0"),
    ({"resources": {5: 1}}, "resources", "a resource's name is a string, got 5"),
])
def test_a_ray_actor_options_value_ray_serve_refuses_is_named_with_its_deployment_and_key(tmp_path, options, place,
                                                                                         said):
    """A ray_actor_options value Ray Serve refuses (`num_cpus: "one"`) passed the config check and failed
    the deploy after Ray had started, named only as `applications[0].deployments`."""
    with pytest.raises(CLIError) as err:
        load_config_file(_config(tmp_path, engine_entry={"ray_actor_options": options}))
    where = "--config: applications[0].deployments RefusionEngine ray_actor_options" + (f".{place}" if place else "")
    assert str(err.value).startswith(where + ": ") and said in str(err.value), str(err.value)


@pytest.mark.parametrize("app, flags, place", [
    ({"runtime_env": 5}, [], "applications[0].runtime_env"),
    ({"args": 5}, [], "applications[0].args"),
    ({"args": {"runner": 5}}, ["--dtype", "float32"], "applications[0].args.runner"),
    ({"args": {"engine": [1]}}, ["--max-num-seqs", "2"], "applications[0].args.engine"),
])
def test_a_section_that_is_no_mapping_is_named_at_its_place(tmp_path, app, flags, place):
    """A runtime_env, args, or args section a flag sets a key of, that is no mapping, was named by its key
    alone (`runtime_env: must be a mapping`), not where it sits in the file."""
    import argparse

    from integrations import cli_serve

    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    with pytest.raises(CLIError) as raised:
        cli_serve.merged_config(parser.parse_args(["--config", str(_config(tmp_path, app)), *flags]))
    assert str(raised.value).startswith(f"--config: {place}: must be a mapping of settings"), raised.value


@pytest.mark.parametrize("name, entry, said", [
    ("RefusionIngress", {"health_check_period_s": -1}, "health_check_period_s: Input should be greater than 0, got -1"),
    ("RefusionIngress", {"health_check_timeout_s": 0}, "health_check_timeout_s: Input should be greater than 0, got 0"),
    ("RefusionEngine", {"graceful_shutdown_wait_loop_s": -1},
     "graceful_shutdown_wait_loop_s: Input should be greater than or equal to 0, got -1"),
    ("RefusionEngine", {"graceful_shutdown_timeout_s": "abc"}, "graceful_shutdown_timeout_s: Input should be a valid number"),
    ("RefusionIngress", {"max_queued_requests": -5}, "max_queued_requests must be -1 (no limit) or a positive integer"),
])
def test_a_deployment_value_ray_serve_refuses_is_named_with_its_deployment_and_key(tmp_path, name, entry, said):
    """A deployment entry's value Ray Serve refuses was named by Deployment.options()'s error as
    `applications[0].args.<key>`, a place not in the file, without the deployment; it is checked with the
    file, at the entry's own place."""
    with pytest.raises(CLIError) as err:
        load_config_file(_config(tmp_path, {"deployments": [{"name": name, **entry}]}))
    assert str(err.value).startswith(f"--config: applications[0].deployments {name}") and said in str(err.value), \
        str(err.value)
    good = {"health_check_period_s": 5, "health_check_timeout_s": 10, "max_queued_requests": -1,
            "graceful_shutdown_wait_loop_s": 0, "graceful_shutdown_timeout_s": 30}
    assert load_config_file(_config(tmp_path, {"deployments": [{"name": name, **good}]})).deployments[name] == good


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("engine_entry, engine_deployment, place", [
    ({"ray_actor_options": {"num_cpus": 1, "num_gpus": 0}}, {"num_gpus": 1},
     "applications[0].deployments RefusionEngine ray_actor_options.num_gpus: 0"),
    ({"ray_actor_options": {"num_cpus": 2}}, {"num_gpus": 1},  # (it replaces engine_deployment's whole options)
     "applications[0].deployments RefusionEngine ray_actor_options.num_gpus: left out (Ray's default, 0; this "
     "mapping replaces engine_deployment's num_gpus)"),
    (None, {"num_gpus": 0}, "applications[0].args.engine_deployment.num_gpus: 0"),
])
def test_a_cuda_engine_that_reserves_no_gpu_is_refused(tmp_path, device, engine_entry, engine_deployment, place):
    """runner.device cuda with engine replicas that reserve no GPU: Ray (ray/_private/accelerators/
    accelerator.py, ray-project/ray#54868) leaves CUDA_VISIBLE_DEVICES alone for an actor with num_gpus 0,
    so each replica saw the node's GPUs unreserved and two could load onto one unplanned. It passed the
    config check; it is refused there now, naming the key and what to set."""
    app = {"args": {"runner": {"device": device}, "engine_deployment": engine_deployment}}
    with pytest.raises(CLIError) as err:
        load_config_file(_config(tmp_path, app, engine_entry))
    said = str(err.value)
    assert said.startswith(f"--config: {place}, but applications[0].args.runner.device is {device}: "), said
    assert "set num_gpus: 1" in said and "runner.device: cpu" in said and "\n" not in said, said


@pytest.mark.parametrize("runner, engine_entry, engine_deployment, runtime_env", [
    ({"device": "cuda"}, {"ray_actor_options": {"num_gpus": 1}}, {"num_gpus": 0}, None),  # the entry wins
    ({"device": "cuda"}, {"ray_actor_options": {"num_gpus": 0.5}}, {}, None),  # a GPU shared on purpose
    ({"device": "cuda"}, None, {"num_gpus": 1}, None),
    ({"device": "cuda"}, None, {}, None),  # (refusion serve asks for one when the cluster has GPUs)
    ({"device": "cpu"}, {"ray_actor_options": {"num_gpus": 0}}, {"num_gpus": 0}, None),
    ({}, None, {"num_gpus": 0}, None),  # the shipped config: the runner's default device
    ({"device": "cuda"}, {"ray_actor_options": {"num_gpus": 0, "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": "1"}}}},
     {}, None),  # GPUs picked by hand
    ({"device": "cuda"}, None, {"num_gpus": 0}, {"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}}),
])
def test_an_engine_with_its_gpu_reserved_or_on_the_cpu_passes(tmp_path, runner, engine_entry, engine_deployment,
                                                               runtime_env):
    app = {"args": {"runner": runner, "engine_deployment": engine_deployment}}
    if runtime_env is not None:
        app["runtime_env"] = runtime_env
    assert load_config_file(_config(tmp_path, app, engine_entry)).args["runner"] == runner
