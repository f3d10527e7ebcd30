"""OpenAI response bodies and stream chunks, built from scheduler.api.Delta objects.

Non-OpenAI detail goes under a `refusion` key: the mode that served the request, tokens per forward,
and `finish_detail` when OpenAI's finish reasons cannot say it (e.g. "deadline" reports as "length").
"""

from __future__ import annotations

import time
import uuid
from typing import Collection

from integrations.tool_call_stream import split_tool_calls
from integrations.tool_calls import ToolCall, cut_short
from scheduler.api import Delta, FinishReason

_FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.DEADLINE: "length",
    FinishReason.CANCELLED: "stop",
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def openai_finish_reason(delta: Delta) -> str:
    return _FINISH.get(delta.finish_reason, "stop")


def chat_finish_reason(last: Delta, num_calls: int, client_stops: Collection[str] = ()) -> str:
    """OpenAI's chat finish_reason: "tool_calls" only when the turn ended by itself after calling tools;
    a turn cut by max_tokens (or any other limit) reports that cut ("length"), calls or not, as
    OpenAI does, and one cut by one of the client's `stop` strings (`client_stops`; not the chat
    template's own turn end) is "stop" (a call it cut is an incomplete call, tool_calls.py; the Messages
    route says `stop_sequence`), so a client never takes a truncated turn for a finished one."""
    reason = openai_finish_reason(last)
    by_client_stop = (last.stats or {}).get("stop_word") in client_stops
    return "tool_calls" if num_calls and reason == "stop" and not by_client_stop else reason


def refusion_detail(delta: Delta) -> dict:
    """Extension block: mode, TPF and anything OpenAI's finish reason hides."""
    stats = delta.stats or {}
    detail = {"mode": delta.mode.value if delta.mode else None}
    if "tokens_per_forward" in stats:
        detail["tokens_per_forward"] = stats["tokens_per_forward"]
    if len(stats.get("modes") or ()) > 1:  # switched mid-request (AUTO): `mode` is the last decoder, TPF is overall
        detail["modes"] = list(stats["modes"])
    if delta.finish_reason is not None and delta.finish_reason.value != openai_finish_reason(delta):
        detail["finish_detail"] = delta.finish_reason.value
    return detail


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseHeader:
    """id / created / model shared by a response and all of its chunks."""

    def __init__(self, prefix: str, model: str, request_id: str | None = None):
        self.id = request_id or new_id(prefix)
        self.created = int(time.time())
        self.model = model

    def fields(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def completion_body(header: ResponseHeader, choices: list[tuple[str, Delta, dict | None]], prompt_tokens: int,
                    completion_tokens: int) -> dict:
    """A text_completion of one or more choices, each (text, its last delta, its logprobs object:
    integrations/openai_logprobs.py's, or None). The `refusion` block describes choice 0; with several
    choices each also carries its own."""
    out = [{"text": text, "index": i, "logprobs": logprobs, "finish_reason": openai_finish_reason(last)}
           for i, (text, last, logprobs) in enumerate(choices)]
    if len(out) > 1:
        for choice, (_, last, _) in zip(out, choices):
            choice["refusion"] = refusion_detail(last)
    return {
        **header.fields("text_completion"),
        "choices": out,
        "usage": usage(prompt_tokens, completion_tokens),
        "refusion": refusion_detail(choices[0][1]),
    }


def completion_chunk(header: ResponseHeader, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None) -> dict:
    choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**header.fields("text_completion"), "choices": [choice]}


def chat_body(
    header: ResponseHeader, choices: list[tuple[str, Delta, list[dict] | None]], prompt_tokens: int,
    completion_tokens: int, allowed_tools: set[str] | None, max_calls: int | None = None,
    client_stops: Collection[str] = (),
) -> dict:
    """A chat.completion of one or more choices, each (text, its last delta, its logprobs: the content
    list of integrations/openai_logprobs.py, every generated token with tool-call text, or None). When
    tools are enabled, `<tool_call>` blocks become message.tool_calls, at most `max_calls` of them
    (parallel_tool_calls false: the first, as vLLM); client_stops: the request's `stop` strings
    (chat_finish_reason). `refusion` as in completion_body."""
    out = []
    for i, (text, last, logprobs) in enumerate(choices):
        content, calls = (split_tool_calls(text, allowed_tools, cut_short(last.finish_reason, (last.stats or {}).get("stop_word")))
                           if allowed_tools is not None else (text, []))
        calls = calls[:max_calls] if max_calls is not None else calls
        message: dict = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        out.append({"index": i, "message": message, "finish_reason": chat_finish_reason(last, len(calls), client_stops),
                    "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}})
        if len(choices) > 1:
            out[-1]["refusion"] = refusion_detail(last)
    return {
        **header.fields("chat.completion"),
        "choices": out,
        "usage": usage(prompt_tokens, completion_tokens),
        "refusion": refusion_detail(choices[0][1]),
    }


def chat_chunk(header: ResponseHeader, delta: dict, finish_reason: str | None = None,
               logprobs: list[dict] | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
              "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}
    return {**header.fields("chat.completion.chunk"), "choices": [choice]}


def chat_tool_call_delta(call: ToolCall, index: int) -> dict:
    """A streamed tool call, sent whole in one chunk once its block has closed (output no grammar
    constrains: mode "refusion")."""
    return {"tool_calls": [{"index": index, **call.to_openai()}]}


def chat_tool_call_start(call_id: str, name: str, index: int) -> dict:
    """The first chunk of a tool call whose arguments stream: its index, id, type and name, arguments ""
    (OpenAI's stream shape; later chunks carry the index and arguments pieces: chat_tool_call_arguments)."""
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def chat_tool_call_arguments(text: str, index: int) -> dict:
    """A piece of the arguments of the tool call at `index` (the pieces concatenate to its arguments)."""
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def usage_chunk(header: ResponseHeader, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The final chunk of a stream with stream_options.include_usage: no choices, usage set."""
    return {**header.fields(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
