"""HEAD on every GET route, in one place: the routes see a GET, the client gets its status and headers
and no body (RFC 9110, 9.3.2: HEAD is GET without the content; a server SHOULD send the headers GET
would). Starlette's own Route and llama.cpp's server (cpp-httplib dispatches HEAD to its GET handlers)
answer HEAD so; FastAPI's APIRoute does not add HEAD to a GET route, so /v1/models, /metrics, /props ...
answered it 405 (a load balancer or uptime probe that sends HEAD read the server as broken)."""

from __future__ import annotations


class HeadAsGetMiddleware:
    """Pure ASGI, innermost (the guards and the ingress gate outside it see, count and log the HEAD):
    an HTTP HEAD request runs as a GET and its response goes out with the GET's status and headers,
    Content-Length included, and an empty body. A path served to no GET answers as a GET there would
    (405 naming the methods allowed, or the unknown route's 404)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)
