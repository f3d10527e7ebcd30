"""What a 404 for a path that is no route says: OpenAI's wording, "Invalid URL (POST /v1/embeddings)", and
the served route the client most likely meant, with the base-URL slip behind it, or where the routes are
listed (each route named under the app's root_path). The slips: a base URL without its /v1 (the OpenAI
SDK's base_url ends in /v1; llama.cpp's server serves both forms), one with /v1 where Anthropic's SDK adds
it itself (so /v1/v1/messages), and a trailing slash (the app does not redirect one: a 307 to an absolute
http:// URL breaks behind a TLS proxy, and a client that does not follow redirects read an empty body);
else a route spelled almost alike (/v1/chat/completion: `close_routes`)."""

from __future__ import annotations

import difflib

from starlette.routing import Match

ANTHROPIC_PATHS = "/v1/messages"  # Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens
NOT_OFFERED = ("(embeddings, files, moderations and stored responses are not offered); GET {root}/docs and "
               "docs/api.md list the routes")


def unknown_route_message(request) -> str:
    """The 404 message for `request` (a starlette Request the router matched to no route). A guess is named
    only where the app serves the request's method at it."""
    root = request.scope.get("root_path", "")
    path = request.scope.get("path", "")
    path = path[len(root):] if root and path.startswith(root) else path
    message = f"Invalid URL ({request.method} {request.url.path}): not a route of this server"
    routes = request.app.router.routes
    for meant, why in [*_guesses(path), *close_routes(path, request.app.openapi().get("paths", {}))]:
        probe = {**request.scope, "path": root + meant}
        if any(route.matches(probe)[0] is Match.FULL for route in routes):
            return f"{message}; did you mean {root + meant}? {why}"
    return f"{message} {NOT_OFFERED.format(root=root)}"


def close_routes(path: str, served) -> list[tuple[str, str]]:
    """(route, why) for the `served` route paths (the app's OpenAPI paths; those with {parameters} left
    out) spelled almost as `path` (with /v1 added where it lacks one), closest first: a letter missing,
    doubled or swapped (difflib's ratio at least 0.9, so /v1/completions and /v1/chat/completions never
    stand for each other)."""
    paths = sorted(p for p in served if "{" not in p)
    bare = path.rstrip("/") or "/"
    targets = [bare] if bare.startswith("/v1/") else [bare, "/v1" + bare]
    found = [m for t in targets for m in difflib.get_close_matches(t, paths, n=2, cutoff=0.9)]
    return [(m, "A route with a name almost alike") for m in dict.fromkeys(found)]


def _guesses(path: str):
    """(route, why) pairs to try for `path`, most likely first."""
    bare = path.rstrip("/") or "/"
    if bare != path:
        yield bare, "Routes here have no trailing slash"
    doubled = bare.startswith("/v1/v1/")
    meant = bare[3:] if doubled else "/v1" + bare
    if not meant.startswith("/v1/models/"):  # (/v1/models/{id} may not hold that id)
        yield meant, _base_url_advice(meant, doubled)


def anthropic_path(path: str) -> bool:
    """Whether `path` (the app's, below any root_path) is one of Anthropic's Messages API routes."""
    return path == ANTHROPIC_PATHS or path.startswith(ANTHROPIC_PATHS + "/")


def _base_url_advice(meant: str, doubled: bool) -> str:
    if anthropic_path(meant):
        return "An Anthropic client's base_url is the server's root, without /v1 (the SDK adds /v1/messages)"
    if doubled:
        return "The URL holds /v1 twice: an OpenAI client's base_url ends in /v1, and the client adds only the route"
    return "An OpenAI client's base_url ends in /v1"
