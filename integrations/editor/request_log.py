"""The request log of the editor WebSocket: one line per `complete` once it is answered (completed,
cancelled, superseded, or an error with its JSON-RPC code) and one per other frame answered with an error,
written to the HTTP routes' request log (integrations/http_metrics.py) with their field names where they
apply. Fields: docs/editor-protocol.md, "Request log".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from integrations.editor import protocol as rpc
from integrations.editor.runner import CompletionOutcome
from integrations.http_metrics import log_editor_request


@dataclass
class CompletionRecord:
    """What a completion's line needs from its `complete` on: its id (`ed-<session id>-<n>`, which its
    candidates' engine ids extend with `-g<gap>`), when it came, its prompt's tokens once built, and
    whether its line is written (one per completion: one cancelled while its answer went out has one)."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int | None = None
    logged: bool = False


def log_answer(session, msg_id, method: str | None, outcome: str, record: CompletionRecord | None = None, *,
               started: float | None = None, err: rpc.RpcError | None = None, result: CompletionOutcome | None = None,
               error: str | None = None) -> None:
    """The line of a frame's answer on `session` (an EditorSession: its session_id and connection, the
    handshake's X-Request-Id): a completion's (`record`) or another frame's, which came at `started`.
    `outcome`: completed, cancelled, superseded or error; `error` (else err's message): why it ended."""
    if record is not None and record.logged:
        return
    if record is not None:
        record.logged, started = True, record.started
    log_editor_request(
        request_id=record.request_id if record else None, session=session.session_id,
        connection=session.connection, id=msg_id, method=method, outcome=outcome, code=err.code if err else None,
        error=error or (err.message if err else None), mode=result.mode if result else None,
        finish_reason=[result.stop_reason] if result else [],
        prompt_tokens=record.prompt_tokens if record else None, completion_tokens=result.tokens if result else None,
        tpf=result.tokens_per_forward if result else None, ttft_ms=result.first_partial_ms if result else None,
        e2e_ms=round((time.perf_counter() - started) * 1000, 2))
