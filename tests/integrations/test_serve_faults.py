"""Through the session's Ray Serve app: a 400 that used to leave the in-flight gauge raised for good, and
readiness (/health answers GET and HEAD, and only once the engine replica has warmed up). Replica death,
a cancel storm and SIGTERM need a server of their own: test_serve_process.py."""

from __future__ import annotations

import httpx
from test_serve_openai import _metric


def test_rejected_suffix_request_leaves_the_gauge_idle(serve_base_url, wait_until):
    with httpx.Client(base_url=serve_base_url, timeout=30) as http:
        for _ in range(3):
            bad = http.post("/v1/completions", json={"prompt": [5, 6, 7], "suffix": "\nreturn x"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    # The gauge drops when the response has been sent (just after the client has it); a leak never drops.
    wait_until.blocking(lambda: _metric(serve_base_url, "refusion_api_requests_in_flight", endpoint="completions") == 0,
                        "the in-flight gauge to return to 0")


def test_health_answers_head_and_only_after_warm_up(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=30) as http:
        head = http.head("/health")
        assert head.status_code == 200 and head.content == b""
        assert http.get("/health").json()["status"] == "ok"
        warmup = http.get("/v1/engine").json()["warmup"]  # ran in the replica before it took traffic
        assert warmup["requests"] == 2 and warmup["forwards"] >= 2


async def test_a_bad_request_never_fails_the_streams_it_would_have_shared_a_forward_with(serve_base_url):
    # Issue 11 item 1's repro: 3 AR streams in flight, then a seed the engine cannot take. It is refused
    # with a 400 naming the field before it reaches a forward; the innocent streams finish normally.
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{serve_base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id
    body = {"model": model, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 48}
    streams = [await client.completions.create(**body, stream=True, extra_body={"mode": "ar"}) for _ in range(3)]
    firsts = [await stream.__anext__() for stream in streams]  # each one is running in the engine now
    async with httpx.AsyncClient(base_url=serve_base_url, timeout=30) as http:
        bad = await http.post("/v1/completions", json={"prompt": "def g(y):\n", "seed": 18446744073709551616,
                                                       "mode": "ar", "temperature": 0.7})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
    for first, stream in zip(firsts, streams):
        chunks = [first] + [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    await client.close()
