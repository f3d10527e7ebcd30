"""POST /pause, POST /resume, GET /is_paused: hold every engine replica's forwards and release them, as
vLLM's routes of the same names (its dev mode, VLLM_SERVER_DEV_MODE; here ServeConfig.pause_endpoints,
off by default, behind the API key when one is set) and Ray Serve LLM's LLMServer.pause / resume.

A paused replica (scheduler.engine.Engine.pause) runs no forward: running requests keep their slots,
KV and output so far, new requests are admitted and wait, cancels and deadlines still act, and /health
and Ray's health check pass. On resume each request continues as if never paused. Only vLLM's
mode "keep" is offered, and it must be named: vLLM's default is "abort", so a bare POST /pause, "abort"
or "wait" is a 400 naming `mode` (cancel the requests, or wait for them, then pause with mode=keep).
Behind Ray Serve every engine replica up at the call is paused or resumed (each call routed to its
replica); one started later (autoscaling, a replacement) runs unpaused, and queue rebalancing moves the
paused replicas' waiting requests that never started to it (none onto a paused one: EngineDeployment.load).

    POST /pause?mode=keep -> {"status": "paused", "replicas": {replica id: true, ...}} once each holds
    POST /resume          -> {"status": "resumed", "replicas": {replica id: false, ...}}
    GET /is_paused        -> {"is_paused": every replica holds, "replicas": {...}}

A pause that a POST /resume (or a shutdown's drain) overtook on some replica before it held is a 409
naming `mode`, with the replicas' state: the last call wins. A replica that does not answer within the
client's timeout, or none up, is a 503 with Retry-After (the call is safe to repeat).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from integrations.request_limits import InputError

router = APIRouter()
MODES = ("keep",)  # vLLM's pause modes offered here (vLLM: "abort", "wait", "keep")


@router.post("/pause")
async def pause(request: Request, mode: str | None = None):
    """Pause every engine replica's forwards; answers once each has absorbed the step it was running.
    Raises InputError: 400 (`mode` missing, repeated or not "keep"), 409 (a resume came first); each names
    the routes under the app's root_path (http_options.root_path), as route_hints does."""
    root = request.scope.get("root_path", "")
    modes = request.query_params.getlist("mode")
    if len(modes) != 1 or mode not in MODES:
        given = "missing" if not modes else f"given {len(modes)} times" if len(modes) > 1 else f"{mode!r}"
        raise InputError(400, "mode", f"{given}; send mode=keep once (requests keep their slots and continue on "
                         f"POST {root}/resume). vLLM's 'abort' (its default) and 'wait' are not offered: cancel the "
                         "requests, or wait for them, first")
    replicas = await request.app.state.engine_client.pause()
    if not all(replicas.values()):
        raise InputError(409, "mode", f"a POST {root}/resume or a shutdown came before the pause held on "
                         f"{', '.join(r for r, held in replicas.items() if not held)}: not paused there "
                         f"(replicas: {replicas}); the last call wins, send POST {root}/pause?mode=keep again to pause")
    return {"status": "paused", "replicas": replicas}


@router.post("/resume")
async def resume(request: Request):
    """End the pause of every engine replica (POST /pause)."""
    replicas = await request.app.state.engine_client.resume()
    return {"status": "resumed", "replicas": replicas}


@router.get("/is_paused")
async def is_paused(request: Request):
    """{"is_paused": whether every engine replica holds, "replicas": {replica id: holds}} (Engine.paused: a
    pause still waiting for the step in progress is not held yet)."""
    replicas = await request.app.state.engine_client.is_paused()
    return {"is_paused": bool(replicas) and all(replicas.values()), "replicas": replicas}
