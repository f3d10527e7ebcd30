"""Deploying the application under `refusion serve` so that Ctrl-C and SIGTERM still stop it.

`serve.run` returns only once every replica is up, and it waits without limit for replicas the
cluster has no room for (more engine replicas than free CPUs or GPUs): Ray logs a warning every 30 s,
and the process, whose signal handlers only set an event, stayed deaf to Ctrl-C and SIGTERM until
`kill -9`, which left the application half-deployed. `deploy` submits the application without waiting
and then polls its status in the calling (main) thread, where a signal is seen within POLL_S.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

STILL_STARTING_NOTICE_S = 60.0  # a model load on a loaded machine takes tens of seconds; beyond this, say why it may wait
POLL_S = 0.5  # between status reads (Ray's own wait polls every second)


class DeployError(Exception):
    """Ray reports the application DEPLOY_FAILED (its replicas failed to start); the message is the first
    line of Ray's reason."""


def deploy(submit: Callable[[], object], status: Callable[[], tuple[str, str]], stop: threading.Event,
           notice: Callable[[str], None] = print, notice_after_s: float = STILL_STARTING_NOTICE_S) -> bool:
    """Deploy and wait until the application runs.

    submit: sends the application to Serve's controller without waiting for its replicas.
    status: (Ray's ApplicationStatus name, its message): "RUNNING", "DEPLOY_FAILED", "DEPLOYING", ...
    Returns True once the status is RUNNING (looked at once more when `stop` is set), False when `stop`
    is set first (a signal; the caller then removes the application, or drains the replicas already up).
    Raises DeployError on DEPLOY_FAILED. Calls `notice` once with a hint when the application is not
    running after `notice_after_s` seconds."""
    submit()
    started, noticed = time.monotonic(), False
    while True:
        state, message = status()
        if state == "RUNNING":
            return True
        if state == "DEPLOY_FAILED":
            raise DeployError(next(iter(message.strip().splitlines()), state))
        if stop.wait(POLL_S):
            # One more look: an application that came up since the last one is ready, and "stopped before
            # every replica was up" would be wrong (its replicas are drained either way)
            return status()[0] == "RUNNING"
        if not noticed and time.monotonic() - started > notice_after_s:
            noticed = True
            notice(f"still starting after {notice_after_s:g} s: replicas are loading the model or waiting for "
                   "room on the cluster (Ray's warnings above say which, e.g. more replicas than free CPUs or "
                   "GPUs: lower --replicas); Ctrl-C stops")


def serve_status(app_name: str) -> tuple[str, str]:
    """(status, message) of a Serve application from `serve.status()` ("NOT_STARTED" until it is known)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    return (str(getattr(app.status, "value", app.status)), app.message or "") if app is not None else ("NOT_STARTED", "")
