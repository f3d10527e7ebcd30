"""The protocol's `complete` request in the engine's terms: its params as the CompletionJob the runner
runs (the gaps that fit the model's context, the infill prompt, sampling), and a failed completion's
error answer, with the engine's fields named as this protocol names them. Used by the session
(integrations/editor/session.py)."""

from __future__ import annotations

import logging
from functools import partial

from integrations.editor import protocol as rpc
from integrations.editor.gaps import (capped_gaps, fitting_gaps, gap_within, infill_room, no_room_message, plan_gaps,
                                     strategy_gaps)
from integrations.editor.infill import build_infill_prompt
from integrations.editor.postprocess import Rules
from integrations.editor.runner import CompletionJob
from integrations.engine_client import EngineUnavailableError
from integrations.request_limits import off_loop, sampling_temperature
from scheduler.api import EngineError, InvalidRequestError, Mode, OverloadedError, Priority

log = logging.getLogger(__name__)

_MODES = {"auto": Mode.AUTO, "refusion": Mode.REFUSION, "ar": Mode.AR}


async def completion_job(client, context_length: int, session_id: str, request_id: str,
                         params: rpc.CompleteParams) -> CompletionJob:
    """The completion job of a `complete` request on a session (`session_id`) over `client`, with
    `context_length` the model's context (0 unknown); its prompt is tokenized off the event loop (other
    frames and connections keep being served meanwhile). InvalidRequestError when no gap fits."""
    chars = len(params.prefix) + len(params.suffix) + sum(len(c.text) for c in params.context)
    if params.max_tokens is not None and not fitting_gaps(context_length, (params.max_tokens,)):
        raise InvalidRequestError("max_tokens", no_room_message(context_length, "max_tokens"))
    if params.gaps:  # the client's own gaps, as sent (capped by max_tokens) where they fit
        gaps = fitting_gaps(context_length, capped_gaps(params.gaps, params.max_tokens))
    else:
        gaps = strategy_gaps(context_length, plan_gaps(params.max_tokens, params.multiline))
    if not gaps:
        field = "gaps" if params.gaps else "max_tokens"
        raise InvalidRequestError(field, no_room_message(context_length, field))
    prompt = await off_loop(partial(build_infill_prompt, room=infill_room(context_length, gaps)),
                            client.tokenizer, params.prefix, params.suffix, params.context, params.language,
                            chars=chars)
    sampling = {}
    if params.temperature is not None:
        sampling["temperature"] = sampling_temperature(params.temperature)
    if params.seed is not None:
        sampling["seed"] = params.seed
    return CompletionJob(
        request_id=request_id,
        prompt=prompt,
        gaps=gaps,
        rules=Rules(suffix=params.suffix, multiline=params.multiline, indent=params.indent, cut_invalid=True),
        mode=_MODES[params.mode],
        priority=Priority.INTERACTIVE,
        stop=params.stop,
        max_time_ms=params.max_time_ms,
        max_tokens=params.max_tokens,
        fit_to_kv=params.max_tokens is None and not params.gaps,
        drop_unfit_gaps=bool(params.gaps),  # (the KV cache's room, as fitting_gaps the context's)
        sampling=sampling,
        affinity_key=f"editor:{params.uri}",
        client=f"editor:{session_id}",  # each connection its own share of the engine (fair share)
    )


# The engine's fields in this protocol's terms (a KV refusal names the prompt or the gap length)
_ENGINE_FIELDS = {"prompt_ids": "prefix", "gen_length": "max_tokens"}


def completion_error(exc: Exception, params: rpc.CompleteParams | None = None) -> rpc.RpcError:
    """The error answer of a failed completion (`params`: the request's, None unknown): typed engine errors
    by their code; anything else is a bug, logged here and answered with INTERNAL_ERROR naming no
    internals. An engine field is named as this protocol names it: the prompt the prefix (with the suffix
    and context chunks it holds: send less of them); a gap the KV cache cannot hold `gaps` when the
    client chose the gaps and set no max_tokens, else max_tokens, with the longest length that fits in
    whole slots (the engine's largest gen_length is not one: a gap of it rounds up to whole slots and was
    refused again)."""
    if isinstance(exc, InvalidRequestError):
        field = _ENGINE_FIELDS.get(exc.field, exc.field)
        if field == "max_tokens" and params is not None and params.gaps and params.max_tokens is None:
            field = "gaps"
        message = str(exc).split(": ", 1)[-1].replace("gen_length", "gap" if field == "gaps" else "max_tokens")
        if exc.field == "prompt_ids":
            message = message.replace("shorten the prompt", "send a shorter prefix, suffix or context")
        elif exc.field == "gen_length" and exc.most is not None:
            message = f"{message.split('; ', 1)[0]}; send {field} of at most {gap_within(exc.most)} tokens"
        return rpc.invalid_params(field, message)
    if isinstance(exc, EngineUnavailableError):
        return rpc.RpcError(rpc.ENGINE_UNAVAILABLE, "the engine stopped while serving this completion; retry",
                            {"retry_after_s": exc.retry_after_s})
    if isinstance(exc, OverloadedError):
        # its message already says what is full and to retry (scheduler, engine client, draining ingress)
        return rpc.RpcError(rpc.OVERLOADED, str(exc), {"retry_after_s": exc.retry_after_s})
    if isinstance(exc, EngineError):
        return rpc.RpcError(rpc.INTERNAL_ERROR, f"engine error: {exc}")
    log.error("completion failed", exc_info=exc)
    return rpc.RpcError(rpc.INTERNAL_ERROR, f"internal error ({type(exc).__name__}); the server log has the details")
