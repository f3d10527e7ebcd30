"""POST /v1/messages and POST /v1/messages/count_tokens: Anthropic's Messages API on the chat path, as
llama.cpp's server and vLLM offer it (for the `anthropic` SDK, Claude Code and other agents). The
request maps onto a chat turn (integrations/anthropic_models.py); the turn runs as on
/v1/chat/completions (integrations/chat_run.py: template, tool calls, structured output); the answer is
a `message` whose `content` holds `text` blocks and one `tool_use` block per tool call, in the order
the model wrote them, with Anthropic's `stop_reason` (`end_turn`, `max_tokens`, `stop_sequence` with
the matched `stop_sequence`, `tool_use`) and `usage` (`input_tokens` not read from the prefix cache,
`cache_read_input_tokens`, `output_tokens`).

Streamed (`stream: true`), Anthropic's events, each `event: <type>` + `data: {...}`: message_start,
then per block content_block_start, content_block_delta (`text_delta`, or `input_json_delta` pieces of
a tool call's input as the model writes them where the tools grammar constrains the output, else one
with the whole input once the call has closed), content_block_stop; then message_delta (stop_reason, stop_sequence,
usage) and message_stop. A failure after the stream started is one `error` event
({"type": "error", "error": {"type", "message"}}). Errors before it are Anthropic's error object
({"type": "error", "error": {"type", "message"}}, the message starting with the field it names;
http_errors.anthropic_error_body) with the usual status codes; a full engine is 503 `overloaded_error`
with Retry-After, which the SDK retries. API keys may come as `x-api-key` (integrations/auth.py).
A message's id is its request id (openai_requests.request_id: X-Request-Id, the proxy's UUID behind
Ray Serve, else `msg-<hex>`); tool_use ids are `toolu_<hex>`.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import APIRouter, Request

from integrations.anthropic_models import CountTokensRequest, MessagesRequest, messages_field
from integrations.chat_run import ChatRun, chat_prompt, start_chat, turn_pieces
from integrations.context_fit import ContextLengthError
from integrations.http_errors import (APIError, anthropic_error_body, anthropic_overflow_message,
                                      anthropic_prompt_message)
from integrations.json_response import UTF8JSONResponse, read_number_float
from integrations.openai_calls import check_model, last_event, read_body
from integrations.openai_requests import id_headers
from integrations.openai_responses import refusion_detail
from integrations.openai_stream import sse_response
from integrations.request_limits import InputError, PromptCharsError
from integrations.tool_call_arguments import ArgumentsPiece, CallStart
from integrations.tool_calls import ToolCall, read_json
from scheduler.api import Delta, FinishReason

router = APIRouter()


@router.post("/v1/messages")
async def create_message(request: Request):
    """Anthropic's Messages API (module docstring); faults are 4xx before the response starts, naming the
    Messages field. Streamed or not, the message is built by the same events (MessageTurn.events)."""
    body = await read_body(request, MessagesRequest)
    if body.thread is not None:
        raise APIError(400, "thread: message threads (the server keeping the conversation) are not offered here; "
                       "send the whole conversation in `messages` without `thread`", param="thread",
                       details={"error_code": "thread_unsupported_request"})
    chat = body.chat_request()
    with _renamed_fields():
        run = await start_chat(request, chat, "msg", "messages")
    run.observer.field_names = messages_field  # (a grammar failing after the first delta: `checked`)
    turn = MessageTurn(body, run)
    if body.stream:
        return sse_response(turn.events(), run.observer, run.header.id, id_headers(request, run.header.id),
                            named=True, error_event=error_event)
    await last_event(turn.events(), run.observer)
    return UTF8JSONResponse(turn.message, headers=id_headers(request, run.header.id))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request):
    """{"input_tokens": N}: the prompt tokens the /v1/messages turn with these messages, system prompt,
    tools and tool_choice runs (template, tools, a forced call's opening: what its usage counts), as
    Anthropic's count_tokens answers. 400 naming the field as /v1/messages does (a schema is compiled
    only when a message is created)."""
    body = await read_body(request, CountTokensRequest)
    chat = body.chat_request()
    check_model(request, chat.model)
    with _renamed_fields():
        prompt = await chat_prompt(request.app.state.engine_client.tokenizer, request.app.state.settings.limits, chat)
    return {"input_tokens": len(prompt.ids)}


@contextlib.contextmanager
def _renamed_fields():
    """A chat-turn fault names the field the Messages request sent (anthropic_models.messages_field); a
    context overflow is worded as Anthropic words it, which Claude Code parses to shrink `max_tokens`
    and retry ("input length and `max_tokens` exceed context limit: P + M > C, ...") or to compact the
    conversation ("prompt is too long: ...", the character limit too)."""
    try:
        yield
    except ContextLengthError as exc:
        if exc.max_tokens is None and exc.longest_prompt is not None:  # (what the KV cache holds: why, after)
            message = f"{anthropic_prompt_message(exc.prompt_tokens, exc.longest_prompt)} ({exc.message})"
        elif exc.max_tokens is None:
            # (the largest prompt that leaves room for one token: "4096 tokens > 4096 maximum" read as false)
            message = anthropic_prompt_message(exc.prompt_tokens, exc.context_length - 1)
        else:  # (the limit is the KV cache's where it holds less beside this prompt: why, in parentheses)
            message = anthropic_overflow_message(exc.prompt_tokens, exc.max_tokens, exc.limit)
            message += f" ({exc.message})" if exc.limit < exc.context_length else ""
        raise APIError(400, message, param=messages_field(exc.field)) from None
    except PromptCharsError as exc:  # counted before tokenizing: characters, not tokens
        raise APIError(400, f"prompt is too long: {exc.chars} characters > {exc.limit} maximum (max_prompt_chars: the "
                       "rendered prompt, system and tools included, is checked before it is tokenized)",
                       param=messages_field(exc.field)) from None
    except InputError as exc:
        raise InputError(exc.status, messages_field(exc.field), exc.message) from None
    except APIError as exc:
        if exc.param is None:
            raise
        ours = messages_field(exc.param)
        raise APIError(exc.status, exc.message.replace(exc.param, ours, 1), exc.type, ours, exc.code,
                       exc.headers) from None


class MessageTurn:
    """One turn's events (module docstring); `message` is the whole message built so far (complete once
    the events have ended)."""

    def __init__(self, body: MessagesRequest, run: ChatRun):
        self.body, self.run = body, run
        self.message = {"id": run.header.id, "type": "message", "role": "assistant", "model": run.header.model,
                        "content": [], "stop_reason": None, "stop_sequence": None, "usage": {}}

    async def events(self) -> AsyncIterator[dict]:
        """The turn's events; closing them closes the engine stream (cancelling the request)."""
        deltas = self.run.streams[0]
        async with contextlib.aclosing(deltas):
            async for event in self._events(deltas):
                yield event

    async def _events(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[dict]:
        run, content = self.run, self.message["content"]
        num_calls, last, text_open = 0, None, False
        streamed, sending = None, False  # the streamed call now open (its id), and whether it is sent (max_calls)
        async for delta, pieces in turn_pieces(run, deltas):
            if last is None:  # the first delta says how much of the prompt the prefix cache held
                self.message["usage"] = {**self._usage(delta), "output_tokens": 0}
                yield {"type": "message_start", "message": {**self.message, "content": []}}
            last = delta
            for piece in pieces:
                if isinstance(piece, str):
                    if not piece:
                        continue
                    if not text_open:
                        content.append({"type": "text", "text": ""})
                        text_open = True
                        yield {"type": "content_block_start", "index": len(content) - 1,
                               "content_block": {"type": "text", "text": ""}}
                    content[-1]["text"] += piece
                    yield {"type": "content_block_delta", "index": len(content) - 1,
                           "delta": {"type": "text_delta", "text": piece}}
                    continue
                if isinstance(piece, CallStart):
                    streamed, sending = piece.id, run.max_calls is None or num_calls < run.max_calls
                    num_calls += sending
                elif not isinstance(piece, ArgumentsPiece) and piece.id != streamed:  # a call sent whole
                    sending = run.max_calls is None or num_calls < run.max_calls
                    num_calls += sending
                if not sending:
                    continue
                if text_open:
                    text_open = False
                    yield {"type": "content_block_stop", "index": len(content) - 1}
                for event in _tool_use_events(piece, content, streamed):
                    yield event
                if isinstance(piece, ToolCall):
                    streamed = None
        if last is None:
            raise APIError(500, "engine stream ended without a final delta", "server_error")
        if text_open:
            yield {"type": "content_block_stop", "index": len(content) - 1}
        stop_reason, stop_sequence = self._stop(last, num_calls)
        usage = self._usage(last)
        self.message.update(stop_reason=stop_reason, stop_sequence=stop_sequence, usage=usage,
                            refusion=refusion_detail(last))
        yield {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
               "usage": usage}
        yield {"type": "message_stop"}

    def _stop(self, last: Delta, num_calls: int) -> tuple[str, str | None]:
        """Anthropic's stop_reason and stop_sequence. A cut (max_tokens, or the max_time_ms extension) is
        max_tokens, calls or not, so a client never takes a truncated turn for a finished one."""
        if last.finish_reason in (FinishReason.LENGTH, FinishReason.DEADLINE):
            return "max_tokens", None
        word = (last.stats or {}).get("stop_word")
        if word is not None and word in (self.body.stop_sequences or []):
            return "stop_sequence", word
        return ("tool_use" if num_calls else "end_turn"), None

    def _usage(self, delta: Delta) -> dict:
        """Usage as of `delta` (the first delta and the last carry the prefix cache's share of the prompt)."""
        observer = self.run.observer
        cached = int((delta.stats or {}).get("cached_prompt_tokens") or 0)
        return {"input_tokens": observer.prompt_tokens - cached, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached, "output_tokens": observer.completion_tokens}


def _partial_input(partial_json: str) -> dict:
    """The object the start of a JSON object holds, as the anthropic SDK's stream accumulator reads the
    streamed partial_json (jiter, partial_mode=True: a string cut inside is left out, with its key), so a
    call cut short has the same input streamed or not; {} when it holds none."""
    import jiter

    try:
        value = (jiter.from_json(partial_json.encode(), partial_mode=True, float_mode="lossless-float")
                 if partial_json.strip() else {})
    except ValueError:
        return {}
    return _kept_numbers(value) if isinstance(value, dict) else {}


def _kept_numbers(value):
    """jiter's lossless floats as floats, or, past float64's range, as written (JSONNumber: the SDK reads
    the same partial_json; an Infinity here was a 500, helper-176)."""
    import jiter

    if isinstance(value, jiter.LosslessFloat):
        return read_number_float(bytes(value).decode())
    if isinstance(value, dict):
        return {k: _kept_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_kept_numbers(v) for v in value]
    return value


def error_event(error: APIError) -> dict:
    """The `error` event that ends a stream that failed after it started (Anthropic's form)."""
    return anthropic_error_body(error.status, error.type, error.message, error.details)


def _tool_use_events(piece: CallStart | ArgumentsPiece | ToolCall, content: list[dict],
                     streamed: str | None) -> list[dict]:
    """A tool call as a tool_use block, which joins `content`: a streamed call's (`streamed`: its id)
    content_block_start (CallStart), an input_json_delta per ArgumentsPiece, its stop (its ToolCall); a
    call sent whole, all three at once (its whole input in one input_json_delta). The block's input is
    the whole call's; a call cut short (max_tokens inside it: tool_calls.py) has the input its partial
    JSON holds so far, as the SDK's stream accumulator reads partial_json."""
    if isinstance(piece, ArgumentsPiece):
        return [_input_delta(len(content) - 1, piece.text)]
    whole, events = piece.id != streamed, []  # whole: a call sent whole (no CallStart came)
    if isinstance(piece, CallStart) or whole:
        content.append({"type": "tool_use", "id": "toolu_" + piece.id.removeprefix("call_"), "name": piece.name,
                        "input": {}})
        events.append({"type": "content_block_start", "index": len(content) - 1, "content_block": dict(content[-1])})
    if whole:
        events.append(_input_delta(len(content) - 1, piece.arguments))
    if isinstance(piece, ToolCall):
        content[-1]["input"] = read_json(piece.arguments) if piece.complete else _partial_input(piece.arguments)
        events.append({"type": "content_block_stop", "index": len(content) - 1})
    return events


def _input_delta(index: int, partial_json: str) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": partial_json}}
