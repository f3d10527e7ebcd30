"""FastAPI routes of the editor protocol; the ingress includes `router` (integrations/openai_api.py).

    WebSocket /v1/editor   native msgpack-RPC protocol (docs/editor-protocol.md)
    POST      /infill      llama.cpp-compatible infill (llama.vim, llama.vscode)
    POST      /tokenize    llama.cpp-compatible token count helper (llama.vscode counts prompt tokens with it)

Both reach the engine through `app.state.engine_client` (integrations/engine_client.py).
"""

from __future__ import annotations

import json
import math

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from integrations.editor.llama_compat import InfillBody, compact_json, infill, infill_events
from integrations.editor.session import EditorSession
from scheduler.api import EngineError, InvalidRequestError, OverloadedError

router = APIRouter()


@router.websocket("/v1/editor")
async def editor_socket(websocket: WebSocket) -> None:
    """One EditorSession per connection; every frame gets an answer, bad ones included."""
    await websocket.accept()
    session = EditorSession(websocket.app.state.engine_client, websocket.send_bytes)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            await session.handle_frame(data if data is not None else message.get("text"))
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """llama.cpp's error body: {"error": {"code", "message", "type"}}."""
    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status, headers=headers)


def _engine_error(exc: Exception) -> JSONResponse:
    if isinstance(exc, InvalidRequestError):
        return _error(400, str(exc))
    if isinstance(exc, OverloadedError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return _error(503, f"engine overloaded: {exc}; retry later", "unavailable_error", {"Retry-After": retry})
    return _error(500, f"{type(exc).__name__}: {exc}", "server_error")


@router.post("/infill")
async def infill_route(request: Request) -> Response:
    """llama.cpp /infill (see integrations/editor/llama_compat.py for the fields)."""
    try:
        body = InfillBody.model_validate(json.loads(await request.body() or b"{}"))
    except json.JSONDecodeError as exc:
        return _error(400, f"request body is not valid JSON: {exc.msg} at char {exc.pos}")
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        return _error(400, f"Field '{field}': {first['msg']}")
    client = request.app.state.engine_client
    if body.stream:
        return StreamingResponse(infill_events(client, body), media_type="text/event-stream")
    try:
        result = await infill(client, body)
    except (EngineError, ValueError) as exc:
        return _engine_error(exc)
    return Response(compact_json(result), media_type="application/json")


@router.post("/tokenize")
async def tokenize_route(request: Request) -> Response:
    """llama.cpp /tokenize: {"content": str, "add_special": bool} -> {"tokens": [ids]}."""
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError as exc:
        return _error(400, f"request body is not valid JSON: {exc.msg} at char {exc.pos}")
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, str):
        return _error(400, "Field 'content': required, a string to tokenize")
    tokenizer = request.app.state.engine_client.tokenizer
    tokens = tokenizer.encode(content, add_special_tokens=bool(body.get("add_special", False)))
    return Response(compact_json({"tokens": list(tokens)}), media_type="application/json")
