"""OpenAI-compatible request bodies of /v1/completions and /v1/chat/completions (pydantic, the HTTP
boundary only); their shared sampling fields are integrations/openai_sampling.py's, the objects other
routes share integrations/openai_body.py's, the messages and tools of a chat body
integrations/openai_messages.py's.

Field names follow OpenAI's API (the ReFusion and vLLM extensions: openai_sampling.py).
Unknown fields are rejected (400 naming the field) so that typos do not silently change nothing. A
field sent as JSON null counts as not sent, as in OpenAI's API (its SDKs and many clients send nulls).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from integrations.openai_body import Metadata
from integrations.openai_messages import ChatMessage, NamedFunction, NamedToolChoice, ToolSpec
from integrations.openai_sampling import SamplingFields
from integrations.request_limits import InputError
from workers.batch import MAX_TOP_LOGPROBS

# ChatMessage and ToolSpec are re-exported (tests import them from here; their home is openai_messages)
__all__ = ["MAX_PROMPTS", "MAX_TOOLS", "RESERVED_TEMPLATE_KWARGS", "ChatCompletionRequest", "ChatMessage",
           "CompletionRequest", "ToolSpec", "check_generation_prompt"]


MAX_PROMPTS = 64
"""Most prompts in one /v1/completions batch (each runs as its own engine request, times `n`)."""
MAX_TOOLS = 1024
"""Most functions one chat request offers: a forced call's grammar holds one alternative per function, and
the grammar engine's parser takes at most 2,000 items in a row (about 2,000 tools were refused with a
message about the prompt's last tokens; helper-174). OpenAI takes 128."""


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: a string, token ids, or a batch of either (OpenAI's four forms);
    a batch's choices come back in prompt order, `n` per prompt."""

    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(default=None, ge=0, description="0: with echo only, the prompt alone (scored)")
    echo: bool = Field(default=False, description="the prompt before the completion, its tokens' logprobs too "
                                                  "(OpenAI's legacy completions, vLLM)")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description=f"the most likely 0..{MAX_TOP_LOGPROBS} tokens per position (vLLM's bound)")
    best_of: int | None = Field(default=None, ge=1, le=1, description="only best_of=1 is supported")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value):
        """One of OpenAI's four forms, said by name (pydantic's own message names only the first)."""
        def kind(item) -> str:
            if isinstance(item, str):
                return "text"
            if isinstance(item, int) and not isinstance(item, bool):
                return "id"
            if isinstance(item, list) and all(kind(t) == "id" for t in item):
                return "ids"
            return "other"

        kinds = {kind(item) for item in value} if isinstance(value, list) else {kind(value)}
        if kinds <= {"text"} or (isinstance(value, list) and (kinds == {"id"} or kinds == {"ids"})):
            return value
        raise ValueError("must be a string, a list of strings, a list of token ids (integers) or a list of "
                         "token-id lists (OpenAI's four forms; a batch does not mix them)")

    @field_validator("prompt")
    @classmethod
    def _prompt_batch(cls, value, info):
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty: give a string or at least one token id")
        batch = len(value) if isinstance(value, list) and isinstance(value[0], (str, list)) else 1
        n = info.data.get("n", 1)  # validated first: declared before
        if batch * n > MAX_PROMPTS:
            raise ValueError(f"{batch} prompts x n {n} = {batch * n} sequences; at most {MAX_PROMPTS} per request: "
                             "send the rest in another request")
        if isinstance(value, list) and isinstance(value[0], list) and not all(value):
            empty = next(k for k, prompt in enumerate(value) if not prompt)  # named as a batch's text prompt is
            raise InputError(400, f"prompt.{empty}", "is empty: every prompt of a batch of token ids needs at least "
                                                     "one token")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Every prompt: one string or one list of token ids each."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt is returned (and scored), nothing is generated."""
        return self.echo and self.max_tokens == 0

    def decode_params(self, gen_length: int, model_defaults: dict | None = None, slot_size: int | None = None,
                      room: int | None = None) -> dict:
        """SamplingFields.decode_params, plus prompt_logprobs when the echoed prompt needs its scores
        (echo with logprobs; echo_only, which the engine runs as a scoring request, with 0 alternatives;
        the engine scores with the larger count when vLLM's prompt_logprobs is also set)."""
        params = super().decode_params(gen_length, model_defaults, slot_size, room)
        if self.echo and (self.logprobs is not None or self.echo_only):  # with vLLM's prompt_logprobs: the larger
            params["prompt_logprobs"] = max(self.logprobs or 0, params.get("prompt_logprobs", 0))
        return params


# apply_chat_template arguments the chat route sets from the request (chat.render_chat), or that would
# change what the call returns: not a chat_template_kwargs name
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "add_generation_prompt",
                                      "continue_final_message", "tokenize", "chat_template", "return_dict",
                                      "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs",
                                      "return_assistant_tokens_mask"})


@functools.cache
def _apply_chat_template_arguments() -> frozenset[str]:
    """The named parameters of the installed transformers' apply_chat_template (they change the call,
    not the template's variables; the list grows between versions: sanitize_control_tokens, ...)."""
    from transformers import PreTrainedTokenizerBase

    parameters = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters.values()
    return frozenset(p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def check_generation_prompt(add: bool | None, continue_final: bool | None, opens_turn: bool = True) -> bool | None:
    """vLLM's rule for add_generation_prompt beside continue_final_message: not both true; and on the chat
    route (`opens_turn`), which always opens the assistant's turn otherwise, false only with
    continue_final_message (/tokenize's and /apply-template's chat forms render without the turn then).
    ValueError (the 400 names add_generation_prompt, the field to change)."""
    if continue_final and add:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true (vLLM's rule): "
                         "drop add_generation_prompt")
    if opens_turn and not continue_final and add is False:
        raise ValueError("add_generation_prompt false is only offered with continue_final_message true (the "
                         "chat route always opens the assistant's turn)")
    return add


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None  # at most MAX_TOOLS (_tool_count)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description=f"0..{MAX_TOP_LOGPROBS} alternatives per token; needs logprobs: true")
    # vLLM's extension: the last message is an assistant message the model continues (a prefill)
    continue_final_message: bool = False
    # vLLM's: true (its default) opens the assistant's turn, false goes with continue_final_message (vLLM
    # refuses the two true together, so its clients send this pair); after continue_final_message (read)
    add_generation_prompt: bool | None = None
    # An OpenAI field whose default is accepted (SDK wrappers send it) and whose other value is not supported
    store: bool | None = None
    # OpenAI chat fields accepted and without effect here (agent frameworks pass them through from their
    # model settings): the model has no reasoning mode and one service tier; nothing is stored
    metadata: Metadata | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = None
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None
    prediction: dict[str, Any] | None = None  # Predicted Outputs: a latency hint; the output is the same without
    modalities: list[Literal["text"]] | None = None  # text is the only output
    # vLLM's: extra variables of the model's chat template ({"enable_thinking": false} for Qwen3's); names
    # the server sets itself are refused
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=32)
    # OpenAI's prompt-cache routing key: requests with the same key go to the same engine replica, whose
    # prefix cache holds their shared prompt (the serve router's affinity key; default: the conversation's)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    _cap_field: str = PrivateAttr("max_tokens")

    @field_validator("tools")
    @classmethod
    def _tool_count(cls, value: list | None) -> list | None:
        if value is not None and len(value) > MAX_TOOLS:
            raise ValueError(f"offers {len(value):,} functions; at most {MAX_TOOLS:,} are offered in one request "
                             "(a forced call's grammar holds one alternative per function): offer fewer")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, value):
        taken = sorted(set(value or {}) & (RESERVED_TEMPLATE_KWARGS | _apply_chat_template_arguments()))
        if taken:
            raise ValueError(f"{taken[0]!r} is set by the server (the request's own fields decide it): remove it")
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _final_is_assistant_text(cls, value, info):
        last = (info.data.get("messages") or [None])[-1]
        if value and (last is None or last.role != "assistant" or not last.content or last.tool_calls):
            raise ValueError("needs the last message to be an assistant message with text content (and no "
                             "tool_calls) for the model to continue; add one, or drop continue_final_message")
        return value

    @field_validator("add_generation_prompt")
    @classmethod
    def _generation_prompt(cls, add, info):
        return check_generation_prompt(add, info.data.get("continue_final_message"))

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value):
        if value:
            raise ValueError("store=true is not supported (completions are not stored): remove it or leave it false")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info):
        if value is not None and not info.data.get("logprobs"):  # OpenAI's rule
            raise ValueError("top_logprobs needs logprobs: true; set it, or drop top_logprobs")
        return value

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value):
        """One error that says what is wrong (the union's own errors would all describe its first member)."""
        usage = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        if value is None or isinstance(value, str):
            if value not in (None, "none", "auto", "required"):
                raise ValueError(f"{value!r} is not one of {usage}")
            return value
        if not isinstance(value, dict):
            raise ValueError(f"use {usage}")
        if value.get("type", "function") != "function":
            raise ValueError(f"type {value.get('type')!r} is not supported; use {usage}")
        function = value.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError('a named choice needs function.name, one of `tools`: {"type": "function", '
                             '"function": {"name": ...}}')
        return NamedToolChoice(function=NamedFunction(name=function["name"]))

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value):
        names = [t.function.name for t in value or []]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"function name {repeated[0]!r} appears more than once: give each tool its own name")
        return value

    @model_validator(mode="after")
    def _max_tokens_alias(self):
        # vLLM's rule: max_completion_tokens, OpenAI's newer name, wins when a client sends both
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
            self._cap_field = "max_completion_tokens"
        return self

    @property
    def max_tokens_field(self) -> str:
        return self._cap_field

    @property
    def tools_enabled(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """What tool_choice forces: None (auto, none or unset), "" (required: some tool) or a tool name."""
        if self.tool_choice == "required":
            return ""
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
