"""The sampling and decoding fields /v1/completions and /v1/chat/completions share (OpenAI's, vLLM's
extensions and ReFusion's), their checks, and their mapping onto scheduler.api.GenerationRequest params.

ReFusion extensions: `mode` ("auto" | "refusion" | "ar"), `slot_size`, `serial_num_blocks`,
`slot_threshold`, `token_threshold`, `top_k`, `max_time_ms`, `priority`; vLLM's `structured_outputs`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from decoding.grammar import GrammarSpec
from decoding.params import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_TOKENS, MAX_PENALTY, MAX_TOP_K, SERVING_DEFAULTS
from integrations.openai_body import OpenAIBody, ResponseFormat, StreamOptions, StructuredOutputs
from integrations.openai_choices import MAX_CHOICES
from integrations.request_limits import MAX_SEED, MIN_TOP_P, InputError, long_stop_fault, sampling_temperature
from integrations.structured_output import response_format_grammar
from scheduler.api import MAX_TIME_MS, Mode, Priority
from workers.batch import MAX_TOP_LOGPROBS


_TOKEN_ID = re.compile(r"[0-9]{1,10}")  # a logit_bias key: ASCII digits (str.isdigit also takes "²" and "٢")


def fitting_block_count(gen_length: int, slot_size: int, preferred: int) -> int:
    """Largest block count <= preferred that splits gen_length (rounded up to whole slots) into blocks
    of whole slots; 1 always fits."""
    slots = -(-gen_length // slot_size)
    return max(b for b in range(1, max(1, preferred) + 1) if slots % b == 0)


BLOCK_ROUNDING = 0.1  # most extra share of a generation decoded so it splits into the preferred blocks


def fitting_blocks(gen_length: int, slot_size: int, preferred: int, room: int | None = None) -> tuple[int, int]:
    """(gen_length, serial_num_blocks) for a client that set no block count: the model's `preferred`
    blocks when gen_length's whole slots split into them, else the slots rounded up by at most
    BLOCK_ROUNDING (and within `room`, the context left; None: no rounding) to a count that splits into
    as many blocks as can be, else fitting_block_count's. Without the rounding a prime slot count (321
    tokens: 41 slots of 8) was one block, whose ReFusion pool, and so its KV estimate, is the whole
    generation: max_tokens 321 was refused where 512 fitted. The engine still stops at the client's
    max_tokens (GenerationRequest.max_tokens); the extra positions cost compute, at most 10%."""
    slots = -(-gen_length // slot_size)
    best = (fitting_block_count(gen_length, slot_size, preferred), slots)
    if room is not None and best[0] < preferred < slots:
        most = min(int(slots * (1 + BLOCK_ROUNDING)), room // slot_size)
        for rounded in range(slots + 1, most + 1):
            blocks = fitting_block_count(rounded * slot_size, slot_size, preferred)
            if blocks > best[0]:
                best = (blocks, rounded)
            if blocks == preferred:
                break
    blocks, rounded = best
    return (gen_length if rounded == slots else rounded * slot_size), blocks


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class SamplingFields(OpenAIBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")  # strict comes from OpenAIBody

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="below 1e-5: greedy")
    top_p: float | None = Field(default=None, ge=MIN_TOP_P, le=1.0)
    # any signed 64-bit integer, as vLLM takes it; a negative one is read modulo 2^63 (the device's range)
    seed: int | None = Field(default=None, ge=-(MAX_SEED + 1), le=MAX_SEED)
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
    include_stop_str_in_output: bool = False  # vLLM's: the `stop` string that ended the text is returned with it
    # ReFusion extensions
    mode: Literal["auto", "refusion", "ar"] = "auto"
    slot_size: int | None = Field(default=None, ge=1)
    serial_num_blocks: int | None = Field(default=None, ge=1)
    slot_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    token_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K, description="0 or -1 = off (vLLM's meaning; the engine's 0)")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="vLLM's: 0 = off; AR sampling only")
    max_time_ms: int | None = Field(default=None, ge=1, le=MAX_TIME_MS)
    # default: interactive with `suffix` (FIM), else batch; vLLM's integer priority 0 (its default) is unset
    priority: Literal["interactive", "batch"] | int | None = None
    # Structured outputs (integrations/structured_output.py): OpenAI's response_format (vLLM accepts it
    # on completions too) or vLLM's structured_outputs; decoded on the AR path
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's prompt_logprobs: the prompt tokens' log probabilities, with this many alternatives each
    prompt_logprobs: int | None = None

    @field_validator("priority")
    @classmethod
    def _vllm_priority(cls, value):
        """vLLM's `priority` is an integer that needs its priority scheduling policy; under its default
        policy only 0 is taken, as here (the default class)."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value != 0:
                raise ValueError(f"is {value}: this server's classes are \"interactive\" and \"batch\" (vLLM's "
                                 "integer priority is taken only as 0, its default)")
            return None
        return value

    @field_validator("seed")
    @classmethod
    def _seed_in_device_range(cls, value):
        return None if value is None else value % (MAX_SEED + 1)

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
            names = [k for k in given if given[k] is not None]
            if data.get("structured_outputs") is not None:
                raise InputError(400, "structured_outputs", "give structured_outputs or vLLM's older guided_* "
                                 f"fields ({', '.join(names)}), not both")
            try:
                outputs = StructuredOutputs.model_validate(guided)
            except ValidationError as exc:  # named as sent: the client never wrote structured_outputs
                error = exc.errors()[0]
                where = {v: k for k, v in _GUIDED.items()}.get(str(error["loc"][0]) if error["loc"] else "", names[0])
                message = error["msg"].removeprefix("Value error, ")
                if message.startswith("give exactly one of"):
                    message = f"give exactly one of guided_json, guided_regex, guided_choice or guided_grammar (got {', '.join(names)})"
                raise InputError(400, where, message) from None
            outputs._sent_as = {kind: name for name, kind in _GUIDED.items() if name in names}
            data["structured_outputs"] = outputs
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
            sent = sorted(value._sent_as.values())
            if sent:  # (vLLM's older guided_* fields: named as sent)
                raise InputError(400, sent[0], f"give response_format or {sent[0]}, not both")
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
            # (worded for every route that sends a format: chat's response_format, Responses' text.format, ...)
            raise InputError(400, "mode", "structured output (an output format) is decoded autoregressively: use "
                             "mode \"auto\" or \"ar\", or drop the format")
        return spec

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value, info: ValidationInfo):
        """OpenAI allows 4 stop sequences; a route whose API allows more passes context max_stops
        (the Messages route: Anthropic documents no limit, this server takes MESSAGES_MAX_STOPS). Each
        is at most MAX_STOP_CHARS characters (request_limits.long_stop_fault)."""
        stops = [value] if isinstance(value, str) else list(value or [])
        limit = (info.context or {}).get("max_stops", 4)
        if len(stops) > limit:
            raise ValueError(f"at most {limit} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if (fault := long_stop_fault(stops)) is not None:
            raise ValueError(fault)
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

    def decode_params(self, gen_length: int, model_defaults: dict | None = None, slot_size: int | None = None,
                      room: int | None = None) -> dict:
        """The GenerationRequest.params this request sets (unset ones take the model's defaults).

        gen_length: tokens to generate (context_fit.fit_generation's); slot_size: one it chose so the
        generation fits the context, overriding the model's (the client's own is never overridden).
        ReFusion needs gen_length (rounded up to whole slots) to split into serial_num_blocks blocks of
        whole slots. When the client leaves serial_num_blocks unset, the model default is kept where
        gen_length splits into it, or splits once rounded up by at most 10% within `room` (the context
        left; the engine still stops at max_tokens), else the largest block count that fits
        (`fitting_blocks`), so any max_tokens works. When the client sets serial_num_blocks, gen_length is
        rounded up to whole steps of slot_size x serial_num_blocks (the engine still stops at max_tokens;
        context_fit.fit_generation counted them against the context): max_tokens 33 in 8 x 8 was a 400
        on serial_num_blocks (helper-193, -195).
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
            params["gen_length"], params["serial_num_blocks"] = fitting_blocks(
                params["gen_length"], slot, defaults.get("serial_num_blocks", 1), room)
        elif self.serial_num_blocks is not None:  # the client's blocks: gen_length in whole steps of them
            step = (params.get("slot_size") or self.slot_size_in_force(defaults)) * self.serial_num_blocks
            params["gen_length"] = -(-params["gen_length"] // step) * step  # (context_fit counted them)
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
