"""llama.cpp-compatible POST /infill, shaped so llama.vim and llama.vscode work unmodified.

What those clients send (read from their source): input_prefix (lines above the cursor), prompt (the
cursor line up to the cursor), input_suffix (rest of the line and lines below), input_extra
([{text, filename, time}] ring-buffer chunks), n_predict (0 = only warm the cache with input_extra),
t_max_predict_ms, stop, n_indent, samplers, cache_prompt, stream, plus fields we accept and ignore
(id_slot, t_max_prompt_ms, samplers, model, ...). Fields that would change what the output is
(grammar, json_schema, n_probs > 0, lora, ignore_eos, logit_bias) are refused with 400 rather than
silently ignored. llama.vscode may send n_cmpl (1-4) and then
expects a JSON array of results. llama.vim sends response_fields and reads the flattened keys
("timings/prompt_n", ...); it also checks the raw body with a regex that needs `"content":"` with no
space after the colon, so bodies are written compactly.

The document is input_prefix + prompt + <gap> + input_suffix.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any, AsyncIterator

from pydantic import Field, field_validator

from integrations.editor.gaps import Candidate, gap_cap, infill_room, no_room_message, plan_gaps, strategy_gaps
from integrations.editor.infill import build_infill_prompt
from integrations.editor.postprocess import CUT_INDENT, CUT_NEWLINE, CUT_SUFFIX, Rules
from integrations.editor.protocol import MAX_INDENT, MAX_STOP_STRINGS, ContextChunk, Limits
from integrations.editor.runner import CompletionJob, CompletionOutcome, run_completion, warm_prefix
from decoding.params import MAX_TOP_K
from integrations.request_limits import MAX_SEED, InputError, long_stop_fault, off_loop, sampling_temperature
from integrations.llama_completion import LlamaBody, llama_timings
from integrations.openai_infill import final_delta
from scheduler.api import Delta, Mode, Priority

LIMITS = Limits()


class ExtraChunk(LlamaBody):
    text: str = Field(max_length=LIMITS.max_text_chars)  # as the editor protocol's context chunks
    filename: str = ""


class InfillBody(LlamaBody):
    """The /infill request (llama.cpp's tools/server/README.md, "POST /infill"): input_prefix and
    input_suffix are required, as llama.cpp requires them."""

    input_prefix: str = Field(max_length=LIMITS.max_text_chars)
    input_suffix: str = Field(max_length=LIMITS.max_text_chars)
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=LIMITS.max_context_chunks)
    prompt: str = Field("", max_length=LIMITS.max_text_chars)
    n_predict: int = Field(-1, ge=-1)  # a maximum: the strategy's gaps (at most LIMITS.max_tokens) apply
    t_max_predict_ms: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    n_indent: int = Field(0, ge=0, le=MAX_INDENT)
    stream: bool = False
    # llama.cpp's README defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, seed -1 (random).
    temperature: float = Field(0.8, le=2)  # <= 0: greedy (LlamaBody)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="-1 (llama.cpp's default): a random seed")
    n_cmpl: int = Field(1, ge=1, le=4)
    top_k: int = Field(40, le=MAX_TOP_K)  # <= 0: off, as llama.cpp (its README's -1 included)
    top_p: float = Field(0.95, ge=0, le=1)  # 0: one token (LlamaBody)
    min_p: float = Field(0.05, ge=0, le=1)  # 0: off
    return_tokens: bool = False  # `tokens` holds the generated ids of `content` (always when streaming; _result)
    response_fields: list[str] | None = None
    cache_prompt: bool = True  # always on: the engine's prefix cache serves every request
    # ReFusion extension (llama.cpp has none): pin the decoder for reproducible output; its JSON string
    mode: Mode = Field(Mode.AUTO, strict=False)

    # Accepted only at their "off" value: each would change what the output is, and none is applied.
    grammar: str = ""
    json_schema: Any = None
    n_probs: int = 0
    lora: list = Field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: Any = None

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int) -> int:
        return max(0, value)  # (a negative top_k was a 400 here, while /v1/completions and llama.cpp take -1)

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if not all(value):
            raise ValueError("stop strings must be non-empty")
        if (fault := long_stop_fault(value)) is not None:
            raise ValueError(fault)
        return value

    @field_validator("grammar", "json_schema", "n_probs", "lora", "ignore_eos", "logit_bias")
    @classmethod
    def _unsupported_when_on(cls, value: Any, info) -> Any:
        on = value is not None if info.field_name == "json_schema" else bool(value)  # {} means "any JSON"
        if on:
            off = {"grammar": '""', "json_schema": "null", "n_probs": "0", "lora": "[]", "ignore_eos": "false",
                   "logit_bias": "[]"}[info.field_name]
            raise ValueError(f"not supported by this server (constrained sampling, token probabilities, "
                             f"adapters and logit biases are not applied): remove it or set it to {off}")
        return value


# Our stop reasons -> llama.cpp stop_type. A rule cut is a "limit" (llama.cpp reports its n_indent
# stop that way); a cancelled request never reaches a response. A "stop" ended by one of the
# request's stop strings is a "word" (see _stop_fields).
_STOP_TYPE = {"stop": "eos", "length": "limit", "deadline": "limit", CUT_NEWLINE: "limit", CUT_INDENT: "limit",
              CUT_SUFFIX: "limit", "cancelled": "none", "error": "none"}  # fmt: skip


async def make_job(client, body: InfillBody, request_id: str, n_ctx: int = 0) -> CompletionJob:
    """The completion job of an /infill body; the prompt is tokenized off the event loop and fits the
    model's context `n_ctx` (tokens, 0 unknown) with the longest gap (llama.cpp cuts its prompt to n_ctx)."""
    context = [ContextChunk(c.filename, c.text) for c in body.input_extra]
    prefix = body.input_prefix + body.prompt
    chars = len(prefix) + len(body.input_suffix) + sum(len(c.text) for c in context)
    max_tokens = min(body.n_predict, LIMITS.max_tokens) if body.n_predict > 0 else None
    gaps = plan_gaps(max_tokens, multiline=True)
    if body.n_cmpl > len(gaps):  # more completions asked than the strategy has gaps: add longer ones
        gaps = tuple(sorted(set(gaps) | {gaps[-1] * 2 ** k for k in range(1, body.n_cmpl - len(gaps) + 1)}))
        gaps = tuple(g for g in gaps if max_tokens is None or g <= gap_cap(max_tokens))
    # (n_cmpl's longer gaps too: each would shrink every candidate's prompt; n_predict is a most, and
    # llama.cpp stops where its context is full, so gaps that do not fit shrink to one that does)
    fitting = strategy_gaps(n_ctx, gaps)
    if not fitting and body.n_predict != 0:  # (a warm-up, n_predict 0, generates nothing: its prompt may fill the context)
        raise InputError(400, "n_predict", no_room_message(n_ctx, "n_predict"))
    gaps = fitting or gaps
    room = infill_room(n_ctx, gaps if body.n_predict != 0 else (1,))
    prompt = await off_loop(partial(build_infill_prompt, room=room), client.tokenizer, prefix, body.input_suffix,
                            context, chars=chars)
    seed = None if body.seed == -1 else body.seed  # llama.cpp: -1 is a random seed; unset is too (engine)
    sampling = {"temperature": sampling_temperature(body.temperature), "top_k": body.top_k, "top_p": body.top_p,
                "min_p": body.min_p}
    if seed is not None:
        sampling["seed"] = seed
    return CompletionJob(
        request_id=request_id,
        prompt=prompt,
        gaps=gaps,
        rules=Rules(suffix=body.input_suffix, multiline=True, indent=body.n_indent),
        mode=body.mode,
        priority=Priority.INTERACTIVE,
        stop=list(body.stop),
        max_tokens=max_tokens,
        fit_to_kv=max_tokens is None,
        sampling=sampling,
        predict_limit_ms=body.t_max_predict_ms or None,
    )


def _stop_fields(stop_reason: str, candidate: Candidate | None, job: CompletionJob) -> dict:
    """llama.cpp's stop_type and stopping_word: "word" and the string when one of the request's stop
    strings ended the text (the engine reports it, in the model's style, as the final stats' stop_word;
    the client gets its own string back)."""
    word = (candidate.stats.get("stop_word") if candidate is not None else None) or ""
    if stop_reason == "stop" and word:
        return {"stop_type": "word", "stopping_word": job.prompt.style.client_stop(job.stop, word)}
    return {"stop_type": _STOP_TYPE.get(stop_reason, "none"), "stopping_word": ""}


def _result(client, job: CompletionJob, body: InfillBody, content: str, ids: list[int], stop_reason: str,
            tokens: int, outcome: CompletionOutcome | None, candidate: Candidate | None = None, n_ctx: int = 0,
            warmed: dict | None = None) -> dict:
    """One llama.cpp /completion result; `candidate` is the one reported (default: the chosen one);
    `warmed`: warm_prefix's answer for an n_predict 0 request (no outcome).

    `tokens` (with return_tokens, and in every stream event) are `ids`: the ids the model generated for
    `content`, as llama.cpp's server returns them, never a re-tokenization of it (runner.text_id_count).
    Where a rule cut the text (suffix repeat, n_indent, trailing line breaks) they are the fewest
    generated ids whose text holds the content, so a token the cut splits is kept; a stop string's ids
    are kept, as the engine generated them; the ids stay the model's where the text is restyled (its
    LF and space indentation, which a CRLF or tab-indented document gets back as CRLF and tabs), and
    their text starts with the blanks token healing left out of the prompt, which the model wrote and
    `content` leaves out. A stream's events add up to the non-streamed result's `tokens`."""
    prompt_n = len(job.prompt.prompt_ids) + len(job.prompt.suffix_ids or [])
    chosen = next((c for c in outcome.candidates if c.gap == outcome.gap), None) if outcome else None
    candidate = candidate or chosen
    if chosen is not None:
        cached = int(chosen.stats.get("cached_prompt_tokens") or 0)
    else:  # a warm-up (or nothing run)
        cached = int((warmed or {}).get("cached") or 0)
    total_ms = outcome.total_ms if outcome else 0.0
    prompt_ms = (outcome.first_partial_ms or total_ms) if outcome else 0.0  # time to first text
    predicted_ms = max(total_ms - prompt_ms, 0.0)
    return {
        "index": 0,
        "content": content,
        "id_slot": 0,
        "stop": True,
        "model": client.model_name,
        "tokens_predicted": tokens,
        "tokens_evaluated": prompt_n,
        "tokens": list(ids) if body.return_tokens or body.stream else [],
        "generation_settings": _settings(client, job, body, n_ctx),
        "prompt": client.tokenizer.decode(job.prompt.prompt_ids),  # the processed prompt, as llama.cpp
        "has_new_line": "\n" in content,
        "truncated": job.prompt.truncated,
        **_stop_fields(stop_reason, candidate, job),
        "tokens_cached": cached,  # prompt tokens the prefix cache served (llama.cpp: reused from before)
        "timings": llama_timings(prompt_n, cached, prompt_ms, tokens, predicted_ms),
    }


def _settings(client, job: CompletionJob, body: InfillBody, n_ctx: int) -> dict:
    """llama.cpp's generation_settings: the options in force (sampling as the engine got them; a
    seed absent means a fresh random one), n_ctx (the model's context, tokens), the model, and the
    candidate gaps (tokens)."""
    return {"n_predict": body.n_predict, "n_indent": body.n_indent, "model": client.model_name, "n_ctx": n_ctx,
            "stop": list(body.stop), "stream": body.stream, "n_cmpl": body.n_cmpl,
            "t_max_predict_ms": body.t_max_predict_ms, "mode": body.mode.value, "gaps": list(job.gaps),
            **{k: job.sampling.get(k) for k in ("temperature", "seed", "top_k", "top_p", "min_p")}}


def select_fields(result: dict, fields: list[str] | None) -> dict:
    """llama.cpp's response_fields: only the listed paths, as flat keys ("timings/prompt_n")."""
    if not fields:
        return result
    picked = {}
    for path in fields:
        node: Any = result
        for part in path.split("/"):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            picked[path] = node
    return picked


def compact_json(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _observe_job(observer, job: CompletionJob, body: InfillBody) -> None:
    """What the request log learns once the job is built: its prompt tokens (prompt and suffix), and its
    `choices`, how many results it answers with: n_cmpl, or fewer where it has fewer gaps (_other_results;
    every candidate runs or none), one for a warm-up (n_predict 0)."""
    if observer is not None:
        observer.prompt_tokens = len(job.prompt.prompt_ids) + len(job.prompt.suffix_ids or [])
        observer.choices = min(body.n_cmpl, len(job.gaps)) if body.n_predict != 0 else 1


async def infill(client, body: InfillBody, n_ctx: int, request_id: str, observer=None) -> dict | list:
    """Run one non-streaming /infill; n_ctx: the model's context (tokens) for generation_settings;
    request_id: the prefix of its candidates' engine ids; observer: the request's
    http_metrics.RequestObserver (usage_from_engine), fed the outcome. Engine errors propagate (the
    route maps them to HTTP)."""
    job = await make_job(client, body, request_id, n_ctx)
    _observe_job(observer, job, body)
    if body.n_predict == 0:
        warmed = await warm_prefix(client, request_id, job.prompt)
        return select_fields(_result(client, job, body, "", [], "length", 0, None, n_ctx=n_ctx, warmed=warmed),
                             body.response_fields)
    outcome = await run_completion(client, job, whole=True)
    if observer is not None:
        if outcome.first_token_at is not None:  # the engine's first token, as a plain completion's
            observer.on_first_token(outcome.first_token_at)
        observer.on_delta(final_delta(request_id, outcome.text, outcome.token_ids, outcome))
    results = [_result(client, job, body, outcome.text, outcome.token_ids, outcome.stop_reason, outcome.tokens,
                       outcome, n_ctx=n_ctx)]
    if body.n_cmpl == 1:
        return select_fields(results[0], body.response_fields)
    results += _other_results(client, job, body, outcome, n_ctx, observer, request_id)
    return [select_fields(r, body.response_fields) for r in results]


def _other_results(client, job: CompletionJob, body: InfillBody, outcome: CompletionOutcome, n_ctx: int,
                   observer=None, request_id: str = "") -> list[dict]:
    """The results of index 1 to n_cmpl - 1: the candidates other than the chosen one, in gap order. The
    observer counts each as a choice of its own (`<request_id>.<index>`: its generated tokens in usage and
    the token counter, its mode and tokens per forward), as OpenAI's usage sums n choices."""
    others = [c for c in outcome.candidates if c.gap != outcome.gap][: body.n_cmpl - 1]
    if observer is not None:
        for index, cand in enumerate(others, start=1):
            stats = {**cand.stats, "generated_tokens": cand.tokens}
            mode = stats.pop("mode", None)
            observer.on_delta(Delta(f"{request_id}.{index}", "", [], finished=True, mode=Mode(mode) if mode else None,
                                    stats=stats))
    return [{**_result(client, job, body, cand.text, cand.token_ids, cand.stop_reason, cand.tokens, outcome, cand,
                       n_ctx), "index": index}
            for index, cand in enumerate(others, start=1)]


async def infill_events(client, body: InfillBody, n_ctx: int, request_id: str, observer=None) -> AsyncIterator[bytes]:
    """stream=true: server-sent events like llama.cpp, one `data: {json}` per text piece (content is the
    new text only, tokens its generated ids (_result), stop=false), then one final event with stop=true
    and the full result fields (the rest of the text and its ids). With
    n_cmpl > 1 the chosen candidate (index 0) streams, and each other one follows as one final event of
    its own index with its whole text: per index, the contents add up to the non-streamed result's.
    Errors (InputError, engine errors) are raised; the route turns one raised before the first event
    into an HTTP error and a later one into a final `data: {"error": ...}` event. Arguments as infill()
    (the observer also sees each piece: time to first token, inter-token latency)."""
    job = await make_job(client, body, request_id, n_ctx)
    _observe_job(observer, job, body)
    if body.n_predict == 0:
        warmed = await warm_prefix(client, request_id, job.prompt)
        yield b"data: " + compact_json(_result(client, job, body, "", [], "length", 0, None, n_ctx=n_ctx,
                                               warmed=warmed)) + b"\n\n"
        return
    queue: asyncio.Queue = asyncio.Queue()
    sent, sent_ids = "", []

    async def on_partial(text: str, token_ids: list[int]) -> None:
        await queue.put((text, token_ids))

    async def produce() -> CompletionOutcome:
        try:
            return await run_completion(client, job, on_partial, whole=True)
        finally:
            await queue.put(None)

    task = asyncio.ensure_future(produce())
    try:
        while (shown := await queue.get()) is not None:
            text, token_ids = shown
            if text.startswith(sent) and len(text) > len(sent):
                piece = {"index": 0, "content": text[len(sent):], "tokens": token_ids[len(sent_ids):], "stop": False}
                if observer is not None:
                    observer.on_delta(Delta(request_id, piece["content"], piece["tokens"]))
                sent, sent_ids = text, token_ids
                yield b"data: " + compact_json(piece) + b"\n\n"
        outcome = await task
    finally:
        if not task.done():
            task.cancel()  # client went away: cancels every candidate in the engine
    tail, tail_ids = outcome.after(sent, sent_ids)
    if observer is not None:
        observer.on_delta(final_delta(request_id, tail, tail_ids, outcome))
    final = _result(client, job, body, tail, tail_ids, outcome.stop_reason, outcome.tokens, outcome, n_ctx=n_ctx)
    yield b"data: " + compact_json(final) + b"\n\n"
    for other in _other_results(client, job, body, outcome, n_ctx, observer, request_id):  # whole: only the chosen one streams
        yield b"data: " + compact_json(other) + b"\n\n"
