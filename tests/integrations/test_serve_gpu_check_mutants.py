"""Gaps a mutation audit of the CUDA-engine GPU check (serve_deployment_checks.check_engine_gpus, applied by
serve_config_file.load_config_file) and of serve_preflight.reserve_gpu found: each test fails on a small
change to them that test_serve_config_checks.py and test_serve_units.py let through."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from integrations.serve_config_checks import CLIError
from integrations.serve_config_file import load_config_file
from integrations.serve_preflight import reserve_gpu

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, args: dict, engine_entry: dict | None = None) -> Path:
    """config/serve.yaml with `args` as its application's args and `engine_entry` as the engine's entry."""
    shipped = yaml.safe_load((REPO / "config" / "serve.yaml").read_text())
    shipped["applications"][0]["args"] = args
    if engine_entry is not None:
        shipped["applications"][0]["deployments"] = [{"name": "RefusionEngine", **engine_entry}]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(shipped))
    return path


@pytest.mark.parametrize("engine_entry, engine_deployment, place", [
    ({"ray_actor_options": {"num_gpus": False}}, {"num_gpus": 1},
     "applications[0].deployments RefusionEngine ray_actor_options.num_gpus: false"),
    (None, {"num_gpus": False}, "applications[0].args.engine_deployment.num_gpus: false"),
])
def test_a_num_gpus_of_false_reserves_no_gpu_and_is_refused(tmp_path, engine_entry, engine_deployment, place):
    """YAML `num_gpus: false` (or `no`, `off`) is Ray's 0 (Ray keeps the bool in ray_actor_options;
    ServeConfig reads it as 0.0): such a CUDA engine reserves no GPU, as with 0. The check passed any bool,
    so it went through unrefused."""
    with pytest.raises(CLIError) as err:
        load_config_file(_config(tmp_path, {"runner": {"device": "cuda"}, "engine_deployment": engine_deployment},
                                 engine_entry))
    assert str(err.value).startswith(f"--config: {place}, but applications[0].args.runner.device is cuda: "), err.value


def test_a_num_gpus_of_true_is_one_gpu_and_passes(tmp_path):
    config = _config(tmp_path, {"runner": {"device": "cuda"}, "engine_deployment": {"num_gpus": 0}},
                     {"ray_actor_options": {"num_gpus": True}})
    assert load_config_file(config).deployments["RefusionEngine"] == {"ray_actor_options": {"num_gpus": True}}


def test_an_empty_ray_actor_options_entry_reserves_no_gpu_and_is_refused(tmp_path):
    """`ray_actor_options: {}` in the engine's entry replaces engine_deployment's options whole
    (serve_app._with_overrides), num_gpus 1 included: Ray's default 0 is left. Read as no entry, the
    engine_deployment's 1 passed it."""
    with pytest.raises(CLIError, match=r"ray_actor_options\.num_gpus: left out \(Ray's default, 0"):
        load_config_file(_config(tmp_path, {"runner": {"device": "cuda"}, "engine_deployment": {"num_gpus": 1}},
                                 {"ray_actor_options": {}}))


def test_a_bare_args_file_with_a_cuda_engine_that_reserves_no_gpu_is_refused(tmp_path):
    """A --config file that is the application's args alone (no `applications:`) is checked as well: its
    keys are named from the top."""
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({"runner": {"device": "cuda:0"}, "engine_deployment": {"num_gpus": 0}}))
    with pytest.raises(CLIError) as err:
        load_config_file(path)
    assert str(err.value).startswith("--config: engine_deployment.num_gpus: 0, but runner.device is cuda:0: "), \
        err.value


def test_a_cluster_with_exactly_one_gpu_gets_it_reserved():
    engine: dict = {}
    assert reserve_gpu(engine, {"CPU": 8.0, "GPU": 1.0}) is True and engine == {"num_gpus": 1}
