"""llama.cpp's and vLLM's tokenizer and server-info routes; integrations/editor/http.py includes `router`.

    POST      /tokenize        llama.cpp's token helper (llama.vscode counts prompt tokens with it), vLLM's too
    POST      /detokenize      llama.cpp's and vLLM's: ids -> text
    POST      /apply-template  llama.cpp's: chat messages -> the prompt text the chat route runs
    GET       /props           llama.cpp's server properties (context, decode defaults, template)
    GET       /tokenizer_info  vLLM's tokenizer settings (lm-evaluation-harness's remote tokenizer)

They read the tokenizer of `app.state.engine_client` (integrations/engine_client.py) and never reach the
engine. Errors have llama.cpp's shape (integrations/editor/route_errors.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from integrations.chat_run import chat_prompt
from integrations.editor.llama_compat import compact_json
from integrations.editor.route_errors import app_limits, error_body, read_body
from integrations.validation_errors import validation_field, validation_message
from integrations.llama_completion import completion_defaults
from integrations.openai_calls import check_model
from integrations.openai_messages import ChatMessage, ToolSpec
from integrations.openai_models import ChatCompletionRequest, check_generation_prompt
from integrations.request_limits import InputError, encode, off_loop
from integrations.token_bytes import token_bytes

router = APIRouter()


class ChatFormFields(BaseModel):
    """The chat form's options that /tokenize (vLLM's) and /apply-template (llama.cpp's) share with the
    messages: the prompt /v1/chat/completions runs for them, or with add_generation_prompt false the
    conversation without the assistant turn's opening (llama.cpp's and vLLM's default: true)."""

    tools: list[ToolSpec] | None = None  # the tools the chat template lists
    tool_choice: Any = None  # as chat's ("none" leaves the tools out, a forced call adds its opening)
    # vLLM's: the last (assistant) message left open, as chat runs it (a strict boolean as on chat; null
    # is unset). Before add_generation_prompt: its check reads this one.
    continue_final_message: StrictBool | None = None
    # null: open the assistant's turn unless continue_final_message is set; false: the conversation alone
    add_generation_prompt: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # as on chat: extra chat-template variables

    @field_validator("add_generation_prompt")
    @classmethod
    def _generation_prompt(cls, add, info):
        """vLLM's rule (openai_models.check_generation_prompt); false alone is taken, unlike on chat."""
        return check_generation_prompt(add, info.data.get("continue_final_message"), opens_turn=False)


class TokenizeBody(ChatFormFields):
    """The /tokenize request: llama.cpp's fields, or vLLM's (`prompt`, or chat `messages` and the chat
    form's options rendered as /v1/chat/completions does, ChatFormFields). Other unknown fields are
    ignored (llama.cpp's rule)."""

    content: str | None = None
    prompt: str | None = None  # vLLM's name of content
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # vLLM: the chat prompt's tokens
    add_special: bool = False  # insert the tokenizer's special tokens (BOS, when it has one)
    add_special_tokens: bool | None = None  # vLLM's name of add_special
    parse_special: bool = True  # false: special-token text such as "<|endoftext|>" is plain text
    with_pieces: bool = False  # each token as {"id", "piece"}
    model: str | None = None  # vLLM's: one of the served ids (404 model_not_found otherwise)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """A field sent as null is a field not sent, as on every llama.cpp route (add_special, with_pieces,
        parse_special were refused as "not a valid boolean")."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("content", "prompt", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of content (llama.cpp), prompt or messages (vLLM), got {given or 'none'}")
        if self.prompt is not None:
            self.content = self.prompt
        if self.add_special_tokens is not None:
            self.add_special = self.add_special_tokens
        return self


async def _chat_form_ids(tokenizer, request: Request, body) -> list[int]:
    """The ids of /tokenize's chat form and /apply-template (`body`: their messages and ChatFormFields):
    the chat turn's prompt, its assistant turn left unopened with add_generation_prompt false. Raises
    InputError naming the field."""
    prompt = await chat_prompt(tokenizer, app_limits(request), _chat_turn(body),
                               generation_prompt=body.add_generation_prompt is not False)
    return prompt.ids


def _chat_turn(body) -> ChatCompletionRequest:
    """The chat turn whose prompt /tokenize's chat form and /apply-template give (`body`: their messages,
    tools, tool_choice, continue_final_message). Raises InputError naming the field."""
    fields = {"messages": [m.model_dump(exclude_none=True) for m in body.messages],
              "continue_final_message": bool(body.continue_final_message)}
    if body.tools is not None:
        fields["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
    if body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    if body.chat_template_kwargs is not None:
        fields["chat_template_kwargs"] = body.chat_template_kwargs
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InputError(400, validation_field(tuple(first["loc"])), validation_message(first)) from None


class DetokenizeBody(BaseModel):
    """The /detokenize request (llama.cpp and vLLM): token ids (JSON integers, not strings or booleans)."""

    tokens: list[StrictInt]
    model: str | None = None  # vLLM's: one of the served ids (404 model_not_found otherwise)


@router.post("/tokenize")
async def tokenize_route(request: Request) -> Response:
    """llama.cpp /tokenize: {"content", "add_special", "parse_special", "with_pieces"} -> {"tokens": [ids]},
    or [{"id", "piece"}] with with_pieces (piece: the token's text, or its bytes as a list of ints when
    they are not valid UTF-8 on their own). `content` is limited to max_prompt_chars characters and
    tokenized off the event loop. Errors: 400 naming the field, 404 model_not_found for a `model` (vLLM's
    field) that is not a served id, 413 for a body over max_body_bytes."""
    limits = app_limits(request)
    tokenizer = request.app.state.engine_client.tokenizer
    try:
        body = await read_body(request, TokenizeBody)
        check_model(request, body.model)
        if body.messages is not None:  # vLLM's chat form: the prompt /v1/chat/completions would run
            ids = await _chat_form_ids(tokenizer, request, body)
            tokens = [{"id": i, "piece": _piece(tokenizer, i)} for i in ids] if body.with_pieces else ids
        else:
            limits.check_chars("prompt" if body.prompt is not None else "content", body.content)
            tokens = await off_loop(tokenize, tokenizer, body, chars=len(body.content))
    except InputError as exc:
        status, payload, headers = error_body(exc)
        return JSONResponse(payload, status, headers=headers)
    # llama.cpp's {"tokens"} plus vLLM's count and max_model_len
    payload = {"tokens": tokens, "count": len(tokens), "max_model_len": limits.context_length}
    return Response(compact_json(payload), media_type="application/json")


@router.post("/detokenize")
async def detokenize_route(request: Request) -> Response:
    """llama.cpp / vLLM /detokenize: {"tokens": [ids]} -> {"content": text} (llama.cpp's key) and
    {"prompt": text} (vLLM's), special tokens included, decoded off the event loop. Errors: 400 naming
    `tokens` (not ids of the vocabulary), 404 model_not_found for a `model` that is not a served id (vLLM),
    413 for a body over max_body_bytes (which bounds the work)."""
    tokenizer = request.app.state.engine_client.tokenizer
    try:
        body = await read_body(request, DetokenizeBody)
        check_model(request, body.model)
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InputError(400, "tokens", f"ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    except InputError as exc:
        status, payload, headers = error_body(exc)
        return JSONResponse(payload, status, headers=headers)
    text = await off_loop(tokenizer.decode, body.tokens, chars=len(body.tokens))
    return Response(compact_json({"content": text, "prompt": text}), media_type="application/json")


class ApplyTemplateBody(ChatFormFields):
    """The /apply-template request (llama.cpp): chat `messages`, and `tools`, `tool_choice`,
    `continue_final_message`, `add_generation_prompt`, `chat_template_kwargs` as /tokenize's chat form
    takes them (ChatFormFields). Other fields are ignored (llama.cpp)."""

    messages: list[ChatMessage] = Field(min_length=1)


@router.post("/apply-template")
async def apply_template_route(request: Request) -> Response:
    """llama.cpp's /apply-template: {"messages": [...]} -> {"prompt": text}, the prompt
    /v1/chat/completions runs for them (chat template or the plain one, tools, a forced call's
    opening; the same tokens /tokenize counts, decoded); add_generation_prompt false leaves the
    assistant turn's opening out, as llama.cpp does. Errors: 400 naming the field, 413."""
    tokenizer = request.app.state.engine_client.tokenizer
    try:
        body = await read_body(request, ApplyTemplateBody)
        ids = await _chat_form_ids(tokenizer, request, body)
    except InputError as exc:
        status, payload, headers = error_body(exc)
        return JSONResponse(payload, status, headers=headers)
    text = await off_loop(tokenizer.decode, ids, chars=len(ids))
    return Response(compact_json({"prompt": text}), media_type="application/json")


@router.get("/props")
async def props_route(request: Request) -> Response:
    """llama.cpp's GET /props, what its clients read to configure themselves: the context
    (`default_generation_settings.n_ctx`) and the defaults `/completion` applies (`params`: the model's
    decode defaults, under llama.cpp's sampling defaults; `n_predict` the server's), the model's name
    (`model_alias`, `model_path`), `chat_template` (the tokenizer's; "" with the plain template,
    integrations/chat.py), `chat_template_caps`, `modalities` (text only), `bos_token`, `eos_token`,
    `build_info`. Setting props (llama.cpp's POST /props) is not offered."""
    tokenizer = request.app.state.engine_client.tokenizer
    settings = getattr(request.app.state, "settings", None)
    defaults = dict(settings.decode_defaults) if settings is not None else {}
    name = settings.model_name if settings is not None else request.app.state.engine_client.model_name
    # what /completion uses for a field it is not sent: llama.cpp's sampling defaults over the model's
    params = {**defaults, **completion_defaults(),
              "n_predict": settings.default_max_tokens if settings is not None else None}
    payload = {
        "default_generation_settings": {"n_ctx": app_limits(request).context_length, "params": params},
        "total_slots": None,  # the engine's running requests are not slots; /v1/engine has its limits
        "model_alias": name, "model_path": name,
        "modalities": {"vision": False, "audio": False},
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
        "chat_template_caps": {"supports_tools": True, "supports_tool_calls": True,
                               "supports_parallel_tool_calls": True, "supports_system_role": True},
        "bos_token": getattr(tokenizer, "bos_token", None) or "", "eos_token": getattr(tokenizer, "eos_token", None) or "",
        "build_info": "refusion-serve",
    }
    return Response(compact_json(payload), media_type="application/json")


@router.get("/tokenizer_info")
async def tokenizer_info_route(request: Request) -> Response:
    """vLLM's GET /tokenizer_info (its tokenizer_config.json equivalent), which lm-evaluation-harness
    reads, with /tokenize and /detokenize, to tokenize on the server ("remote tokenizer"):
    `tokenizer_class`, `eos_token`, `bos_token`, `pad_token`, `unk_token`, `mask_token` (null when the
    tokenizer has none), `model_max_length` (the served context, tokens) and `chat_template` (the
    tokenizer's Jinja template; null with the plain template, integrations/chat.py)."""
    tokenizer = request.app.state.engine_client.tokenizer
    payload = {"tokenizer_class": type(tokenizer).__name__,
               **{k: getattr(tokenizer, k, None)
                  for k in ("eos_token", "bos_token", "pad_token", "unk_token", "mask_token")},
               "model_max_length": app_limits(request).context_length,
               "chat_template": getattr(tokenizer, "chat_template", None) or None}
    return Response(compact_json(payload), media_type="application/json")


def tokenize(tokenizer, body: TokenizeBody) -> list:
    """The ids (or pieces) of /tokenize; CPU-bound, run off the event loop."""
    ids = encode(tokenizer, body.content, body.add_special, body.parse_special)
    if not body.with_pieces:
        return ids
    return [{"id": i, "piece": _piece(tokenizer, i)} for i in ids]


def _piece(tokenizer, token_id: int) -> str | list[int]:
    """A token's text; its bytes (ints) when they are not valid UTF-8 alone (byte-level BPE splits
    multi-byte characters), as llama.cpp's with_pieces."""
    raw = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
    data = token_bytes(tokenizer, token_id) if "\ufffd" in raw else None
    if data is None:
        return raw
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)
