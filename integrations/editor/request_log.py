"""The request log and request metrics of the editor WebSocket.

The log: one line per `complete` once it is answered (completed, cancelled, superseded, or an error with
its JSON-RPC code) and one per other frame answered with an error, written to the HTTP routes' request
log (integrations/http_metrics.py) with their field names where they apply. Fields: docs/editor-protocol.md,
"Request log".

The metrics: every `complete` counts in the ingress's `refusion_api_*` families under endpoint="editor"
(the log line's `endpoint`), at the moment its line is written and with the line's figures: a completion
raises the in-flight gauge when it starts running and lowers it when it is answered, its partials feed
time to first token and inter-token latency as a streamed HTTP infill's text pieces do, and its answer
counts it under the HTTP status (`STATUS`) an HTTP route would have answered with; a `complete` refused
before it ran is counted as an HTTP refusal is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from integrations.editor import protocol as rpc
from integrations.editor.runner import CompletionOutcome
from integrations.http_metrics import APIMetrics, RequestObserver, log_editor_request
from integrations.openai_infill import final_delta
from integrations.request_limits import clipped
from scheduler.api import Delta

ENDPOINT = "editor"  # the `endpoint` label of the refusion_api_* families and of the request-log lines
# The HTTP status a `complete`'s answer counts under (refusion_api_requests_total{status}, the line's
# `status`): the one an HTTP route answers for the same outcome; 499 (a client that left its request):
# cancelled or superseded, which the line's `outcome` tells apart.
STATUS = {rpc.PARSE_ERROR: 400, rpc.INVALID_REQUEST: 400, rpc.METHOD_NOT_FOUND: 404, rpc.INVALID_PARAMS: 400,
          rpc.INTERNAL_ERROR: 500, rpc.MESSAGE_TOO_LARGE: 413, rpc.OVERLOADED: 503, rpc.TOO_MANY_REQUESTS: 429,
          rpc.ENGINE_UNAVAILABLE: 503, rpc.REQUEST_CANCELLED: 499}


@dataclass
class CompletionRecord:
    """What a completion's line and figures need from its `complete` on: its id (`ed-<session id>-<n>`,
    which its candidates' engine ids extend with `-g<gap>`), its observer (the refusion_api_* figures,
    timed from the record's making), its prompt's tokens once built, the partials it has shown, and
    whether it is answered (`logged`: one line and one count per completion; one cancelled while its
    answer went out has one)."""

    request_id: str
    observer: RequestObserver
    prompt_tokens: int | None = None
    logged: bool = False
    shown: str = ""  # the last partial's text and ids (cumulative)
    shown_ids: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, metrics: APIMetrics, request_id: str) -> "CompletionRecord":
        """The record of a completion about to run; the in-flight gauge counts it until it is answered."""
        metrics.in_flight.labels(ENDPOINT).inc()
        return cls(request_id, RequestObserver(metrics, ENDPOINT, request_id, 0, usage_from_engine=True))

    def on_partial(self, text: str, token_ids: list[int]) -> None:
        """A partial sent (runner.PartialCallback: cumulative text and ids): the new ids are one delta of a
        streamed HTTP infill (time to first token, inter-token latency, tokens)."""
        self.observer.on_delta(Delta(self.request_id, text[len(self.shown):], token_ids[len(self.shown_ids):]))
        self.shown, self.shown_ids = text, token_ids

    def answered(self, status: int, result: CompletionOutcome | None) -> None:
        """Count the completion once, answered with `status`: a completed one's `result` is its last
        delta (the text and ids the partials did not show, its mode, stats and tokens); the in-flight
        gauge goes down."""
        self.logged = True
        if result is not None:
            tail, tail_ids = result.after(self.shown, self.shown_ids)
            self.observer.on_delta(final_delta(self.request_id, tail, tail_ids, result))
        self.observer.prompt_tokens = self.prompt_tokens or 0
        self.observer.metrics.in_flight.labels(ENDPOINT).dec()
        self.observer.finish(status, write_line=False)


def log_answer(session, msg_id, method: str | None, outcome: str, record: CompletionRecord | None = None, *,
               started: float | None = None, err: rpc.RpcError | None = None, result: CompletionOutcome | None = None,
               error: str | None = None) -> None:
    """The line and figures of a frame's answer on `session` (an EditorSession: its session_id, connection
    (the handshake's X-Request-Id) and metrics): a completion's (`record`) or another frame's, which came
    at `started`. `outcome`: completed, cancelled, superseded or error; `error` (else err's message): why
    it ended; `result`: a completed one's outcome."""
    if record is not None and record.logged:
        return
    status = STATUS.get(err.code, 500) if err is not None else 200
    observer = record.observer if record is not None else None
    if record is not None:
        record.answered(status, result)
    elif method == "complete":  # refused before it ran: counted as an HTTP refusal is (no prompt, no e2e)
        observer = RequestObserver(session.metrics, ENDPOINT, None, 0)
        observer.started = started
        observer.finish(status, write_line=False)
    log_editor_request(
        request_id=record.request_id if record else None, session=session.session_id,
        connection=session.connection, id=_clipped(msg_id), method=_clipped(method), outcome=outcome,
        code=err.code if err else None, status=status if observer is not None else None,
        error=_clipped(error or (err.message if err else None)), mode=result.mode if result else None,
        finish_reason=[result.stop_reason] if result else [],
        prompt_tokens=record.prompt_tokens if record else None,
        completion_tokens=observer.completion_tokens if record else None,
        tpf=result.tokens_per_forward if result else None, ttft_ms=observer.ttft_ms if record else None,
        e2e_ms=observer.e2e_ms if observer is not None else round((time.perf_counter() - started) * 1000, 2))


LOGGED_FIELD_CHARS = 256  # a client's frame id, method or an error quoting them, as logged (a 1 MB id was logged whole)


def _clipped(value):
    """A string `value` cut to LOGGED_FIELD_CHARS (request_limits.clipped: says how much was left out);
    anything else as it is."""
    return clipped(value, LOGGED_FIELD_CHARS) if isinstance(value, str) else value
