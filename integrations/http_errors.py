"""HTTP error mapping in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    400 invalid_request_error   pydantic validation (its message: validation_errors.py), engine
                                InvalidRequestError, a malformed body (request_limits.InputError);
                                param names the field
    401 invalid_request_error   code invalid_api_key, as OpenAI's: missing or wrong API key (when keys
                                are configured)
    403 permission_error        a browser origin not in allowed_origins (auth.OriginGuard), or a loopback
                                connection's Host not allowed (auth.HostGuard, DNS rebinding)
    404 invalid_request_error   unknown route or model (code model_not_found), as OpenAI's
    408 invalid_request_error   code request_timeout: a body that stopped arriving for body_timeout_s
                                (request_body.BodyLimitMiddleware)
    413 invalid_request_error   body over max_body_bytes (request_body.BodyLimitMiddleware)
    503 overloaded_error        engine OverloadedError, a full deployment queue or a replica being
                                replaced, with Retry-After; code shutting_down while the server drains
                                (the ingress gate, or an engine replica: engine_client.ShuttingDownError)
    503 server_error            code engine_unavailable: the engine replica serving the request died
                                (engine_client.EngineUnavailableError), with Retry-After
    500 server_error            anything else: a bug

Routes of Anthropic's Messages API (/v1/messages...) answer the same statuses in Anthropic's shape,
{"type": "error", "error": {"type", "message"}}, and llama.cpp's own routes (/infill, /completion, ...:
LLAMA_PATHS) in llama.cpp's, {"error": {"code", "message", "type"}}: RouteErrorShape rewrites every
error response of those paths, the middlewares' (401, 403, 408, 413, 503 while draining) included; a bug's
500, which Starlette answers from outside every middleware, is shaped where it is built (shaped_response).
"""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from integrations.request_limits import InputError, clipped
from integrations.route_hints import anthropic_path, unknown_route_message
from integrations.validation_errors import validation_answer
from integrations.engine_client import EngineUnavailableError, ShuttingDownError
from scheduler.api import EngineError, InvalidRequestError, OverloadedError

log = logging.getLogger(__name__)

# Engine parameter names -> the OpenAI request field a client sets.
_ENGINE_TO_API_FIELD = {"gen_length": "max_tokens", "prompt_ids": "prompt", "suffix_ids": "suffix", "params": "body",
                        "request_id": "X-Request-Id"}  # an engine id is the X-Request-Id header (or ours, unique)


# ... and the names other routes give them (RequestObserver endpoints)
_ENDPOINT_FIELDS = {"chat": {"prompt_ids": "messages"}, "messages": {"prompt_ids": "messages"},
                    "responses": {"prompt_ids": "input", "gen_length": "max_output_tokens"},
                    "infill": {"prompt_ids": "input_prefix", "suffix_ids": "input_suffix", "gen_length": "n_predict"},
                    "completion": {"gen_length": "n_predict"}}


# Ray errors that mean "no engine replica could answer right now" (a restart, a health-check swap).
_REPLICA_GONE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError"})


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None, details: dict | None = None):
        message, param = clipped(message), clipped(param, 200) if param else param  # values quoted from a request
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers, self.details = headers or {}, details

    def body(self) -> dict:
        """OpenAI's error object; `details` (machine-readable, for an SDK to act on, as Anthropic's
        error.details) only when set."""
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return body | {"details": self.details} if self.details else body

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers)


def overloaded(message: str, retry_after_s: float) -> APIError:
    retry = str(max(1, math.ceil(retry_after_s)))
    return APIError(503, message, "overloaded_error", code="overloaded", headers={"Retry-After": retry})


def api_field(engine_field: str, endpoint: str | None = None) -> str:
    """The request field an engine parameter is on a route (`endpoint`: a RequestObserver's, e.g. "chat");
    OpenAI completions' names by default."""
    return (_ENDPOINT_FIELDS.get(endpoint or "", {}).get(engine_field)
            or _ENGINE_TO_API_FIELD.get(engine_field, engine_field))


def engine_message(exc: InvalidRequestError, endpoint: str | None = None, cap_field: str | None = None) -> str:
    """An engine 400's message in the route's words: its gen_length is the route's token cap field
    (`cap_field` when the client named it otherwise)."""
    return str(exc).split(": ", 1)[-1].replace("gen_length", cap_field or api_field("gen_length", endpoint))


def anthropic_overflow_message(prompt_tokens: int, max_tokens: int, limit: int) -> str:
    """Anthropic's 400 for a prompt and max_tokens over the context, which Claude Code parses to lower
    max_tokens and retry (the Messages route's context check and its KV refusal both say it)."""
    return (f"input length and `max_tokens` exceed context limit: {prompt_tokens} + {max_tokens} > {limit}, "
            "decrease input length or `max_tokens` and try again")


def anthropic_prompt_message(prompt_tokens: int, most: int) -> str:
    """Anthropic's 400 for a prompt longer than the model takes, which Claude Code parses to compact the
    conversation: `most` is the longest prompt that leaves room to generate (the context less one, or
    what the engine's KV cache holds beside one token)."""
    return f"prompt is too long: {prompt_tokens} tokens > {most} maximum"


def from_engine_error(exc: Exception, endpoint: str | None = None, cap_field: str | None = None) -> APIError:
    """Map a typed engine error (or Ray Serve back-pressure) to its APIError; anything else is a bug.
    endpoint: the route's (RequestObserver.endpoint), so a 400 names the field that route's client sent
    (chat's `messages`, not `prompt`); cap_field: the token cap's name as the client sent it
    (RequestObserver.cap_field: chat's max_completion_tokens), else the route's."""
    if isinstance(exc, InvalidRequestError):
        field = (cap_field if exc.field == "gen_length" else None) or api_field(exc.field, endpoint)
        if (endpoint == "messages" and exc.field == "gen_length" and None not in (exc.asked, exc.most, exc.prompt_tokens)
                and exc.asked > exc.most):
            # the KV cache is this request's context: worded as the context check words it
            message = anthropic_overflow_message(exc.prompt_tokens, exc.asked, exc.prompt_tokens + exc.most)
            return APIError(400, f"{message} ({engine_message(exc, endpoint, cap_field)})", param=field)
        if endpoint == "messages" and exc.field == "prompt_ids" and None not in (exc.most, exc.prompt_tokens):
            # (a prompt the KV cache cannot hold: Claude Code compacts the conversation on this wording)
            message = anthropic_prompt_message(exc.prompt_tokens, exc.most)
            return APIError(400, f"{message} ({engine_message(exc, endpoint, cap_field)})", param=field)
        return APIError(400, f"{field}: {engine_message(exc, endpoint, cap_field)}", param=field)
    if isinstance(exc, ShuttingDownError):  # as the draining ingress answers (ingress_gate)
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return APIError(503, str(exc), "overloaded_error", code="shutting_down", headers={"Retry-After": retry})
    if isinstance(exc, EngineUnavailableError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return APIError(503, str(exc), "server_error", code="engine_unavailable", headers={"Retry-After": retry})
    if isinstance(exc, OverloadedError):
        return overloaded(str(exc), exc.retry_after_s)
    if type(exc).__name__ == "BackPressureError":  # ray.serve.exceptions: deployment queue full
        return overloaded("the engine deployment's queue is full: retry shortly", 1.0)
    if type(exc).__name__ in _REPLICA_GONE:  # a replica died or is being replaced: not a bug here
        return overloaded(f"engine replica unavailable ({type(exc).__name__}): retry shortly", 2.0)
    if isinstance(exc, EngineError):
        return APIError(500, f"engine error: {exc}", "server_error")
    return APIError(500, f"internal error ({type(exc).__name__}); the server log has the details", "server_error")


def _observed(request: Request) -> tuple[str | None, str | None]:
    """The route's RequestObserver endpoint ("chat", ...) and cap_field, once the route registered one."""
    observer = getattr(request.state, "observer", None)
    return getattr(observer, "endpoint", None), getattr(observer, "cap_field", None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        code = "request_too_large" if exc.status == 413 else None
        return APIError(exc.status, str(exc), param=exc.field, code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        param, message = validation_answer(exc.errors(), _api_path(request.scope),
                                           getattr(request.state, "body_fields", ()))
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error"  # OpenAI's type for an unknown route, too
        headers = getattr(exc, "headers", None)
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # the router's: no such route
            message = unknown_route_message(request)
        elif exc.status_code == 405 and message == "Method Not Allowed" and (headers or {}).get("Allow"):
            message = f"{request.method} is not allowed on {request.url.path}: use {headers['Allow']}"
        return APIError(exc.status_code, message, kind, headers=headers).response()

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError):  # typed: an answer, not a bug (no traceback)
        return from_engine_error(exc, *_observed(request)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        # Starlette answers this one from its outermost middleware, outside RouteErrorShape: shaped here
        return shaped_response(request.scope, from_engine_error(exc))


# Anthropic's error types (https://docs.anthropic.com/en/api/errors) for ours; the rest map by status
_ANTHROPIC_TYPES = {"server_error": "api_error", "permission_error": "permission_error",
                    "overloaded_error": "overloaded_error"}
# llama.cpp server's own routes served here (integrations/editor/http.py, token_routes.py): errors in llama.cpp's shape.
# Not /tokenize, /detokenize, /tokenizer_info: vLLM serves them too, and its clients read OpenAI's shape
# (a vLLM-style `model` that is not served is OpenAI's 404 model_not_found there)
LLAMA_PATHS = ("/infill", "/completion", "/apply-template", "/props")


def anthropic_error_body(status: int, kind: str, message: str, details: dict | None = None) -> dict:
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}} (plus "details" when
    given: Anthropic's machine-readable error details, {"error_code": ...}); `kind` is ours (the
    OpenAI-shape type), mapped to Anthropic's (server_error -> api_error, a 401 -> authentication_error,
    a 408 -> timeout_error, a 413 -> request_too_large, every 503 -> overloaded_error: a lost engine
    replica too, as a drain and a full queue say, where Anthropic's api_error is its 500)."""
    by_status = {401: "authentication_error", 404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                 503: "overloaded_error"}
    anthropic = by_status.get(status) or _ANTHROPIC_TYPES.get(kind, "invalid_request_error")
    error = {"type": anthropic, "message": message}
    return {"type": "error", "error": error | {"details": details} if details else error}


def llama_error_body(status: int, kind: str, message: str, details: dict | None = None) -> dict:
    """An error in llama.cpp server's shape: {"error": {"code": status, "message", "type"}}; `kind` is
    ours, with llama.cpp's names where they differ (its error_type names: 401 authentication_error, 404
    not_found_error, 503 unavailable_error, which llama.cpp's server answers while it loads a model)."""
    by_status = {401: "authentication_error", 404: "not_found_error", 503: "unavailable_error"}
    return {"error": {"code": status, "message": message, "type": by_status.get(status) or kind}}


def _route_shape(path: str, headers=()):
    """The error-body builder of `path`'s API, or None for OpenAI's (the shape errors start in). /v1/models
    serves both SDKs: a request with Anthropic's `anthropic-version` header (the anthropic SDK always sends
    it) gets Anthropic's shape there."""
    path = path.rstrip("/") or "/"  # a slip's 404 in the shape of the route meant (route_hints): a trailing
    if path.startswith("/v1/v1/"):  # slash, an Anthropic SDK's base_url ending in /v1
        path = path[3:]
    if anthropic_path(path):
        return anthropic_error_body
    if (path == "/v1/models" or path.startswith("/v1/models/")) and any(k == b"anthropic-version" for k, _ in headers):
        return anthropic_error_body
    if path in LLAMA_PATHS:
        return llama_error_body
    return None


def _api_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def shaped_response(scope, error: APIError) -> JSONResponse:
    """`error` as a response in the shape of the API `scope`'s path belongs to (_route_shape)."""
    shape = _route_shape(_api_path(scope), scope.get("headers") or ())
    if shape is None:
        return error.response()
    return JSONResponse(shape(error.status, error.type, error.message, error.details), status_code=error.status,
                        headers=error.headers)


class RouteErrorShape:
    """Pure ASGI: an error response (status >= 400, a JSON body {"error": {"type", "message", ...}}) on
    a path of Anthropic's or llama.cpp's API is rewritten into that API's shape (_route_shape); other
    paths and successful responses (streams included) pass untouched. Outermost, so the key, origin,
    body-limit and draining answers get it too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        shape = _route_shape(_api_path(scope), scope.get("headers") or ()) if scope["type"] == "http" else None
        if shape is None:
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def rewrite(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the whole body is in
                return
            if start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                error = json.loads(body)["error"]
                body = json.dumps(shape(start["status"], error.get("type", ""), error.get("message", ""),
                                        error.get("details"))).encode()
            except (ValueError, KeyError, TypeError, AttributeError):
                pass  # not an error object of ours: leave it as it is
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
