"""FastAPI routes of the editor protocol; the ingress includes `router` (integrations/openai_api.py).

    WebSocket /v1/editor   native msgpack-RPC protocol (docs/editor-protocol.md)
    POST      /infill      llama.cpp-compatible infill (llama.vim, llama.vscode)
    POST      /completion  llama.cpp's plain completion (integrations/llama_completion.py)

`router` also carries the tokenizer and server-info routes (/tokenize, /detokenize, /apply-template,
/props, /tokenizer_info: integrations/editor/token_routes.py). The routes reach the engine through
`app.state.engine_client` (integrations/engine_client.py). Bodies are read by
integrations/request_limits.py (size, JSON, nesting, Unicode); errors have llama.cpp's shape
{"error": {"code", "message", "type"}} with the message naming the field ("Field 'n_cmpl': ...";
integrations/editor/route_errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import SimpleNamespace

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.websockets import WebSocketDisconnected

from integrations.editor.llama_compat import InfillBody, compact_json, infill, infill_events, select_fields
from integrations.editor.session import EditorSession
from integrations.editor.route_errors import app_limits, error_body, read_body
from integrations.editor.token_routes import router as token_router
from integrations.http_errors import APIError
from integrations.http_metrics import RequestObserver
from integrations.llama_completion import (LlamaCompletionBody, llama_events, llama_field, llama_probabilities,
                                           llama_result)
from integrations.openai_calls import collect, logprob_formatter, start
from integrations.openai_requests import candidates_id, completion_requests, id_headers, request_id
from integrations.request_id_guard import CLOSE_REASON
from integrations.request_limits import InputError, RequestLimits, grammar_off_loop
from scheduler.api import EngineError

log = logging.getLogger(__name__)
router = APIRouter()
# What sending on a socket whose client has left raises (uvicorn's disconnect as starlette reports it;
# a send after the close frame; the transport's own)
CLIENT_GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)
router.include_router(token_router)  # /tokenize, /detokenize, /apply-template, /props, /tokenizer_info
# /completion's settings when the router runs without the OpenAI app (tests): its defaults
_STANDALONE = SimpleNamespace(limits=RequestLimits(), default_max_tokens=256, completion_default_max_tokens=16,
                              decode_defaults={})


@router.websocket("/v1/editor")
async def editor_socket(websocket: WebSocket) -> None:
    """One EditorSession per connection; every frame gets an answer, bad ones included. Browser origins
    are checked before this runs (integrations.auth.OriginGuard). When the ingress drains (`refusion
    serve` stopping; integrations/ingress_gate.py) the socket closes with 1001 ("going away", RFC 6455
    7.4.1) once its completions in flight have answered, so an editor sees the server leave instead of
    a dropped connection; frames keep being read until then (a cancel still cancels; a new `complete`
    is answered OVERLOADED and supersedes nothing).

    The handshake's X-Request-Id (Ray Serve's proxy sets one: the client's, else a UUID) comes back on
    the 101 response, as every HTTP response carries it, and in each request-log line of the session; a
    malformed one closes the socket with 1008 naming the header (a close before the accept would reach
    the client as a 403, the answer to a bad key)."""
    try:
        rid = request_id(websocket, "ws")
    except APIError:
        await websocket.accept()
        await websocket.close(1008, CLOSE_REASON)
        return
    await websocket.accept(headers=[(b"x-request-id", rid.encode())])
    state = websocket.app.state
    gate = getattr(state, "gate", None)
    refusing = (lambda: gate.retry_after_s if gate.draining else None) if gate is not None else None
    settings = getattr(state, "settings", None)
    session = EditorSession(state.engine_client, websocket.send_bytes, metrics=getattr(state, "metrics", None),
                            refusing=refusing, gone=CLIENT_GONE, connection=rid,
                            context_length=settings.limits.context_length if settings is not None else 0)
    tasks = {asyncio.ensure_future(_read_frames(websocket, session))}
    if gate is not None:
        tasks.add(asyncio.ensure_future(_close_when_draining(websocket, session, gate)))
    idle_s = settings.limits.editor_idle_timeout_s if settings is not None else 0
    if idle_s:
        tasks.add(asyncio.ensure_future(_close_when_idle(websocket, session, idle_s)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a failure other than the client leaving is raised, as before
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


@router.get("/v1/editor", include_in_schema=False)
async def editor_without_upgrade() -> JSONResponse:
    """A plain GET of the WebSocket route (curl, a browser, a client without the upgrade headers): 426
    Upgrade Required naming the protocol (RFC 9110, 15.5.22: the response carries Upgrade), not the 404
    a route that only takes WebSockets answers."""
    message = ("/v1/editor is a WebSocket (msgpack-RPC, docs/editor-protocol.md): connect with a WebSocket client, "
               "e.g. websockets.connect('ws://HOST:PORT/v1/editor')")
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": "upgrade_required"}}, 426, headers={"Upgrade": "websocket"})


async def _read_frames(websocket: WebSocket, session: EditorSession) -> None:
    """Answer every frame until the client disconnects."""
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            await session.handle_frame(data if data is not None else message.get("text"))


async def _close_when_idle(websocket: WebSocket, session: EditorSession, idle_s: float) -> None:
    """Close the socket with 1001 once the client has sent no frame for `idle_s` seconds and no completion
    of it is in flight (RequestLimits.editor_idle_timeout_s): an open socket holds one of the ingress
    replica's call slots, and an editor that went away without closing held it for good."""
    while True:
        quiet = time.monotonic() - session.last_frame_s
        if quiet >= idle_s and not session.inflight:
            with contextlib.suppress(*CLIENT_GONE, RuntimeError):  # (the client may have left meanwhile)
                await websocket.close(1001, f"idle for {idle_s:g} s: reconnect to complete again")
            return
        await asyncio.sleep(max(idle_s - quiet, min(idle_s, 1.0)))


async def _close_when_draining(websocket: WebSocket, session: EditorSession, gate) -> None:
    """On the ingress's drain: let the completions in flight answer, then close with 1001."""
    await gate.wait_draining()

    async def close() -> None:
        # a client that left meanwhile makes the close fail; there is no one left to tell
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.close(1001, "server is shutting down")

    await session.finish(close)


@router.post("/infill")
async def infill_route(request: Request) -> Response:
    """llama.cpp /infill (see integrations/editor/llama_compat.py for the fields)."""
    client = request.app.state.engine_client
    try:
        rid = _request_id(request)  # the X-Request-Id Ray's proxy returns: the id in the engine's logs too
        body = await read_body(request, InfillBody)
        n_ctx = app_limits(request).context_length
        # the request log line and metrics (the ingress gate finishes it with the status that went out);
        # none when this router is mounted alone, without the app's metrics (tests)
        observer = (RequestObserver.for_request(request, "infill", rid, 0, usage_from_engine=True)
                    if hasattr(request.app.state, "metrics") else None)
        engine_rid = candidates_id(client, rid)  # <X-Request-Id>.<random>-g<gap>
        if not body.stream:
            return Response(compact_json(await infill(client, body, n_ctx, engine_rid, observer)),
                            media_type="application/json", headers=id_headers(request, rid))
        events = infill_events(client, body, n_ctx, engine_rid, observer)
        first = await anext(events)  # admission and input errors are still HTTP errors here
    except (InputError, EngineError) as exc:
        status, payload, headers = error_body(exc, "infill")
        return JSONResponse(payload, status, headers=headers)
    return StreamingResponse(_events_after(first, events, observer), media_type="text/event-stream",
                             headers=id_headers(request, rid))


@router.post("/completion")
async def completion_route(request: Request) -> Response:
    """llama.cpp /completion (integrations/llama_completion.py): run as /v1/completions runs, answered in
    llama.cpp's shape; errors in llama.cpp's shape naming llama.cpp's fields."""
    client = request.app.state.engine_client
    settings = getattr(request.app.state, "settings", None) or _STANDALONE
    started = time.perf_counter()
    try:
        rid = _request_id(request, "cmpl")
        body = await read_body(request, LlamaCompletionBody)
        openai = body.openai_body(client.tokenizer)
        grammar = await grammar_off_loop(openai.output_grammar) if openai.response_format or openai.structured_outputs else None
        [prepared] = await completion_requests(client, rid, openai, settings, grammar, settings.default_max_tokens)
        prompt_ids = prepared.request.prompt_ids
        observer = RequestObserver.for_request(request, "completion", rid, len(prompt_ids))
        ids: list[int] = []  # the generated ids (return_tokens: llama.cpp's raw ids, not a re-encoding)
        deltas = prepared.client_deltas(_recording(await start(client, prepared.request, observer), ids))
        formatter = logprob_formatter(client, openai)
        n_ctx = settings.limits.context_length
        if body.stream:
            events = llama_events(client, body, prompt_ids, deltas, formatter, started, n_ctx)
            first = b"data: " + compact_json(await anext(events)) + b"\n\n"
        else:
            text, last, entries = await collect(deltas, observer)
            probabilities = llama_probabilities(formatter, entries) if formatter is not None else None
            first_s = started + ((last.stats or {}).get("time_to_first_token_s") or 0.0)
            if body.n_predict == 0:  # llama.cpp: the prompt evaluated into the cache, no token generated
                text, ids, probabilities = "", [], [] if probabilities is not None else None
            result = llama_result(client, body, prompt_ids, text, last, len(ids), probabilities, started, first_s,
                                  n_ctx, ids)
            return Response(compact_json(select_fields(result, body.response_fields)),
                            media_type="application/json", headers=id_headers(request, rid))
    except (InputError, APIError, EngineError) as exc:
        status, payload, headers = error_body(_in_llama_fields(exc), "completion")
        return JSONResponse(payload, status, headers=headers)
    return StreamingResponse(_events_after(first, _sse_lines(events), observer), media_type="text/event-stream",
                             headers=id_headers(request, rid))


def _in_llama_fields(exc: Exception) -> Exception:
    """An input fault of a /completion request (a 400 naming its field) named as llama.cpp names the field
    (n_predict, n_probs, json_schema, grammar), for error_body; anything else as it is."""
    field, message = (exc.field, exc.message) if isinstance(exc, InputError) else (
        (exc.param, exc.message.split(": ", 1)[-1]) if isinstance(exc, APIError) and exc.status == 400 and exc.param
        else (None, None))
    if field is None:
        return exc
    return InputError(exc.status if isinstance(exc, InputError) else 400, llama_field(field),
                      message.replace(field, llama_field(field)))


async def _recording(deltas, ids: list[int]):
    """The deltas, their token ids appended to `ids` as they pass. Closing this closes `deltas`."""
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            ids.extend(delta.token_ids)
            yield delta


async def _sse_lines(events):
    async for event in events:
        yield b"data: " + compact_json(event) + b"\n\n"


def _request_id(request: Request, prefix: str = "infill") -> str:
    """openai_requests.request_id with llama.cpp's error shape (InputError naming the header)."""
    try:
        return request_id(request, prefix)
    except APIError as exc:
        raise InputError(400, "X-Request-Id", exc.message.split(": ", 1)[-1]) from None


async def _events_after(first: bytes, events, observer: RequestObserver | None):
    """The stream from its first event on; a later failure becomes a final `data: {"error": ...}` event
    (the 200 header has gone out), as llama.cpp's server does. The observer records the outcome: 200
    (with the error, for a stream that failed), or 499 for a client that went away (the engine requests
    are cancelled)."""
    try:
        yield first
        async for event in events:
            yield event
        if observer is not None:
            observer.finish(200)
    except (asyncio.CancelledError, GeneratorExit):
        if observer is not None:
            observer.finish(499, error="client disconnected")
        raise
    except Exception as exc:  # noqa: BLE001 - the client must see why its stream ended
        _, payload, _ = error_body(_in_llama_fields(exc))  # (a grammar failing mid-request: its field)
        if observer is not None:
            observer.finish(200, error=payload["error"]["message"])  # the status that went out
        yield b"data: " + compact_json(payload) + b"\n\n"
    finally:
        await events.aclose()
