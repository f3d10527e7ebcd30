"""Prometheus metrics of an engine: per-engine registry, latencies, load, tokens, TPF by mode."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from sched_fakes import FakeRunner, collect, make_engine

from scheduler.api import GenerationRequest, Mode


def samples(engine) -> dict:
    out = {}
    for family in text_string_to_metric_families(engine.metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_after_traffic():
    engine, _ = make_engine(runner=FakeRunner(num_blocks=128, delay_s=0.001), prefix_cache=False)
    other, _ = make_engine()
    await engine.start()
    await asyncio.gather(
        collect(engine, GenerationRequest("a", [5, 6, 7], {"gen_length": 6}, mode=Mode.AR)),
        collect(engine, GenerationRequest("b", [5, 6], {"gen_length": 8}, mode=Mode.REFUSION)),
    )
    m = samples(engine)
    assert m[("refusion_time_to_first_token_seconds_count", ())] == 2
    assert m[("refusion_e2e_latency_seconds_count", ())] == 2
    assert m[("refusion_queue_time_seconds_count", ())] == 2
    assert m[("refusion_inter_token_latency_seconds_count", ())] > 0
    assert m[("refusion_prompt_tokens_total", ())] == 5
    assert m[("refusion_generation_tokens_total", ())] == 14
    assert m[("refusion_tokens_per_forward_count", (("mode", "ar"),))] == 1
    assert m[("refusion_tokens_per_forward_count", (("mode", "refusion"),))] == 1
    assert m[("refusion_requests_finished_total", (("reason", "length"),))] == 2
    assert m[("refusion_requests_running", ())] == 0
    assert m[("refusion_kv_cache_usage_ratio", ())] == 0.0
    assert m[("refusion_forward_seconds_count", ())] == engine.forwards > 0
    # a second engine has its own registry: nothing leaks across
    assert samples(other)[("refusion_prompt_tokens_total", ())] == 0
    await engine.stop()
