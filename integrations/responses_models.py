"""The OpenAI Responses API request (POST /v1/responses) and its mapping onto a chat turn.

Supported, with OpenAI's semantics: `input` (a string, or items: messages with text content, earlier
`function_call` items and `function_call_output` results, as agents send a conversation back),
`instructions` (a system message before the input), function `tools` and `tool_choice`,
`parallel_tool_calls`, `text.format` (text, json_object, json_schema: structured outputs),
`max_output_tokens`, `temperature`, `top_p`, `top_logprobs` (0-20: `output_text.logprobs`; `include:
["message.output_text.logprobs"]` asks for them too, with 0 alternatives unless `top_logprobs` is set), `stream`,
`metadata` and `user` (echoed), and the ReFusion extensions of the chat route (`mode`, `slot_size`, ...).
Accepted and ignored: `stream_options`, `store` (nothing is stored: the response says `"store": false`), `reasoning`
(the model has no reasoning mode), `truncation` ("disabled", and "auto", which the OpenAI Agents SDK
sends from its model settings: nothing is dropped here, so an input over the context is a 400 either
way, and a response echoes the value sent, as vLLM's: an input that was answered needed no cut),
`include` entries about reasoning, `service_tier`, `safety_identifier`, `prompt_cache_retention`,
`max_tool_calls` (it caps built-in tools, which are not offered), `background: false`.
`prompt_cache_key` routes as on chat (the serve router's
affinity key). Refused with a 400 naming the field: `previous_response_id` and `conversation` (no
response is stored: send the whole conversation in `input`), hosted tools (web_search, file_search,
...), non-text input (images, files, audio), unknown fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from integrations.validation_errors import validation_field, validation_message
from integrations.openai_body import ExtensionsBody, Metadata
from integrations.openai_models import ChatCompletionRequest
from integrations.request_limits import InputError
from workers.batch import MAX_TOP_LOGPROBS

# ReFusion and sampling extensions passed through to the chat turn unchanged (openai_sampling.SamplingFields);
# vLLM's ResponsesRequest takes ignore_eos, min_tokens and repetition_penalty too (GuideLLM and AIPerf
# send ignore_eos for fixed output lengths)
EXTENSIONS = ("mode", "slot_size", "serial_num_blocks", "slot_threshold", "token_threshold", "top_k", "min_p",
              "max_time_ms", "priority", "seed", "stop", "structured_outputs", "ignore_eos", "min_tokens",
              "repetition_penalty")
# A chat field a 400 may name -> the Responses field the client sent (prefixes, longest first)
_FIELD_NAMES = [("response_format.json_schema", "text.format"), ("response_format", "text.format"),
                ("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
                ("max_tokens", "max_output_tokens"), ("logprobs", "top_logprobs")]


def responses_field(field: str | None) -> str | None:
    """The Responses API's name of a chat-turn field a 400 names (tools.0.function.name -> tools.0.name,
    response_format.json_schema.schema -> text.format.schema, messages -> input, ...)."""
    if not field:
        return field
    parts = field.split(".")
    if len(parts) >= 3 and parts[0] == "tools" and parts[2] == "function":
        return ".".join(parts[:2] + parts[3:])
    for chat, ours in _FIELD_NAMES:
        chat, ours = chat.rstrip("."), ours.rstrip(".")
        if field == chat or field.startswith(chat + "."):
            return ours + field[len(chat):]
    return field


class ResponsesRequest(ExtensionsBody):
    """POST /v1/responses (the module docstring lists what is supported)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value):
        """Named as a whole: pydantic's first union member's message ("Input should be a valid string")
        read as if a list were refused."""
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
            return value
        raise ValueError("must be a string or a list of input items (objects: messages {\"role\", \"content\"}, "
                         "function_call, function_call_output)")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: accepted, nothing to obfuscate here
    metadata: Metadata | None = None  # echoed in the response
    user: str | None = None
    store: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    # accepted without effect, as on chat (agent frameworks pass them through from their model settings):
    # one service tier, nothing stored or cached beyond the prefix cache, no built-in tools to cap
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = None
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    background: Literal[False] | None = None  # true: 400 (responses are not stored to poll later)
    previous_response_id: str | None = None  # refused in chat_request: nothing is stored
    conversation: str | dict[str, Any] | None = None  # refused in chat_request: nothing is stored
    EXTENSION_NAMES = EXTENSIONS  # ReFusion / vLLM extensions sent at the top level (ExtensionsBody)

    def chat_request(self) -> ChatCompletionRequest:
        """The chat turn this request asks for. Raises InputError (400) naming the Responses field."""
        for name in ("previous_response_id", "conversation"):
            if getattr(self, name) is not None:
                raise InputError(400, name, "responses are not stored here: send the whole conversation in `input` "
                                 "(earlier messages, function_call and function_call_output items)")
        if self.include and any(not i.startswith("reasoning.") and i != "message.output_text.logprobs"
                                for i in self.include):
            bad = next(i for i in self.include if not i.startswith("reasoning.") and i != "message.output_text.logprobs")
            raise InputError(400, "include", f"{bad!r} is not offered here (supported: message.output_text.logprobs)")
        body: dict[str, Any] = {"messages": self._messages(), "stream": self.stream}
        if self.tools:
            body["tools"] = [_tool(t, k) for k, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _tool_choice(self.tool_choice)
        if self.text is not None and self.text.get("format") is not None:
            body["response_format"] = _text_format(self.text["format"])
        if self.top_logprobs is not None or "message.output_text.logprobs" in (self.include or ()):
            # OpenAI's include entry asks for them (vLLM's too, top_logprobs defaulting to 0); top_logprobs alone does as well
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs or 0
        for name, chat_name in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                                ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"),
                                ("user", "user"), ("safety_identifier", "safety_identifier"), ("model", "model"), ("prompt_cache_key", "prompt_cache_key")):
            if getattr(self, name) is not None:
                body[chat_name] = getattr(self, name)
        body.update(self.extensions)
        try:
            chat = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            field = responses_field(validation_field(tuple(error["loc"]))) or "body"
            raise InputError(400, field, validation_message(error)) from None
        chat._cap_field = "max_output_tokens"  # a context error names the field the client sent
        return chat

    def _messages(self) -> list[dict]:
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        calls: dict[str, int] = {}  # call_id of each function_call item so far -> its index in input
        answered: set[str] = set()  # call_ids a function_call_output answered
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        for k, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message":
                messages.append(_message(item, k))
            elif kind == "function_call":
                call = {"id": _text_field(item, "call_id", k), "type": "function",
                        "function": {"name": _text_field(item, "name", k), "arguments": _text_field(item, "arguments", k)}}
                if call["id"] in calls:  # its output could not say which call it answers
                    raise InputError(400, f"input.{k}.call_id", f"call_id {call['id']!r} is used by input.{calls[call['id']]} "
                                     "too: give each function_call its own call_id")
                calls[call["id"]] = k
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # the same turn: its text, then its calls (vLLM)
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                text = output if isinstance(output, str) else _parts_text(output, f"input.{k}.output")
                call_id = _text_field(item, "call_id", k)
                if call_id not in calls:  # OpenAI: "No tool call found for function call output with call_id"
                    raise InputError(400, f"input.{k}.call_id", f"no function_call item with call_id {call_id!r} comes "
                                     "before this output: send the call's item too (nothing is stored here)")
                if call_id in answered:  # (the Messages route refuses the same: each tool_use answered once)
                    raise InputError(400, f"input.{k}.call_id", f"function_call {call_id!r} is answered by an earlier "
                                     "function_call_output already: send one output per call")
                answered.add(call_id)
                messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            elif kind == "reasoning":
                continue  # an earlier turn's reasoning item, sent back by an agent: nothing to render
            else:
                raise InputError(400, f"input.{k}.type", f"{kind!r} items are not supported here; send message, "
                                 "function_call and function_call_output items")
        for call_id, k in calls.items():  # OpenAI: "No tool output found for function call <call_id>"
            if call_id not in answered:
                raise InputError(400, f"input.{k}", f"no function_call_output item answers function_call {call_id!r}: "
                                 "send the call's output after it (or drop the call)")
        return messages


def _message(item: dict, k: int) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise InputError(400, f"input.{k}.role", f"must be user, system, developer or assistant, got {role!r}")
    content = item.get("content")
    text = content if isinstance(content, str) else _parts_text(content, f"input.{k}.content")
    return {"role": role, "content": text}


def _parts_text(parts, field: str) -> str:
    """The text of content parts (input_text, output_text); anything else (images, files, audio) is a 400."""
    if not isinstance(parts, list):
        raise InputError(400, field, "must be a string or a list of text parts ({'type': 'input_text', 'text': ...})")
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise InputError(400, f"{field}.{i}", f"only text parts are supported (input_text, output_text), got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise InputError(400, f"{field}.{i}.text", f"must be a string, got {type(part.get('text')).__name__}")
        texts.append(part["text"])
    return "\n".join(texts)  # as the chat route joins text parts (vLLM's rule)


def _text_field(item: dict, name: str, k: int) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (name != "arguments" and not value):
        raise InputError(400, f"input.{k}.{name}", "must be a non-empty string" if name != "arguments" else "must be a string")
    return value


def _tool(tool: dict, k: int) -> dict:
    if tool.get("type") != "function":
        kind = ("custom tools (free-form input)" if tool.get("type") == "custom"
                else f"{tool.get('type')!r} tools are OpenAI's hosted tools and")
        raise InputError(400, f"tools.{k}.type", f"{kind} are not offered here; use function tools "
                         "({'type': 'function', 'name': ..., 'parameters': {...}})")
    unknown = sorted(set(tool) - {"type", "name", "description", "parameters", "strict"})
    if unknown:
        raise InputError(400, f"tools.{k}.{unknown[0]}", "unknown field of a function tool")
    return {"type": "function", "function": {key: tool[key] for key in ("name", "description", "parameters", "strict")
                                             if tool.get(key) is not None}}


def _tool_choice(choice) -> str | dict:
    """The chat turn's tool_choice; the Responses form of a named function is {"type": "function", "name"}
    (chat's nests it under "function"), so a bad value is refused here in the Responses API's words."""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice in ("auto", "none", "required"):
        return choice
    raise InputError(400, "tool_choice", 'use "auto", "none", "required" or {"type": "function", "name": ...}')


def _text_format(fmt) -> dict:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InputError(400, "text.format", 'use {"type": "text"}, {"type": "json_object"} or {"type": '
                         '"json_schema", "name": ..., "schema": {...}}')
    unknown = sorted(set(fmt) - {"type", "name", "schema", "description", "strict"})
    if unknown:
        raise InputError(400, f"text.format.{unknown[0]}", "unknown field of a text format (type, name, schema, "
                         "description, strict)")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    if fmt.get("schema") is None:  # (OpenAI's Responses API requires it; without it the output was unconstrained)
        raise InputError(400, "text.format.schema", 'a json_schema format needs its schema: {"type": "json_schema", '
                         '"name": ..., "schema": {...}}, or use {"type": "json_object"}')
    schema = {key: fmt[key] for key in ("name", "schema", "description", "strict") if fmt.get(key) is not None}
    return {"type": "json_schema", "json_schema": schema}
