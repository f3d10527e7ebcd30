"""FastAPI routes of the editor protocol; the ingress includes `router` (integrations/openai_api.py).

    WebSocket /v1/editor   native msgpack-RPC protocol (docs/editor-protocol.md)
    POST      /infill      llama.cpp-compatible infill (llama.vim, llama.vscode)
    POST      /tokenize    llama.cpp's token helper (llama.vscode counts prompt tokens with it), vLLM's too
    POST      /detokenize  llama.cpp's and vLLM's: ids -> text
    POST      /completion  llama.cpp's plain completion (integrations/llama_completion.py)
    POST      /apply-template  llama.cpp's: chat messages -> the prompt text the chat route runs
    GET       /props       llama.cpp's server properties (context, decode defaults, template)
    GET       /tokenizer_info  vLLM's tokenizer settings (lm-evaluation-harness's remote tokenizer)

Both reach the engine through `app.state.engine_client` (integrations/engine_client.py). Bodies are read
by integrations/request_limits.py (size, JSON, nesting, Unicode); errors have llama.cpp's shape
{"error": {"code", "message", "type"}} with the message naming the field ("Field 'n_cmpl': ...").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from integrations.editor.llama_compat import InfillBody, compact_json, infill, infill_events, select_fields
from integrations.editor.session import EditorSession
from integrations.http_errors import (APIError, api_field, engine_message, from_engine_error, validation_field,
                                      validation_message)
from integrations.http_metrics import RequestObserver
from integrations.llama_completion import (LlamaCompletionBody, llama_events, llama_field, llama_probabilities,
                                           llama_result)
from integrations.openai_calls import check_model, collect, logprob_formatter, start
from integrations.openai_requests import completion_requests
from integrations.chat_run import chat_prompt
from integrations.openai_models import ChatCompletionRequest, ChatMessage, ToolSpec
from integrations.openai_requests import id_headers, request_id
from integrations.request_limits import InputError, RequestLimits, encode, off_loop, read_json_object
from integrations.token_bytes import token_bytes
from scheduler.api import EngineError, InvalidRequestError

log = logging.getLogger(__name__)
router = APIRouter()
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
    is answered OVERLOADED and supersedes nothing)."""
    await websocket.accept()
    state = websocket.app.state
    gate = getattr(state, "gate", None)
    refusing = (lambda: gate.retry_after_s if gate.draining else None) if gate is not None else None
    session = EditorSession(state.engine_client, websocket.send_bytes, metrics=getattr(state, "metrics", None),
                            refusing=refusing)
    tasks = {asyncio.ensure_future(_read_frames(websocket, session))}
    if gate is not None:
        tasks.add(asyncio.ensure_future(_close_when_draining(websocket, session, gate)))
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


async def _close_when_draining(websocket: WebSocket, session: EditorSession, gate) -> None:
    """On the ingress's drain: let the completions in flight answer, then close with 1001."""
    await gate.wait_draining()

    async def close() -> None:
        # a client that left meanwhile makes the close fail; there is no one left to tell
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.close(1001, "server is shutting down")

    await session.finish(close)


def _error_body(exc: Exception, endpoint: str | None = None) -> tuple[int, dict, dict]:
    """(status, llama.cpp error body, headers) of an /infill or /tokenize failure. Input faults name
    the field; engine and Ray errors map as in integrations/http_errors.py; anything else is a bug
    (logged, 500)."""
    if isinstance(exc, InputError):
        status, message, kind, headers = exc.status, _field_message(exc.field, exc.message), "invalid_request_error", {}
    elif isinstance(exc, APIError):
        status, message, kind, headers = exc.status, exc.message, exc.type, exc.headers
    elif isinstance(exc, InvalidRequestError):  # in the route's words (llama.cpp's fields)
        message = _field_message(api_field(exc.field, endpoint), engine_message(exc, endpoint))
        status, kind, headers = 400, "invalid_request_error", {}
    else:
        api = from_engine_error(exc, endpoint)
        if api.status >= 500 and api.type == "server_error":
            log.error("/infill failed", exc_info=exc)
        status, message, kind, headers = api.status, api.message, api.type, api.headers
    return status, {"error": {"code": status, "message": message, "type": kind}}, headers


def _field_message(field: str | None, message: str) -> str:
    return f"Field '{field}': {message}" if field else message


async def _read(request: Request, model: type[BaseModel]):
    """The body validated as `model`; raises InputError naming the field."""
    data = await read_json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InputError(400, validation_field(tuple(first["loc"])), validation_message(first)) from None


@router.post("/infill")
async def infill_route(request: Request) -> Response:
    """llama.cpp /infill (see integrations/editor/llama_compat.py for the fields)."""
    client = request.app.state.engine_client
    try:
        rid = _request_id(request)  # the X-Request-Id Ray's proxy returns: the id in the engine's logs too
        body = await _read(request, InfillBody)
        n_ctx = _limits(request).context_length
        # the request log line and metrics (the ingress gate finishes it with the status that went out);
        # none when this router is mounted alone, without the app's metrics (tests)
        observer = (RequestObserver.for_request(request, "infill", rid, 0, usage_from_engine=True)
                    if hasattr(request.app.state, "metrics") else None)
        # Engine ids <X-Request-Id>.<random>-g<gap>: a client that reuses its id at once never meets
        # the candidates of its previous request still being cancelled.
        engine_rid = f"{rid}.{uuid.uuid4().hex[:6]}"
        if not body.stream:
            return Response(compact_json(await infill(client, body, n_ctx, engine_rid, observer)),
                            media_type="application/json", headers=id_headers(request, rid))
        events = infill_events(client, body, n_ctx, engine_rid, observer)
        first = await anext(events)  # admission and input errors are still HTTP errors here
    except (InputError, EngineError) as exc:
        status, payload, headers = _error_body(exc, "infill")
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
        body = await _read(request, LlamaCompletionBody)
        openai = body.openai_body()
        grammar = await off_loop(openai.output_grammar) if openai.response_format or openai.structured_outputs else None
        [prepared] = await completion_requests(client.tokenizer, rid, openai, settings, grammar, settings.default_max_tokens)
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
        field, message = (exc.field, exc.message) if isinstance(exc, InputError) else (
            (exc.param, exc.message.split(": ", 1)[-1]) if isinstance(exc, APIError) and exc.status == 400 and exc.param
            else (None, None))
        if field is not None:  # named as llama.cpp names it (n_predict, n_probs, json_schema, grammar)
            exc = InputError(400 if not isinstance(exc, InputError) else exc.status, llama_field(field),
                             message.replace(field, llama_field(field)))
        status, payload, headers = _error_body(exc, "completion")
        return JSONResponse(payload, status, headers=headers)
    return StreamingResponse(_events_after(first, _sse_lines(events), observer), media_type="text/event-stream",
                             headers=id_headers(request, rid))


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
    (the 200 header has gone out), as llama.cpp's server does. The observer records the outcome: 200,
    the error's status, or 499 for a client that went away (the engine requests are cancelled)."""
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
        status, payload, _ = _error_body(exc)
        if observer is not None:
            observer.finish(status, error=payload["error"]["message"])
        yield b"data: " + compact_json(payload) + b"\n\n"
    finally:
        await events.aclose()


def _limits(request: Request) -> RequestLimits:
    """The app's limits (openai_api.APISettings); defaults when the router runs on its own (tests)."""
    settings = getattr(request.app.state, "settings", None)
    return settings.limits if settings is not None else RequestLimits()


class TokenizeBody(BaseModel):
    """The /tokenize request: llama.cpp's fields, or vLLM's (`prompt`, or chat `messages` and `tools`
    rendered with the chat template as /v1/chat/completions does). Other unknown fields are ignored
    (llama.cpp's rule); vLLM's chat-template options other than the defaults are refused."""

    content: str | None = None
    prompt: str | None = None  # vLLM's name of content
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # vLLM: the chat prompt's tokens
    tools: list[ToolSpec] | None = None  # with messages: the tools the chat template lists
    tool_choice: Any = None  # with messages and tools: as chat's ("none" leaves the tools out, a forced call adds its opening)
    add_generation_prompt: bool | None = None  # the chat route adds it unless continue_final_message is set
    # vLLM's: the last (assistant) message left open, as chat runs it (a strict boolean as on chat; null
    # is unset; validated when unset too)
    continue_final_message: StrictBool | None = Field(default=None, validate_default=True)
    chat_template_kwargs: dict[str, Any] | None = None  # as on chat: extra chat-template variables
    add_special: bool = False  # insert the tokenizer's special tokens (BOS, when it has one)
    add_special_tokens: bool | None = None  # vLLM's name of add_special
    parse_special: bool = True  # false: special-token text such as "<|endoftext|>" is plain text
    with_pieces: bool = False  # each token as {"id", "piece"}
    model: str | None = None  # vLLM's: one of the served ids (404 model_not_found otherwise)

    @field_validator("continue_final_message")
    @classmethod
    def _generation_prompt(cls, value, info):
        """vLLM's rule: the two cannot both be true; the chat route always opens the assistant's turn
        otherwise, so add_generation_prompt false alone is refused."""
        add = info.data.get("add_generation_prompt")
        if value and add:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true (vLLM's rule): "
                             "drop add_generation_prompt")
        if not value and add is False:
            raise ValueError("add_generation_prompt false is only offered with continue_final_message true (the "
                             "chat route always opens the assistant's turn)")
        return value

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("content", "prompt", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of content (llama.cpp), prompt or messages (vLLM), got {given or 'none'}")
        if self.prompt is not None:
            self.content = self.prompt
        if self.add_special_tokens is not None:
            self.add_special = self.add_special_tokens
        return self


def _chat_turn(body) -> ChatCompletionRequest:
    """The chat turn whose prompt /tokenize's chat form and /apply-template give (`body`: their messages,
    tools, tool_choice, continue_final_message). Raises InputError naming the field."""
    fields = {"messages": [m.model_dump(exclude_none=True) for m in body.messages],
              "continue_final_message": bool(body.continue_final_message)}
    if body.tools is not None:
        fields["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
    if body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    if body.chat_template_kwargs is not None:
        fields["chat_template_kwargs"] = body.chat_template_kwargs
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InputError(400, validation_field(tuple(first["loc"])), validation_message(first)) from None


class DetokenizeBody(BaseModel):
    """The /detokenize request (llama.cpp and vLLM): token ids (JSON integers, not strings or booleans)."""

    tokens: list[StrictInt]
    model: str | None = None  # vLLM's: one of the served ids (404 model_not_found otherwise)


@router.post("/tokenize")
async def tokenize_route(request: Request) -> Response:
    """llama.cpp /tokenize: {"content", "add_special", "parse_special", "with_pieces"} -> {"tokens": [ids]},
    or [{"id", "piece"}] with with_pieces (piece: the token's text, or its bytes as a list of ints when
    they are not valid UTF-8 on their own). `content` is limited to max_prompt_chars characters and
    tokenized off the event loop. Errors: 400 naming the field, 404 model_not_found for a `model` (vLLM's
    field) that is not a served id, 413 for a body over max_body_bytes."""
    limits = _limits(request)
    tokenizer = request.app.state.engine_client.tokenizer
    try:
        body = await _read(request, TokenizeBody)
        check_model(request, body.model)
        if body.messages is not None:  # vLLM's chat form: the prompt /v1/chat/completions would run
            ids = (await chat_prompt(tokenizer, limits, _chat_turn(body))).ids
            tokens = [{"id": i, "piece": _piece(tokenizer, i)} for i in ids] if body.with_pieces else ids
        else:
            limits.check_chars("prompt" if body.prompt is not None else "content", body.content)
            tokens = await off_loop(tokenize, tokenizer, body, chars=len(body.content))
    except InputError as exc:
        status, payload, headers = _error_body(exc)
        return JSONResponse(payload, status, headers=headers)
    # llama.cpp's {"tokens"} plus vLLM's count and max_model_len
    payload = {"tokens": tokens, "count": len(tokens), "max_model_len": limits.context_length}
    return Response(compact_json(payload), media_type="application/json")


@router.post("/detokenize")
async def detokenize_route(request: Request) -> Response:
    """llama.cpp / vLLM /detokenize: {"tokens": [ids]} -> {"content": text} (llama.cpp's key) and
    {"prompt": text} (vLLM's), special tokens included, decoded off the event loop. Errors: 400 naming
    `tokens` (not ids of the vocabulary), 404 model_not_found for a `model` that is not a served id (vLLM),
    413 for a body over max_body_bytes (which bounds the work)."""
    tokenizer = request.app.state.engine_client.tokenizer
    try:
        body = await _read(request, DetokenizeBody)
        check_model(request, body.model)
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InputError(400, "tokens", f"ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    except InputError as exc:
        status, payload, headers = _error_body(exc)
        return JSONResponse(payload, status, headers=headers)
    text = await off_loop(tokenizer.decode, body.tokens, chars=len(body.tokens))
    return Response(compact_json({"content": text, "prompt": text}), media_type="application/json")


class ApplyTemplateBody(BaseModel):
    """The /apply-template request (llama.cpp): chat `messages`, and `tools`, `tool_choice`,
    `continue_final_message`, `chat_template_kwargs` as /tokenize's chat form takes them. Other fields
    are ignored (llama.cpp)."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Any = None
    continue_final_message: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


@router.post("/apply-template")
async def apply_template_route(request: Request) -> Response:
    """llama.cpp's /apply-template: {"messages": [...]} -> {"prompt": text}, the prompt
    /v1/chat/completions runs for them (chat template or the plain one, tools, a forced call's
    opening; the same tokens /tokenize counts, decoded). Errors: 400 naming the field, 413."""
    tokenizer = request.app.state.engine_client.tokenizer
    try:
        body = await _read(request, ApplyTemplateBody)
        ids = (await chat_prompt(tokenizer, _limits(request), _chat_turn(body))).ids
    except InputError as exc:
        status, payload, headers = _error_body(exc)
        return JSONResponse(payload, status, headers=headers)
    text = await off_loop(tokenizer.decode, ids, chars=len(ids))
    return Response(compact_json({"prompt": text}), media_type="application/json")


@router.get("/props")
async def props_route(request: Request) -> Response:
    """llama.cpp's GET /props, what its clients read to configure themselves: the context
    (`default_generation_settings.n_ctx`) and decode defaults (`params`), the model's name
    (`model_alias`, `model_path`), `chat_template` (the tokenizer's; "" with the plain template,
    integrations/chat.py), `chat_template_caps`, `modalities` (text only), `bos_token`, `eos_token`,
    `build_info`. Setting props (llama.cpp's POST /props) is not offered."""
    tokenizer = request.app.state.engine_client.tokenizer
    settings = getattr(request.app.state, "settings", None)
    defaults = dict(settings.decode_defaults) if settings is not None else {}
    name = settings.model_name if settings is not None else request.app.state.engine_client.model_name
    params = {"n_predict": settings.default_max_tokens if settings is not None else None, **defaults}
    payload = {
        "default_generation_settings": {"n_ctx": _limits(request).context_length, "params": params},
        "total_slots": None,  # the engine's running requests are not slots; /v1/engine has its limits
        "model_alias": name, "model_path": name,
        "modalities": {"vision": False, "audio": False},
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
        "chat_template_caps": {"supports_tools": True, "supports_tool_calls": True,
                               "supports_parallel_tool_calls": True, "supports_system_role": True},
        "bos_token": getattr(tokenizer, "bos_token", None) or "", "eos_token": getattr(tokenizer, "eos_token", None) or "",
        "build_info": "refusion-serve",
    }
    return Response(compact_json(payload), media_type="application/json")


@router.get("/tokenizer_info")
async def tokenizer_info_route(request: Request) -> Response:
    """vLLM's GET /tokenizer_info (its tokenizer_config.json equivalent), which lm-evaluation-harness
    reads, with /tokenize and /detokenize, to tokenize on the server ("remote tokenizer"):
    `tokenizer_class`, `eos_token`, `bos_token`, `pad_token`, `unk_token`, `mask_token` (null when the
    tokenizer has none), `model_max_length` (the served context, tokens) and `chat_template` (the
    tokenizer's Jinja template; null with the plain template, integrations/chat.py)."""
    tokenizer = request.app.state.engine_client.tokenizer
    payload = {"tokenizer_class": type(tokenizer).__name__,
               **{k: getattr(tokenizer, k, None)
                  for k in ("eos_token", "bos_token", "pad_token", "unk_token", "mask_token")},
               "model_max_length": _limits(request).context_length,
               "chat_template": getattr(tokenizer, "chat_template", None) or None}
    return Response(compact_json(payload), media_type="application/json")


def tokenize(tokenizer, body: TokenizeBody) -> list:
    """The ids (or pieces) of /tokenize; CPU-bound, run off the event loop."""
    if body.parse_special:
        ids = encode(tokenizer, body.content, body.add_special)
    else:
        ids = list(tokenizer.encode(body.content, add_special_tokens=body.add_special, split_special_tokens=True))
    if not body.with_pieces:
        return ids
    return [{"id": i, "piece": _piece(tokenizer, i)} for i in ids]


def _piece(tokenizer, token_id: int) -> str | list[int]:
    """A token's text; its bytes (ints) when they are not valid UTF-8 alone (byte-level BPE splits
    multi-byte characters), as llama.cpp's with_pieces."""
    raw = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
    data = token_bytes(tokenizer, token_id) if "\ufffd" in raw else None
    if data is None:
        return raw
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)
