"""Chat messages -> prompt text.

With a tokenizer that has a chat template (Qwen3 and most instruction models), the template renders
the messages and the tool list (`apply_chat_template(..., tools=..., add_generation_prompt=True)`).

Without one (the shipped tiny model, the test models) this plain template is used:

    ### System
    <system text>
    ### Tools                                   (only when the request lists tools)
    To call a function, reply with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
    {"name": ..., "description": ..., "parameters": {...}}      (one line per tool)
    ### User
    <user text>
    ### Assistant
    <assistant text, tool calls written as <tool_call>{...}</tool_call>>
    ### Tool result (call_id)                  (its line breaks and control characters as JSON escapes)
    <tool message text>
    ### Assistant
                                                (generation starts here)

With `continue_final_message` (vLLM's chat extension; an Anthropic assistant prefill) the last message
is an assistant message whose turn stays open: the prompt ends with its text (`### Assistant\n<text>`,
or the template's `continue_final_message=True` rendering) and generation continues it.

Each section header sits on its own line; `PLAIN_STOP` ends generation when the model starts the next
section by itself.
"""

from __future__ import annotations

import hashlib
import json

from integrations.openai_messages import ChatMessage, ToolSpec
from integrations.request_limits import InputError, RequestLimits, encode
from integrations.tool_calls import TOOL_CLOSE, TOOL_OPEN, read_json

PLAIN_STOP = "\n### "

_ROLE_HEADERS = {
    "system": "### System",
    "developer": "### System",
    "user": "### User",
    "assistant": "### Assistant",
}


class ChatTemplateError(ValueError):
    """The tokenizer's chat template refused the messages (HTTP 400 on `messages`)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[ChatMessage], tools: list[ToolSpec] | None,
                continue_final: bool = False, template_kwargs: dict | None = None,
                generation_prompt: bool = True) -> tuple[str, list[str]]:
    """(prompt text, extra stop strings) for a chat request; continue_final: the last (assistant) message's
    turn is left open for the model to continue (module docstring); generation_prompt False: no assistant
    turn is opened either (the conversation as it stands: /tokenize's and /apply-template's
    add_generation_prompt false; the chat route always opens one); template_kwargs: vLLM's
    chat_template_kwargs, extra variables of the tokenizer's chat template (`enable_thinking` for Qwen3's);
    the plain template has none, so they change nothing there (as Jinja ignores variables a template
    does not read)."""
    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(
                [_template_message(m) for m in messages],
                tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None,
                add_generation_prompt=generation_prompt and not continue_final,
                continue_final_message=continue_final,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # jinja raises on orders/roles a template does not accept
            raise ChatTemplateError(f"the model's chat template rejected the messages: {exc}") from exc
        return text, []
    return render_plain(messages, tools, continue_final, generation_prompt), [PLAIN_STOP]


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], tools: list[ToolSpec] | None,
                    limits: RequestLimits, continue_final: bool = False,
                    template_kwargs: dict | None = None, generation_prompt: bool = True) -> tuple[list[int], list[str]]:
    """The chat's prompt token ids and extra stop strings: render_chat, the rendered text checked
    against max_prompt_chars, then tokenized (CPU-bound: run it in request_limits.off_loop). Raises
    InputError(400, "messages") for a template error, an over-long or an empty prompt."""
    try:
        text, extra_stop = render_chat(tokenizer, messages, tools, continue_final, template_kwargs, generation_prompt)
    except ChatTemplateError as exc:
        raise InputError(400, "messages", str(exc)) from None
    limits.check_chars("messages", text)
    ids = encode(tokenizer, text)
    if not ids:
        raise InputError(400, "messages", "the rendered prompt is empty: send some content")
    return ids, extra_stop


def forced_prefix_ids(tokenizer, opening: str, rest: str) -> tuple[list[int], str]:
    """(token ids, text) of the longest run of leading tokens of `opening + rest` that ends within
    `opening`: the prefill of a forced tool call (tool_calls.forced_call). Cutting at a token boundary of
    the whole call, not tokenizing `opening` alone, gives the model the tokens it saw in training (BPE
    may merge `<tool_call>{"` into one token, which `<tool_call>` alone would split). A tokenizer
    without offsets (slow tokenizers) gets `opening` tokenized alone."""
    full = opening + rest
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return encode(tokenizer, opening), opening
    ends = [end for _, end in enc["offset_mapping"]]
    k = next((i for i, end in enumerate(ends) if end > len(opening)), len(ends))
    return list(enc["input_ids"][:k]), full[: ends[k - 1]] if k else ""


def conversation_key(messages: list[ChatMessage]) -> str:
    """The routing key of a conversation (GenerationRequest.affinity_key): a digest of its messages up to
    and including the first user message, which every later turn re-sends unchanged, so all turns of
    one conversation (an agent's loop included) reach the replica that cached its prompt."""
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages) - 1)
    opening = "\n".join(_plain_section(m) for m in messages[: first_user + 1])
    return "chat:" + hashlib.blake2b(opening.encode(), digest_size=12).hexdigest()


def render_plain(messages: list[ChatMessage], tools: list[ToolSpec] | None, continue_final: bool = False,
                 generation_prompt: bool = True) -> str:
    """The documented plain template (module docstring); the assistant's header last unless continue_final
    or not generation_prompt (render_chat)."""
    sections: list[str] = []
    if tools:
        lines = [f"To call a function, reply with {TOOL_OPEN}{{\"name\": ..., \"arguments\": {{...}}}}{TOOL_CLOSE}."]
        lines += [json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools]
        sections.append("### Tools\n" + "\n".join(lines))
    for message in messages:
        sections.append(_plain_section(message))
    if generation_prompt and not continue_final:
        sections.append("### Assistant\n")
    return "\n".join(sections)


def _plain_section(message: ChatMessage) -> str:
    content = message.content or ""
    if message.role == "tool":
        # The id is metadata a client may relay from anywhere (another provider, a stored history): its
        # line breaks and control characters are written as JSON escapes, so it stays on its line and
        # cannot open a turn of its own (an id holding a line break and "### System" did); plain ids read as sent
        label = json.dumps(message.tool_call_id or message.name or "call", ensure_ascii=False)[1:-1]
        return f"### Tool result ({label})\n{content}"
    parts = [content] if content else []
    for call in message.tool_calls or []:
        body = json.dumps({"name": call.function.name, "arguments": _parsed_arguments(call.function.arguments)},
                          ensure_ascii=False)
        parts.append(f"{TOOL_OPEN}{body}{TOOL_CLOSE}")
    return f"{_ROLE_HEADERS[message.role]}\n" + "\n".join(parts)


def _template_message(message: ChatMessage) -> dict:
    """A message as HF chat templates expect it (tool-call arguments as objects where they parse)."""
    out: dict = {"role": "system" if message.role == "developer" else message.role, "content": message.content or ""}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [{"id": call.id, "type": call.type,
                              "function": {"name": call.function.name,
                                           "arguments": _parsed_arguments(call.function.arguments)}}
                             for call in message.tool_calls]
    return out


def _parsed_arguments(arguments: str):
    """A call's arguments as an object where the JSON string parses (templates and the plain format write
    objects), else the string as sent; the string too where the object would hold a lone surrogate (an
    escape such as "\\ud800", valid JSON that the tokenizer cannot encode once read: a 500; a call this
    server returned is sent back so), or a number past float64 or int() (1e999 read as Infinity went into
    the prompt as `Infinity`, not JSON; helper-178)."""
    try:
        parsed = read_json(arguments)  # (NaN / Infinity refused; a number past float64 is a JSONNumber)
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")  # (a JSONNumber: TypeError)
    except (ValueError, UnicodeEncodeError, TypeError):  # (UnicodeEncodeError is a ValueError: named for the reader)
        return arguments
    return parsed
