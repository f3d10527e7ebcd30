"""llama.cpp's POST /completion (its server's native completion route; tools/server/README.md): a plain
completion of `prompt`, answered in llama.cpp's shape, streamed or not.

The request maps onto an OpenAI completions body (integrations/openai_models.CompletionRequest) so it
runs exactly as /v1/completions does (context fit, CRLF/tab style, engine admission); llama.cpp's names
map over: n_predict -> max_tokens (-1: the server's default_max_tokens, less when fewer fit: this
server reserves KV for the whole generation, so "until the context is full" is not offered), n_probs ->
logprobs (`completion_probabilities`), json_schema and grammar (GBNF or Lark) -> structured outputs,
seed -1 -> a random seed (drawn here, reported in generation_settings), logit_bias as [[id, bias], ...]
or {"id": bias}, ignore_eos as on /v1/completions. Defaults are llama.cpp's: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05. Fields
that would change the output and are not applied (repeat_penalty other than 1, lora, ...) are a 400;
others are ignored (llama.cpp's clients send many). Errors: llama.cpp's shape, the message naming
llama.cpp's field.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, AsyncIterator

from pydantic import (BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from decoding.params import MAX_LOGIT_BIAS_TOKENS, MIN_TOP_P
from integrations.editor.protocol import MAX_STOP_STRINGS
from integrations.validation_errors import validation_field, validation_message
from integrations.openai_models import CompletionRequest
from integrations.request_limits import InputError, encode
from scheduler.api import Delta, FinishReason
from scheduler.validation import with_seed

# OpenAI body field a 400 may name -> llama.cpp's name of it
_FIELDS = [("response_format.json_schema.schema", "json_schema"), ("structured_outputs.grammar", "grammar"),
           ("max_tokens", "n_predict"), ("logprobs", "n_probs")]
# Not applied here, so refused unless at their "off" value (llama.cpp's defaults)
_OFF = {"repeat_penalty": 1.0, "lora": [], "mirostat": 0, "dry_multiplier": 0.0,
        "xtc_probability": 0.0, "typical_p": 1.0, "post_sampling_probs": False, "dynatemp_range": 0.0,
        "top_n_sigma": -1.0, "n_indent": 0, "t_max_predict_ms": 0, "n_cmpl": 1, "image_data": [],
        "grammar_lazy": False}


def llama_field(field: str | None) -> str | None:
    """The llama.cpp name of an OpenAI completions field (`max_tokens` -> `n_predict`, ...)."""
    for ours, theirs in _FIELDS:
        if field == ours or (field or "").startswith(ours + "."):
            return theirs + field[len(ours):]
    return field


class LlamaBody(BaseModel):
    """A llama.cpp request object (/completion, /infill): JSON null is "not given" (llama.cpp's
    json_value reads null as the default); types are strict, so "5", true or "yes" for a number or a flag
    is a 400 naming the field (llama.cpp silently takes the default for a wrong type, which hides the
    client's mistake; an int is still a float). Unknown fields are accepted and ignored, as llama.cpp does."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _greedy_at_or_below_zero(cls, value: float) -> float:
        """llama.cpp samples greedily at a temperature <= 0 (a negative one is greedy too: its sampling
        code's "temp < 0.0 -> probs"); 0 is this server's greedy."""
        return max(value, 0.0)

    @field_validator("top_p", check_fields=False)
    @classmethod
    def _one_token_at_zero(cls, value: float) -> float:
        """llama.cpp's top_p 0 keeps its one min_keep token (greedy); the decoders' least top_p,
        decoding.params.MIN_TOP_P, keeps one token too."""
        return max(value, MIN_TOP_P)


def llama_timings(prompt_n: int, cached: int, prompt_ms: float, predicted_n: int, predicted_ms: float) -> dict:
    """llama.cpp's `timings` of a result: prompt_n counts the prompt tokens processed (`cached` ones the
    prefix cache served are not), prompt_ms and predicted_ms in milliseconds, with the per-token and
    per-second figures llama.cpp derives from them."""
    processed = max(prompt_n - cached, 0)
    return {
        "prompt_n": processed,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / processed, 3) if processed else 0.0,
        "prompt_per_second": round(1000.0 * processed / prompt_ms, 3) if prompt_ms else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / predicted_n, 3) if predicted_n else 0.0,
        "predicted_per_second": round(1000.0 * predicted_n / predicted_ms, 3) if predicted_ms else 0.0,
    }


def completion_defaults() -> dict:
    """The sampling values POST /completion applies to a field it is not sent (llama.cpp's), as GET /props
    reports them: temperature, top_k, top_p, min_p, penalties, n_probs, seed (-1: a random one)."""
    names = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "n_probs", "seed")
    return {name: LlamaCompletionBody.model_fields[name].default for name in names}


class LlamaCompletionBody(LlamaBody):
    """POST /completion (module docstring)."""

    prompt: str | list[int]  # one prompt (_one_prompt)
    n_predict: int = Field(-1, ge=-1)
    temperature: float = Field(0.8, le=2)  # <= 0: greedy (LlamaBody)
    top_k: int = 40  # <= 0: off, as llama.cpp (its README's -1 included)
    top_p: float = Field(0.95, ge=0, le=1)  # 0: one token (LlamaBody)
    min_p: float = Field(0.05, ge=0, le=1)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt(cls, value, handler, info: ValidationInfo):
        """llama.cpp also takes a prompt mixing strings and token ids, and a list of prompts; here a prompt
        is one string or one list of token ids, and the 400 says so and what to send (pydantic's was "Input
        should be a valid string"), the routes named under context root_path (route_errors.read_body)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(_prompt_form_error(value, (info.context or {}).get("root_path", ""))) from None

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int) -> int:
        return max(0, value)  # (a negative top_k was a 400 here, while /v1/completions and llama.cpp take -1)

    # -1 (llama.cpp's default): a random seed, drawn when the body is read so that generation_settings
    # reports the seed used and a sample can be repeated (as /infill's does)
    seed: int = Field(-1, ge=-1, validate_default=True)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)  # llama.cpp: any number; as /infill
    stream: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # [[id or text, bias or false]] (a JSON pair is a list: a tuple only in lax mode), {"id or text": ...}
    logit_bias: list[Annotated[tuple[int | str, bool | float], Strict(False)]] | dict[str, bool | float] | None = None
    n_probs: int = Field(0, ge=0, le=20)
    grammar: str = ""
    json_schema: dict[str, Any] | None = None
    ignore_eos: bool = False
    return_tokens: bool = False
    response_fields: list[str] | None = None
    mode: str = "auto"  # ReFusion extension

    @field_validator("seed")
    @classmethod
    def _draw_seed(cls, seed: int) -> int:
        return with_seed({})["seed"] if seed == -1 else seed

    def openai_body(self, tokenizer=None) -> CompletionRequest:
        """The /v1/completions body this request is; `tokenizer` reads logit_bias's text entries (without
        one they are a 400). Raises InputError naming llama.cpp's field."""
        for name, off in _OFF.items():
            value = (self.model_extra or {}).get(name, off)
            if value is not None and value != off:
                raise InputError(400, name, f"is not applied by this server: remove it or set it to {off!r}")
        body: dict[str, Any] = {
            # n_predict -1: unset (the server's default, shrunk to the room left); 0: one token to evaluate the
            # prompt into the cache, not returned (llama.cpp generates none)
            "prompt": self.prompt, "max_tokens": {-1: None, 0: 1}.get(self.n_predict, self.n_predict),
            "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
            "stop": self.stop, "mode": self.mode, "stream": self.stream,
        }
        body["seed"] = self.seed
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                body[name] = getattr(self, name)
        if self.logit_bias:
            body["logit_bias"] = _openai_bias(self.logit_bias, tokenizer)
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.n_probs:
            body["logprobs"] = self.n_probs
        if self.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "json_schema", "schema": self.json_schema}}
        if self.grammar:
            if self.json_schema is not None:
                raise InputError(400, "grammar", "give grammar or json_schema, not both")
            body["structured_outputs"] = {"grammar": self.grammar}
        try:
            return CompletionRequest.model_validate(body, context={"max_stops": MAX_STOP_STRINGS})
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            raise InputError(400, llama_field(validation_field(tuple(error["loc"]))), validation_message(error)) from None


def _openai_bias(bias, tokenizer=None) -> dict[str, float]:
    """llama.cpp's [[token id or text, bias], ...] (or {"id or text": bias}) -> OpenAI's {"id": bias}; a
    bias of false (llama.cpp: never this token) is -100. A text is every token it encodes to, as plain text
    (llama.cpp's "Hello, World!" example); in an array a string is always a text, an object key of digits
    an id (llama.cpp reads keys with strtol). At most MAX_LOGIT_BIAS_TOKENS tokens in all. Each bias is in
    OpenAI's [-100, 100] (as on /v1/completions). A token listed twice gets the sum of its biases, as
    llama.cpp adds every pair to the logit, held to [-100, 100]; a false among them keeps it banned (the
    last pair won: [[5, false], [5, 1]] raised a banned token, helper-192)."""
    out: dict[str, float] = {}
    banned = set()
    pairs = []
    for token, value in (bias.items() if isinstance(bias, dict) else bias):
        if value is True:
            raise InputError(400, "logit_bias", f"token {token!r}: a bias is a number, or false to ban the token")
        if value is not False and not -100 <= value <= 100:
            raise InputError(400, "logit_bias", f"token {token!r}: bias {value} is outside [-100, 100]")
        if isinstance(token, int) or (isinstance(bias, dict) and _ID_KEY.fullmatch(token)):
            digits = str(token).strip(" \t\n\v\f\r+-").lstrip("0")
            if len(digits) > 20:  # (int() of 4,300 digits raises; no vocabulary is that large)
                raise InputError(400, "logit_bias", f"token {digits[:24]}...: not a token id of this model")
            if int(token) < 0:
                raise InputError(400, "logit_bias", f"token {token}: ids are 0 or more (a text is any other string)")
            pairs.append((str(int(token)), value))
        elif tokenizer is None:
            raise InputError(400, "logit_bias", f"token {token!r}: give token ids here")
        else:  # (as plain text, as llama.cpp's tokenize without parse_special: "<|endoftext|>" is not the EOS)
            pairs.extend((str(t), value) for t in encode(tokenizer, token, parse_special=False))
    for token, value in pairs:
        if value is False:
            banned.add(token)
        else:
            out[token] = out.get(token, 0.0) + float(value)
    biased = {**{token: min(100.0, max(-100.0, value)) for token, value in out.items()}, **dict.fromkeys(banned, -100.0)}
    if len(biased) > MAX_LOGIT_BIAS_TOKENS:
        raise InputError(400, "logit_bias", f"biases {len(biased):,} tokens (each text counts the tokens it encodes "
                                            f"to); at most {MAX_LOGIT_BIAS_TOKENS} tokens may be biased")
    return biased


def _prompt_form_error(prompt, root: str = "") -> str:
    """Why `prompt` is not one of /completion's two forms, and what to send instead; routes are named
    under `root` (the app's root_path, as route_hints names them)."""
    taken = "one string or one list of token ids (integers)"
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return (f"is a list of strings (llama.cpp's several prompts); a prompt here is {taken}: send one prompt "
                f"per request, or the list to {root}/v1/completions, which takes a batch")
    if isinstance(prompt, list) and any(isinstance(p, str) for p in prompt):
        return (f"mixes strings and token ids (llama.cpp's mixed prompt), which this server does not take; a prompt "
                f"here is {taken}: send the text as one string, or tokenize the strings (POST {root}/tokenize) and "
                f"send one list of ids")
    return f"must be {taken}"


# An object key llama.cpp reads as a token id (strtol to its end: C's blanks and a sign before the digits;
# not Python's \s, which int() does not all take: "\x1c7" was a 500, helper-196)
_ID_KEY = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


def llama_result(client, body: LlamaCompletionBody, prompt_ids: list[int], text: str, last: Delta, tokens: int,
                 probabilities: list | None, started: float, first_token_s: float | None, n_ctx: int,
                 ids: list[int] = (), has_new_line: bool | None = None) -> dict:
    """llama.cpp's completion result (the final event of a stream carries it, with its own content);
    ids: the generated token ids (`tokens` with return_tokens)."""
    stats = last.stats or {}
    word = stats.get("stop_word") or ""
    stop_type = ("word" if word else "eos") if last.finish_reason is FinishReason.STOP else "limit"
    if body.n_predict == 0:  # the token decoded to fill the cache is not shown: the limit ended it (as llama.cpp)
        stop_type, word = "limit", ""
    total_ms = (time.perf_counter() - started) * 1000.0
    prompt_ms = ((first_token_s or time.perf_counter()) - started) * 1000.0
    predicted_ms = max(total_ms - prompt_ms, 0.0)
    prompt_n = len(prompt_ids)
    result = {
        "index": 0, "content": text, "id_slot": 0, "stop": True, "model": client.model_name,
        "tokens_predicted": tokens, "tokens_evaluated": prompt_n,
        "tokens": list(ids) if body.return_tokens else [],
        "generation_settings": {"n_predict": body.n_predict, "n_ctx": n_ctx, "model": client.model_name,
                                "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
                                "min_p": body.min_p, "seed": body.seed, "stop": list(body.stop),
                                "n_probs": body.n_probs, "stream": body.stream, "mode": body.mode},
        "prompt": client.tokenizer.decode(prompt_ids), "truncated": False,
        "has_new_line": "\n" in text if has_new_line is None else has_new_line,
        "stop_type": stop_type, "stopping_word": word if stop_type == "word" else "",
        "tokens_cached": int(stats.get("cached_prompt_tokens") or 0),
        "timings": llama_timings(prompt_n, int(stats.get("cached_prompt_tokens") or 0), prompt_ms, tokens, predicted_ms),
    }
    if probabilities is not None:
        result["completion_probabilities"] = probabilities
    return result


def llama_probabilities(formatter, entries) -> list[dict]:
    """llama.cpp's completion_probabilities: per token {id, token, bytes, logprob, top_logprobs: [{id,
    token, bytes, logprob}]} (n_probs alternatives), from the engine's TokenLogprob entries."""
    def one(token: int, logprob: float) -> dict:
        return {"id": token, "token": formatter.text(token), "bytes": formatter.token_bytes(token), "logprob": logprob}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top[:formatter.num_top]]}
            for e in entries]


async def llama_events(client, body: LlamaCompletionBody, prompt_ids: list[int], deltas: AsyncIterator[Delta],
                       formatter, started: float, n_ctx: int) -> AsyncIterator[dict]:
    """stream=true: one event per text piece ({index, content, tokens, stop: false}, plus its
    completion_probabilities), then the final result with stop true and content "" (all sent before)."""
    tokens, first, last, new_line = 0, None, None, False
    quiet = body.n_predict == 0  # the prompt evaluated into the cache only: nothing generated is shown
    async for delta in deltas:
        last = delta
        if quiet:
            continue
        tokens, new_line = tokens + len(delta.token_ids), new_line or "\n" in delta.text
        if delta.token_ids and first is None:
            first = time.perf_counter()
        if delta.text or delta.token_ids:
            piece = {"index": 0, "content": delta.text, "tokens": list(delta.token_ids), "stop": False}
            if formatter is not None:
                piece["completion_probabilities"] = llama_probabilities(formatter, delta.logprobs or [])
            yield piece
    yield llama_result(client, body, prompt_ids, "", last, tokens, [] if formatter is not None else None, started,
                       first, n_ctx, has_new_line=new_line)
