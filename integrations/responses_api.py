"""POST /v1/responses: OpenAI's Responses API on the chat path (what agents such as the OpenAI Agents SDK
and Codex speak). The request maps onto a chat turn (integrations/responses_models.py); the turn runs as
on /v1/chat/completions (integrations/chat_run.py: template, tool calls, structured outputs, `n` 1);
the answer is a `response` object whose `output` holds a `message` item with the text (`output_text`)
and one `function_call` item per tool call, in the order the model wrote them.

Streamed (`stream: true`), the events OpenAI documents, each `event: <type>` + `data: {...}` with a
`sequence_number`: response.created, response.in_progress, then per output item
response.output_item.added, (text) response.content_part.added, response.output_text.delta...,
response.output_text.done, response.content_part.done, (call) response.function_call_arguments.delta
(pieces as the model writes the arguments where the tools grammar constrains the output, else the
whole arguments once the call has closed; never an empty one) and .done, response.output_item.done; finally response.completed, or response.incomplete when
max_output_tokens (or max_time_ms) cut the turn, or a stop string cut a function call. A failure after the stream started is one `error`
event ({"type": "error", "code", "message", "param"}). No `[DONE]` line (OpenAI sends none here).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from typing import AsyncIterator, Iterator

from fastapi import APIRouter, Request

from integrations.chat_run import ChatRun, start_chat, turn_pieces
from integrations.http_errors import APIError
from integrations.json_response import UTF8JSONResponse
from integrations.openai_calls import last_event, logprob_formatter, read_body
from integrations.openai_logprobs import LogprobFormatter
from integrations.openai_requests import id_headers
from integrations.openai_responses import refusion_detail
from integrations.openai_stream import sse_response
from integrations.request_limits import InputError
from integrations.responses_models import ResponsesRequest, responses_field
from integrations.tool_call_arguments import ArgumentsPiece, CallStart
from integrations.tool_calls import ToolCall
from scheduler.api import Delta, FinishReason

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request):
    """OpenAI's Responses API (module docstring); faults are 4xx before the response starts, naming the
    Responses field. Streamed or not, the output is built by the same events (response_events), so both
    give the same items in the same order."""
    body = await read_body(request, ResponsesRequest)
    chat = body.chat_request()
    try:
        run = await start_chat(request, chat, "resp", "responses", prompt_field="input",
                               lead_field="instructions" if body.instructions is not None else None)
    except InputError as exc:
        raise InputError(exc.status, responses_field(exc.field), exc.message) from None
    except APIError as exc:
        if exc.param is None:
            raise
        raise APIError(exc.status, exc.message.replace(exc.param, responses_field(exc.param), 1), exc.type,
                       responses_field(exc.param), exc.code, exc.headers) from None
    run.observer.field_names = responses_field  # (a grammar failing after the first delta: `checked`)
    formatter = logprob_formatter(run.client, chat)
    numbers = itertools.count()  # sequence_number of every event, an error event's too
    events = response_events(ResponseShell(body, run), run.streams[0], formatter, numbers)
    if body.stream:
        return sse_response(events, run.observer, run.header.id, id_headers(request, run.header.id), named=True,
                            error_event=lambda error: _error_event(error, next(numbers)))
    final = await last_event(events, run.observer)
    return UTF8JSONResponse(final["response"], headers=id_headers(request, run.header.id))


class ResponseShell:
    """The `response` object's fields that do not depend on the output (echoes of the request)."""

    def __init__(self, body: ResponsesRequest, run: ChatRun):
        self.body, self.run = body, run
        self.created_at = int(time.time())

    def object(self, status: str, output: list[dict], usage: dict | None = None, incomplete: str | None = None) -> dict:
        body = self.body
        text_format = (body.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.run.header.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self.run.header.model, "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": body.temperature,
            "text": {"format": text_format}, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
            "top_p": body.top_p, "top_logprobs": body.top_logprobs, "truncation": body.truncation or "disabled", "usage": usage,
            "user": body.user, "metadata": body.metadata or {},
        }

    @staticmethod
    def cut(last: Delta) -> bool:
        """Whether the turn ended at the token cap or the time limit (an "incomplete" response)."""
        return last.finish_reason in (FinishReason.LENGTH, FinishReason.DEADLINE)

    def final(self, output: list[dict], last: Delta) -> dict:
        """The response object at the end. "incomplete" at the token cap or the time limit (reason
        "max_output_tokens", as OpenAI), and when a client's stop string cut a function call (its item
        "incomplete"; reason "stop"): an agent that reads only `status` ran a call whose arguments do not
        parse (helper-176)."""
        cut = self.cut(last)
        reason = "max_output_tokens" if cut else None
        if not cut and any(item.get("type") == "function_call" and item.get("status") == "incomplete" for item in output):
            cut, reason = True, "stop"
        observer = self.run.observer
        usage = {"input_tokens": observer.prompt_tokens,
                 # (cache_write_tokens: 0, as /v1/messages' cache_creation_input_tokens: no client-managed cache)
                 "input_tokens_details": {"cached_tokens": int((last.stats or {}).get("cached_prompt_tokens") or 0),
                                          "cache_write_tokens": 0},
                 "output_tokens": observer.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": observer.prompt_tokens + observer.completion_tokens}
        out = self.object("incomplete" if cut else "completed", output, usage, reason)
        out["refusion"] = refusion_detail(last)
        return out


async def response_events(shell: ResponseShell, deltas: AsyncIterator[Delta], formatter: LogprobFormatter | None,
                          numbers: Iterator[int]) -> AsyncIterator[dict]:
    """The events of one turn (module docstring), numbered from `numbers`; the last one holds the whole
    response. Closing this closes `deltas` (cancelling the engine request)."""
    async with contextlib.aclosing(deltas):
        async for event in _turn_events(shell, deltas, formatter, numbers):
            yield event


async def _turn_events(shell: ResponseShell, deltas: AsyncIterator[Delta], formatter: LogprobFormatter | None,
                       numbers: Iterator[int]) -> AsyncIterator[dict]:
    """response_events' events: created and in_progress, the items as turn_pieces releases text and
    calls (calls past run.max_calls dropped), an empty message when the turn wrote nothing, then the
    final response event."""
    run = shell.run
    output = _TurnOutput(formatter, numbers)
    yield output.event("response.created", response=shell.object("in_progress", []))
    yield output.event("response.in_progress", response=shell.object("in_progress", []))
    num_calls, last, sending = 0, None, False  # sending: the streamed call now open is sent (max_calls)
    async for delta, pieces in turn_pieces(run, deltas):
        last = delta
        output.entries += delta.logprobs or []
        for piece in pieces:
            if isinstance(piece, str):
                if not piece:
                    continue
                for text_event in output.text(piece):
                    yield text_event
                continue
            if isinstance(piece, CallStart):
                sending = run.max_calls is None or num_calls < run.max_calls
                num_calls += sending
            elif not isinstance(piece, ArgumentsPiece) and piece.id != output.streamed:  # a call sent whole
                sending = run.max_calls is None or num_calls < run.max_calls
                num_calls += sending
            if sending:
                for call_event in output.call(piece):
                    yield call_event
    if not output.items and output.message is None:  # no text and no call: one empty message, as the whole response has
        for opened in output.open_message():
            yield opened
    for released in output.released_logprobs():
        yield released
    if last is None:
        raise APIError(500, "engine stream ended without a final delta", "server_error")
    # The message the cap (or max_time_ms) cut is "incomplete", as OpenAI marks it; finished calls stay "completed"
    for done in output.close_message("incomplete" if ResponseShell.cut(last) else "completed"):
        yield done
    final = shell.final(output.items, last)
    yield output.event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)


class _TurnOutput:
    """A turn's output items as its events build them: `items` done so far, the `message` item being
    streamed (None between messages) and `entries`, the log probabilities of text not yet sent. Every
    event is numbered from `numbers` when it is made."""

    def __init__(self, formatter: LogprobFormatter | None, numbers: Iterator[int]):
        self.formatter, self.numbers = formatter, numbers
        self.items: list[dict] = []
        self.message: dict | None = None
        self.entries: list = []
        self.streamed: str | None = None  # the id of the call whose arguments are streaming

    def event(self, kind: str, **fields) -> dict:
        return {"type": kind, "sequence_number": next(self.numbers), **fields}

    def open_message(self) -> list[dict]:
        """A new message item, streamed from here: its added and content_part.added events."""
        self.message = item = _message_item(_new_id("msg"), "", "in_progress", [])
        return [self.event("response.output_item.added", output_index=len(self.items),
                           item=_message_item(item["id"], "", "in_progress", [], parts=False)),
                self.event("response.content_part.added", item_id=item["id"], output_index=len(self.items),
                           content_index=0, part=_text_part("", []))]

    def text(self, piece: str) -> Iterator[dict]:
        """A text piece's delta event (a message opened first when none is), with the log probabilities
        of the tokens released so far."""
        if self.message is None:
            yield from self.open_message()
        message = self.message
        sent = self.formatter.chat(self.entries) if self.formatter is not None else []
        message["content"][0]["text"] += piece
        message["content"][0]["logprobs"] += sent
        self.entries = []
        yield self.event("response.output_text.delta", item_id=message["id"], output_index=len(self.items),
                         content_index=0, delta=piece, logprobs=sent)

    def call(self, piece: CallStart | ArgumentsPiece | ToolCall) -> Iterator[dict]:
        """A tool call's item events, after the message in flight is closed: a streamed call's added
        event (CallStart), its arguments deltas (ArgumentsPiece), its done events (its ToolCall); a
        call sent whole, all of them at once."""
        yield from self.close_message()
        self.entries = []  # a call's tokens: no logprobs field to carry them
        index = len(self.items)
        if isinstance(piece, CallStart):
            self.streamed = piece.id
            yield _call_added(ToolCall(piece.name, "", piece.id), index, self.event)
        elif isinstance(piece, ArgumentsPiece):
            yield _arguments_delta(piece.id, piece.text, index, self.event)
        else:
            if piece.id != self.streamed:
                yield _call_added(piece, index, self.event)
                if piece.arguments:  # (no empty delta: a call cut before its arguments)
                    yield _arguments_delta(piece.id, piece.arguments, index, self.event)
            self.streamed = None
            yield from _call_done(piece, index, self.event)
            self.items.append(_call_item(piece, "completed" if piece.complete else "incomplete"))

    def released_logprobs(self) -> Iterator[dict]:
        """Tokens the end released without text (a stop string's, an EOS's): their own delta with no text,
        so the deltas' log probabilities add up to the message's, as the chat route's last chunk carries
        them (they were left out)."""
        message = self.message
        if message is not None and self.entries and self.formatter is not None:
            sent = self.formatter.chat(self.entries)
            message["content"][0]["logprobs"] += sent
            yield self.event("response.output_text.delta", item_id=message["id"], output_index=len(self.items),
                             content_index=0, delta="", logprobs=sent)

    def close_message(self, status: str = "completed") -> list[dict]:
        """The done events of the message in flight (none when none is), the message moved to `items`."""
        message = self.message
        if message is None:
            return []
        index, text = len(self.items), message["content"][0]["text"]
        done = _message_item(message["id"], text, status, message["content"][0]["logprobs"])
        self.items.append(done)
        ref = {"item_id": message["id"], "output_index": index, "content_index": 0}
        self.message = None
        return [self.event("response.output_text.done", **ref, text=text, logprobs=done["content"][0]["logprobs"]),
                self.event("response.content_part.done", **ref, part=done["content"][0]),
                self.event("response.output_item.done", output_index=index, item=done)]


def _call_added(call: ToolCall, index: int, event) -> dict:
    return event("response.output_item.added", output_index=index, item=_call_item(call, "in_progress", arguments=""))


def _arguments_delta(call_id: str, text: str, index: int, event) -> dict:
    """A piece of a call's arguments (the item id is the call's: _call_item)."""
    return event("response.function_call_arguments.delta", item_id="fc_" + call_id.removeprefix("call_"),
                 output_index=index, delta=text)


def _call_done(call: ToolCall, index: int, event) -> list[dict]:
    done = _call_item(call, "completed" if call.complete else "incomplete")  # (cut inside it: tool_calls.py)
    return [event("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                  arguments=call.arguments),
            event("response.output_item.done", output_index=index, item=done)]


def _text_part(text: str, logprobs: list) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _message_item(item_id: str, text: str, status: str, logprobs: list, parts: bool = True) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text, list(logprobs))] if parts else []}


def _call_item(call: ToolCall, status: str, arguments: str | None = None) -> dict:
    """A function_call output item; its id is derived from the call id, so every event names it alike."""
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments if arguments is None else arguments, "status": status}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _error_event(error: APIError, number: int) -> dict:
    return {"type": "error", "code": error.code or error.type, "message": error.message, "param": error.param,
            "sequence_number": number}
