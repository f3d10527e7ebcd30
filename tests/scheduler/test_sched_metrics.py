"""Prometheus metrics of an engine: per-engine registry, latencies, load, tokens, TPF by mode."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from sched_fakes import FakeRunner, collect, make_engine

from scheduler.api import ENGINE_STOPPED, GenerationRequest, Mode


def samples(engine) -> dict:
    out = {}
    for family in text_string_to_metric_families(engine.metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_kv_capacity_is_exported_before_any_request():
    """/metrics agrees with /v1/engine from the start: the pool's size, none of it used."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=128))
    m = samples(engine)
    assert m[("refusion_kv_blocks_capacity", ())] == engine.kv.pool().num_total > 0
    assert m[("refusion_kv_blocks_used", ())] == 0 and m[("refusion_kv_cache_usage_ratio", ())] == 0.0
    # The closed label sets are series at 0 from the start (a dashboard read "no data" before the first)
    assert [m[("refusion_preemptions_total", (("cause", c),))] for c in ("kv", "interactive")] == [0, 0]
    assert all(m[("refusion_requests_finished_total", (("reason", r),))] == 0
               for r in ("stop", "length", "deadline", "cancelled", "error", "shutdown"))
    assert [m[("refusion_requests_rejected_total", (("reason", r),))] for r in ("not_running", "queue_full")] == [0, 0]
    assert not any(name.endswith("_created") for name, _ in m)  # no creation-time series (as vLLM)
    stats = engine.stats()  # /v1/engine's engine block: the scheduling limits in force
    assert (stats["max_running"], stats["max_queue"]) == (engine.config.max_running, engine.config.max_queue)


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
    # an infill's suffix is prefilled after the gap: prompt tokens too (/infill's tokens_evaluated counts it)
    await collect(engine, GenerationRequest("c", [5, 6], {"gen_length": 4}, mode=Mode.AR, suffix_ids=[7, 8, 9]))
    assert samples(engine)[("refusion_prompt_tokens_total", ())] == 5 + 5
    await engine.stop()


async def test_a_request_the_stopping_engine_cuts_finishes_by_shutdown():
    """A request still running at the drain timeout finishes CANCELLED (its stream says "engine
    stopped"), counted under reason `shutdown`, not with the requests whose client left (`cancelled`)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=128, delay_s=0.01))
    await engine.start()
    left, cut = (asyncio.ensure_future(collect(engine, GenerationRequest(rid, [5, 6], {"gen_length": 200}, mode=Mode.AR)))
                 for rid in ("left", "cut"))
    while engine.stats()["running"] < 2:
        assert not cut.done() and not left.done()
        await asyncio.sleep(0.01)
    left.cancel()  # its client went away
    await asyncio.gather(left, return_exceptions=True)
    await engine.stop(drain_timeout_s=0)
    assert (await cut)[-1].error == ENGINE_STOPPED
    m = samples(engine)
    assert m[("refusion_requests_finished_total", (("reason", "shutdown"),))] == 1
    assert m[("refusion_requests_finished_total", (("reason", "cancelled"),))] == 1


async def test_the_servers_own_requests_are_not_counted():
    """Health probes (one every 10 s) and warm-ups are internal: decoded like any request, but kept out
    of the request metrics and the router's estimates (they outnumbered real requests on an idle server)."""
    engine, _ = make_engine(runner=FakeRunner(num_blocks=128, delay_s=0.001))
    await engine.start()
    counted = ("refusion_prompt_tokens_total", "refusion_generation_tokens_total", "refusion_e2e_latency_seconds_count",
               "refusion_time_to_first_token_seconds_count", "refusion_queue_time_seconds_count")
    before, classes = samples(engine), engine.stats()["class_stats"]
    for i in range(3):
        probe = await collect(engine, GenerationRequest(f"p{i}", [5, 6, 7], {"gen_length": 6}, mode=Mode.AR, internal=True))
        assert probe[-1].finished and sum(len(d.token_ids) for d in probe) == 6  # decoded in full
    after = samples(engine)
    assert all(after.get((name, ()), 0) == before.get((name, ()), 0) for name in counted)
    assert not any(name == "refusion_mode_decisions_total" for name, _ in after)
    assert engine.stats()["class_stats"] == classes  # the router learned nothing from them
    assert engine.stats()["prefix_cache_hit_rate"] == 0.0 and engine.prefix_cache.lookup_tokens == 0  # nor the cache
    await collect(engine, GenerationRequest("real", [5, 6, 7], {"gen_length": 6}, mode=Mode.AR))
    assert samples(engine)[("refusion_prompt_tokens_total", ())] == before.get(("refusion_prompt_tokens_total", ()), 0) + 3
    await engine.stop()


async def test_a_preempted_request_counts_once_in_the_request_metrics():
    """A preempted request starting again is not a new request: queue time, mode decisions and the prefix
    cache's lookups count it once (its rerun hitting its own prompt's blocks read as a 43% hit rate where
    no two requests shared a prefix), and its usage keeps the cached tokens of its first start."""
    from scheduler.api import Priority

    engine, _ = make_engine(runner=FakeRunner(num_blocks=256, delay_s=0.002), max_running=1)
    await engine.start()
    batch = engine.submit(GenerationRequest("batch", [5 + i % 30 for i in range(40)], {"gen_length": 64}, mode=Mode.AR))
    first = [await batch.__anext__()]  # running, its prompt's full blocks in the prefix cache
    inter = await collect(engine, GenerationRequest("inter", [7, 8, 9], {"gen_length": 4}, mode=Mode.AR,
                                                    priority=Priority.INTERACTIVE))
    deltas = first + [d async for d in batch]
    await engine.stop()
    assert deltas[-1].stats["preemptions"] == 1 and inter[-1].stats["preemptions"] == 0
    assert deltas[-1].stats["cached_prompt_tokens"] == 0  # its first start found nothing cached
    m = samples(engine)
    assert m[("refusion_queue_time_seconds_count", ())] == 2
    assert sum(v for (name, _), v in m.items() if name == "refusion_mode_decisions_total") == 2
    assert m[("refusion_prefix_cache_lookup_tokens_total", ())] == 40 + 3
    assert m[("refusion_prefix_cache_hit_tokens_total", ())] == 0
