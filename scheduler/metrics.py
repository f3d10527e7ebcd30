"""Prometheus metrics of one engine, in its own CollectorRegistry (several engines never collide).

The serving layer exposes `engine.metrics.render()` on /metrics with content type `CONTENT_TYPE`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# No `<name>_created` series (each series' creation time): noise on every scrape, and a sum over
# replicas of creation times means nothing (vLLM turns them off alike)
disable_created_metrics()

from scheduler.api import ENGINE_STOPPED, FinishReason

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPF_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
PREEMPTION_CAUSES = ("kv", "interactive")  # the `cause` label of refusion_preemptions_total
REJECT_REASONS = ("not_running", "queue_full")  # the `reason` label of refusion_requests_rejected_total
# The `reason` label of refusion_requests_finished_total: each FinishReason's value, and `shutdown` for
# the requests a stopping engine cut at its drain timeout (FinishReason.CANCELLED with ENGINE_STOPPED),
# which `cancelled` (their client or ingress left) would hide among disconnects
FINISH_REASONS = (*(reason.value for reason in FinishReason), "shutdown")


class EngineMetrics:
    """Request latencies, load, KV usage, prefix-cache hit rate, TPF and routing decisions."""

    def __init__(self, prefix: str = "refusion"):
        self.registry = CollectorRegistry()
        r, p = self.registry, prefix
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Submit to first streamed token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Gap between streamed deltas divided by the tokens in the delta.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(f"{p}_e2e_latency_seconds", "Submit to finish.", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{p}_queue_time_seconds", "Submit to start of decoding.", buckets=_LATENCY_BUCKETS, registry=r)
        self.forward_time = Histogram(f"{p}_forward_seconds", "One packed forward.", buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge(f"{p}_requests_running", "Requests decoding now.", registry=r)
        self.waiting = Gauge(f"{p}_requests_waiting", "Requests queued.", registry=r)
        self.kv_usage = Gauge(f"{p}_kv_cache_usage_ratio", "Share of KV blocks in use (main runner).", registry=r)
        self.prefix_hit_rate = Gauge(f"{p}_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache.", registry=r)
        # The parts of the two ratios, so a service of many replicas can sum them (service_metrics.py).
        self.kv_blocks_used = Gauge(f"{p}_kv_blocks_used", "KV blocks in use (main runner).", registry=r)
        self.kv_blocks_capacity = Gauge(f"{p}_kv_blocks_capacity", "KV blocks in the pool (main runner).", registry=r)
        # The prefix cache's share of kv_blocks_used: used - cached is what requests hold (0 when idle).
        self.prefix_cache_blocks = Gauge(f"{p}_prefix_cache_blocks", "KV blocks the prefix cache holds (main runner).", registry=r)
        self.prefix_lookup_tokens = Counter(f"{p}_prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_hit_tokens = Counter(f"{p}_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", registry=r)
        self.prefix_waits = Counter(f"{p}_prefix_waits", "Requests that waited for a running request's prefill of their prompt prefix instead of computing it again.", registry=r)
        self._prefix_counted = (0, 0)
        self.tpf = Histogram(f"{p}_tokens_per_forward", "Generated tokens / forwards of finished requests.", ["mode"], buckets=_TPF_BUCKETS, registry=r)
        self.mode_decisions = Counter(f"{p}_mode_decisions", "Routing decisions by mode and reason.", ["mode", "reason"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of requests started (counted at a "
                                     "request's first start).", registry=r)
        self.moved = Counter(f"{p}_requests_moved", "Waiting requests released to start on another replica "
                             "(queue rebalancing); counted neither as finished nor as cancelled.", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Generated tokens streamed.", registry=r)
        self.finished = Counter(f"{p}_requests_finished", "Finished requests by reason.", ["reason"], registry=r)
        self.rejected = Counter(f"{p}_requests_rejected", "Engine requests (each choice of n) refused at submit by "
                                "reason.", ["reason"], registry=r)
        self.preemptions = Counter(f"{p}_preemptions", "Running requests sent back to the queue to restart later, by "
                                   "cause: kv (a step's KV did not fit), interactive (a waiting interactive request "
                                   "took the slot).", ["cause"], registry=r)
        # Every label value of the closed sets exported as 0 from the start: a dashboard's rate() or sum
        # reads 0 on a replica that has not preempted or finished that way yet, not "no data"
        for cause in PREEMPTION_CAUSES:
            self.preemptions.labels(cause=cause)
        for reason in FINISH_REASONS:
            self.finished.labels(reason=reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)

    def observe_delta(self, req, num_tokens: int, now: float) -> None:
        """TTFT on a request's first streamed tokens, inter-token latency after that; token count."""
        if not req.first_token_s:
            self.ttft.observe(now - req.arrival_s)
        elif req.last_token_s:
            self.inter_token.observe((now - req.last_token_s) / max(1, num_tokens))
        self.generation_tokens.inc(num_tokens)

    def observe_finish(self, req, now: float) -> None:
        """Finish reason, end-to-end latency and (when it decoded) the request's tokens per forward."""
        cut_by_stop = req.finish_reason is FinishReason.CANCELLED and req.error == ENGINE_STOPPED
        self.finished.labels(reason="shutdown" if cut_by_stop else req.finish_reason.value).inc()
        self.e2e.observe(now - req.arrival_s)
        if req.decoder is not None and req.forwards():
            self.tpf.labels(mode=req.mode.value).observe(req.generated_tokens() / req.forwards())

    def update_gauges(self, running: int, waiting: int, blocks, prefix_cache) -> None:
        """Load gauges after a step: running/waiting counts, KV usage of `blocks`, prefix-cache hit rate."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(1.0 - blocks.num_free / blocks.num_total if blocks.num_total else 0.0)
        self.kv_blocks_used.set(blocks.num_total - blocks.num_free)
        self.kv_blocks_capacity.set(blocks.num_total)
        if prefix_cache is not None:
            self.prefix_cache_blocks.set(prefix_cache.num_blocks)
            self.prefix_hit_rate.set(prefix_cache.hit_rate)
            lookups, hits = self._prefix_counted
            self.prefix_lookup_tokens.inc(max(0, prefix_cache.lookup_tokens - lookups))
            self.prefix_hit_tokens.inc(max(0, prefix_cache.hit_tokens - hits))
            self._prefix_counted = (prefix_cache.lookup_tokens, prefix_cache.hit_tokens)

    def render(self) -> bytes:
        """Prometheus text exposition of every metric of this engine."""
        return generate_latest(self.registry)
