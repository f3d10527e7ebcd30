"""How HTTP and editor front ends reach the engine: one interface, two transports.

    client = request.app.state.engine_client          # set by the ingress (serve_app / openai_api)
    async for delta in client.stream(GenerationRequest(...)):   # scheduler.api.Delta, last one finished
        ...
    await client.cancel(request_id)                   # idempotent
    client.tokenizer.encode(text) / .decode(ids)      # transformers tokenizer of the served model
    client.model_name                                 # e.g. "refusion-tiny-code"
    await client.info()                               # {"model", "limits", "defaults", ...}

`stream` cancels the engine request when the iterator is closed early (`aclose()`, `break` inside
`contextlib.aclosing`) or when the consuming task is cancelled (client disconnect); `cancel(request_id)`
ends the stream with a finished CANCELLED delta. Engine errors surface as the typed errors of
scheduler.api: `InvalidRequestError(field)` and `OverloadedError(retry_after_s)`, plus
`EngineUnavailableError` (an OverloadedError) when the replica serving a call dies or none is running:
transport failures never reach front ends raw (Ray's messages name actors, pids and IPs).

Implementations:
  - `LocalEngineClient`: in-process, over a scheduler Engine (tests, tools, single-process serving).
  - `ServeEngineClient` (integrations/serve_engine_client.py): over a Ray Serve deployment handle to
    `serve_engine.EngineDeployment` replicas, streaming with `handle.options(stream=True)`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from scheduler.api import Delta, EngineError, GenerationRequest, InvalidRequestError, OverloadedError, merge_deltas
from scheduler.engine import EngineNotRunningError

log = logging.getLogger(__name__)

class EngineUnavailableError(OverloadedError):
    """No engine replica could finish the call: the one serving it died (its stream is cut) or none is
    running. Retry after `retry_after_s` (HTTP 503 + Retry-After; editor ENGINE_UNAVAILABLE)."""


class ShuttingDownError(OverloadedError):
    """The server is draining (shutdown or a replica being stopped): retry after `retry_after_s`, on the
    same address once it is back or on another replica (HTTP 503 `shutting_down` + Retry-After, as the
    ingress answers while it drains)."""


class EngineClient(Protocol):
    """What every front end may call. See the module docstring for the semantics."""

    model_name: str
    tokenizer: Any

    def stream(self, req: GenerationRequest) -> AsyncIterator[Delta]: ...

    async def cancel(self, request_id: str) -> None: ...

    def in_flight(self, request_id: str) -> str | None:
        """An id this client has in flight that `request_id` is, extends or is extended by
        (scheduler/request_ids.py); None when there is none. For a route that names its engine requests
        other than `<id>` or `<id>.<i>` (/infill's candidates), to refuse a client id already running."""

    async def info(self) -> dict: ...

    async def metrics(self) -> bytes:
        """The engine's Prometheus text (scheduler.metrics.render()); b"" when it has none."""

    async def check_health(self) -> None:
        """Raise when the engine cannot serve a one-token request within its health timeout."""

    async def scaled_to_zero(self) -> bool:
        """Whether no engine replica is up because the engine autoscales down to zero: then /health does
        not probe it (a probe that waits for a replica to start would fail the load balancer's check,
        which then never sends the request that starts one)."""

    async def pause(self) -> dict[str, bool]:
        """Pause every engine replica up now (scheduler.engine.Engine.pause); {replica id: paused} once
        each holds (no forward in flight), or false where a resume or shutdown came first. A replica
        that starts later is not paused."""

    async def resume(self) -> dict[str, bool]:
        """End the pause of every engine replica up now (Engine.resume); {replica id: paused}."""

    async def is_paused(self) -> dict[str, bool]:
        """{replica id: paused} of every engine replica up now."""


# ---------------------------------------------------------------------------------------------------
# Engine errors across a process boundary. scheduler.api's errors take extra constructor arguments,
# which plain exception pickling drops; replicas therefore send this small record instead of raising.


@dataclass
class EngineFailure:
    """A typed engine error as plain data: the first (and only) item a replica streams on failure."""

    kind: str  # "invalid" | "overloaded" | "shutting_down" | "engine" | "moved" (to `replica`: serve_rebalance)
    message: str
    field: str | None = None
    retry_after_s: float | None = None
    asked: int | None = None  # InvalidRequestError's
    most: int | None = None
    prompt_tokens: int | None = None
    replica: str | None = None  # "moved": the engine replica to send the request to

    @classmethod
    def from_exception(cls, exc: EngineError) -> "EngineFailure":
        if isinstance(exc, InvalidRequestError):
            message = str(exc).split(": ", 1)[-1]
            return cls("invalid", message, field=exc.field, asked=exc.asked, most=exc.most,
                       prompt_tokens=exc.prompt_tokens)
        if isinstance(exc, (ShuttingDownError, EngineNotRunningError)):  # a draining replica or a stopped engine
            return cls("shutting_down", str(exc), retry_after_s=exc.retry_after_s)
        if isinstance(exc, OverloadedError):
            return cls("overloaded", str(exc), retry_after_s=exc.retry_after_s)
        return cls("engine", str(exc))

    def to_exception(self) -> EngineError:
        if self.kind == "invalid":
            return InvalidRequestError(self.field or "request", self.message, asked=self.asked, most=self.most,
                                       prompt_tokens=self.prompt_tokens)
        if self.kind == "shutting_down":
            return ShuttingDownError(self.message, self.retry_after_s or 1.0)
        if self.kind == "overloaded":
            return OverloadedError(self.message, self.retry_after_s or 1.0)
        return EngineError(self.message)


# ---------------------------------------------------------------------------------------------------


def read_model_card(model_dir: str | Path, tokenizer=None, max_model_len: int | None = None) -> dict:
    """What the model directory says about limits and decoding defaults (config.json, refusion.json);
    with the model's `tokenizer`, the defaults list the model's other end tokens too (`end_token_ids`:
    workers.tokenizer.end_token_ids, what the engine stops on). `max_model_len` (vLLM's --max-model-len,
    ServeConfig.max_model_len): the context served, when below the model's. Raises ModelDirError as
    loading does."""
    from decoding.params import load_model_defaults

    from integrations.serve_config import model_context

    model_dir = Path(model_dir)
    defaults = load_model_defaults(model_dir)
    defaults.pop("seed", None)  # no default seed here: a request without one samples with a fresh seed
    if tokenizer is not None:
        from workers import loader

        model = loader.read_config(model_dir)
        mask = loader.resolve_mask_token_id(model, tokenizer, model_dir)
        defaults["end_token_ids"] = list(loader.end_token_ids(model, tokenizer, model_dir, mask))
    return {
        "model": model_dir.name,
        "limits": {"context_length": served_context(model_context(model_dir), max_model_len)},
        "defaults": defaults,
    }


def served_context(model_context: int, max_model_len: int | None) -> int:
    """The context served, in tokens: the model's (config.json max_position_embeddings; 0 = unknown), or
    max_model_len below it."""
    if not max_model_len:
        return model_context
    return min(model_context, max_model_len) if model_context else max_model_len


async def coalesce_deltas(stream: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """Re-yield `stream`, merging the deltas that piled up while the consumer was busy.

    Each item crossing a process boundary costs about as much as a small forward; an engine producing
    one token per step for many requests would otherwise be slowed down by its own transport. Closing
    or cancelling this iterator closes `stream` (which cancels the engine request)."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for delta in stream:
                queue.put_nowait(delta)
        except Exception as exc:  # handed to the consumer, raised there
            queue.put_nowait(exc)
        queue.put_nowait(end)

    task = asyncio.create_task(pump())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            deltas = [i for i in items if isinstance(i, Delta)]
            if deltas:
                yield merge_deltas(deltas)
            for item in items:
                if isinstance(item, Exception):
                    raise item
            if items[-1] is end:
                return
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


class LocalEngineClient:
    """In-process client over a started `scheduler.engine.Engine` (it shares the caller's event loop)."""

    def __init__(self, engine, tokenizer, model_name: str, model_info: dict | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._model_info = dict(model_info or {"model": model_name})

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        # Closing the engine's own generator cancels exactly the request it admitted (Engine.submit's
        # `finally`). Never cancel by id here: a submit refused at admission (e.g. request_id already
        # in flight) admitted nothing, and the id would name someone else's request.
        deltas = self.engine.submit(req)
        try:
            async for delta in deltas:
                yield delta
                if delta.finished:
                    return
        finally:
            await deltas.aclose()

    async def cancel(self, request_id: str) -> None:
        await _maybe_await(self.engine.cancel(request_id))

    def in_flight(self, request_id: str) -> str | None:
        return self.engine.in_flight(request_id)

    async def info(self) -> dict:
        info = dict(self._model_info)
        info["model"] = self.model_name
        engine_stats = getattr(self.engine, "stats", None)
        if callable(engine_stats):
            info["engine"] = await _maybe_await(engine_stats())
        return info

    async def metrics(self) -> bytes:
        from integrations.engine_host import engine_metrics_text

        return engine_metrics_text(self.engine)

    async def check_health(self) -> None:
        from integrations.engine_host import one_token_probe

        await one_token_probe(self, forwards=lambda: getattr(self.engine, "forwards", 0),
                              paused=lambda: getattr(self.engine, "paused", False))

    async def pause(self) -> dict[str, bool]:
        return {"local": await self.engine.pause()}

    async def resume(self) -> dict[str, bool]:
        self.engine.resume()
        return {"local": self.engine.paused}

    async def is_paused(self) -> dict[str, bool]:
        return {"local": self.engine.paused}

    async def scaled_to_zero(self) -> bool:
        return False  # one engine in this process, always there
