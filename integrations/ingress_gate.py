"""The ingress's door: the outermost ASGI middleware, which every HTTP request and WebSocket passes.

    gate = IngressGate()                                  # app.state.gate (openai_api.create_app)
    app.add_middleware(IngressGateMiddleware, gate=gate, metrics=app.state.metrics)
    gate.start_draining(retry_after_s=5)                  # serve_app, when `refusion serve` drains
    gate.open_work                                        # HTTP requests not yet fully answered + WebSockets open

It owns what must hold on every path, whatever a route does or fails to do:

- In flight: `refusion_api_requests_in_flight{endpoint}` goes up when a request arrives and down in a
  `finally` when its ASGI call returns (response sent, route failed, client gone), so no exit path can
  leave it raised. A route's RequestObserver (http_metrics.RequestObserver.for_request) that is still
  open then is finished with the status that went out: a 400 raised mid-route is counted as a 400.
  It is finished (its request-log line written) before the request stops counting in `open_work`, so
  a drain that waits for 0 leaves no line unwritten.
  A request answered before its route made an observer (an invalid body, an unknown model, a prompt
  over the context, a refusal while draining) gets one here, finished with that status: counted in
  `refusion_api_requests_total` and written to the request log like any other.
- Draining: after `start_draining()`, new requests get 503 + Retry-After in OpenAI's error shape (/health
  answers {"status": "draining"}; /metrics keeps answering) and new WebSockets are accepted and at once
  closed with code 1013 ("try again later": closing before the accept would reach the client as an HTTP
  403, the answer to a bad key), while requests already inside run to their end. A WebSocket already
  open counts as open work until it closes; the editor route (integrations/editor/http.py) closes it
  with 1001 ("going away") once its completions in flight have answered (`wait_draining`).
- Open WebSockets: at most `socket_limit()` (RequestLimits.max_editor_connections, or the Serve app's
  rule from its call slots); one more is closed with
  1013 as while draining. Each holds one of the replica's max_ongoing_requests call slots for its life,
  so 900 idle ones left no slot for any HTTP request, /health included (helper-171).
- Disconnects before the answer starts: on the generation routes (GAUGED_ENDPOINTS) the gate watches the
  connection once the body is read, and a client that leaves before the response starts (a non-streamed
  request, or a stream still waiting for its first token) has its route cancelled, which cancels its
  engine requests and frees their KV (recorded as 499). Ray Serve's proxy cancels the route itself;
  a plain ASGI server (uvicorn) reports the disconnect only to a route that reads `receive()`, which a
  route collecting a non-streamed answer never does, so without the watch it ran to its end.
- Request ids: an HTTP request whose X-Request-Id is malformed (or marked so by the proxy's guard,
  integrations/request_id_guard.py) is answered 400 naming the header before anything else, on every
  route, and logged (under the id the proxy gave it instead, if any).
- Transport errors: Ray Serve's ASGI bridge raises from `receive()` (TaskCancelledError when the proxy drops a
  client, ActorDiedError when the proxy itself is gone) where ASGI servers deliver a disconnect message.
  The gate delivers that message instead, so a client going away stays the normal event it is (one
  request-log line), not a traceback in the error log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

from integrations.http_metrics import RequestObserver
from integrations.request_id_guard import REFUSAL, given_request_id, refused_request_id, valid_request_id

log = logging.getLogger(__name__)

# Routes whose requests the in-flight gauge counts, by their `endpoint` label.
GAUGED_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses",
                    "/v1/messages": "messages", "/infill": "infill", "/completion": "completion"}
# Routes that keep answering while the ingress drains (Prometheus should see the drain happen).
OPEN_WHILE_DRAINING = frozenset({"/metrics"})
# Probes and scrapes answer whatever X-Request-Id they carry (they repeat it nowhere): a load balancer
# adding ids this server refuses must not mark it unhealthy (helper-161)
ANY_REQUEST_ID = frozenset({"/health", "/metrics"})
CLIENT_GONE = 499  # nginx's "client closed request": the status recorded when no response went out


class IngressGate:
    """Drain switch and open-request count of one ingress replica (shared with the middleware)."""

    def __init__(self, socket_limit: Callable[[], int] | None = None):
        """socket_limit: the host's bound on open WebSockets (0: none let in), asked at each connection
        (serve_app: from the replica's call slots as Ray applies them now); None: `max_sockets`."""
        self.draining = False
        self._socket_limit = socket_limit
        self.retry_after_s = 5
        self.open_requests = 0  # HTTP requests inside, not yet fully answered
        self.open_sockets = 0  # WebSockets inside, not yet closed
        self.max_sockets = 0  # WebSockets let in at once (RequestLimits.max_editor_connections; 0: no bound)
        self._drain_started = asyncio.Event()

    def socket_limit(self) -> int | None:
        """WebSockets let in at once; None: no bound (`max_sockets` 0 and no host rule)."""
        if self._socket_limit is not None:
            return self._socket_limit()
        return self.max_sockets or None

    @property
    def open_work(self) -> int:
        """What a draining replica still holds (serve_drain.report_open_work): requests and sockets."""
        return self.open_requests + self.open_sockets

    def start_draining(self, retry_after_s: float = 5) -> None:
        """Refuse new requests and WebSockets from now on; those already inside run to their end."""
        self.retry_after_s = max(1, round(retry_after_s))
        self.draining = True
        self._drain_started.set()

    async def wait_draining(self) -> None:
        """Return once start_draining has been called (at once if it has)."""
        await self._drain_started.wait()


def route_path(scope) -> str:
    """The path inside the application (behind Ray Serve's route prefix /x, /x/health is /health)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class IngressGateMiddleware:
    """Pure ASGI (WebSockets pass here too). See the module docstring."""

    def __init__(self, app, gate: IngressGate, metrics):
        self.app, self.gate, self.metrics = app, gate, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if self.gate.draining and path not in OPEN_WHILE_DRAINING:
            await self._refuse(scope, receive, send, path)
            return
        if scope["type"] == "http" and path not in ANY_REQUEST_ID and refused_request_id(scope.get("headers") or []):
            await self._refuse_request_id(scope, send, path)
            return
        receive = _disconnect_on_transport_error(receive, scope["type"])
        if scope["type"] == "websocket":
            limit = self.gate.socket_limit()
            if limit is not None and self.gate.open_sockets >= limit:
                await _close_socket(receive, send, 1013, f"{self.gate.open_sockets} editor connections are open on "
                                    "this server replica, its most: retry later")
                return
            self.gate.open_sockets += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.gate.open_sockets -= 1
            return
        await self._answer(scope, receive, send, path)

    async def _answer(self, scope, receive, send, path: str) -> None:
        status, error = CLIENT_GONE, None

        async def send_and_note_status(message):
            nonlocal status, error
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and error is None:
                error = _error_message(message.get("body", b""))
            await send(message)

        arrived = time.perf_counter()
        scope["state"] = dict(scope.get("state") or {})  # per request: routes register their observer here
        scope["state"]["arrived_at"] = arrived  # latencies count from here: body reading and tokenizing included
        endpoint = GAUGED_ENDPOINTS.get(path)
        gauge = self.metrics.in_flight.labels(endpoint) if endpoint else None
        self.gate.open_requests += 1
        if gauge is not None:
            gauge.inc()
        try:
            if endpoint is None:
                await self.app(scope, receive, send_and_note_status)
            else:
                await _cancelled_when_client_leaves(self.app, scope, receive, send_and_note_status,
                                                    started=lambda: status != CLIENT_GONE)
        except Exception:
            if status == CLIENT_GONE:
                status = 500  # Starlette's outermost handler answers the unhandled error with a 500
            raise
        finally:
            try:  # the outcome (metrics, the request-log line) is recorded before the request stops counting
                observer = scope["state"].get("observer")  # as open: once open_requests is 0 every line is out
                if observer is None and endpoint is not None:  # answered before the route made one
                    observer = self._observer(scope, endpoint, arrived)
                if observer is not None:
                    observer.finish(status, error="client disconnected" if status == CLIENT_GONE else error)
            finally:
                self.gate.open_requests -= 1
                if gauge is not None:
                    gauge.dec()

    def _observer(self, scope, endpoint: str, arrived: float) -> RequestObserver:
        """The observer of a request answered without its route's (its X-Request-Id as its id, if valid)."""
        request_id = given_request_id(scope.get("headers") or ())
        request_id = request_id if request_id and valid_request_id(request_id) else None
        observer = RequestObserver(self.metrics, endpoint, request_id, 0)
        observer.started = arrived
        return observer

    async def _refuse(self, scope, receive, send, path: str) -> None:
        if scope["type"] == "websocket":
            await _close_socket(receive, send, 1013, "server is shutting down")
            return
        message = f"the server is shutting down: retry in {self.gate.retry_after_s} s"
        if path in GAUGED_ENDPOINTS:  # counted and logged as every refusal is
            self._observer(scope, GAUGED_ENDPOINTS[path], time.perf_counter()).finish(503, error=message)
        if path == "/health":
            body = {"status": "draining"}
        else:
            body = {"error": {"message": message, "type": "overloaded_error", "param": None, "code": "shutting_down"}}
        await _answer_json(scope, send, 503, body, [(b"retry-after", str(self.gate.retry_after_s).encode())])

    async def _refuse_request_id(self, scope, send, path: str) -> None:
        if path in GAUGED_ENDPOINTS:
            self._observer(scope, GAUGED_ENDPOINTS[path], time.perf_counter()).finish(400, error=REFUSAL)
        body = {"error": {"message": REFUSAL, "type": "invalid_request_error", "param": "X-Request-Id", "code": None}}
        await _answer_json(scope, send, 400, body)


async def _close_socket(receive, send, code: int, reason: str) -> None:
    """Accept a WebSocket and close it at once with `code` and `reason` (a close before the accept would
    reach the client as a 403, the answer to a bad key)."""
    if (await receive())["type"] == "websocket.connect":  # else the client already left
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": code, "reason": reason})


async def _answer_json(scope, send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode() if scope.get("method") != "HEAD" else b""
    headers = [(b"content-type", b"application/json"), *(headers or []), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _cancelled_when_client_leaves(app, scope, receive, send, started) -> None:
    """Run the route; once it has read the whole body, read the connection on its behalf (messages are
    queued for the route's own receive() calls) and cancel the route if the client disconnects before
    `started()` (the response's status went out). Returns normally when the route was cancelled so."""
    queued: asyncio.Queue = asyncio.Queue()
    left_early = False
    watcher: asyncio.Task | None = None

    async def watch() -> None:
        nonlocal left_early
        while True:
            message = await receive()
            queued.put_nowait(message)
            if message["type"] == "http.disconnect":
                if not started():
                    left_early = True
                    route.cancel()
                return

    async def route_receive():
        nonlocal watcher
        if watcher is not None:
            message = await queued.get()
            if message["type"] == "http.disconnect":
                queued.put_nowait(message)  # every later call gets it too (ASGI)
            return message
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            watcher = asyncio.ensure_future(watch())  # the body is read: from now on, watch the client
            if message["type"] == "http.disconnect":
                queued.put_nowait(message)
        return message

    route = asyncio.ensure_future(app(scope, route_receive, send))
    try:
        await route
    except asyncio.CancelledError:
        if not left_early or asyncio.current_task().cancelling():
            raise  # cancelled from outside (Ray Serve's proxy, server shutdown): not ours to swallow
    finally:
        route.cancel()  # when the caller itself was cancelled
        if watcher is not None:
            watcher.cancel()
        await asyncio.gather(route, *([watcher] if watcher else []), return_exceptions=True)


def _error_message(body: bytes) -> str | None:
    """The message of an error body, for the request log: `error.message` in OpenAI's, Anthropic's and
    llama.cpp's shapes, else None (a body too large to be an error body is not parsed)."""
    if len(body) > 16384:
        return None
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


def _disconnect_on_transport_error(receive, scope_type: str):
    """`receive` that answers a transport failure with the ASGI disconnect message (see module docstring)."""
    disconnect = {"type": "http.disconnect"} if scope_type == "http" else {"type": "websocket.disconnect", "code": 1006}

    async def receive_or_disconnect():
        try:
            return await receive()
        except Exception as exc:  # noqa: BLE001 - whatever broke, the client can no longer be reached
            log.debug("receive failed (%s): treating it as a disconnect", type(exc).__name__)
            return disconnect

    return receive_or_disconnect
