"""One editor connection: dispatch of msgpack-RPC requests, in-flight completions, supersession.

Transport-free: the session gets frames through `handle_frame` and sends through an async `send`
callable, so it runs the same under the FastAPI WebSocket route and in unit tests.

Supersession: each uri has at most one completion in flight. A new `complete` for the same uri
cancels the previous one at once (its engine requests are cancelled; it answers REQUEST_CANCELLED
with reason "superseded"). Completions for different uris run side by side, up to
Limits.max_inflight.

Every `complete` writes one request-log line once it is answered, as every HTTP request does, and counts
in the ingress's refusion_api_* metrics (endpoint "editor"); any other frame answered with an error writes
a line too (integrations/editor/request_log.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from integrations.editor import protocol as rpc
from integrations.editor.complete_request import completion_error, completion_job
from integrations.editor.gaps import MULTILINE_GAPS, SINGLE_LINE_GAPS
from integrations.editor.request_log import CompletionRecord, log_answer
from integrations.editor.runner import run_completion
from integrations.http_metrics import APIMetrics

Send = Callable[[bytes], Awaitable[None]]
log = logging.getLogger(__name__)

_KEEP_FINISHED = 64  # finished completions remembered for accept/reject telemetry


@dataclass
class _Inflight:
    uri: str
    record: CompletionRecord  # its request-log line's (its id: its candidates' engine ids' prefix)
    task: asyncio.Task | None = None
    cancel_data: dict | None = None  # set once cancelled: {"reason": ..., "superseded_by"?: ...}


class EditorSession:
    """State of one WebSocket connection (see module docstring)."""

    def __init__(self, client, send: Send, limits: rpc.Limits | None = None, metrics=None,
                 refusing: Callable[[], float | None] | None = None, gone: tuple[type[BaseException], ...] = (),
                 connection: str | None = None, context_length: int = 0):
        """metrics: the ingress's APIMetrics (integrations/http_metrics.py), which counts this session's
        completions (endpoint "editor") and accept/reject telemetry for the whole service; None (unit
        tests, the router mounted alone): a registry of the session's own, which no /metrics serves.
        refusing: while it returns a number (the ingress draining: its Retry-After in seconds), a new
        `complete` is answered OVERLOADED at once, before it could supersede the completion in flight for
        its uri. gone: the exceptions `send` raises once the client has left (the transport's); the
        session then sends nothing more (the transport's reader sees the disconnect and calls `close`).
        connection: the handshake's X-Request-Id, in each request-log line. context_length: the model's
        context (tokens; 0 unknown), which a completion's prompt, suffix and gap fit (gaps.infill_room).
        `session_id` (random, announced by `initialize`) names the session in the engine's ids and the log."""
        self.client = client
        self._gone = gone
        self._refusing = refusing
        self.limits = limits or rpc.Limits()
        self.metrics = metrics if metrics is not None else APIMetrics()
        self.session_id, self.connection, self.context_length = uuid.uuid4().hex[:10], connection, context_length
        self.last_frame_s = time.monotonic()  # when the client last sent a frame (the route's idle timeout)
        self._engine_ids = itertools.count(1)  # engine request ids: client ids 1 and "1" are different ids
        self.inflight: dict = {}  # request id -> _Inflight
        self.by_uri: dict[str, object] = {}  # uri -> request id in flight
        self.finished: OrderedDict = OrderedDict()  # request id -> completion text length
        self._feedback_counted: dict = {}  # remembered request id -> accepted characters counted so far
        self.feedback = {"accept": 0, "reject": 0, "accepted_chars": 0}  # this connection's telemetry, counted
        self._send = send
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._background: set[asyncio.Task] = set()  # cancellation answers being sent

    async def send(self, frame: bytes) -> None:
        """Send one frame, nothing once the connection is closed or the client has left (`gone`: the
        answers of completions a client cancelled just before leaving were failed sends, each logged as
        a task exception never retrieved)."""
        if self._closed:
            return
        async with self._send_lock:
            if self._closed:
                return
            try:
                await self._send(frame)
            except self._gone:
                self._closed = True

    async def handle_frame(self, data: bytes | str | None) -> None:
        """Answer one frame; protocol errors become error responses, never exceptions."""
        msg_id, method, started = None, None, time.perf_counter()
        self.last_frame_s = time.monotonic()
        try:
            req = rpc.decode_frame(data, self.limits)
            msg_id, method = req.id, req.method
            result = await self._dispatch(req)
        except rpc.RpcError as err:
            msg_id = getattr(err, "request_id", msg_id)
            log_answer(self, msg_id, method, "error", started=started, err=err)
            await self.send(rpc.encode_response(msg_id, err.to_wire()))
            return
        except Exception as exc:  # noqa: BLE001 - a bug answers this frame; the connection stays usable
            log.exception("editor frame failed")
            err = rpc.RpcError(rpc.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            log_answer(self, msg_id, method, "error", started=started, err=err)
            await self.send(rpc.encode_response(msg_id, err.to_wire()))
            return
        if result is not None:
            await self.send(rpc.encode_response(msg_id, None, result))

    async def _dispatch(self, req: rpc.Request):
        handler = {
            "initialize": self._initialize,
            "complete": self._complete,
            "cancel": self._cancel,
            "accept": self._feedback,
            "reject": self._feedback,
        }.get(req.method)
        if handler is None:
            raise rpc.RpcError(
                rpc.METHOD_NOT_FOUND,
                f"unknown method {req.method!r}; methods are initialize, complete, cancel, accept, reject",
            )
        return await handler(req)

    async def _initialize(self, req: rpc.Request) -> dict:
        return {
            "protocol_version": rpc.PROTOCOL_VERSION,
            "server": "refusion-serve",
            "model": self.client.model_name,
            "session_id": self.session_id,
            "limits": self.limits.as_dict(),
            "capabilities": {
                "methods": ["initialize", "complete", "cancel", "accept", "reject"],
                "notifications": ["completion/partial"],
                "modes": list(rpc.MODES),
                "multiline": True,
                "context_chunks": True,
                "supersession": "per-uri",
                "infill": "suffix-as-clean-slots",
            },
            "defaults": {"single_line_gaps": list(SINGLE_LINE_GAPS), "multiline_gaps": list(MULTILINE_GAPS)},
        }

    async def _complete(self, req: rpc.Request) -> None:
        params = rpc.parse_complete(req.params, self.limits)
        if req.id in self.inflight:
            raise rpc.RpcError(rpc.INVALID_REQUEST, f"request id {req.id!r} is already in flight; use a new id")
        retry_after_s = self._refusing() if self._refusing is not None else None
        if retry_after_s is not None:  # the engine would refuse it: keep the completion it would supersede
            raise rpc.RpcError(rpc.OVERLOADED, f"the server is shutting down: retry in {retry_after_s} s",
                               {"retry_after_s": retry_after_s})
        previous = self.by_uri.get(params.uri)
        if previous is not None:
            self._cancel_inflight(previous, {"reason": "superseded", "superseded_by": req.id})
        running = sum(1 for entry in self.inflight.values() if entry.cancel_data is None)
        if running >= self.limits.max_inflight:
            raise rpc.RpcError(
                rpc.TOO_MANY_REQUESTS,
                f"{running} completions in flight on this connection (limit "
                f"{self.limits.max_inflight}); cancel one or wait",
            )
        record = CompletionRecord.start(self.metrics, f"ed-{self.session_id}-{next(self._engine_ids)}")  # gauge up
        entry = _Inflight(params.uri, record)
        entry.task = task = asyncio.ensure_future(self._run(req.id, entry, params))
        self.inflight[req.id] = entry
        task.add_done_callback(lambda t, msg_id=req.id: self._on_done(msg_id, t))
        self.by_uri[params.uri] = req.id
        return None  # the task sends the response

    async def _run(self, msg_id, entry: _Inflight, params: rpc.CompleteParams) -> None:
        async def partial(text: str, token_ids: list[int]) -> None:  # the protocol sends text only
            entry.record.on_partial(text, token_ids)  # the metrics time the ids
            await self.send(rpc.encode_notification("completion/partial", {"id": msg_id, "text": text}))

        try:
            job = await completion_job(self.client, self.context_length, self.session_id, entry.record.request_id,
                                       params)
            entry.record.prompt_tokens = len(job.prompt.prompt_ids) + len(job.prompt.suffix_ids or [])
            outcome = await run_completion(self.client, job, partial)
        except Exception as exc:  # noqa: BLE001 - every failure must answer the request
            err = completion_error(exc, params)
            log_answer(self, msg_id, "complete", "error", entry.record, err=err)
            await self.send(rpc.encode_response(msg_id, err.to_wire()))
            return
        # Whitespace alone is nothing to insert (its indentation is the editor's, as for partials): "   "
        # after "import os\n" reached the editor as a completion of three spaces
        text = outcome.text if outcome.text.strip() else ""
        self._remember(msg_id, len(text))
        result = {
            "text": text,
            "stop_reason": outcome.stop_reason,
            "timings": outcome.timings(),
            "tokens": outcome.tokens,
            "tokens_per_forward": outcome.tokens_per_forward,
            "mode": outcome.mode,
            "gap": outcome.gap,
            "truncated": job.prompt.truncated,
            "request_id": entry.record.request_id,
        }
        if params.version is not None:
            result["version"] = params.version  # echoed: which document version the text completes
        log_answer(self, msg_id, "complete", "completed", entry.record, result=outcome)
        await self.send(rpc.encode_response(msg_id, None, result))

    def _on_done(self, msg_id, task: asyncio.Task) -> None:
        """Bookkeeping when a completion task ends; a cancelled one answers REQUEST_CANCELLED here
        (a task cancelled before it started never runs its own code)."""
        entry = self.inflight.get(msg_id)
        self._forget(msg_id)
        if not task.cancelled():
            return
        data = (entry.cancel_data if entry is not None else None) or {"reason": "cancelled"}
        err = rpc.RpcError(rpc.REQUEST_CANCELLED, f"completion {data['reason']}", data)
        if entry is not None:
            by = f" by {data['superseded_by']!r}" if "superseded_by" in data else ""
            log_answer(self, msg_id, "complete", data["reason"], entry.record, err=err,
                       error="client disconnected" if self._closed else err.message + by)
        if not self._closed:
            sender = asyncio.ensure_future(self.send(rpc.encode_response(msg_id, err.to_wire())))
            self._background.add(sender)
            sender.add_done_callback(self._background.discard)

    def _forget(self, msg_id) -> None:
        entry = self.inflight.pop(msg_id, None)
        if entry is not None and self.by_uri.get(entry.uri) == msg_id:
            del self.by_uri[entry.uri]

    def _remember(self, msg_id, length: int) -> None:
        self.finished[msg_id] = length
        self._feedback_counted.pop(msg_id, None)  # an id used again is a new completion
        while len(self.finished) > _KEEP_FINISHED:
            self._feedback_counted.pop(self.finished.popitem(last=False)[0], None)

    def _cancel_inflight(self, msg_id, data: dict) -> bool:
        entry = self.inflight.get(msg_id)
        if entry is None or entry.task.done() or entry.cancel_data is not None:  # (a superseded one keeps its
            return False                                                         # reason: helper-197)
        entry.cancel_data = data
        entry.task.cancel()
        if self.by_uri.get(entry.uri) == msg_id:
            del self.by_uri[entry.uri]
        return True

    async def _cancel(self, req: rpc.Request) -> dict:
        target = rpc.request_id_of(req.params)
        return {"cancelled": self._cancel_inflight(target, {"reason": "cancelled"})}

    async def _feedback(self, req: rpc.Request) -> dict:
        target = rpc.request_id_of(req.params)
        length = req.params.get("accepted_length", 0 if req.method == "reject" else None)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise rpc.invalid_params("accepted_length", "must be a non-negative integer (characters accepted)")
        known = target in self.finished
        if known and length > self.finished[target]:
            raise rpc.invalid_params(
                "accepted_length", f"is {length} but completion {target!r} was {self.finished[target]} chars"
            )
        # Counted, not kept: a connection may send feedback forever (ids up to a frame's size each). A
        # remembered completion counts once (its first event); a later, longer accept of it (a partial
        # accept growing) adds only the characters not yet counted; characters only of remembered ones.
        counted = self._feedback_counted.get(target) if known else None
        first = counted is None
        kept = max(0, length - (counted or 0)) if known and req.method == "accept" else 0
        if known:
            self._feedback_counted[target] = (counted or 0) + kept
        self.feedback[req.method] += first
        self.feedback["accepted_chars"] += kept
        if first:
            self.metrics.editor_feedback.labels(event=req.method, known=str(known).lower()).inc()
        self.metrics.editor_accepted_chars.inc(kept)
        return {"ok": True, "known": known}

    async def close(self) -> None:
        """Connection gone: cancel every in-flight completion (and its engine requests)."""
        self._closed = True
        tasks = [entry.task for entry in self.inflight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Wait until every in-flight completion has answered (tests, graceful close)."""
        while self.inflight or self._background:
            await asyncio.gather(*[e.task for e in self.inflight.values()], *self._background, return_exceptions=True)

    async def finish(self, close_socket: Callable[[], Awaitable[None]]) -> None:
        """The server is going away: wait until every in-flight completion has answered (a draining
        engine ends those past its drain timeout with an error answer), then stop sending and call
        close_socket under the send lock, so no frame follows the close."""
        await self.drain()
        async with self._send_lock:
            self._closed = True
            await close_socket()
