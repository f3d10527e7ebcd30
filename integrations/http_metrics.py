"""Ingress-level Prometheus metrics and the one-line-per-request JSON log.

Each app owns a CollectorRegistry (no global state, so several apps can live in one process, e.g.
tests). GET /metrics serves these plus the engine's own text (scheduler.metrics.render(), fetched from
the engine replica).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from scheduler.api import Delta

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPF_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)

disable_created_metrics()  # as scheduler/metrics.py: no `<name>_created` series

class _CurrentStderr:
    """sys.stderr as it is at each write: the stream current at import (a test's capture, since closed; a
    stream a CLI replaced) raised "I/O operation on closed file" on every request logged after it. Each
    line goes out in one write: print() writes a message and its newline apart, and Ray Serve's own
    access log (another thread, the same stderr) landed between them, so a request-log line ran into
    the next line (`..."}INFO ... POST /completion 200`) and no longer parsed as JSON."""

    def __init__(self):
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            whole, _, self._pending = self._pending.rpartition("\n")
            sys.stderr.write(whole + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            text, self._pending = self._pending, ""
            sys.stderr.write(text)
        sys.stderr.flush()


request_log = structlog.wrap_logger(
    structlog.PrintLogger(_CurrentStderr()),
    processors=[structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.JSONRenderer()],
)


class APIMetrics:
    """The ingress counters and histograms (prefix refusion_api_)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("refusion_api_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("refusion_api_requests_in_flight", "Requests being answered", ["endpoint"], registry=r)
        self.ttft = Histogram("refusion_api_time_to_first_token_seconds", "Time to first token", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("refusion_api_inter_token_latency_seconds", "Time between streamed deltas, per token", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("refusion_api_e2e_latency_seconds", "Request end-to-end latency", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("refusion_api_queue_time_seconds", "Time waiting in the engine queue (engine-reported)", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpf = Histogram("refusion_api_tokens_per_forward", "Generated tokens per model forward, per choice (a request of n choices adds n)", buckets=_TPF_BUCKETS, registry=r)
        self.modes = Counter("refusion_api_mode_decisions", "Choices (engine requests) by the mode that served them", ["mode"], registry=r)
        self.prompt_tokens = Counter("refusion_api_prompt_tokens", "Prompt tokens of requests the engine took (refused ones add none)", registry=r)
        self.completion_tokens = Counter("refusion_api_completion_tokens", "Tokens generated", registry=r)
        # Editor protocol accept/reject telemetry (docs/editor-protocol.md): acceptance rate =
        # accept / (accept + reject); known="false" when the server no longer remembered the completion.
        self.editor_feedback = Counter("refusion_api_editor_feedback", "Editor accept/reject events", ["event", "known"], registry=r)
        self.editor_accepted_chars = Counter("refusion_api_editor_accepted_chars", "Characters of editor completions users kept", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _seconds(stats: dict, name: str) -> float | None:
    """stats[name_s] or stats[name_ms] / 1000, whichever the engine reports."""
    if f"{name}_s" in stats:
        return float(stats[f"{name}_s"])
    if f"{name}_ms" in stats:
        return float(stats[f"{name}_ms"]) / 1000.0
    return None


class RequestObserver:
    """Times one request from arrival to its last delta; records metrics and writes the log line.

    The in-flight gauge is not its business: the ingress gate (integrations/ingress_gate.py) raises and
    lowers it around the whole request, and finishes an observer registered with `for_request` that the
    route left open (with the status that went out), so every request is counted once on every path. An
    editor WebSocket completion's observer is its CompletionRecord's (integrations/editor/request_log.py),
    which does both for it.
    """

    @classmethod
    def for_request(cls, request, endpoint: str, request_id: str, prompt_tokens: int,
                    usage_from_engine: bool = False, choices: int = 1) -> "RequestObserver":
        """An observer for this HTTP request, registered so the ingress gate finishes it if the route does not.
        Its clock (TTFT, e2e) starts when the gate saw the request arrive, so reading the body and
        tokenizing count (vLLM's latencies likewise start at arrival), else now."""
        observer = cls(request.app.state.metrics, endpoint, request_id, prompt_tokens, usage_from_engine, choices)
        observer.started = getattr(request.state, "arrived_at", observer.started)
        request.state.observer = observer
        return observer

    def __init__(self, metrics: APIMetrics, endpoint: str, request_id: str | None, prompt_tokens: int,
                 usage_from_engine: bool = False, choices: int = 1):
        """usage_from_engine: a choice's completion tokens are its final delta's stats["generated_tokens"]
        (the tokens the model generated), not the ids its deltas carry: for text that was post-processed
        after decoding (the infill path), whose ids are only those of the text kept (a rule's cut drops
        the rest).

        A request of several choices (n > 1, a list of prompts) feeds every choice's deltas here, told
        apart by Delta.request_id (`<request_id>.<i>`): inter-token latency is timed within a choice, and
        each choice's final delta adds one tokens-per-forward, mode and queue-time observation.
        `choices`: how many the request asked for (prompts x n), the log line's `choices` whatever
        became of them."""
        self.metrics, self.endpoint, self.request_id = metrics, endpoint, request_id
        self.prompt_tokens, self.choices = prompt_tokens, choices
        self.usage_from_engine = usage_from_engine
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self._last_token_at: dict[str, float] = {}  # engine request id (a choice) -> its last delta's time
        self._tokens: dict[str, int] = {}  # engine request id -> its completion tokens so far
        self._finals: list[Delta] = []  # every choice's final delta, in the order they came
        self.last: Delta | None = None
        self.cap_field: str | None = None  # the token cap's name where the client chose it (chat's max_completion_tokens)
        # the route's name of a chat request's field (Responses', Messages'), for a fault of the request's
        # own input that ends it after its first delta (openai_calls.checked: a grammar failing mid-request)
        self.field_names: Callable[[str], str] | None = None
        self.e2e_ms: float | None = None  # arrival to finish(), once finished
        self._done = False

    @property
    def completion_tokens(self) -> int:
        """Completion tokens of every choice so far (OpenAI's usage.completion_tokens: summed over n)."""
        return sum(self._tokens.values())

    def on_delta(self, delta: Delta) -> None:
        now = time.perf_counter()
        n, choice = len(delta.token_ids), delta.request_id
        if n:
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.ttft.labels(self.endpoint).observe(now - self.started)
            if (before := self._last_token_at.get(choice)) is not None:
                self.metrics.itl.labels(self.endpoint).observe((now - before) / n)
            self._last_token_at[choice] = now
            self._tokens[choice] = self._tokens.get(choice, 0) + n
        if delta.finished:
            if self.usage_from_engine and "generated_tokens" in delta.stats:
                self._tokens[choice] = int(delta.stats["generated_tokens"])
            self._finals.append(delta)
        self.last = delta

    def on_first_token(self, at: float) -> None:
        """The first token came at `at` (time.perf_counter), before any delta fed here had tokens: a
        non-streamed infill, whose candidates run to their end before the route feeds its one final
        delta, is timed to its engine's first token as a plain completion is, not to its answer."""
        if self.first_token_at is None:
            self.first_token_at = at
            self.metrics.ttft.labels(self.endpoint).observe(at - self.started)

    @property
    def ttft_ms(self) -> float | None:
        """Arrival to the first token, as the TTFT histogram observed it (None: no token came)."""
        return round((self.first_token_at - self.started) * 1000, 2) if self.first_token_at is not None else None

    def finish(self, status: int, error: str | None = None, write_line: bool = True) -> None:
        """Record the outcome once (later calls are ignored): `status` is the one that went out (200 for
        a stream that failed after its start; `error` says why it ended). `write_line` False: the caller
        writes the request-log line itself (an editor completion's, integrations/editor/request_log.py),
        from `ttft_ms`, `e2e_ms` and `completion_tokens`. Prompt tokens count only for a
        request the engine took: one refused (a 4xx, a 503 overload) or failed before any output adds
        none (vLLM's prompt-token counter likewise counts the prompts it processed). End-to-end latency
        is observed only for a request that was served (a status below 400: vLLM times the requests its
        engine finished), so refusals answered in milliseconds do not pull its quantiles down."""
        if self._done:
            return
        self._done = True
        m, elapsed = self.metrics, time.perf_counter() - self.started
        self.e2e_ms = round(elapsed * 1000, 2)
        m.requests.labels(self.endpoint, str(status)).inc()
        if status < 400:
            m.e2e.labels(self.endpoint).observe(elapsed)
        if self.last is not None or status < 400 or status == 499:  # 499: the client left a running request
            m.prompt_tokens.inc(self.prompt_tokens)
        m.completion_tokens.inc(self.completion_tokens)
        tpfs, queue_times = [], []
        for final in self._finals:
            stats = final.stats or {}
            if final.mode is not None:
                m.modes.labels(final.mode.value).inc()
            if tpf := stats.get("tokens_per_forward"):
                m.tpf.observe(float(tpf))
                tpfs.append(float(tpf))
            if (queue_s := _seconds(stats, "queue_time")) is not None:
                m.queue.observe(queue_s)
                queue_times.append(queue_s)
        if not write_line:
            return
        last = self._finals[-1] if self._finals else self.last
        request_log.info(
            "request", request_id=self.request_id, endpoint=self.endpoint, status=status,
            mode=last.mode.value if last is not None and last.mode is not None else None,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            # several choices: their mean tokens per forward and longest queue time, each one's finish reason
            tpf=round(sum(tpfs) / len(tpfs), 4) if tpfs else None, choices=self.choices,
            finish_reason=[f.finish_reason.value if f.finish_reason else None for f in self._in_choice_order()],
            ttft_ms=self.ttft_ms, e2e_ms=self.e2e_ms, queue_ms=round(max(queue_times) * 1000, 2) if queue_times else None,
            error=error,
        )

    def _in_choice_order(self) -> list[Delta]:
        """The final deltas by choice index (`<request_id>.<i>`; a request of one choice has one), not by
        the order the choices happened to end in."""
        def index(final: Delta) -> int:
            tail = final.request_id.rsplit(".", 1)[-1] if final.request_id != self.request_id else ""
            return int(tail) if tail.isdigit() else -1

        return sorted(self._finals, key=index)


def log_editor_request(**fields) -> None:
    """The request-log line of an editor WebSocket frame's answer (integrations/editor/session.py): a
    completion's outcome, or another frame's error; the HTTP lines' field names where they apply
    (docs/editor-protocol.md, "Request log")."""
    request_log.info("request", endpoint="editor", **fields)
