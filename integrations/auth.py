"""Optional Bearer API keys for every route except /health, HTTP and WebSocket alike.

Keys come from the serve config (`api_keys`) and from env REFUSION_API_KEYS (comma-separated); with
no keys configured every request passes. WebSocket clients send the same `Authorization: Bearer` header
(or `?api_key=` in the URL, for browsers that cannot set headers); a rejected handshake is closed with
code 1008 (policy violation) before it is accepted, which clients see as HTTP 403.
"""

from __future__ import annotations

import hmac
import json
import os
from urllib.parse import parse_qs

OPEN_PATHS = frozenset({"/health"})


def keys_from_env(environ=os.environ) -> list[str]:
    return [k.strip() for k in environ.get("REFUSION_API_KEYS", "").split(",") if k.strip()]


def _presented_key(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("api_key", [None])[0]


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
        key = _presented_key(scope)
        return key is not None and any(hmac.compare_digest(key.encode(), k) for k in self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or invalid API key"})
            return
        body = json.dumps({"error": {
            "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
            "type": "authentication_error", "param": None, "code": "invalid_api_key",
        }}).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
