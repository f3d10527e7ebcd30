"""An engine deployment that autoscales down to zero replicas, behind the real Ray Serve app.

/health probed an engine replica on every call. With none up (min_replicas 0) the probe waited for a
replica to start, timed out after 5 s with 503, and a load balancer checking /health then never sent the
request that would start one: `--autoscale 0:N` never left zero. Now /health does not probe while the
deployment is at zero by its autoscaling config (nor do /metrics and /v1/engine ask a replica, nor does
a request's 400 for a cap over the context), and the first request
starts a replica (Ray Serve's cold start from zero) and is served.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve_testbed import ENGINE_DEPLOYMENT, serve_config

APP, PREFIX = "refusion-zero", "/zero"
COLD_START_S = 240  # a replica's start on a loaded 2-core machine (model load, warm-up), with margin


def engine_replicas(app: str) -> dict:
    """{state: count} of the app's engine replicas, as Ray Serve's controller reports them."""
    from ray import serve

    return dict(serve.status().applications[app].deployments["RefusionEngine"].replica_states)


@pytest.fixture(scope="module")
def zero_url(serve_port, tiny_model_dir):
    from ray import serve

    from integrations.serve_app import build_app

    autoscaling = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "target_ongoing_requests": 2,
                   "upscale_delay_s": 0, "downscale_delay_s": 600, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    config = serve_config(tiny_model_dir, engine_deployment={**ENGINE_DEPLOYMENT, "autoscaling": autoscaling})
    serve.run(build_app(config), name=APP, route_prefix=PREFIX)  # returns once the ingress runs (no engine replica)
    try:
        yield f"http://127.0.0.1:{serve_port}{PREFIX}"
    finally:
        serve.delete(APP)


def test_health_answers_at_zero_replicas_and_the_first_request_starts_one(zero_url):
    assert sum(engine_replicas(APP).values()) == 0, engine_replicas(APP)  # initial_replicas 0
    with httpx.Client(base_url=zero_url, timeout=COLD_START_S) as http:
        for _ in range(3):  # a load balancer's probes: answered at once, and none of them starts a replica
            health = http.get("/health")
            assert health.status_code == 200, health.text
            assert health.json()["engine"] == "scaled_to_zero", health.json()
        engine = http.get("/v1/engine")  # a dashboard's poll: the ingress's part, and no replica started
        assert engine.status_code == 200 and engine.json()["scaled_to_zero"] is True, engine.text
        assert "engine" not in engine.json()  # (the engine's section, whose keys a replica fills in)
        assert engine.json()["request_limits"]["context_length"] > 0
        scraped = http.get("/metrics")  # a Prometheus scrape: answered, and it starts no replica either
        assert scraped.status_code == 200 and 'refusion_service_replicas{state="answering"} 0.0' in scraped.text
        assert 'refusion_service_replicas{state="unreachable"} 0.0' in scraped.text
        assert sum(engine_replicas(APP).values()) == 0, engine_replicas(APP)
        # A cap over the context is the context's 400 at once: the KV cache's admission check the ingress
        # asks an engine replica for that number (openai_requests.kv_bounded_request) would start one
        over = http.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 100_000}, timeout=10)
        assert over.status_code == 400 and "ask for at most" in over.json()["error"]["message"], over.text
        assert sum(engine_replicas(APP).values()) == 0, engine_replicas(APP)
        served = http.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 4, "ignore_eos": True})
        assert served.status_code == 200, served.text
        assert served.json()["usage"]["completion_tokens"] == 4
        assert engine_replicas(APP).get("RUNNING") == 1
        health = http.get("/health")  # a replica is up: probed again, as with a fixed replica count
        assert health.status_code == 200 and "engine" not in health.json(), health.json()
        assert "scaled_to_zero" not in http.get("/v1/engine").json()


async def test_a_slow_controller_read_holds_up_only_the_first_answer(monkeypatch):
    """/health and /metrics ask `scaled_to_zero` on every call; once its read of the deployment's
    min_replicas from Ray's controller was older than SCALING_CONFIG_TTL_S, the call waited for a new
    read, and on a loaded head node a scrape's engine section fell past its 2 s bound (helper-242). Now
    only the first call waits (one read for concurrent callers); later ones answer with the last read at
    once while one new read runs in the background. The controller is held still by an event."""
    import threading
    from types import SimpleNamespace

    import integrations.routing_state as routing_state
    import integrations.serve_engine_client as serve_engine_client

    controller = threading.Event()
    reads = []

    def engine_min_replicas(app, deployment):
        reads.append((app, deployment))
        assert controller.wait(30), "the test never let the controller answer"
        return 0 if len(reads) == 1 else 1  # min_replicas: 0, then 1 (changed in place by a `serve deploy`)

    monkeypatch.setattr(serve_engine_client, "engine_min_replicas", engine_min_replicas)
    monkeypatch.setattr(routing_state, "LIVE_REPLICAS", {})  # no replica is up
    handle = SimpleNamespace(options=lambda **_: None, app_name=APP, deployment_name="RefusionEngine")
    client = serve_engine_client.ServeEngineClient(handle, tokenizer=None, model_name="m")
    try:
        first = [asyncio.ensure_future(client.scaled_to_zero()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in first)  # the first answer waits for the controller
        controller.set()
        assert await asyncio.wait_for(asyncio.gather(*first), 30) == [True] * 3
        assert reads == [(APP, "RefusionEngine")]  # one read for the three

        controller.clear()
        monkeypatch.setattr(serve_engine_client, "SCALING_CONFIG_TTL_S", -1.0)  # every read is out of date
        assert await asyncio.wait_for(client.scaled_to_zero(), 5) is True  # at once, from the last read
        await until(lambda: len(reads) == 2)  # while a new read waits on the controller
        for _ in range(3):  # answered at once too, and no second read is started beside it
            assert await asyncio.wait_for(client.scaled_to_zero(), 5) is True
        assert len(reads) == 2
        controller.set()
        await until(lambda: client._scaling_reading.done())
        assert await client.scaled_to_zero() is False  # the new read's min_replicas 1
    finally:
        controller.set()


async def until(condition, bound_s: float = 30.0) -> None:
    """Wait for `condition()` to hold, checking every 10 ms; AssertionError after bound_s seconds."""
    for _ in range(int(bound_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{condition} did not hold within {bound_s:g} s")


async def test_the_ingress_reads_the_scaling_bounds_ahead_of_the_first_probe(monkeypatch):
    """The first /health or /metrics after an ingress replica started waited for Serve's controller: the
    read began only then. The ingress now starts it as it starts (`read_scaling_ahead`), so a first probe
    finds it done (no wait, no second read) or joins it; a read ahead that fails (the application still
    being deployed) is not kept, and the first probe reads again instead of trusting it."""
    import threading
    from types import SimpleNamespace

    import integrations.routing_state as routing_state
    import integrations.serve_engine_client as serve_engine_client

    controller, reads, answers = threading.Event(), [], [KeyError(APP), 0, 0]

    def engine_min_replicas(app, deployment):
        reads.append(app)
        assert controller.wait(30), "the test never let the controller answer"
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(serve_engine_client, "engine_min_replicas", engine_min_replicas)
    monkeypatch.setattr(routing_state, "LIVE_REPLICAS", {})  # no replica is up
    handle = SimpleNamespace(options=lambda **_: None, app_name=APP, deployment_name="RefusionEngine")
    try:
        failing = serve_engine_client.ServeEngineClient(handle, tokenizer=None, model_name="m")
        failing.read_scaling_ahead()
        controller.set()
        await until(lambda: failing._scaling_reading.done())
        assert failing._scaling_read is None  # the failed read ahead is not kept
        assert await asyncio.wait_for(failing.scaled_to_zero(), 30) is True  # read again: min_replicas 0
        assert len(reads) == 2

        client = serve_engine_client.ServeEngineClient(handle, tokenizer=None, model_name="m")
        client.read_scaling_ahead()
        await until(lambda: client._scaling_reading.done())
        controller.clear()  # any further read would now wait on the controller
        assert await asyncio.wait_for(client.scaled_to_zero(), 5) is True  # the read ahead answers at once
        assert len(reads) == 3
    finally:
        controller.set()
