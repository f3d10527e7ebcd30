"""OpenAI-compatible request bodies (pydantic, the HTTP boundary only) and their mapping onto
scheduler.api.GenerationRequest.

Field names follow OpenAI's API. ReFusion extensions: `mode` ("auto" | "refusion" | "ar"), `slot_size`,
`serial_num_blocks`, `slot_threshold`, `token_threshold`, `top_k`, `max_time_ms`, `priority`; vLLM's
`structured_outputs`.
Unknown fields are rejected (400 naming the field) so that typos do not silently change nothing. A
field sent as JSON null counts as not sent, as in OpenAI's API (its SDKs and many clients send nulls).
"""

from __future__ import annotations

import functools
import inspect

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationInfo, field_validator,
                      model_validator)

from decoding.grammar import GrammarSpec
from decoding.params import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_TOKENS, MAX_PENALTY, MAX_TOP_K, SERVING_DEFAULTS
from integrations.openai_choices import MAX_CHOICES
from workers.batch import MAX_TOP_LOGPROBS
from integrations.request_limits import MAX_SEED, MIN_TOP_P, InputError, sampling_temperature
from integrations.structured_output import (ANY_OBJECT, choice_grammar, json_grammar, lark_grammar, regex_grammar,
                                            response_format_grammar)
from scheduler.api import Mode, Priority


_TOKEN_ID = re.compile(r"[0-9]{1,10}")  # a logit_bias key: ASCII digits (str.isdigit also takes "²" and "٢")


def fitting_block_count(gen_length: int, slot_size: int, preferred: int) -> int:
    """Largest block count <= preferred that splits gen_length (rounded up to whole slots) into blocks
    of whole slots; 1 always fits."""
    slots = -(-gen_length // slot_size)
    return max(b for b in range(1, max(1, preferred) + 1) if slots % b == 0)


# OpenAI's `metadata` (chat and Responses): up to 16 pairs, keys up to 64 characters, values up to 512
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]],
                     Field(max_length=16)]


class OpenAIBody(BaseModel):
    """A request object of OpenAI's API: a field given as null is a field not given (its default). Types
    are strict, as OpenAI's: "5" is not an integer, true is not a count, "yes" is not a boolean (an int
    is still a valid float)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ExtensionsBody(OpenAIBody):
    """A body of another API (Responses, Anthropic Messages) that takes the chat route's extensions
    (`EXTENSION_NAMES`: mode, slot_size, ...) at its top level: the non-null ones are kept apart
    (`extensions`, not a field a client can send) and passed on to the chat turn, which validates them."""

    EXTENSION_NAMES: ClassVar[tuple[str, ...]] = ()
    _extensions: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _collect_extensions(cls, data, handler):
        found = {}
        if isinstance(data, dict):
            found = {k: data[k] for k in cls.EXTENSION_NAMES if data.get(k) is not None}
            data = {k: v for k, v in data.items() if k not in cls.EXTENSION_NAMES}
        model = handler(data)
        model._extensions = found
        return model

    @property
    def extensions(self) -> dict[str, Any]:
        return dict(self._extensions)


class StreamOptions(OpenAIBody):
    model_config = ConfigDict(extra="forbid")  # an unknown option is a typo to show, as at the top level

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class JSONSchemaFormat(OpenAIBody):
    """response_format.json_schema (OpenAI structured outputs). `strict` is accepted either way: the
    output always matches the schema (constrained decoding, integrations/structured_output.py)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="OpenAI's rule, as for tool names")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBody):
    """OpenAI response_format: text, json_object (some JSON object) or json_schema (that schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        return self


class StructuredOutputs(OpenAIBody):
    """vLLM's `structured_outputs` extension: exactly one of json (a JSON Schema), regex, choice (one of
    these strings), grammar (Lark) or json_object (true: some JSON object)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object"
                             + (f" (got {', '.join(g.rstrip('_') for g in given)})" if given else ""))
        return self

    def grammar_spec(self) -> GrammarSpec:
        """InputError naming structured_outputs.<field> when it does not compile."""
        field = "structured_outputs."
        if self.json_ is not None:
            schema = self.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise InputError(400, field + "json", f"is not valid JSON: {exc}") from None
            return GrammarSpec(json_grammar(schema, field + "json"), source=field + "json")
        if self.regex is not None:
            return GrammarSpec(regex_grammar(self.regex, field + "regex"), source=field + "regex")
        if self.choice is not None:
            return GrammarSpec(choice_grammar(self.choice, field + "choice"), source=field + "choice")
        if self.grammar is not None:
            return GrammarSpec(lark_grammar(self.grammar, field + "grammar"), source=field + "grammar")
        return GrammarSpec(json_grammar(ANY_OBJECT, field + "json_object"), source=field + "json_object")


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class SamplingFields(OpenAIBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")  # strict comes from OpenAIBody

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="below 1e-5: greedy")
    top_p: float | None = Field(default=None, ge=MIN_TOP_P, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description=f"choices per prompt, 1..{MAX_CHOICES}")
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, float] | None = None  # {"token id": bias in [-100, 100]}, as OpenAI
    # vLLM's sampling extensions, as its benchmark client (`vllm bench serve`) and others send them:
    # EOS never chosen / not before min_tokens (AR decoding, as the penalties); repetition_penalty only 1
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float | None = None
    skip_special_tokens: bool | None = None  # only true (vLLM's default): special tokens never reach the text here
    stop_token_ids: list[int] | None = None  # only EOS's id (a no-op): EOS is the one stop token here
    # ReFusion extensions
    mode: Literal["auto", "refusion", "ar"] = "auto"
    slot_size: int | None = Field(default=None, ge=1)
    serial_num_blocks: int | None = Field(default=None, ge=1)
    slot_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    token_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K, description="0 or -1 = off (vLLM's meaning; the engine's 0)")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="vLLM's: 0 = off; AR sampling only")
    max_time_ms: int | None = Field(default=None, ge=1)
    priority: Literal["interactive", "batch"] | None = None  # default: interactive with `suffix` (FIM), else batch
    # Structured outputs (integrations/structured_output.py): OpenAI's response_format (vLLM accepts it
    # on completions too) or vLLM's structured_outputs; decoded on the AR path
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's prompt_logprobs: the prompt tokens' log probabilities, with this many alternatives each
    prompt_logprobs: int | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value):
        return 0 if value == -1 else value  # vLLM reads -1 and 0 alike: all tokens

    @model_validator(mode="before")
    @classmethod
    def _guided_is_structured_outputs(cls, data):
        """vLLM's older guided_json / guided_regex / guided_choice / guided_grammar are its
        structured_outputs json / regex / choice / grammar (still sent by older clients)."""
        if not isinstance(data, dict) or not any(k in data for k in _GUIDED):
            return data
        data = dict(data)
        given = {k: data.pop(k) for k in [k for k in data if k in _GUIDED]}
        guided = {_GUIDED[k]: value for k, value in given.items() if value is not None}
        if guided:
            if data.get("structured_outputs") is not None:
                raise InputError(400, "structured_outputs", "give structured_outputs or vLLM's older guided_* "
                                 f"fields ({', '.join(k for k in given if given[k] is not None)}), not both")
            data["structured_outputs"] = guided
        return data

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs(cls, value, info):
        """vLLM's rules: 0 .. max logprobs (20 here, vLLM's default; its -1, the whole vocabulary, is not
        offered), and not with stream unless 0 (the scores are not streamed; 0 with stream returns none)."""
        if value is None:
            return None
        if not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ValueError(f"is {value}: give 0..{MAX_TOP_LOGPROBS} alternatives per prompt token (vLLM's -1, "
                             "the whole vocabulary, is not offered)")
        if value > 0 and info.data.get("stream"):
            raise ValueError("prompt log probabilities are not streamed (as vLLM): drop stream, or prompt_logprobs")
        return value

    @field_validator("skip_special_tokens")
    @classmethod
    def _special_tokens_skipped(cls, value):
        if value is False:
            raise ValueError("false is not supported (special tokens never reach the text here): drop it or send true")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, value):
        """Token ids; only the model's EOS is taken (openai_requests.generation_request checks it)."""
        if value and any(t < 0 for t in value):
            raise ValueError("token ids are non-negative integers")
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty_off(cls, value):
        if value is not None and value != 1.0:
            raise ValueError("only 1 (off) is supported here (vLLM's multiplicative penalty is not implemented): "
                             "use presence_penalty or frequency_penalty, or drop repetition_penalty")
        return value

    @field_validator("structured_outputs")
    @classmethod
    def _one_format(cls, value, info):
        response_format = info.data.get("response_format")  # validated first: declared before
        if value is not None and response_format is not None and response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return value

    @property
    def returns_prompt_logprobs(self) -> bool:
        """vLLM's prompt_logprobs are asked for and returned (not streamed: 0 with stream returns none)."""
        return self.prompt_logprobs is not None and not self.stream

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token when log probabilities are asked for (0: the chosen token's only), else
        None. Completions' `logprobs: N`; chat's `logprobs: true` with `top_logprobs: N`."""
        return None

    def output_grammar(self) -> GrammarSpec | None:
        """The grammar response_format or structured_outputs asks for (None: free text). InputError
        (400) naming the field: a schema, regex or grammar that does not compile, or mode "refusion"
        (structured output decodes autoregressively)."""
        if self.structured_outputs is not None:
            spec = self.structured_outputs.grammar_spec()
        else:
            spec = response_format_grammar(self.response_format)
        if spec is not None and self.mode == "refusion":
            raise InputError(400, "mode", "structured output (response_format or structured_outputs) is decoded "
                             "autoregressively: use mode \"auto\" or \"ar\", or drop the format")
        return spec

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value, info: ValidationInfo):
        """OpenAI allows 4 stop sequences; a route whose API allows more passes context max_stops
        (the Messages route: Anthropic documents no limit, this server takes MESSAGES_MAX_STOPS)."""
        stops = [value] if isinstance(value, str) else list(value or [])
        limit = (info.context or {}).get("max_stops", 4)
        if len(stops) > limit:
            raise ValueError(f"at most {limit} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value):
        """OpenAI's form: token ids (as JSON object keys, so strings) -> biases in [-100, 100]."""
        if not value:
            return None
        if len(value) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"has {len(value)} entries; give at most {MAX_LOGIT_BIAS_TOKENS}")
        seen = set()
        for key, bias in value.items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"key {key!r} is not a token id: use the tokenizer's ids as strings, e.g. \"50256\"")
            if int(key) in seen:
                raise ValueError(f"token {int(key)} appears twice (as {key!r}): give each token one bias")
            seen.add(int(key))
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"bias {bias} of token {key} is outside [-100, 100]")
        return value

    def decode_params(self, gen_length: int, model_defaults: dict | None = None, slot_size: int | None = None) -> dict:
        """The GenerationRequest.params this request sets (unset ones take the model's defaults).

        gen_length: tokens to generate (context_fit.fit_generation's); slot_size: one it chose so the
        generation fits the context, overriding the model's (the client's own is never overridden).
        ReFusion needs gen_length (rounded up to whole slots) to split into serial_num_blocks blocks of
        whole slots. When the client leaves serial_num_blocks unset, the largest block count up to the
        model default that fits is chosen, so any max_tokens works.
        """
        params: dict[str, Any] = {"gen_length": gen_length}
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "slot_size", "serial_num_blocks",
                     "slot_threshold", "token_threshold"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.num_logprobs is not None:
            params["logprobs"] = self.num_logprobs
        if self.returns_prompt_logprobs:
            params["prompt_logprobs"] = self.prompt_logprobs
        for name in ("presence_penalty", "frequency_penalty"):  # AR decoding: the engine runs such requests AR
            if getattr(self, name):
                params[name] = getattr(self, name)
        if self.logit_bias:
            params["logit_bias"] = {int(token): bias for token, bias in self.logit_bias.items()}
        for name in ("ignore_eos", "min_tokens"):  # AR decoding, as the penalties
            if getattr(self, name):
                params[name] = getattr(self, name)
        if slot_size is not None and self.slot_size is None:
            params["slot_size"] = slot_size
        if "temperature" in params:
            params["temperature"] = sampling_temperature(params["temperature"])
        defaults = model_defaults or {}
        if self.serial_num_blocks is None and "slot_size" in defaults | params:
            slot = params.get("slot_size", defaults.get("slot_size"))
            params["serial_num_blocks"] = fitting_block_count(params["gen_length"], slot, defaults.get("serial_num_blocks", 1))
        return params

    def slot_size_in_force(self, model_defaults: dict) -> int:
        """The slot size gen_length is rounded up to: the client's, else the model's, else the serving default."""
        return self.slot_size or model_defaults.get("slot_size") or SERVING_DEFAULTS["slot_size"]

    @property
    def max_tokens_field(self) -> str:
        """The name the client gave the token cap (chat may use max_completion_tokens)."""
        return "max_tokens"

    @property
    def engine_mode(self) -> Mode:
        return Mode(self.mode)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true (as OpenAI): remove it or stream")
        return value

    @property
    def engine_priority(self) -> Priority:
        """The client's class; unset, INTERACTIVE for a FIM completion (`suffix`: an editor's
        autocomplete, as /infill and the editor protocol are) and BATCH otherwise."""
        priority = self.priority or ("interactive" if getattr(self, "suffix", None) is not None else "batch")
        return Priority.INTERACTIVE if priority == "interactive" else Priority.BATCH

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats, which (as there) takes effect with include_usage."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


MAX_PROMPTS = 64
"""Most prompts in one /v1/completions batch (each runs as its own engine request, times `n`)."""


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
            raise ValueError("every prompt of a batch of token ids needs at least one token")
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

    def decode_params(self, gen_length: int, model_defaults: dict | None = None, slot_size: int | None = None) -> dict:
        """SamplingFields.decode_params, plus prompt_logprobs when the echoed prompt needs its scores
        (echo with logprobs; echo_only, which the engine runs as a scoring request, with 0 alternatives;
        the engine scores with the larger count when vLLM's prompt_logprobs is also set)."""
        params = super().decode_params(gen_length, model_defaults, slot_size)
        if self.echo and (self.logprobs is not None or self.echo_only):  # with vLLM's prompt_logprobs: the larger
            params["prompt_logprobs"] = max(self.logprobs or 0, params.get("prompt_logprobs", 0))
        return params


class FunctionSpec(OpenAIBody):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$",
                      description="OpenAI's rule: letters, digits, underscores and dashes, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(OpenAIBody):
    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatMessage(BaseModel):
    """One message; `content` may be a string or a list of {"type": "text", "text": ...} parts. Only an
    assistant message may leave it out (or send null): one that only calls tools, as OpenAI's API."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value, info):
        role = info.data.get("role")  # validated first: declared before
        if value is None and role is not None and role != "assistant":
            raise ValueError(f"is required in a {role} message: a string or text parts")
        if isinstance(value, list):
            texts = []
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        return value


class NamedFunction(OpenAIBody):
    name: str = Field(min_length=1)


class NamedToolChoice(OpenAIBody):
    """tool_choice {"type": "function", "function": {"name": ...}}: the model must call that tool."""

    type: Literal["function"] = "function"
    function: NamedFunction


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


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description=f"0..{MAX_TOP_LOGPROBS} alternatives per token; needs logprobs: true")
    # vLLM's extension: the last message is an assistant message the model continues (a prefill)
    continue_final_message: bool = False
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
