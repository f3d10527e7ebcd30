"""An engine deployment that autoscales down to zero replicas, behind the real Ray Serve app.

/health probed an engine replica on every call. With none up (min_replicas 0) the probe waited for a
replica to start, timed out after 5 s with 503, and a load balancer checking /health then never sent the
request that would start one: `--autoscale 0:N` never left zero. Now /health does not probe while the
deployment is at zero by its autoscaling config (nor do /metrics and /v1/engine ask a replica, nor does
a request's 400 for a cap over the context), and the first request
starts a replica (Ray Serve's cold start from zero) and is served.
"""

from __future__ import annotations

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
