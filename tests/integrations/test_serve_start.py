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
