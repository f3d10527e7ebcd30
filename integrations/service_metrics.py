"""The engine metrics of a whole service: every replica's series, labelled, plus their sums.

The ingress's /metrics asks each live engine replica for its Prometheus text (a call routed to that
replica by integrations/serve_router.py) and serves:

    refusion_requests_running{replica="ab12",node="node-b"} 3        every replica's own series
    refusion_service_requests_running 5                              summed over the replicas
    refusion_service_kv_cache_usage_ratio 0.21                       ratios recomputed from summed parts
    refusion_service_prefix_cache_hit_rate 0.64
    refusion_service_replicas{state="answering"} 2                   replicas heard from / not

Counters and histograms are summed sample by sample (buckets, _sum, _count), and so are the gauges that
count things (SUMMED_GAUGES); ratio gauges are rebuilt from their parts, never averaged. A sum falls
when a replica leaves, so summed counters and histograms are exported untyped, not as counters (a
Prometheus `rate()` over them would read a reset): for rates use `sum(rate(refusion_x_total[5m]))` over
the per-replica series. The result is the Prometheus text exposition format 0.0.4, one family per name.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

ENGINE_PREFIX, SERVICE_PREFIX = "refusion_", "refusion_service_"
SUMMED_GAUGES = {"refusion_requests_running", "refusion_requests_waiting", "refusion_kv_blocks_used", "refusion_kv_blocks_capacity",
                 "refusion_prefix_cache_blocks"}
# service ratio = sum(numerator) / sum(denominator), each given as (family, sample name)
RATIOS = {
    "kv_cache_usage_ratio": (("refusion_kv_blocks_used",) * 2, ("refusion_kv_blocks_capacity",) * 2,
                             "Share of KV blocks in use, all replicas."),
    "prefix_cache_hit_rate": (("refusion_prefix_cache_hit_tokens", "refusion_prefix_cache_hit_tokens_total"),
                              ("refusion_prefix_cache_lookup_tokens", "refusion_prefix_cache_lookup_tokens_total"),
                              "Share of prompt tokens served from the prefix caches, all replicas."),
}


@dataclass
class ReplicaMetrics:
    """One engine replica's answer: its id (ReplicaID.unique_id), Ray node name and Prometheus text."""

    replica: str
    node: str
    text: bytes


class _Families:
    """A collector over prebuilt families (prometheus_client renders them)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)


def combine(replicas: list[ReplicaMetrics], unreachable: int = 0, decisions: dict[str, int] | None = None) -> bytes:
    """Per-replica series (labels replica, node) and service sums, as Prometheus text. `decisions`:
    this process's routing decisions (serve_router.routing_decisions), as refusion_router_decisions_total."""
    per_replica: dict[str, Metric] = {}
    summed: dict[str, Metric] = {}
    totals: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for part in replicas:
        for family in text_string_to_metric_families(part.text.decode()):
            family_out = per_replica.get(family.name)
            if family_out is None:
                family_out = per_replica[family.name] = Metric(family.name, family.documentation, family.type)
            sum_it = family.name.startswith(ENGINE_PREFIX) and (family.type in ("counter", "histogram") or family.name in SUMMED_GAUGES)
            if sum_it and family.name not in summed:
                # A sum over replicas drops when a replica goes away (scaled down, dead, too slow to
                # answer), so summed counters and histograms are not counters: typed untyped, and
                # rates come from sum(rate(x[5m])) over the per-replica series.
                kind = "gauge" if family.type == "gauge" else "unknown"
                summed[family.name] = Metric(SERVICE_PREFIX + family.name[len(ENGINE_PREFIX):],
                                             family.documentation + " Summed over the replicas answering now.", kind)
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation times do not add up
                    continue
                family_out.add_sample(sample.name, {**sample.labels, "replica": part.replica, "node": part.node}, sample.value)
                if sum_it:
                    totals[family.name][(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
    for name, samples in totals.items():
        for (sample_name, labels), value in samples.items():
            summed[name].add_sample(SERVICE_PREFIX + sample_name[len(ENGINE_PREFIX):], dict(labels), value)
    summed = {name: part for family in summed.values() for name, part in _untyped_by_sample(family).items()}
    ratios = []
    for ratio_name, (numerator, denominator, doc) in RATIOS.items():
        top, bottom = _total(totals, numerator), _total(totals, denominator)
        metric = Metric(SERVICE_PREFIX + ratio_name, doc, "gauge")
        metric.add_sample(SERVICE_PREFIX + ratio_name, {}, top / bottom if bottom else 0.0)
        ratios.append(metric)
    count = Metric(SERVICE_PREFIX + "replicas", "Engine replicas by whether they answered this scrape.", "gauge")
    count.add_sample(SERVICE_PREFIX + "replicas", {"state": "answering"}, len(replicas))
    count.add_sample(SERVICE_PREFIX + "replicas", {"state": "unreachable"}, unreachable)
    routed = Metric("refusion_router_decisions", "Engine-replica choices of this ingress replica's router, by decision.", "counter")
    for decision, n in sorted((decisions or {}).items()):
        routed.add_sample("refusion_router_decisions_total", {"decision": decision}, n)
    registry = CollectorRegistry()
    registry.register(_Families([*per_replica.values(), *summed.values(), *ratios, count, routed]))
    return generate_latest(registry)


def _untyped_by_sample(family: Metric) -> dict[str, Metric]:
    """An untyped family (a summed counter or histogram) as one family per sample name: untyped, a
    family's samples carry its own name, so `refusion_service_x` holding `refusion_service_x_total` (or
    `_bucket`, `_sum`, `_count`) lost its HELP and TYPE to Prometheus's parser (helper-144: 94 families
    without metadata). A gauge family is returned as it is."""
    if family.type != "unknown":
        return {family.name: family}
    parts: dict[str, Metric] = {}
    for sample in family.samples:
        part = parts.get(sample.name)
        if part is None:
            part = parts[sample.name] = Metric(sample.name, family.documentation, "unknown")
        part.add_sample(sample.name, sample.labels, sample.value)
    return parts


def _total(totals: dict[str, dict[tuple, float]], where: tuple[str, str]) -> float:
    family, sample_name = where
    return sum(v for (name, _), v in totals.get(family, {}).items() if name == sample_name)
