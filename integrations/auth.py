"""Who may call: optional Bearer API keys, and browser origins.

API keys (APIKeyMiddleware) guard every route except /health, HTTP and WebSocket alike. Keys come from
the serve config (`api_keys`), from env REFUSION_API_KEYS (comma-separated) and from env
REFUSION_API_KEY (one key: the variable the clients here read, `refusion lsp`, as vLLM's server reads
VLLM_API_KEY; a user who set it for the server was left with an open server); with no keys configured
every request passes. Anthropic clients may send the key as `x-api-key: <key>`. WebSocket clients send the same `Authorization: Bearer` header (or `?api_key=` in
the URL, for browsers that cannot set headers); a rejected handshake is closed with code 1008 (policy
violation) before it is accepted, which clients see as HTTP 403.

Browser origins (OriginGuard): browsers do not apply the same-origin policy to WebSockets or to simple
cross-site POSTs, so without a check any web page could drive a local server that has no API keys.
A request carrying an `Origin` header (browsers send one; editors, SDKs and curl do not) is refused
with 403 unless that origin is in `allowed_origins`; allowed origins also get CORS headers. The
server's own origin is not implied: a DNS-rebinding page would pass that check. A browser sends no
Origin with a same-origin GET, so a DNS-rebinding page (its own host name now resolving to 127.0.0.1)
could read /metrics or /v1/models that way: a same-origin request a page made (Fetch Metadata's
`Sec-Fetch-Site: same-origin` or `same-site`, which every current browser sends) without an Origin
passes only when its Host header is the host[:port] of an allowed origin (any scheme: TLS may end at a
proxy in front), as Jupyter and the MCP SDKs check Host against DNS rebinding. A user's own navigation
(`Sec-Fetch-Site: none`, the address bar) and a cross-site page's no-cors load (which cannot read the
answer; a cross-origin read sends Origin) pass.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from urllib.parse import parse_qs

from starlette.middleware.cors import CORSMiddleware

OPEN_PATHS = frozenset({"/health"})
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#\s]+$")


def keys_from_env(environ=os.environ) -> list[str]:
    """The keys of env REFUSION_API_KEYS (comma-separated) and REFUSION_API_KEY (one key), blanks
    dropped, in that order (module doc)."""
    keys = environ.get("REFUSION_API_KEYS", "").split(",") + [environ.get("REFUSION_API_KEY", "")]
    return list(dict.fromkeys(k.strip() for k in keys if k.strip()))


def _presented_keys(scope) -> list[str]:
    """Every key the request presents: a Bearer token, an `x-api-key` header (Anthropic's clients), and
    for a WebSocket the `api_key` query parameter (browsers cannot set its headers; an HTTP request can,
    and a key in a URL ends up in proxies' and browsers' logs); a request passes when any of them is a
    configured key, whatever their order or the other headers (a `Basic` Authorization beside a valid
    x-api-key, say)."""
    keys = []
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                keys.append(token.strip())
        elif name == b"x-api-key":
            keys.append(value.decode("latin-1").strip())
    if scope.get("type") != "websocket":
        return keys
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return keys + query.get("api_key", [])


class APIKeyMiddleware:
    """Pure ASGI middleware (so it also guards WebSockets, which HTTP middleware does not see)."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope) -> bool:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]  # behind a route prefix (Ray Serve), /prefix/health is /health
        if not self.keys or path in OPEN_PATHS:
            return True
        return any(hmac.compare_digest(key.encode(), k) for key in _presented_keys(scope) for k in self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or invalid API key"})
            return
        body = json.dumps({"error": {
            "message": "missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key",  # OpenAI's 401
        }}).encode()
        # closed after the answer: the body was not read (a stalled one would keep the connection open)
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def normalize_origin(value: str) -> str:
    """An `allowed_origins` entry as browsers send it: "scheme://host[:port]" (lower case, no path),
    "null" (file:// pages, sandboxed frames) or "*" (any origin). Raises ValueError naming the entry."""
    origin = value.strip().rstrip("/").lower()
    if origin in ("*", "null") or _ORIGIN.match(origin):
        return origin
    raise ValueError(f"allowed_origins: {value!r} is not an origin; write scheme://host[:port], e.g. "
                     f"'http://localhost:3000' (no path), 'null' or '*'")


def _browser_headers(scope) -> dict[bytes, str]:
    headers = {}
    for name, value in scope.get("headers", []):
        if name in (b"origin", b"sec-fetch-site", b"host"):
            headers.setdefault(name, value.decode("latin-1").strip().lower())
    return headers


def _origin(scope) -> str | None:
    return _browser_headers(scope).get(b"origin")


def _same_origin_host(scope) -> str | None:
    """The Host header of a same-origin request a page made without an Origin header (a GET; module
    docstring), else None."""
    headers = _browser_headers(scope)
    if b"origin" in headers or headers.get(b"sec-fetch-site") not in ("same-origin", "same-site"):
        return None
    return headers.get(b"host", "")


class OriginGuard:
    """Pure ASGI: refuses browser requests from origins not in `allowed` (see the module docstring).
    A refused WebSocket handshake is closed before it is accepted (HTTP 403); a refused HTTP request
    gets 403 in OpenAI's error shape. Requests without an Origin header (a same-origin page request: its Host,
    see the module docstring), and /health, pass."""

    def __init__(self, app, allowed: list[str]):
        origins = [normalize_origin(o) for o in allowed]
        self.allow_all = "*" in origins
        self.allowed = frozenset(origins)
        self.allowed_hosts = frozenset(o.split("://", 1)[1] for o in origins if "://" in o)
        self.app = CORSMiddleware(app, allow_origins=origins, allow_methods=["*"], allow_headers=["*"]) if origins else app

    def _allowed(self, scope) -> bool:
        origin = _origin(scope)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if self.allow_all or path in OPEN_PATHS:
            return True
        if origin is None:
            host = _same_origin_host(scope)
            return host is None or host in self.allowed_hosts
        return origin in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed: see allowed_origins"})
            return
        if (origin := _origin(scope)) is not None:
            reason = f"origin {origin!r} is not allowed: add it to allowed_origins in the serve config"
        else:
            reason = (f"a page's request to host {_same_origin_host(scope)!r} is not allowed (against DNS rebinding): "
                      "add its origin, scheme://host[:port], to allowed_origins in the serve config")
        body = json.dumps({"error": {"message": reason, "type": "permission_error", "param": "Origin",
                                     "code": "origin_not_allowed"}}).encode()
        await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
