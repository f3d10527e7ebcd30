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
server's own origin is not implied: a DNS-rebinding page would pass that check.

Host names on loopback connections (HostGuard, against DNS rebinding): a page whose own host name the
attacker then resolves to 127.0.0.1 is same-origin with the server, and a browser sends no Origin with
a same-origin GET (Fetch Metadata's Sec-Fetch-* headers neither: they go only to trustworthy origins), so
/metrics, /v1/models or /v1/engine of a server without API keys could be read. Such a request arrives on
a loopback connection with the page's host name in its Host header: a connection whose local address
is loopback is served only when its Host names no host, an IP address, `localhost`, this machine's own
name, a name under `.localhost`, `.local` or `.internal` (which no public DNS answers), or a name in
`allowed_hosts` ("*": any), as Ollama checks Host on a loopback listener (and Jupyter, Django's
ALLOWED_HOSTS, the MCP SDKs' allowed_hosts). Connections from other addresses (a
cluster's load balancer, a LAN client) are not checked. A reverse proxy on the same machine that passes
the public name on (Caddy and Traefik do by default; nginx sends the upstream's address) needs that name
in `allowed_hosts`.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import os
import re
import socket
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
        path = _route_path(scope)
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


def _header_lines(scope, name: bytes) -> list[str]:
    """The values of every `name` header line of the request (ASGI keeps repeated lines apart)."""
    return [value.decode("latin-1").strip() for key, value in scope.get("headers", []) if key == name]


def _origin(scope) -> str | None:
    lines = _header_lines(scope, b"origin")
    return lines[0].lower() if lines else None


def repeated_header(scope, header: str) -> bool:
    """Whether the request repeats `header`: "Host" on more than one line (RFC 9112, 3.2: a server MUST
    answer that 400; uvicorn's httptools parser passes it on), "Origin" with two different values (RFC
    6454, 7.3: a user agent sends one). The guards read the first line, so an allowed origin or host name
    first let another through after it, for whatever reads the last."""
    values = _header_lines(scope, header.lower().encode())
    return len(values) > 1 if header == "Host" else len({value.lower() for value in values}) > 1


def _route_path(scope) -> str:
    """The request's path below its route prefix: behind Ray Serve's route prefix /prefix/health is /health."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _refuse_header(send, reason: str, param: str, code: str, status: int = 403,
                         kind: str = "permission_error") -> None:
    """A 403 (or `status`) in OpenAI's error shape (type permission_error, or `kind`) naming the header at fault."""
    body = json.dumps({"error": {"message": reason, "type": kind, "param": param, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _refuse_repeated(scope, send, header: str) -> None:
    """The answer to a request whose `header` is repeated (repeated_header): 400 naming it, or a WebSocket
    handshake closed before it is accepted (HTTP 403)."""
    reason = f"the request has more than one {header} header{' value' if header == 'Origin' else ''}: send one"
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": reason})
        return
    await _refuse_header(send, reason, header, "duplicate_header", 400, "invalid_request_error")


class OriginGuard:
    """Pure ASGI: refuses browser requests from origins not in `allowed` (see the module docstring).
    A refused WebSocket handshake is closed before it is accepted (HTTP 403); a refused HTTP request
    gets 403 in OpenAI's error shape. Requests without an Origin header, and /health, pass; two different
    Origin values are a 400 naming the header on every path (repeated_header)."""

    def __init__(self, app, allowed: list[str]):
        origins = [normalize_origin(o) for o in allowed]
        self.allow_all = "*" in origins
        self.allowed = frozenset(origins)
        self.app = CORSMiddleware(app, allow_origins=origins, allow_methods=["*"], allow_headers=["*"]) if origins else app

    def _allowed(self, scope) -> bool:
        origin = _origin(scope)
        path = _route_path(scope)
        return origin is None or self.allow_all or origin in self.allowed or path in OPEN_PATHS

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and repeated_header(scope, "Origin"):
            await _refuse_repeated(scope, send, "Origin")
            return
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed: see allowed_origins"})
            return
        reason = f"origin {_origin(scope)!r} is not allowed: add it to allowed_origins in the serve config"
        await _refuse_header(send, reason, "Origin", "origin_not_allowed")


def _loopback(address) -> bool:
    """Whether a connection's local address is loopback: 127.0.0.0/8, ::1, or 127.x as an IPv4-mapped
    IPv6 address (::ffff:127.0.0.1, a dual-stack socket's view of a connection to 127.0.0.1 when the
    server listens on `::`; Python 3.11 calls it not loopback)."""
    try:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
    except ValueError:  # a Unix socket's path, a test client's name
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _host_name(scope) -> str | None:
    """The host name of the request's Host header, lower case, without port, brackets or a trailing
    dot (None: no Host header)."""
    for name, value in scope.get("headers", []):
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):  # [::1]:8000
                return host[1:host.find("]")] if "]" in host else host
            return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") <= 1 else host
    return None


LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


@functools.cache
def _local_names() -> frozenset[str]:
    """localhost and this machine's host name (a Debian /etc/hosts maps it to 127.0.1.1); not its fully
    qualified name, which would take a DNS lookup."""
    return frozenset(name.lower().rstrip(".") for name in ("localhost", socket.gethostname()) if name)


def normalize_host(value: str) -> str:
    """An `allowed_hosts` entry: a host name as a Host header names it, lower case, without port ("*":
    any). Raises ValueError naming the entry."""
    host = value.strip().lower().rstrip(".")
    if host == "*" or re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", host):
        return host
    raise ValueError(f"allowed_hosts: {value!r} is not a host name; write it as in a URL without scheme or port, "
                     f"e.g. 'llm.example.com', or '*'")


class HostGuard:
    """Pure ASGI: refuses a request that came over a loopback connection naming a host other than an IP
    address, localhost or one of `allowed_hosts` (DNS rebinding; module docstring): 403 in OpenAI's
    error shape, a WebSocket handshake closed before it is accepted (HTTP 403). /health passes. A
    repeated Host line is a 400 naming the header on every path and connection (repeated_header)."""

    def __init__(self, app, allowed_hosts: list[str]):
        self.app = app
        hosts = [normalize_host(h) for h in allowed_hosts]
        self.allow_all = "*" in hosts
        self.allowed = frozenset(hosts)

    def refused_host(self, scope) -> str | None:
        """The host name that makes the request a refused one, else None."""
        server = scope.get("server")
        if self.allow_all or not server or not _loopback(server[0]):
            return None
        path = _route_path(scope)
        host = _host_name(scope)
        if not host or path in OPEN_PATHS or host in self.allowed or host in _local_names():
            return None
        if host.endswith(LOCAL_SUFFIXES):  # names no public DNS answers, so no rebinding page has one
            return None
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            return host

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and repeated_header(scope, "Host"):
            await _refuse_repeated(scope, send, "Host")
            return
        host = self.refused_host(scope) if scope["type"] in ("http", "websocket") else None
        if host is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed: see allowed_hosts"})
            return
        reason = (f"host {host!r} (the Host header) is not served on a loopback connection, against DNS rebinding: "
                  "use localhost or 127.0.0.1, or add the name to allowed_hosts in the serve config")
        await _refuse_header(send, reason, "Host", "host_not_allowed")
