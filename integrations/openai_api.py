"""The OpenAI-compatible HTTP API (FastAPI), independent of how the engine is hosted.

    app = create_app(APISettings(model_name=...), engine_client)   # or set app.state.engine_client later

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
GET /metrics (Prometheus text), GET /v1/engine (engine info: limits, defaults, load), plus the editor
protocol's router (integrations/editor/http.py) when that package is present.
Streams are server-sent events, one JSON chunk per `data:` line, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from decoding.grammar import GrammarSpec
from integrations import openai_responses as shape
from integrations.auth import APIKeyMiddleware, OriginGuard
from integrations.chat import chat_prompt_ids, conversation_key, forced_prefix_ids
from integrations.context_fit import fit_generation
from integrations.editor.document import DocumentStyle, cursor_at_indent
from integrations.engine_client import ShuttingDownError
from integrations.http_errors import APIError, from_engine_error, install_error_handlers, overloaded
from integrations.http_metrics import APIMetrics, RequestObserver
from integrations.ingress_gate import IngressGate, IngressGateMiddleware
from integrations.openai_choices import choice_requests, indexed, merged, start_all
from integrations.openai_infill import infill_deltas, infill_job
from integrations.openai_logprobs import LogprobFormatter
from integrations.openai_models import ChatCompletionRequest, CompletionRequest
from integrations.openai_stream import (chat_events, completion_events, in_document_style, null_usage_until_final,
                                        sse_response, usage_at_end)
from integrations.openai_requests import completion_requests, generation_request, id_headers, request_id
from integrations.request_limits import BodyLimitMiddleware, InputError, RequestLimits, off_loop, read_json_object
from integrations.structured_output import tool_grammar
from integrations.tool_calls import forced_call
from scheduler.api import ENGINE_STOPPED, Delta, FinishReason, GenerationRequest


@dataclass
class APISettings:
    """Ingress behaviour. default_max_tokens applies to chat; completions default to 16, like OpenAI
    (either shrinks to the context left after the prompt). allowed_origins: browser origins that may
    call (auth.OriginGuard); limits: body, prompt and context limits (request_limits.RequestLimits)."""

    model_name: str
    api_keys: list[str] = field(default_factory=list)
    default_max_tokens: int = 256
    completion_default_max_tokens: int = 16
    decode_defaults: dict = field(default_factory=dict)  # the model's (decoding.params.load_model_defaults)
    allowed_origins: list[str] = field(default_factory=list)
    limits: RequestLimits = field(default_factory=RequestLimits)


log = logging.getLogger(__name__)
router = APIRouter()
READY_TIMEOUT_S = 5.0  # /health: how long an engine replica may take to answer before "unavailable"
ENGINE_METRICS_TIMEOUT_S = 2.0  # /metrics: the engine's part is left out when no replica answers by then


def create_app(settings: APISettings, engine_client=None, gate: IngressGate | None = None) -> FastAPI:
    """The ASGI app. `engine_client` follows integrations.engine_client.EngineClient; `gate` (in-flight
    accounting, draining: integrations/ingress_gate.py) is the host's to hold when it drains the app."""
    app = FastAPI(title="refusion-serve", version="0.1.0")
    app.state.settings = settings
    app.state.engine_client = engine_client
    app.state.metrics = APIMetrics()
    app.state.gate = gate or IngressGate()
    install_error_handlers(app)
    app.include_router(router)
    editor_router = _editor_router()
    if editor_router is not None:
        app.include_router(editor_router)
    # Outermost first: browser origin, then API key, then the body limit, then the routes.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=list(settings.api_keys))
    app.add_middleware(OriginGuard, allowed=list(settings.allowed_origins))
    # Outside all of them: in-flight gauge and observers, draining, disconnects (every path passes here).
    app.add_middleware(IngressGateMiddleware, gate=app.state.gate, metrics=app.state.metrics)
    return app


def _editor_router():
    try:
        from integrations.editor.http import router as editor_router
    except ModuleNotFoundError as exc:
        if exc.name in ("integrations.editor", "integrations.editor.http"):
            return None
        raise
    return editor_router


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    """200 when a request would be served at full speed now: an engine replica answers (replicas warm up
    before they take traffic, engine_host.warm_up). 503 + Retry-After while none does (starting, being
    replaced); while the ingress drains, the gate answers 503 {"status": "draining"} before this runs."""
    model = request.app.state.settings.model_name
    try:
        await asyncio.wait_for(request.app.state.engine_client.info(), READY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason; the reason is logged
        log.info("health: engine not ready (%s)", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "model": model}, 503, headers={"Retry-After": "2"})
    return {"status": "ok", "model": model}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(request.app.state.settings.model_name)]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    _check_model(request, model_id)
    return _model_card(model_id)


@router.get("/v1/engine")
async def engine_info(request: Request):
    info = await request.app.state.engine_client.info()
    return {**info, "request_limits": request.app.state.settings.limits.as_dict()}


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
    body = await _read_body(request, CompletionRequest)
    client, settings = request.app.state.engine_client, request.app.state.settings
    _check_model(request, body.model)
    header = shape.ResponseHeader("cmpl", client.model_name, request_id(request, "cmpl"))
    grammar = None
    if body.response_format is not None or body.structured_outputs is not None:  # compiling can take a while
        grammar = await off_loop(body.output_grammar)
    if body.suffix is not None and len(body.prompts) > 1:
        raise InputError(400, "prompt", "an infill (`suffix`) takes one prompt: send one per request")
    if body.suffix is not None and body.n > 1:
        raise InputError(400, "n", "several completions of an infill (`suffix`) are not offered here: use n 1, "
                         "or POST /infill with n_cmpl")
    if body.suffix is not None and body.logprobs is not None:
        raise InputError(400, "logprobs", "log probabilities are not returned for infill (`suffix`): drop one of them")
    if body.suffix is not None and grammar is not None:
        raise InputError(400, "response_format" if body.structured_outputs is None else "structured_outputs",
                         "structured output is not supported with `suffix` (infill): drop one of them")
    if body.suffix is not None:  # infill, suffix "" (end of a file) too: the editor path (integrations/openai_infill.py)
        params = body.decode_params(body.max_tokens or settings.completion_default_max_tokens, settings.decode_defaults)
        job = await infill_job(client, header.id, body, params)
        prompt_ids = job.prompt.prompt_ids + (job.prompt.suffix_ids or [])
        fit_generation(settings.limits.context_length, len(prompt_ids), body.max_tokens or 1,
                       requested=body.max_tokens is not None)
        observer = RequestObserver.for_request(request, "completions", header.id, len(prompt_ids),
                                               usage_from_engine=True)  # the text is post-processed (CRLF, cuts)
        streams = [await _primed(_observed(infill_deltas(client, job, header.id, body.stream), observer), observer)]
    else:
        prepared = await completion_requests(client.tokenizer, header.id, body, settings, grammar)
        observer = RequestObserver.for_request(request, "completions", header.id,
                                               sum(len(p.request.prompt_ids) for p in prepared))
        total = len(prepared) * body.n  # choice k * n + j: prompt k's choice j (OpenAI's order)
        reqs = [r for k, p in enumerate(prepared) for r in choice_requests(p.request, body.n, k * body.n, total)]
        streams = await start_all(lambda r: _start(client, r, observer), reqs)
        for i, p in enumerate(p for p in prepared for _ in range(body.n)):
            if p.style != DocumentStyle():  # a CRLF or tab-indented prompt: the text comes back in its style
                streams[i] = in_document_style(streams[i], p.style, cursor_at_indent(p.text))
    formatters = [_logprob_formatter(client, body) for _ in streams]  # one each: text offsets are per choice
    if body.stream:
        events = merged([indexed(completion_events(header, d, f), i) for i, (d, f) in enumerate(zip(streams, formatters))])
        return _sse(request, header, observer, events, "text_completion", body.include_usage)
    collected = await _collect_all(streams, observer)
    choices = [(text, last, f.completion(entries) if f else None) for (text, last, entries), f in zip(collected, formatters)]
    body_json = shape.completion_body(header, choices, observer.prompt_tokens, observer.completion_tokens)
    return JSONResponse(body_json, headers=id_headers(request, header.id))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    """OpenAI chat completions; faults are answered before the response starts, as for completions."""
    body = await _read_body(request, ChatCompletionRequest)
    client, settings = request.app.state.engine_client, request.app.state.settings
    _check_model(request, body.model)
    settings.limits.check_chars("messages", "".join(m.content or "" for m in body.messages))
    tools = body.tools if body.tools_enabled else None
    try:
        call = forced_call(body.forced_tool, [t.function.name for t in body.tools or []])
    except ValueError as exc:
        raise InputError(400, "tool_choice", str(exc)) from None
    prompt_ids, extra_stop = await off_loop(chat_prompt_ids, client.tokenizer, body.messages, tools, settings.limits,
                                            chars=sum(len(m.content or "") for m in body.messages))
    forced, forced_ids = "", []
    if call is not None:  # the assistant's turn starts with the forced call's opening (tool_calls.forced_call)
        forced_ids, forced = forced_prefix_ids(client.tokenizer, *call)
        prompt_ids = prompt_ids + forced_ids
    grammar = None
    if body.tools_enabled or body.response_format is not None or body.structured_outputs is not None:
        grammar = await off_loop(chat_grammar, body, len(forced_ids))  # compiling can take a while
    header = shape.ResponseHeader("chatcmpl", client.model_name, request_id(request, "chatcmpl"))
    # The template's turn-end stops (plain template: "\n### ") would cut text the grammar allows; with a
    # grammar that says what the whole output is, the grammar ends the turn (the client's own `stop`
    # strings still apply, as in vLLM); free text with tool calls (auto) keeps them
    stops = body.stop + (extra_stop if grammar is None or grammar.open_ended else [])
    req = generation_request(header.id, body, prompt_ids, stops, settings.default_max_tokens,
                             settings, "messages", affinity_key=conversation_key(body.messages), grammar=grammar)
    allowed = {t.function.name for t in body.tools} if body.tools_enabled else None
    max_calls = 1 if body.parallel_tool_calls is False else None  # OpenAI: at most one call
    observer = RequestObserver.for_request(request, "chat", header.id, len(prompt_ids))
    streams = await start_all(lambda r: _start(client, r, observer), choice_requests(req, body.n))
    formatter = _logprob_formatter(client, body)
    if body.stream:
        events = merged([indexed(chat_events(header, d, allowed, prefix=forced, max_calls=max_calls, logprobs=formatter), i)
                         for i, d in enumerate(streams)])
        return _sse(request, header, observer, events, "chat.completion.chunk", body.include_usage)
    collected = await _collect_all(streams, observer)
    choices = [(forced + text, last, formatter.chat(entries) if formatter else None) for text, last, entries in collected]
    completion = shape.chat_body(header, choices, len(prompt_ids), observer.completion_tokens, allowed, max_calls)
    return JSONResponse(completion, headers=id_headers(request, header.id))


def chat_grammar(body: ChatCompletionRequest, prefill_tokens: int) -> GrammarSpec | None:
    """The grammar of a chat turn (integrations/structured_output.py): a forced tool call's (tool_choice
    "required" or named; response_format does not apply to a call), else response_format's, else with
    tools offered and tool_choice "auto" or unset, text whose tool calls are valid. Mode "refusion"
    leaves tool calls unconstrained (parsed from the text) and refuses response_format. InputError
    (400) naming the field."""
    forced = body.forced_tool
    grammar = body.output_grammar()  # checked even when a forced call makes it moot: a bad one is a 400
    if body.tools_enabled and forced is not None:
        if body.mode == "refusion":
            return None
        return tool_grammar(body.tools, forced, prefill_tokens, parallel=body.parallel_tool_calls is not False)
    if grammar is not None and body.tools_enabled:
        raise InputError(400, "response_format" if body.structured_outputs is None else "structured_outputs",
                         'a format with tools and tool_choice "auto" is not supported: set tool_choice to "none" '
                         'or "required", or drop the format')
    if grammar is None and body.tools_enabled and body.mode != "refusion":
        grammar = tool_grammar(body.tools, None, 0)
    return grammar


# ---------------------------------------------------------------------------------------------------


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "refusion-serve"}


def _check_model(request: Request, model: str | None) -> None:
    served = request.app.state.settings.model_name
    if model is not None and model != served:
        raise APIError(404, f"model '{model}' is not served here: use '{served}' (GET /v1/models)",
                       "not_found_error", param="model", code="model_not_found")


async def _read_body(request: Request, model: type[BaseModel]):
    """The request body as `model`: JSON faults are request_limits.InputError, field faults
    RequestValidationError (both 400 naming the field)."""
    data = await read_json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


async def _start(client, req: GenerationRequest, observer: RequestObserver) -> AsyncIterator[Delta]:
    """Submit and wait for the first delta (_primed). Returns an iterator over all deltas (the engine
    stops at max_tokens, held-back text included); closing it cancels the engine request."""
    return await _primed(_observed(client.stream(req), observer), observer)


async def _primed(deltas: AsyncIterator[Delta], observer: RequestObserver) -> AsyncIterator[Delta]:
    """Wait for the first delta, so that every fault found until then (engine field checks, admission,
    an error delta) is an HTTP error before the response starts, not a 200 stream that fails. Returns
    an iterator over all deltas, the first included; closing it closes `deltas`."""
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        await deltas.aclose()
        error = exc if isinstance(exc, APIError) else from_engine_error(exc) if isinstance(exc, Exception) else None
        observer.finish(error.status if error else 499, error=str(exc))
        if error is None:
            raise
        raise error from exc

    async def replay() -> AsyncIterator[Delta]:
        async with contextlib.aclosing(deltas):
            if first is not None:
                yield first
            async for delta in deltas:
                yield delta

    return replay()


async def _observed(deltas: AsyncIterator[Delta], observer: RequestObserver) -> AsyncIterator[Delta]:
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            yield _checked(delta, observer)


def _checked(delta: Delta, observer: RequestObserver) -> Delta:
    observer.on_delta(delta)
    if delta.finish_reason is FinishReason.CANCELLED:  # never the caller's doing: they would be gone
        why = delta.error or "cancelled by the server"
        if delta.error == ENGINE_STOPPED:  # a draining replica: the code new requests get then too
            raise from_engine_error(ShuttingDownError(f"request ended early: {why}; retry", 1.0))
        raise overloaded(f"request ended early: {why}; retry", 1.0)
    if delta.error and delta.error_field:  # the request's own input failed mid-request (e.g. its grammar)
        raise APIError(400, f"{delta.error_field}: {delta.error}", param=delta.error_field)
    if delta.error:
        raise APIError(500, f"engine error: {delta.error}", "server_error")
    return delta


def _sse(request: Request, header, observer: RequestObserver, events, obj: str, include_usage: bool):
    """The SSE response of a stream's chunk events; with include_usage, "usage": null on every chunk and
    one final usage chunk for the whole request."""
    if include_usage:
        events = null_usage_until_final(usage_at_end(events, header, obj, observer))
    return sse_response(events, observer, header.id, id_headers(request, header.id))


async def _collect_all(streams: list[AsyncIterator[Delta]], observer: RequestObserver) -> list[tuple[str, Delta, list]]:
    """_collect of every choice at once; the observer is finished once all have ended (or the first failed)."""
    tasks = [asyncio.ensure_future(_collect(s, observer, finish=False)) for s in streams]
    try:
        collected = await asyncio.gather(*tasks)
    except BaseException:  # one failed (or the client left): end the others, each of which cancels its request
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        raise
    observer.finish(200)
    return collected


def _logprob_formatter(client, body) -> LogprobFormatter | None:
    return LogprobFormatter(client.tokenizer, body.num_logprobs) if body.num_logprobs is not None else None


async def _collect(deltas: AsyncIterator[Delta], observer: RequestObserver, finish: bool = True) -> tuple[str, Delta, list]:
    """The whole text, the last delta and every token's log probability entry (empty when not asked for).
    finish: record the request's success on the observer at the end (errors are always recorded)."""
    parts, last, entries = [], None, []
    try:
        async for delta in deltas:
            parts.append(delta.text)
            entries += delta.logprobs or []
            last = delta
    except APIError as exc:
        observer.finish(exc.status, error=exc.message)
        raise
    except (asyncio.CancelledError, GeneratorExit):
        observer.finish(499, error="client disconnected")
        raise
    if last is None or not last.finished:
        observer.finish(500, error="stream ended without a finished delta")
        raise APIError(500, "engine stream ended without a final delta", "server_error")
    if finish:
        observer.finish(200)
    return "".join(parts), last, entries
