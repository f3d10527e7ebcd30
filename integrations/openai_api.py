"""The OpenAI-compatible HTTP API (FastAPI), independent of how the engine is hosted.

    app = create_app(APISettings(model_name=...), engine_client)   # or set app.state.engine_client later

Routes (every GET route answers HEAD too: integrations/head_requests.py): GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
POST /v1/responses (integrations/responses_api.py), POST /v1/messages and /v1/messages/count_tokens
(Anthropic's Messages API: integrations/anthropic_api.py),
GET /metrics (Prometheus text), GET /v1/engine (engine info: limits, defaults, load), plus the editor
protocol's router (integrations/editor/http.py) when that package is present, and POST /pause, POST
/resume and GET /is_paused when APISettings.pause_endpoints (integrations/pause_api.py). The work behind
POST /v1/completions is integrations/openai_completions.py's.
Streams are server-sent events, one JSON chunk per `data:` line, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from integrations import openai_responses as shape
from integrations.auth import APIKeyMiddleware, HostGuard, OriginGuard
from integrations.chat_run import start_chat
from integrations.anthropic_api import router as anthropic_router
from integrations.http_errors import RouteErrorShape, install_error_handlers
from integrations.head_requests import HeadAsGetMiddleware
from integrations.http_metrics import APIMetrics
from integrations.ingress_gate import IngressGate, IngressGateMiddleware
from integrations.json_response import UTF8JSONResponse
from integrations.openai_calls import check_model, collect_all, logprob_formatter, read_body, sse
from integrations.openai_choices import indexed, merged
from integrations.openai_completions import (check_completion_options, completion_response, start_completions,
                                            start_infill)
from integrations.openai_logprobs import LogprobFormatter
from integrations.openai_models import ChatCompletionRequest, CompletionRequest
from integrations.openai_requests import id_headers, request_id
from integrations.pause_api import router as pause_router
from integrations.openai_stream import ChoiceUsage, chat_events, choice_chunks, prompt_scores_kept, stop_included
from integrations.request_body import BodyLimitMiddleware
from integrations.request_limits import InputError, RequestLimits, grammar_off_loop
from integrations.responses_api import router as responses_router


@dataclass
class APISettings:
    """Ingress behaviour. default_max_tokens applies to chat; completions default to 16, like OpenAI
    (either shrinks to the context left after the prompt). allowed_origins: browser origins that may
    call (auth.OriginGuard); allowed_hosts: host names served on loopback connections besides IP
    addresses and localhost (auth.HostGuard, against DNS rebinding); limits: body, prompt and context limits (request_limits.RequestLimits)."""

    model_name: str
    model_aliases: tuple[str, ...] = ()  # further ids requests may name (vLLM's --served-model-name after the first)
    api_keys: list[str] = field(default_factory=list)
    default_max_tokens: int = 256
    completion_default_max_tokens: int = 16
    decode_defaults: dict = field(default_factory=dict)  # the model's (decoding.params.load_model_defaults)
    allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    limits: RequestLimits = field(default_factory=RequestLimits)
    pause_endpoints: bool = False  # POST /pause, POST /resume, GET /is_paused (integrations/pause_api.py)


log = logging.getLogger(__name__)
router = APIRouter()
READY_TIMEOUT_S = 5.0  # /health: how long an engine replica may take to answer before "unavailable"
ENGINE_METRICS_TIMEOUT_S = 2.0  # /metrics: the engine's part is left out when no replica answers by then


def create_app(settings: APISettings, engine_client=None, gate: IngressGate | None = None) -> FastAPI:
    """The ASGI app. `engine_client` follows integrations.engine_client.EngineClient; `gate` (in-flight
    accounting, draining: integrations/ingress_gate.py) is the host's to hold when it drains the app."""
    # redirect_slashes: a path with a trailing slash is a 404 naming the route (route_hints), not a 307
    app = FastAPI(title="refusion-serve", version="0.1.0", redirect_slashes=False)
    app.state.settings = settings
    app.state.engine_client = engine_client
    app.state.metrics = APIMetrics()
    app.state.gate = gate or IngressGate()
    app.state.gate.max_sockets = settings.limits.max_editor_connections
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(responses_router)
    app.include_router(anthropic_router)
    if settings.pause_endpoints:
        app.include_router(pause_router)
    editor_router = _editor_router()
    if editor_router is not None:
        app.include_router(editor_router)
    # Outermost first: Host on loopback, browser origin, then API key, then the body limit, then HEAD
    # as GET, then the routes.
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.limits.max_body_bytes,
                       body_timeout_s=settings.limits.body_timeout_s)
    app.add_middleware(APIKeyMiddleware, keys=list(settings.api_keys))
    app.add_middleware(OriginGuard, allowed=list(settings.allowed_origins))
    app.add_middleware(HostGuard, allowed_hosts=list(settings.allowed_hosts))
    # Outside all of them: in-flight gauge and observers, draining, disconnects (every path passes here).
    app.add_middleware(IngressGateMiddleware, gate=app.state.gate, metrics=app.state.metrics)
    app.add_middleware(RouteErrorShape)  # Anthropic's and llama.cpp's routes: errors in their shape, whoever answered
    return app


def _editor_router():
    try:
        from integrations.editor.http import router as editor_router
    except ModuleNotFoundError as exc:
        if exc.name in ("integrations.editor", "integrations.editor.http"):
            return None
        raise
    return editor_router


@router.get("/health")
async def health(request: Request):
    """200 when a request would be served at full speed now: an engine replica answers (replicas warm up
    before they take traffic, engine_host.warm_up). 503 + Retry-After while none does (starting, being
    replaced); while the ingress drains, the gate answers 503 {"status": "draining"} before this runs.
    An engine autoscaled down to zero replicas is not probed: 200 with `"engine": "scaled_to_zero"` (a
    probe waited for a replica to start, timed out with 503, and a load balancer then never sent the
    request that starts one); that request waits for a replica to start (Ray Serve's cold start)."""
    model = request.app.state.settings.model_name
    client = request.app.state.engine_client
    if await client.scaled_to_zero():
        return {"status": "ok", "model": model, "engine": "scaled_to_zero"}
    try:
        await asyncio.wait_for(client.info(), READY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason; the reason is logged
        log.info("health: engine not ready (%s)", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "model": model}, 503, headers={"Retry-After": "2"})
    return {"status": "ok", "model": model}


@router.get("/v1/models")
async def list_models(request: Request, after_id: str | None = None, before_id: str | None = None,
                      limit: int = Query(default=20, ge=1, le=1000)):
    """OpenAI's list (no pagination: every served id), with the pagination of Anthropic's (the anthropic
    SDK's `models.list`): `after_id` / `before_id` a served id, the page after / before it; `limit`
    1-1000 ids per page (default 20); `has_more`, `first_id` and `last_id` (null on an empty page) of
    the page. A cursor that is no served id: 400 naming it."""
    settings = request.app.state.settings
    names = [settings.model_name, *settings.model_aliases]  # one model under each served id, as vLLM lists them
    for cursor, value in (("after_id", after_id), ("before_id", before_id)):
        if value is not None and value not in names:
            raise InputError(400, cursor, f"{value!r} is not a served model id; served: {', '.join(names)}")
    start = names.index(after_id) + 1 if after_id is not None else 0
    end = names.index(before_id) if before_id is not None else len(names)
    page = names[start:end][-limit:] if before_id is not None and after_id is None else names[start:end][:limit]
    more = (names.index(page[0]) > start if before_id is not None and after_id is None
            else names.index(page[-1]) + 1 < end) if page else False
    return {"object": "list", "data": [_model_card(name, settings.limits.context_length) for name in page],
            "has_more": more, "first_id": page[0] if page else None, "last_id": page[-1] if page else None}


@router.get("/v1/models/{model_id:path}")  # a served id may hold a slash ("org/model", as on the hub)
async def get_model(model_id: str, request: Request):
    check_model(request, model_id)
    return _model_card(model_id, request.app.state.settings.limits.context_length)


@router.get("/v1/engine")
async def engine_info(request: Request):
    """The engine replica's info (limits, defaults, load, the replica that answered) and the ingress's
    served names and request limits. With the engine autoscaled down to zero replicas, the ingress's
    part only, with `"scaled_to_zero": true` (and no `engine` section): asking a replica would start one
    (a dashboard polling this kept an `--autoscale 0:N` engine up)."""
    client, settings = request.app.state.engine_client, request.app.state.settings
    ingress = {"served_model_names": [settings.model_name, *settings.model_aliases],
               "request_limits": settings.limits.as_dict()}
    if await client.scaled_to_zero():
        return {"model": settings.model_name, "scaled_to_zero": True, **ingress}
    return {**await client.info(), **ingress}


@router.get("/metrics")
async def metrics(request: Request):
    try:
        engine_text = await asyncio.wait_for(request.app.state.engine_client.metrics(), ENGINE_METRICS_TIMEOUT_S)
    except Exception:  # a replica being replaced (calls wait for one) must not hold up the ingress's own metrics
        engine_text = b"# engine metrics unavailable: no engine replica answered\n"
    body = request.app.state.metrics.render() + (engine_text or b"")
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/v1/completions")
async def completions(request: Request):
    """OpenAI completions. Every fault of the request (fields, context, engine admission) is answered
    before the response starts, streamed or not."""
    body = await read_body(request, CompletionRequest)
    client, settings = request.app.state.engine_client, request.app.state.settings
    check_model(request, body.model)
    if body.suffix is None:  # (an infill takes one prompt and n 1: refused below, naming why)
        settings.limits.check_sequences(len(body.prompts), body.n)
    header = shape.ResponseHeader("cmpl", client.model_name, request_id(request, "cmpl"))
    grammar = None
    if body.response_format is not None or body.structured_outputs is not None:  # compiling can take a while
        grammar = await grammar_off_loop(body.output_grammar)
    check_completion_options(body, grammar, request.scope.get("root_path", ""))
    if body.suffix is not None:  # infill, suffix "" (end of a file) too: the editor path (integrations/openai_infill.py)
        run = await start_infill(request, client, settings, header, body)
    else:
        run = await start_completions(request, client, settings, header, body, grammar)
    return await completion_response(request, client, header, body, run)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    """OpenAI chat completions; faults are answered before the response starts, as for completions."""
    body = await read_body(request, ChatCompletionRequest)
    run = await start_chat(request, body, "chatcmpl", "chat")
    header, observer = run.header, run.observer
    formatter = logprob_formatter(run.client, body)
    if body.include_stop_str_in_output:  # vLLM's: the client's stop string ends the text (not the template's turn end)
        run.streams = [stop_included(d, body.stop) for d in run.streams]
    scores = [] if body.returns_prompt_logprobs else None
    if scores is not None:  # vLLM's prompt_logprobs: one list for the response (every choice shares the prompt)
        run.streams[0] = prompt_scores_kept(run.streams[0], scores)
    if body.stream:
        build = functools.partial(chat_events, header, allowed_tools=run.allowed, prefix=run.forced,
                                  max_calls=run.max_calls, logprobs=formatter, client_stops=body.stop,
                                  stream_arguments=run.stream_arguments)
        events = merged([indexed(choice_chunks(d, build, ChoiceUsage(observer.prompt_tokens) if body.continuous_usage
                                               else None), i) for i, d in enumerate(run.streams)])
        return sse(request, header, observer, events, "chat.completion.chunk", body.include_usage)
    collected = await collect_all(run.streams, observer)
    choices = [(run.forced + text, last, formatter.chat(entries) if formatter else None) for text, last, entries in collected]
    completion = shape.chat_body(header, choices, observer.prompt_tokens, observer.completion_tokens, run.allowed,
                                 run.max_calls, body.stop)
    if scores is not None:
        completion["prompt_logprobs"] = LogprobFormatter(run.client.tokenizer, body.prompt_logprobs).prompt_logprobs(scores)
    return UTF8JSONResponse(completion, headers=id_headers(request, header.id))


# ---------------------------------------------------------------------------------------------------


def _model_card(model_id: str, context_length: int) -> dict:
    """OpenAI's model object plus vLLM's `max_model_len` (the context, tokens), which clients read to
    size their prompts, and the fields of Anthropic's model object (`type`, `display_name`,
    `created_at`, `max_input_tokens`: the longest prompt, which leaves the context room for one token, the
    maximum the Messages route's "prompt is too long: P tokens > C maximum" names), so the anthropic SDK's
    `models.list()` reads it too."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "refusion-serve", "root": model_id,
            "max_model_len": context_length, "type": "model", "display_name": model_id,
            "created_at": "1970-01-01T00:00:00Z", "max_input_tokens": max(0, context_length - 1)}
