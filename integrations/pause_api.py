"""POST /pause, POST /resume, GET /is_paused: hold every engine replica's forwards and release them, as
vLLM's routes of the same names (its dev mode, VLLM_SERVER_DEV_MODE; here ServeConfig.pause_endpoints,
off by default, behind the API key when one is set) and Ray Serve LLM's LLMServer.pause / resume.

A paused replica (scheduler.engine.Engine.pause) runs no forward: running requests keep their slots,
KV and output so far, new requests are admitted and wait, cancels and deadlines still act, and /health
and Ray's health check pass. On resume each request continues as if never paused. Only vLLM's
mode "keep" is offered ("abort" and "wait" are a 400 naming `mode`: cancel the requests, or wait for
them, and then pause). Behind Ray Serve every engine replica up at the call is paused or resumed (each
call routed to its replica); one started later (autoscaling, a replacement) runs unpaused.

    POST /pause?mode=keep -> {"status": "paused", "replicas": {replica id: true, ...}}
    POST /resume          -> {"status": "resumed", "replicas": {replica id: false, ...}}
    GET /is_paused        -> {"is_paused": every replica paused, "replicas": {...}}

A replica that does not answer within the client's timeout, or none up, is a 503 with Retry-After (the
call is safe to repeat).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from integrations.request_limits import InputError

router = APIRouter()
MODES = ("keep",)  # vLLM's pause modes offered here (vLLM: "abort", "wait", "keep")


@router.post("/pause")
async def pause(request: Request, mode: str = "keep"):
    """Pause every engine replica's forwards; answers once each has absorbed the step it was running.
    Raises InputError (400, `mode`) for a mode other than "keep"."""
    if mode not in MODES:
        raise InputError(400, "mode", f"{mode!r} is not offered; only 'keep' is (requests keep their slots and "
                         "continue on POST /resume): cancel the requests first for 'abort', wait for them for 'wait'")
    replicas = await request.app.state.engine_client.pause()
    return {"status": "paused", "replicas": replicas}


@router.post("/resume")
async def resume(request: Request):
    """End the pause of every engine replica (POST /pause)."""
    replicas = await request.app.state.engine_client.resume()
    return {"status": "resumed", "replicas": replicas}


@router.get("/is_paused")
async def is_paused(request: Request):
    """{"is_paused": whether every engine replica is paused, "replicas": {replica id: paused}}."""
    replicas = await request.app.state.engine_client.is_paused()
    return {"is_paused": bool(replicas) and all(replicas.values()), "replicas": replicas}
