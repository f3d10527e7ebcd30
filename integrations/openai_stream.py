"""Server-sent event streams of OpenAI chunks: one JSON chunk per `data:` line, then `data: [DONE]`.

An error after the stream has started (the status line is already sent) becomes one
`data: {"error": {...}}` line before `[DONE]`: typed engine errors as their HTTP mapping (a replica that
died mid-stream: 503-style `engine_unavailable`), anything else as a 500-style error naming no internals
(logged here). Only a client that went away gets no ending: there is no one left to read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import AsyncIterator, Callable, Collection

from fastapi.responses import StreamingResponse

from integrations import openai_responses as shape
from integrations.editor.document import DocumentStyle, DocumentTextStream
from integrations.http_errors import APIError, from_engine_error
from integrations.http_metrics import RequestObserver
from integrations.json_response import utf8_json
from integrations.openai_logprobs import LogprobFormatter
from integrations.tool_call_arguments import ArgumentsPiece, CallStart
from integrations.tool_call_stream import ToolCallStreamParser
from integrations.tool_calls import cut_short
from scheduler.api import Delta, EngineError
from workers.batch import TokenLogprob

log = logging.getLogger(__name__)


def sse_response(events: AsyncIterator[dict], observer: RequestObserver, request_id: str,
                 headers: dict | None = None, *, named: bool = False,
                 error_event: Callable[[APIError], dict] | None = None) -> StreamingResponse:
    """The event stream as SSE; `headers` are added to the response's (openai_requests.id_headers).
    named: each event also gets an `event: <its "type">` line and no `[DONE]` ends the stream (the
    Responses API's form); error_event: the event an error after the start becomes (default
    {"error": {...}}, the chat and completions form)."""

    def line(event: dict) -> bytes:
        name = f"event: {event['type']}\n" if named else ""
        return f"{name}data: ".encode() + utf8_json(event) + b"\n\n"

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield line(event)
            observer.finish(200)
        except (asyncio.CancelledError, GeneratorExit):
            observer.finish(499, error="client disconnected")
            raise
        except Exception as exc:  # noqa: BLE001 - the 200 is out: the client must see why its stream ended
            if not isinstance(exc, (APIError, EngineError)):
                log.exception("stream %s failed", request_id)
            error = exc if isinstance(exc, APIError) else from_engine_error(exc, observer.endpoint, observer.cap_field)
            observer.finish(200, error=error.message)  # the status that went out; the error says how it ended
            yield line(error_event(error) if error_event is not None else {"error": error.body()})
        finally:
            await events.aclose()
        if not named:
            yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})


async def null_usage_until_final(events: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """stream_options.include_usage: every chunk carries "usage": null until the final usage chunk, as
    OpenAI documents for its chunk objects ("When present, it contains a null value except for the last
    chunk which contains the token usage statistics for the entire request"). A chunk that already
    carries its usage (ChoiceUsage, vLLM's continuous_usage_stats) keeps it."""
    try:
        async for event in events:
            yield event if "usage" in event else {**event, "usage": None}
    finally:
        await events.aclose()


class ChoiceUsage:
    """vLLM's stream_options.continuous_usage_stats for one choice: each of its chunks carries the usage
    of its own prompt and of the tokens this choice has generated up to that chunk (0 on a chat's role
    chunk), as vLLM's serving code reports it per choice; the final usage chunk sums the whole request.
    Wrap the choice's deltas with `counted`, and the chunks built from them with `stamped`."""

    def __init__(self, prompt_tokens: int, from_engine: bool = False):
        """from_engine: the final count is the engine's (RequestObserver's usage_from_engine: an infill)."""
        self.prompt_tokens, self.tokens, self.from_engine = prompt_tokens, 0, from_engine

    async def counted(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                self.tokens += len(delta.token_ids)
                if delta.finished and self.from_engine and "generated_tokens" in delta.stats:
                    self.tokens = int(delta.stats["generated_tokens"])
                yield delta

    async def stamped(self, events: AsyncIterator[dict]) -> AsyncIterator[dict]:
        async with contextlib.aclosing(events):
            async for event in events:
                yield {**event, "usage": shape.usage(self.prompt_tokens, self.tokens)}


def choice_chunks(deltas: AsyncIterator[Delta], build: Callable[[AsyncIterator[Delta]], AsyncIterator[dict]],
                  usage: ChoiceUsage | None) -> AsyncIterator[dict]:
    """One choice's chunks, `build(deltas)`; with `usage` (continuous_usage_stats), each carries it."""
    return build(deltas) if usage is None else usage.stamped(build(usage.counted(deltas)))


async def completion_events(header, deltas, logprobs: LogprobFormatter | None = None) -> AsyncIterator[dict]:
    """Completion chunks of one choice (index 0); with `logprobs`, each chunk carries its tokens'
    (integrations/openai_logprobs.py)."""
    async with contextlib.aclosing(deltas):  # closing the events (client gone) cancels the request
        async for delta in deltas:
            finish = shape.openai_finish_reason(delta) if delta.finished else None
            if delta.text or delta.token_ids or finish:  # tokens that decode to "" still show progress
                entries = logprobs.completion(delta.logprobs) if logprobs is not None and delta.logprobs else None
                chunk = shape.completion_chunk(header, delta.text, finish, entries)
                yield {**chunk, "refusion": shape.refusion_detail(delta)} if finish else chunk


async def usage_at_end(events: AsyncIterator[dict], header, obj: str, observer: RequestObserver) -> AsyncIterator[dict]:
    """stream_options.include_usage: the events, then one usage chunk for the whole request (every choice)."""
    async with contextlib.aclosing(events):
        async for event in events:
            yield event
    yield shape.usage_chunk(header, obj, observer.prompt_tokens, observer.completion_tokens)


async def chat_events(header, deltas, allowed_tools: set[str] | None, prefix: str = "", max_calls: int | None = None,
                      logprobs: LogprobFormatter | None = None, client_stops: Collection[str] = (),
                      stream_arguments: bool = False) -> AsyncIterator[dict]:
    """Chat chunks of one choice (index 0): role, content pieces and tool calls, finish. A tool call is
    sent whole once its block closes, or, with stream_arguments (the tools grammar constrains the
    output: chat_run.ChatRun), as OpenAI streams one: a chunk with its index, id, type, name and
    arguments "", then chunks of arguments pieces (tool_call_stream.ToolCallStreamParser).
    prefix: text the turn starts with that the model did not write (a forced call's opening,
    tool_calls.forced_call), parsed as if it had. max_calls: calls past it are dropped
    (parallel_tool_calls false: 1, as vLLM keeps only the first). logprobs: the tokens' log
    probabilities ride on the next chunk sent (text a tool-call block holds back carries them on later).
    client_stops: the request's `stop` strings (openai_responses.chat_finish_reason)."""
    parser = ToolCallStreamParser(allowed_tools, stream_arguments) if allowed_tools is not None else None
    num_calls, pending, entries = 0, prefix, []
    streamed, sending = None, False  # the streamed call now open (its id), and whether it is sent (max_calls)
    async with contextlib.aclosing(deltas):  # closing the events (client gone) cancels the request
        yield shape.chat_chunk(header, {"role": "assistant", "content": ""})
        async for delta in deltas:
            text, pending = pending + delta.text, ""
            entries += delta.logprobs or []
            pieces = [text] if parser is None else parser.feed(text)
            if delta.finished and parser is not None:
                pieces += parser.finish(cut_short(delta.finish_reason, (delta.stats or {}).get("stop_word")))
            chunks, last_is_text = [], False
            for piece in pieces:
                content = logprobs.chat(entries) if logprobs is not None and entries else None
                if isinstance(piece, str):
                    if piece:
                        chunks.append(shape.chat_chunk(header, {"content": piece}, logprobs=content))
                        entries, last_is_text = [], True
                elif isinstance(piece, CallStart):
                    streamed, sending = piece.id, max_calls is None or num_calls < max_calls
                    if sending:
                        start = shape.chat_tool_call_start(piece.id, piece.name, num_calls)
                        chunks.append(shape.chat_chunk(header, start, logprobs=content))
                        entries, last_is_text = [], False
                elif isinstance(piece, ArgumentsPiece):
                    if sending:
                        arguments = shape.chat_tool_call_arguments(piece.text, num_calls)
                        chunks.append(shape.chat_chunk(header, arguments, logprobs=content))
                        entries, last_is_text = [], False
                elif piece.id == streamed:  # the end of a streamed call: its pieces went out
                    num_calls, streamed, sending = num_calls + sending, None, False
                elif max_calls is None or num_calls < max_calls:
                    chunks.append(shape.chat_chunk(header, shape.chat_tool_call_delta(piece, num_calls), logprobs=content))
                    num_calls, entries, last_is_text = num_calls + 1, [], False
            if delta.finished:
                finish = shape.chat_finish_reason(delta, num_calls, client_stops)
                content = logprobs.chat(entries) if logprobs is not None and entries else None
                if last_is_text and content is None:  # the last text and the finish share a chunk (as vLLM)
                    chunks[-1]["choices"][0]["finish_reason"] = finish
                    chunks[-1]["refusion"] = shape.refusion_detail(delta)
                else:
                    chunks.append({**shape.chat_chunk(header, {}, finish, content), "refusion": shape.refusion_detail(delta)})
            for chunk in chunks:
                yield chunk


async def echoed(deltas: AsyncIterator[Delta], prompt_text: str, first_token: int,
                 with_logprobs: bool) -> AsyncIterator[Delta]:
    """The deltas of one choice with its prompt echoed (OpenAI's legacy completions `echo`, as vLLM):
    `prompt_text` before the first delta's text; with_logprobs, the prompt tokens' entries before that
    delta's own: the first token's with logprob None (nothing precedes it, OpenAI's null), then the
    engine's scores of the others (Delta.prompt_logprobs, which the first delta carries). The token ids
    and so the usage stay the generated ones. Closing this closes `deltas`."""
    first = True
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            text, entries = delta.text, delta.logprobs
            if first:
                text, first = prompt_text + text, False
            if with_logprobs and delta.prompt_logprobs is not None:
                entries = [TokenLogprob(first_token, None, ())] + delta.prompt_logprobs + (entries or [])
            yield dataclasses.replace(delta, text=text, logprobs=entries)


async def prompt_scores_kept(deltas: AsyncIterator[Delta], into: list) -> AsyncIterator[Delta]:
    """The deltas, unchanged; the engine's scores of the prompt (Delta.prompt_logprobs, which one delta
    carries) are added to `into` as they pass (vLLM's `prompt_logprobs`). Closing this closes `deltas`."""
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            if delta.prompt_logprobs is not None:
                into += delta.prompt_logprobs
            yield delta


async def eos_listed(deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """The deltas with the log probability of the EOS the text ended on (Delta.eos_logprob) as the last
    delta's last logprobs entry: OpenAI's legacy completions list the end-of-text token (its text is not
    returned), as vLLM's do, and lm-evaluation-harness reads the generated token as the last entry of an
    echoed prompt's. Token ids and usage stay the returned tokens. Closing this closes `deltas`."""
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            if delta.eos_logprob is not None:
                delta = dataclasses.replace(delta, logprobs=(delta.logprobs or []) + [delta.eos_logprob])
            yield delta


async def stop_included(deltas: AsyncIterator[Delta], stops: Collection[str]) -> AsyncIterator[Delta]:
    """vLLM's `include_stop_str_in_output`: the deltas with the `stop` string that ended the text
    (stats["stop_word"]) appended to the last delta's text, so the text runs through the stop string's end
    (on completions before in_document_style, in the model's form, so a CRLF prompt's "\n" stop comes
    back as the "\r\n" its text has there). Only the client's own `stops` are returned: the chat
    template's turn end, an engine stop, is not. Token ids, log probabilities and usage are unchanged:
    the stop string's tokens are already in them (they were generated). Closing this closes `deltas`."""
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            word = (delta.stats or {}).get("stop_word") if delta.finished else None
            if word is not None and word in stops:
                delta = dataclasses.replace(delta, text=delta.text + word)
            yield delta


async def in_document_style(deltas: AsyncIterator[Delta], style: DocumentStyle, at_indent: bool,
                            stops: list[str] = ()) -> AsyncIterator[Delta]:
    """The deltas with their text (model text: LF, spaces) in the prompt's style: CRLF line breaks
    and tab indentation when the prompt has them (issue 14, items 5 and 6; editor/document.py).
    Indentation still open at a piece's end is sent with the next piece. The stop string the engine
    reports (stats["stop_word"], in the model's form) becomes the client's own of `stops` (llama.cpp's
    stopping_word). Closing this closes `deltas`."""
    stream = DocumentTextStream(style, at_indent=at_indent)
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            text = stream.feed(delta.text) + (stream.finish() if delta.finished else "")
            if delta.stats and delta.stats.get("stop_word"):
                delta = dataclasses.replace(delta, stats={**delta.stats, "stop_word": style.client_stop(
                    list(stops), delta.stats["stop_word"])})
            yield dataclasses.replace(delta, text=text)
