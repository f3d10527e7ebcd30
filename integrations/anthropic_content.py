"""Anthropic Messages content mapped onto the chat turn's (integrations/anthropic_models.py builds the
turn from these): the system text, text blocks, tool_use and tool_result blocks (every tool_use answered
by a tool_result in the next user message, ids unique), tools, tool_choice and output_config.format.
Every fault is an InputError naming the Messages field (`messages.K.content.J...`) and what to change.
"""

from __future__ import annotations

import json

from integrations.request_limits import InputError


def system_text(system) -> str:
    """The top-level system prompt: a string, or text blocks joined by newlines."""
    if isinstance(system, str):
        return system
    return "\n".join(_text_of(block, f"system.{i}") for i, block in enumerate(system))


def block_texts(content, field: str) -> str:
    """A string, or the text of a list of text blocks joined by newlines (a system message within the
    conversation, as the top-level system's blocks)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(400, field, "must be a string or a list of text blocks")
    return "\n".join(_text_of(block, f"{field}.{i}") for i, block in enumerate(content))


def _text_of(block, field: str, nonempty: bool = True) -> str:
    """A text block's text. Raises InputError naming what is wrong with it: Anthropic's API refuses an
    empty text block ("text content blocks must be non-empty"), except here within a tool_result
    (`nonempty` False: a tool may print nothing)."""
    if not isinstance(block, dict):
        raise InputError(400, field, f"must be a text block ({{'type': 'text', 'text': ...}}), got a {type(block).__name__}")
    if block.get("type") != "text":
        raise InputError(400, f"{field}.type", f"only text blocks are supported here, got {block.get('type')!r}")
    if not isinstance(block.get("text"), str):
        raise InputError(400, f"{field}.text", "must be a string")
    if nonempty and not block["text"]:
        raise InputError(400, f"{field}.text", "must not be empty (Anthropic's rule: text content blocks must be "
                         "non-empty): drop the block")
    return block["text"]  # other fields of a block (cache_control, citations, newer ones an SDK echoes) are ignored


def unanswered(open_uses: dict[str, int]) -> None:
    """Raise the 400 of tool_use blocks whose tool_result the next user message does not carry."""
    ids = ", ".join(repr(i) for i in open_uses)
    raise InputError(400, f"messages.{min(open_uses.values())}.content", f"tool_use ids {ids} have no tool_result in "
                     "the next user message: answer every tool_use there (Anthropic's rule)")


def message_blocks(role: str, blocks: list, k: int, seen: set[str], open_uses: dict[str, int]) -> list[dict]:
    """One message's content blocks as chat messages: text (and, from the assistant, its tool calls) in
    one message; each tool_result a tool message, in the order written."""
    out: list[dict] = []
    text: list[str] = []
    calls: list[dict] = []

    def flush():
        if text or calls:
            message = {"role": role, "content": "".join(text) if text else None}
            if calls:
                message["tool_calls"] = list(calls)
            out.append(message)
            text.clear()
            calls.clear()

    for i, block in enumerate(blocks):
        field = f"messages.{k}.content.{i}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" or not isinstance(block, dict):
            text.append(_text_of(block, field))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, field, seen))
            open_uses[block["id"]] = k
        elif kind == "tool_result" and role == "user":
            if text:  # (Anthropic answers 400 there too)
                raise InputError(400, field, "tool_result blocks come first in a user message, every text block "
                                 "after them (Anthropic's rule): move the text after the tool_result blocks")
            flush()
            out.append(_tool_result(block, field, open_uses))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # an earlier turn's thinking, sent back by an agent: nothing to render
        elif kind in ("tool_use", "tool_result"):
            raise InputError(400, f"{field}.type", f"{kind} blocks belong in "
                             f"{'assistant' if kind == 'tool_use' else 'user'} messages")
        elif kind is None:
            raise InputError(400, f"{field}.type", "is missing: each content block needs a type (text, tool_use, "
                             "tool_result)")
        else:
            raise InputError(400, f"{field}.type", f"{kind!r} blocks are not supported here; send text, tool_use "
                             "and tool_result blocks")
    flush()
    return out


def _tool_use(block: dict, field: str, seen: set[str]) -> dict:
    for name in ("id", "name"):
        if not isinstance(block.get(name), str) or not block[name]:
            raise InputError(400, f"{field}.{name}", "must be a non-empty string")
    if not isinstance(block.get("input"), dict):
        raise InputError(400, f"{field}.input", "must be an object (the tool's arguments)")
    if block["id"] in seen:
        raise InputError(400, f"{field}.id", f"tool_use id {block['id']!r} is used twice: give each tool_use its own id")
    seen.add(block["id"])
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}}


def _tool_result(block: dict, field: str, open_uses: dict[str, int]) -> dict:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or call_id not in open_uses:
        raise InputError(400, f"{field}.tool_use_id", f"{call_id!r} is not a tool_use of the assistant message "
                         "before this one still to be answered: send that message (nothing is stored here), and "
                         "answer each tool_use once")
    del open_uses[call_id]
    if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
        raise InputError(400, f"{field}.is_error", "must be a boolean")
    content = block.get("content", "")
    if isinstance(content, list):
        content = "".join(_text_of(part, f"{field}.content.{j}", nonempty=False) for j, part in enumerate(content))
    elif not isinstance(content, str):
        raise InputError(400, f"{field}.content", "must be a string or a list of text blocks")
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# A custom tool's fields; cache_control is accepted and ignored, defer_loading (Anthropic's tool search,
# not offered) only false: every tool is in the prompt. input_examples would change what the model sees
# and is not rendered, so it is refused as an unknown field.
_TOOL_FIELDS = ("type", "name", "description", "input_schema", "strict", "cache_control", "defer_loading")


def chat_tool(tool: dict, k: int) -> dict:
    """Custom tool `tools.k` as a chat tool ({"type": "function", "function": {name, parameters = its
    input_schema, description, strict}}). Raises InputError naming `tools.k.<field>`."""
    if tool.get("type") not in (None, "custom"):
        raise InputError(400, f"tools.{k}.type", f"{tool.get('type')!r} tools are Anthropic's server or built-in "
                         "tools and are not offered here; define custom tools ({'name': ..., 'input_schema': {...}})")
    unknown = sorted(set(tool) - set(_TOOL_FIELDS))
    if unknown:
        raise InputError(400, f"tools.{k}.{unknown[0]}", f"unknown field of a tool ({', '.join(_TOOL_FIELDS)})")
    if tool.get("defer_loading") not in (None, False):
        raise InputError(400, f"tools.{k}.defer_loading", "only false: there is no tool search here, so every tool is "
                         "loaded into the prompt")
    if not isinstance(tool.get("input_schema"), dict):
        raise InputError(400, f"tools.{k}.input_schema", "is required: the JSON schema (an object) of the tool's input")
    function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    for key in ("description", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def chat_tool_choice(choice: dict, tool_names: list) -> tuple[str | dict, bool | None]:
    """(the chat tool_choice, parallel_tool_calls: False when disable_parallel_tool_use, else None)."""
    kind = choice.get("type")
    unknown = sorted(set(choice) - {"type", "name", "disable_parallel_tool_use"})
    if unknown:
        raise InputError(400, f"tool_choice.{unknown[0]}", "unknown field of tool_choice")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        raise InputError(400, "tool_choice.disable_parallel_tool_use", "must be a boolean")
    parallel = False if disable else None
    if kind not in ("auto", "any", "tool", "none"):
        raise InputError(400, "tool_choice.type", f'must be "auto", "any", "tool" or "none", got {kind!r}')
    if kind in ("any", "tool") and not tool_names:
        raise InputError(400, "tool_choice", f'"{kind}" needs `tools`: list the tools, or leave tool_choice out')
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if not isinstance(choice.get("name"), str) or not choice["name"]:
        raise InputError(400, "tool_choice.name", 'a "tool" choice names the tool: {"type": "tool", "name": ...}')
    if choice["name"] not in tool_names:
        raise InputError(400, "tool_choice.name", f"{choice['name']!r} is not in `tools` ({', '.join(map(str, tool_names))}): "
                         "name one of them")
    return {"type": "function", "function": {"name": choice["name"]}}, parallel


def chat_response_format(fmt) -> dict:
    """output_config.format ({"type": "json_schema", "schema"}) as the chat turn's response_format.
    Raises InputError naming `output_config.format[.<field>]`."""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InputError(400, "output_config.format", 'use {"type": "json_schema", "schema": {...}}')
    unknown = sorted(set(fmt) - {"type", "schema"})
    if unknown:
        raise InputError(400, f"output_config.format.{unknown[0]}", "unknown field of a format (type, schema)")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
