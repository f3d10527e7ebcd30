"""Settings and helpers of the integration tests' Serve apps, shared by tests/integrations/conftest.py and
the test modules that start apps of their own. A module with its own name: `from conftest import ...`
would resolve to whichever conftest.py was imported first when several test directories run together.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request

import httpx

API_KEY = "test-key-123"
ALLOWED_ORIGIN = "http://localhost:5173"  # a browser page the main app lets in (allowed_origins)
RUNNER_OPTIONS = {"num_blocks": 512}
ENGINE_OPTIONS = {"max_running": 8, "max_queue": 16, "token_budget": 256, "routing": {"calibrate": False}}
STRICT_ENGINE_OPTIONS = {"max_running": 1, "max_queue": 0, "token_budget": 256, "routing": {"calibrate": False}}
ENGINE_DEPLOYMENT = {"num_cpus": 0.5, "torch_threads": 1, "health_check_period_s": 5, "graceful_shutdown_timeout_s": 5}
# Ray Serve's controller gives a starting HTTP proxy actor 5 s to report ready (and a running one 10 s
# per health check), then kills it; on a loaded 2-core machine the proxy's process can take longer to
# start, and serve.start() fails with ActorDiedError ("killed by ray.kill"). Ray's processes inherit
# the environment of the process that starts Ray, so these are set before ray.init(); so is the proxy's
# X-Request-Id guard, which `refusion serve` installs likewise (integrations/request_id_guard.py).
RAY_SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
                 "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "integrations.request_id_guard:proxy_middlewares"}
STRICT_ALIAS = "gpt-4o-mini"  # the strict app's second served model id


def unstarted(deployment) -> object:
    """An instance of a Serve deployment's class (`deployment.func_or_class`) that Serve never started: no
    __init__ ran, so the attributes a test sets are all it has. Its async __del__ (which Serve awaits) is
    not run when it is garbage collected: Python would only make a coroutine nobody awaits, a
    RuntimeWarning in the test output. A test that shuts it down calls `deployment.func_or_class.__del__`."""
    cls = deployment.func_or_class
    return object.__new__(type(cls.__name__, (cls,), {"__del__": lambda self: None}))


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
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
        "pause_endpoints": True,  # (tests hold a request in the engine with POST /pause instead of racing its end)
    }
    config.update(overrides)
    return config


def long_stream(http: httpx.Client, path: str, headers: dict | None = None):
    body = {"prompt": "while True:\n", "max_tokens": 3000, "stream": True, "mode": "ar", "temperature": 0}
    return http.stream("POST", path, json=body, headers=headers or {})


@contextlib.contextmanager
def long_stream_admitted(http: httpx.Client, path: str, headers: dict, wait_s: float = 120.0):
    """Open a long stream on the strict app (one running request, no queue). Ray Serve's periodic
    health probe (a one-token forward) can hold that slot for a moment: retry while the engine answers
    'overloaded' (for at most wait_s seconds), then yield the line iterator."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with long_stream(http, path, headers) as response:
            lines = response.iter_lines()  # keep a reference: a collected iterator closes the stream
            if response.status_code == 200:
                yield lines
                return
            assert response.status_code == 503, response.read()
        time.sleep(0.25)
    raise AssertionError(f"the strict engine stayed busy for {wait_s} s")


class LocalApp:
    """The refusion app (openai_api.create_app, no Ray) over an engine in this process, served by uvicorn
    in a thread whose event loop also runs the engine: `url`, `app`, `engine`, `client`, and `call` to
    run a coroutine on that loop (engine.stop, the gate's drain) and return its result."""

    def __init__(self, url: str, app, engine, client, loop):
        self.url, self.app, self.engine, self.client, self._loop = url, app, engine, client, loop

    def call(self, coroutine, timeout_s: float = 60.0):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def settle(self, timeout_s: float = 2.0) -> None:
        """Wait (at most `timeout_s`, then return anyway) until no HTTP request is inside the app: its
        request-log line is written by then (the gate finishes a request before it stops counting it),
        so a test's last line lands in that test's captured output, not in the run's."""
        gate = self.app.state.gate
        deadline = time.monotonic() + timeout_s
        while gate.open_requests and time.monotonic() < deadline:
            time.sleep(0.005)


LIVE_APPS: list[LocalApp] = []  # local_app's apps now serving (tests/integrations/conftest.py settles them)


@contextlib.contextmanager
def local_app(model_dir, client_type=None, engine_options: dict | None = None, timeout_s: float = 300.0,
              limits: dict | None = None, settings: dict | None = None, runner_options: dict | None = None,
              max_model_len: int | None = None):
    """A LocalApp on `model_dir` (the shipped model, in tests that need its text) with `client_type`
    (default integrations.engine_client.LocalEngineClient: a subclass may record or pace the engine's
    deltas); routing calibration off, as in the Serve apps; `limits`: RequestLimits fields beside the
    model's context; `settings`: further APISettings fields; `runner_options`: ModelRunner options;
    `max_model_len`: the context served (ServeConfig.max_model_len). Torn down at exit (the engine
    stopped)."""
    import asyncio
    import threading

    import uvicorn

    from integrations.engine_client import LocalEngineClient, read_model_card
    from integrations.engine_host import build_engine
    from integrations.openai_api import APISettings, create_app
    from integrations.request_limits import RequestLimits
    from ports import server_socket

    engine, tokenizer = build_engine(model_dir, runner_options or {}, {"routing": {"calibrate": False}, **(engine_options or {})})
    card = read_model_card(model_dir, max_model_len=max_model_len)
    client = (client_type or LocalEngineClient)(engine, tokenizer, model_dir.name, card)
    request_limits = RequestLimits(context_length=card["limits"]["context_length"], **(limits or {}))  # as Serve's
    app = create_app(APISettings(model_name=model_dir.name, decode_defaults=card["defaults"], limits=request_limits,
                                 **(settings or {})), client)
    sock = server_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    loops = []

    async def run() -> None:
        loops.append(asyncio.get_running_loop())
        await engine.start()
        try:
            await server.serve(sockets=[sock])
        finally:
            await engine.stop(drain_timeout_s=1)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the local app did not start"
        time.sleep(0.05)
    live = LocalApp(f"http://127.0.0.1:{sock.getsockname()[1]}", app, engine, client, loops[0])
    LIVE_APPS.append(live)
    try:
        yield live
    finally:
        LIVE_APPS.remove(live)
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.asynccontextmanager
async def local_editor_session(model_dir, runner_options: dict | None = None):
    """An EditorSession over an engine in this process on `model_dir` (LocalEngineClient; routing
    calibration off, as in the Serve apps; `runner_options`: ModelRunner options, e.g. a small
    num_blocks), and the list its frames are sent to (msgpack-decoded). The engine is started here and
    stopped at exit."""
    import msgpack

    from integrations.editor.session import EditorSession
    from integrations.engine_client import LocalEngineClient
    from integrations.engine_host import build_engine

    engine, tokenizer = build_engine(model_dir, runner_options or {}, {"routing": {"calibrate": False}})
    await engine.start()
    frames: list = []

    async def send(data: bytes) -> None:
        frames.append(msgpack.unpackb(data, raw=False))

    try:
        yield EditorSession(LocalEngineClient(engine, tokenizer, model_dir.name), send), frames
    finally:
        await engine.stop(drain_timeout_s=1)
