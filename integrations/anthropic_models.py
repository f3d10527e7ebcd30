"""The Anthropic Messages API request (POST /v1/messages and /v1/messages/count_tokens) and its mapping
onto a chat turn, as llama.cpp's server and vLLM offer it to Anthropic clients (the `anthropic` SDK,
Claude Code and other agents).

Supported, with Anthropic's semantics: `messages` (user and assistant turns, and system messages within
the conversation, as Claude Code sends them; content a non-empty string or blocks: `text`, `tool_use`
in assistant turns, `tool_result` in user turns; every tool_use answered by a tool_result in the next
user message, ids unique; `thinking` / `redacted_thinking` blocks an agent sends back are skipped),
`system` (a string or text blocks, joined by newlines), custom `tools` (`name`, `description`,
`input_schema`), `tool_choice` (`auto`, `any`, `tool`, `none`; `disable_parallel_tool_use`),
`max_tokens`, `stop_sequences`, `temperature`, `top_p`, `top_k`, `metadata.user_id`, `stream`,
`output_config.format` (a JSON schema: structured output) and a final assistant message, which the
model continues (a prefill: the chat turn's `continue_final_message`), plus the ReFusion extensions of
the chat route (`mode`, `slot_size`, ...; EXTENSIONS) at the top level.
Accepted and ignored: `cache_control` (here and on blocks and tools: the prefix cache is automatic),
`inference_geo` and `speed` (where and in which tier Anthropic runs a request), tools' `defer_loading:
false` (every tool is in the prompt; true is a 400),
`thinking` (the model has no thinking mode: no thinking blocks are returned), `context_management`
(nothing is kept between requests), `service_tier`, `output_config.effort`. Refused with a 400 naming
the field: images, documents and other non-text blocks, server tools (`web_search_...`, `bash_...`,
...), `container`, `mcp_servers`, unknown fields. `thread` (Anthropic's message threads beta: the server
keeps the conversation and a turn sends only what is new) is refused with the error Anthropic gives a
request it cannot thread (details.error_code "thread_unsupported_request"), on which the `anthropic`
SDK's tool runner and threads send the whole conversation without `thread` (its tool runner sends
`thread: {"type": "create"}` by default).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from integrations.anthropic_content import (block_texts, chat_response_format, chat_tool, chat_tool_choice, message_blocks,
                                            system_text, unanswered)
from integrations.validation_errors import validation_field, validation_message
from integrations.openai_body import ExtensionsBody, OpenAIBody
from integrations.openai_models import ChatCompletionRequest
from integrations.request_limits import InputError

# ReFusion and sampling extensions passed through to the chat turn unchanged (openai_sampling.SamplingFields);
# Anthropic's own names cover stop strings (stop_sequences) and top_k
EXTENSIONS = ("mode", "slot_size", "serial_num_blocks", "slot_threshold", "token_threshold", "min_p",
              "max_time_ms", "priority", "seed", "structured_outputs")
MESSAGES_MAX_STOPS = 16  # stop_sequences per request (Anthropic documents no limit; OpenAI's routes take 4)
EFFORTS = ("low", "medium", "high", "xhigh", "max")  # output_config.effort values (accepted, ignored)
# A chat field a 400 may name -> the Messages field the client sent (prefixes, longest first)
_FIELD_NAMES = [("response_format.json_schema", "output_config.format"), ("response_format", "output_config.format"), ("messages", "messages"),
                ("continue_final_message", "messages"), ("stop", "stop_sequences"),
                ("parallel_tool_calls", "tool_choice.disable_parallel_tool_use"), ("user", "metadata.user_id")]


def messages_field(field: str | None) -> str | None:
    """The Messages API's name of a chat-turn field a 400 names (tools.0.function.parameters ->
    tools.0.input_schema, response_format -> output_config.format, stop -> stop_sequences, ...). Chat
    message indices differ from the request's (system and tool results become messages of their own),
    so a message fault found by the chat turn names `messages`."""
    if not field:
        return field
    parts = field.split(".")
    if len(parts) >= 3 and parts[0] == "tools" and parts[2] == "function":
        rest = parts[3:]
        return ".".join(parts[:2] + (["input_schema"] + rest[1:] if rest[:1] == ["parameters"] else rest))
    for chat, ours in _FIELD_NAMES:
        if field == chat or field.startswith(chat + "."):
            return ours if chat == "messages" else ours + field[len(chat):]
    return field


class MessagesBody(OpenAIBody):
    """The fields /v1/messages and /v1/messages/count_tokens share: what the prompt is made of."""

    model_config = ConfigDict(extra="forbid")

    model: str  # required, as Anthropic's API and vLLM's Messages route require it (a missing model is a 400)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[Any] | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system_shape(cls, value):
        """Named as a whole (pydantic's first union member's message read "Input should be a valid string")."""
        if value is None or isinstance(value, (str, list)):
            return value
        raise ValueError("must be a string or a list of text blocks ({\"type\": \"text\", \"text\": ...})")
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # accepted, ignored (module docstring)
    cache_control: dict[str, Any] | None = None  # accepted, ignored: the prefix cache is automatic
    context_management: dict[str, Any] | None = None  # accepted, ignored: nothing is stored between turns
    output_config: dict[str, Any] | None = None
    # accepted, ignored (the anthropic SDK has them): where inference runs, and Anthropic's fast-output tier
    inference_geo: str | None = None
    speed: str | None = None

    def chat_body(self) -> dict[str, Any]:
        """The chat turn's body (a dict for ChatCompletionRequest). Raises InputError (400) naming the
        Messages field."""
        if self.thinking is not None and self.thinking.get("type") not in ("enabled", "disabled", "adaptive"):
            raise InputError(400, "thinking.type", 'use "enabled", "disabled" or "adaptive" (ignored here: the model '
                             "has no thinking mode)")
        messages, continue_final = self._messages()
        body: dict[str, Any] = {"messages": messages, "continue_final_message": continue_final}
        if self.tools:
            body["tools"] = [chat_tool(t, k) for k, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            names = [t.get("name") for t in self.tools or []]
            body["tool_choice"], parallel = chat_tool_choice(self.tool_choice, names)
            if parallel is False:
                body["parallel_tool_calls"] = False
        config = self.output_config or {}
        unknown = sorted(set(config) - {"format", "effort"})
        if unknown:
            raise InputError(400, f"output_config.{unknown[0]}", "unknown field of output_config (format, effort)")
        if config.get("effort") is not None and config["effort"] not in EFFORTS:
            raise InputError(400, "output_config.effort", f"must be one of {', '.join(EFFORTS)} (ignored here)")
        if config.get("format") is not None:
            body["response_format"] = chat_response_format(config["format"])
        body["model"] = self.model
        return body

    def _messages(self) -> tuple[list[dict], bool]:
        """Chat messages, and whether the last (assistant) one is a prefill to continue. Anthropic's rules
        for tool use: ids are unique, and every tool_use of an assistant message is answered by a
        tool_result in the next user message (system messages between them aside), which answers
        nothing else."""
        out = [{"role": "system", "content": system_text(self.system)}] if self.system else []
        seen: set[str] = set()  # every tool_use id so far
        open_uses: dict[str, int] = {}  # tool_use id -> index of its assistant message, not answered yet
        for k, message in enumerate(self.messages):
            role = message.get("role")
            if role not in ("user", "assistant", "system"):
                raise InputError(400, f"messages.{k}.role", f"must be user or assistant (or system, within the "
                                 f"conversation), got {role!r}")
            unknown = sorted(set(message) - {"role", "content"})
            if unknown:
                raise InputError(400, f"messages.{k}.{unknown[0]}", "unknown field of a message (role, content)")
            content = message.get("content")
            if content is None or content == "" or content == []:
                raise InputError(400, f"messages.{k}.content", "must not be empty (Anthropic's rule): send text or "
                                 "blocks, or drop the message")
            if role == "system":  # a system message within the conversation (Claude Code sends them)
                out.append({"role": "system", "content": block_texts(content, f"messages.{k}.content")})
                continue
            if role == "assistant" and open_uses:
                unanswered(open_uses)
            if isinstance(content, str):
                out.append({"role": role, "content": content})
            elif isinstance(content, list):
                out += message_blocks(role, content, k, seen, open_uses)
            else:
                raise InputError(400, f"messages.{k}.content", "must be a string or a list of content blocks")
            if role == "user" and open_uses:
                unanswered(open_uses)
        if open_uses:
            raise InputError(400, f"messages.{max(open_uses.values())}.content", "ends with a tool_use: send its "
                             "tool_result in a user message after it")
        last = out[-1] if out else None
        if self.messages[-1].get("role") != "assistant" or last is None or last["role"] != "assistant":
            return out, False
        return out, True


class MessagesRequest(MessagesBody, ExtensionsBody):
    """POST /v1/messages (the module docstring lists what is supported)."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # accepted, ignored: one tier here
    thread: Any = None  # refused (module doc, create_message), with the error the SDK acts on
    EXTENSION_NAMES = EXTENSIONS  # ReFusion / vLLM extensions sent at the top level (ExtensionsBody)

    def chat_request(self) -> ChatCompletionRequest:
        """The chat turn this request asks for. Raises InputError (400) naming the Messages field."""
        body = self.chat_body() | {"stream": self.stream, "max_tokens": self.max_tokens}
        for name, chat_name in (("stop_sequences", "stop"), ("temperature", "temperature"), ("top_p", "top_p"),
                                ("top_k", "top_k")):
            if getattr(self, name) is not None:
                body[chat_name] = getattr(self, name)
        unknown = sorted(set(self.metadata or {}) - {"user_id"})
        if unknown:
            raise InputError(400, f"metadata.{unknown[0]}", "unknown field of metadata (user_id)")
        if (self.metadata or {}).get("user_id") is not None:
            body["user"] = self.metadata["user_id"]
        body.update(self.extensions)
        return _validated(body, max_stops=MESSAGES_MAX_STOPS)


class CountTokensRequest(MessagesBody):
    """POST /v1/messages/count_tokens: the prompt a /v1/messages request with these fields would run."""

    def chat_request(self) -> ChatCompletionRequest:
        return _validated(self.chat_body())


def _validated(body: dict, max_stops: int = 4) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body, context={"max_stops": max_stops})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = messages_field(validation_field(tuple(error["loc"]))) or "body"
        raise InputError(400, field, validation_message(error)) from None
