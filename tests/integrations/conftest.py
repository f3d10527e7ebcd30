"""Integration fixtures: ONE local Ray instance and ONE Ray Serve application per test session.

    serve_base_url     "http://127.0.0.1:PORT": the refusion app on the random tiny model (no API keys,
                       roomy engine limits, browser origin ALLOWED_ORIGIN allowed); shared by the
                       OpenAI API, editor-protocol and bad-input tests.
    strict_base_url    "http://127.0.0.1:PORT/strict": a second app in the same Ray instance with
                       API_KEY required and a one-request engine (max_running=1, max_queue=0), for
                       auth and overload tests; started only when a test asks for it.

Ray is kept small (2 CPUs, no dashboard); both apps and Ray are shut down at session end.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

API_KEY = "test-key-123"
ALLOWED_ORIGIN = "http://localhost:5173"  # a browser page the main app lets in (allowed_origins)
RUNNER_OPTIONS = {"num_blocks": 512}
ENGINE_OPTIONS = {"max_running": 8, "max_queue": 16, "token_budget": 256, "routing": {"calibrate": False}}
STRICT_ENGINE_OPTIONS = {"max_running": 1, "max_queue": 0, "token_budget": 256, "routing": {"calibrate": False}}
ENGINE_DEPLOYMENT = {"num_cpus": 0.5, "torch_threads": 1, "health_check_period_s": 5, "graceful_shutdown_timeout_s": 5}
# Ray Serve's controller gives a starting HTTP proxy actor 5 s to report ready (and a running one 10 s
# per health check), then kills it; on a loaded 2-core machine the proxy's process can take longer to
# start, and serve.start() fails with ActorDiedError ("killed by ray.kill"). Ray's processes inherit
# the environment of the process that starts Ray, so these are set before ray.init().
RAY_SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def serve_config(model_dir, **overrides) -> dict:
    """The args of integrations.serve_app.build_app used by the tests."""
    config = {
        "model": str(model_dir),
        "runner": dict(RUNNER_OPTIONS),
        "engine": dict(ENGINE_OPTIONS),
        "engine_deployment": dict(ENGINE_DEPLOYMENT),
        "drain_timeout_s": 2.0,
        "health_probe_timeout_s": 10.0,
        "allowed_origins": [ALLOWED_ORIGIN],
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def serve_port():
    """A local Ray (2 CPUs, no dashboard) with Serve's HTTP proxy on a free port; torn down at the end."""
    import ray
    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        for name, value in RAY_SERVE_ENV.items():
            env.setenv(name, value)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 1024 * 1024, configure_logging=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_base_url(serve_port, tiny_model_dir) -> str:
    """The refusion Serve app on tiny_model_dir, route prefix "/"."""
    from ray import serve

    from integrations.serve_app import build_app

    serve.run(build_app(serve_config(tiny_model_dir)), name="refusion", route_prefix="/")
    url = f"http://127.0.0.1:{serve_port}"
    _wait_healthy(url)
    return url


@pytest.fixture(scope="session")
def strict_base_url(serve_port, tiny_model_dir) -> str:
    """A second app (prefix /strict) with API_KEY required and room for exactly one request."""
    from ray import serve

    from integrations.serve_app import build_app

    config = serve_config(tiny_model_dir, api_keys=[API_KEY], engine=dict(STRICT_ENGINE_OPTIONS))
    serve.run(build_app(config), name="refusion-strict", route_prefix="/strict")
    url = f"http://127.0.0.1:{serve_port}/strict"
    _wait_healthy(url)
    return url
