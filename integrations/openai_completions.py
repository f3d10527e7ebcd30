"""POST /v1/completions' work behind its route (integrations/openai_api.py): the options a request may not
combine (`check_completion_options`), its choices started, either an infill's one (`start_infill`, the
editor path: integrations/openai_infill.py) or n choices of every prompt (`start_completions`), and the
started run answered as server-sent events or one JSON body (`completion_response`). `settings` is the
app's openai_api.APISettings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fastapi import Request

from integrations import openai_responses as shape
from integrations.context_fit import fit_generation
from integrations.http_metrics import RequestObserver
from integrations.json_response import UTF8JSONResponse
from integrations.openai_calls import collect_all, logprob_formatter, observed, primed, sse, start
from integrations.openai_choices import choice_requests, indexed, merged, scored_once, start_all
from integrations.openai_infill import infill_deltas, infill_job
from integrations.openai_logprobs import LogprobFormatter
from integrations.openai_models import CompletionRequest
from integrations.openai_requests import candidates_id, check_id_free, completion_requests, id_headers
from integrations.openai_stream import (ChoiceUsage, choice_chunks, completion_events, echoed, eos_listed,
                                        prompt_scores_kept, stop_included)
from integrations.request_limits import InputError


@dataclass
class CompletionRun:
    """A started completions request: one stream per choice (choice k * n + j: prompt k's choice j) and,
    per choice, the prompt tokens echoed, the whitespace healed off its prompt and its prompt's length.
    scores: the prompt log probabilities' lists (None: not asked for), one per choice when scored_each,
    else filled at each prompt's first choice."""

    streams: list
    observer: RequestObserver
    echo_counts: list[int]
    healed: list[str]
    choice_prompts: list[int]
    scores: list[list] | None = None
    scored_each: bool = False


def check_completion_options(body: CompletionRequest, grammar, root: str = "") -> None:
    """InputError (400) naming the field of an option this request cannot have: an infill (`suffix`) takes
    one prompt, n 1, no echo, log probabilities, stop string kept or structured output; max_tokens 0 is
    for echo only. Routes are named under `root` (the app's root_path, as route_hints names them)."""
    if body.suffix is not None and len(body.prompts) > 1:
        raise InputError(400, "prompt", "an infill (`suffix`) takes one prompt: send one per request")
    if body.suffix is not None and body.n > 1:
        raise InputError(400, "n", "several completions of an infill (`suffix`) are not offered here: use n 1, "
                         f"or POST {root}/infill with n_cmpl")
    if body.max_tokens == 0 and not body.echo:
        raise InputError(400, "max_tokens", "0 generates nothing: it is only for echo true (the prompt alone, with "
                         "its log probabilities when logprobs is set); ask for at least 1 token")
    if body.suffix is not None and body.echo:
        raise InputError(400, "echo", "an infill (`suffix`) is not echoed: drop echo or suffix")
    if body.suffix is not None and body.logprobs is not None:
        raise InputError(400, "logprobs", "log probabilities are not returned for infill (`suffix`): drop one of them")
    if body.suffix is not None and body.prompt_logprobs is not None:
        raise InputError(400, "prompt_logprobs", "prompt log probabilities are not returned for infill (`suffix`): "
                         "drop one of them")
    if body.suffix is not None and body.include_stop_str_in_output:
        raise InputError(400, "include_stop_str_in_output", "an infill (`suffix`) ends where its line and suffix "
                         "rules cut it, without the stop string: drop include_stop_str_in_output or suffix")
    if body.suffix is not None and grammar is not None:
        raise InputError(400, "response_format" if body.structured_outputs is None else body.structured_outputs.sent_field,
                         "structured output is not supported with `suffix` (infill): drop one of them")


async def start_infill(request: Request, client, settings, header, body: CompletionRequest) -> CompletionRun:
    """An infill's one choice started (the editor path, integrations/openai_infill.py), its context fit checked."""
    params = body.decode_params(body.max_tokens or settings.completion_default_max_tokens, settings.decode_defaults)
    job = await infill_job(client, candidates_id(client, header.id), body, params, settings.limits.context_length)
    prompt_ids = job.prompt.prompt_ids + (job.prompt.suffix_ids or [])
    fit_generation(settings.limits.context_length, len(prompt_ids), body.max_tokens or 1,
                   requested=body.max_tokens is not None)
    observer = RequestObserver.for_request(request, "completions", header.id, len(prompt_ids),
                                           usage_from_engine=True)  # the text is post-processed (CRLF, cuts)
    deltas = infill_deltas(client, job, header.id, body.stream, observer.on_first_token)
    streams = [await primed(observed(deltas, observer), observer)]
    return CompletionRun(streams, observer, echo_counts=[0], healed=[""], choice_prompts=[len(prompt_ids)])


async def start_completions(request: Request, client, settings, header, body: CompletionRequest,
                             grammar) -> CompletionRun:
    """n choices of every prompt started, each stream shaped as the request asks (prompt scores kept,
    stop string included, the client's text style, EOS listed, prompt echoed)."""
    prepared = await completion_requests(client, header.id, body, settings, grammar)
    observer = RequestObserver.for_request(request, "completions", header.id,
                                           sum(len(p.request.prompt_ids) for p in prepared),
                                           choices=len(prepared) * body.n)
    total = len(prepared) * body.n  # choice k * n + j: prompt k's choice j (OpenAI's order)
    if total > 1:  # (choices run as <id>.<i>: siblings of a running infill's candidates)
        check_id_free(client, header.id)
    reqs = [r for k, p in enumerate(prepared) for r in choice_requests(p.request, body.n, k * body.n, total)]
    # vLLM's prompt_logprobs: each prompt scored once, its choices share the list; but with echo and
    # logprobs every choice's stream opens with its prompt's scores, so each scores it
    scored_each = body.echo and body.logprobs is not None
    if body.returns_prompt_logprobs and not scored_each:
        reqs = scored_once(reqs, body.n)
    streams = await start_all(lambda r: start(client, r, observer), reqs)
    scores = [[] for _ in reqs] if body.returns_prompt_logprobs else None
    for i, p in enumerate(p for p in prepared for _ in range(body.n)):
        if scores is not None and (scored_each or i % body.n == 0):
            streams[i] = prompt_scores_kept(streams[i], scores[i])
        if body.include_stop_str_in_output:  # vLLM's: the stop string ends the text (the model's form, so
            # that a CRLF or tab-indented prompt's style applies to it as to the text: "\n" comes back "\r\n")
            streams[i] = stop_included(streams[i], p.request.stop)
        streams[i] = p.client_deltas(streams[i])  # healed whitespace dropped; a CRLF or tab-indented prompt's style
        if body.logprobs is not None:  # an EOS ending is listed last (OpenAI's legacy completions, vLLM)
            streams[i] = eos_listed(streams[i])
        if body.echo:  # the client's own text, or its token ids as text (special tokens shown)
            text = p.text if p.text is not None else client.tokenizer.decode(p.request.prompt_ids)
            streams[i] = echoed(streams[i], text, p.request.prompt_ids[0], body.logprobs is not None)
    echo_counts = [len(p.request.prompt_ids) if body.echo else 0 for p in prepared for _ in range(body.n)]
    healed = [p.request.healed for p in prepared for _ in range(body.n)]
    choice_prompts = [len(p.request.prompt_ids) for p in prepared for _ in range(body.n)]
    return CompletionRun(streams, observer, echo_counts, healed, choice_prompts, scores, scored_each)


async def completion_response(request: Request, client, header, body: CompletionRequest, run: CompletionRun):
    """The started run's response: server-sent events, or one JSON body (prompt log probabilities added
    to each choice when asked for)."""
    # one each: text offsets are per choice
    formatters = [logprob_formatter(client, body, k, h) for k, h in zip(run.echo_counts, run.healed)]
    if body.stream:
        usages = [ChoiceUsage(k, run.observer.usage_from_engine) if body.continuous_usage else None
                  for k in run.choice_prompts]
        events = merged([indexed(choice_chunks(d, functools.partial(completion_events, header, logprobs=f), u), i)
                         for i, (d, f, u) in enumerate(zip(run.streams, formatters, usages))])
        return sse(request, header, run.observer, events, "text_completion", body.include_usage)
    collected = await collect_all(run.streams, run.observer)
    choices = [(text, last, f.completion(entries) if f else None) for (text, last, entries), f in zip(collected, formatters)]
    body_json = shape.completion_body(header, choices, run.observer.prompt_tokens, run.observer.completion_tokens)
    if run.scores is not None:
        prompt_formatter = LogprobFormatter(client.tokenizer, body.prompt_logprobs)
        for i, choice in enumerate(body_json["choices"]):
            choice["prompt_logprobs"] = prompt_formatter.prompt_logprobs(
                run.scores[i if run.scored_each else i - i % body.n])
    return UTF8JSONResponse(body_json, headers=id_headers(request, header.id))
