"""A chat turn from a validated body to running engine requests, shared by /v1/chat/completions,
/v1/responses (integrations/responses_api.py) and /v1/messages (integrations/anthropic_api.py):
template, forced tool-call opening, grammar, context fit, `n` choices started (every fault answered
before the response starts).

    run = await start_chat(request, body, "chatcmpl", "chat")
    ... run.streams (one delta stream per choice), run.forced (text to put back before the model's) ...
    async for delta, pieces in turn_pieces(run, run.streams[0]): ...   # text and tool calls in order
    prompt = await chat_prompt(tokenizer, limits, body)                 # the prompt alone (token counts)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request

from decoding.grammar import GrammarSpec
from integrations.chat import chat_prompt_ids, conversation_key, forced_prefix_ids, render_chat
from integrations.context_fit import ContextLengthError
from integrations.http_metrics import RequestObserver
from integrations.openai_calls import check_model, start
from integrations.openai_choices import choice_requests, scored_once, start_all
from integrations.openai_models import ChatCompletionRequest
from integrations.openai_requests import check_id_free, generation_request, kv_bounded_request, request_id
from integrations.openai_responses import ResponseHeader
from integrations.request_limits import InputError, PromptCharsError, RequestLimits, encode, grammar_off_loop, off_loop
from integrations.structured_output import response_format_schema, tool_grammar, tools_or_format_grammar
from integrations.tool_call_stream import ToolCallStreamParser
from integrations.tool_calls import cut_short, forced_call
from scheduler.api import Delta


@dataclass
class ChatRun:
    """A started chat turn. forced: the text a forced tool call's turn starts with (the model did not
    write it; put it back before parsing); allowed: the tool names calls may use (None: tools off);
    max_calls: 1 with parallel_tool_calls false, else None; stream_arguments: the tools grammar
    constrains every call (not mode "refusion"), so a call's arguments stream as they are written
    (tool_call_stream.ToolCallStreamParser)."""

    client: object
    header: ResponseHeader
    observer: RequestObserver
    streams: list[AsyncIterator[Delta]]
    forced: str
    allowed: set[str] | None
    max_calls: int | None
    stream_arguments: bool = False


@dataclass
class ChatPrompt:
    """A chat turn's prompt. ids: its tokens, a forced call's opening included (what usage counts);
    extra_stop: the template's turn-end stop strings; forced: the text of that opening (the model did not
    write it); forced_tokens: its tokens at the end of `ids`."""

    ids: list[int]
    extra_stop: list[str]
    forced: str
    forced_tokens: int


async def chat_prompt(tokenizer, limits: RequestLimits, body: ChatCompletionRequest,
                      prompt_field: str = "messages", lead_field: str | None = None,
                      generation_prompt: bool = True) -> ChatPrompt:
    """The prompt `body` runs as (template, tools, forced tool-call opening), off the event loop (the
    model name is the caller's to check). generation_prompt False: the assistant's turn is not opened
    (/tokenize's and /apply-template's add_generation_prompt false; chat_prompt_ids). Raises InputError
    (400 naming the field, `prompt_field` for the conversation; `lead_field` for its first, system
    message when that is what is too long: the Responses API's `instructions`)."""
    try:
        limits.check_chars(prompt_field, "".join(m.content or "" for m in body.messages))
    except PromptCharsError as exc:
        rest = _after_lead(body, lead_field)
        if rest is not None and sum(len(m.content or "") for m in rest) <= limits.prompt_chars:
            raise PromptCharsError(lead_field, exc.chars, exc.limit, "with it the conversation is", LEAD_FIX) from None
        raise
    tools = body.tools if body.tools_enabled else None
    try:
        call = forced_call(body.forced_tool, [t.function.name for t in body.tools or []])
    except ValueError as exc:
        raise InputError(400, "tool_choice", str(exc)) from None
    if call is not None and not generation_prompt:
        raise InputError(400, "tool_choice", "a forced tool call opens the assistant's turn, which "
                         "add_generation_prompt false leaves out: set tool_choice to \"auto\" or \"none\", or drop "
                         "add_generation_prompt")
    try:
        prompt_ids, extra_stop = await off_loop(chat_prompt_ids, tokenizer, body.messages, tools, limits,
                                                body.continue_final_message, body.chat_template_kwargs,
                                                generation_prompt, chars=sum(len(m.content or "") for m in body.messages))
    except PromptCharsError as exc:  # the rendered prompt (tools included) over max_prompt_chars
        if tools and len(await _text_without_tools(tokenizer, body)) <= limits.prompt_chars:
            raise PromptCharsError("tools", exc.chars, exc.limit, "the tools' definitions (names, descriptions and "
                                   "parameter schemas as the chat template writes them) make the chat prompt",
                                   TOOLS_FIX) from None
        rest = _after_lead(body, lead_field)
        if rest is not None and len(await _text_of(tokenizer, body, rest, tools)) <= limits.prompt_chars:
            raise PromptCharsError(lead_field, exc.chars, exc.limit, "with it the chat prompt is", LEAD_FIX) from None
        raise PromptCharsError(prompt_field, exc.chars, exc.limit, "make a chat prompt (the messages as the chat "
                               "template writes them, tools included) of") from None
    except InputError as exc:
        raise InputError(exc.status, prompt_field, exc.message) if exc.field == "messages" else exc from None
    if body.continue_final_message and (body.tools_enabled or body.response_format is not None
                                        or body.structured_outputs is not None):
        # a grammar would have to start inside the prefilled text (refused wherever the prompt is built,
        # so token counts answer only what a generation would run)
        raise InputError(400, "continue_final_message", "cannot be combined with tools or a response format: drop "
                         "the tools (or set tool_choice to \"none\") and the format, or the prefill")
    forced, forced_ids = "", []
    if call is not None:  # the assistant's turn starts with the forced call's opening (tool_calls.forced_call)
        forced_ids, forced = forced_prefix_ids(tokenizer, *call)
    return ChatPrompt(prompt_ids + forced_ids, extra_stop, forced, len(forced_ids))


TOOLS_FIX = "offer fewer tools, or shorter descriptions and schemas"


LEAD_FIX = "shorten the instructions"


async def _text_without_tools(tokenizer, body: ChatCompletionRequest) -> str:
    """The chat prompt's text with no tools offered: what the conversation alone takes (for a 400 that
    names `tools` when their definitions are what makes the prompt too long)."""
    return await _text_of(tokenizer, body, body.messages, None)


async def _text_of(tokenizer, body: ChatCompletionRequest, messages: list, tools) -> str:
    """The chat prompt's text of `messages` (some of body's) with `tools`, off the event loop."""
    text, _ = await off_loop(render_chat, tokenizer, messages, tools, body.continue_final_message,
                             body.chat_template_kwargs)
    return text


def _after_lead(body: ChatCompletionRequest, lead_field: str | None) -> list | None:
    """The messages after the first, when `lead_field` names that first message (a system message the
    route made of a field of its own, as the Responses API's `instructions`) and some follow; else None."""
    if lead_field is None or len(body.messages) < 2 or body.messages[0].role != "system":
        return None
    return body.messages[1:]


async def _lead_overflow(tokenizer, body: ChatCompletionRequest, exc: ContextLengthError,
                         lead_field: str | None) -> ContextLengthError:
    """A prompt that leaves no room to generate (`exc`) named `lead_field` when the conversation without
    its first message leaves room: that message (the Responses API's `instructions`) is what to cut."""
    rest = _after_lead(body, lead_field)
    if rest is None:
        return exc
    tools = body.tools if body.tools_enabled else None
    bare = len(await off_loop(encode, tokenizer, await _text_of(tokenizer, body, rest, tools)))
    if bare >= exc.context_length:
        return exc
    return ContextLengthError(lead_field, f"takes {exc.prompt_tokens - bare:,} of the prompt's {exc.prompt_tokens:,} "
                              f"tokens; the model's maximum context length is {exc.context_length:,} tokens, "
                              f"leaving no room to generate: {LEAD_FIX}", exc.prompt_tokens, None, exc.context_length)


async def _tools_overflow(tokenizer, body: ChatCompletionRequest, exc: ContextLengthError) -> ContextLengthError:
    """A prompt that leaves no room to generate (`exc`) named `tools` when the conversation alone leaves
    room: the tools' definitions are what to cut (a 100-tool request was a 400 on `messages`)."""
    bare = len(await off_loop(encode, tokenizer, await _text_without_tools(tokenizer, body)))
    if bare >= exc.context_length:
        return exc
    return ContextLengthError("tools", f"the tools' definitions take {exc.prompt_tokens - bare:,} of the prompt's "
                              f"{exc.prompt_tokens:,} tokens; the model's maximum context length is "
                              f"{exc.context_length:,} tokens, leaving no room to generate: {TOOLS_FIX}",
                              exc.prompt_tokens, None, exc.context_length)


async def start_chat(request: Request, body: ChatCompletionRequest, id_prefix: str, endpoint: str,
                     prompt_field: str = "messages", lead_field: str | None = None) -> ChatRun:
    """Build the prompt and grammar of `body`, fit the context, start its `n` engine requests. Raises
    InputError / APIError (4xx naming the field, `prompt_field` for the conversation, `lead_field` for
    its first message where that is what is too long (chat_prompt); 503 when the engine is full)
    before any response."""
    client, settings = request.app.state.engine_client, request.app.state.settings
    check_model(request, body.model)
    settings.limits.check_sequences(1, body.n)
    prompt = await chat_prompt(client.tokenizer, settings.limits, body, prompt_field, lead_field)
    grammar = None
    if body.tools_enabled or body.response_format is not None or body.structured_outputs is not None:
        grammar = await grammar_off_loop(chat_grammar, body, prompt.forced_tokens)  # compiling can take a while
    header = ResponseHeader(id_prefix, client.model_name, request_id(request, id_prefix))
    # The template's turn-end stops (plain template: "\n### ") would cut text the grammar allows; with a
    # grammar that says what the whole output is, the grammar ends the turn (the client's own `stop`
    # strings still apply, as in vLLM); free text with tool calls (auto) keeps them
    # ignore_eos (vLLM's) ignores the turn's end too: the template's stop is this template's EOS
    turn_end = grammar is None or grammar.open_ended
    stops = body.stop + (prompt.extra_stop if turn_end and not body.ignore_eos else [])
    affinity = body.prompt_cache_key or conversation_key(body.messages)  # the serve router's replica key
    try:
        req = await kv_bounded_request(client, body, lambda fields: generation_request(
            header.id, fields, prompt.ids, stops, settings.default_max_tokens, settings, prompt_field,
            affinity_key=affinity, grammar=grammar), prompt_field)
    except ContextLengthError as exc:
        if exc.field != prompt_field or exc.max_tokens is not None:
            raise
        blamed = await _tools_overflow(client.tokenizer, body, exc) if body.tools_enabled else exc
        raise (await _lead_overflow(client.tokenizer, body, exc, lead_field) if blamed is exc else blamed) from None
    allowed = {t.function.name for t in body.tools} if body.tools_enabled else None
    max_calls = 1 if body.parallel_tool_calls is False else None  # OpenAI: at most one call
    observer = RequestObserver.for_request(request, endpoint, header.id, len(prompt.ids), choices=body.n)
    if endpoint == "chat":  # an engine 400 names the cap as the client sent it
        observer.cap_field = body.max_tokens_field
    if body.n > 1:  # (choices run as <id>.<i>: siblings of a running infill's candidates)
        check_id_free(client, header.id)
    reqs = scored_once(choice_requests(req, body.n), body.n)  # vLLM's prompt_logprobs: one list per response
    streams = await start_all(lambda r: start(client, r, observer), reqs)
    # with tools on, a grammar is always a tools grammar (chat_grammar); without one (mode "refusion") a
    # block may not parse, so it is held whole
    return ChatRun(client, header, observer, streams, prompt.forced, allowed, max_calls,
                   stream_arguments=allowed is not None and grammar is not None)


async def turn_pieces(run: ChatRun, deltas: AsyncIterator[Delta]) -> AsyncIterator[tuple[Delta, list]]:
    """Each delta of a turn with its output pieces in order: text (str) and, with tools on, a
    tool_calls.ToolCall once its block has closed, before it (run.stream_arguments) its CallStart and
    ArgumentsPieces; a forced call's opening (run.forced) goes before the model's first text. The event
    builders of /v1/responses and /v1/messages read the turn through it."""
    parser = ToolCallStreamParser(run.allowed, run.stream_arguments) if run.allowed is not None else None
    pending = run.forced
    async for delta in deltas:
        text, pending = pending + delta.text, ""
        pieces = [text] if parser is None else parser.feed(text)
        if delta.finished and parser is not None:
            pieces += parser.finish(cut_short(delta.finish_reason, (delta.stats or {}).get("stop_word")))
        yield delta, pieces


def chat_grammar(body: ChatCompletionRequest, prefill_tokens: int) -> GrammarSpec | None:
    """The grammar of a chat turn (integrations/structured_output.py): a forced tool call's (tool_choice
    "required" or named; response_format does not apply to a call), else with tools offered and
    tool_choice "auto" or unset, calls or an answer in response_format's JSON when it has one, else
    response_format's (or structured_outputs'), else text whose tool calls are valid. Mode "refusion"
    leaves tool_choice "auto" calls unconstrained (parsed from the text) and refuses response_format and
    a forced call; structured_outputs does not combine with a forced call. InputError (400) naming the
    field."""
    forced = body.forced_tool
    parallel = body.parallel_tool_calls is not False
    grammar = body.output_grammar()  # checked even when a forced call makes it moot: a bad one is a 400
    if body.tools_enabled and forced is not None:
        if body.mode == "refusion":  # it decoded unconstrained, and a call missing its arguments came back
            raise InputError(400, "mode", 'a forced tool call (tool_choice "required" or a named function) is '
                             'decoded under its grammar, which runs autoregressively: use mode "auto" or "ar"')
        if body.structured_outputs is not None:  # it was dropped silently: the output is the call
            raise InputError(400, body.structured_outputs.sent_field, 'does not apply to a forced tool call (tool_choice '
                             '"required" or a named function: the output is the call): drop one of them')
        return tool_grammar(body.tools, forced, prefill_tokens, parallel=parallel)
    if grammar is not None and body.tools_enabled:
        found = response_format_schema(body.response_format) if body.structured_outputs is None else None
        if found is None:  # vLLM's regex, choice or Lark formats do not combine with calls here
            sent = body.structured_outputs.sent_field
            raise InputError(400, sent, f'{sent} with tools and tool_choice "auto" is not '
                             'supported: use response_format (a JSON schema) to get a call or an answer in it, '
                             'set tool_choice "none" to answer in the format without calls, or drop the format')
        return tools_or_format_grammar(body.tools, *found, parallel=parallel)
    if grammar is None and body.tools_enabled and body.mode != "refusion":
        grammar = tool_grammar(body.tools, None, 0)
    return grammar


# ---------------------------------------------------------------------------------------------------
