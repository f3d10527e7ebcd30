"""Through the session's Ray Serve app: a 400 that used to leave the in-flight gauge raised for good, and
readiness (/health answers GET and HEAD, and only once the engine replica has warmed up). Replica death,
a cancel storm and SIGTERM need a server of their own: test_serve_process.py."""

from __future__ import annotations

import httpx
from test_serve_openai import _metric


def test_rejected_suffix_request_leaves_the_gauge_idle(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=30) as http:
        for _ in range(3):
            bad = http.post("/v1/completions", json={"prompt": [5, 6, 7], "suffix": "\nreturn x"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert _metric(serve_base_url, "refusion_api_requests_in_flight", endpoint="completions") == 0


def test_health_answers_head_and_only_after_warm_up(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=30) as http:
        head = http.head("/health")
        assert head.status_code == 200 and head.content == b""
        assert http.get("/health").json()["status"] == "ok"
        warmup = http.get("/v1/engine").json()["warmup"]  # ran in the replica before it took traffic
        assert warmup["requests"] == 2 and warmup["forwards"] >= 2
