"""From a validated OpenAI body to what the engine runs: the request id, prompt ids and the generation
that fits the model's context (integrations/context_fit.py). Everything here raises before a response
starts, so a streamed request's faults are HTTP errors, never a 200 stream that fails.

Request ids: Ray Serve's proxy gives every HTTP request an `x-request-id` (the client's own when it sends
one, else a new UUID) and always returns it as the `X-Request-Id` response header. That id is used as
ours: the body's `id`, the request log's `request_id` and the engine request's id are the same value,
and the header is added here only where no proxy set one (the app served on its own), so a response
carries exactly one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

from fastapi import Request
from starlette.requests import HTTPConnection

from decoding.grammar import GrammarSpec
from integrations.context_fit import ContextLengthError, fit_generation, over_context, over_lead
from integrations.editor.document import DocumentStyle, cursor_at_indent
from integrations.http_errors import APIError, engine_message
from integrations.openai_sampling import SamplingFields
from integrations.openai_responses import new_id
from integrations.openai_stream import in_document_style
from integrations.request_id_guard import REFUSAL, given_request_id, refused_request_id
from integrations.request_limits import InputError, client_key, encode, off_loop
from scheduler.api import Delta, GenerationRequest, InvalidRequestError, Mode
from scheduler.request_ids import in_flight_message

REQUEST_ID_HEADER = "x-request-id"


def request_id(request: HTTPConnection, prefix: str) -> str:
    """The request's (or WebSocket handshake's) id: its x-request-id header (Ray Serve's proxy always
    sets one), else (none, or an empty one) a new `{prefix}-<hex>`. Raises APIError(400, param
    "X-Request-Id") for a header that is malformed (integrations/request_id_guard.py: it goes into logs
    and the engine)."""
    headers = request.scope.get("headers") or []
    if refused_request_id(headers):
        raise APIError(400, REFUSAL, param="X-Request-Id")
    return given_request_id(headers) or new_id(prefix)


def candidates_id(client, rid: str) -> str:
    """The prefix of an infill's candidate engine ids (`<rid>.<6 random hex>`, each candidate adding
    `-g<gap>`), for /infill and completions with `suffix`. The random part keeps them apart from every
    id a client may send: `<rid>-g64` would be refused as in flight while `rid` runs, and a client that
    reuses its id at once never meets its last request's candidates still being cancelled. `rid` itself
    must not overlap an id in flight (the candidates' ids cannot show it): InvalidRequestError on
    `request_id`, which the routes name X-Request-Id."""
    check_id_free(client, rid)
    return f"{rid}.{uuid.uuid4().hex[:6]}"


def check_id_free(client, rid: str) -> None:
    """InvalidRequestError on `request_id` (the routes name X-Request-Id) when the client id `rid` overlaps
    an id in flight. For routes whose engine ids are derived from it (an infill's candidates
    `<rid>.<hex>-g<gap>`, a request's choices `<rid>.<i>`): those are siblings of another request's
    derived ids, which never overlap (scheduler/request_ids.py), so the engine cannot see the clash."""
    if (running := client.in_flight(rid)) is not None:
        raise InvalidRequestError("request_id", in_flight_message(rid, running))


def id_headers(request: Request, rid: str) -> dict:
    """Response headers that carry the id: none when the request came with one (the proxy returns it)."""
    return {} if request.headers.get(REQUEST_ID_HEADER) else {"X-Request-Id": rid}


async def prompt_ids(tokenizer, prompt: str | list[int], field: str = "prompt") -> list[int]:
    """Token ids of a completions prompt: text (already checked against max_prompt_chars by the
    caller, as the client sent it) is tokenized off the event loop. Raises APIError(400, field)."""
    if isinstance(prompt, str):
        ids = await off_loop(encode, tokenizer, prompt, chars=len(prompt))
    else:
        ids, vocab = list(prompt), len(tokenizer)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"{field}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param=field)
    if not ids:
        raise APIError(400, f"{field}: must not be empty", param=field)
    return ids


@dataclass
class PreparedPrompt:
    """One prompt of a completions request: its engine request (with the trailing spaces/tabs token
    healing left out of the prompt: `request.healed`, completion_requests), the style its text comes
    back in, the client's text (None for token ids) and stop strings."""

    request: GenerationRequest
    style: DocumentStyle
    text: str | None
    stops: list[str]  # the client's stop strings (request.stop holds them in the model's form)

    def client_deltas(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """The engine's deltas (the healed whitespace already dropped by the engine) with their text as
        the client reads it after its own prompt: in the prompt's line-ending and indentation style,
        and the matched stop string (stats["stop_word"]) the client's own."""
        if self.style != DocumentStyle():
            deltas = in_document_style(deltas, self.style, cursor_at_indent(self.text), self.stops)
        return deltas


async def completion_requests(client, rid: str, body, settings, grammar: GrammarSpec | None,
                              default_max_tokens: int | None = None) -> list[PreparedPrompt]:
    """The engine request of each prompt of a /v1/completions body (openai_models.CompletionRequest;
    one, or a batch). A CRLF or tab-indented prompt is completed as its LF, space-indented twin and its
    text comes back in the prompt's style (editor/document.py), as on the infill path; a grammar's
    output is never restyled. Faults name the prompt (`prompt`, or `prompt.K` in a batch) or the field;
    a batch's cap is fitted to its longest prompt first (kv_bounded_request, check_fit), so that one 400
    names a number every prompt takes, and none of them starts before it.
    default_max_tokens: for an unset max_tokens (shrunk to the room left); default the settings' 16.

    Token healing, as on the infill path (editor/infill.py): byte-level BPE puts a word's leading space
    in the word's token ("\n   " + " return"), so a text prompt ending in spaces or tabs (a cursor in
    the indentation, or after "x = ") ends on a token the model never saw followed by text, and the
    model answers with nothing or with one space too many. That whitespace is left out of the prompt
    and the engine drops as much of it from the front of the generated text, before stop strings are
    matched (GenerationRequest.healed).
    Not for token-id prompts, `echo`, `prompt_logprobs` or a grammar: there the tokens are exactly the
    ones the client asked for or scores. A prompt that is scored (`prompt_logprobs`, or `echo` with
    `logprobs`) is read as sent, neither restyled nor healed: its scores are those of the client's text,
    as vLLM's. `logprobs` alone changes neither (log probabilities report, they never change a token)."""
    batch = len(body.prompts) > 1
    scored = body.prompt_logprobs is not None or (body.echo and body.logprobs is not None)
    tokenized = []
    for k, prompt in enumerate(body.prompts):
        field = f"prompt.{k}" if batch else "prompt"
        text = prompt if isinstance(prompt, str) else None
        if text is not None:
            settings.limits.check_chars(field, text)  # the client's text, before tabs become spaces
        style = DocumentStyle.of(text) if text is not None and grammar is None and not scored else DocumentStyle()
        model_text = text if text is None or scored else style.to_model(text)
        healed = ""
        if model_text is not None and grammar is None and not body.echo and body.prompt_logprobs is None:
            kept = model_text.rstrip(" \t")
            model_text, healed = (kept, model_text[len(kept):]) if kept else (model_text, "")
        ids = await prompt_ids(client.tokenizer, model_text if model_text is not None else prompt, field)
        tokenized.append((field, text, style, healed, ids))
    # the longest prompt first: the context and the KV cache leave it the least room, so the number a
    # 400 gives is one every prompt of the batch takes (and it is checked before any prompt starts)
    order = sorted(range(len(tokenized)), key=lambda k: -len(tokenized[k][4]))
    prepared: list[PreparedPrompt | None] = [None] * len(tokenized)
    for k in order:
        field, text, style, healed, ids = tokenized[k]

        def build(fields, ids=ids, style=style, field=field):
            return generation_request(rid, fields, ids, style.model_stops(body.stop),
                                      default_max_tokens or settings.completion_default_max_tokens, settings, field,
                                      grammar=grammar)

        req = await kv_bounded_request(client, body, build, field, check_fit=batch and k == order[0])
        tabs = style.engine_fields(at_indent=style.tabs and cursor_at_indent(text))
        prepared[k] = PreparedPrompt(replace(req, healed=healed, **tabs), style, text, list(body.stop))
    return prepared


async def _kv_longest(client, over: ContextLengthError) -> ContextLengthError:
    """`over` (a prompt over the context) naming the longest prompt the engine's KV cache holds where that is
    shorter than the context's (ContextLengthError.longest_prompt), so that the prompt the client shortens
    to is served: the Messages route's "prompt is too long: P tokens > M maximum" gave the context's M,
    which the KV cache then refused again with its own (helper-223). Asked of the engine's admission check
    (a prompt of the context's longest, one token, no forward); `over` as it is when the check admits it,
    or the engine is busy, gone or scaled to zero (the check would start a replica)."""
    longest = over.context_length - 1
    if longest < 1 or await client.scaled_to_zero():
        return over
    probe = GenerationRequest(f"kv-longest-{uuid.uuid4().hex}", [0] * longest, {}, max_tokens=1, default_shape=True,
                              admission_check=True, internal=True)
    try:
        async for _ in client.stream(probe):
            pass
    except InvalidRequestError as refusal:
        if refusal.field == "prompt_ids" and refusal.most is not None and refusal.most < longest:
            return ContextLengthError(over.field, f"{over.message}; the engine's KV cache holds at most "
                                      f"{refusal.most:,} prompt tokens beside one generated token (the runner's "
                                      "num_blocks or kv_memory_bytes)", over.prompt_tokens, None,
                                      over.context_length, longest_prompt=refusal.most)
    except Exception:  # noqa: BLE001 - the engine busy, draining or gone: the context's 400 stands
        pass
    return over


def _check_stop_token_ids(body: SamplingFields, ends: list[int]) -> None:
    """vLLM's stop_token_ids: here the model's end tokens (`ends`: EOS and the others the model names,
    workers.tokenizer.end_token_ids) are the stop tokens, so a list naming only them (what clients that spell
    out the model's stop tokens send: a Qwen3 chat model's two) is taken as is; another id, or an end token
    with ignore_eos, is a 400."""
    ids = getattr(body, "stop_token_ids", None) or []
    other = [t for t in ids if t not in ends]
    named = ", ".join(str(t) for t in ends)
    if other:
        raise InputError(400, "stop_token_ids", f"token {other[0]} cannot stop the text here: only the model's end "
                         f"tokens ({named}) do; use `stop` strings, or drop stop_token_ids")
    if ids and body.ignore_eos:
        raise InputError(400, "stop_token_ids", f"names the model's end token {ids[0]}, which ignore_eos: true "
                         "ignores; drop one of them")


def generation_request(rid: str, body: SamplingFields, prompt: list[int], stop: list[str], default_max_tokens: int,
                       settings, prompt_field: str, affinity_key: str | None = None,
                       grammar: GrammarSpec | None = None) -> GenerationRequest:
    """The engine request, its generation fitted to the context counting the rounding to whole slots
    (context_fit.fit_generation; InputError names prompt_field, the body's max_tokens field or
    slot_size). `settings`: openai_api.APISettings; the engine stops at max_tokens = the fitted gen_length."""
    defaults = settings.decode_defaults
    _check_stop_token_ids(body, [defaults.get("eos_token_id"), *defaults.get("end_token_ids", ())])
    echo_only = getattr(body, "echo_only", False)  # the engine scores the prompt and stops: room for 1 token kept
    wanted = 1 if echo_only else body.max_tokens or default_max_tokens
    fit = fit_generation(settings.limits.context_length, len(prompt), wanted,
                         requested=body.max_tokens is not None, slot_size=body.slot_size_in_force(settings.decode_defaults),
                         slot_requested=body.slot_size is not None, blocks=body.serial_num_blocks,
                         prompt_field=prompt_field,
                         max_tokens_field=body.max_tokens_field)
    most = 0 if echo_only else fit.gen_length
    if body.min_tokens > most:  # vLLM's rule: min_tokens <= max_tokens
        raise InputError(400, "min_tokens", f"is {body.min_tokens}, above the {most} tokens this request generates "
                         f"at most ({body.max_tokens_field} and the context): lower min_tokens")
    return GenerationRequest(
        request_id=rid, prompt_ids=prompt,
        params=body.decode_params(fit.gen_length, settings.decode_defaults, fit.slot_size,
                                  room=(settings.limits.context_length - len(prompt)) if settings.limits.context_length else None),
        mode=body.engine_mode, priority=body.engine_priority, stop=list(stop), max_time_ms=body.max_time_ms,
        max_tokens=0 if echo_only else fit.gen_length, affinity_key=affinity_key, grammar=grammar,
        client=client_key(getattr(body, "safety_identifier", None) or body.user),
        fit_to_kv=body.max_tokens is None and not echo_only,  # the default shrinks to the KV cache too
        default_shape=body.slot_size is None and body.serial_num_blocks is None,
    )


async def kv_bounded_request(client, body: SamplingFields, build: Callable[[SamplingFields], GenerationRequest],
                             prompt_field: str = "prompt", check_fit: bool = False) -> GenerationRequest:
    """build(body): the engine request (generation_request). A client's cap over the context is refused
    naming the most the engine takes: the request at the context's most is put to the engine's
    admission check (GenerationRequest.admission_check, the KV count admission makes: Scheduler.fitted),
    and where the KV cache holds fewer beside this prompt the 400 names that (the context's number
    followed was refused again, by the KV cache). The check counts from one token, not min_tokens (a
    min_tokens over that number is named in the same 400); where not even one token fits beside the
    prompt, the 400 names `prompt_field` (shorten the prompt), not the cap. check_fit: put a request
    within the context to the check too (a batch's longest prompt, completion_requests), so that its
    refusal comes before any prompt of the batch starts. Any other answer of the check (admitted, the
    engine busy or gone) leaves the context's 400 as it is: the check only sharpens the number. Nor is
    it asked while the engine autoscales at zero replicas (client.scaled_to_zero): the check would start
    one, and the 400 would wait for its cold start."""
    over = None
    try:
        req = build(body)
    except ContextLengthError as exc:
        if exc.max_tokens is None:  # the prompt alone is over the context: the KV cache may hold a shorter one
            raise await _kv_longest(client, exc) from None
        if exc.most is None:
            raise
        over = exc
    if over is None and not check_fit:
        return req
    if over is not None and body.min_tokens > over.most:  # (named with the cap, not in a second 400)
        over = over_context(over.field, over.context_length, over.prompt_tokens, over.max_tokens, over.most,
                            min_tokens=body.min_tokens)
    if await client.scaled_to_zero():
        if over is not None:
            raise over
        return req
    try:  # (the retry the context's 400 asks for, counted from one token)
        check = req if over is None else build(body.model_copy(update={"max_tokens": over.most, "min_tokens": 0}))
    except InputError:
        raise over from None
    # The engine runs a grammar's request, or one with min_tokens (an AR-only parameter, which the check
    # leaves out), AR (Engine._ar_only): the check counts the KV cache as AR too, without compiling
    if (check.grammar is not None or body.min_tokens) and check.mode is not Mode.REFUSION:
        check = replace(check, grammar=None, mode=Mode.AR)
    try:
        async for _ in client.stream(replace(check, admission_check=True, internal=True)):
            pass
    except InvalidRequestError as refusal:
        if over is None and refusal.field in ("gen_length", "prompt_ids"):  # (a batch's longest prompt within
            # the context: the engine's KV refusal, in the route's fields; any other is the submission's to say)
            field = body.max_tokens_field if refusal.field == "gen_length" else prompt_field
            raise InputError(400, field, engine_message(refusal, cap_field=body.max_tokens_field)) from None
        if refusal.field == "prompt_ids":
            raise ContextLengthError(prompt_field, f"the prompt ({over.prompt_tokens:,} tokens) leaves no room to "
                                     "generate in the engine's KV cache, which holds less than the model's maximum "
                                     f"context length of {over.context_length:,} tokens (the runner's num_blocks or "
                                     "kv_memory_bytes): shorten the prompt", over.prompt_tokens, None,
                                     over.context_length, longest_prompt=refusal.most) from None
        if refusal.field == "gen_length" and refusal.most is not None:
            raise over_context(over.field, over.context_length, over.prompt_tokens, over.max_tokens, over.most,
                               refusal.most, body.min_tokens) from None
        if refusal.field == "gen_length":  # (a client's shape whose steps do not fit: the engine says which do)
            lead = over_lead(over.field, over.context_length, over.prompt_tokens, over.max_tokens)
            raise InputError(400, over.field, f"{lead}, and at the context's {over.most:,} the engine's KV cache "
                             f"refuses it too: {engine_message(refusal, cap_field=over.field)}") from None
    except Exception:  # noqa: BLE001 - the engine busy, draining or gone: the context's 400 stands
        pass
    if over is not None:
        raise over
    return req
