"""integrations.http_metrics.RequestObserver: what one HTTP request adds to the refusion_api_* metrics,
for requests of several choices (n > 1: their deltas interleave, told apart by the engine request id)
and for requests the engine refused."""

from __future__ import annotations

import sys

from prometheus_client.parser import text_string_to_metric_families

from integrations.http_metrics import APIMetrics, RequestObserver
from scheduler.api import Delta, FinishReason, Mode


def samples(metrics: APIMetrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}


def final(rid: str, ids: list[int], mode: Mode, tpf: float, **stats) -> Delta:
    return Delta(rid, "x" * len(ids), ids, finished=True, finish_reason=FinishReason.LENGTH, mode=mode,
                 stats={"tokens_per_forward": tpf, "queue_time_s": 0.01, **stats})


def test_choices_are_timed_and_counted_each_on_its_own():
    """n=2, deltas interleaved: 3 deltas with tokens per choice are 2 inter-token gaps per choice (4,
    not the 5 gaps between consecutive deltas); each choice adds its own tokens per forward and mode."""
    metrics = APIMetrics()
    observer = RequestObserver(metrics, "completions", "r", prompt_tokens=7)
    for delta in (Delta("r-0", "a", [1]), Delta("r-1", "b", [2, 3]), Delta("r-0", "c", [4]),
                  Delta("r-1", "d", [5]), final("r-0", [6], Mode.AR, 1.0), final("r-1", [7, 8], Mode.REFUSION, 2.5)):
        observer.on_delta(delta)
    observer.finish(200)
    m = samples(metrics)
    key = (("endpoint", "completions"),)
    assert m[("refusion_api_inter_token_latency_seconds_count", key)] == 4
    assert m[("refusion_api_time_to_first_token_seconds_count", key)] == 1  # the request's first token
    assert m[("refusion_api_tokens_per_forward_count", ())] == 2 and m[("refusion_api_tokens_per_forward_sum", ())] == 3.5
    assert m[("refusion_api_mode_decisions_total", (("mode", "ar"),))] == 1
    assert m[("refusion_api_mode_decisions_total", (("mode", "refusion"),))] == 1
    assert m[("refusion_api_queue_time_seconds_count", ())] == 2
    assert observer.completion_tokens == m[("refusion_api_completion_tokens_total", ())] == 8
    assert m[("refusion_api_prompt_tokens_total", ())] == 7


def test_engine_reported_usage_is_summed_over_the_choices():
    """usage_from_engine (infill): each choice's generated_tokens replaces the ids its deltas carried."""
    observer = RequestObserver(APIMetrics(), "infill", "r", 3, usage_from_engine=True)
    observer.on_delta(Delta("r-0", "ab", [1, 2]))
    observer.on_delta(final("r-0", [3], Mode.AR, 1.0, generated_tokens=5))
    observer.on_delta(final("r-1", [4], Mode.AR, 1.0, generated_tokens=2))
    assert observer.completion_tokens == 7


def test_a_refused_request_adds_no_prompt_tokens():
    """A 400 (a duplicate X-Request-Id) or 503 (engine overloaded) with no output processed no prompt;
    a request the engine took counts its prompt, whether it ended well, failed mid-way or its client left."""
    metrics = APIMetrics()
    for status in (400, 503, 429):
        RequestObserver(metrics, "completions", f"refused-{status}", 90).finish(status)
    assert samples(metrics)[("refusion_api_prompt_tokens_total", ())] == 0
    left = RequestObserver(metrics, "completions", "left", 10)
    left.finish(499)
    failed = RequestObserver(metrics, "completions", "failed", 20)
    failed.on_delta(Delta("failed", "a", [1]))
    failed.finish(500, "engine step failed")
    RequestObserver(metrics, "completions", "ok", 40).finish(200)
    m = samples(metrics)
    assert m[("refusion_api_prompt_tokens_total", ())] == 70
    assert m[("refusion_api_requests_total", (("endpoint", "completions"), ("status", "503")))] == 1


def test_the_request_log_writes_to_the_stderr_of_the_moment(monkeypatch):
    """The request log bound the sys.stderr current when the module was imported: once that stream was
    closed (a test's capture), every request logged after it raised "I/O operation on closed file" (a
    serial run of tests/bench failed so, at any commit)."""
    import io

    from integrations.http_metrics import request_log

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    request_log.info("request", n=1)
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    request_log.info("request", n=2)
    assert '"n": 2' in second.getvalue()
