"""Service-wide metrics (integrations/service_metrics.py) from two real engine metric registries."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from integrations.service_metrics import ReplicaMetrics, combine
from scheduler.metrics import EngineMetrics


def _engine(running, waiting, used, total, lookups, hits, finished):
    m = EngineMetrics()
    m.update_gauges(running, waiting, SimpleNamespace(num_free=total - used, num_total=total),
                    SimpleNamespace(hit_rate=hits / lookups, lookup_tokens=lookups, hit_tokens=hits, num_blocks=used // 2))
    for reason in finished:
        m.finished.labels(reason=reason).inc()
    m.tpf.labels(mode="refusion").observe(1.7)
    return m.render()


def _samples(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_sums_ratios_and_labels():
    a = ReplicaMetrics("rep-a", "head", _engine(3, 1, 10, 100, 400, 300, ["stop", "stop"]))
    b = ReplicaMetrics("rep-b", "node-b", _engine(2, 0, 30, 100, 100, 0, ["length"]))
    out = _samples(combine([a, b], unreachable=1, decisions={"affinity": 5}))
    assert out[("refusion_requests_running", (("node", "head"), ("replica", "rep-a")))] == 3
    assert out[("refusion_requests_running", (("node", "node-b"), ("replica", "rep-b")))] == 2
    assert out[("refusion_service_requests_running", ())] == 5
    assert out[("refusion_service_requests_waiting", ())] == 1
    assert out[("refusion_service_requests_finished_total", (("reason", "stop"),))] == 2
    assert out[("refusion_service_requests_finished_total", (("reason", "length"),))] == 1
    assert out[("refusion_service_tokens_per_forward_count", (("mode", "refusion"),))] == 2
    assert out[("refusion_service_kv_cache_usage_ratio", ())] == 40 / 200  # from summed blocks, not averaged
    assert out[("refusion_service_prefix_cache_blocks", ())] == 5 + 15
    assert out[("refusion_service_prefix_cache_hit_rate", ())] == 300 / 500
    assert out[("refusion_service_replicas", (("state", "answering"),))] == 2
    assert out[("refusion_service_replicas", (("state", "unreachable"),))] == 1
    assert out[("refusion_router_decisions_total", (("decision", "affinity"),))] == 5
    assert not any(name.endswith("_created") for name, _ in out)


def test_no_replica_answering_still_renders():
    out = _samples(combine([], unreachable=2))
    assert out[("refusion_service_replicas", (("state", "unreachable"),))] == 2
    assert out[("refusion_service_prefix_cache_hit_rate", ())] == 0.0


def test_every_sample_belongs_to_a_family_with_its_help_and_type():
    """Summed counters and histograms are untyped, and an untyped family's samples carry its own name:
    `# TYPE refusion_service_requests_finished untyped` above `refusion_service_requests_finished_total`
    left that sample (and every _bucket, _sum, _count) without HELP and TYPE (helper-144)."""
    a = ReplicaMetrics("rep-a", "head", _engine(3, 1, 10, 100, 400, 300, ["stop"]))
    text = combine([a]).decode()
    suffixes = {"counter": ("_total", ""), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "unknown": ("",)}
    typed = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            kinds = {"untyped": "unknown"}
            assert any(name == family + suffix for family, kind in typed.items()
                       for suffix in suffixes[kinds.get(kind, kind)]), name
    assert typed["refusion_service_requests_finished_total"] == "untyped"
