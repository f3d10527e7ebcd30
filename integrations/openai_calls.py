"""How the OpenAI routes call the engine: read and check the body, start engine requests (every fault
answered before the response starts), check each delta, collect or stream the result.

    deltas = await start(client, req, observer)       # submitted; the first delta is in
    text, last, entries = await collect(deltas, observer)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from integrations.engine_client import ShuttingDownError
from integrations.http_errors import APIError, from_engine_error, overloaded
from integrations.http_metrics import RequestObserver
from integrations.openai_logprobs import LogprobFormatter
from integrations.openai_requests import id_headers
from integrations.openai_stream import null_usage_until_final, sse_response, usage_at_end
from integrations.request_body import read_json_object
from integrations.request_limits import clipped
from scheduler.api import ENGINE_STOPPED, Delta, FinishReason, GenerationRequest


MAX_NAMES_LISTED = 8  # served ids named in a 404 (all of them are in GET /v1/models)


def check_model(request: Request, model: str | None) -> None:
    """404 model_not_found unless `model` is absent or one of the served ids (OpenAI's error; vLLM's
    --served-model-name: any of its names). The message names the first MAX_NAMES_LISTED ids and the
    route listing them all, under the app's root_path (http_options.root_path), as route_hints does."""
    if model is None:
        return
    settings = request.app.state.settings
    served = (settings.model_name, *settings.model_aliases)
    if model not in served:
        names = " or ".join(f"'{name}'" for name in served[:MAX_NAMES_LISTED])
        more = f" or one of {len(served) - MAX_NAMES_LISTED} more" if len(served) > MAX_NAMES_LISTED else ""
        listing = request.scope.get("root_path", "") + "/v1/models"
        raise APIError(404, f"model '{clipped(model, 200)}' is not served here: use {names}{more} (GET {listing})",
                       "invalid_request_error", param="model", code="model_not_found")


async def read_body(request: Request, model: type[BaseModel]):
    """The request body as `model`: JSON faults are request_limits.InputError, field faults
    RequestValidationError (both 400 naming the field)."""
    data = await read_json_object(request)
    # the names an unknown field may be a misspelling of (validation_errors.close_field)
    request.state.body_fields = [f.alias or name for name, f in model.model_fields.items()]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


async def start(client, req: GenerationRequest, observer: RequestObserver) -> AsyncIterator[Delta]:
    """Submit and wait for the first delta (primed). Returns an iterator over all deltas (the engine
    stops at max_tokens, held-back text included); closing it cancels the engine request."""
    return await primed(observed(client.stream(req), observer), observer)


async def primed(deltas: AsyncIterator[Delta], observer: RequestObserver) -> AsyncIterator[Delta]:
    """Wait for the first delta, so that every fault found until then (engine field checks, admission,
    an error delta) is an HTTP error before the response starts, not a 200 stream that fails. Returns
    an iterator over all deltas, the first included; closing it closes `deltas`."""
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        await deltas.aclose()
        error = (exc if isinstance(exc, APIError) else from_engine_error(exc, observer.endpoint, observer.cap_field)
                 if isinstance(exc, Exception) else None)
        # the error as the client reads it (an engine field in the route's words: X-Request-Id, not request_id)
        observer.finish(error.status if error else 499, error=error.message if error else "client disconnected")
        if error is None:
            raise
        raise error from exc

    return Replay(first, deltas)


class Replay:
    """The deltas of a started request, its first (already read) included. An object rather than an
    async generator so that closing it before the first read still closes `deltas` (an unstarted
    generator's aclose runs none of its body): a request whose sibling choice was refused is cancelled
    at once, not when the garbage collector gets to it."""

    def __init__(self, first: Delta | None, deltas: AsyncIterator[Delta]):
        self._first, self._deltas = first, deltas

    def __aiter__(self) -> "Replay":
        return self

    async def __anext__(self) -> Delta:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._deltas)

    async def aclose(self) -> None:
        self._first = None
        await self._deltas.aclose()


async def observed(deltas: AsyncIterator[Delta], observer: RequestObserver) -> AsyncIterator[Delta]:
    """`checked` deltas. An error that ends a request after its first delta (a grammar that fails
    mid-request) comes as a final delta that may carry the text decoded since the last one: that text
    goes out first, as a delta of its own, then the error (it went down with the error, so what a failed
    stream showed depended on how the engine had split its text). An error on the first delta stays an
    HTTP error before any output (`primed`)."""
    started = False
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            if started and delta.error and (delta.text or delta.token_ids) and (
                    delta.finish_reason is not FinishReason.CANCELLED):
                yield checked(dataclasses.replace(delta, finished=False, finish_reason=None, stats={}, error=None,
                                                  error_field=None, eos_logprob=None), observer)
                delta = dataclasses.replace(delta, text="", token_ids=[], prompt_logprobs=None,
                                            logprobs=[] if delta.logprobs is not None else None)
            started = True
            yield checked(delta, observer)


def checked(delta: Delta, observer: RequestObserver) -> Delta:
    observer.on_delta(delta)
    if delta.finish_reason is FinishReason.CANCELLED:  # never the caller's doing: they would be gone
        why = delta.error or "cancelled by the server"
        if delta.error == ENGINE_STOPPED:  # a draining replica: the code new requests get then too
            raise from_engine_error(ShuttingDownError(f"request ended early: {why}; retry", 1.0))
        raise overloaded(f"request ended early: {why}; retry", 1.0)
    if delta.error and delta.error_field:  # the request's own input failed mid-request (e.g. its grammar)
        field = observer.field_names(delta.error_field) if observer.field_names else delta.error_field
        raise APIError(400, f"{field}: {delta.error}", param=field)
    if delta.error:
        raise APIError(500, f"engine error: {delta.error}", "server_error")
    return delta


def sse(request: Request, header, observer: RequestObserver, events, obj: str, include_usage: bool):
    """The SSE response of a stream's chunk events; with include_usage, "usage": null on every chunk
    (unless a chunk carries its own: openai_stream.ChoiceUsage) and one final usage chunk for the whole
    request."""
    if include_usage:
        events = null_usage_until_final(usage_at_end(events, header, obj, observer))
    return sse_response(events, observer, header.id, id_headers(request, header.id))


async def collect_all(streams: list[AsyncIterator[Delta]], observer: RequestObserver) -> list[tuple[str, Delta, list]]:
    """collect of every choice at once; the observer is finished once all have ended (or the first failed)."""
    tasks = [asyncio.ensure_future(collect(s, observer, finish=False)) for s in streams]
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


def logprob_formatter(client, body, echo_tokens: int = 0, healed: str = "") -> LogprobFormatter | None:
    """The body's formatter, or None without logprobs; echo_tokens: the echoed prompt's token count;
    healed: the request's healed blanks (GenerationRequest.healed)."""
    if body.num_logprobs is None:
        return None
    return LogprobFormatter(client.tokenizer, body.num_logprobs, echo_tokens, healed)


@contextlib.contextmanager
def failures_recorded(observer: RequestObserver):
    """While a response's deltas or events are consumed: an APIError is recorded with its status, a
    client that went away (cancelled) as 499; both propagate."""
    try:
        yield
    except APIError as exc:
        observer.finish(exc.status, error=exc.message)
        raise
    except (asyncio.CancelledError, GeneratorExit):
        observer.finish(499, error="client disconnected")
        raise


async def collect(deltas: AsyncIterator[Delta], observer: RequestObserver, finish: bool = True) -> tuple[str, Delta, list]:
    """The whole text, the last delta and every token's log probability entry (empty when not asked for).
    finish: record the request's success on the observer at the end (errors are always recorded)."""
    parts, last, entries = [], None, []
    with failures_recorded(observer):
        async for delta in deltas:
            parts.append(delta.text)
            entries += delta.logprobs or []
            last = delta
    if last is None or not last.finished:
        observer.finish(500, error="stream ended without a finished delta")
        raise APIError(500, "engine stream ended without a final delta", "server_error")
    if finish:
        observer.finish(200)
    return "".join(parts), last, entries


async def last_event(events: AsyncIterator[dict], observer: RequestObserver) -> dict:
    """Run an event stream to its end and return its last event (a non-streamed answer built by the
    same events as the streamed one); outcome recorded on the observer as `collect` does."""
    last = None
    with failures_recorded(observer):
        async with contextlib.aclosing(events):
            async for event in events:
                last = event
    if last is None:
        observer.finish(500, error="stream ended without an event")
        raise APIError(500, "engine stream ended without a final event", "server_error")
    observer.finish(200)
    return last
