"""`suffix` on POST /v1/completions: the editor's infill path behind the OpenAI response shape.

A completion with a suffix is an infill: the same prompt builder (token healing, truncation), candidate
gap lengths and post-processing rules (stop where the suffix starts repeating, single-line/indent
rules) as the editor protocol and llama.cpp's /infill (docs/editor-protocol.md). This module runs that
job and presents its outcome as the ordinary stream of `Delta`s the completions endpoint consumes, so
streaming, usage, metrics and error mapping stay the endpoint's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import AsyncIterator, Callable

from integrations.editor.gaps import fitting_gaps, infill_room, longest_gap, no_room_message, plan_gaps, strategy_gaps
from integrations.editor.infill import build_infill_prompt
from integrations.editor.postprocess import Rules
from integrations.editor.runner import CompletionJob, CompletionOutcome, run_completion
from integrations.editor.protocol import Limits
from integrations.http_errors import APIError, from_engine_error
from integrations.request_limits import InputError, client_key, off_loop
from scheduler.api import Delta, EngineError, FinishReason, Mode

_TEXT_LIMIT = Limits().max_text_chars  # characters of prompt and of suffix, as in the editor protocol
# Decoding parameters that fix the generation span: the infill strategy chooses them per gap.
_SPAN_PARAMS = ("gen_length", "slot_size", "serial_num_blocks")
# The editor rules' stop reasons, as engine finish reasons (OpenAI shows "stop" or "length").
_FINISH = {"length": FinishReason.LENGTH, "deadline": FinishReason.DEADLINE, "cancelled": FinishReason.CANCELLED,
           "error": FinishReason.ERROR}  # fmt: skip


async def infill_job(client, request_id: str, body, decode_params: dict, context_length: int = 0) -> CompletionJob:
    """The editor CompletionJob for a completions request with `suffix` (multi-line, like /infill).

    As in the editor protocol, `prompt` (a string) and `suffix` may each be up to
    protocol.Limits.max_text_chars characters and are cut to the infill token budgets, shrunk to fit the
    model's `context_length` (tokens, 0 unknown) with max_tokens or the longest gap (so the model context
    is not the client's limit here); the prompt is tokenized off the event loop. Raises InputError
    naming the field."""
    [text_prompt] = body.prompts  # the route refuses a batch with a suffix
    if not isinstance(text_prompt, str):
        raise InputError(400, "prompt", "must be a string when suffix is set")
    suffix = body.suffix or ""
    for name, text in (("prompt", text_prompt), ("suffix", suffix)):
        if len(text) > _TEXT_LIMIT:
            raise InputError(400, name, f"is {len(text):,} characters; with suffix send at most {_TEXT_LIMIT:,} "
                                        f"(the infill keeps the end of the prompt and the start of the suffix)")
    # The same gaps streamed or not: the choice keeps every chunk a prefix of the final text
    # (gaps.choose_candidate), so both return the same completion.
    # vLLM's rule, as without suffix: min_tokens <= the most this request generates, max_tokens or, unset,
    # the infill strategy's longest gap (so min_tokens never lengthens a generation past what was checked)
    most = body.max_tokens if body.max_tokens is not None else max(plan_gaps(None, multiline=True))
    if body.min_tokens > most:
        cap = (f"max_tokens ({most})" if body.max_tokens is not None
               else f"the {most} tokens an infill generates at most without max_tokens (set max_tokens too)")
        raise InputError(400, "min_tokens", f"is {body.min_tokens}, above {cap}: lower min_tokens")
    # A max_tokens past the context is the client's to lower (as without suffix); within it, it is a most
    # that the strategy's gaps keep to (strategy_gaps); then min_tokens must fit.
    if body.max_tokens is not None and not fitting_gaps(context_length, (body.max_tokens,)):
        also = ("min_tokens",) if body.min_tokens > longest_gap(context_length) else ()
        raise InputError(400, "max_tokens", no_room_message(context_length, "max_tokens", *also))
    gaps = strategy_gaps(context_length, plan_gaps(body.max_tokens, multiline=True, min_tokens=body.min_tokens),
                         at_least=body.min_tokens)
    if not gaps:
        field = "min_tokens" if body.min_tokens else "max_tokens"
        raise InputError(400, field, no_room_message(context_length, field))
    room = infill_room(context_length, gaps)
    if room and body.max_tokens:  # the route fits max_tokens to the context too (fit_generation)
        room = max(2, min(room, context_length - body.max_tokens))
    prompt = await off_loop(partial(build_infill_prompt, room=room), client.tokenizer, text_prompt, suffix,
                            chars=len(text_prompt) + len(suffix))
    return CompletionJob(
        request_id=request_id,
        prompt=prompt,
        gaps=gaps,
        rules=Rules(suffix=body.suffix or "", multiline=True),
        mode=body.engine_mode,
        priority=body.engine_priority,
        stop=list(body.stop),
        max_time_ms=body.max_time_ms,
        max_tokens=body.max_tokens,
        fit_to_kv=body.max_tokens is None,
        sampling={k: v for k, v in decode_params.items() if k not in _SPAN_PARAMS},
        client=client_key(body.user),  # (the fair share's client, as a completion without suffix)
    )


async def infill_deltas(client, job: CompletionJob, request_id: str, stream: bool,
                        on_first_token: Callable[[float], None] | None = None) -> AsyncIterator[Delta]:
    """Run the infill job; yield text pieces as Deltas (partials only when streaming), then a final
    Delta carrying finish reason, mode and stats. Each Delta's token_ids are the generated ids of its
    text (runner.text_id_count: what /infill returns as `tokens`; the time-to-first-token and inter-token
    metrics count them). Not streaming, on_first_token (RequestObserver.on_first_token) is given when
    the engine's first token came, before the final Delta. Engine errors become APIErrors; closing the
    iterator cancels every candidate in the engine."""
    pieces: asyncio.Queue = asyncio.Queue()
    sent, sent_ids = "", []

    async def on_partial(text: str, token_ids: list[int]) -> None:
        await pieces.put((text, token_ids))

    task = asyncio.ensure_future(run_completion(client, job, on_partial if stream else None, whole=True))
    getter = None
    try:
        while True:
            getter = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            text, token_ids = getter.result()
            if text.startswith(sent) and len(text) > len(sent):
                yield Delta(request_id, text[len(sent):], token_ids[len(sent_ids):])
                sent, sent_ids = text, token_ids
        outcome = _outcome(task)
        if not stream and on_first_token is not None and outcome.first_token_at is not None:
            on_first_token(outcome.first_token_at)
        yield final_delta(request_id, *outcome.after(sent, sent_ids), outcome)
    finally:
        if getter is not None and not getter.done():  # (closed while waiting: "Task was destroyed but it is
            getter.cancel()                           # pending!" at garbage collection, helper-197)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _outcome(task: asyncio.Future) -> CompletionOutcome:
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, APIError):
        raise exc
    if isinstance(exc, EngineError) or type(exc).__name__ in ("BackPressureError",):
        raise from_engine_error(exc) from exc
    raise exc


def final_delta(request_id: str, text: str, token_ids: list[int], outcome: CompletionOutcome) -> Delta:
    """The last Delta of an infill job's outcome: its last text piece and ids, the finish reason of its
    stop reason, the chosen candidate's mode and stats, `generated_tokens` the tokens it streamed (what
    usage counts: RequestObserver usage_from_engine), `infill_gap` the gap chosen."""
    chosen = next((c for c in outcome.candidates if c.gap == outcome.gap), None)
    stats = dict(chosen.stats) if chosen else {}
    stats["generated_tokens"] = outcome.tokens  # the chosen candidate's streamed ids: at most max_tokens
    if outcome.tokens_per_forward is not None:
        stats["tokens_per_forward"] = outcome.tokens_per_forward
    stats["infill_gap"] = outcome.gap
    mode = stats.pop("mode", None)
    return Delta(
        request_id,
        text,
        token_ids,
        finished=True,
        finish_reason=_FINISH.get(outcome.stop_reason, FinishReason.STOP),
        mode=Mode(mode) if mode else None,
        stats=stats,
    )
