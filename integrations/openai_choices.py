"""OpenAI's `n`: several choices for one prompt, each its own engine request, answered as one response.

Choice i runs as engine request `<id>.<i>` (the id the response carries, then a dot and the index), so
each is scheduled, cancelled and logged on its own, and the prefix cache shares the prompt between them
once the first has prefilled it (the serve router sends them to one replica: they share an affinity
key). Seeds: with `seed` s, choice i draws with seed s + i (wrapping at 2^63), so the choices differ
and the response is reproducible; without one, each choice gets its own random seed (the engine's
rule). Greedy choices (temperature 0) are identical, as in vLLM.

Every choice is admitted before the response starts: if any fails (a full queue, a field the engine
refuses), the others are cancelled and the request gets that error, streamed or not. Closing the
merged stream (a client that went away) cancels every choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import AsyncIterator, Awaitable, Callable

from integrations.request_limits import MAX_SEED
from scheduler.api import Delta, GenerationRequest

MAX_CHOICES = 16
"""The largest `n` (OpenAI allows 128; every choice is a full request here, so a smaller bound keeps
one HTTP request from filling the engine's queue)."""


def choice_requests(req: GenerationRequest, n: int, first: int = 0, total: int | None = None) -> list[GenerationRequest]:
    """The engine requests of n choices of `req`, numbered from `first` among `total` choices of the
    response (default n; a batch of prompts numbers its choices across prompts). One choice in all:
    `req` itself."""
    if (total or n) == 1:
        return [req]
    seed = req.params.get("seed")
    return [dataclasses.replace(req, request_id=f"{req.request_id}.{first + i}",
                                params={**req.params, **({"seed": (seed + i) % (MAX_SEED + 1)} if seed is not None else {})})
            for i in range(n)]


def scored_once(reqs: list[GenerationRequest], n: int) -> list[GenerationRequest]:
    """The requests of prompts with n choices each (choice k * n + j: prompt k's choice j) with vLLM's
    `prompt_logprobs` left to each prompt's first choice: the choices read one prompt, so it is scored
    once (vLLM computes it once per request) and its list shared; the others may start on the prefix
    cache."""
    return [r if i % n == 0 else dataclasses.replace(r, params={k: v for k, v in r.params.items() if k != "prompt_logprobs"})
            for i, r in enumerate(reqs)]


async def start_all(start: Callable[[GenerationRequest], Awaitable[AsyncIterator[Delta]]],
                    reqs: list[GenerationRequest]) -> list[AsyncIterator[Delta]]:
    """Start every request at once (start = openai_calls.start: submit, then await the first delta); the
    first failure (a refusal is immediate) cancels the starts still waiting, closes the started ones
    (cancelling their engine requests) and is raised at once."""
    if len(reqs) == 1:
        return [await start(reqs[0])]
    tasks = [asyncio.ensure_future(start(r)) for r in reqs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:  # the caller was cancelled (the client went away)
        await _abandon(tasks)
        raise
    failed = next((t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
    if failed is None:  # FIRST_EXCEPTION returned without one: every start is done
        return [t.result() for t in tasks]
    await _abandon(tasks)
    raise failed


async def _abandon(tasks: list[asyncio.Future]) -> None:
    """Cancel the starts still waiting (each cancels its engine request) and close the started streams."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is None:
            await task.result().aclose()


async def indexed(events: AsyncIterator[dict], index: int) -> AsyncIterator[dict]:
    """The events of one choice with `index` set on their choices (the shapes build index 0)."""
    async with contextlib.aclosing(events):
        async for event in events:
            for choice in event.get("choices", ()):
                choice["index"] = index
            yield event


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """Events of every stream as they come (each stream's own order kept); the first error ends all.
    Closing this closes every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for event in streams[0]:
                yield event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[dict]) -> None:
        try:
            async for event in stream:
                await queue.put(event)
        except Exception as exc:  # handed to the consumer, raised there
            await queue.put(exc)
        await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
