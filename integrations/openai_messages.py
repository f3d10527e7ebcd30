"""The conversation and tool objects of OpenAI chat bodies (pydantic, the HTTP boundary only): a chat
message with the tool calls an earlier assistant turn made, the tools a request offers (ToolSpec,
FunctionSpec) and a tool_choice naming one of them. The request bodies that hold them are
integrations/openai_models.py's; chat.py renders them into a prompt."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from integrations.json_schemas import inlined_root_ref
from integrations.openai_body import OpenAIBody


class FunctionSpec(OpenAIBody):
    """A chat tool's function. Other keys are a 400, as at the top level and on the Responses API's
    function tools: a typo such as `paramters` left the tool without a schema, its calls unconstrained."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$",
                      description="OpenAI's rule: letters, digits, underscores and dashes, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_at_the_root(cls, value):
        """A root that only refers to one of the schema's own definitions (pydantic's model_json_schema()
        of a self-referencing model, which instructor-style code passes as it is) has that definition
        at the root: the tool's arguments are then the object schema it names (json_schemas)."""
        return inlined_root_ref(value)


class ToolSpec(OpenAIBody):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionSpec


class CalledFunction(BaseModel):
    """The function of an assistant message's tool call: its name and its arguments, a JSON string, as
    the model wrote them (OpenAI's ChatCompletionMessageToolCall.function)."""

    model_config = ConfigDict(strict=True)

    name: str = Field(min_length=1)
    arguments: str


class AssistantToolCall(BaseModel):
    """A tool call of an earlier assistant message, sent back in the conversation (OpenAI's
    ChatCompletionMessageToolCall: `id`, `type` "function", `function`); a `tool` message answers it by id."""

    model_config = ConfigDict(strict=True)

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"  # OpenAI's custom tools are not offered
    function: CalledFunction


class ChatMessage(BaseModel):
    """One message; `content` may be a string or a list of {"type": "text", "text": ...} parts. Only an
    assistant message may leave it out (or send null): one that only calls tools, as OpenAI's API. A
    `tool` message needs its `tool_call_id`, as OpenAI requires."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_result_names_its_call(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id is required in a tool message: the id of the assistant tool call it answers")
        return self

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value, info):
        role = info.data.get("role")  # validated first: declared before
        if value is None and role is not None and role != "assistant":
            raise ValueError(f"is required in a {role} message: a string or text parts")
        if isinstance(value, list):
            if not value:
                raise ValueError("is an empty list: give a string or at least one text part")
            texts = []
            for i, part in enumerate(value):
                if part.get("type") != "text":
                    raise ValueError(f"part {i} is of type {part.get('type')!r}: only text content parts "
                                     "({'type': 'text', 'text': ...}) are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: a text part needs 'text', a string")
                texts.append(part["text"])
            return "\n".join(texts)  # as vLLM joins a message's text parts (two code parts stay two lines)
        return value


class NamedFunction(OpenAIBody):
    name: str = Field(min_length=1)


class NamedToolChoice(OpenAIBody):
    """tool_choice {"type": "function", "function": {"name": ...}}: the model must call that tool."""

    type: Literal["function"] = "function"
    function: NamedFunction
