"""integrations/serve_start.deploy: the deploy wait of `refusion serve`, on a scripted status sequence
(the real process under a signal: test_serve_process.py)."""

from __future__ import annotations

import threading

import pytest

from integrations.serve_start import DeployError, deploy


def statuses(*states):
    """A status() that answers the given (state, message) pairs in turn, then the last one forever."""
    answers = list(states)

    def status():
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return status


def test_it_returns_once_the_application_runs():
    submitted = []
    assert deploy(lambda: submitted.append(1), statuses(("NOT_STARTED", ""), ("DEPLOYING", ""), ("RUNNING", "")),
                  threading.Event())
    assert submitted == [1]


def test_a_failed_deploy_is_one_line_of_rays_reason():
    reason = "user_config or rank specified but deployment RefusionEngine missing reconfigure method\nTraceback ..."
    with pytest.raises(DeployError, match="^user_config or rank specified but deployment RefusionEngine missing "
                                          "reconfigure method$"):
        deploy(lambda: None, statuses(("DEPLOYING", ""), ("DEPLOY_FAILED", reason)), threading.Event())


def test_a_stop_while_deploying_returns_false_after_one_notice():
    stop, notices = threading.Event(), []

    def notice(text):
        notices.append(text)
        stop.set()  # the user reads it and presses Ctrl-C

    assert not deploy(lambda: None, statuses(("DEPLOYING", "")), stop, notice=notice, notice_after_s=0)
    assert len(notices) == 1 and "lower --replicas" in notices[0]


def test_an_application_up_by_the_time_the_stop_is_seen_is_ready():
    """Ctrl-C as the last replica came up, after a look that said DEPLOYING: it was reported as stopped
    "before every replica was up" though every one was (the drain was right either way)."""
    stop = threading.Event()
    stop.set()
    assert deploy(lambda: None, statuses(("DEPLOYING", ""), ("RUNNING", "")), stop)
    assert not deploy(lambda: None, statuses(("DEPLOYING", ""), ("DEPLOYING", "")), stop)
    for later in ("DEPLOY_FAILED", "UNHEALTHY", "NOT_STARTED"):  # only RUNNING is ready
        assert not deploy(lambda: None, statuses(("DEPLOYING", ""), (later, "")), stop)


def test_a_stop_as_the_application_comes_up_drains_without_saying_ready(monkeypatch, capsys):
    """Ctrl-C as the last replica came up (deploy returns True with the stop set): "ready at ... (Ctrl-C to
    stop)" was printed, and the drain began at once. It says it was stopped as every replica came up, then
    drains as before. Ray's calls are stand-ins: deploy, the application, the drain signal and the drain."""
    import argparse
    import types

    import integrations.serve_app as serve_app
    import integrations.serve_drain as serve_drain
    import integrations.serve_start as serve_start
    from integrations import cli_serve

    def deploy(submit, status, stop, notice):
        stop.set()  # the Ctrl-C, after the last look that said DEPLOYING
        return True  # the look once more: RUNNING

    monkeypatch.setattr(serve_start, "deploy", deploy)
    monkeypatch.setattr(serve_app, "application", lambda config, deployments: None)
    monkeypatch.setattr(serve_drain, "drain_signal", lambda app_name: None)
    monkeypatch.setattr(serve_drain, "drain_app", lambda app_name, signal, drain_timeout_s, give_up: True)
    file = types.SimpleNamespace(args={}, http={"host": "127.0.0.1", "port": 8000}, deployments=None)
    signals, progress = cli_serve._StopSignals(), cli_serve._Progress()
    assert cli_serve._deploy_and_drain(argparse.Namespace(address=None), file, signals, progress) == 0
    said = capsys.readouterr().out
    assert "ready at" not in said and progress.ready, said
    assert said.splitlines() == ["refusion serve: stopped as every replica came up; they are drained",
                                 "refusion serve: draining: running requests get up to 20 s (Ctrl-C again: stop now)",
                                 "refusion serve: drained; shutting down"], said


def test_a_sigterm_while_ray_starts_reaches_the_callers_handler():
    """ray.init first sets a SIGTERM handler that calls sys.exit: a SIGTERM while Ray started ended the
    process inside ray.init and left the agents it had started running (a break-test). start_ray keeps
    the caller's handler, which only sets `refusion serve`'s stop event."""
    import inspect
    import os
    import signal
    import sys

    import ray
    from ray._private import utils as ray_utils

    from integrations.cli_serve import start_ray

    assert "set_sigterm_handler" in inspect.getsource(ray.init)  # what start_ray holds off, in this Ray

    class RayStarting:
        def init(self, **kwargs):
            ray_utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))  # as ray.init does first
            os.kill(os.getpid(), signal.SIGTERM)  # the operator's SIGTERM, while Ray starts

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("stop"))
    original = ray_utils.set_sigterm_handler
    try:
        assert start_ray(RayStarting(), None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["stop"] and ray_utils.set_sigterm_handler is original


def test_the_starting_replicas_a_local_ray_must_hold():
    """serve_app.starting_demand and cli_serve.room_problem: what a local Ray must hold before any replica
    starts (the real process: test_serve_process.py)."""
    from integrations.cli_serve import room_problem
    from integrations.serve_app import starting_demand
    from integrations.serve_config import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT

    scaled = starting_demand({"engine_deployment": {"autoscaling": {"min_replicas": 0, "max_replicas": 8}}})
    assert scaled[ENGINE_DEPLOYMENT] == (0, {"CPU": 1.0})  # scale to zero starts none: nothing to hold
    initial = starting_demand({"engine_deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 8,
                                                                     "initial_replicas": 3}}})
    assert initial[ENGINE_DEPLOYMENT] == (3, {"CPU": 1.0}) and initial[INGRESS_DEPLOYMENT] == (1, {})
    # a `deployments:` entry replaces the count and the actor options (Ray Serve's default: 1 CPU)
    file = starting_demand({}, {ENGINE_DEPLOYMENT: {"num_replicas": 2, "ray_actor_options": {"num_gpus": 1}}})
    assert file[ENGINE_DEPLOYMENT] == (2, {"CPU": 1.0, "GPU": 1.0})
    assert room_problem(file, {"CPU": 2.0, "GPU": 2.0}, "--replicas") is None
    gpus = room_problem(file, {"CPU": 16.0, "GPU": 1.0}, "--replicas")
    assert gpus.startswith("--replicas: the replicas at start need 2 GPUs (2 engine x 1)") and "at most 1 engine replica," in gpus
    cpus = room_problem(starting_demand({"engine_deployment": {"num_replicas": 2}, "ingress": {"num_cpus": 0.5}}),
                        {"CPU": 2.0}, "--replicas")
    assert "need 2.5 CPUs (2 engine x 1, 1 ingress x 0.5)" in cpus and "at most 1 engine replica," in cpus
    assert "engine_deployment.num_cpus or ingress.num_cpus" in cpus
    # the ingress alone past the machine (helper-185: the advice named only the engine): no engine count fits
    wide = room_problem(starting_demand({"ingress": {"num_replicas": 3, "num_cpus": 1}}), {"CPU": 2.0}, "--config f")
    assert wide.startswith("--config f: the replicas at start need 4 CPUs (1 engine x 1, 3 ingress x 1)")
    assert "at most" not in wide and "ingress.num_cpus" in wide
    # a custom resource no node of a local Ray has (helper-185: config/serve.yaml's accelerator_type example)
    custom = room_problem(starting_demand({"engine_deployment": {"resources": {"accelerator_type:H200": 0.001}}}),
                          {"CPU": 2.0}, "the default settings")
    assert "of Ray resource 'accelerator_type:H200' (1 engine x 0.001)" in custom
    assert "no node here has it: remove it (engine_deployment.resources.accelerator_type:H200)" in custom
