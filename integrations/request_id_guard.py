"""What a client's X-Request-Id may be, checked before anything repeats it.

A request id goes into the response's `X-Request-Id` header, the request log, the engine's ids and Ray
Serve's access log, so it must be short and plain: 1-200 letters, digits, `.`, `_`, `:`, `-`, `+`, `/`
or `=` (UUIDs, hex ids, dotted or underscored names and base64 ids, as Heroku's router makes, pass). A malformed one is answered 400 naming the header and
what it may hold, on every route (integrations/ingress_gate.py; the editor WebSocket closes with 1008),
rather than replaced without a word: a client sends an id to find its request by it later. An empty one
is no id: the request gets a fresh one, as without the header (nginx's `proxy_set_header X-Request-Id
$http_x_request_id` sends it empty for every client that sent none; Ray's proxy would echo it empty).

Ray Serve's HTTP proxy echoes the header onto the response and into its access log before the
application sees the request. `refusion serve` therefore installs ProxyRequestIdGuard in the proxy
(Ray's RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, set before it starts a local Ray): it takes a
malformed id out of the request before Ray's own request-id middleware reads it, so the proxy gives the
request a fresh UUID as for one without the header, and marks the request (REFUSED_HEADER) for the
ingress to answer the 400. Under `serve run` / `serve deploy`, or a cluster joined with `--address`,
the proxy is Ray's own unless its environment sets that variable to PROXY_CALLBACK.
"""

from __future__ import annotations

import re

REQUEST_ID_HEADER = b"x-request-id"
REFUSED_HEADER = b"x-refusion-refused-request-id"  # set by the proxy guard in place of a malformed id
PROXY_CALLBACK = "integrations.request_id_guard:proxy_middlewares"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,200}")
# The editor WebSocket's close reason (at most 123 bytes), and the 400's message (param X-Request-Id)
CLOSE_REASON = "X-Request-Id header: must be 1-200 letters, digits, '.', '_', ':', '-', '+', '/' or '='"
REFUSAL = (f"{CLOSE_REASON} (a UUID, a hex id, a dotted or underscored name, base64); send another, or none for the "
           "server to make one")


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def refused_request_id(headers) -> bool:
    """Whether a request's raw ASGI `headers` carry a malformed X-Request-Id, or the proxy guard's mark
    of one it took out. An empty one is not malformed: it is no id (see the module docstring)."""
    return any(name == REFUSED_HEADER or (name == REQUEST_ID_HEADER and value
                                          and not valid_request_id(value.decode("latin-1")))
               for name, value in headers)


def given_request_id(headers) -> str | None:
    """The client's X-Request-Id from raw ASGI `headers`, or None when it sent none or an empty one."""
    value = dict(headers).get(REQUEST_ID_HEADER, b"").decode("latin-1")
    return value or None


class ProxyRequestIdGuard:
    """Pure ASGI middleware for Ray Serve's HTTP proxy (see the module docstring): a request (or WebSocket
    handshake) whose X-Request-Id is malformed goes on without it, marked with REFUSED_HEADER; an empty
    one is dropped, so Ray's proxy makes the request a fresh id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = scope.get("headers") or []
        if scope["type"] in ("http", "websocket"):
            if refused_request_id(headers):
                kept = [(name, value) for name, value in headers if name not in (REQUEST_ID_HEADER, REFUSED_HEADER)]
                scope = {**scope, "headers": [*kept, (REFUSED_HEADER, b"1")]}
            elif any(name == REQUEST_ID_HEADER and not value for name, value in headers):
                scope = {**scope, "headers": [(n, v) for n, v in headers if n != REQUEST_ID_HEADER or v]}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """Ray Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the proxy's extra middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyRequestIdGuard)]
